"""From sized strategies to a decision (pure): the plan of a run, the strategy it recommends, the one a run uses.

The recommendation follows one rule: walk ``strategies.LADDER`` from the rung that needs the most memory (AdaFish on
LoRA, activations kept) to the leanest (a forward-only optimizer on a 4-bit base) and take the first whose total fits
the usable memory; its reason quotes what bench/convergence.py measured for it (``ladder_evidence``). ``decide``
turns a plan into the strategy a training run uses: the recommendation, or the strategy the config names when it
fits (or when the user forces it).
"""

from dataclasses import dataclass

from edgetune.errors import EdgetuneError
from edgetune.plan import ladder_evidence
from edgetune.plan.budget import Budget, StrategyPlan, levers, size
from edgetune.plan.components import RunShape
from edgetune.plan.inventory import ModelSpec
from edgetune.plan.report import PlanResult
from edgetune.plan.run_options import RunOptions, stack_for, strategy_for
from edgetune.plan.search import cheapest_fix
from edgetune.plan.strategies import LADDER, STRATEGIES, Strategy


@dataclass(frozen=True)
class Decision:
    """The strategy a run uses, why, and its sized plan (what the trainer reports as planned)."""

    strategy: Strategy
    reason: str
    sized: StrategyPlan


def plan_run(
    model: str,
    spec: ModelSpec,
    run: RunShape,
    budget: Budget,
    strategies: tuple[str, ...] | None = None,
    options: RunOptions | None = None,
) -> PlanResult:
    """Size strategies for a model and run shape against a budget, and recommend one.

    Without ``options`` describing a run, the strategies sized are ``strategies`` (default: all of edgetune's) and
    the recommendation walks the ladder. With them, the described run is sized (plus any named ``strategies``) with
    the options' stack, and is what the plan recommends when it fits.

    Raises:
        EdgetuneError: a strategy name is unknown, or no LoRA target matches the model.
    """
    options = options or RunOptions()
    stack = stack_for(options, "cpu" if budget.kind == "cpu" else "cuda")
    described = strategy_for(options, stack) if options.describes_run else None
    chosen = strategies or (() if described else tuple(STRATEGIES))
    unknown = [name for name in chosen if name not in STRATEGIES]
    if unknown:
        raise EdgetuneError(f"unknown strategy {unknown[0]!r}", f"use one of {', '.join(STRATEGIES)}")
    plans = {name: size(spec, STRATEGIES[name], run, budget, stack) for name in chosen}
    if described is not None:
        plans = {described.name: size(spec, described, run, budget, stack), **plans}
        recommended = described.name if plans[described.name].fits else recommend(plans)
    else:
        recommended = recommend(plans)
    warnings = []
    if spec.max_positions and run.seq_len > spec.max_positions:
        warnings.append(f"seq_len {run.seq_len} exceeds the model's {spec.max_positions} positions; planned anyway")
    nothing_fits = recommended is None
    candidates = [described] if described else [STRATEGIES[name] for name in LADDER]
    fix = cheapest_fix(spec, run, budget, candidates, stack, described=described is not None) if nothing_fits else None
    return PlanResult(
        model=model,
        spec=spec,
        run=run,
        budget=budget,
        plans=plans,
        recommended=recommended,
        reason=_described_reason(described, plans) if described else ladder_reason(recommended, plans),
        levers=[] if not nothing_fits else levers(spec, run, budget, candidates[-1], stack),
        warnings=warnings,
        stack=stack.name,
        report=options.report,
        fix=fix.describe(budget.usable_bytes) if fix else _no_fix(nothing_fits),
    )


def _no_fix(nothing_fits: bool) -> str | None:
    if not nothing_fits:
        return None
    return "no combination of batch, sequence, rank, checkpointing and base fits: use a smaller model or more memory"


def _described_reason(described: Strategy, plans: dict[str, StrategyPlan]) -> str:
    if plans[described.name].fits:
        return "the run you described fits with margin"
    return "the run you described does not fit; the changes below would reduce it"


def recommend(plans: dict[str, StrategyPlan]) -> str | None:
    """The first strategy of the ladder that fits, or None."""
    return next((name for name in LADDER if name in plans and plans[name].fits), None)


def ladder_reason(recommended: str | None, plans: dict[str, StrategyPlan]) -> str:
    """Why the recommendation was made, in one sentence: where it sits on the ladder and what was measured for it."""
    if recommended is None:
        return "no strategy of the ladder fits; the changes below would reduce the leanest one"
    skipped = [name for name in LADDER[: LADDER.index(recommended)] if name in plans]
    where = "the first rung of the ladder that fits" + (f" ({', '.join(skipped)} would not)" if skipped else "")
    strategy = STRATEGIES[recommended]
    measured = (
        ladder_evidence.backprop_clause(strategy.optimizer)
        if strategy.needs_backward
        else ladder_evidence.zeroth_order_clause(strategy.optimizer)
    )
    clauses = [where, *([f"measured: {measured}"] if measured else []), *_against_next_rung(recommended)]
    return "; ".join(clauses)


def _against_next_rung(recommended: str) -> list[str]:
    """What the rung below offers that this one does not, when the measurements give this one no advantage."""
    index = LADDER.index(recommended)
    if index + 1 >= len(LADDER):
        return []
    this, below = STRATEGIES[recommended], STRATEGIES[LADDER[index + 1]]
    if this.optimizer == below.optimizer:
        return [f"same optimizer as {below.name}, without its recomputation"] if below.checkpointing else []
    if this.needs_backward != below.needs_backward:
        return []  # backprop against forward-only: not measured on the same budget
    mine, theirs = (
        ladder_evidence.BACKPROP_FIGURES.get(ladder_evidence.bench_name(s.optimizer)) for s in (this, below)
    )
    if mine is None or theirs is None or ladder_evidence.beats(mine, theirs):
        return []
    return [f"measured no better than {below.name}'s optimizer on held-out loss or step time"]


def decide(result: PlanResult, requested: str | None, *, force: bool = False) -> Decision:
    """The strategy a run uses: ``requested`` when it fits (or ``force``), else the plan's recommendation.

    Raises:
        EdgetuneError: the sequence is longer than the model allows, nothing fits, or the requested strategy does
            not fit and ``force`` is off (each message says what to change).
    """
    spec, run = result.spec, result.run
    if spec.max_positions and run.seq_len > spec.max_positions:
        raise EdgetuneError(
            f"data.seq_len={run.seq_len} is longer than the model's {spec.max_positions} positions",
            f"set data.seq_len to at most {spec.max_positions}",
        )
    if requested is None:
        if result.recommended is None:
            hints = result.fix or "; ".join(lever.change for lever in result.levers[:2])
            raise EdgetuneError("no strategy fits the memory available", hints)
        chosen = result.recommended
        return Decision(STRATEGIES[chosen], f"recommended by the plan: {result.reason}", result.plans[chosen])
    if requested not in result.plans:
        raise EdgetuneError(f"unknown strategy {requested!r}", f"use one of {', '.join(result.plans)}")
    sized = result.plans[requested]
    if not sized.fits and not force:
        usable = max(result.budget.usable_bytes, 0) / 2**30
        raise EdgetuneError(
            f"strategy {requested} needs {sized.total_bytes / 2**30:.2f} GiB but {usable:.2f} GiB is usable "
            f"after the safety margin ({result.budget.source})",
            f"pick {result.recommended or 'a smaller setting'} or pass train.force=true to try anyway",
        )
    return Decision(STRATEGIES[requested], "chosen in the config", sized)
