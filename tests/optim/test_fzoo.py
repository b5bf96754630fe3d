"""FZOO against its formula by hand, and the in-place machinery's promises: restore, replay, resume, workers."""

import math

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from edgetune.errors import EdgetuneError
from edgetune.optim import FZOO
from edgetune.optim.fzoo import buffer_bytes

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32}
    return t.detach().view(ints[t.element_size()]).clone()


def recording(x, loss):
    seen = []

    def closure():
        seen.append((x.detach().double().clone(), float(loss())))
        return loss()

    return closure, seen


def test_step_matches_the_formula_by_hand():
    """theta <- theta - lr (g / sigma + wd theta), g = sum (l_i - l0) u_i / (eps N), sigma the losses' sample std."""
    w = torch.tensor([3.0, -1.0, 2.0, 0.5, -2.0], dtype=torch.float64)
    x = torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0]))
    eps, lr, wd, n = 1e-2, 0.05, 0.1, 4
    closure, seen = recording(x, lambda: (w * x.double()).sum() + (x.double() ** 2).sum())
    opt = FZOO([x], lr=lr, eps=eps, directions=n, weight_decay=wd, seed=5)
    returned = opt.step(closure)
    assert len(seen) == n + 1 and float(returned) == seen[0][1]
    theta, l0 = seen[0]
    us = [(point - theta) / eps for point, _ in seen[1:]]
    assert all(torch.allclose(u.abs(), torch.ones(5, dtype=torch.float64), atol=1e-4) for u in us)  # Rademacher
    losses = [loss for _, loss in seen[1:]]
    g = sum((loss - l0) * u for loss, u in zip(losses, us, strict=True)) / (eps * n)
    mean = sum(losses) / n
    sigma = math.sqrt(sum((loss - mean) ** 2 for loss in losses) / (n - 1))
    expected = theta - lr * (g / sigma + wd * theta)
    assert torch.allclose(x.detach().double(), expected, rtol=1e-5, atol=1e-6)
    record = opt.log[-1]
    assert record.losses == (l0, *losses) and not record.skipped
    assert record.coefficients == pytest.approx([(loss - l0) / (eps * n * sigma) for loss in losses])


def test_step_is_scale_free_in_the_loss():
    """g / sigma does not change when the loss is multiplied by a constant: the normalised-SGD property."""

    def after_one_step(scale):
        x = torch.nn.Parameter(torch.linspace(-1, 1, 7))
        opt = FZOO([x], lr=1e-2, eps=1e-3, seed=3)
        opt.step(lambda: scale * (x.double() ** 2 + x.double()).sum())
        return x.detach()

    assert torch.allclose(after_one_step(1.0), after_one_step(1000.0), atol=1e-5)


def test_loss_falls_on_a_quadratic():
    h = torch.logspace(-1, 1, 16)
    x = torch.nn.Parameter(torch.ones(16))
    opt = FZOO([x], lr=2e-3, eps=1e-3, seed=0)
    start = float(0.5 * (h * x.detach() ** 2).sum())
    for _ in range(200):
        opt.step(lambda: 0.5 * (h * x * x).sum())
    assert float(0.5 * (h * x.detach() ** 2).sum()) < 0.5 * start


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_restores_values_in_their_binade_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    inside = torch.nn.Parameter((torch.rand(3000, generator=g) * 0.5 + 1.25).to(dtype))
    zeros = torch.nn.Parameter(torch.zeros(40, 50, dtype=dtype))
    before = [bits(inside), bits(zeros)]
    opt = FZOO([inside, zeros], lr=0.0, eps=1e-3, chunk_numel=700)
    opt.step(lambda: (inside.float() ** 2).sum() + zeros.float().sum())
    assert torch.equal(bits(inside), before[0]) and torch.equal(bits(zeros), before[1])


def test_result_is_bit_identical_for_any_worker_count():
    def run(workers):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config()).eval()
        opt = FZOO(model.parameters(), lr=1e-3, chunk_numel=256, workers=workers, directions=3)
        for _ in range(2):
            opt.step(lambda: model(input_ids=IDS, labels=IDS).loss)
        opt.close()
        return [bits(p) for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(1), run(3), strict=True))


def test_step_log_replays_and_state_dict_resumes_bit_identically():
    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config()).eval()

    straight, start = model(), model()
    opt = FZOO(straight.parameters(), lr=2e-3, seed=7, directions=3)
    for _ in range(2):
        opt.step(lambda: straight(input_ids=IDS, labels=IDS).loss)
    saved = opt.state_dict()
    opt.step(lambda: straight(input_ids=IDS, labels=IDS).loss)
    replayer = FZOO(start.parameters(), lr=2e-3, seed=7, directions=3)
    replayer.replay(list(opt.log)[:2])
    resumed = FZOO(start.parameters(), lr=2e-3, seed=999, directions=3)  # the saved base seed wins
    resumed.load_state_dict(saved)
    resumed.step(lambda: start(input_ids=IDS, labels=IDS).loss)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(straight.parameters(), start.parameters(), strict=True))
    with pytest.raises(EdgetuneError, match="directions=3"):
        FZOO(start.parameters(), directions=4).load_state_dict(saved)


def test_non_finite_or_identical_losses_restore_and_skip():
    x = torch.nn.Parameter(torch.tensor([1.25, 1.5, 1.75]))  # inside a binade: restored bit for bit
    before = x.detach().clone()
    calls = []

    def exploding():
        calls.append(1)
        return torch.tensor(math.inf if len(calls) == 3 else 1.0)

    opt = FZOO([x], lr=1.0, eps=1e-3, directions=4)
    opt.step(exploding)
    assert torch.equal(x.detach(), before) and opt.log[-1].skipped and len(calls) == 3
    opt.step(lambda: torch.tensor(2.0))  # sigma = 0: nothing to normalise
    assert torch.equal(x.detach(), before) and opt.state["skipped_steps"] == 2


def test_closure_errors_leave_parameters_restored():
    x = torch.nn.Parameter(torch.tensor([1.25, 1.5, 1.75]))
    before = x.detach().clone()
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("forward failed")
        return (x**2).sum()

    with pytest.raises(RuntimeError, match="forward failed"):
        FZOO([x], lr=1.0).step(failing)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize(
    "kwargs", [{"eps": 0.0}, {"directions": 1}, {"perturbation": "uniform"}, {"lr": -1.0}, {"seed": -1}]
)
def test_invalid_hyperparameters_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="FZOO"):
        FZOO([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_no_closure_is_one_clear_error_and_buffers_are_one_chunk():
    x = torch.nn.Parameter(torch.ones(5000))
    opt = FZOO([x], lr=1e-3, chunk_numel=256, workers=2)
    with pytest.raises(EdgetuneError, match="closure"):
        opt.step()
    opt.step(lambda: (x**2).sum())
    assert sum(b.numel() for b in opt.work_buffers()) == buffer_bytes(5000, 256, 2) == 2 * 256 * 13
    opt.close()


@pytest.mark.gpu
def test_on_cuda_lr_zero_restores_and_the_log_replays_and_resumes():
    inside = torch.nn.Parameter((torch.rand(3000, generator=torch.Generator().manual_seed(3)) * 0.5 + 1.25).cuda())
    before = bits(inside)
    FZOO([inside], lr=0.0, eps=1e-3, chunk_numel=700).step(lambda: (inside.float() ** 2).sum())
    assert torch.equal(bits(inside), before)

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config()).eval().cuda()

    straight, start, ids = model(), model(), IDS.cuda()
    opt = FZOO(straight.parameters(), lr=2e-3, seed=7, directions=3)
    opt.step(lambda: straight(input_ids=ids, labels=ids).loss)
    saved = opt.state_dict()
    opt.step(lambda: straight(input_ids=ids, labels=ids).loss)
    FZOO(start.parameters(), lr=2e-3, seed=7, directions=3).replay(list(opt.log)[:1])
    resumed = FZOO(start.parameters(), lr=2e-3, seed=999, directions=3)
    resumed.load_state_dict(saved)
    resumed.step(lambda: start(input_ids=ids, labels=ids).loss)
    fresh = model().parameters()
    assert any(not torch.equal(bits(a), bits(b)) for a, b in zip(straight.parameters(), fresh, strict=True))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(straight.parameters(), start.parameters(), strict=True))
