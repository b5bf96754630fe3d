"""bench/gpu_check.py --dry-run: the GPU check's plumbing (plans, a fresh process per case, figures, JSON, markdown)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.default_model  # the tiny models are built with the bundled model's tokenizer
def test_the_dry_run_measures_every_case_and_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each case's process; OpenMP teams crawl on a busy small machine
    # One model and one shape keep this to four processes (~50 s): a LoRA, the QLoRA and a forward-only strategy.
    strategies = ["adafish-lora-gc", "scaled-adamw-qlora-gc", "hizoo-qlora"]
    argv = ["--dry-run", "--out", str(tmp_path), "--models", "llama-3.2-1b-random", "--shapes", "2x32"]
    assert gpu_check().main([*argv, "--strategies", ",".join(strategies)]) == 0

    results = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["strategy"], r["batch_size"], r["seq_len"]) for r in results["rows"]] == [(s, 2, 32) for s in strategies]
    for row in results["rows"]:
        assert row["status"] == "ok", row.get("log_tail")
        assert 0 < row["planned_peak_bytes"] < row["planned_total_bytes"]
        assert row["measured_peak_bytes"] == row["tensor_peak_bytes"] > 0
        assert row["measured_total_bytes"] == row["peak_rss_bytes"] > 0
        assert row["cuda_max_allocated_bytes"] is row["cuda_max_reserved_bytes"] is row["nvml_used_bytes"] is None
        assert row["tokens_per_s"] > 0
        # Loose on purpose: the plumbing must set like against like (the dry run's plans land within a few %).
        assert abs(row["peak_error_pct"]) < 25
    ratio = results["ratios"][0]
    assert ratio["lora"] == "adafish-lora-gc" and ratio["planned"] > 0 and ratio["measured"] > 0
    table = (tmp_path / "gpu.md").read_text()
    assert "| model | shape | strategy | planned peak | measured peak | error |" in table
    assert table.count("| llama-3.2-1b-random | 2 x 32 |") == len(strategies) + 1  # the ratio table's row too
    assert results["meta"]["command"] in table


def test_cases_past_the_time_budget_keep_their_plans_and_say_why(tmp_path):
    argv = ["--dry-run", "--out", str(tmp_path), "--budget-s", "0", "--shapes", "2x32"]
    assert gpu_check().main([*argv, "--strategies", "adamw-lora-gc,scaled-adamw-qlora-gc"]) == 0

    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert len(rows) == 4  # two models x two strategies
    for row in rows:
        assert row["status"] == "not run" and "time budget" in row["error"]
        assert row["planned_peak_bytes"] > 0 and "measured_peak_bytes" not in row
    assert "not run: no models: skipped" in (tmp_path / "gpu.md").read_text()
