"""The result of ``edgetune plan`` and its two renderings: a components x strategies table, and JSON."""

from dataclasses import dataclass, field

from edgetune.plan.budget import Budget, Lever, StrategyPlan
from edgetune.plan.components import RunShape
from edgetune.plan.inventory import ModelSpec

ROW_ORDER = (
    "cuda context",
    "runtime",
    "weights",
    "adapters",
    "optimizer state",
    "gradients",
    "activations",
    "logits",
    "kv cache",
    "step temporaries",
    "zeroth-order buffer",
    "allocator slack",
)


@dataclass(frozen=True)
class PlanResult:
    """Everything ``plan`` decided, with the numbers behind it."""

    model: str
    spec: ModelSpec
    run: RunShape
    budget: Budget
    plans: dict[str, StrategyPlan]
    recommended: str | None
    reason: str
    levers: list[Lever] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stack: str = "edgetune"
    report: str = "device"
    fix: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "params": self.spec.total_params,
            "run": {
                "batch_size": self.run.batch_size,
                "seq_len": self.run.seq_len,
                "lora_rank": self.run.lora_rank,
                "lora_targets": list(self.run.lora_targets),
            },
            "budget": {
                "free_bytes": self.budget.free_bytes,
                "total_bytes": self.budget.total_bytes,
                "usable_bytes": self.budget.usable_bytes,
                "margin_bytes": self.budget.margin_bytes,
                "kind": self.budget.kind,
                "source": self.budget.source,
            },
            "strategies": {name: _plan_dict(plan) for name, plan in self.plans.items()},
            "stack": self.stack,
            "report": self.report,
            "recommended": self.recommended,
            "reason": self.reason,
            "fix": self.fix,
            "levers": [
                {"change": lv.change, "saves_bytes": lv.saves_bytes, "fits_after": lv.fits_after} for lv in self.levers
            ],
            "warnings": self.warnings,
        }


def _plan_dict(plan: StrategyPlan) -> dict[str, object]:
    rows = plan.overhead + plan.estimate.components
    return {
        "summary": plan.strategy.summary,
        "components": {c.name: {"bytes": c.bytes, "exact": c.exact, "note": c.note} for c in rows},
        "peak_phase": plan.estimate.peak_phase,
        "total_bytes": plan.total_bytes,
        "allocated_bytes": plan.allocated_bytes,
        "reserved_bytes": plan.reserved_bytes,
        "fits": plan.fits,
        "headroom_bytes": plan.headroom_bytes,
        "max_seq_len_at_batch_1": plan.max_seq_len_at_batch_1,
        "max_batch_at_seq_len": plan.max_batch_at_seq_len,
    }


def format_plan(result: PlanResult) -> str:
    """A readable plan: header, components x strategies in GiB (exact rows marked *), verdict and levers."""
    names = list(result.plans)
    heads = [_split_name(n) for n in names]
    width = max(10, *(len(part) for head in heads for part in head)) + 2
    run, budget = result.run, result.budget
    lines = [
        f"model   {result.model}: {result.spec.total_params / 1e6:,.1f}M parameters, {result.spec.num_layers} layers",
        f"run     batch {run.batch_size} x {run.seq_len} tokens, LoRA rank {run.lora_rank}; {result.stack} stack",
        f"memory  {_gib(budget.free_bytes)} free of {_gib(budget.total_bytes)} ({budget.source}); "
        f"{_gib(budget.usable_bytes)} usable after a {_gib(budget.margin_bytes)} safety margin",
        "",
        f"{'':<22}" + "".join(f"{head[0]:>{width}}" for head in heads),
        f"{'GiB':<22}" + "".join(f"{head[1]:>{width}}" for head in heads),
    ]
    hidden = {"device": (), "reserved": ("cuda context", "runtime")}.get(
        result.report, ("cuda context", "runtime", "allocator slack")
    )
    for row in (name for name in ROW_ORDER if name not in hidden):
        cells = [_row_component(result.plans[n], row) for n in names]
        if all(c is None for c in cells):
            continue
        exact = all(c is None or c.exact for c in cells)
        label = f"{row}{' *' if exact else ''}"
        lines.append(f"{label:<22}" + "".join(f"{_cell(c):>{width}}" for c in cells))
    total = {"device": "total", "allocated": "total allocated", "reserved": "total reserved"}[result.report]
    lines.append(
        f"{total:<22}"
        + "".join(f"{result.plans[n].reported_bytes(result.report) / 1024**3:>{width}.2f}" for n in names)
    )
    lines.append(f"{'fits':<22}" + "".join(f"{_verdict(result.plans[n]):>{width}}" for n in names))
    lines.append(
        f"{'longest seq, batch 1':<22}" + "".join(f"{_longest(result.plans[n], result.spec):>{width}}" for n in names)
    )
    lines.append(
        f"{f'largest batch, seq {run.seq_len}':<22}"
        + "".join(f"{result.plans[n].max_batch_at_seq_len:>{width}}" for n in names)
    )
    lines += ["", "* exact (from parameter counts and dtypes); other rows are calibrated against measured peaks"]
    if result.report != "device":
        lines += [f"the total is the {result.report} peak; whether a run fits is judged on all device memory it needs"]
    lines += [""]
    lines += [f"recommended: {result.recommended or 'nothing fits'}: {result.reason}"]
    if result.fix:
        lines += [f"  {result.fix}"]
    lines += [
        f"  - {lv.change}: saves {_gib(lv.saves_bytes)}{' (then fits)' if lv.fits_after else ''}"
        for lv in result.levers
    ]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _split_name(name: str) -> tuple[str, str]:
    # Strategy names are method-base[-gc]; two header lines keep nine strategies within a wide terminal.
    method, _, rest = name.partition("-")
    if method == "scaled":
        method, _, rest = rest.partition("-")
        method = f"scaled-{method}"
    return method, rest


def _longest(plan: StrategyPlan, spec: ModelSpec) -> str:
    value = plan.max_seq_len_at_batch_1
    return f"{value} (max)" if spec.max_positions and value >= spec.max_positions else str(value)


def _row_component(plan: StrategyPlan, name: str):
    return next((c for c in plan.overhead + plan.estimate.components if c.name == name), None)


def _cell(component) -> str:
    return "-" if component is None or component.bytes == 0 else f"{component.bytes / 1024**3:.2f}"


def _verdict(plan: StrategyPlan) -> str:
    return f"yes +{plan.headroom_bytes / 1024**3:.2f}" if plan.fits else f"no {plan.headroom_bytes / 1024**3:.2f}"


def _gib(value: int) -> str:
    return f"{value / 1024**3:.2f} GiB"
