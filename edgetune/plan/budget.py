"""From estimates to decisions (pure): what fits a memory budget, which strategy to use, what to change.

The recommendation follows one rule: walk ``strategies.LADDER`` from the rung that needs the most memory (AdaFish
on LoRA) to the leanest (a forward-only optimizer on a 4-bit base) and take the first whose total fits the usable
memory. Usable memory is
the free memory minus a safety margin of max(300 MiB, 3% of the device's total).
"""

import re
from dataclasses import dataclass, replace
from typing import Literal

from edgetune.errors import EdgetuneError
from edgetune.plan import calibration
from edgetune.plan.components import Component, Estimate, RunShape, estimate
from edgetune.plan.device import DeviceInfo
from edgetune.plan.inventory import ModelSpec
from edgetune.plan.profiles import DeviceProfile
from edgetune.plan.stacks import EDGETUNE_CPU, EDGETUNE_CUDA, Stack
from edgetune.plan.strategies import LADDER, STRATEGIES, Backprop, Strategy, with_checkpointing

BudgetKind = Literal["cuda", "unified", "cpu"]
MIN_MARGIN_BYTES = 300 * 1024**2
# Python, torch, transformers and bitsandbytes loaded in a fresh process, before any tensor: 530-640 MiB of RSS
# beyond tensor bytes in the tiny-model rows of `python bench/planner_measure.py --quick`.
CPU_RUNTIME_BYTES = 600 * 1024**2
MAX_BUDGET_BYTES = 2**50  # 1 PiB: far above any device, far below where float arithmetic loses bytes
SLACK_DYNAMIC, SLACK_STATIC = 0.10, 0.05  # planner-model.md 6.8: fragmentation seen 3-23% on CUDA
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


@dataclass(frozen=True)
class Budget:
    """Memory to plan against: free bytes, the device's total, what kind of memory, and who said so."""

    free_bytes: int
    total_bytes: int
    kind: BudgetKind
    source: str
    context_bytes: int = 0

    @property
    def margin_bytes(self) -> int:
        return max(MIN_MARGIN_BYTES, round(0.03 * self.total_bytes))

    @property
    def usable_bytes(self) -> int:
        return self.free_bytes - self.margin_bytes


@dataclass(frozen=True)
class StrategyPlan:
    """One strategy sized against a budget.

    ``total_bytes`` is all the memory the run needs on the device (context and allocator slack included) and
    decides whether it fits; ``allocated_bytes`` is the allocator's peak (``torch.cuda.max_memory_allocated``, or
    tracked tensors on CPU) and ``reserved_bytes`` what the caching allocator holds (the peak plus slack).
    """

    strategy: Strategy
    estimate: Estimate
    overhead: tuple[Component, ...]
    total_bytes: int
    fits: bool
    headroom_bytes: int
    max_seq_len_at_batch_1: int
    max_batch_at_seq_len: int

    @property
    def allocated_bytes(self) -> int:
        return self.estimate.peak_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.estimate.peak_bytes + sum(c.bytes for c in self.overhead if c.name == "allocator slack")

    def reported_bytes(self, report: str) -> int:
        """The figure ``report`` names: allocated, reserved or device."""
        return {"allocated": self.allocated_bytes, "reserved": self.reserved_bytes}.get(report, self.total_bytes)


def parse_bytes(text: str) -> int:
    """Parse a size such as ``6GiB``, ``6 GB``, ``7.5G`` or ``6000MiB`` (G = 10^9, GiB = 2^30).

    Raises:
        EdgetuneError: the text is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    shown = text if len(text or "") <= 40 else f"{text[:37]}..."
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise EdgetuneError(f"budget {shown!r} is not a memory size", "write it like 6GiB, 8GB, 7.5G or 6000MiB")
    size = float(match.group(1)) * _UNITS[unit]
    if not size <= MAX_BUDGET_BYTES:  # also catches inf, which round() cannot take
        raise EdgetuneError(f"budget {shown!r} is larger than any machine", "write a size up to 1 PiB, e.g. 24GiB")
    return round(size)


def overhead_rows(budget: Budget, sized: Estimate) -> tuple[Component, ...]:
    """Context (or runtime) and allocator slack on top of an estimate."""
    static = sum(c.bytes for c in sized.components if c.name in ("weights", "adapters", "optimizer state"))
    dynamic = sized.peak_bytes - static
    if budget.kind == "cpu":
        runtime = Component("runtime", CPU_RUNTIME_BYTES, False, "Python, torch and libraries (measured RSS)")
    else:
        runtime = Component("cuda context", budget.context_bytes, False, "CUDA context and library workspaces")
    slack = round(SLACK_DYNAMIC * dynamic + SLACK_STATIC * static)
    return runtime, Component("allocator slack", slack, False, "10% of the step + 5% of resident")


def size(
    spec: ModelSpec, strategy: Strategy, run: RunShape, budget: Budget, stack: Stack | None = None
) -> StrategyPlan:
    """Size one strategy with ``stack`` (default: edgetune's, for the budget's device) and answer the inverse
    questions (longest sequence, largest batch)."""
    sized = _estimate(spec, strategy, run, budget, stack)
    overhead = overhead_rows(budget, sized)
    total = sized.peak_bytes + sum(c.bytes for c in overhead)
    return StrategyPlan(
        strategy=strategy,
        estimate=sized,
        overhead=overhead,
        total_bytes=total,
        fits=total <= budget.usable_bytes,
        headroom_bytes=budget.usable_bytes - total,
        max_seq_len_at_batch_1=_largest(
            lambda n: replace(run, batch_size=1, seq_len=n),
            spec,
            strategy,
            budget,
            upper=max(spec.max_positions, run.seq_len),
            stack=stack,
        ),
        max_batch_at_seq_len=_largest(
            lambda n: replace(run, batch_size=n), spec, strategy, budget, upper=4096, stack=stack
        ),
    )


def total_bytes(spec: ModelSpec, strategy: Strategy, run: RunShape, budget: Budget, stack: Stack | None = None) -> int:
    """Planned total (estimate + context + slack) for one run shape."""
    sized = _estimate(spec, strategy, run, budget, stack)
    return sized.peak_bytes + sum(c.bytes for c in overhead_rows(budget, sized))


def _estimate(spec: ModelSpec, strategy: Strategy, run: RunShape, budget: Budget, stack: Stack | None) -> Estimate:
    if stack is None:
        stack = EDGETUNE_CPU if budget.kind == "cpu" else EDGETUNE_CUDA
    return estimate(spec, strategy, run, stack)


def _largest(make_run, spec: ModelSpec, strategy: Strategy, budget: Budget, upper: int, stack=None) -> int:
    """Largest n in [1, upper] whose run fits (0 if none): memory never shrinks as tokens grow, so bisect."""

    def fits(n: int) -> bool:
        return total_bytes(spec, strategy, make_run(n), budget, stack) <= budget.usable_bytes

    if not fits(1):
        return 0
    low, high = 1, upper
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass(frozen=True)
class Lever:
    """A change that would reduce a strategy's total, and by how much."""

    change: str
    saves_bytes: int
    fits_after: bool


def levers(
    spec: ModelSpec, run: RunShape, budget: Budget, strategy: Strategy | None = None, stack: Stack | None = None
) -> list[Lever]:
    """What would make ``strategy`` (by default the leanest rung) fit, largest saving first."""
    strategy = strategy or STRATEGIES[LADDER[-1]]
    base = total_bytes(spec, strategy, run, budget, stack)
    options = []
    if run.seq_len > 1:
        options.append((f"halve the sequence to {run.seq_len // 2}", strategy, replace(run, seq_len=run.seq_len // 2)))
    if run.batch_size > 1:
        options.append(("batch size 1 (raise gradient accumulation)", strategy, replace(run, batch_size=1)))
    if strategy.lora and run.lora_rank > 4:
        options.append((f"LoRA rank {run.lora_rank // 2}", strategy, replace(run, lora_rank=run.lora_rank // 2)))
    checkpointed = with_checkpointing(strategy) if strategy.name in STRATEGIES else _checkpointed(strategy)
    if checkpointed is not None:
        options.append(("gradient checkpointing", checkpointed, run))
    longest = _largest(
        lambda n: replace(run, batch_size=1, seq_len=n), spec, strategy, budget, upper=run.seq_len, stack=stack
    )
    if 0 < longest < run.seq_len:
        options.append(
            (
                f"sequence {longest} at batch 1 (the longest that fits)",
                strategy,
                replace(run, batch_size=1, seq_len=longest),
            )
        )
    result = []
    for change, candidate, changed in options:
        after = total_bytes(spec, candidate, changed, budget, stack)
        result.append(Lever(change, base - after, after <= budget.usable_bytes))
    weights = next(c.bytes for c in _estimate(spec, strategy, run, budget, stack).components if c.name == "weights")
    shortfall = base - budget.usable_bytes
    if 0 < shortfall < weights:  # a model whose weights alone exceed the shortfall's room is no lever
        result.append(
            Lever(
                f"a smaller model (weights at most {_gib(weights - shortfall)} instead of {_gib(weights)})",
                shortfall,
                True,
            )
        )
    return sorted(result, key=lambda lever: -lever.saves_bytes)


def _checkpointed(strategy: Strategy) -> Strategy | None:
    """A described run with checkpointing turned on (the ladder's rungs use ``with_checkpointing``)."""
    if not isinstance(strategy, Backprop) or strategy.checkpointing:
        return None
    return replace(strategy, name=f"{strategy.name}-gc", checkpointing=True)


def _gib(value: int) -> str:
    return f"{max(value, 0) / 1024**3:.2f} GiB"


def context_bytes_for(kind: BudgetKind, measured: int | None) -> int:
    """The CUDA context to plan for: a measured value if there is one, else the documented default."""
    if kind == "cpu":
        return 0
    return measured if measured is not None else calibration.DEFAULT_CUDA_CONTEXT_BYTES


def budget_of_size(size_bytes: int, kind: BudgetKind, source: str) -> Budget:
    """A budget the user states: ``size_bytes`` free of ``size_bytes`` on a device of ``kind``.

    Raises:
        EdgetuneError: the size is not positive.
    """
    if size_bytes <= 0:
        raise EdgetuneError(f"budget must be positive, got {size_bytes} bytes", "pass a size such as 6GiB")
    return Budget(size_bytes, size_bytes, kind, source, context_bytes_for(kind, None))


def budget_of_profile(profile: DeviceProfile) -> Budget:
    """The whole memory of a device profile: a device you do not own, before a desktop takes its share."""
    kind: BudgetKind = "unified" if profile.unified else "cuda"
    note = "total memory; the OS shares it" if profile.unified else "total memory; a desktop uses part of it"
    return Budget(
        profile.memory_bytes,
        profile.memory_bytes,
        kind,
        f"profile {profile.key}, {note}",
        context_bytes_for(kind, profile.ctx_overhead_bytes),
    )


def budget_of_device(device: DeviceInfo) -> Budget:
    """The free memory of a device read from NVML or psutil."""
    kind: BudgetKind = {"nvml_v2": "cuda", "nvml_v1": "cuda", "psutil_unified": "unified"}.get(device.source, "cpu")
    return Budget(
        device.free_bytes, device.total_bytes, kind, f"{device.name} via {device.source}", context_bytes_for(kind, None)
    )
