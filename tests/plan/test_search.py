import pytest
from conftest import tiny_llama_config

from edgetune.plan.budget import Budget, total_bytes
from edgetune.plan.components import RunShape
from edgetune.plan.inventory import inspect_config
from edgetune.plan.run_options import RunOptions, stack_for, strategy_for
from edgetune.plan.search import cheapest_fix
from edgetune.plan.strategies import LADDER, STRATEGIES

MIB = 2**20


@pytest.fixture(scope="module")
def spec():
    return inspect_config(tiny_llama_config(vocab_size=32000, hidden_size=256, intermediate_size=1024).to_dict())


def budget(usable_bytes: int) -> Budget:
    free = usable_bytes + 300 * MIB
    return Budget(free, free, "cuda", "test", 0)


def test_the_cheapest_fix_fits_and_a_cheaper_one_does_not(spec):
    options = RunOptions(method="lora", stack="hf")
    stack = stack_for(options, "cuda")
    strategy = strategy_for(options, stack)
    run = RunShape(8, 1024, 16)
    need = total_bytes(spec, strategy, run, budget(10**12), stack)
    tight = budget(need // 3)
    fix = cheapest_fix(spec, run, tight, [strategy], stack, described=True)
    assert fix is not None and fix.total_bytes <= tight.usable_bytes and fix.changes
    assert total_bytes(spec, strategy, run, tight, stack) > tight.usable_bytes
    # Halving the batch, a change of cost 1, is not enough on its own; a fused loss or checkpointing (cost 1) is.
    assert total_bytes(spec, strategy, RunShape(4, 1024, 16), tight, stack) > tight.usable_bytes
    assert fix.cost == 1 and len(fix.changes) == 1
    assert fix.changes[0] == "gradient checkpointing" or fix.changes[0].startswith("a fused cross-entropy")
    assert fix.describe(tight.usable_bytes).startswith(f"cheapest change that fits: {strategy.name} with ")


def test_halving_the_batch_comes_before_shortening_sequences(spec):
    stack = stack_for(RunOptions(), "cuda")
    strategy = STRATEGIES[LADDER[-1]]
    run = RunShape(2, 2048, 16)
    half_batch = total_bytes(spec, strategy, RunShape(1, 2048, 16), budget(10**12), stack)
    fix = cheapest_fix(spec, run, budget(half_batch + MIB), [strategy], stack, described=False)
    assert fix.run == RunShape(1, 2048, 16) and fix.changes == ("batch 1 (accumulate 2 steps)",)


def test_nothing_is_found_when_even_the_weights_do_not_fit(spec):
    stack = stack_for(RunOptions(), "cuda")
    assert cheapest_fix(spec, RunShape(), budget(MIB), [STRATEGIES[n] for n in LADDER], stack, described=False) is None


def test_a_context_too_long_to_generate_is_shortened(spec):
    options = RunOptions(method="inference", precision="bf16")
    stack = stack_for(options, "cuda")
    strategy = strategy_for(options, stack)
    run = RunShape(1, 65536, 16)
    fits = total_bytes(spec, strategy, RunShape(1, 8192, 16), budget(10**12), stack)
    fix = cheapest_fix(spec, run, budget(fits + MIB), [strategy], stack, described=True)
    assert fix.run.seq_len == 8192 and fix.changes == ("sequences of 8192 tokens",)
