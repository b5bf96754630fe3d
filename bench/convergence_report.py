"""The summary and the markdown of bench/convergence.py, computed from the stored runs only (pure functions).

Per task and optimizer (a variant counts as its own optimizer): the best learning rate is the one with the lowest mean
final held-out loss over seeds, and it is "interior" when the grid has a lower and a higher rate. Each optimizer at
its best rate is then compared with AdamW at its best rate: step time (median step seconds at the best rate), held-out
loss at AdamW's training seconds (each seed's curve interpolated on training seconds) and the first evaluation at
which the mean curve reaches AdamW's final loss. Zeroth-order runs are also compared at equal forward passes.
"""

import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

Point = tuple[float, float]
FRACTIONS = (0.2, 0.4, 0.6, 1.0)  # of a run's length, the columns of the per-rate tables (step 20/40/60/100)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def value_at(points: list[Point], x: float) -> float:
    """y at x, linear between the points (sorted by x); the first y before them, the last one after them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def best_lr(final_loss: dict[float, float]) -> tuple[float, bool]:
    """The learning rate with the lowest mean final loss (NaN, a diverged run, counts as the worst).

    Returns:
        The rate and whether it is interior to the grid (a lower and a higher rate were run).
    """
    lrs = sorted(final_loss)
    best = min(lrs, key=lambda lr: math.inf if math.isnan(final_loss[lr]) else final_loss[lr])
    return best, lrs[0] < best < lrs[-1]


def first_reaching(points: list[Point], target: float) -> float | None:
    """The first x whose y is at or below ``target`` (None: never)."""
    return next((x for x, y in points if y <= target), None)


def mean_curve(runs: list[dict[str, Any]], x: str, y: str = "loss") -> list[tuple[float, float, float]]:
    """(x, mean y, std y) over the runs (seeds) at the x values that every run evaluated."""
    common = set.intersection(*({p[x] for p in run["curve"]} for run in runs))
    rows = []
    for value in sorted(common):
        ys = [next(p[y] for p in run["curve"] if p[x] == value) for run in runs]
        rows.append((value, *mean_std(ys)))
    return rows


def label(run: dict[str, Any]) -> str:
    return run["optimizer"] if run["variant"] == "default" else f"{run['optimizer']}/{run['variant']}"


def grouped(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[float, list[dict[str, Any]]]]]:
    """task -> optimizer label -> lr -> runs (one per seed); AdamW first, then backprop, then zeroth-order."""
    groups: dict[str, dict[str, dict[float, list[dict[str, Any]]]]] = {}
    order = sorted(runs.values(), key=lambda r: (label(r) != "adamw", r["kind"] == "zeroth-order", label(r), r["seed"]))
    for run in order:
        groups.setdefault(run["task"], {}).setdefault(label(run), {}).setdefault(run["lr"], []).append(run)
    return groups


def axis(run: dict[str, Any]) -> str:
    return "forwards" if run["kind"] == "zeroth-order" else "step"


def optimizer_summary(by_lr: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    """One optimizer's best rate and its figures there."""
    finals = {lr: mean_std([r["curve"][-1]["loss"] for r in runs])[0] for lr, runs in by_lr.items()}
    lr, interior = best_lr(finals)
    runs = by_lr[lr]
    entry = {
        "optimizer": runs[0]["optimizer"],
        "variant": runs[0]["variant"],
        "kind": runs[0]["kind"],
        "lrs": sorted(by_lr),
        "final_loss_by_lr": {f"{rate:g}": finals[rate] for rate in sorted(by_lr)},  # mean over each rate's seeds
        "best_lr": lr,
        "interior": interior,
        "seeds": sorted(r["seed"] for r in runs),
        "steps": runs[0]["steps"],
        "forwards": runs[0]["forwards"],
        "forwards_per_step": runs[0]["forwards_per_step"],
        # The best rate's runs only: those are the ones rerun side by side (interleaved in one command) with the other
        # optimizers' best, while the other rates' runs may come from hours apart on a machine whose speed drifts.
        "median_step_s": statistics.median(r["median_step_s"] for r in runs),
        "train_s_mean": statistics.fmean(r["train_s"] for r in runs),
        "state_bytes": runs[0]["state_bytes"],
    }
    entry["final_loss_mean"], entry["final_loss_std"] = mean_std([r["curve"][-1]["loss"] for r in runs])
    if "accuracy" in runs[0]["curve"][-1]:
        entry["final_accuracy_mean"], entry["final_accuracy_std"] = mean_std([r["curve"][-1]["accuracy"] for r in runs])
    return entry


def side_by_side(mine: list[dict[str, Any]], adamw: list[dict[str, Any]]) -> list[float]:
    """Step-time ratios to AdamW of the runs made in one command with an AdamW run of the same seed (interleaved, so
    both saw the same machine), at any rates: a step's work does not depend on the rate."""
    pairs = {(r["command"], r["seed"]): r["median_step_s"] for r in adamw}
    return [r["median_step_s"] / pairs[key] for r in mine if (key := (r["command"], r["seed"])) in pairs]


def against_adamw(
    entry: dict[str, Any], runs: list[dict[str, Any]], adamw: dict[str, Any], paired: list[float] | None = None
) -> None:
    """Add the comparisons with AdamW at its best rate to ``entry`` (the optimizer at its best rate).

    The step-time ratio is the median of ``paired``, the side-by-side ratios, when there are some: this shared
    machine's speed drifts by up to 1.7x over hours, more than the optimizers differ. Else it is the best rates'
    median step times over each other (``step_time_pairs`` 0).
    """
    seconds, target = adamw["train_s_mean"], adamw["final_loss_mean"]
    entry["step_time_ratio_vs_adamw"] = (
        statistics.median(paired) if paired else entry["median_step_s"] / adamw["median_step_s"]
    )
    entry["step_time_pairs"] = len(paired or [])
    for key in ("loss", "accuracy") if "accuracy" in runs[0]["curve"][0] else ("loss",):
        at = [value_at([(p["train_s"], p[key]) for p in r["curve"]], seconds) for r in runs]
        entry[f"{key}_at_adamw_seconds_mean"], entry[f"{key}_at_adamw_seconds_std"] = mean_std(at)
    entry["ended_before_adamw_seconds"] = any(r["train_s"] < seconds for r in runs)
    x = axis(runs[0])
    reached = first_reaching([(v, m) for v, m, _ in mean_curve(runs, x)], target)
    entry["steps_to_adamw_best" if x == "step" else "forwards_to_adamw_best"] = reached


def at_forwards(runs: list[dict[str, Any]], budget: int) -> dict[str, dict[str, float]]:
    """Loss (and accuracy) at a quarter, half and all of the forward budget, interpolated per seed."""
    table = {}
    for forwards in (budget // 4, budget // 2, budget):
        row = {}
        for key in ("loss", "accuracy") if "accuracy" in runs[0]["curve"][0] else ("loss",):
            values = [value_at([(p["forwards"], p[key]) for p in r["curve"]], forwards) for r in runs]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        table[str(forwards)] = row
    return table


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and optimizer: best rate, final figures, and the comparisons with AdamW (the planner quotes these)."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for task, optimizers in grouped(results.get("runs", {})).items():
        entries = {name: optimizer_summary(by_lr) for name, by_lr in optimizers.items()}
        adamw = entries.get("adamw")
        for name, entry in entries.items():
            runs = optimizers[name][entry["best_lr"]]
            if adamw is not None:
                every = [run for by_rate in optimizers[name].values() for run in by_rate]
                paired = side_by_side(every, [run for by_rate in optimizers["adamw"].values() for run in by_rate])
                against_adamw(entry, runs, adamw, paired)
            if entry["kind"] == "zeroth-order":
                entry["at_forwards"] = at_forwards(runs, runs[0]["forward_budget"])
        summary[task] = entries
    return summary


def render(results: dict[str, Any]) -> str:
    """The markdown report: how the runs were made, then per task a summary and a table per optimizer and rate."""
    runs, summary = results.get("runs", {}), results.get("summary") or summarize(results)
    lines = ["# Convergence benchmark: held-out loss per optimizer and learning rate", "", *provenance(runs), ""]
    for task, optimizers in grouped(runs).items():
        facts = results.get("tasks", {}).get(task, {})
        sizes = (
            f"{facts.get('n_train', '?')} training / {facts.get('n_held_out', '?')} held-out {facts.get('unit', '')}"
        )
        lines += [f"## {task}: {facts.get('source', '')}", "", f"{sizes}, seq_len {facts.get('seq_len', 'n/a')}.", ""]
        lines += summary_tables(summary.get(task, {}))
        lines += rate_table(optimizers, summary.get(task, {}))
    return "\n".join(lines) + "\n"


def provenance(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Commands and dates that made the stored runs, the machine, torch, threads and the load they ran under."""
    if not runs:
        return ["No runs stored yet: `python bench/convergence.py --plan` lists them."]
    values = list(runs.values())
    commands = sorted({f"`{r['command']}` ({r['date'][:10]})" for r in values})
    loads = [r["load_average"]["start"][0] for r in values] + [r["load_average"]["end"][0] for r in values]
    first = values[0]
    return [
        f"Runs: {len(values)}, made {min(r['date'] for r in values)} to {max(r['date'] for r in values)} by  ",
        *[f"- {c}" for c in commands],
        "",
        f"Machine: {', '.join(sorted({r['machine'] for r in values}))}; torch {first['torch']}; intra-op threads "
        f"{sorted({r['threads'] for r in values})}; 1-minute load average {min(loads):.2f} to {max(loads):.2f}.  ",
        f"Model: {', '.join(sorted({r['model'] for r in values}))} (fp32 base) with LoRA r=8, alpha 16 on q, k, v, o, "
        f"gate, up, down; constant lr (the variants linear and cosine: edgetune train's decay to 0), batch "
        f"{first['batch_size']}; mean ± std over seeds. Training seconds exclude "
        "evaluations.",
    ]


def cell(mean: float, std: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_tables(entries: dict[str, dict[str, Any]]) -> list[str]:
    """Each optimizer at its best rate against AdamW at its best; zeroth-order ones also at equal forwards."""
    adamw = entries.get("adamw")
    seconds = f"{adamw['train_s_mean']:.3g} s" if adamw else "n/a (no AdamW runs)"
    target = f"{adamw['final_loss_mean']:.3f}" if adamw else "n/a"
    lines = [
        f"Each optimizer at its best rate against AdamW at its best: AdamW trained for {seconds} (mean over seeds) "
        f"to a final held-out loss of {target}. Loss (accuracy) at {seconds} is interpolated per seed on training "
        "seconds; a run that ended earlier gives its final value. x AdamW: the median step-time ratio of the runs made "
        "side by side with an AdamW run (same command and seed, interleaved; how many in brackets), or of the best "
        "rates' runs made apart, on a machine whose speed drifts by up to 1.7x over hours.",
        "",
        "| optimizer | best lr | interior | steps | final loss | final accuracy | step s | x AdamW "
        f"| loss at {seconds} | reaches {target} at | state MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in entries.items():
        accuracy = cell(e["final_accuracy_mean"], e["final_accuracy_std"]) if "final_accuracy_mean" in e else ""
        ratio = f"{e['step_time_ratio_vs_adamw']:.2f}" if "step_time_ratio_vs_adamw" in e else "n/a"
        if name != "adamw" and "step_time_pairs" in e:
            ratio += f" ({e['step_time_pairs']})" if e["step_time_pairs"] else " (apart)"
        at = cell(e["loss_at_adamw_seconds_mean"], e["loss_at_adamw_seconds_std"]) if adamw else "n/a"
        at += f" ({e['accuracy_at_adamw_seconds_mean']:.3f})" if "accuracy_at_adamw_seconds_mean" in e else ""
        at += " (ended earlier)" if e.get("ended_before_adamw_seconds") else ""
        unit = "step" if e["kind"] == "backprop" else "forwards"
        reached = e.get("steps_to_adamw_best", e.get("forwards_to_adamw_best"))
        reached = "n/a" if not adamw else "not reached" if reached is None else f"{unit} {reached:g}"
        lines.append(
            f"| {name} | {e['best_lr']:g} | {'yes' if e['interior'] else '**no**'} | {e['steps']} "
            f"| {cell(e['final_loss_mean'], e['final_loss_std'])} | {accuracy} | {e['median_step_s']:.2f} | {ratio} "
            f"| {at} | {reached} | {e['state_bytes'] / 2**20:.1f} |"
        )
    return lines + ["", *forward_table(entries)]


def forward_table(entries: dict[str, dict[str, Any]]) -> list[str]:
    """Zeroth-order optimizers at equal forward passes (interpolated per seed)."""
    zo = {name: e for name, e in entries.items() if e["kind"] == "zeroth-order"}
    if not zo:
        return []
    budgets = list(next(iter(zo.values()))["at_forwards"])
    lines = [
        "Zeroth-order optimizers at equal forward passes: held-out loss (accuracy).",
        "",
        "| optimizer | best lr | forwards a step | " + " | ".join(f"{b} forwards" for b in budgets) + " |",
        "|---|---|---|" + "---|" * len(budgets),
    ]
    for name, e in zo.items():
        cells = []
        for row in e["at_forwards"].values():
            accuracy = f" ({row['accuracy_mean']:.3f})" if "accuracy_mean" in row else ""
            cells.append(cell(row["loss_mean"], row["loss_std"]) + accuracy)
        lines.append(f"| {name} | {e['best_lr']:g} | {e['forwards_per_step']:g} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def rate_table(optimizers: dict[str, dict[float, list[dict[str, Any]]]], entries: dict[str, Any]) -> list[str]:
    """Held-out loss at a fifth, two fifths, three fifths and all of each run, per optimizer and rate."""
    lines = [
        "Per optimizer and rate: held-out loss at the start and at 20/40/60/100 % of the run (steps, or forwards for "
        "zeroth-order); * marks the best rate.",
        "",
        "| optimizer | lr | seeds | at | start | 20 % | 40 % | 60 % | 100 % | final accuracy | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_lr in optimizers.items():
        for lr in sorted(by_lr):
            lines.append(rate_row(name, lr, by_lr[lr], entries.get(name, {}).get("best_lr") == lr))
    return [*lines, ""]


def rate_row(name: str, lr: float, runs: list[dict[str, Any]], best: bool) -> str:
    """One optimizer and rate: mean curve at the start and at FRACTIONS of the run, final accuracy, step time."""
    x = axis(runs[0])
    curve = mean_curve(runs, x)
    marks = [curve[0]] + [min(curve, key=lambda p, f=f: abs(p[0] - f * curve[-1][0])) for f in FRACTIONS]
    has_accuracy = "accuracy" in runs[0]["curve"][0]
    accuracy = cell(*mean_std([r["curve"][-1]["accuracy"] for r in runs])) if has_accuracy else ""
    where = f"{x} " + ", ".join(f"{p[0]:g}" for p in marks[1:])
    losses = " | ".join(cell(m, s) for _, m, s in marks)
    step_s = statistics.median(r["median_step_s"] for r in runs)
    # Runs stored by commands with other --steps or --forwards share a key space; the means then mix lengths.
    seeds = f"{len(runs)}" + (" (runs of different lengths)" if len({r["forwards"] for r in runs}) > 1 else "")
    return f"| {name} | {lr:g}{'*' if best else ''} | {seeds} | {where} | {losses} | {accuracy} | {step_s:.2f} |"


def machine() -> str:
    """OS, architecture, cores and CPU model."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({model or platform.processor()})"
