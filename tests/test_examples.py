"""Every example in examples/ runs as a user would run it (a fresh `python examples/...` process).

The desktop-window example has its own driver with a real X server: tests/test_desktop_app.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_text

from edgetune.plan.strategies import LADDER, STRATEGIES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_has_a_test():
    tested = {"plan_then_train.py", "zo_sentiment.py", "export_onnx.py", "desktop_app.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


def test_plan_then_train(tiny_trainable_dir, tmp_path):
    text = write_tiny_text(tmp_path / "text.txt")
    out = run_example(
        "plan_then_train.py",
        *("--model", str(tiny_trainable_dir), "--data", str(text), "--steps", "2", "--seq-len", "32"),
        *("--output", str(tmp_path / "run")),
        cwd=tmp_path,
    )
    assert "recommended" in out.lower() and "step 2/2" in out and "finished: held-out loss" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_export_onnx_generates_with_onnxruntime(tiny_runs, tmp_path):
    args = (str(tiny_runs["nf4"]), "--out", "exp/model.onnx", "--tokens", "5", "--int8")
    out = run_example("export_onnx.py", *args, cwd=tmp_path)
    assert (tmp_path / "exp" / "model.onnx").is_file() and (tmp_path / "exp" / "model.int8.onnx").is_file()
    assert "greedy 20 tokens with the KV cache identical" in out
    assert "onnxruntime, model.onnx (" in out and "onnxruntime, model.int8.onnx (" in out


@pytest.mark.default_model
def test_zo_sentiment_trains_the_plans_forward_only_rung(tmp_path):
    rung = STRATEGIES[LADDER[-1]]
    args = ("--train", "24", "--val", "16", "--forwards", str(2 * rung.forwards_per_step), "--output", "zo")
    out = run_example("zo_sentiment.py", *args, cwd=tmp_path)
    steps = f"after 2 {rung.optimizer} steps at lr {rung.default_lr:g} ({2 * rung.forwards_per_step} forward passes)"
    assert "step 2/2" in out and f"on 16 reviews {steps}" in out
    assert (tmp_path / "zo" / "adapter_model.safetensors").is_file()


@pytest.mark.default_model
def test_zo_sentiment_takes_another_forward_only_strategy_and_refuses_a_backprop_one(tmp_path):
    out = run_example(
        "zo_sentiment.py",
        "--strategy",
        "hizoo-qlora",
        "--train",
        "8",
        "--val",
        "8",
        "--forwards",
        "3",
        "--output",
        "zo",
        cwd=tmp_path,
    )
    assert "after 1 hizoo steps" in out and "(3 forward passes)" in out
    refused = subprocess.run(
        [sys.executable, str(EXAMPLES / "zo_sentiment.py"), "--strategy", "adafish-lora"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "invalid choice: 'adafish-lora'" in refused.stderr
