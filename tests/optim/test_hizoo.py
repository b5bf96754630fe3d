import copy
import io
import math
import time

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from edgetune.errors import EdgetuneError
from edgetune.optim import HiZOO, MeZO
from edgetune.optim.hizoo import ZOStepRecord, buffer_bytes, state_bytes

DTYPES = [torch.float32, torch.bfloat16]
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that -0.0 != 0.0 and NaN payloads count."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().view(ints[t.element_size()]).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(a), bits(b))


def exact_regime_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Values whose perturbations stay in their binade ([1, 2)) and zeros: where restore can be exact."""
    g = torch.Generator().manual_seed(3)
    inside = torch.nn.Parameter((torch.rand(3000, generator=g) * 0.5 + 1.25).to(dtype))
    mixed = (torch.rand(1500, generator=g) * 0.5 + 1.25) * (torch.rand(1500, generator=g) > 0.3)  # zeros in chunks
    return [inside, torch.nn.Parameter(torch.zeros(40, 50, dtype=dtype)), torch.nn.Parameter(mixed.to(dtype))]


def quad_loss(params: list[torch.Tensor]) -> torch.Tensor:
    return sum((p.float() ** 2).sum() * (i + 1) for i, p in enumerate(params))


def llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval().to(dtype)


def lm_closure(model: torch.nn.Module):
    return lambda: model(input_ids=IDS, labels=IDS).loss


# --- exact restore ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("hessian", [True, False])
def test_step_with_lr_zero_restores_parameters_bit_identical(dtype, hessian):
    params = exact_regime_params(dtype)
    before = [p.detach().clone() for p in params]
    opt = HiZOO(params, lr=0.0, eps=1e-3, hessian=hessian, hessian_smooth=0.1, chunk_numel=700)
    for _ in range(3):
        opt.step(lambda: quad_loss(params))
    assert all(same_bits(p, b) for p, b in zip(params, before, strict=True))
    # The same data through the reference's +eps z, -2 eps z, +eps z does not come back: the test can fail.
    z = torch.randn(3000, generator=torch.Generator().manual_seed(4))
    naive = before[0].clone()
    for scale in (1e-3, -2e-3, 1e-3):
        naive.add_(z, alpha=scale)
    assert not same_bits(naive, before[0])


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's floats at |x| (the wider one at a power of two), in float64."""
    info = torch.finfo(dtype)
    mantissa, exponent = torch.frexp(x.detach().double().abs())  # |x| = mantissa 2^exponent, mantissa in [0.5, 1)
    spacing = torch.ldexp(torch.full_like(mantissa, info.eps), exponent - 1)
    return torch.where(mantissa == 0, 0.0, spacing).clamp(min=info.smallest_normal * info.eps)  # subnormal spacing


def spread_trials(dtype: torch.dtype, trials: int = 24, n: int = 8192):
    """(theta, eps, H) over many binades: scales 1e-6..10 (fp16 subnormals), eps 1e-5..0.1, zeros in every other."""
    g = torch.Generator().manual_seed(9)
    for trial in range(trials):
        scale, eps = (
            10.0 ** (torch.rand(2, generator=g) * torch.tensor([7.0, 4.0]) - torch.tensor([6.0, 5.0]))
        ).tolist()
        keep = torch.rand(n, generator=g) > (0.02 if trial % 2 else 0.0)  # chunks with a zero take the masked restore
        theta = (torch.randn(n, generator=g) * scale * keep).to(dtype)
        yield theta, eps, torch.rand(n, generator=g) * 10 + 0.01  # H spreads d = eps z / sqrt(H) per coordinate


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
def test_round_trip_comes_back_within_one_ulp_of_the_perturbed_value(dtype):
    """The module docstring's bound |r - theta| <= ulp(s), measured: the test fails if any coordinate exceeds it."""
    worst, moved, off, total = 0.0, 0, 0, 0
    for trial, (theta, eps, hessian) in enumerate(spread_trials(dtype)):
        p = torch.nn.Parameter(theta.clone())
        opt = HiZOO([p], lr=0.0, eps=eps, chunk_numel=1024, workers=1, perturbation="gaussian")
        opt.state[p]["hessian"] = hessian
        for sign in (1, -1):
            with torch.no_grad():
                p.copy_(theta)
                opt._sweep(trial, recover=0, perturb=sign)
                s = p.detach().clone()
                opt._sweep(trial, recover=sign, perturb=0)
            error = (p.detach().double() - theta.double()).abs()
            worst = max(worst, (error / ulp(s, dtype)).max().item())
            moved, off, total = moved + int((s != theta).sum()), off + int((error > 0).sum()), total + theta.numel()
    print(f"{dtype}: worst round trip {worst} ulp(s); {off} of {moved} perturbed coordinates ({total} in all) off")
    assert worst <= 1.0
    assert moved > total / 2 and off > total / 100  # perturbations large enough, and rounding enough, to test it


def step_at_lr_zero(theta: torch.Tensor, eps: float, hessian: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(theta + d, theta - d, theta after) as one HiZOO step with lr = 0 sees them (H fixed at ``hessian``)."""
    p = torch.nn.Parameter(theta.clone())
    opt = HiZOO([p], lr=0.0, eps=eps, hessian_smooth=0.0, chunk_numel=1024, workers=1)
    if hessian is not None:
        opt.state[p]["hessian"] = hessian
    closure, seen = recording(p, lambda: (p.float() ** 2).sum())
    opt.step(closure)
    plus, minus = seen[1][0], seen[2][0]  # seen[0] is theta itself (l0)
    return plus, minus, p.detach().double()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
def test_step_at_lr_zero_comes_back_within_its_two_round_trips(dtype):
    """theta -> s+ -> back -> s- -> back: within ulp(s+) + ulp(s-), which can exceed one ulp of |theta| + |d|."""
    worst, worst_one_ulp = 0.0, 0.0
    general = (torch.randn(20000, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype), 1e-3, None
    for theta, eps, hessian in [general, *spread_trials(dtype, trials=12)]:
        plus, minus, after = step_at_lr_zero(theta, eps, hessian)
        error = (after - theta.double()).abs()
        worst = max(worst, (error / (ulp(plus, dtype) + ulp(minus, dtype))).max().item())
        worst_one_ulp = max(worst_one_ulp, (error / ulp(torch.maximum(plus.abs(), minus.abs()), dtype)).max().item())
        if hessian is None:
            assert (after == theta.double()).float().mean().item() > 0.88  # the reference arithmetic leaves about 54%
    print(f"{dtype}: worst step {worst} of ulp(s+) + ulp(s-), {worst_one_ulp} ulp of max(|s+|, |s-|)")
    assert worst <= 1.0


# --- seeds, RNG, chunking ---------------------------------------------------------------------------------------


def test_same_seed_same_run_and_global_rng_untouched():
    def run(seed):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 500)), torch.nn.Parameter(torch.ones(7, 3))]
        opt = HiZOO(params, lr=1e-2, hessian_smooth=1e-2, seed=seed, chunk_numel=64, log_size=2)
        for _ in range(4):
            opt.step(lambda: quad_loss(params))
        assert [r.step for r in opt.log] == [2, 3]
        return params

    rng = torch.get_rng_state()
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(same_bits(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_z_depends_only_on_step_tensor_and_chunk():
    """A tensor's trajectory does not change when another tensor stops being trained (its index is kept)."""

    def run(train_other):
        x, other = torch.nn.Parameter(torch.linspace(-1, 1, 300)), torch.nn.Parameter(torch.ones(50))
        other.requires_grad_(train_other)
        empty = torch.nn.Parameter(torch.zeros(0))
        opt = HiZOO([other, empty, x], lr=1e-2, hessian_smooth=1e-2, chunk_numel=128)
        for _ in range(3):
            opt.step(lambda: (x**2).sum())  # the loss ignores `other`, so l+/l- only see x's perturbation
        return x

    assert same_bits(run(True), run(False))


@pytest.mark.parametrize("hessian", [True, False])
@pytest.mark.parametrize("workers", [1, 3])
def test_work_buffer_is_one_chunk_per_worker_not_model_sized(hessian, workers):
    params = [torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(30))]
    opt = HiZOO(params, lr=1e-3, hessian=hessian, chunk_numel=256, workers=workers)
    opt.step(lambda: quad_loss(params))
    (slots,) = opt._sweeper._work.values()
    assert len(slots) == workers and len({id(slot.generator) for slot in slots}) == workers
    assert sum(slot.buffer.numel() for slot in slots) == buffer_bytes(1000, hessian, 256, workers)
    assert buffer_bytes(1000, hessian, 256, workers) == workers * 256 * (13 if hessian else 9)
    opt.close()


def test_state_and_buffer_bytes_are_pure_formulas():
    assert state_bytes(1_000_000, hessian=True) == 4_000_000
    assert state_bytes(1_000_000, hessian=False) == 0
    assert buffer_bytes(10, hessian=True, chunk_numel=1 << 18) == 13 * 32  # whole words of 32 random bits
    assert buffer_bytes(10**9, hessian=False, chunk_numel=1 << 18) == 9 << 18
    assert buffer_bytes(10**9, hessian=True, chunk_numel=1 << 18, workers=2) == 26 << 18


# --- worker threads ---------------------------------------------------------------------------------------------


def zero_and_general_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(8)
    general = torch.nn.Parameter((torch.randn(5000, generator=g) * 0.02).to(dtype))
    some_zeros = torch.nn.Parameter((torch.randn(900, generator=g) * (torch.rand(900, generator=g) > 0.5)).to(dtype))
    return [general, some_zeros, torch.nn.Parameter(torch.zeros(37, dtype=dtype))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hessian", [True, False])
def test_result_is_bit_identical_for_any_worker_count(dtype, hessian):
    """Every chunk draws z from its own seed, so the threads that run the chunks do not matter."""

    def run(workers):
        params = zero_and_general_params(dtype)
        opt = HiZOO(params, lr=1e-2, hessian=hessian, hessian_smooth=1e-2, chunk_numel=128, workers=workers)
        for _ in range(3):
            opt.step(lambda: quad_loss(params))
        opt.close()
        return params, [opt.state[p].get("hessian") for p in params]

    (one, h_one), (four, h_four) = run(1), run(4)
    assert all(same_bits(a, b) for a, b in zip(one, four, strict=True))
    if hessian:
        assert all(torch.equal(a, b) for a, b in zip(h_one, h_four, strict=True))
    assert not same_bits(zero_and_general_params(dtype)[0], one[0])  # the steps moved the weights


def test_workers_stay_out_of_state_dict_and_restore_thread_count():
    params = zero_and_general_params(torch.float32)
    threads = torch.get_num_threads()
    opt = HiZOO(params, lr=1e-2, chunk_numel=128, workers=3)
    opt.step(lambda: quad_loss(params))
    assert torch.get_num_threads() == threads and opt._sweeper._pool is not None
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a thread pool could not be pickled
    opt.close()
    assert opt._sweeper._pool is None
    opt.step(lambda: quad_loss(params))  # the threads come back on demand
    opt.close()


def test_a_failing_chunk_raises_after_every_worker_stopped():
    params = zero_and_general_params(torch.float32)
    opt = HiZOO(params, lr=1e-2, hessian=False, chunk_numel=64, workers=3)
    chunk, seen = opt._chunk, []

    def failing(job, slot, seed, signs):
        seen.append(job.key)
        if job.key == (0, 5):
            raise RuntimeError("chunk failed")
        chunk(job, slot, seed, signs)

    opt._chunk = failing
    with pytest.raises(RuntimeError, match="chunk failed"):
        opt.step(lambda: quad_loss(params))
    count = len(seen)
    assert count < len(range(0, 5000, 64)) + len(range(0, 900, 64)) + 1  # the others stopped early
    time.sleep(0.05)
    assert len(seen) == count  # and none was still running when step() raised
    opt.close()


# --- the update rule against its formula ------------------------------------------------------------------------


def recording(x, loss):
    seen = []

    def closure():
        seen.append((x.detach().double().clone(), float(loss())))
        return loss()

    return closure, seen


@pytest.mark.parametrize("estimator", ["released", "unbiased"])
def test_hizoo_step_matches_formula(estimator):
    h_true = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    x = torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0]))
    eps, lr, alpha, wd = 1e-2, 0.05, 0.3, 0.1
    closure, seen = recording(x, lambda: 0.5 * (h_true.float() * x * x).sum())
    opt = HiZOO([x], lr=lr, eps=eps, weight_decay=wd, hessian_smooth=alpha, hessian_estimator=estimator)
    returned = opt.step(closure)
    (theta, l0), (plus, lp), (minus, lm) = seen
    assert float(returned) == l0 and len(seen) == 3
    z = (plus - theta) / eps  # H starts at 1
    assert torch.allclose(minus, theta - eps * z, atol=1e-6)
    c = (lp + lm - 2 * l0) / (2 * eps**2)
    est = abs(c) * z**2 if estimator == "released" else c * (z**2 - 1) * 2  # sparse z: 2 / (E z^4 - 1) = 2
    h_new = ((1 - alpha) + alpha * est).clamp(min=1e-4)
    expected = theta - lr * ((lp - lm) / (2 * eps) * z / h_new.sqrt() + wd * theta)
    assert torch.allclose(opt.state[x]["hessian"].double(), h_new, rtol=1e-4)
    assert torch.allclose(x.detach().double(), expected, rtol=1e-5, atol=1e-6)
    record = opt.log[-1]
    assert record.projected_grad == pytest.approx((lp - lm) / (2 * eps)) and record.curvature == pytest.approx(c)


def test_mezo_step_matches_formula_with_two_forwards():
    x = torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25, 2.0]))
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    eps, lr, wd = 1e-2, 0.1, 0.2
    closure, seen = recording(x, lambda: (w * x).sum() + (x**2).sum())
    opt = MeZO([x], lr=lr, eps=eps, weight_decay=wd)
    returned = opt.step(closure)
    (plus, lp), (minus, lm) = seen
    assert float(returned) == lp
    theta, z = (plus + minus) / 2, (plus - minus) / (2 * eps)
    expected = theta - lr * ((lp - lm) / (2 * eps) * z + wd * theta)
    assert torch.allclose(x.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[x] == {} and opt.log[-1].curvature == 0.0


# --- the separable quadratic ------------------------------------------------------------------------------------


def test_unbiased_hessian_estimate_approaches_true_diagonal():
    h_true = torch.tensor([0.5, 1.0, 2.0, 4.0])

    def mean_hessian(estimator, steps, burn_in):
        x = torch.nn.Parameter(torch.ones(4))
        opt = HiZOO([x], lr=0.0, eps=1e-2, hessian_smooth=0.01, hessian_estimator=estimator, seed=0)
        total = torch.zeros(4)
        for i in range(steps):
            opt.step(lambda: 0.5 * (h_true * x * x).sum())
            total += opt.state[x]["hessian"] * (i >= burn_in)
        return total / (steps - burn_in)

    ratio = mean_hessian("unbiased", 2500, 300) / h_true
    assert ((ratio - 1).abs() < 0.3).all() and abs(ratio.mean().item() - 1) < 0.1, ratio
    # The released estimator tracks the shape but inflates it about (d + 2) / 2 = 3 times.
    assert (mean_hessian("released", 800, 300) / h_true).mean() > 2


@pytest.mark.parametrize("perturbation", ["gaussian", "sparse"])
def test_unbiased_increment_has_the_hessian_diagonal_as_its_mean(perturbation):
    """E[c H (z^2 - 1)] 2 / (kappa - 1) = A_ii on a quadratic with off-diagonal curvature (the module's derivation).

    H is reset to 1 before each step, so with alpha small and no clamp the increment is (H_new - (1 - alpha)) / alpha.
    """
    d, alpha = 6, 1e-3
    a = torch.diag(torch.arange(1.0, d + 1, dtype=torch.float64)) + 0.3 * (1 - torch.eye(d, dtype=torch.float64))
    x = torch.nn.Parameter(torch.linspace(-1, 1, d))
    opt = HiZOO([x], lr=0.0, eps=0.1, hessian_smooth=alpha, hessian_estimator="unbiased", perturbation=perturbation)
    samples = []
    for _ in range(4000):
        opt.state[x]["hessian"] = torch.ones(d)
        opt.step(lambda: 0.5 * x.double() @ a @ x.double())
        samples.append((opt.state[x]["hessian"].double() - (1 - alpha)) / alpha)
    stacked = torch.stack(samples)
    mean, standard_error = stacked.mean(0), stacked.std(0) / len(samples) ** 0.5
    assert ((mean - a.diag()).abs() < 4 * standard_error).all(), (mean, standard_error)
    if perturbation == "sparse":  # without the 2 / (kappa - 1) = 2 factor the trace would come out halved
        traces = stacked.sum(1)
        trace_error = traces.std() / len(samples) ** 0.5
        assert abs(traces.mean() - a.trace()) < 4 * trace_error < abs(traces.mean() / 2 - a.trace())


def test_rademacher_cannot_estimate_a_diagonal_so_hizoo_refuses_it():
    """z^2 = 1 makes every coordinate's increment c (z_i^2 - 1) zero: the diagonal is not identifiable."""
    with pytest.raises(ValueError, match="sparse"):
        HiZOO([torch.nn.Parameter(torch.ones(3))], perturbation="rademacher")
    MeZO([torch.nn.Parameter(torch.ones(3))], perturbation="rademacher")  # the gradient estimate needs only E z^2


def test_a_state_saved_before_the_perturbation_option_resumes_with_gaussian_draws_bit_for_bit():
    def run(steps, state=None):
        x = torch.nn.Parameter(torch.linspace(1.1, 1.9, 300))
        opt = HiZOO([x], lr=1e-2, hessian_smooth=1e-2, perturbation=None if state else "gaussian")
        if state is not None:
            x.data.copy_(state[0])
            opt.load_state_dict(state[1])  # a fresh optimizer (default: sparse) adopts the saved distribution
        for _ in range(steps):
            opt.step(lambda: (x**2).sum())
        return x.detach().clone(), opt

    straight, _ = run(4)
    x, opt = run(2)
    saved = opt.state_dict()
    del saved["state"]["perturbation"]  # as written before the option existed
    resumed, resumed_opt = run(2, (x, saved))
    assert resumed_opt.perturbation == "gaussian" and same_bits(resumed, straight)
    y = torch.nn.Parameter(torch.ones(300))
    stepped = HiZOO([y], lr=1e-2)  # sparse, and no longer fresh
    stepped.step(lambda: (y**2).sum())
    with pytest.raises(EdgetuneError, match="perturbation=gaussian"):
        stepped.load_state_dict(saved)


def test_hizoo_beats_mezo_at_equal_forward_passes_on_ill_conditioned_quadratic():
    h = torch.logspace(-2, 2, 4)  # condition number 1e4

    def final_loss(lr, hessian, seed, forwards=900):
        x = torch.nn.Parameter(h.rsqrt())  # every coordinate starts with the same loss share
        opt = HiZOO([x], lr=lr, eps=1e-3, hessian=hessian, hessian_smooth=0.05, seed=seed)
        for _ in range(forwards // (3 if hessian else 2)):
            opt.step(lambda: 0.5 * (h * x * x).sum())
        return 0.5 * (h * x.detach() ** 2).sum().item()

    seeds = range(3)
    mezo_best = min(sum(final_loss(lr, False, s) for s in seeds) / 3 for lr in (0.001, 0.003, 0.01, 0.03))
    hizoo = sum(final_loss(0.1, True, s) for s in seeds) / 3
    assert hizoo < 0.5 * mezo_best, (hizoo, mezo_best)


# --- skipping, closures, errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hessian", [True, False])
def test_non_finite_loss_restores_skips_and_counts(hessian):
    params = exact_regime_params(torch.float32)
    before = [p.detach().clone() for p in params]
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 2 else quad_loss(params)

    opt = HiZOO(params, lr=1.0, hessian=hessian, hessian_smooth=0.5)
    opt.step(closure)
    assert all(same_bits(p, b) for p, b in zip(params, before, strict=True))
    assert opt.state["skipped_steps"] == 1 and opt.state["step"] == 1 and opt.log[-1].skipped
    if hessian:
        assert all(torch.equal(opt.state[p]["hessian"], torch.ones_like(p)) for p in params)
    opt.step(lambda: quad_loss(params))
    assert opt.state["skipped_steps"] == 1 and not torch.equal(params[0], before[0])


def test_non_finite_l0_stops_before_perturbing():
    x = torch.nn.Parameter(torch.linspace(0, 1, 10))
    calls = []
    opt = HiZOO([x], lr=1.0)
    opt.step(lambda: calls.append(1) or torch.tensor(float("inf")))
    assert len(calls) == 1 and opt.state["skipped_steps"] == 1 and not opt.log[-1].perturbed


def test_closure_that_forgets_no_grad_still_builds_no_graph():
    x = torch.nn.Parameter(torch.ones(5))
    loss = HiZOO([x], lr=1e-2).step(lambda: (x**2).sum())
    assert loss.grad_fn is None and x.grad is None


@pytest.mark.parametrize("hessian", [True, False])
def test_closure_errors_raise_and_leave_parameters_restored(hessian):
    params = exact_regime_params(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    opt = HiZOO(params, lr=1e-2, hessian=hessian)

    def with_grad():
        with torch.enable_grad():
            return quad_loss(params)

    with pytest.raises(EdgetuneError, match="requires grad"):
        opt.step(with_grad)
    with pytest.raises(EdgetuneError, match="no closure"):
        opt.step()
    with pytest.raises(EdgetuneError, match="returned tuple"):
        opt.step(lambda: (1.0, 2.0))
    calls = []

    def fails_on_minus():
        calls.append(1)
        if len(calls) == (3 if hessian else 2):
            raise RuntimeError("out of memory")
        return quad_loss(params)

    with pytest.raises(RuntimeError):
        opt.step(fails_on_minus)
    assert all(same_bits(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1.0),
        dict(lr=float("nan")),
        dict(eps=0.0),
        dict(eps=float("inf")),
        dict(weight_decay=-0.1),
        dict(hessian_smooth=1.5),
        dict(hessian_smooth=float("nan")),
        dict(hessian_estimator="paper"),
        dict(hessian_min=0.0),
        dict(seed=-1),
        dict(seed=1.5),
        dict(chunk_numel=0),
        dict(chunk_numel=2.5),
        dict(log_size=-1),
        dict(workers=0),
        dict(workers=1.5),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"HiZOO {name}="):
        HiZOO([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_invalid_parameters_and_groups_raise_value_error():
    with pytest.raises(ValueError, match="dtype of a trainable parameter"):
        HiZOO([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="layout of a trainable parameter"):
        HiZOO([torch.nn.Parameter(torch.ones(4, 3).t())])
    with pytest.raises(ValueError, match="HiZOO lr="):
        HiZOO([{"params": [torch.nn.Parameter(torch.ones(3))], "lr": -1e-3}])
    opt = HiZOO([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="hessian_smooth"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "hessian_smooth": -1.0})
    assert len(opt.param_groups) == 1  # a rejected group is not half-added
    frozen_int = torch.nn.Parameter(torch.ones(3, dtype=torch.uint8), requires_grad=False)
    HiZOO([frozen_int, torch.nn.Parameter(torch.ones(3))])  # frozen (e.g. quantized) weights are skipped
    with pytest.raises(ValueError, match="step and seed"):
        ZOStepRecord(-1, 0, 0.0, 0.0, (), (), True, False)
    with pytest.raises(ValueError, match="grad/curvature finite"):
        ZOStepRecord(0, 0, float("nan"), 0.0, (), (), True, False)
    with pytest.raises(TypeError):
        MeZO([torch.nn.Parameter(torch.ones(3))], hessian=True)


# --- replay and resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hessian", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_step_log_replays_the_run_exactly(hessian, dtype):
    model, start = llama(dtype), llama(dtype)
    opt = HiZOO(model.parameters(), lr=2e-3, hessian=hessian, hessian_smooth=1e-2, seed=7)
    loss, calls = lm_closure(model), []

    def closure():  # one non-finite loss, so a skipped step is replayed too
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 5 else loss()

    for _ in range(4):
        opt.step(closure)
    assert opt.state["skipped_steps"] == 1
    replayer = HiZOO(start.parameters(), lr=2e-3, hessian=hessian, hessian_smooth=1e-2, seed=7)
    replayer.replay(opt.log)
    assert all(same_bits(a, b) for a, b in zip(model.parameters(), start.parameters(), strict=True))
    if hessian:
        for a, b in zip(model.parameters(), start.parameters(), strict=True):
            assert torch.equal(opt.state[a]["hessian"], replayer.state[b]["hessian"])
    with pytest.raises(EdgetuneError, match="record for step 0"):
        replayer.replay(opt.log)


@pytest.mark.parametrize("hessian", [True, False])
def test_resume_from_state_dict_matches_uninterrupted_run(hessian):
    kwargs = dict(lr=2e-3, hessian=hessian, hessian_smooth=1e-2, chunk_numel=4096)
    straight, resumed = llama(torch.bfloat16), llama(torch.bfloat16)
    opt = HiZOO(straight.parameters(), seed=11, **kwargs)
    for _ in range(5):
        opt.step(lm_closure(straight))
    first = HiZOO(resumed.parameters(), seed=11, **kwargs)
    for _ in range(3):
        first.step(lm_closure(resumed))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = HiZOO(resumed.parameters(), seed=999, **kwargs)  # the saved base seed wins
    second.load_state_dict(torch.load(buffer))
    for _ in range(2):
        second.step(lm_closure(resumed))
    assert all(same_bits(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))
    assert second.state["step"] == 5 and second.state["base_seed"] == 11
    if hessian:
        assert all(second.state[p]["hessian"].dtype == torch.float32 for p in resumed.parameters())
    other = HiZOO(resumed.parameters(), seed=11, **{**kwargs, "chunk_numel": 128})
    with pytest.raises(EdgetuneError, match="chunk_numel=4096"):
        other.load_state_dict(second.state_dict())
    flipped = HiZOO(resumed.parameters(), **{**kwargs, "hessian": not hessian})
    with pytest.raises(EdgetuneError, match=f"hessian={hessian}"):
        flipped.load_state_dict(second.state_dict())


# --- real models ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_model_loss_decreases_and_stays_finite(dtype):
    model = llama(dtype)
    loss = lm_closure(model)
    with torch.no_grad():
        start = loss().item()
    opt = HiZOO(model.parameters(), lr=3e-3, hessian_smooth=1e-6)
    for _ in range(8):
        opt.step(loss)
    with torch.no_grad():
        end = loss().item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(opt.state[p]["hessian"].dtype == torch.float32 for p in model.parameters())
    assert end < start - 0.02, (start, end)


def lora_loss_drop(model) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    loss = lm_closure(model)
    with torch.no_grad():
        start = loss().item()  # before the snapshot: bitsandbytes repacks NF4 weights on the first CPU forward
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = HiZOO(model.parameters(), lr=3e-2, hessian_smooth=1e-4)  # frozen base weights are skipped
    for _ in range(6):
        opt.step(loss)
    assert all(same_bits(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.isfinite(p).all() for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        return start, loss().item()


def test_lora_parameters_train_and_base_stays_untouched(tiny_model):
    start, end = lora_loss_drop(tiny_model)
    assert end < start


def test_lora_over_nf4_base(tmp_path):
    from transformers import BitsAndBytesConfig

    llama().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    assert any(p.dtype == torch.uint8 for p in model.parameters())
    start, end = lora_loss_drop(model)
    assert math.isfinite(end) and end < start


@pytest.mark.gpu
@pytest.mark.parametrize(("hessian", "perturbation"), [(True, "gaussian"), (True, "sparse"), (False, "rademacher")])
def test_on_cuda_lr_zero_restores_and_the_log_replays_and_resumes(hessian, perturbation):
    kwargs = dict(eps=1e-3, hessian=hessian, hessian_smooth=1e-2, perturbation=perturbation, chunk_numel=700)
    params = [p.detach().cuda().requires_grad_() for p in exact_regime_params(torch.float32)]
    before = [p.detach().clone() for p in params]
    opt = HiZOO(params, lr=0.0, **kwargs)
    for _ in range(2):
        opt.step(lambda: quad_loss(params))
    assert all(same_bits(p, b) for p, b in zip(params, before, strict=True))

    straight, start = llama().cuda(), llama().cuda()
    ids = IDS.cuda()
    kwargs.update(lr=2e-3, chunk_numel=4096)
    opt = HiZOO(straight.parameters(), seed=7, **kwargs)
    opt.step(lambda: straight(input_ids=ids, labels=ids).loss)
    saved = copy.deepcopy(opt.state_dict())  # the state holds the live Hessian tensors, as a checkpoint would copy
    opt.step(lambda: straight(input_ids=ids, labels=ids).loss)
    replayer = HiZOO(start.parameters(), seed=7, **kwargs)
    replayer.replay(list(opt.log)[:1])
    resumed = HiZOO(start.parameters(), seed=7, **kwargs)
    resumed.load_state_dict(saved)
    resumed.step(lambda: start(input_ids=ids, labels=ids).loss)
    moved = any(not same_bits(a, b) for a, b in zip(straight.parameters(), llama().cuda().parameters(), strict=True))
    assert moved and all(same_bits(a, b) for a, b in zip(straight.parameters(), start.parameters(), strict=True))
