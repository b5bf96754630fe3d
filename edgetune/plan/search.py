"""When nothing fits (pure): the cheapest combination of changes that makes some strategy fit, as one line.

Single levers (``budget.levers``) often each fall short while two together fit. This search walks combinations of
batch size, sequence length, LoRA rank, checkpointing (on, then offloaded) and, for a run the user described, a
4-bit base, in order of cost, and stops at the first that fits. Costs rank what a change takes from the run:
a smaller batch with gradient accumulation keeps the same optimisation (1 per halving), checkpointing costs
about a third more compute (1, offloading 2), a fused cross-entropy is a kernel to install (1), a lower rank or
a 4-bit base costs some quality (2 per halving, 2), and a shorter sequence changes what is learned (3 per
halving). Earlier rungs of the ladder win ties.
"""

import itertools
from dataclasses import dataclass, replace

from edgetune.plan.budget import Budget, total_bytes
from edgetune.plan.components import RunShape
from edgetune.plan.inventory import ModelSpec
from edgetune.plan.stacks import Stack
from edgetune.plan.strategies import Backprop, Strategy, ZerothOrder

MIN_SEQ_LEN = 64
MIN_RANK = 4


@dataclass(frozen=True)
class Fix:
    """A combination of changes that fits: the strategy, the changed run, what it needs, and the words for it."""

    strategy: str
    run: RunShape
    total_bytes: int
    changes: tuple[str, ...]
    cost: float

    def describe(self, usable_bytes: int) -> str:
        what = " and ".join(self.changes) if self.changes else "no change"
        return (
            f"cheapest change that fits: {self.strategy} with {what} "
            f"({self.total_bytes / 2**30:.2f} GiB of {usable_bytes / 2**30:.2f} GiB usable)"
        )


def cheapest_fix(
    spec: ModelSpec, run: RunShape, budget: Budget, candidates: list[Strategy], stack: Stack, *, described: bool
) -> Fix | None:
    """The lowest-cost combination that makes one of ``candidates`` (in preference order) fit, or None.

    ``described``: the candidates are a run the user described (its checkpointing and base may change); the
    ladder's rungs already span those, so for them only the run shape changes.
    """
    options = []
    for order, strategy in enumerate(candidates):
        variants = _variants(strategy, stack) if described else [(strategy, stack, [], 0.0)]
        for variant, variant_stack, changes, cost in variants:
            for shape, shape_changes, shape_cost in _shapes(run, variant):
                options.append(
                    (cost + shape_cost + 0.1 * order, variant, variant_stack, shape, changes + shape_changes)
                )
    options.sort(key=lambda option: option[0])
    for cost, strategy, stack, shape, changes in options:
        needed = total_bytes(spec, strategy, shape, budget, stack)
        if needed <= budget.usable_bytes:
            return Fix(strategy.name, shape, needed, tuple(changes), cost)
    return None


def _variants(strategy: Strategy, stack: Stack):
    """Every combination of checkpointing, loss and base changes open to a described run, with its cost."""
    for (ckpt, ckpt_cost), (loss, loss_cost), (base, base_cost) in itertools.product(
        _checkpointing_options(strategy, stack), _loss_options(stack), _base_options(strategy)
    ):
        variant, variant_stack, changes = strategy, stack, []
        if ckpt is not None:
            variant = replace(variant, checkpointing=True)
            variant_stack = replace(variant_stack, offload_checkpoints=ckpt == "offload")
            changes.append("checkpoints offloaded to host memory" if ckpt == "offload" else "gradient checkpointing")
        if loss is not None:
            variant_stack = replace(variant_stack, loss=loss)
            changes.append("a fused cross-entropy (Liger or Cut Cross-Entropy: --loss fused)")
        if base is not None:
            variant = replace(variant, base=base)
            changes.append("a 4-bit NF4 base (QLoRA)")
        yield variant, variant_stack, changes, ckpt_cost + loss_cost + base_cost


def _checkpointing_options(strategy: Strategy, stack: Stack):
    yield None, 0.0
    if not isinstance(strategy, Backprop):
        return
    if not strategy.checkpointing:
        yield "on", 1.0
    # edgetune's trainer keeps checkpoints on the device; other tools can offload them.
    if not stack.offload_checkpoints and stack.name != "edgetune":
        yield "offload", 2.0


def _loss_options(stack: Stack):
    yield None, 0.0
    if stack.loss != "fused" and stack.name != "edgetune":
        yield "fused", 1.0


def _base_options(strategy: Strategy):
    yield None, 0.0
    if isinstance(strategy, Backprop | ZerothOrder) and strategy.lora and strategy.base != "nf4":
        yield "nf4", 2.0


def _shapes(run: RunShape, strategy: Strategy):
    batches = _halvings(run.batch_size, 1)
    seqs = _halvings(run.seq_len, min(MIN_SEQ_LEN, run.seq_len))
    ranks = _halvings(run.lora_rank, min(MIN_RANK, run.lora_rank)) if strategy.lora else [(run.lora_rank, 0)]
    for (b, nb), (s, ns), (r, nr) in itertools.product(batches, seqs, ranks):
        changes = []
        if b != run.batch_size:
            changes.append(f"batch {b} (accumulate {run.batch_size // b} steps)")
        if s != run.seq_len:
            changes.append(f"sequences of {s} tokens")
        if r != run.lora_rank:
            changes.append(f"LoRA rank {r}")
        yield replace(run, batch_size=b, seq_len=s, lora_rank=r), changes, nb + 3 * ns + 2 * nr


def _halvings(value: int, floor: int) -> list[tuple[int, int]]:
    """(value, halvings) from ``value`` down to ``floor``."""
    result, count = [(value, 0)], 0
    while value // 2 >= floor and value > 1:
        value, count = value // 2, count + 1
        result.append((value, count))
    return result
