"""`edgetune export` from the command line: the result it prints, and every bad input as one line and exit 2
with nothing on disk lost."""

import json
import shutil

import pytest

from edgetune import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["export", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *phrases: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("edgetune: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.fixture
def run_copy(tiny_runs, tmp_path):
    """A private copy of the NF4 run that a test may damage."""
    return shutil.copytree(tiny_runs["nf4"], tmp_path / "run")


def test_merged_and_onnx_in_one_call_print_their_checks(tiny_runs, tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        *(str(tiny_runs["nf4"]), "--merged", str(tmp_path / "m"), "--onnx", str(tmp_path / "m.onnx"), "--onnx-int8"),
    )
    assert code == 0, err
    assert "merged bf16 model:" in out and "ONNX model:" in out and "int8 ONNX model:" in out
    assert "greedy 20 tokens with the KV cache identical" in out and "FAILED" not in out
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m.onnx").is_file()
    assert (tmp_path / "m.int8.onnx").is_file()


def test_json_output_has_every_figure(tiny_runs, tmp_path, capsys):
    code, out, _ = run_cli(capsys, str(tiny_runs["bf16"]), "--merged", str(tmp_path / "m"), "--json")
    result = json.loads(out)
    assert code == 0 and result["onnx"] is None and result["strategy"] == "adafish-lora"
    assert result["merged"]["size_bytes"] > 0
    assert all(check["passed"] for check in result["merged"]["checks"])


def test_not_a_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, str(tmp_path / "nowhere"), "--merged", str(tmp_path / "m"))
    assert_one_line_error(code, err, "is not a folder", "edgetune train")


def test_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    code, _, err = run_cli(capsys, str(tmp_path / "stuff"), "--merged", str(tmp_path / "m"))
    assert_one_line_error(code, err, "not an edgetune run folder (no run.json)")


def test_run_without_its_result(run_copy, tmp_path, capsys):
    shutil.rmtree(run_copy / "adapter")
    code, _, err = run_cli(capsys, str(run_copy), "--merged", str(tmp_path / "m"))
    assert_one_line_error(code, err, "did not finish", f"edgetune train --resume {run_copy}")


def test_truncated_adapter_file(run_copy, tmp_path, capsys):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run_cli(capsys, str(run_copy), "--merged", str(tmp_path / "m"))
    assert_one_line_error(code, err, "adapter file", "is damaged", "--resume")
    assert not (tmp_path / "m").exists()


def test_missing_adapter_config(run_copy, tmp_path, capsys):
    (run_copy / "adapter" / "adapter_config.json").unlink()
    code, _, err = run_cli(capsys, str(run_copy), "--onnx", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "incomplete (no adapter_config.json)")


def test_damaged_run_json(run_copy, tmp_path, capsys):
    (run_copy / "run.json").write_text("{not json")
    code, _, err = run_cli(capsys, str(run_copy), "--merged", str(tmp_path / "m"))
    assert_one_line_error(code, err, "run.json is damaged")


def test_base_model_changed_since_training(run_copy, tmp_path, capsys):
    run_json = run_copy / "run.json"
    record = json.loads(run_json.read_text())
    record["identity"]["architecture"] = "0" * 16
    run_json.write_text(json.dumps(record))
    code, _, err = run_cli(capsys, str(run_copy), "--merged", str(tmp_path / "m"))
    assert_one_line_error(code, err, "is not the one", "was trained on")


def test_existing_output_is_refused_and_kept(tiny_runs, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, str(tiny_runs["nf4"]), "--merged", str(out))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_text("older export")
    code, _, err = run_cli(capsys, str(tiny_runs["nf4"]), "--onnx", str(onnx_file))
    assert_one_line_error(code, err, "already exists")
    assert onnx_file.read_text() == "older export"


def test_overwrite_replaces_an_earlier_export(tiny_runs, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "edgetune_export.json").write_text("{}")  # the record every export folder holds
    code, _, err = run_cli(capsys, str(tiny_runs["nf4"]), "--merged", str(out), "--overwrite")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_the_run_folder_is_refused(tiny_runs, capsys):
    run = tiny_runs["nf4"]
    before = sorted(p.name for p in run.iterdir())
    code, _, err = run_cli(capsys, str(run), "--merged", str(run), "--overwrite")
    assert_one_line_error(code, err, "inside or contains the run folder")
    code, _, err = run_cli(capsys, str(run), "--onnx", str(run / "model.onnx"))
    assert_one_line_error(code, err, "inside or contains the run folder")
    assert sorted(p.name for p in run.iterdir()) == before


def test_nothing_to_export(tiny_runs, capsys):
    code, _, err = run_cli(capsys, str(tiny_runs["nf4"]))
    assert_one_line_error(code, err, "nothing to export", "--merged OUT_DIR, --onnx OUT.onnx")


def test_same_path_for_both_outputs(tiny_runs, tmp_path, capsys):
    same = str(tmp_path / "x.onnx")
    code, _, err = run_cli(capsys, str(tiny_runs["nf4"]), "--merged", same, "--onnx", same)
    assert_one_line_error(code, err, "name the same path")


def test_unsupported_model_type_for_onnx(tiny_runs, tmp_path, capsys, monkeypatch):
    from edgetune.export import exporter as export_module

    monkeypatch.setattr(export_module, "read_config_dict", lambda path: {"model_type": "gpt2"})
    code, _, err = run_cli(capsys, str(tiny_runs["nf4"]), "--onnx", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "not supported for model type 'gpt2'", "--merged")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.default_model
def test_both_exports_of_a_default_model_qlora_run(tmp_path, capsys):
    """The issue's bar: `edgetune train` on SmolLM2-135M (NF4 + LoRA), then both exports pass their checks."""
    run_dir = tmp_path / "run"
    train_args = [
        "train",
        "train.strategy=scaled-adamw-qlora-gc",
        "train.steps=2",
        "train.batch_size=2",
        "train.eval_batches=1",
        "data.seq_len=32",
        "train.device=cpu",
        f"output.dir={run_dir}",
    ]
    assert cli.main(train_args) == 0, capsys.readouterr().err
    capsys.readouterr()
    code, out, err = run_cli(
        capsys, str(run_dir), "--merged", str(tmp_path / "merged"), "--onnx", str(tmp_path / "smollm2.onnx"), "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert all(check["passed"] for check in result["merged"]["checks"])
    assert result["onnx"]["logits"]["max_abs_diff"] <= 1e-3 and result["onnx"]["greedy_identical"]
    assert result["onnx"]["size_bytes"] > 500 * 2**20  # 135M float32 weights, embeddings stored once


def test_the_api_function_stays_callable_after_its_module_is_imported(tiny_runs, tmp_path):
    """A submodule named like an API function would replace it on the package after the first call."""
    import edgetune

    for name in ("first", "second"):
        result = edgetune.export(tiny_runs["bf16"], merged_dir=tmp_path / name)
        assert result.merged.out_dir == tmp_path / name


def test_a_cancelled_run_exports_with_a_warning(run_copy, tmp_path, capsys):
    summary = json.loads((run_copy / "summary.json").read_text())
    (run_copy / "summary.json").write_text(json.dumps(summary | {"status": "cancelled", "steps_done": 2}))
    code, _, err = run_cli(capsys, str(run_copy), "--merged", str(tmp_path / "m"))
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1
    assert "ended 'cancelled' after 2 steps" in warnings[0] and "--resume" in warnings[0]


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(tiny_runs, tmp_path, capsys):
    theirs = tmp_path / "thesis"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "thesis.tex").write_text("mine")
    (theirs / "sub" / "data.csv").write_text("1,2\n")
    code, _, err = run_cli(capsys, str(tiny_runs["nf4"]), "--merged", str(theirs), "--overwrite")
    assert_one_line_error(code, err, "is not an edgetune export", "edgetune_export.json")
    assert (theirs / "thesis.tex").read_text() == "mine" and (theirs / "sub" / "data.csv").read_text() == "1,2\n"


def foreign_copy(adapter_dir, destination):
    """A run's adapter as another tool would leave it: peft's two files, no tokenizer, no edgetune provenance."""
    destination.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir / name, destination / name)
    return destination


def test_a_checkpoint_exports_the_weights_of_its_step(tiny_runs, tmp_path, capsys):
    """The last checkpoint of the tiny runs is their final step, so both exports hold the same weights."""
    checkpoint = tiny_runs["nf4"] / "checkpoints" / "step-000003"
    code, out, err = run_cli(capsys, str(checkpoint), "--merged", str(tmp_path / "from-step"), "--dtype", "fp32")
    assert code == 0, err
    assert run_cli(capsys, str(tiny_runs["nf4"]), "--merged", str(tmp_path / "from-run"), "--dtype", "fp32")[0] == 0
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("from-step", "from-run")]
    assert weights[0] == weights[1]
    record = json.loads((tmp_path / "from-step" / "edgetune_export.json").read_text())
    assert (
        record["weights_dir"] == str((checkpoint / "adapter").resolve())
        and record["strategy"] == "scaled-adamw-qlora-gc"
    )


def test_a_foreign_adapter_exports_with_its_base(tiny_runs, tiny_trainable_dir, tmp_path, capsys):
    adapter = foreign_copy(tiny_runs["bf16"] / "adapter", tmp_path / "elsewhere")
    code, out, err = run_cli(
        capsys, str(adapter), "--base", str(tiny_trainable_dir), "--merged", str(tmp_path / "m"), "--json"
    )
    assert code == 0, err
    assert f"rank-16 LoRA adapter trained on {tiny_trainable_dir.resolve()}, used on {tiny_trainable_dir}" in err
    result = json.loads(out)
    assert result["strategy"] == "peft-adapter" and all(check["passed"] for check in result["merged"]["checks"])


def test_a_foreign_adapter_needs_a_base_and_a_run_refuses_one(tiny_runs, tiny_trainable_dir, tmp_path, capsys):
    adapter = foreign_copy(tiny_runs["bf16"] / "adapter", tmp_path / "elsewhere")
    code, _, err = run_cli(capsys, str(adapter), "--merged", str(tmp_path / "m"))
    assert_one_line_error(
        code, err, "is a peft adapter folder", f"pass --base MODEL (the adapter names {tiny_trainable_dir.resolve()})"
    )
    code, _, err = run_cli(
        capsys, str(tiny_runs["bf16"]), "--base", str(tiny_trainable_dir), "--merged", str(tmp_path / "m")
    )
    assert_one_line_error(code, err, "names the base it was trained on", "drop --base")
    code, _, err = run_cli(
        capsys, str(tiny_runs["full"] / "checkpoints" / "step-000003"), "--merged", str(tmp_path / "m")
    )
    assert_one_line_error(code, err, "mezo-full run, whose checkpoints hold weights for resume only")
    assert not (tmp_path / "m").exists()
