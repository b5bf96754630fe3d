"""`edgetune train` end to end on a tiny Llama: results, logs, saved adapters, strategy choice, cancel, NaN.

Every run trains the session's tiny model (2 layers, hidden 64) on a 9-block text for a few steps on CPU, so each
takes a second or two. Resume, kills and resume-time refusals are in test_train_resume.py.
"""

import contextlib
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_overrides, write_tiny_text

from edgetune import CancelToken, api, cli
from edgetune.errors import EdgetuneError
from edgetune.train.batching import pad_token_id
from edgetune.train.checkpoint import list_checkpoints, load_latest_checkpoint
from edgetune.train.config_file import load_config
from edgetune.train.data import DataConfig, load_dataset
from edgetune.train.evaluation import held_out_loss

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(model_dir, text, run_dir, *extra):
    return api.train_config(None, tiny_train_overrides(model_dir, text, run_dir, STEPS, *extra))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    return load_latest_checkpoint(run_dir, identity).tensors


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_tiny_text(tmp_path_factory.mktemp("data") / "text.txt")


@pytest.fixture(scope="module")
def backprop_run(tiny_trainable_dir, text, tmp_path_factory):
    """No strategy given: the plan picks one (a backprop LoRA strategy with 8 GiB)."""
    run_dir = tmp_path_factory.mktemp("backprop") / "run"
    return api.train(config(tiny_trainable_dir, text, run_dir, "output.checkpoint_every=4"))


@pytest.fixture(scope="module")
def zo_run(tiny_trainable_dir, text, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zo") / "run"
    return api.train(config(tiny_trainable_dir, text, run_dir, "train.strategy=mezo-qlora", "train.lr=1e-2"))


@pytest.fixture(params=["backprop_run", "zo_run"])
def run(request):
    return request.getfixturevalue(request.param)


def plan_for(model_dir, strategy):
    plan = api.plan(str(model_dir), batch_size=2, seq_len=32, budget="8GiB", budget_device="cpu")
    return plan, plan.plans[strategy]


def test_result_fields(run, tiny_trainable_dir):
    assert run.status == "finished" and run.steps_done == STEPS and run.skipped_steps == 0
    assert run.output_dir == run.run_dir / "adapter"
    assert [info.step for info in run.history] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x) for x in (run.val_loss_before, run.val_loss_after))
    assert abs(run.val_loss_after - run.val_loss_before) > 1e-4  # the weights moved
    # The last step evaluates the same weights as the final held-out loss.
    assert run.history[-1].val_loss == pytest.approx(run.val_loss_after, rel=1e-6)
    assert all(info.val_loss is None for info in run.history[:-1])  # eval_every (20) > steps
    _, sized = plan_for(tiny_trainable_dir, run.strategy)
    assert run.planned_peak_bytes == sized.estimate.peak_bytes
    assert run.planned_total_bytes == sized.total_bytes > run.planned_peak_bytes  # + the 600 MiB runtime and slack
    assert run.planned_components == {c.name: c.bytes for c in sized.overhead + sized.estimate.components}


def test_steps_log_has_one_line_per_step_with_speed_and_memory(run):
    rows = [json.loads(line) for line in (run.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    # 7 training examples in batches of 2: the 4th batch of each epoch holds one example.
    for row, info, tokens in zip(rows, run.history, [64, 64, 64, 32, 64, 64], strict=True):
        assert row["loss"] == info.loss and math.isfinite(row["loss"]) and row["lr"] > 0
        assert row["tokens_per_second"] * row["seconds"] == pytest.approx(tokens, rel=1e-9)
        memory = row["memory"]
        assert set(memory) == {"rss_bytes", "step_peak_bytes", "resident_bytes", "peak_rss_bytes"}
        assert all(isinstance(v, int) and v > 0 for v in memory.values()), memory
    assert rows[-1]["eta_seconds"] == 0
    # measured peak = max over steps of (tensors resident after the step + what the step allocated at its peak).
    resident_after = [row["memory"]["resident_bytes"] for row in rows[1:]] + [rows[-1]["memory"]["resident_bytes"]]
    peaks = [after + row["memory"]["step_peak_bytes"] for after, row in zip(resident_after, rows, strict=True)]
    assert run.measured_peak_bytes == max(peaks)


def test_resident_memory_counts_the_weights_and_the_optimizer_state(backprop_run, zo_run, tiny_trainable_dir):
    from safetensors.torch import load_file

    base = load_file(str(tiny_trainable_dir / "model.safetensors"))
    adapter = load_file(str(backprop_run.output_dir / "adapter_model.safetensors"))
    base_bf16_bytes = 2 * sum(t.numel() for t in base.values())
    lora_bytes = 4 * sum(t.numel() for t in adapter.values())
    resident = [info.memory["resident_bytes"] for info in backprop_run.history]
    assert resident[0] >= base_bf16_bytes + lora_bytes
    assert resident[1] > resident[0] and len(set(resident[1:])) == 1  # optimizer state appears at step 1
    # MeZO keeps no state; its reusable perturbation buffer appears in the first step and never grows.
    zo = [info.memory["resident_bytes"] for info in zo_run.history]
    assert len(set(zo[1:])) == 1 and 0 <= zo[1] - zo[0] <= 2**20


def test_summary_has_plan_versus_measured_and_a_memory_png(run):
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["strategy"] == run.strategy and summary["why"] == run.strategy_reason
    assert summary["status"] == "finished" and summary["steps_done"] == STEPS and summary["skipped_steps"] == 0
    assert summary["planned_peak_bytes"] == run.planned_peak_bytes > 0
    assert summary["measured_peak_bytes"] == run.measured_peak_bytes > 0
    assert summary["planned_components"] == run.planned_components
    # The total the OS sees: the plan's total against the largest step's peak RSS, each with its ratio.
    rss = max(info.memory["peak_rss_bytes"] for info in run.history)
    assert summary["measured_total_figure"] == "peak_rss_bytes" and summary["measured_total_bytes"] == rss
    assert summary["planned_total_bytes"] == run.planned_total_bytes == sum(run.planned_components.values())
    assert summary["measured_over_planned_total"] == round(rss / run.planned_total_bytes, 3) > 0
    assert summary["measured_over_planned_tensors"] == round(run.measured_peak_bytes / run.planned_peak_bytes, 3)
    assert summary["val_loss_after"] == run.val_loss_after and summary["output_dir"] == str(run.output_dir)
    png = (run.run_dir / "memory.png").read_bytes()
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (800, 600)  # two panels


def _val_examples(model_dir, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_dataset(DataConfig(path=str(text), seq_len=32), tokenizer).val, pad_token_id(tokenizer)


def _base_model(model_dir, strategy):
    from transformers import AutoModelForCausalLM

    from edgetune.plan.strategies import STRATEGIES
    from edgetune.train.loading import keep_4bit_layout, nf4_config

    if STRATEGIES[strategy].base == "nf4":
        kwargs = {"quantization_config": nf4_config(), "device_map": {"": "cpu"}}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs)
        # Without this, bitsandbytes' CPU inference kernel rounds the 4-bit scales to bf16 (logits move ~3e-3).
        keep_4bit_layout(model)
        return model
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)


def _trained_model(model_dir, run):
    """The model as training left it: the strategy's loading plus the final checkpoint's trainable weights."""
    from edgetune.plan.sources import resolve_model
    from edgetune.plan.strategies import STRATEGIES
    from edgetune.train.loading import LoraSettings, load_model

    strategy = STRATEGIES[run.strategy]
    model = load_model(resolve_model(str(model_dir)), strategy.base, lora=LoraSettings())
    weights = final_weights(run.run_dir)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == weights.keys()
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(weights[name])
    return model.eval()


def test_adapter_loads_with_peft_and_reproduces_the_trained_model(run, tiny_trainable_dir, text):
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(_base_model(tiny_trainable_dir, run.strategy), run.output_dir).eval()
    trained = _trained_model(tiny_trainable_dir, run)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61]])
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, trained(input_ids=ids).logits
        plain = _base_model(tiny_trainable_dir, run.strategy)(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the output, so the comparison means something
    val, pad = _val_examples(tiny_trainable_dir, text)
    assert held_out_loss(loaded, val, 2, pad, "cpu", 1) == pytest.approx(run.val_loss_after, rel=1e-5)


def test_without_a_strategy_the_plan_recommendation_is_used(backprop_run, tiny_trainable_dir):
    plan, _ = plan_for(tiny_trainable_dir, "adafish-lora")
    from edgetune.plan.strategies import STRATEGIES

    assert plan.recommended is not None and backprop_run.strategy == plan.recommended
    assert STRATEGIES[plan.recommended].needs_backward and STRATEGIES[plan.recommended].lora  # what the checks assume
    assert backprop_run.strategy_reason == f"recommended by the plan: {plan.reason}"


def test_logged_lr_is_the_rate_the_step_used(backprop_run):
    from edgetune.plan.strategies import STRATEGIES

    base = STRATEGIES[backprop_run.strategy].default_lr
    expected = [base * (1.0 - (step - 1) / STEPS) for step in range(1, STEPS + 1)]  # linear decay to 0
    assert [info.lr for info in backprop_run.history] == pytest.approx(expected, rel=1e-9)


def test_a_forced_strategy_that_does_not_fit_is_refused_unless_forced(tiny_trainable_dir, text, tmp_path):
    # 100 MiB is far below the planned ~600 MiB (CPU context included), far above the tiny model's real tensors.
    args = (tiny_trainable_dir, text, tmp_path / "run", "train.strategy=mezo-full", "train.budget=100MiB")
    with pytest.raises(EdgetuneError) as refused:
        api.train(config(*args))
    message = str(refused.value)
    assert "\n" not in message and "mezo-full" in message and "train.force=true" in message
    assert not (tmp_path / "run").exists()
    result = api.train(config(*args, "train.force=true", "train.steps=2"))
    assert result.status == "finished" and result.steps_done == 2 and result.strategy == "mezo-full"
    assert result.strategy_reason == "chosen in the config"


@contextlib.contextmanager
def progress_bars_on():
    """transformers' default (cli.main turns the bars off process-wide, so earlier tests may have)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        yield
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()


@pytest.fixture(scope="module")
def cancelled_in_a_thread(tiny_trainable_dir, text, tmp_path_factory):
    """train() in a worker thread, cancelled from this thread once step 2 has finished; all output captured."""
    run_dir = tmp_path_factory.mktemp("cancel") / "run"
    token, step_two_done, cancel_sent, outcome, exits = CancelToken(), threading.Event(), threading.Event(), {}, []

    def on_step(info):
        if info.step == 2:
            step_two_done.set()
            assert cancel_sent.wait(60)  # hold the worker at the step boundary until the cancel arrives

    def worker():
        try:
            outcome["result"] = api.train(
                config(tiny_trainable_dir, text, run_dir, "train.strategy=mezo-full", "train.lr=1e-3"),
                on_step=on_step,
                cancel=token,
            )
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    out, err = io.StringIO(), io.StringIO()
    real_exit = sys.exit
    sys.exit = lambda *args: exits.append(args)
    try:
        with progress_bars_on(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            thread = threading.Thread(target=worker)
            thread.start()
            assert step_two_done.wait(120)
            token.cancel()
            cancel_sent.set()
            thread.join(120)
    finally:
        sys.exit = real_exit
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    return outcome["result"], out.getvalue(), err.getvalue(), exits


def test_cancel_from_another_thread_checkpoints_the_last_finished_step(cancelled_in_a_thread):
    result, out, _, exits = cancelled_in_a_thread
    assert result.status == "cancelled" and result.steps_done == 2 and [i.step for i in result.history] == [1, 2]
    assert out == "" and exits == []
    assert [entry.step for entry in list_checkpoints(result.run_dir, verify=True)] == [2]
    saved = load_latest_checkpoint(result.run_dir, json.loads((result.run_dir / "run.json").read_text())["identity"])
    assert saved.step == 2 and saved.state["step"] == 2 and saved.state["data"] == {"epoch": 0, "examples": 4}
    assert len((result.run_dir / "steps.jsonl").read_text().splitlines()) == 2
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "cancelled"
    assert (result.output_dir / "model.safetensors").is_file()


def test_train_writes_nothing_to_stderr(cancelled_in_a_thread):
    assert cancelled_in_a_thread[2] == ""


def _poison_losses(monkeypatch, bad_forward):
    """Make the training loss NaN when bad_forward(call_number, step) says so.

    The held-out loss goes through ``chunked_loss.streamed_loss_sum``, not the step's ``causal_lm_loss``, so it
    is not affected.
    """
    from edgetune.train import step

    state = {"calls": 0, "step": 1}
    real_loss = step.causal_lm_loss

    def poisoned(model, batch):
        state["calls"] += 1
        loss = real_loss(model, batch)
        return loss * float("nan") if bad_forward(state["calls"], state["step"]) else loss

    monkeypatch.setattr(step, "causal_lm_loss", poisoned)
    return state


def test_nonfinite_losses_are_skipped_and_stop_the_run_after_max_nonfinite(
    tiny_trainable_dir, text, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    state = _poison_losses(monkeypatch, lambda call, step: step in (2, 4, 5))
    extra = ("train.strategy=adamw-lora-gc", "train.max_nonfinite=2", "output.checkpoint_every=1")
    result = api.train(
        config(tiny_trainable_dir, text, tmp_path / "run", *extra, "output.keep_checkpoints=9"),
        on_step=lambda info: state.update(step=info.step + 1),
    )
    assert result.status == "stopped: 2 non-finite losses in a row (lower the learning rate)"
    assert result.steps_done == 5 and result.skipped_steps == 3
    assert [info.skipped for info in result.history] == [False, True, False, True, True]
    assert [math.isfinite(info.loss) for info in result.history] == [True, False, True, False, False]
    weights = {e.step: load_file(str(e.path / "tensors.safetensors")) for e in list_checkpoints(result.run_dir)}
    assert sorted(weights) == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(t).all() for w in weights.values() for t in w.values())
    for unchanged, before in ((2, 1), (4, 3), (5, 3)):  # a skipped step leaves the weights as they were
        assert all(torch.equal(weights[unchanged][k], weights[before][k]) for k in weights[before])
    assert not all(torch.equal(weights[3][k], weights[1][k]) for k in weights[1])
    assert json.loads((result.run_dir / "summary.json").read_text())["skipped_steps"] == 3


def test_a_huge_learning_rate_stops_the_run_with_finite_weights(tiny_trainable_dir, text, tmp_path):
    # Adam's step is about lr whatever the gradient's size (clipping cannot hold it back): 1e30 overflows at once.
    extra = ("train.strategy=adamw-lora-gc", "train.lr=1e30", "train.max_nonfinite=2", "train.steps=8")
    result = api.train(config(tiny_trainable_dir, text, tmp_path / "run", *extra))
    assert result.status.startswith("stopped: 2 non-finite losses in a row") and result.skipped_steps == 2
    assert result.steps_done < 8 and [i.skipped for i in result.history[-2:]] == [True, True]
    assert all(torch.isfinite(t).all() for t in final_weights(result.run_dir).values())


def test_a_zeroth_order_step_skipped_by_the_optimizer_counts_as_skipped(
    tiny_trainable_dir, text, tmp_path, monkeypatch
):
    _poison_losses(monkeypatch, lambda call, step: call % 2 == 0)  # MeZO: l+ then l-; every l- is NaN
    extra = ("train.strategy=mezo-full", "train.lr=1e-3", "train.max_nonfinite=2")
    result = api.train(config(tiny_trainable_dir, text, tmp_path / "run", *extra))
    from safetensors.torch import load_file

    base = load_file(str(tiny_trainable_dir / "model.safetensors"))
    # HiZOO skipped every step: the weights are the base model's up to the one-ulp rounding of its in-place
    # restore (exact restore would need a full copy; see the edgetune.optim.hizoo docstring).
    for name, t in final_weights(result.run_dir).items():
        original = base[name].to(t.dtype).float()
        one_ulp = 2**-7 * (original.abs() + 1e-2)  # bf16 spacing at |theta| + |eps z| (eps 1e-3, |z| < 10)
        assert ((t.float() - original).abs() <= one_ulp).all(), name
    assert result.skipped_steps == 2 and result.steps_done == 2 and result.status.startswith("stopped")


def snapshot(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_of(tmp_path, run):
    return Path(shutil.copytree(run.run_dir, tmp_path / "copy"))


def _not_writable(tmp_path, run):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    target = tmp_path / "locked"
    target.mkdir(mode=0o500)
    return target


def _inside_a_file(tmp_path, run):
    (tmp_path / "a-file").write_text("mine")
    return tmp_path / "a-file" / "run"


def _an_existing_file(tmp_path, run):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt"


def _foreign_folder(tmp_path, run):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    return tmp_path / "mine"


def _short_text(tmp_path):
    (tmp_path / "short.txt").write_text("hello world")
    return tmp_path / "short.txt"


def _long_text(tmp_path):
    return write_tiny_text(tmp_path / "long.txt", lines=40)  # two blocks of 512 tokens


# name: (output folder maker, extra overrides maker, fragments the one-line message must hold)
BAD_OUTPUT = {
    "holds a different run": (_copy_of, lambda t: ["train.strategy=mezo-full"], ["a different run", "new folder"]),
    "holds this run, no --resume": (_copy_of, lambda t: [], ["already holds this run", "--resume"]),
    "not empty, not a run": (_foreign_folder, lambda t: [], ["is not empty and is not an edgetune run", "output.dir"]),
    "not writable": (_not_writable, lambda t: [], ["cannot write to", "writable folder"]),
    "below a file": (_inside_a_file, lambda t: [], ["cannot write to", "writable folder"]),
    "is a file": (_an_existing_file, lambda t: [], ["notes.txt", "output.dir"]),
    "missing data": (None, lambda t: [f"data.path={t / 'nope.txt'}"], ["nope.txt does not exist"]),
    "data under one block": (None, lambda t: [f"data.path={_short_text(t)}"], ["fewer than one block of seq_len=32"]),
    "seq_len over the model's": (
        None,
        lambda t: [f"data.path={_long_text(t)}", "data.seq_len=512"],
        ["seq_len", "512", "256"],
    ),
    "missing model": (None, lambda t: [f"model.name={t / 'no-model'}"], ["no-model does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUT))
def test_bad_input_is_one_line_with_the_fix_and_overwrites_nothing(case, zo_run, tiny_trainable_dir, text, tmp_path):
    make_output, make_extra, fragments = BAD_OUTPUT[case]
    output = make_output(tmp_path, zo_run) if make_output else tmp_path / "run"
    before = snapshot(output) if output.exists() else None
    extra = ["train.strategy=mezo-qlora", "train.lr=1e-2", *make_extra(tmp_path)]
    with pytest.raises(EdgetuneError) as refused:
        api.train(config(tiny_trainable_dir, text, output, *extra))
    message = str(refused.value)
    assert "\n" not in message and refused.value.fix and all(f in message for f in fragments), message
    assert (snapshot(output) if output.exists() else None) == before


@pytest.fixture
def keep_signal_handlers():
    """cli.main installs SIGINT/SIGTERM handlers for the run and leaves them; put pytest's back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("case", ["holds this run, no --resume", "missing data", "missing model"])
def test_the_cli_refuses_with_exit_2_and_one_error_line(
    case, zo_run, tiny_trainable_dir, text, tmp_path, capsys, keep_signal_handlers
):
    make_output, make_extra, fragments = BAD_OUTPUT[case]
    output = make_output(tmp_path, zo_run) if make_output else tmp_path / "run"
    before = snapshot(output) if output.exists() else None
    overrides = [f"model.name={tiny_trainable_dir}", f"data.path={text}", "data.seq_len=32", "train.batch_size=2"]
    overrides += ["train.device=cpu", "train.budget=8GiB", f"output.dir={output}", "train.strategy=mezo-qlora"]
    code = cli.main(["train", *overrides, *make_extra(tmp_path)])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("edgetune: error:")]
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and all(f in errors[0] for f in fragments), err
    assert (snapshot(output) if output.exists() else None) == before


def test_print_config_prints_yaml_that_loads_back_equal(tiny_trainable_dir, tmp_path, capsys):
    overrides = [f"model.name={tiny_trainable_dir}", "train.steps=7", "lora.targets=[q_proj,v_proj]", "train.lr=3e-4"]
    assert cli.main(["train", "--print-config", *overrides]) == 0
    out, err = capsys.readouterr()
    (tmp_path / "run.yaml").write_text(out)
    loaded = load_config(tmp_path / "run.yaml")
    assert loaded == api.train_config(None, overrides) and loaded.train.steps == 7
    assert loaded.lora.targets == ("q_proj", "v_proj") and loaded.train.lr == 3e-4 and err == ""


def test_eval_prompts_are_answered_at_each_evaluation_and_shown_after(tiny_trainable_dir, text, tmp_path):
    from edgetune.cli_output import train_summary

    prompts = 'eval.prompts=["hello world", "the quick brown"]'
    extra = ("train.eval_every=3", prompts, "eval.max_new_tokens=5", "train.steps=3")
    result = api.train(config(tiny_trainable_dir, text, tmp_path / "run", *extra))
    rows = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [row["samples"] is not None for row in rows] == [False, False, True]
    assert [s["prompt"] for s in rows[-1]["samples"]] == ["hello world", "the quick brown"]
    assert result.samples_after == rows[-1]["samples"] and len(result.samples_before) == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["samples_after"] == result.samples_after
    summary = train_summary(result)
    assert "answers to eval.prompts (greedy):" in summary and summary.count("    before: ") == 2
