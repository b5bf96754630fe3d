import pytest
import torch
from conftest import tiny_llama_config

from edgetune.plan.components import RunShape, estimate
from edgetune.plan.inventory import inspect_config
from edgetune.plan.optimizer_memory import tensor_state_bytes, trainable_tensors
from edgetune.plan.run_options import RunOptions, stack_for, strategy_for

SHAPES = [(64, 300), (300, 1), (5000, 8), (16, 16)]


def state_of(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def stepped(make):
    params = [torch.nn.Parameter(torch.randn(rows, cols).squeeze(-1)) for rows, cols in SHAPES]
    optimizer = make(params)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


def test_adafactor_state_equals_transformers_adafactor():
    from transformers.optimization import Adafactor

    optimizer = stepped(lambda p: Adafactor(p, lr=1e-3, relative_step=False, scale_parameter=False))
    assert state_of(optimizer) == sum(tensor_state_bytes("adafactor", r, c) for r, c in SHAPES)


def test_8bit_adamw_state_equals_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    optimizer = stepped(lambda p: bnb.optim.AdamW8bit(p, lr=1e-3))
    assert state_of(optimizer) == sum(tensor_state_bytes("adamw_8bit", r, c) for r, c in SHAPES)


@pytest.fixture(scope="module")
def spec():
    return inspect_config(tiny_llama_config(vocab_size=5000).to_dict())


def state(spec, optimizer, method="full"):
    described = RunOptions(method=method, optimizer=optimizer)
    stack = stack_for(described, "cuda")
    sized = estimate(spec, strategy_for(described, stack), RunShape(1, 16, 8), stack)
    return sized.component("optimizer state").bytes


def test_full_training_tensors_cover_every_parameter(spec):
    tensors = trainable_tensors(spec, strategy_for(RunOptions(method="full"), stack_for(RunOptions(), "cuda")), [])
    assert sum(r * c for r, c in tensors) == spec.total_params
    assert len(tensors) == spec.parameter_tensors


def test_state_sizes_order_as_the_optimizers_store_them(spec):
    params = spec.total_params
    assert state(spec, "sgd") == 0
    assert state(spec, "paged-adamw") == state(spec, "paged-adamw-8bit") == 0  # host-backed unified memory
    assert state(spec, "adamw") == 2 * 2 * params + 4 * spec.parameter_tensors  # bf16 moments + step tensors
    assert 2 * params < state(spec, "adamw-8bit") < state(spec, "adamw")
    assert 0 < state(spec, "adafactor") < params
    assert state(spec, "adamw", "lora") < state(spec, "adamw")
