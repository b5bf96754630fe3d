"""The ladder's reasons quote the convergence benchmark, and the quoted figures are the committed ones."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from edgetune.plan import decide, ladder_evidence, measured_convergence

ROOT = Path(__file__).resolve().parents[2]


def bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_the_quoted_figures_are_the_committed_benchmark_results():
    """measured_convergence.py must equal what bench/convergence.py --ladder writes from the committed JSON."""
    ladder = bench_module("convergence_ladder")
    path = ROOT / "bench" / "results" / "convergence.json"
    summary = json.loads(path.read_text())["summary"] if path.exists() else {}
    assert measured_convergence.BACKPROP == ladder.backprop_figures(summary), "rerun bench/convergence.py --ladder"
    zeroth = ladder.zeroth_order_figures(summary)
    assert json.dumps(measured_convergence.ZEROTH_ORDER, sort_keys=True) == json.dumps(zeroth, sort_keys=True)


def figures(loss, wall, step_time, steps=(40, 60)):
    return {
        "tasks": ("sentiment", "text"),
        "loss_vs_adamw": loss,
        "wall_loss_vs_adamw": wall,
        "step_time_vs_adamw": step_time,
        "state_vs_adamw": 0.5,
        "steps_to_adamw_loss": steps,
        "steps": 100,
    }


def test_backprop_clause_says_what_was_measured(monkeypatch):
    table = {
        "adamw": figures(0.0, 0.0, 1.0),
        "adafish": figures(0.004, 0.02, 1.12, (100, None)),
        "scaled-adamw": figures(-0.05, -0.04, 0.9),
    }
    monkeypatch.setattr(ladder_evidence, "BACKPROP_FIGURES", table)
    adafish = ladder_evidence.backprop_clause("adafish")
    assert "no better than AdamW on loss or step time, 0.50x its optimizer state" in adafish
    assert "the same held-out loss as AdamW (+0.004) at equal steps" in adafish
    assert "held-out loss +0.020 vs AdamW at equal wall-clock, 1.12x its step time" in adafish
    assert "did not reach AdamW's 100-step loss on every task" in adafish and "convergence.md" in adafish
    table["adafish"] = figures(0.004, 0.02, 1.12, (None, None))
    assert "did not reach AdamW's 100-step loss;" in ladder_evidence.backprop_clause("adafish")
    scaled = ladder_evidence.backprop_clause("scaled_adamw")
    assert "held-out loss -0.050 vs AdamW" in scaled and "reached AdamW's 100-step loss by step 60" in scaled
    assert "no better" not in scaled
    assert ladder_evidence.backprop_clause("sgd") is None
    assert ladder_evidence.beats(table["scaled-adamw"], table["adafish"])
    assert not ladder_evidence.beats(table["adafish"], table["scaled-adamw"])


def test_the_plan_says_when_a_rung_is_no_better_than_the_next(monkeypatch):
    table = {
        "adamw": figures(0.0, 0.0, 1.0),
        "adafish": figures(0.004, 0.02, 1.12),
        "scaled-adamw": figures(-0.05, -0.04, 0.9),
    }
    monkeypatch.setattr(ladder_evidence, "BACKPROP_FIGURES", table)
    reason = decide.ladder_reason("adafish-lora-gc", {"adafish-lora": None})
    assert reason.startswith("the first rung of the ladder that fits (adafish-lora would not); measured: ")
    assert reason.endswith("measured no better than scaled-adamw-qlora-gc's optimizer on held-out loss or step time")
    assert "\n" not in reason
    monkeypatch.setattr(ladder_evidence, "BACKPROP_FIGURES", {**table, "adafish": figures(-0.1, -0.1, 1.0)})
    assert "no better" not in decide.ladder_reason("adafish-lora-gc", {})
    assert "without its recomputation" in decide.ladder_reason("adafish-lora", {})


def test_the_forward_only_rung_is_the_measured_best(monkeypatch):
    def zo(loss, seconds=60.0, forwards=1000):
        figures = {"lr": 1e-3, "forwards": forwards, "loss": loss, "accuracy": 0.7, "seconds": seconds, "seeds": 1}
        return {"sentiment": figures}

    monkeypatch.setattr(measured_convergence, "ZEROTH_ORDER", {"mezo": zo(0.66), "hizoo": zo(0.69), "fzoo": zo(0.6)})
    assert ladder_evidence.best_zeroth_order() == "fzoo"
    clause = ladder_evidence.zeroth_order_clause("fzoo")
    assert clause.startswith("the lowest held-out loss at equal forward passes; sentiment: ")
    assert (
        "held-out loss 0.600, accuracy 0.700 after 1000 forward passes in 60 s (vs hizoo 0.690 in 60 s, mezo 0.660 "
        "in 60 s)" in clause
    )
    assert not ladder_evidence.zeroth_order_clause("mezo").startswith("the lowest")  # not the best: no verdict
    # Within SAME_LOSS the losses tie, and the fewer seconds per forward pass wins (999 forwards in 72 s is slower
    # per forward than 1000 in 60 s).
    tie = {"mezo": zo(0.593, 60.0), "fzoo": zo(0.586, 72.0, 999), "hizoo": zo(0.629, 50.0)}
    monkeypatch.setattr(measured_convergence, "ZEROTH_ORDER", tie)
    assert ladder_evidence.best_zeroth_order() == "mezo"
    clause = ladder_evidence.zeroth_order_clause("mezo")
    assert clause.startswith("the same held-out loss as fzoo at equal forward passes (within 0.01) in 0.83x the time")
    monkeypatch.setattr(measured_convergence, "ZEROTH_ORDER", {"mezo": zo(0.5)})
    assert ladder_evidence.best_zeroth_order() == "hizoo"  # one optimizer alone is no comparison: the default
    monkeypatch.setattr(measured_convergence, "ZEROTH_ORDER", {"mezo": zo(math.nan), "fzoo": zo(0.7)})
    assert ladder_evidence.best_zeroth_order() == "hizoo"  # a diverged run is not a measurement


@pytest.mark.parametrize("name", ["adafish-lora", "scaled-adamw-qlora-gc"])
def test_every_backprop_rung_quotes_its_measurement_when_there_is_one(name):
    optimizer = decide.STRATEGIES[name].optimizer
    reason = decide.ladder_reason(name, {})
    has = ladder_evidence.bench_name(optimizer) in measured_convergence.BACKPROP
    assert ("measured: " in reason) == has


def test_one_default_rate_for_all_tasks_is_the_least_relative_regret():
    ladder = bench_module("convergence_ladder")

    def entry(losses):
        finite = {rate: loss for rate, loss in losses.items() if math.isfinite(loss)}
        return {"final_loss_by_lr": losses, "final_loss_mean": min(finite.values())}

    text = entry({"0.0003": 3.30, "0.001": 3.20, "0.003": 3.31})
    sentiment = entry({"0.0001": 0.45, "0.0003": 0.40, "0.001": 0.46})
    # Relative regret: 3e-4 is 3.1 % above text's best and 0 on sentiment (mean 1.6 %); 1e-3 is 0 and 15 % (7.5 %).
    # In absolute terms 1e-3 would win (0.03 vs 0.05): the text's larger losses would decide alone.
    assert ladder.default_lr([text, sentiment]) == 3e-4
    assert ladder.default_lr([text]) == 1e-3
    assert ladder.default_lr([text, entry({"0.01": 0.5})]) is None  # no rate was run on both tasks
    diverged = entry({"0.0003": math.nan, "0.001": 0.5})
    assert ladder.default_lr([text, diverged]) == 1e-3  # a rate that diverged anywhere is out
    assert ladder.default_lr([entry({"0.001": 1.0, "0.0003": 1.0})]) == 3e-4  # a tie: the lower rate


def test_the_strategies_train_at_the_measured_rates(monkeypatch):
    zo = {"lr": 1e-5, "forwards": 999, "loss": 0.5, "accuracy": 0.7, "seconds": 60.0, "seeds": 3}
    monkeypatch.setattr(measured_convergence, "BACKPROP", {"adafish": {"lr": 3e-4}, "adamw": {"lr": None}})
    monkeypatch.setattr(
        measured_convergence, "ZEROTH_ORDER", {"fzoo": {"sentiment": zo}, "mezo": {"a": zo, "b": {**zo, "lr": 3e-4}}}
    )
    assert ladder_evidence.measured_lr("adafish", fallback=1.0) == 3e-4
    assert ladder_evidence.measured_lr("adamw", fallback=1.0) == 1.0  # no rate was run on all its tasks
    assert ladder_evidence.measured_lr("scaled_adamw", fallback=2.0) == 2.0  # not measured
    assert ladder_evidence.measured_lr("fzoo", fallback=1.0) == 1e-5
    assert ladder_evidence.measured_lr("mezo", fallback=1.0) == 1.0  # its tasks disagree
    # The committed figures are what the ladder's LoRA strategies default to.
    monkeypatch.undo()
    for name in decide.LADDER:
        strategy = decide.STRATEGIES[name]
        measured = ladder_evidence.measured_lr(strategy.optimizer, fallback=math.nan)
        assert math.isnan(measured) or strategy.default_lr == measured
