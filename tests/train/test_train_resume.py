"""Resuming `edgetune train`: after a cancel, a kill -9 or a kill inside a checkpoint write, a resumed run ends
with the weights of an uninterrupted one (bit-identical for zeroth-order on CPU), and bad resumes are refused.

The zeroth-order runs train every parameter of the tiny Llama with MeZO (bf16, lr 1e-3: large enough that every
weight moves, so equal weights mean equal trajectories: same batches, same perturbation seeds, same schedule).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_overrides, write_tiny_text

from edgetune import CancelToken, api, cli
from edgetune.errors import EdgetuneError
from edgetune.train import checkpoint
from edgetune.train.checkpoint import list_checkpoints, load_latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 16  # enough that a kill after the first checkpoint lands mid-run
ZO = ("train.strategy=mezo-full", "train.lr=1e-3", "output.checkpoint_every=1")


class _Killed(BaseException):
    """Stands for a kill inside a save: a BaseException skips save_checkpoint's cleanup, as a kill does."""


def overrides(model_dir, text, run_dir, *extra):
    return tiny_train_overrides(model_dir, text, run_dir, STEPS, *extra)


def train(model_dir, text, run_dir, *extra, **kwargs):
    return api.train(api.train_config(None, overrides(model_dir, text, run_dir, *extra)), **kwargs)


def resume(run_dir, *extra):
    return api.train(api.train_config(resume=str(run_dir), overrides=list(extra)), resume=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    return load_latest_checkpoint(run_dir, identity).tensors


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def cancel_after(step: int) -> dict:
    token = CancelToken()
    return {"cancel": token, "on_step": lambda info: token.cancel() if info.step == step else None}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """9 lines, 7 training examples: batches of 2 per epoch are 2, 2, 2, 1."""
    return write_tiny_text(tmp_path_factory.mktemp("data") / "text.txt")


@pytest.fixture(scope="module")
def uninterrupted(tiny_trainable_dir, text, tmp_path_factory):
    result = train(tiny_trainable_dir, text, tmp_path_factory.mktemp("zo") / "run", *ZO)
    return result, final_weights(result.run_dir)


def test_the_full_parameter_run_saves_a_model_that_from_pretrained_loads(uninterrupted, tiny_trainable_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, weights = uninterrupted
    assert result.status == "finished" and result.output_dir == result.run_dir / "model"
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    saved = dict(model.named_parameters())
    assert_bit_identical({name: saved[name].detach() for name in weights}, weights)
    base = load_file(str(tiny_trainable_dir / "model.safetensors"))
    assert all(not torch.equal(weights[name], base[name].to(weights[name].dtype)) for name in weights)


@pytest.mark.parametrize(
    "stop_at",
    [
        3,  # mid-epoch: 6 of 7 examples consumed
        4,  # right after the epoch's last, partial batch: resume starts the next epoch
    ],
)
def test_zeroth_order_resume_after_cancel_is_bit_identical(stop_at, uninterrupted, tiny_trainable_dir, text, tmp_path):
    stopped = train(tiny_trainable_dir, text, tmp_path / "run", *ZO, **cancel_after(stop_at))
    assert stopped.status == "cancelled" and stopped.steps_done == stop_at
    resumed = resume(tmp_path / "run")
    assert resumed.status == "finished" and resumed.steps_done == STEPS
    assert [info.step for info in resumed.history] == list(range(stop_at + 1, STEPS + 1))
    assert logged_steps(tmp_path / "run") == list(range(1, STEPS + 1))
    assert_bit_identical(final_weights(tmp_path / "run"), uninterrupted[1])


def test_backprop_resume_after_cancel_matches_the_uninterrupted_run(tiny_trainable_dir, text, tmp_path):
    # LoRA dropout draws from the global RNG, so this also checks that its state is saved and restored.
    extra = ("train.strategy=scaled-adamw-qlora-gc", "lora.dropout=0.1", "train.steps=6", "output.checkpoint_every=2")
    whole = train(tiny_trainable_dir, text, tmp_path / "whole", *extra)
    stopped = train(tiny_trainable_dir, text, tmp_path / "run", *extra, **cancel_after(3))
    assert stopped.status == "cancelled" and stopped.steps_done == 3
    at_cancel = final_weights(tmp_path / "run")
    assert resume(tmp_path / "run").steps_done == 6
    got, want = final_weights(tmp_path / "run"), final_weights(whole.run_dir)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert any((at_cancel[name] - want[name]).abs().max() > 1e-4 for name in want)  # resuming had work to do


def _wait_for_a_checkpoint(run_dir: Path, child: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not list((run_dir / "checkpoints").glob("step-*/manifest.json")):
        assert child.poll() is None, f"the run ended with {child.returncode} before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def test_kill_9_mid_run_then_resume_is_bit_identical(uninterrupted, tiny_trainable_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "edgetune", "train", *overrides(tiny_trainable_dir, text, run_dir, *ZO)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=tmp_path,
        )
        try:
            _wait_for_a_checkpoint(run_dir, child)
            time.sleep(random.uniform(0.0, 0.2))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    entries = list_checkpoints(run_dir, verify=True)
    assert entries and all(entry.problem is None for entry in entries)  # no step-* folder is ever partial
    killed_at = max(logged_steps(run_dir))
    assert killed_at < STEPS
    result = resume(run_dir)
    assert result.status == "finished" and result.steps_done == STEPS
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert_bit_identical(final_weights(run_dir), uninterrupted[1])


@pytest.fixture(scope="module")
def killed_in_a_save(tiny_trainable_dir, text, tmp_path_factory):
    """A run killed inside its third checkpoint write (after step 3 was logged), then resumed."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    real_install, calls = checkpoint._install, []

    def install(tmp, final):
        calls.append(final.name)
        if len(calls) == 3:
            raise _Killed()
        return real_install(tmp, final)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "_install", install)
        with pytest.raises(_Killed):
            train(tiny_trainable_dir, text, run_dir, *ZO)
    folders = sorted((p.name for p in (run_dir / "checkpoints").iterdir()), key=lambda name: name.lstrip("."))
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    before = load_latest_checkpoint(run_dir, identity).step
    return resume(run_dir), folders, before


def test_a_kill_inside_a_checkpoint_write_resumes_from_the_one_before(killed_in_a_save, uninterrupted):
    result, folders, resumed_from = killed_in_a_save
    assert len(folders) == 3 and folders[:2] == ["step-000001", "step-000002"]
    assert folders[2].startswith(".tmp-step-000003-") and resumed_from == 2
    assert result.status == "finished" and [info.step for info in result.history] == list(range(3, STEPS + 1))
    assert not [p for p in (result.run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert_bit_identical(final_weights(result.run_dir), uninterrupted[1])


def test_after_a_kill_and_resume_the_step_log_has_each_step_once(killed_in_a_save):
    assert logged_steps(killed_in_a_save[0].run_dir) == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def extended(tiny_trainable_dir, text, tmp_path_factory):
    """A 3-step run resumed with train.steps=5, recording the learning rate each optimizer step ran with."""
    from edgetune.train import session

    run_dir, rates, real = tmp_path_factory.mktemp("extended") / "run", [], session.make_optimizer

    def make_optimizer(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def recorded(self, *step_args, **step_kwargs):
            rates.append(self.param_groups[0]["lr"])
            return step(*step_args, **step_kwargs)

        optimizer.step = types.MethodType(recorded, optimizer)  # the scheduler re-wraps a bound method only
        return optimizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session, "make_optimizer", make_optimizer)
        # Named, since forward-only strategies hold the rate constant by default: the schedule is what is tested.
        first = train(tiny_trainable_dir, text, run_dir, *ZO, "train.steps=3", "train.scheduler=linear")
        return first, resume(run_dir, "train.steps=5"), rates


def test_resume_with_more_steps_extends_a_finished_run(extended):
    first, result, rates = extended
    assert first.status == "finished" and first.steps_done == 3
    assert rates[:3] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3], rel=1e-9)  # linear decay to 0 over 3 steps
    assert result.status == "finished" and [info.step for info in result.history] == [4, 5] and len(rates) == 5
    assert logged_steps(result.run_dir) == [1, 2, 3, 4, 5]
    assert [entry.step for entry in list_checkpoints(result.run_dir)] == [5, 4]


def test_an_extended_run_follows_the_schedule_of_its_new_length(extended):
    assert extended[2][3:] == pytest.approx([1e-3 * (1 - 3 / 5), 1e-3 * (1 - 4 / 5)], rel=1e-9)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_a_signal_checkpoints_the_last_finished_step_and_exits_128_plus_it(
    uninterrupted, tiny_trainable_dir, text, tmp_path, signum, code
):
    run_dir = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "edgetune", "train", *overrides(tiny_trainable_dir, text, run_dir, *ZO)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path, text=True)
    try:
        _wait_for_a_checkpoint(run_dir, child)
        child.send_signal(signum)
        out, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    stopped_at = max(logged_steps(run_dir))
    # Not 0: `edgetune train && edgetune export` must not export a half-trained model.
    assert child.returncode == code and out.startswith(f"cancelled: {stopped_at} steps of mezo-full"), out
    assert stopped_at < STEPS and logged_steps(run_dir) == list(range(1, stopped_at + 1))
    assert list_checkpoints(run_dir, verify=True)[0].step == stopped_at
    assert resume(run_dir).steps_done == STEPS
    assert_bit_identical(final_weights(run_dir), uninterrupted[1])


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_copy(uninterrupted, tmp_path):
    """A copy of the finished run, its config.yaml naming the copy as output.dir, as a run there would."""
    copy = Path(shutil.copytree(uninterrupted[0].run_dir, tmp_path / "copy"))
    (copy / "config.yaml").write_text(api.train_config(resume=str(copy)).to_yaml())
    return copy


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(EdgetuneError, match="has no config.yaml, so it is not an edgetune run folder"):
        api.train_config(resume=str(tmp_path / "mine"))
    assert cli.main(["train", "--resume", str(tmp_path / "mine")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("edgetune: error:") and err.count("\n") == 1
    assert snapshot(tmp_path / "mine") == {"notes.txt": b"mine"}


def test_resume_of_a_folder_with_a_config_but_no_run_file_is_refused(finished_copy):
    (finished_copy / "run.json").unlink()
    before = snapshot(finished_copy)
    with pytest.raises(EdgetuneError, match=r"is not an edgetune run folder \(no run.json\)"):
        resume(finished_copy)
    assert snapshot(finished_copy) == before


def test_resume_with_another_strategy_is_refused(finished_copy):
    before = snapshot(finished_copy)
    with pytest.raises(EdgetuneError) as refused:
        resume(finished_copy, "train.strategy=hizoo-full")
    assert "strategy='mezo-full', not 'hizoo-full'" in str(refused.value) and "\n" not in str(refused.value)
    assert "same config" in refused.value.fix
    assert snapshot(finished_copy) == before


def test_resume_with_a_lora_strategy_names_the_strategy(finished_copy):
    with pytest.raises(EdgetuneError) as refused:
        resume(finished_copy, "train.strategy=mezo-qlora")
    assert "strategy='mezo-full', not 'mezo-qlora'" in str(refused.value)


def test_resume_without_a_complete_checkpoint_is_refused(finished_copy):
    for entry in list_checkpoints(finished_copy):
        (entry.path / "manifest.json").unlink()  # as a kill before the manifest would leave it
    before = snapshot(finished_copy)
    with pytest.raises(EdgetuneError, match="holds no complete checkpoint to resume from"):
        resume(finished_copy)
    assert snapshot(finished_copy) == before


def test_a_refused_resume_leaves_the_saved_config_alone(finished_copy):
    for entry in list_checkpoints(finished_copy):
        shutil.rmtree(entry.path)
    before = snapshot(finished_copy)
    with pytest.raises(EdgetuneError, match="holds no complete checkpoint"):
        resume(finished_copy, "train.steps=40")
    assert snapshot(finished_copy) == before


def logged_rates(run_dir: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_a_resumed_run_follows_the_schedule_of_the_uninterrupted_one(uninterrupted, tiny_trainable_dir, text, tmp_path):
    extra = (*ZO, "train.scheduler=cosine", "train.warmup_steps=2")
    whole = train(tiny_trainable_dir, text, tmp_path / "whole", *extra)
    train(tiny_trainable_dir, text, tmp_path / "run", *extra, **cancel_after(5))
    resume(tmp_path / "run")
    assert logged_rates(tmp_path / "run") == pytest.approx(logged_rates(whole.run_dir), rel=1e-12)
    assert logged_rates(whole.run_dir)[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # warmup, then the cosine


def test_resume_applies_length_keys_from_a_config_file_and_says_so(finished_copy, tmp_path, capsys):
    config = api.train_config(resume=str(finished_copy))
    path = tmp_path / "more.yaml"
    path.write_text(dataclasses_replace(config, steps=STEPS + 2, eval_every=3).to_yaml())
    assert cli.main(["train", str(path), "--resume", str(finished_copy), "output.checkpoint_every=4"]) == 0
    err = capsys.readouterr().err
    assert f"resume changes train.steps: {STEPS} -> {STEPS + 2}" in err and "train.eval_every: 20 -> 3" in err
    assert "output.checkpoint_every: 1 -> 4" in err
    assert logged_steps(finished_copy)[-2:] == [STEPS + 1, STEPS + 2]


def dataclasses_replace(config, **train):
    import dataclasses

    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["lora.rank=8", "train.lr=0.5"], ["lora.rank=16, not 8", "train.lr=0.001, not 0.5"]),
        (["data.seq_len=16"], ["data.seq_len=32, not 16"]),
        (["train.scheduler=cosine"], ["train.scheduler=None, not 'cosine'"]),
    ],
)
def test_resume_refuses_keys_that_change_the_run_and_names_them(finished_copy, capsys, extra, named):
    before = snapshot(finished_copy)
    assert cli.main(["train", "--resume", str(finished_copy), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgetune: error:") and err.count("\n") == 1 and all(text in err for text in named)
    assert snapshot(finished_copy) == before


def test_a_malformed_config_file_given_with_resume_is_one_line(finished_copy, tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    before = snapshot(finished_copy)
    assert cli.main(["train", str(path), "--resume", str(finished_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgetune: error: config file {path} is not valid YAML") and err.count("\n") == 1
    assert snapshot(finished_copy) == before


def test_a_torn_last_log_line_is_dropped_on_resume(tiny_trainable_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_trainable_dir, text, run_dir, *ZO, **cancel_after(3))
    with (run_dir / "steps.jsonl").open("a") as log:
        log.write('{"step": 4, "loss": 3.1, "memo')  # a kill or a full disk in the middle of an append
    result = resume(run_dir)
    assert result.status == "finished" and logged_steps(run_dir) == list(range(1, STEPS + 1))


def test_a_run_that_died_before_its_first_checkpoint_starts_over_in_place(tiny_trainable_dir, text, tmp_path, capsys):
    from edgetune.train import session

    run_dir = tmp_path / "run"
    argv = ["train", *overrides(tiny_trainable_dir, text, run_dir, *ZO, "train.steps=2")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            cli.main(argv)  # a kill -9 during the first save: run.json and a log, no checkpoint
    assert (run_dir / "run.json").is_file() and not list_checkpoints(run_dir)
    assert cli.main(["train", "--resume", str(run_dir)]) == 2
    assert "start the run again without --resume" in capsys.readouterr().err
    (run_dir / "notes.txt").write_text("mine")
    assert cli.main(argv) == 0
    assert "stopped before its first checkpoint; starting it over" in capsys.readouterr().err
    assert logged_steps(run_dir) == [1, 2] and (run_dir / "notes.txt").read_text() == "mine"


def test_a_resumed_run_reports_the_loss_from_before_its_first_step(uninterrupted, tiny_trainable_dir, text, tmp_path):
    stopped = train(tiny_trainable_dir, text, tmp_path / "run", *ZO, **cancel_after(5))
    resumed = resume(tmp_path / "run")
    assert resumed.val_loss_before == stopped.val_loss_before == uninterrupted[0].val_loss_before


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(tiny_trainable_dir, text, tmp_path, capsys):
    import errno

    run_dir, real = tmp_path / "run", checkpoint._write_payload

    def fill_up(folder, tensors, state, *rest):
        if state["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, tensors, state, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "_write_payload", fill_up)
        code = cli.main(["train", *overrides(tiny_trainable_dir, text, run_dir, *ZO)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1].startswith("edgetune: error: cannot write the checkpoint of step 3")
    assert "No space left on device" in err[-1] and "earlier checkpoints are kept" in err[-1]
    assert [entry.step for entry in list_checkpoints(run_dir, verify=True)] == [2, 1]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert resume(run_dir).steps_done == STEPS
