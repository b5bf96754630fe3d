import json
import re
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


def test_plan_sizes_a_run_described_for_another_tool(capsys, tmp_path):
    argv = ["plan", "--model", tiny_config_file(tmp_path), "--budget", "2GiB", "--method", "qlora", "--stack", "hf"]
    code, out, _ = run(capsys, *argv, "--optimizer", "paged-adamw-8bit", "--report", "allocated", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["stack"] == "hf" and plan["report"] == "allocated"
    assert (
        list(plan["strategies"]) == ["paged-adamw-8bit-qlora-gc"] and plan["recommended"] == "paged-adamw-8bit-qlora-gc"
    )
    sized = plan["strategies"]["paged-adamw-8bit-qlora-gc"]
    assert sized["allocated_bytes"] < sized["reserved_bytes"] < sized["total_bytes"]
    code, out, _ = run(capsys, *argv, "--report", "allocated")
    assert code == 0 and "total allocated" in out and "cuda context" not in out and "hf stack" in out


def test_plan_says_the_cheapest_change_when_nothing_fits(capsys, tmp_path):
    argv = ["plan", "--model", tiny_config_file(tmp_path), "--method", "lora", "--stack", "hf", "--seq-len", "4096"]
    code, out, _ = run(capsys, *argv, "--batch-size", "64", "--budget", "1.2GiB")
    assert code == 0 and "recommended: nothing fits" in out
    assert "cheapest change that fits: adamw-lora with " in out


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


# ---- plan reads what train reads; probe measures what plan lists ----


def test_plan_reads_the_train_config_and_its_run_shape(capsys, tmp_path, tiny_model_dir):
    from edgetune.train.config import TrainConfig
    from edgetune.train.config_file import load_config

    path = tmp_path / "run.yaml"
    overrides = [f"model.name={tiny_model_dir}", "data.seq_len=64", "train.batch_size=2", "lora.rank=4"]
    path.write_text(load_config(None, overrides).to_yaml())
    code, out, _ = run(capsys, "plan", str(path), "--budget", "2GiB", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["run"] == {
        "batch_size": 2,
        "seq_len": 64,
        "lora_rank": 4,
        "lora_targets": list(TrainConfig().lora.targets),
    }
    # Flags and overrides win over the file.
    code, out, _ = run(capsys, "plan", str(path), "lora.rank=8", "--seq-len", "32", "--budget", "2GiB", "--json")
    assert json.loads(out)["run"]["lora_rank"] == 8 and json.loads(out)["run"]["seq_len"] == 32


def test_plan_defaults_to_the_run_train_makes(capsys, tiny_model_dir):
    from edgetune.train.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN

    for argv in ([str(tiny_model_dir)], ["--model", str(tiny_model_dir)]):
        code, out, _ = run(capsys, "plan", *argv, "--budget", "2GiB", "--json")
        plan = json.loads(out)
        assert code == 0 and (plan["run"]["batch_size"], plan["run"]["seq_len"]) == (
            DEFAULT_BATCH_SIZE,
            DEFAULT_SEQ_LEN,
        )
    code, _, err = run(capsys, "plan", str(tiny_model_dir), "--model", "smollm2-135m")
    assert code == 2 and "two models given" in err


def test_plan_sizes_all_linear_as_every_linear_listed(capsys, tiny_model_dir):
    listed = "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    code, all_linear, _ = run(
        capsys, "plan", str(tiny_model_dir), "lora.targets=all-linear", "--budget", "1GiB", "--json"
    )
    code_listed, every, _ = run(capsys, "plan", str(tiny_model_dir), listed, "--budget", "1GiB", "--json")
    a, b = json.loads(all_linear)["strategies"], json.loads(every)["strategies"]
    assert code == code_listed == 0 and {n: s["total_bytes"] for n, s in a.items()} == {
        n: s["total_bytes"] for n, s in b.items()
    }


@pytest.mark.parametrize(
    "strategy",
    [
        "adafish-lora",
        "adafish-lora-gc",
        "scaled-adamw-qlora-gc",
        "hizoo-qlora",
        "mezo-qlora",
        "hizoo-full",
        "mezo-full",
        "fzoo-qlora",
        "fzoo-full",
        "adamw-lora-gc",
        "adamw-full-gc",
    ],
)
def test_probe_measures_every_strategy_of_the_plan(capsys, tiny_trainable_dir, strategy):
    from edgetune.plan.strategies import STRATEGIES

    assert strategy in STRATEGIES  # the list above is the plan's table
    argv = ["--model", str(tiny_trainable_dir), "--strategy", strategy, "--seq-len", "32", "--batch-size", "2"]
    code, out, err = run(capsys, "probe", *argv, "--steps", "1", "--lora-rank", "4", "--json")
    result = json.loads(out)
    assert code == 0, err
    assert result["config"]["strategy"] == strategy and len(result["steps"]) == 1 and result["peak_step_bytes"] > 0
    assert (result["trainable_params"] < result["total_params"]) == STRATEGIES[strategy].lora


def test_every_strategy_of_the_plan_is_a_probe_choice():
    from edgetune.plan.strategies import STRATEGIES

    parametrized = next(m for m in test_probe_measures_every_strategy_of_the_plan.pytestmark if m.name == "parametrize")
    assert list(parametrized.args[1]) == list(STRATEGIES)


def test_progress_without_a_terminal_is_whole_lines_and_shows_hours():
    import io
    from types import SimpleNamespace

    from edgetune.cli_output import TrainProgress

    stream = io.StringIO()
    progress = TrainProgress(stream)
    for step in range(1, 41):
        info = SimpleNamespace(
            step=step,
            total_steps=40,
            loss=1.0,
            tokens_per_second=10.0,
            val_loss=None,
            eta_seconds=3725.0,
            memory={"rss_bytes": 2**20},
        )
        progress.update(info)
    progress.message("warning: something")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "step 2/40  loss 1.0000  10 tok/s  mem 1 MiB  ETA 1:02:05" and len(lines) == 21
    assert lines[-2].startswith("step 40/40") and lines[-1] == "warning: something"


def test_train_says_warnings_once_data_statistics_first_and_memory_against_the_plan(
    capsys, tiny_trainable_dir, tmp_path
):
    from conftest import tiny_train_overrides, write_tiny_text

    text = write_tiny_text(tmp_path / "text.txt")
    argv = tiny_train_overrides(tiny_trainable_dir, text, tmp_path / "run", 1, "lora.targets=[q_proj,w_proj]")
    code, out, err = run(capsys, "train", *argv, "train.strategy=adamw-lora-gc")
    lines = err.splitlines()
    assert code == 0
    # The end-of-run report holds both comparisons: tracked against planned tensors, peak RSS against the total.
    assert re.search(r"peak memory, tensors: planned [\d,]+ MiB, tracked [\d,]+ MiB \(\d+\.\d\dx\)", out)
    assert re.search(r"peak memory, total: planned [\d,]+ MiB, peak RSS [\d,]+ MiB \(\d+\.\d\dx\)", out)
    assert lines.count("warning: LoRA targets not found in this model and skipped: w_proj") == 1
    assert sum("w_proj" in line for line in lines) == 1
    data = next(i for i, line in enumerate(lines) if line.startswith("data: text from"))
    assert "examples (7 training, 1 held out)" in lines[data] and "truncated" in lines[data]
    assert data < next(i for i, line in enumerate(lines) if line.startswith("held-out loss before"))


def test_plan_sizes_only_the_strategies_and_targets_asked_for(capsys, tiny_model_dir):
    argv = ["plan", "--model", str(tiny_model_dir), "--budget", "8GiB", "--json"]
    code, out, _ = run(capsys, *argv, "--strategies", "hizoo-qlora,adamw-lora-gc", "--lora-targets", "q_proj,v_proj")
    result = json.loads(out)
    assert code == 0 and set(result["strategies"]) == {"hizoo-qlora", "adamw-lora-gc"}
    assert result["run"]["lora_targets"] == ["q_proj", "v_proj"]
    code, out, _ = run(capsys, *argv, "--lora-targets", "all-linear")
    assert code == 0 and json.loads(out)["run"]["lora_targets"] == ["all-linear"]


@pytest.mark.parametrize(
    "flags,says",
    [(["--strategies", "adafish"], "unknown strategy 'adafish'"), (["--lora-targets", " , "], "names nothing")],
)
def test_plan_refuses_unknown_strategies_and_empty_lists_in_one_line(capsys, tiny_model_dir, flags, says):
    code, out, err = run(capsys, "plan", "--model", str(tiny_model_dir), "--budget", "8GiB", *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and says in err
