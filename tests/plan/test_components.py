import pytest
import torch
from conftest import tiny_llama_config

from edgetune.errors import EdgetuneError
from edgetune.plan.components import EDGETUNE_CPU, RunShape, estimate, optimizer_state_bytes, weights_bytes
from edgetune.plan.inventory import inspect_config, lora_params, lora_shapes, nf4_bytes
from edgetune.plan.sources import resolve_model
from edgetune.plan.strategies import STRATEGIES
from edgetune.train.loading import DEFAULT_LORA_TARGETS, LoraSettings, load_model
from edgetune.train.memory import MemoryProbe, resident_bytes
from edgetune.train.step import make_optimizer, run_step


@pytest.fixture(scope="module")
def spec():
    return inspect_config(tiny_llama_config().to_dict())


def test_weights_are_exact_per_precision(spec):
    rotary = 2 * (64 // 4 // 2) * 4  # inv_freq and original_inv_freq, fp32, head_dim / 2 entries each
    assert spec.buffer_bytes == rotary
    assert weights_bytes(spec, "fp32") == 4 * spec.total_params + rotary
    assert weights_bytes(spec, "bf16") == 2 * spec.total_params + rotary
    rest = spec.embedding_params + spec.head_params + spec.other_params
    assert weights_bytes(spec, "nf4") == nf4_bytes(spec) + 2 * rest + rotary


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_planned_weights_and_adapters_equal_the_loaded_model(tiny_model_dir, spec, precision):
    model = load_model(resolve_model(str(tiny_model_dir)), precision, lora=LoraSettings(rank=8))
    adapters = 4 * lora_params(lora_shapes(spec, 8, DEFAULT_LORA_TARGETS))
    assert resident_bytes(model) == weights_bytes(spec, precision) + adapters


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_planned_optimizer_state_equals_what_the_optimizer_allocates(tiny_trainable_dir, name):
    strategy = STRATEGIES[name]
    source = resolve_model(str(tiny_trainable_dir))
    lora = LoraSettings(rank=8) if strategy.lora else None
    model = load_model(source, strategy.base, lora=lora, gradient_checkpointing=strategy.checkpointing)
    optimizer = make_optimizer(strategy, model)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    run_step(strategy, model, optimizer, [{"input_ids": ids, "labels": ids}])
    spec = inspect_config(__import__("json").loads((tiny_trainable_dir / "config.json").read_text()))
    shapes = lora_shapes(spec, 8, DEFAULT_LORA_TARGETS) if strategy.lora else []
    trainable = lora_params(shapes) if strategy.lora else spec.total_params
    buffers = sum(t.untyped_storage().nbytes() for t in getattr(optimizer, "work_buffers", list)())
    assert resident_bytes(model, optimizer) - resident_bytes(model) - buffers == optimizer_state_bytes(
        spec, strategy, shapes, trainable
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_more_tokens_never_plan_less_memory(spec, name):
    previous = 0
    for batch, seq in [(1, 1), (1, 16), (1, 64), (2, 64), (2, 128), (4, 128), (4, 512), (8, 512), (16, 2048)]:
        peak = estimate(spec, STRATEGIES[name], RunShape(batch, seq, 8)).peak_bytes
        assert peak >= previous
        previous = peak


def test_checkpointing_plans_fewer_activations(spec):
    run = RunShape(4, 256, 8)
    plain = estimate(spec, STRATEGIES["adafish-lora"], run).component("activations").bytes
    checkpointed = estimate(spec, STRATEGIES["adafish-lora-gc"], run).component("activations").bytes
    checkpoints = 2 * spec.hidden_size * run.tokens * spec.num_layers
    one_layer = plain // spec.num_layers
    assert checkpointed in (checkpoints, checkpoints + one_layer) and checkpointed < plain


def test_zeroth_order_plans_no_gradients_or_activations(spec):
    sized = estimate(spec, STRATEGIES["mezo-full"], RunShape(2, 64, 8))
    names = {c.name for c in sized.components}
    assert "gradients" not in names and "activations" not in names and sized.peak_phase == "forward"


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    """A 2-layer model with SmolLM2's 49,152-entry vocabulary: the loss is then as large a part of a step as in
    real models (a 320-entry vocabulary is too small for the loss's own temporaries to show)."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("big-vocab")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=49152)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_plan_is_within_ten_percent_of_a_measured_step(big_vocab_dir, name):
    strategy = STRATEGIES[name]
    source = resolve_model(str(big_vocab_dir))
    lora = LoraSettings(rank=16, alpha=32) if strategy.lora else None
    model = load_model(source, strategy.base, lora=lora, gradient_checkpointing=strategy.checkpointing)
    optimizer = make_optimizer(strategy, model)
    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    run_step(strategy, model, optimizer, [batch])
    resident = resident_bytes(model, optimizer)
    with MemoryProbe("cpu") as probe:
        run_step(strategy, model, optimizer, [batch])
    measured = resident + probe.report.peak_allocated_bytes
    spec = inspect_config(__import__("json").loads((big_vocab_dir / "config.json").read_text()))
    planned = estimate(spec, strategy, RunShape(4, 64, 16), EDGETUNE_CPU).peak_bytes
    assert abs(planned - measured) / measured < 0.10, (planned, measured)


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("seq_len", -3), ("lora_rank", 0)])
def test_run_shape_rejects_non_positive_values(field, value):
    with pytest.raises(EdgetuneError, match=f"{field} must be a positive integer"):
        RunShape(**{field: value})


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize(("batch", "seq"), [(2, 512), (1, 2048)])
def test_inference_plan_is_within_three_percent_of_a_measured_prefill(precision, dtype, batch, seq):
    from transformers import LlamaForCausalLM

    from edgetune.plan.run_options import RunOptions, stack_for, strategy_for

    config = tiny_llama_config(
        vocab_size=1000, hidden_size=256, intermediate_size=1024, num_attention_heads=8, max_position_embeddings=2048
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), MemoryProbe("cpu") as probe:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)  # generation's prefill
    measured = resident_bytes(model) + probe.report.peak_allocated_bytes
    options = RunOptions(method="inference", precision=precision)
    stack = stack_for(options, "cpu")
    planned = estimate(inspect_config(config.to_dict()), strategy_for(options, stack), RunShape(batch, seq), stack)
    assert abs(planned.peak_bytes - measured) / measured < 0.03
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * 32 * batch * seq * dtype.itemsize
    assert planned.component("kv cache").bytes == kv
