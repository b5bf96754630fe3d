import copy
import math

import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from torch import nn

from edgetune.errors import EdgetuneError
from edgetune.optim import AdaFish
from edgetune.optim.adafish import state_bytes
from edgetune.optim.adafish_hooks import PerSampleFisher


class Factorised(nn.Module):
    """y = B A x with peft's parameter names (proj.lora_A.default.weight / proj.lora_B.default.weight)."""

    def __init__(self, n_in=6, n_out=5, rank=3, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Module()
        self.proj.lora_A = nn.ModuleDict({"default": nn.Linear(n_in, rank, bias=False, dtype=dtype)})
        self.proj.lora_B = nn.ModuleDict({"default": nn.Linear(rank, n_out, bias=False, dtype=dtype)})
        self.head_bias = nn.Parameter(torch.randn(n_out, dtype=dtype))  # unpaired: gets AdamW

    def forward(self, x):
        return self.proj.lora_B["default"](self.proj.lora_A["default"](x)) + self.head_bias


def lora_llama(seed=0, **lora_overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config())
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    settings.update(lora_overrides)
    return get_peft_model(base, LoraConfig(**settings))


def set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def reference_steps(a, b, grads, lr, betas, damping, power, wd, shape_scale):
    """Section 2.4 written out in float64 for one pair, batch Fisher."""
    a, b = a.double().clone(), b.double().clone()
    m_a, m_b = torch.zeros_like(a), torch.zeros_like(b)
    f_a = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64)
    f_b = torch.zeros_like(f_a)
    for t, (g_a, g_b) in enumerate(grads, start=1):
        g_a, g_b = g_a.double(), g_b.double()
        f_a = betas[1] * f_a + (1 - betas[1]) * g_a @ g_a.T
        f_b = betas[1] * f_b + (1 - betas[1]) * g_b.T @ g_b
        m_a = betas[0] * m_a + (1 - betas[0]) * g_a
        m_b = betas[0] * m_b + (1 - betas[0]) * g_b
        precond = []
        for f in (f_a, f_b):
            vals, vecs = torch.linalg.eigh(f / (1 - betas[1] ** t))
            vals = vals.clamp(min=0)
            lam = damping * vals.mean() + 1e-12
            precond.append(vecs @ torch.diag((vals + lam) ** -power) @ vecs.T)
        d_a = precond[0] @ (m_a / (1 - betas[0] ** t))
        d_b = (m_b / (1 - betas[0] ** t)) @ precond[1]
        if shape_scale and power == 0.5:
            d_a, d_b = d_a * math.sqrt(a.shape[1]), d_b * math.sqrt(b.shape[0])
        a, b = a - lr * (d_a + wd * a), b - lr * (d_b + wd * b)
    return a, b


@pytest.mark.parametrize("power,shape_scale", [(0.5, True), (1.0, False), (0.5, False)])
def test_batch_fisher_step_matches_the_written_out_rule(power, shape_scale):
    torch.manual_seed(0)
    model = Factorised()
    a0, b0 = model.proj.lora_A["default"].weight.detach().clone(), model.proj.lora_B["default"].weight.detach().clone()
    hyper = dict(lr=0.01, betas=(0.8, 0.9), damping=0.1, power=power, weight_decay=0.05, shape_scale=shape_scale)
    opt = AdaFish(model.named_parameters(), **hyper)
    grads = []
    for step in range(3):
        set_grads(model, step)
        grads.append((model.proj.lora_A["default"].weight.grad.clone(), model.proj.lora_B["default"].weight.grad))
        opt.step()
    a_ref, b_ref = reference_steps(a0, b0, grads, hyper["lr"], hyper["betas"], 0.1, power, 0.05, shape_scale)
    torch.testing.assert_close(model.proj.lora_A["default"].weight.double(), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.proj.lora_B["default"].weight.double(), b_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fisher,power", [("identity", 0.5), ("identity", 1.0), ("batch", 0.0)])
def test_identity_fisher_is_sgd_on_adamw_first_moment(fisher, power):
    """F̂ = I (or power 0): X ← X(1 − lr·wd) − lr·c·M̂ with c = (1 + damping)^-power (·√fan when p = ½)."""
    torch.manual_seed(0)
    model = Factorised(n_in=9, n_out=4)
    lr, betas, damping, wd = 0.02, (0.9, 0.99), 0.3, 0.1
    opt = AdaFish(
        model.named_parameters(), lr=lr, betas=betas, damping=damping, power=power, weight_decay=wd, fisher=fisher
    )
    weights = {"A": model.proj.lora_A["default"].weight, "B": model.proj.lora_B["default"].weight}
    expected = {k: w.detach().double().clone() for k, w in weights.items()}
    momentum = {k: torch.zeros_like(v) for k, v in expected.items()}
    fan = {"A": 9, "B": 4}
    for t in range(1, 4):
        set_grads(model, t)
        for k, w in weights.items():
            momentum[k] = betas[0] * momentum[k] + (1 - betas[0]) * w.grad.double()
            c = (1 + damping) ** -power * (math.sqrt(fan[k]) if power == 0.5 else 1.0)
            expected[k] = expected[k] * (1 - lr * wd) - lr * c * momentum[k] / (1 - betas[0] ** t)
        opt.step()
    for k, w in weights.items():
        torch.testing.assert_close(w.double(), expected[k], rtol=1e-5, atol=1e-6)


def test_unpaired_parameters_match_torch_adamw():
    torch.manual_seed(0)
    model = Factorised()
    twin = copy.deepcopy(model)
    start = model.head_bias.detach().clone()
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = AdaFish(model.named_parameters(), **hyper)
    ref = torch.optim.AdamW([twin.head_bias], foreach=False, **hyper)
    for step in range(4):
        set_grads(model, step)
        set_grads(twin, step)
        opt.step()
        ref.step()
    torch.testing.assert_close(model.head_bias, twin.head_bias, rtol=0, atol=1e-7)
    assert not torch.allclose(model.head_bias, start, atol=1e-3)  # it did move


def test_preconditioner_is_refreshed_every_inv_every_steps():
    torch.manual_seed(0)
    model = Factorised()
    opt = AdaFish(model.named_parameters(), inv_every=2)
    a = model.proj.lora_A["default"].weight
    history = []
    for step in range(4):
        set_grads(model, step)
        opt.step()
        history.append(opt.state[a]["precond"].clone())
    assert not torch.equal(history[0], torch.eye(3))  # step 1 always refreshes
    assert not torch.equal(history[0], history[1])  # so does step 2
    assert torch.equal(history[1], history[2])  # step 3 reuses step 2's
    assert not torch.equal(history[2], history[3])


def per_sample_brute_force(model, ids):
    """mean_i ∇ℓ_i ∇ℓ_iᵀ (lora_A) and mean_i ∇ℓ_iᵀ ∇ℓ_i (lora_B) from one backward per sample."""
    stats = {}
    for i in range(ids.shape[0]):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        for name, p in model.named_parameters():
            if ".lora_" in name:
                g = p.grad.double()
                stat = g @ g.T if ".lora_A." in name else g.T @ g
                stats[name] = stats.get(name, 0) + stat / ids.shape[0]
    return stats


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_sample_fisher_equals_brute_force(checkpointing):
    model = lora_llama()
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    expected = per_sample_brute_force(model, ids)
    hooks = PerSampleFisher(model)
    assert hooks.num_hooked == 8  # 2 layers x (q, v) x (A, B)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            got = hooks.pop(p)
            torch.testing.assert_close(got.double(), expected[name], rtol=1e-4, atol=1e-9)
            assert got.dtype == torch.float32 and hooks.pop(p) is None
    hooks.remove()


def test_per_sample_mode_runs_through_the_optimizer():
    model = lora_llama()
    opt = AdaFish.from_model(model, fisher="per_sample", lr=1e-3)
    set_grads(model, 0)  # gradients that no hooked backward produced
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(EdgetuneError, match="no per-sample Fisher"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)) and not opt.state
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    opt.fisher_hooks.remove()


@pytest.mark.parametrize("fisher", ["batch", "per_sample"])
def test_nf4_base_with_gradient_checkpointing_trains(tmp_path, fisher):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, config)
    model.train()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    opt = AdaFish.from_model(model, lr=1e-2, fisher=fisher)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_bf16_parameters_stay_finite():
    torch.manual_seed(0)
    model = Factorised(n_in=32, n_out=16, rank=4, dtype=torch.bfloat16)
    opt = AdaFish(model.named_parameters(), lr=1e-2, power=1.0, weight_decay=0.01)
    x, y = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(64, 16, dtype=torch.bfloat16)
    for _ in range(20):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    a = model.proj.lora_A["default"].weight
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())
    assert opt.state[a]["fisher"].dtype == torch.float32 and opt.state[a]["exp_avg"].dtype == torch.bfloat16


def test_converges_on_lora_least_squares():
    torch.manual_seed(0)
    n_in, n_out, rank = 20, 16, 4
    target = torch.randn(n_out, rank) @ torch.randn(rank, n_in) / 3
    x = torch.randn(256, n_in)
    y = x @ target.T
    model = Factorised(n_in, n_out, rank)
    with torch.no_grad():
        model.head_bias.zero_()
        model.proj.lora_B["default"].weight.zero_()  # peft's initialisation
    opt = AdaFish(model.named_parameters(), lr=0.02)
    losses = []
    for _ in range(150):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype):
    torch.manual_seed(0)
    model = Factorised(dtype=dtype)
    opt = AdaFish(model.named_parameters(), inv_every=2)
    for step in range(3):
        set_grads(model, step)
        opt.step()
    twin = copy.deepcopy(model)
    restored = AdaFish(twin.named_parameters(), inv_every=2)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    b = twin.proj.lora_B["default"].weight
    assert restored.state[b]["fisher"].dtype == torch.float32 and restored.state[b]["exp_avg"].dtype == dtype
    for m, o in ((model, opt), (twin, restored)):
        set_grads(m, 10)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_state_bytes_matches_the_allocated_state_and_halves_adamw():
    model = lora_llama()
    extra = model.base_model.model.model.norm.weight
    extra.requires_grad_(True)
    opt = AdaFish.from_model(model)
    set_grads(model, 0)
    opt.step()
    allocated = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    shapes = [(4, 64, 64), (4, 64, 32)] * 2  # (r, in, out) for q_proj and v_proj (2 KV heads x 16) per layer
    assert allocated == state_bytes(shapes, other_numel=extra.numel())
    adamw_bytes = 8 * 16 * (4096 + 4096)
    assert 0.5 < state_bytes([(16, 4096, 4096)]) / adamw_bytes < 0.51
    assert state_bytes([], other_numel=10, param_bytes=2) == 40


@pytest.mark.parametrize(
    "kwargs", [dict(lora_shapes=[(0, 4, 4)]), dict(lora_shapes=[], other_numel=-1), dict(lora_shapes=[], param_bytes=0)]
)
def test_state_bytes_rejects_bad_input(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        state_bytes(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "Invalid lr"),
        (dict(lr=math.inf), "Invalid lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(damping=0.0), "damping"),
        (dict(damping=math.nan), "damping"),
        (dict(power=-0.5), "power"),
        (dict(power=1.5), "power"),
        (dict(inv_every=0), "inv_every"),
        (dict(inv_every=2.0), "inv_every"),
        (dict(inv_every=True), "inv_every"),
        (dict(fisher="diagonal"), "fisher"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(shape_scale="yes"), "shape_scale"),
        (dict(fisher="per_sample"), "fisher_hooks"),
        (dict(fisher="batch", fisher_hooks=PerSampleFisher(nn.Linear(2, 2))), "fisher_hooks"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaFish(Factorised().named_parameters(), **kwargs)


def test_user_errors_raise_edgetune_error():
    with pytest.raises(EdgetuneError, match="without names"):
        AdaFish(Factorised().parameters())
    with pytest.raises(EdgetuneError, match="no LoRA pair"):
        AdaFish(nn.Linear(3, 3).named_parameters())


def test_step_returns_the_closure_loss():
    model = Factorised()
    opt = AdaFish(model.named_parameters())
    x = torch.randn(4, 6)
    before = model(x).pow(2).mean().detach()

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    assert torch.equal(opt.step(closure), before)
    assert opt.step() is None


def one_accumulated_step(ids, sizes, **hyper):
    """A fresh model's first per-sample AdaFish step over ids split into micro-batches, as the trainer runs it."""
    model = lora_llama()
    model.train()
    opt = AdaFish.from_model(model, fisher="per_sample", **hyper)
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    before = {n: p.detach().clone() for n, p in lora.items()}
    for chunk in ids.split(sizes):
        loss = model(input_ids=chunk, labels=chunk).loss / len(sizes)  # trainer: loss / accumulation
        loss.backward()
    opt.step()
    opt.fisher_hooks.remove()
    fisher = {n: opt.state[p]["fisher"] for n, p in lora.items()}
    return fisher, {n: p.detach() - before[n] for n, p in lora.items()}


def test_per_sample_fisher_does_not_depend_on_the_accumulation_split():
    """A batch of 4 and its splits 2 x 2, 4 x 1, 3 + 1 hold the same examples: same Fisher; equal splits, same step."""
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(4))
    fisher, update = one_accumulated_step(ids, [4], lr=1e-2)
    for sizes in ([2, 2], [1, 1, 1, 1], [3, 1]):
        split_fisher, split_update = one_accumulated_step(ids, sizes, lr=1e-2)
        for name, f in fisher.items():
            torch.testing.assert_close(split_fisher[name], f, rtol=1e-5, atol=1e-6 * f.abs().max().item())
            if len(set(sizes)) == 1:  # unequal micro-batches weight their examples unequally in the gradient itself
                scale = update[name].abs().max().item()
                torch.testing.assert_close(split_update[name], update[name], rtol=1e-4, atol=1e-5 * scale)


def test_zero_grad_drops_the_per_sample_statistics_of_a_skipped_step():
    """The trainer skips step() on a non-finite loss but still calls zero_grad(): that backward must not leak."""
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(5))
    expected, _ = one_accumulated_step(ids[2:], [2], lr=1e-2)
    model = lora_llama()
    model.train()
    opt = AdaFish.from_model(model, fisher="per_sample", lr=1e-2)
    model(input_ids=ids[:2], labels=ids[:2]).loss.backward()  # the skipped step's backward
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids[2:], labels=ids[2:]).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            torch.testing.assert_close(opt.state[p]["fisher"], expected[name], rtol=1e-5, atol=0.0)
    opt.fisher_hooks.remove()
