import pytest

from edgetune.errors import EdgetuneError
from edgetune.plan.run_options import RunOptions, stack_for, strategy_for
from edgetune.plan.strategies import Backprop, Inference, ZerothOrder


def described(**options):
    run = RunOptions(**options)
    stack = stack_for(run, "cuda")
    return strategy_for(run, stack), stack


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(method="qlora", precision="bf16"), "qlora means an nf4 base"),
        (dict(method="inference", optimizer="adamw"), "trains nothing"),
        (dict(method="full", optimizer="scaled-adamw"), "trains LoRA adapters only"),
        (dict(method="full", precision="nf4"), "cannot train a 4-bit base"),
        (dict(optimizer="hizoo", checkpointing="offload"), "runs no backward pass"),
        (dict(method="dora"), "unknown method 'dora'"),
        (dict(stack="deepspeed"), "unknown stack 'deepspeed'"),
        (dict(report="nvidia-smi"), "unknown report 'nvidia-smi'"),
        (dict(optimizer="lion"), "unknown optimizer 'lion'"),
    ],
)
def test_impossible_runs_are_one_line_errors(options, message):
    with pytest.raises(EdgetuneError, match=message):
        RunOptions(**options)


def test_a_described_run_is_named_after_what_it_is():
    assert described(method="qlora")[0].name == "adamw-qlora-gc"
    assert described(method="full", precision="fp32", optimizer="adafactor", checkpointing="off")[0].name == (
        "adafactor-full-fp32"
    )
    assert described(method="lora", optimizer="paged-adamw-8bit")[0].optimizer == "paged_adamw_8bit"
    assert described(method="inference", precision="nf4")[0] == Inference(
        name="inference-nf4", base="nf4", summary="generation in nf4"
    )
    mezo = described(method="full", optimizer="mezo")[0]
    assert isinstance(mezo, ZerothOrder) and not mezo.hessian and not mezo.lora


def test_a_precision_alone_picks_the_method():
    strategy = described(precision="nf4")[0]
    assert isinstance(strategy, Backprop) and strategy.lora and strategy.base == "nf4"
    assert described(optimizer="sgd")[0].base == "bf16"


@pytest.mark.parametrize(
    ("stack", "method", "checkpointing", "offloaded"),
    [
        ("edgetune", "lora", True, False),
        ("hf", "lora", False, False),  # TrainingArguments leaves gradient_checkpointing off
        ("hf", "qlora", True, False),  # prepare_model_for_kbit_training turns it on
        ("axolotl", "qlora", True, False),
        ("torchtune", "lora", True, False),
        ("unsloth", "qlora", True, True),  # use_gradient_checkpointing="unsloth"
        ("litgpt", "lora", False, False),
    ],
)
def test_checkpointing_follows_the_tools_recipe_unless_told(stack, method, checkpointing, offloaded):
    strategy, priced = described(method=method, stack=stack)
    assert (strategy.checkpointing, priced.offload_checkpoints) == (checkpointing, offloaded)
    strategy, priced = described(method=method, stack=stack, checkpointing="off")
    assert (strategy.checkpointing, priced.offload_checkpoints) == (False, False)


def test_loss_and_double_quant_override_the_preset():
    _, stack = described(method="qlora", stack="hf", loss="fused", double_quant=False)
    assert (stack.loss, stack.double_quant, stack.unquantized_bytes) == ("fused", False, 4)
    _, stack = described(method="lora", stack="torchtune", loss="chunked")
    assert stack.chunked_loss  # edgetune's own chunking, not torchtune's 8 chunks
    assert RunOptions().describes_run is False and RunOptions(stack="hf").describes_run is False
