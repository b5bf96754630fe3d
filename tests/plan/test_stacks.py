from dataclasses import replace

import pytest
from conftest import tiny_llama_config

from edgetune.errors import EdgetuneError
from edgetune.plan.components import RunShape, estimate
from edgetune.plan.inventory import inspect_config, lora_params, lora_shapes
from edgetune.plan.loss_memory import loss_component
from edgetune.plan.run_options import RunOptions, stack_for, strategy_for
from edgetune.plan.stacks import STACKS, Stack, get_stack


@pytest.fixture(scope="module")
def spec():
    return inspect_config(tiny_llama_config(vocab_size=32000).to_dict())


RUN = RunShape(2, 256, 8)


def plan(spec, run=RUN, **options):
    described = RunOptions(**options)
    stack = stack_for(described, "cuda")
    return estimate(spec, strategy_for(described, stack), run, stack)


def rows(estimate_):
    return {c.name: c.bytes for c in estimate_.components}


def test_every_preset_is_a_stack_named_after_itself():
    assert set(STACKS) == {"edgetune", "hf", "torchtune", "unsloth", "axolotl", "litgpt"}
    assert all(isinstance(stack, Stack) and stack.name == name for name, stack in STACKS.items())
    assert get_stack("hf", "cpu").device == "cpu"
    with pytest.raises(EdgetuneError, match="unknown stack 'trl'; use one of edgetune, hf"):
        get_stack("trl")
    with pytest.raises(EdgetuneError, match="unknown loss"):
        Stack(loss="liger")


def test_prepare_model_for_kbit_training_prices_embeddings_head_and_norms_in_fp32(spec):
    edgetune, hf = rows(plan(spec, method="qlora")), rows(plan(spec, method="qlora", stack="hf"))
    rest = spec.embedding_params + spec.head_params + spec.other_params
    assert hf["weights"] - edgetune["weights"] == 2 * rest


def test_16_bit_adapters_halve_adapters_gradients_and_adam_state(spec):
    edgetune = rows(plan(spec, method="lora", checkpointing="on"))
    torchtune = rows(plan(spec, method="lora", stack="torchtune"))
    adapters = lora_params(lora_shapes(spec, 8, RunShape().lora_targets))
    assert (edgetune["adapters"], torchtune["adapters"]) == (4 * adapters, 2 * adapters)
    assert edgetune["optimizer state"] - torchtune["optimizer state"] == 4 * adapters


def loss_bytes(spec, **options) -> int:
    described = RunOptions(**options)
    stack = stack_for(described, "cuda")
    return loss_component(spec, strategy_for(described, stack), RunShape(2, 256, 8), stack, backprop=True).bytes


def test_each_loss_implementation_holds_what_it_keeps(spec):
    tokens, vocab = 2 * 256, spec.vocab_size
    full = loss_bytes(spec, method="lora", stack="hf")
    assert full == round(STACKS["hf"].logits_bytes_backprop * tokens * vocab)
    torchtune = loss_bytes(spec, method="lora", stack="torchtune")
    assert torchtune == 2 * tokens * vocab + 8 * (tokens // 8) * vocab  # every bf16 chunk, one fp32 chunk
    litgpt = loss_bytes(spec, method="lora", stack="litgpt")
    assert litgpt == 2 * tokens * vocab + 8 * 128 * vocab
    fused = loss_bytes(spec, method="lora", stack="hf", loss="fused")
    assert fused == 2 * tokens * spec.hidden_size * 2  # the hidden states and their gradient, no logits
    assert fused < loss_bytes(spec, method="lora") < torchtune < full


def test_offloaded_checkpoints_leave_one_recomputed_layer_on_the_device(spec):
    on = plan(spec, RunShape(1, 4096, 8), method="qlora", stack="unsloth", checkpointing="on")
    offloaded = plan(spec, RunShape(1, 4096, 8), method="qlora", stack="unsloth")
    checkpoints = 2 * spec.hidden_size * 4096 * spec.num_layers
    assert rows(on)["activations"] - rows(offloaded)["activations"] in (0, checkpoints)
    assert offloaded.peak_bytes < on.peak_bytes


def test_optimizer_in_backward_keeps_one_gradient(spec):
    torchtune = rows(plan(spec, method="full", optimizer="adamw-8bit", stack="torchtune"))
    edgetune = rows(plan(spec, method="full", optimizer="adamw-8bit"))
    assert torchtune["gradients"] in (0, 2 * spec.largest_tensor_params)
    assert edgetune["gradients"] in (0, 2 * spec.total_params)
    assert plan(spec, method="full", stack="torchtune").peak_bytes < plan(spec, method="full").peak_bytes


def test_activation_scale_scales_only_activations(spec):
    base = get_stack("hf")
    scaled = replace(base, activation_scale=2.0)
    described = RunOptions(method="lora", checkpointing="off")
    strategy = strategy_for(described, base)
    one, two = rows(estimate(spec, strategy, RunShape(), base)), rows(estimate(spec, strategy, RunShape(), scaled))
    assert two["activations"] == pytest.approx(2 * one["activations"], rel=1e-6)
    assert two["weights"] == one["weights"]
