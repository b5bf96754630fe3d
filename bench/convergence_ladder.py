"""The planner's evidence from the convergence benchmark: the figures each ladder rung's reason quotes (pure).

``python bench/convergence.py --ladder`` writes them to edgetune/plan/measured_convergence.py from the committed
summary, and tests/plan/test_ladder_evidence.py fails when that module and bench/results/convergence.json disagree,
so the ladder's reasons cannot drift from the table they cite.

Per backprop optimizer (the default variant, at its best rate on each task it shares with AdamW): the mean over those
tasks of its final held-out loss minus AdamW's (both at their best rates, equal steps), of its loss at AdamW's
training seconds minus AdamW's final loss (equal wall-clock), of its median step time and its optimizer state over
AdamW's, the step at which its mean curve first reached AdamW's final loss on each task, and ``lr``, the one rate
for every task (``default_lr``), which the ladder's strategies train with by default. Per zeroth-order
optimizer (the default variant at its best rate, on the tasks it ran): final held-out loss and accuracy at its
forward budget, and its training seconds.
"""

import math
import pprint
import statistics
from typing import Any

MODULE_HEADER = '''"""Figures measured by bench/convergence.py (``python bench/convergence.py --ladder``; do not edit).

Source: bench/results/convergence.json (the table: bench/results/convergence.md), {runs} runs, last written {date}.
Backprop: per optimizer, means over the tasks it shares with AdamW, each at its best rate (default variant); ``lr``
is the rate least above each task's best loss (relatively, on average) of those run on all of them: the default rate.
Zeroth-order: per optimizer, its best rate's final held-out figures at the forward budget on each task it ran.
tests/plan/test_ladder_evidence.py checks that these equal what the committed results give.
"""

'''


def _default(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: entry for name, entry in entries.items() if entry["variant"] == "default"}


def backprop_figures(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per backprop optimizer, its figures against AdamW averaged over the tasks both ran (rounded for quoting)."""
    rows: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    for task, entries in sorted(summary.items()):
        adamw = entries.get("adamw")
        for entry in _default(entries).values():
            if adamw is not None and entry["kind"] == "backprop":
                rows.setdefault(entry["optimizer"], []).append((task, entry, adamw))
    figures = {}
    for name, seen in sorted(rows.items()):
        figures[name] = {
            "tasks": tuple(task for task, _, _ in seen),
            "loss_vs_adamw": round(
                statistics.fmean(e["final_loss_mean"] - a["final_loss_mean"] for _, e, a in seen), 4
            ),
            "wall_loss_vs_adamw": round(
                statistics.fmean(e["loss_at_adamw_seconds_mean"] - a["final_loss_mean"] for _, e, a in seen), 4
            ),
            "step_time_vs_adamw": round(statistics.fmean(e["step_time_ratio_vs_adamw"] for _, e, _ in seen), 3),
            "state_vs_adamw": round(statistics.fmean(e["state_bytes"] / a["state_bytes"] for _, e, a in seen), 3),
            "steps_to_adamw_loss": tuple(e.get("steps_to_adamw_best") for _, e, _ in seen),
            "steps": seen[0][1]["steps"],
            "lr": default_lr([e for _, e, _ in seen]),
        }
    return figures


def default_lr(entries: list[dict[str, Any]]) -> float | None:
    """The one rate to train every task with: of the rates run on all of ``entries``' tasks, the one whose mean final
    loss is the least above each task's best, relatively, on average (None when no rate was run on every task).

    Each task's best rate differs (a short verbalizer task wants a lower one than running text), so a default is a
    compromise. The regret is relative (loss over the task's best, minus 1) because the tasks' losses differ in
    scale (about 3.2 on text, 0.4 on sentiment): in absolute terms the task with the larger loss would decide alone.
    A rate that diverged on some task (NaN) is out.
    """
    shared = set.intersection(*(set(e["final_loss_by_lr"]) for e in entries))
    regrets = {
        rate: statistics.fmean(e["final_loss_by_lr"][rate] / e["final_loss_mean"] - 1 for e in entries)
        for rate in shared
        if all(math.isfinite(e["final_loss_by_lr"][rate]) for e in entries)
    }
    # sorted: on a tie, the lower rate (the safer one)
    return float(min(sorted(regrets, key=float), key=regrets.__getitem__)) if regrets else None


def zeroth_order_figures(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per zeroth-order optimizer and task: best rate, final held-out loss and accuracy, forwards, training seconds."""
    figures: dict[str, dict[str, Any]] = {}
    for task, entries in sorted(summary.items()):
        for entry in _default(entries).values():
            if entry["kind"] != "zeroth-order":
                continue
            figures.setdefault(entry["optimizer"], {})[task] = {
                "lr": entry["best_lr"],
                "forwards": entry["forwards"],
                "loss": round(entry["final_loss_mean"], 4),
                "accuracy": round(entry.get("final_accuracy_mean", float("nan")), 4),
                "seconds": round(entry["train_s_mean"], 1),
                "seeds": len(entry["seeds"]),
            }
    return figures


def module_source(results: dict[str, Any], date: str) -> str:
    """The Python source of edgetune/plan/measured_convergence.py for these results."""
    summary = results.get("summary", {})
    header = MODULE_HEADER.format(runs=len(results.get("runs", {})), date=date)
    backprop, zeroth = backprop_figures(summary), zeroth_order_figures(summary)
    return (
        header
        + "from typing import Any\n\n"
        + f"BACKPROP: dict[str, dict[str, Any]] = {pprint.pformat(backprop, width=110, sort_dicts=True)}\n"
        + f"ZEROTH_ORDER: dict[str, dict[str, dict[str, Any]]] = {pprint.pformat(zeroth, width=110, sort_dicts=True)}\n"
    )
