import json
import subprocess
import sys

import pytest

from edgetune.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_devices_prints_a_table_with_the_source(capsys):
    code, out, _ = run(capsys, "devices")
    assert code == 0
    assert "source" in out.splitlines()[0] and ("psutil_cpu" in out or "nvml" in out)


def test_devices_json_parses_with_byte_counts(capsys):
    code, out, _ = run(capsys, "devices", "--json")
    devices = json.loads(out)
    assert code == 0 and devices and all(d["total_bytes"] >= d["free_bytes"] > 0 for d in devices)


def test_profiles_table_lists_every_bundled_device(capsys):
    code, out, _ = run(capsys, "devices", "--profiles")
    assert code == 0
    assert len(out.strip().splitlines()) == 1 + 14
    assert "jetson-orin-nano-8gb" in out and "rtx-5090-32gb" in out


def test_one_profile_as_json(capsys):
    code, out, _ = run(capsys, "devices", "--profile", "rtx-4090-24gb", "--json")
    (profile,) = json.loads(out)
    assert code == 0 and profile["memory_bytes"] == 24 * 2**30 and profile["sm_count"] == 128


def test_unknown_profile_is_one_line_with_a_suggestion(capsys):
    code, out, err = run(capsys, "devices", "--profile", "rtx-4060")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "rtx-4060-8gb" in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "probe", "--batch-size", "many")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2


def test_probe_on_a_tiny_model_reports_steps(capsys, tiny_trainable_dir):
    code, out, err = run(
        capsys,
        "probe",
        "--model",
        str(tiny_trainable_dir),
        "--precision",
        "fp32",
        "--lora-rank",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and len(result["steps"]) == 2 and result["peak_step_bytes"] > 0
    assert "step 2/2" in err


def bad_inputs(tmp_path, model_dir):
    not_json = tmp_path / "broken" / "config.json"
    not_json.parent.mkdir()
    not_json.write_text("{oops")
    no_arch = tmp_path / "noarch.json"
    no_arch.write_text('{"hidden_size": 8}')
    files = {name: tmp_path / name for name in ("empty.txt", "data.pdf", "rows.jsonl", "locked.txt")}
    files["empty.txt"].write_text("")
    files["data.pdf"].write_text("%PDF")
    files["rows.jsonl"].write_text('{"question": "no expected keys"}\n')
    files["locked.txt"].write_text("secret")
    files["locked.txt"].chmod(0)
    model = str(model_dir)
    return [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(not_json)], "is not valid JSON"),
        (["--model", str(no_arch)], "has no model_type"),
        (["--model", str(model_dir / "config.json")], "architecture-only"),
        (["--model", model, "--data", str(tmp_path / "nope.txt")], "does not exist"),
        (["--model", model, "--data", str(files["empty.txt"])], "empty"),
        (["--model", model, "--data", str(files["data.pdf"])], ".pdf"),
        (["--model", model, "--data", str(files["rows.jsonl"])], "line 1"),
        (["--model", model, "--data", str(files["locked.txt"])], "locked.txt"),
        (["--model", model, "--seq-len", "0"], "seq_len must be positive"),
    ]


def test_bad_input_gives_one_line_and_exit_code_2(capsys, tmp_path, tiny_trainable_dir):
    for argv, fragment in bad_inputs(tmp_path, tiny_trainable_dir):
        if argv[-1].endswith("locked.txt") and _can_read_anything():
            continue  # root ignores file permissions
        code, out, err = run(capsys, "probe", *argv)
        message = [line for line in err.splitlines() if line.startswith("edgetune: error:")]
        assert code == 2, (argv, err)
        assert len(message) == 1 and fragment in message[0], (argv, err)
        assert "Traceback" not in err and out == ""


def _can_read_anything():
    import os

    return os.geteuid() == 0 if hasattr(os, "geteuid") else False


def test_debug_shows_the_traceback(tmp_path):
    from edgetune.errors import EdgetuneError

    with pytest.raises(EdgetuneError):
        main(["probe", "--model", str(tmp_path / "missing"), "--debug"])


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "edgetune", "probe", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("edgetune: error:") and "Traceback" not in completed.stderr


def test_importing_edgetune_loads_no_heavy_library():
    code = "import sys, edgetune; print(sorted({'torch', 'transformers', 'pynvml', 'bitsandbytes'} & set(sys.modules)))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.stdout.strip() == "[]", completed.stdout + completed.stderr


def test_api_names_stay_functions_after_every_submodule_is_imported():
    """A submodule named like an API function (edgetune/probe.py once) replaces the function on the package."""
    code = (
        "import importlib, pkgutil, edgetune\n"
        "for module in pkgutil.walk_packages(edgetune.__path__, 'edgetune.'):\n"
        "    if not module.name.endswith('__main__'):\n"
        "        importlib.import_module(module.name)\n"
        "print(sorted(name for name in edgetune._API if not callable(getattr(edgetune, name))))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == "[]", completed.stdout + completed.stderr[-2000:]


def tiny_config_file(tmp_path):
    from conftest import tiny_llama_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_llama_config().to_dict()))
    return str(path)


def test_plan_prints_components_by_strategy_and_a_recommendation(capsys, tmp_path):
    code, out, _ = run(
        capsys, "plan", "--model", tiny_config_file(tmp_path), "--profile", "rtx-4060-8gb", "--seq-len", "128"
    )
    assert code == 0
    assert "weights *" in out and "activations" in out and "logits" in out and "total" in out
    assert "recommended: adafish-lora" in out and "profile rtx-4060-8gb" in out


def test_plan_json_has_the_same_numbers(capsys, tmp_path):
    code, out, _ = run(capsys, "plan", "--model", tiny_config_file(tmp_path), "--budget", "2GiB", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["budget"]["free_bytes"] == 2 * 2**30
    for strategy in plan["strategies"].values():
        assert strategy["total_bytes"] == sum(c["bytes"] for c in strategy["components"].values())


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--profile", "rtx-9999"], "unknown"),
        (["--budget", "6 parsecs"], "is not a memory size"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--lora-rank", "0"], "lora_rank must be a positive integer"),
    ],
)
def test_plan_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, fragment):
    code, out, err = run(capsys, "plan", "--model", tiny_config_file(tmp_path), *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and fragment in err


def test_profile_and_budget_together_are_a_usage_error(capsys, tmp_path):
    assert run(capsys, "plan", "--profile", "rtx-4060-8gb", "--budget", "6GiB")[0] == 2
