"""bench/convergence.py: runs stored and merged per key, the markdown, the best-rate logic and ZO forward accounting.

Everything runs on the tiny random-weight Llama of conftest.py with fake instruction and sentiment data, so no
network and no SmolLM2 cache is needed.
"""

import bz2
import importlib.machinery
import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "convergence.py"
PAIRS = [(f"What is {w}?", f"{w} is a word I know, thank you.") for w in "fox dog world hello lazy quick brown".split()]
REVIEWS = ["the quick brown fox", "hello world how are you", "I am fine thank you", "the lazy dog jumps"]


@pytest.fixture
def bench(monkeypatch, tmp_path, one_thread):
    """The script's module, with fake chatterbot pairs and reviews, and verbalizers the tiny tokenizer has."""
    spec = importlib.util.spec_from_file_location("convergence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = "category,text\n" + "".join(f"{('fresh', 'rotten')[i % 2]},{REVIEWS[i % 4]} {i}\n" for i in range(40))
    corpus = tmp_path / "reviews.csv.bz2"
    corpus.write_bytes(bz2.compress(rows.encode()))
    monkeypatch.setattr(module.tasks.sentiment, "corpus_path", lambda: corpus)
    monkeypatch.setattr(module.tasks.sentiment, "VERBALIZERS", (" a", " you"))  # one token each for this tokenizer
    monkeypatch.setattr(module.tasks, "SENTIMENT_TRAIN", 24)
    monkeypatch.setattr(module.tasks, "chatterbot_pairs", lambda: PAIRS)
    return module


def run(bench, tiny_trainable_dir, out, *args):
    common = ["--model", str(tiny_trainable_dir), "--out", str(out), "--held-out", "3", "--seeds", "0"]
    assert bench.main([*common, *args]) == 0
    return json.loads((out / "convergence.json").read_text())


def test_runs_are_stored_per_key_merged_on_rerun_and_reported(bench, tiny_trainable_dir, tmp_path):
    out = tmp_path / "results"
    argv = ["--optimizer", "adamw,adafish", "--variant", "identity,per-sample", "--lrs", "1e-2", "--steps", "2"]
    results = run(bench, tiny_trainable_dir, out, *argv, "--eval-every", "1")
    names = ("adamw/default", "adafish/identity", "adafish/per-sample")
    keys = {f"{t}/{o}/0.01/0" for t in ("text", "instruct", "sentiment") for o in names}
    assert set(results["runs"]) == keys
    text = results["runs"]["text/adamw/default/0.01/0"]
    assert [p["step"] for p in text["curve"]] == [0, 1, 2] and text["steps"] == 2 and len(text["train_loss"]) == 2
    assert 0 < text["curve"][1]["train_s"] < text["curve"][2]["train_s"] == pytest.approx(text["train_s"])
    assert "accuracy" in results["runs"]["sentiment/adamw/default/0.01/0"]["curve"][-1]
    assert results["runs"]["instruct/adafish/identity/0.01/0"]["options"] == {"fisher": "identity"}
    assert results["runs"]["instruct/adafish/per-sample/0.01/0"]["options"] == {"fisher": "per_sample"}
    assert results["summary"]["text"]["adafish/identity"]["step_time_ratio_vs_adamw"] > 0

    # A rerun of one task, optimizer and rate replaces just that run and adds the new rate.
    for record in results["runs"].values():
        record["marker"] = "old"
    (out / "convergence.json").write_text(json.dumps(results))
    rerun = ["--task", "text", "--optimizer", "adamw", "--lrs", "1e-2,1e-3", "--steps", "1", "--eval-every", "1"]
    results = run(bench, tiny_trainable_dir, out, *rerun)
    assert set(results["runs"]) == keys | {"text/adamw/default/0.001/0"}
    assert "marker" not in results["runs"]["text/adamw/default/0.01/0"]
    assert all(r.get("marker") == "old" for k, r in results["runs"].items() if not k.startswith("text/adamw"))

    (out / "convergence.md").unlink()
    assert bench.main(["--report", "--out", str(out)]) == 0
    markdown = (out / "convergence.md").read_text()
    for heading in ("## text:", "## instruct:", "## sentiment:"):
        assert heading in markdown
    assert "| adafish/identity | 0.01* | 1 |" in markdown and "--task text --optimizer adamw" in markdown


def test_zeroth_order_runs_spend_their_forward_budget(bench, tiny_trainable_dir, tmp_path):
    argv = ["--task", "sentiment", "--optimizer", "mezo,hizoo,fzoo", "--lrs", "1e-3", "--forwards", "20"]
    results = run(bench, tiny_trainable_dir, tmp_path, *argv, "--zo-eval-every", "5")
    expected = {"mezo": (10, 20, 2), "hizoo": (6, 18, 3), "fzoo": (2, 18, 9)}  # steps, forwards, forwards a step
    for name, (steps, forwards, per_step) in expected.items():
        record = results["runs"][f"sentiment/{name}/default/0.001/0"]
        assert (record["steps"], record["forwards"], record["forwards_per_step"]) == (steps, forwards, per_step)
        assert record["kind"] == "zeroth-order" and record["forward_budget"] == 20
    mezo = results["runs"]["sentiment/mezo/default/0.001/0"]["curve"]
    assert [p["forwards"] for p in mezo] == [0, 6, 10, 16, 20]  # each time another 5 forwards have passed
    assert [p["step"] for p in mezo] == [0, 3, 5, 8, 10]
    assert set(results["summary"]["sentiment"]["hizoo"]["at_forwards"]) == {"5", "10", "20"}


def test_schedule_variants_decay_any_optimizer_by_edgetunes_own_schedule(bench, tiny_trainable_dir, tmp_path):
    argv = ["--task", "sentiment", "--optimizer", "adamw,mezo", "--variant", "linear", "--lrs", "1e-3"]
    results = run(bench, tiny_trainable_dir, tmp_path, *argv, "--steps", "2", "--forwards", "8")
    assert set(results["runs"]) == {"sentiment/adamw/linear/0.001/0", "sentiment/mezo/linear/0.001/0"}
    for record in results["runs"].values():
        assert record["schedule"] == "linear" and record["options"] == {} and record["lr"] == 1e-3
        assert record["last_lr"] == 0.0  # linear decay reaches 0 at the run's last step
    assert set(results["summary"]["sentiment"]) == {"adamw/linear", "mezo/linear"}

    constant = run(
        bench,
        tiny_trainable_dir,
        tmp_path,
        "--task",
        "sentiment",
        "--optimizer",
        "mezo",
        "--lrs",
        "1e-3",
        "--forwards",
        "4",
    )
    record = constant["runs"]["sentiment/mezo/default/0.001/0"]
    assert record["schedule"] == "constant" and record["last_lr"] == 1e-3
    assert bench.main(["--plan", "--optimizer", "adamw", "--variant", "cosine", "--out", str(tmp_path)]) == 0


def test_unknown_variants_are_refused_and_plan_runs_nothing(bench, tmp_path, capsys):
    assert "fzoo" in bench.default_optimizers("sentiment") and "mezo" in bench.default_optimizers("sentiment")
    assert "mezo" not in bench.default_optimizers("text")
    assert bench.main(["--plan", "--optimizer", "adamw", "--variant", "identity", "--out", str(tmp_path)]) == 2
    assert "no selected optimizer has the variant(s) ['identity']" in capsys.readouterr().err

    assert bench.main(["--plan", "--task", "text", "--optimizer", "adamw,adafish", "--out", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    # Interleaved: AdamW and AdaFish alternate, seed by seed, three rates each.
    assert [line.split()[0] for line in plan[:4]] == [
        "text/adamw/default/0.0003/0",
        "text/adafish/default/0.001/0",
        "text/adamw/default/0.001/0",
        "text/adafish/default/0.003/0",
    ]
    assert sum("/" in line.split()[0] for line in plan if line.strip()) == 18
    assert not (tmp_path / "convergence.json").exists()


def fake_run(optimizer, lr, losses, seconds, seed=0, step_s=1.0):
    """A stored backprop run whose held-out curve is ``losses`` at steps 0, 10, 20, ... and ``seconds``."""
    curve = [
        {"step": 10 * i, "forwards": 10 * i, "train_s": s, "loss": v}
        for i, (v, s) in enumerate(zip(losses, seconds, strict=True))
    ]
    return {
        "task": "text",
        "optimizer": optimizer,
        "variant": "default",
        "kind": "backprop",
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "steps": curve[-1]["step"],
        "forwards": curve[-1]["step"],
        "forwards_per_step": 1,
        "median_step_s": step_s,
        "train_s": seconds[-1],
        "state_bytes": 0,
        "batch_size": 4,
        "model": "tiny",
        "machine": "test machine",
        "torch": "2",
        "threads": 1,
        "load_average": {"start": [0.5, 0.5, 0.5], "end": [1.0, 1.0, 1.0]},
        "date": "2026-01-01 00:00 UTC",
        "command": "python bench/convergence.py",
    }


def test_best_rate_interior_equal_time_and_steps_to_reach_on_hand_made_curves(bench):
    report = bench.report
    assert report.best_lr({1e-4: 3.0, 1e-3: 2.5, 1e-2: 2.8}) == (1e-3, True)
    assert report.best_lr({1e-3: 2.4, 1e-2: 2.6}) == (1e-3, False)  # the lowest rate: at the grid's edge
    assert report.best_lr({1e-4: 3.0, 1e-3: math.nan, 1e-2: 2.9}) == (1e-2, False)  # a diverged run is the worst
    assert report.first_reaching([(0, 4.0), (10, 2.6), (20, 2.5), (30, 2.4)], 2.5) == 20
    assert report.first_reaching([(0, 4.0), (10, 2.6)], 2.5) is None
    assert report.value_at([(0, 4.0), (20, 2.6), (40, 2.4)], 30) == pytest.approx(2.5)
    assert report.value_at([(0, 4.0), (20, 2.6)], 50) == 2.6  # past the end: the last value

    adamw = [fake_run("adamw", lr, [4.0, 3.0, 2.8, f], [0, 10, 20, 30]) for lr, f in ((1e-4, 3.0), (1e-3, 2.5))]
    adamw += [fake_run("adamw", 1e-3, [4.0, 3.0, 2.7, 2.5], [0, 10, 20, 30], seed=1)]
    adamw += [fake_run("adamw", 1e-2, [4.0, 3.2, 3.0, 2.8], [0, 10, 20, 30])]
    fish = [fake_run("adafish", 1e-3, [4.0, 2.6, 2.45, 2.4], [0, 20, 40, 60], step_s=2.0, seed=s) for s in (0, 1)]
    fish += [fake_run("adafish", 1e-2, [4.0, 3.0, 2.7, 2.6], [0, 20, 40, 60], step_s=2.0)]
    runs = {str(i): r for i, r in enumerate(adamw + fish)}
    summary = report.summarize({"runs": runs})["text"]

    assert (summary["adamw"]["best_lr"], summary["adamw"]["interior"]) == (1e-3, True)
    assert summary["adamw"]["final_loss_mean"] == pytest.approx(2.5) and summary["adamw"]["final_loss_std"] == 0
    assert summary["adamw"]["steps_to_adamw_best"] == 30
    fish_summary = summary["adafish"]
    assert (fish_summary["best_lr"], fish_summary["interior"]) == (1e-3, False)
    assert fish_summary["step_time_ratio_vs_adamw"] == pytest.approx(2.0)
    assert fish_summary["steps_to_adamw_best"] == 20  # 2.45 <= 2.5 at step 20
    assert fish_summary["loss_at_adamw_seconds_mean"] == pytest.approx(2.525)  # halfway from 2.6 (20 s) to 2.45 (40 s)
    markdown = report.render({"runs": runs, "summary": report.summarize({"runs": runs})})
    assert "| adafish | 0.001 | **no** | 30 |" in markdown


def test_step_time_ratios_come_from_runs_made_side_by_side(bench):
    """The machine ran twice as fast in the second command; only the pairs made in one command say 1.1x."""
    report = bench.report
    curve = ([4.0, 3.0], [0, 10])

    def made(optimizer, lr, step_s, command, seed=0):
        return {**fake_run(optimizer, lr, *curve, seed=seed, step_s=step_s), "command": command}

    runs = [
        made("adamw", 1e-3, 2.0, "slow"),
        made("adafish", 1e-2, 2.2, "slow"),  # the worse rate; its step costs the same
        made("adamw", 1e-2, 1.0, "fast", seed=1),
        made("adafish", 1e-3, 1.1, "fast", seed=1),
        made("adafish", 1e-3, 1.1, "alone"),  # no AdamW run beside it
    ]
    summary = report.summarize({"runs": {str(i): r for i, r in enumerate(runs)}})["text"]["adafish"]
    assert summary["step_time_ratio_vs_adamw"] == pytest.approx(1.1) and summary["step_time_pairs"] == 2
    assert report.side_by_side([made("loraplus", 1e-3, 1.0, "alone")], runs[:1]) == []
    apart = report.summarize({"runs": {"a": runs[0], "f": runs[4]}})["text"]["adafish"]
    assert apart["step_time_ratio_vs_adamw"] == pytest.approx(0.55) and apart["step_time_pairs"] == 0
