import copy
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_riemannian_optimizer
from transformers import LlamaForCausalLM

from edgetune.optim.scaled_adamw import (
    ScaledAdamW,
    _damped_inverses,
    _pair_lora_factors,
    state_bytes,
    step_temporary_bytes,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]  # in -> out: 64 -> 64, 64 -> 32, 128 -> 64


def lora_model(dtype=torch.float32, init_lora_weights=True, rank=4, autocast=True):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=init_lora_weights)
    return get_peft_model(model, config, autocast_adapter_dtype=autocast)


def train(model, optimizer, steps, seed=1):
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 128, (1, 12), generator=batches)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        yield


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def max_relative_gap(model_a, model_b):
    return max(
        ((pa - pb).abs().max() / pa.abs().max()).item()
        for (_, pa), (_, pb) in zip(trainable(model_a), trainable(model_b), strict=True)
    )


@pytest.mark.parametrize("init_lora_weights", [True, False], ids=["B=0", "B random"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 5e-5)])
def test_matches_peft_riemannian_step_for_step(init_lora_weights, dtype, tolerance):
    # Where the definitions coincide: peft's reg is delta, torch AdamW decays before the step as ScaledAdamW
    # does, both precondition every 2-D lora_A/lora_B pair from the pre-update weights. peft uses pinv,
    # ScaledAdamW a Cholesky factor: equal up to rounding for these positive definite matrices.
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    peft_model = lora_model(dtype, init_lora_weights)
    ours_model, adamw_model = copy.deepcopy(peft_model), copy.deepcopy(peft_model)
    peft_opt = create_riemannian_optimizer(peft_model, torch.optim.AdamW, reg=1e-2, **hyper)
    ours_opt = ScaledAdamW.from_model(ours_model, delta=1e-2, **hyper)
    adamw_opt = torch.optim.AdamW([p for _, p in trainable(adamw_model)], **hyper)
    steps = zip(
        train(peft_model, peft_opt, 5), train(ours_model, ours_opt, 5), train(adamw_model, adamw_opt, 5), strict=True
    )
    for _ in steps:
        assert max_relative_gap(peft_model, ours_model) < tolerance
    # The comparison must be able to fail: plain AdamW lands far away.
    assert max_relative_gap(peft_model, adamw_model) > 1e3 * tolerance


def test_matches_torch_adamw_without_lora(tiny_model):
    hyper = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    reference = copy.deepcopy(tiny_model)
    ours_opt = ScaledAdamW(tiny_model.named_parameters(), **hyper)
    torch_opt = torch.optim.AdamW(reference.parameters(), **hyper)
    for _ in zip(train(tiny_model, ours_opt, 3), train(reference, torch_opt, 3), strict=True):
        for p, q in zip(tiny_model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def closed_form(a, b, grads_a, grads_b, *, lr, betas, eps, wd, delta, correct_bias):
    """NumPy float64 ScaledAdamW on one pair (Jacobi, decay before the Adam step), several steps."""
    a, b = a.copy(), b.copy()
    moments = {"a": [0.0, 0.0], "b": [0.0, 0.0]}
    for t, (ga, gb) in enumerate(zip(grads_a, grads_b, strict=True), start=1):
        rank = a.shape[0]
        pre_a = np.linalg.inv(b.T @ b + delta * np.eye(rank)) @ ga
        pre_b = gb @ np.linalg.inv(a @ a.T + delta * np.eye(rank))
        new = []
        for key, x, g in (("a", a, pre_a), ("b", b, pre_b)):
            m, v = moments[key]
            m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
            moments[key] = [m, v]
            c1, c2 = (1 - betas[0] ** t, 1 - betas[1] ** t) if correct_bias else (1.0, 1.0)
            new.append(x * (1 - lr * wd) - lr / c1 * m / (np.sqrt(v) / math.sqrt(c2) + eps))
        a, b = new
    return a, b


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_on_random_pairs(correct_bias, dtype):
    # Three pairs, two of rank 3 with different in/out sizes (one batched factorisation) and one of rank 2.
    # eps=0.5 keeps the Adam step sensitive to the preconditioned gradient's size, not only to its sign.
    rng = np.random.default_rng(0)
    shapes = {"x": (3, 7, 5), "y": (3, 4, 9), "z": (2, 6, 6)}
    hyper = dict(lr=0.05, betas=(0.9, 0.99), eps=0.5, wd=0.1, delta=0.3, correct_bias=correct_bias)
    named, expected, grads = [], {}, {}
    for key, (rank, fan_in, fan_out) in shapes.items():
        a, b = rng.standard_normal((rank, fan_in)), rng.standard_normal((fan_out, rank))
        grads[key] = [rng.standard_normal(a.shape) for _ in range(2)], [rng.standard_normal(b.shape) for _ in range(2)]
        expected[key] = closed_form(a, b, *grads[key], **hyper)
        named += [
            (f"{key}.lora_A.default.weight", torch.nn.Parameter(torch.tensor(a, dtype=dtype))),
            (f"{key}.lora_B.default.weight", torch.nn.Parameter(torch.tensor(b, dtype=dtype))),
        ]
    params = dict(named)
    opt = ScaledAdamW(
        named, lr=0.05, betas=(0.9, 0.99), eps=0.5, weight_decay=0.1, delta=0.3, correct_bias=correct_bias
    )
    for step in range(2):
        for key in shapes:
            for side, grad in zip("AB", (grads[key][0][step], grads[key][1][step]), strict=True):
                params[f"{key}.lora_{side}.default.weight"].grad = torch.tensor(grad, dtype=dtype)
        opt.step()
        assert torch.equal(params["x.lora_A.default.weight"].grad, torch.tensor(grads["x"][0][step], dtype=dtype))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for key, (a, b) in expected.items():
        np.testing.assert_allclose(params[f"{key}.lora_A.default.weight"].detach().double(), a, rtol=0, atol=tolerance)
        np.testing.assert_allclose(params[f"{key}.lora_B.default.weight"].detach().double(), b, rtol=0, atol=tolerance)


def test_failed_factorisation_falls_back_without_host_sync():
    good = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    singular = torch.full((2, 2), 4e6)  # rank 1: fp32 Cholesky of singular + 1e-6 I fails
    grams = torch.stack([good, singular, torch.full((2, 2), float("nan"))])
    assert torch.linalg.cholesky_ex(grams[1] + 1e-6 * torch.eye(2)).info != 0
    inverses = _damped_inverses(grams, 1e-6).double()
    eye = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(inverses[0], torch.linalg.inv(good.double() + 1e-6 * eye))
    damped = singular.double() + 1e-6 * eye
    jittered = damped + 1e-4 * damped.diagonal().mean() * eye
    torch.testing.assert_close(inverses[1], torch.linalg.inv(jittered), rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(inverses[2], eye)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1e-3), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(delta=0.0), "delta"),
        (dict(delta=-1e-6), "delta"),
        (dict(delta=float("nan")), "delta"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    model = lora_model()
    with pytest.raises(ValueError, match=message):
        ScaledAdamW.from_model(model, **kwargs)
    with pytest.raises(ValueError, match=message):  # group-level values are checked too
        ScaledAdamW([{"params": trainable(model), **kwargs}])


def test_pairing_errors_raise():
    model = lora_model()
    with pytest.raises(ValueError, match="without names"):
        ScaledAdamW(p for _, p in trainable(model))
    with pytest.raises(ValueError, match="no parameters"):
        ScaledAdamW.from_model(torch.nn.Linear(2, 2).requires_grad_(False))
    without_b = [
        (n, p) for n, p in trainable(model) if not n.endswith("layers.0.self_attn.q_proj.lora_B.default.weight")
    ]
    with pytest.raises(ValueError, match=r"q_proj\.lora_A.*no .*q_proj\.lora_B"):
        ScaledAdamW(without_b)
    without_a = [(n, p) for n, p in trainable(model) if ".lora_A." not in n or "layers.1.mlp" not in n]
    with pytest.raises(ValueError, match=r"down_proj\.lora_B.*no .*down_proj\.lora_A"):
        ScaledAdamW(without_a)
    lenient = ScaledAdamW(without_b, strict_pairing=False)  # the leftover lora_A is trained as plain AdamW
    assert len(_pair_lora_factors(lenient.param_groups, strict=False)) == 5
    assert len(_pair_lora_factors(ScaledAdamW.from_model(model).param_groups, strict=True)) == 6
    a = torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"do not chain.*\(4, 8\).*\(6, 3\)"):
        ScaledAdamW([("m.lora_A.w", a), ("m.lora_B.w", torch.nn.Parameter(torch.zeros(6, 3)))])


def test_closure_is_evaluated_before_the_gradients_are_read():
    plain, with_closure = lora_model(init_lora_weights=False), lora_model(init_lora_weights=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    opt_plain, opt_closure = ScaledAdamW.from_model(plain, lr=1e-2), ScaledAdamW.from_model(with_closure, lr=1e-2)
    loss = plain(input_ids=ids, labels=ids).loss
    loss.backward()
    opt_plain.step()

    def closure():
        opt_closure.zero_grad()
        closure_loss = with_closure(input_ids=ids, labels=ids).loss
        closure_loss.backward()
        return closure_loss

    assert opt_closure.step(closure).item() == pytest.approx(loss.item())
    for (_, p), (_, q) in zip(trainable(plain), trainable(with_closure), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_keeps_fp32_moments(dtype):
    model = lora_model(dtype, init_lora_weights=False, autocast=False)
    opt = ScaledAdamW.from_model(model, lr=1e-2, weight_decay=0.01)
    for _ in train(model, opt, 2):
        pass
    resumed_model = copy.deepcopy(model)
    resumed = ScaledAdamW.from_model(resumed_model, lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for state in resumed.state.values():
        assert state["step"] == 2 and state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    for _ in zip(train(model, opt, 2, seed=5), train(resumed_model, resumed, 2, seed=5), strict=True):
        for (_, p), (_, q) in zip(trainable(model), trainable(resumed_model), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bf16_parameters_stay_finite_and_bf16():
    model = lora_model(torch.bfloat16, init_lora_weights=False, autocast=False)
    before = {name: p.detach().clone() for name, p in trainable(model)}
    opt = ScaledAdamW.from_model(model, lr=1e-2, delta=1e-6)
    losses = []
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    for name, p in trainable(model):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all() and not torch.equal(p, before[name])


@pytest.mark.parametrize(("dtype", "param_bytes"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_state_bytes_matches_the_allocated_state(dtype, param_bytes):
    model = lora_model(dtype, autocast=False)
    opt = ScaledAdamW.from_model(model)
    for _ in train(model, opt, 1):
        pass
    allocated = sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in opt.state.values())
    # q_proj 64->64, v_proj 64->32 (2 KV heads of 16), down_proj 128->64; two layers; rank 4.
    shapes = [(4, 64, 64), (4, 64, 32), (4, 128, 64)] * 2
    assert allocated == state_bytes(shapes, param_bytes=param_bytes) == 8 * 4 * (128 + 96 + 192) * 2


def test_state_and_temporary_bytes_formulas():
    assert state_bytes([(8, 4096, 1024)], other_numel=100) == 8 * (8 * 5120 + 100)
    assert state_bytes([], other_numel=10, param_bytes=8) == 160
    # fp32: preconditioned grad + denominator of the largest tensor, 18 r x r fp32 matrices per pair.
    assert step_temporary_bytes([(8, 4096, 1024), (4, 10, 10)]) == 2 * 4 * 8 * 4096 + 18 * 4 * (64 + 16)
    # bf16 adds fp32 copies of the gradient and the parameter.
    assert step_temporary_bytes([(8, 100, 200)], other_numel=5000, param_bytes=2) == 4 * 4 * 5000 + 18 * 4 * 64
    for bad in (
        dict(lora_shapes=[(0, 4, 4)]),
        dict(lora_shapes=[], other_numel=-1),
        dict(lora_shapes=[], param_bytes=0),
    ):
        for function in (state_bytes, step_temporary_bytes):
            with pytest.raises(ValueError, match="Invalid"):
                function(**bad)


def test_qlora_nf4_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    assert model.base_model.model.model.gradient_checkpointing
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base_weight.dtype == torch.uint8  # packed NF4
    frozen = base_weight.detach().clone()
    opt = ScaledAdamW.from_model(model, lr=1e-2)
    assert len(_pair_lora_factors(opt.param_groups, strict=True)) == 2 * 7  # every adapted linear is preconditioned
    batch = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert torch.equal(base_weight, frozen)


@pytest.mark.gpu
def test_step_has_no_host_sync_on_cuda():
    model = lora_model(init_lora_weights=False).cuda()
    opt = ScaledAdamW.from_model(model, lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for _, p in trainable(model))
