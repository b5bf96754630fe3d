"""Why each rung of the ladder is there, in figures the convergence benchmark measured (pure).

The ladder (``strategies.LADDER``) is walked from the rung that needs the most memory to the leanest, and the plan
recommends the first that fits. A rung earns its place above the next one only if it is better on some axis: the
held-out loss it reaches (at equal steps or equal wall-clock) or its step time; otherwise the leaner rung would do.
``rung_reason`` says what was measured for the recommended rung's optimizer against AdamW, and against the next rung
down, in one clause, quoting ``measured_convergence`` (written by ``python bench/convergence.py --ladder`` from
bench/results/convergence.json; tests/plan/test_ladder_evidence.py keeps the two equal). The zeroth-order rung is
the forward-only optimizer with the lowest measured held-out loss at equal forward passes, the faster one per forward
pass when losses tie (``best_zeroth_order``).
"""

import math
from typing import Any

from edgetune.plan import measured_convergence

SOURCE = "bench/results/convergence.md"
# Differences of held-out loss smaller than this are within the seed-to-seed spread the benchmark measured on
# SmolLM2 (about 0.01 nats), so they count as "the same loss".
SAME_LOSS = 0.01
# The benchmark's optimizer names for the strategies' optimizers.
BENCH_NAMES = {"adafish": "adafish", "scaled_adamw": "scaled-adamw", "adamw": "adamw"}


def _compared_zeroth_order() -> dict[str, dict[str, dict[str, Any]]]:
    """Per task on which two or more forward-only optimizers have a finite final loss: each one's figures."""
    tasks: dict[str, dict[str, dict[str, Any]]] = {}
    for name, measured in measured_convergence.ZEROTH_ORDER.items():
        for task, figures in measured.items():
            if math.isfinite(figures["loss"]):
                tasks.setdefault(task, {})[name] = figures
    return {task: runs for task, runs in tasks.items() if len(runs) >= 2}


def _mean(compared: dict[str, dict[str, dict[str, Any]]], name: str, key: str) -> float:
    values = [runs[name][key] / (runs[name]["forwards"] if key == "seconds" else 1) for runs in compared.values()]
    return sum(values) / len(values)


def best_zeroth_order(default: str = "hizoo") -> str:
    """The forward-only optimizer with the lowest mean final held-out loss at its forward budget, over the tasks on
    which at least two were measured (one alone is no comparison); ``default`` when there is no such task.

    Losses within ``SAME_LOSS`` of the lowest are a tie (one seed's spread), which the fewer training seconds per
    forward pass breaks: at the same loss per forward, the faster optimizer is ahead at equal wall-clock.
    """
    compared = _compared_zeroth_order()
    names = sorted(set.intersection(*(set(runs) for runs in compared.values()))) if compared else []
    if not names:
        return default
    lowest = min(_mean(compared, name, "loss") for name in names)
    tied = [name for name in names if _mean(compared, name, "loss") < lowest + SAME_LOSS]
    return min(tied, key=lambda name: _mean(compared, name, "seconds"))


def measured_lr(optimizer: str, fallback: float) -> float:
    """The learning rate the benchmark measured best for a strategy's optimizer, else ``fallback``.

    Backprop: the one rate for all its tasks (``BACKPROP[...]["lr"]``: the least above each task's best loss,
    relatively, on average; bench/convergence_ladder.default_lr).
    Forward-only: its best rate, when every task it ran agrees on one. The benchmark trains LoRA r=8 on SmolLM2-135M
    in fp32 at batch 4 and a constant rate; ``train.lr`` overrides it for other shapes.
    """
    name = bench_name(optimizer)
    backprop = measured_convergence.BACKPROP.get(name, {}).get("lr")
    if backprop is not None:
        return float(backprop)
    rates = {figures["lr"] for figures in measured_convergence.ZEROTH_ORDER.get(name, {}).values()}
    return float(rates.pop()) if len(rates) == 1 else fallback


def _zeroth_order_verdict(optimizer: str) -> str:
    """Why the forward-only rung is this optimizer, in words, or "" when it is not the measured best."""
    compared = _compared_zeroth_order()
    if best_zeroth_order(default="") != optimizer:
        return ""
    others = sorted(set.intersection(*(set(runs) for runs in compared.values())) - {optimizer})
    loss, per_forward = _mean(compared, optimizer, "loss"), _mean(compared, optimizer, "seconds")
    tied = [o for o in others if _mean(compared, o, "loss") < loss + SAME_LOSS]
    if not tied:
        return "the lowest held-out loss at equal forward passes; "
    ratio = per_forward / min(_mean(compared, o, "seconds") for o in tied)
    return (
        f"the same held-out loss as {', '.join(tied)} at equal forward passes (within {SAME_LOSS}) "
        f"in {ratio:.2f}x the time per forward pass; "
    )


BACKPROP_FIGURES: dict[str, dict[str, Any]] = measured_convergence.BACKPROP


def bench_name(optimizer: str) -> str:
    """The benchmark's name for a strategy's optimizer (``scaled_adamw`` -> ``scaled-adamw``)."""
    return BENCH_NAMES.get(optimizer, optimizer)


def beats(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether one optimizer's figures beat another's on any axis: loss at equal steps, at equal wall-clock, or
    step time (a loss gap within ``SAME_LOSS`` is no advantage)."""
    return (
        mine["loss_vs_adamw"] < theirs["loss_vs_adamw"] - SAME_LOSS
        or mine["wall_loss_vs_adamw"] < theirs["wall_loss_vs_adamw"] - SAME_LOSS
        or mine["step_time_vs_adamw"] < 0.95 * theirs["step_time_vs_adamw"]
    )


def backprop_clause(optimizer: str) -> str | None:
    """What was measured for a backprop optimizer against AdamW, or None if it was not measured."""
    name = bench_name(optimizer)
    figures: dict[str, Any] | None = BACKPROP_FIGURES.get(name)
    if figures is None:
        return None
    if name == "adamw":
        return f"the baseline every rung is measured against ({', '.join(figures['tasks'])})"
    loss = _loss_words(figures["loss_vs_adamw"])
    wall = _loss_words(figures["wall_loss_vs_adamw"])
    steps = [s for s in figures["steps_to_adamw_loss"] if s is not None]
    target = f"AdamW's {figures['steps']}-step loss"
    if len(steps) == len(figures["steps_to_adamw_loss"]):
        reach = f"reached {target} by step {max(steps):g}"
    else:
        reach = f"did not reach {target}" + (" on every task" if steps else "")
    verdict = "" if beats(figures, BACKPROP_FIGURES["adamw"]) else "no better than AdamW on loss or step time, "
    return (
        f"{loss} at equal steps and {wall} at equal wall-clock, {figures['step_time_vs_adamw']:.2f}x its step "
        f"time; {reach}; {verdict}{figures['state_vs_adamw']:.2f}x its optimizer state "
        f"({', '.join(figures['tasks'])}; {SOURCE})"
    )


def zeroth_order_clause(optimizer: str) -> str | None:
    """What was measured for a forward-only optimizer against the other forward-only ones, or None."""
    tasks: dict[str, dict[str, Any]] | None = measured_convergence.ZEROTH_ORDER.get(optimizer)
    if not tasks:
        return None
    parts = []
    for task, figures in tasks.items():
        others = {
            other: measured[task]
            for other, measured in measured_convergence.ZEROTH_ORDER.items()
            if other != optimizer and task in measured
        }
        against = ", ".join(f"{o} {f['loss']:.3f} in {f['seconds']:.0f} s" for o, f in sorted(others.items()))
        accuracy = f", accuracy {figures['accuracy']:.3f}" if math.isfinite(figures["accuracy"]) else ""
        parts.append(
            f"{task}: held-out loss {figures['loss']:.3f}{accuracy} after {figures['forwards']} forward passes in "
            f"{figures['seconds']:.0f} s" + (f" (vs {against})" if against else "")
        )
    return _zeroth_order_verdict(optimizer) + "; ".join(parts) + f" ({SOURCE})"


def _loss_words(delta: float) -> str:
    if abs(delta) < SAME_LOSS:
        return f"the same held-out loss as AdamW ({delta:+.3f})"
    return f"held-out loss {delta:+.3f} vs AdamW"
