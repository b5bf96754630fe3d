"""AdaFish's exploration options (adafish_options.py), each against a hand computation: Fisher EMA rate, refresh
period, damping schedule, exponent, grafting, validation, and resuming with them."""

import copy
import math

import pytest
import torch
from test_adafish import Factorised, lora_llama, set_grads

from edgetune.optim import AdaFish
from edgetune.optim.adafish_hooks import PerSampleFisher
from edgetune.optim.adafish_options import relative_damping, state_bytes

OPTION_DEFAULTS = dict(
    fisher_beta=None, fisher_every=1, damping_schedule="constant", damping_final=None, damping_steps=100, graft="none"
)


def schedule(**overrides):
    return {"damping": 1.0, **OPTION_DEFAULTS, **overrides}


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [1.0, 0.505, 0.01, 0.01, 0.01]),  # 1 + (0.01 − 1)·min(t − 1, 2)/2
        ("exponential", [1.0, 0.1, 0.01, 0.01, 0.01]),  # 1 · (0.01/1)^(min(t − 1, 2)/2)
    ],
)
def test_damping_schedule_values(kind, expected):
    hyper = schedule(damping_schedule=kind, damping_final=0.01, damping_steps=2)
    got = [relative_damping(hyper, t) for t in range(1, 6)]
    assert got == pytest.approx(expected, rel=1e-12)


def test_exponential_schedule_is_a_constant_factor_per_step():
    hyper = schedule(damping=0.3, damping_schedule="exponential", damping_final=3e-4, damping_steps=30)
    values = [relative_damping(hyper, t) for t in range(1, 32)]
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    assert ratios[:30] == pytest.approx([(3e-4 / 0.3) ** (1 / 30)] * 30, rel=1e-12)
    assert values[-1] == pytest.approx(3e-4, rel=1e-12)


def reference_steps(a, b, grads, hyper, deltas):
    """adafish.py's rule written out in float64 for one pair with the batch Fisher; deltas[t−1] is δ_t by hand.

    A factor's F starts at its first non-zero H (until then every step is a Fisher step and P = I), and that first H
    refreshes P whatever inv_every says."""
    lr, (beta1, beta2), power, eps = hyper["lr"], hyper["betas"], hyper["power"], 1e-8
    rate = hyper.get("fisher_beta") or beta2
    every, inv_every, graft = hyper.get("fisher_every", 1), hyper.get("inv_every", 1), hyper.get("graft") == "adamw"
    x = {"A": a.double().clone(), "B": b.double().clone()}
    s = {
        k: dict(m=0, v=0, f=torch.zeros(3, 3, dtype=torch.float64), n=0, p=torch.eye(3, dtype=torch.float64)) for k in x
    }
    for t, pair in enumerate(grads, start=1):
        for k, g in zip("AB", pair, strict=True):
            g, st = g.double(), s[k]
            st["m"] = beta1 * st["m"] + (1 - beta1) * g
            st["v"] = beta2 * st["v"] + (1 - beta2) * g * g
            first = False
            if (t - 1) % every == 0 or st["n"] == 0:
                h = g @ g.T if k == "A" else g.T @ g
                if st["n"] > 0 or h.abs().sum() > 0:
                    st["f"] = rate * st["f"] + (1 - rate) * h
                    st["n"] += 1
                    first = st["n"] == 1
            if st["n"] > 0 and (t == 1 or t % inv_every == 0 or first):
                vals, vecs = torch.linalg.eigh(st["f"] / (1 - rate ** st["n"]))
                vals = vals.clamp(min=0)
                st["p"] = vecs @ torch.diag((vals + deltas[t - 1] * vals.mean() + 1e-12) ** -power) @ vecs.T
            m_hat = st["m"] / (1 - beta1**t)
            d = st["p"] @ m_hat if k == "A" else m_hat @ st["p"]
            if graft:
                adamw = m_hat / ((st["v"] / (1 - beta2**t)).sqrt() + eps)
                d = d * adamw.norm() / d.norm()
            elif power == 0.5:
                d = d * math.sqrt(x[k].shape[1] if k == "A" else x[k].shape[0])
            x[k] = x[k] - lr * (d + hyper["weight_decay"] * x[k])
    return x["A"], x["B"]


BASE = dict(lr=0.01, betas=(0.8, 0.9), damping=0.1, power=0.5, weight_decay=0.05)
VARIANTS = [
    (dict(), [0.1] * 4),
    (dict(fisher_beta=0.5), [0.1] * 4),
    (dict(fisher_every=2), [0.1] * 4),
    (dict(fisher_every=3, inv_every=2, power=1.0), [0.1] * 4),
    (dict(power=0.25), [0.1] * 4),
    (dict(damping=1.0, damping_schedule="linear", damping_final=0.01, damping_steps=2), [1.0, 0.505, 0.01, 0.01]),
    (dict(damping=1.0, damping_schedule="exponential", damping_final=0.01, damping_steps=2), [1.0, 0.1, 0.01, 0.01]),
    (dict(graft="adamw"), [0.1] * 4),
    (dict(graft="adamw", power=1.0, fisher_beta=0.95), [0.1] * 4),
    # g_A = 0 at step 1, as while B = 0: A's Fisher starts at step 2, which refreshes P despite inv_every = 10.
    (dict(fisher_every=5, inv_every=10, zero_first_a=True), [0.1] * 4),
    (dict(power=1.0, zero_first_a=True), [0.1] * 4),
]


@pytest.mark.parametrize("options,deltas", VARIANTS)
def test_each_option_matches_the_written_out_rule(options, deltas):
    torch.manual_seed(0)
    model = Factorised()
    lora_a, lora_b = model.proj.lora_A["default"].weight, model.proj.lora_B["default"].weight
    a0, b0 = lora_a.detach().clone(), lora_b.detach().clone()
    hyper = {**BASE, **options}
    zero_first_a = hyper.pop("zero_first_a", False)
    opt = AdaFish(model.named_parameters(), **hyper)
    grads = []
    for step in range(4):
        set_grads(model, step)
        if zero_first_a and step == 0:
            lora_a.grad.zero_()
        grads.append((lora_a.grad.clone(), lora_b.grad.clone()))
        opt.step()
    a_ref, b_ref = reference_steps(a0, b0, grads, hyper, deltas)
    torch.testing.assert_close(lora_a.double(), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora_b.double(), b_ref, rtol=1e-5, atol=1e-6)
    fisher_steps = {1 + zero_first_a} | set(range(1, 5, options.get("fisher_every", 1)))
    assert opt.state[lora_a]["fisher_updates"] == len(fisher_steps - ({1} if zero_first_a else set()))


def test_graft_gives_each_factor_the_norm_of_torch_adamws_step():
    torch.manual_seed(0)
    model = Factorised(n_in=12, n_out=7, rank=3)
    twin = copy.deepcopy(model)
    opt = AdaFish(model.named_parameters(), lr=0.01, graft="adamw", power=1.0, damping=1e-2)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.0, foreach=False)
    names = ("proj.lora_A.default.weight", "proj.lora_B.default.weight")
    for step in range(4):
        set_grads(model, step)
        set_grads(twin, step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        before_twin = {n: p.detach().clone() for n, p in twin.named_parameters()}
        opt.step()
        ref.step()
        params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
        for name in names:
            moved = (params[name] - before[name]).norm()
            adamw_moved = (twin_params[name] - before_twin[name]).norm()
            assert float(moved) == pytest.approx(float(adamw_moved), rel=1e-5), (step, name)
            # ...in the preconditioned direction, which is not AdamW's.
            cosine = torch.nn.functional.cosine_similarity(
                (params[name] - before[name]).flatten(), (twin_params[name] - before_twin[name]).flatten(), dim=0
            )
            assert float(cosine) < 0.99


def test_fisher_every_disarms_the_per_sample_hooks_between_fisher_steps():
    model = lora_llama()
    opt = AdaFish.from_model(model, fisher="per_sample", fisher_every=2)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    lora_a = next(p for n, p in model.named_parameters() if ".lora_A." in n)
    seen = []
    for _ in range(3):
        assert opt.fisher_hooks.armed == opt.fisher_due()
        seen.append(opt.fisher_due())
        model(input_ids=ids, labels=ids).loss.backward()
        if not seen[-1]:
            assert opt.fisher_hooks.pop(lora_a) is None  # nothing captured, nothing pinned
        fisher_before = opt.state[lora_a]["fisher"].clone() if opt.state[lora_a] else None
        opt.step()
        opt.zero_grad()
        if not seen[-1]:
            assert torch.equal(opt.state[lora_a]["fisher"], fisher_before)
    assert seen == [True, False, True] and opt.state[lora_a]["fisher_updates"] == 2
    opt.fisher_hooks.remove()


def options_run(model, **options):
    opt = AdaFish(model.named_parameters(), **options)
    for step in range(3):
        set_grads(model, step)
        opt.step()
    return opt


EXPLORED = dict(
    fisher_beta=0.7,
    fisher_every=2,
    damping=0.5,
    damping_schedule="exponential",
    damping_final=1e-3,
    damping_steps=4,
    graft="adamw",
    power=0.75,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_restores_the_options_and_continues_identically(dtype):
    torch.manual_seed(0)
    model = Factorised(dtype=dtype)
    opt = options_run(model, **EXPLORED)
    twin = copy.deepcopy(model)
    restored = AdaFish(twin.named_parameters())  # built with the defaults: the saved groups bring the options back
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert {k: restored.param_groups[0][k] for k in EXPLORED} == EXPLORED
    b = twin.proj.lora_B["default"].weight
    assert restored.state[b]["exp_avg_sq"].dtype == dtype and restored.state[b]["fisher_updates"] == 2
    for m, o in ((model, opt), (twin, restored)):
        set_grads(m, 10)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_state_saved_before_the_options_existed_loads_with_their_defaults():
    torch.manual_seed(0)
    model = Factorised()
    opt = options_run(model)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in (*OPTION_DEFAULTS, "seed"):
            del group[key]
    for state in old["state"].values():
        state.pop("fisher_updates", None)
    twin = copy.deepcopy(model)
    restored = AdaFish(twin.named_parameters())
    restored.load_state_dict(old)  # options absent from the old state take the constructor's values
    assert {k: restored.param_groups[0][k] for k in OPTION_DEFAULTS} == OPTION_DEFAULTS
    for m, o in ((model, opt), (twin, restored)):
        set_grads(m, 10)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_saved_true_fisher_state_needs_an_optimizer_with_hooks():
    saved = AdaFish.from_model(lora_llama(), fisher="true").state_dict()
    with pytest.raises(ValueError, match="Invalid fisher_hooks for fisher='true'"):
        AdaFish.from_model(lora_llama()).load_state_dict(saved)


def test_graft_state_bytes_counts_the_second_moment():
    assert state_bytes([(4, 10, 6)], graft=True) - state_bytes([(4, 10, 6)]) == 4 * 4 * (10 + 6)
    model = Factorised(n_in=10, n_out=6, rank=4)
    opt = AdaFish(model.named_parameters(), graft="adamw")
    set_grads(model, 0)
    opt.step()
    allocated = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert allocated == state_bytes([(4, 10, 6)], other_numel=6, graft=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fisher_beta=1.0), "Invalid fisher_beta: 1.0; use None"),
        (dict(fisher_beta=-0.1), "Invalid fisher_beta"),
        (dict(fisher_beta="0.9"), "Invalid fisher_beta: '0.9'"),
        (dict(fisher_every=0), "Invalid fisher_every: 0"),
        (dict(fisher_every=1.5), "Invalid fisher_every"),
        (dict(damping_schedule="cosine"), "Invalid damping_schedule: 'cosine'; use one of constant, linear"),
        (dict(damping_schedule="linear"), "Invalid damping_final: None with damping_schedule='linear'"),
        (dict(damping_final=0.0), "Invalid damping_final: 0.0"),
        (dict(damping_final=math.inf), "Invalid damping_final"),
        (dict(damping_steps=0), "Invalid damping_steps: 0"),
        (dict(graft="sgd"), "Invalid graft: 'sgd'; use one of none, adamw"),
        (dict(seed=-1), "Invalid seed: -1"),
        (dict(seed=2**31), "Invalid seed"),
        (dict(power=1.01), "Invalid power"),
        (dict(fisher="true"), "Invalid fisher_hooks for fisher='true'"),
        (dict(fisher="batch", fisher_hooks=PerSampleFisher(torch.nn.Linear(2, 2))), "fisher_hooks"),
    ],
)
def test_invalid_options_raise_one_line_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as raised:
        AdaFish(Factorised().named_parameters(), **kwargs)
    assert "\n" not in str(raised.value) and "; " in str(raised.value)  # the value, then the fix


def test_param_groups_are_validated_too():
    model = Factorised()
    names, params = zip(*model.named_parameters(), strict=True)
    with pytest.raises(ValueError, match="Invalid graft: 'adam'"):
        AdaFish([{"params": list(params), "param_names": list(names), "graft": "adam"}])


@pytest.mark.parametrize("options", [dict(inv_every=10), dict(fisher_every=5)])
def test_lora_a_stays_put_when_its_first_fisher_is_zero_and_refreshes_are_rare(options):
    """peft starts B at 0, so lora_A's step-1 Fisher is exactly 0; counting it left P_A = 1e6·I for up to 10 steps
    and A grew from 0.125 to ~1000 in 6 steps of this loop."""
    model = lora_llama(init_lora_weights=True)
    opt = AdaFish.from_model(model, lr=3e-3, **options)
    lora_a = [p for n, p in model.named_parameters() if ".lora_A." in n]
    start = max(float(p.abs().max()) for p in lora_a)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert max(float(p.abs().max()) for p in lora_a) < 2 * start
    assert all(opt.state[p]["fisher_updates"] >= 1 for p in lora_a)  # A's Fisher started at step 2
