import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.train import checkpoint
from edgetune.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
IDENTITY = {"model": "tiny-llama", "architecture": "0123abcd", "strategy": "zo"}


def _save(run_dir: Path, step: int, keep: int = 5, value: float | None = None) -> Path:
    tensors = {"w": torch.full((4, 3), float(step) if value is None else value)}
    return save_checkpoint(run_dir, step, tensors, {"step": step}, identity=IDENTITY, keep=keep)


def _folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


class _Killed(BaseException):
    """Raised at a chosen point of a save: like a kill, it skips save_checkpoint's cleanup of failed writes."""


def _kill(*args):
    raise _Killed()


def test_round_trip_is_bit_identical_and_the_optimizer_continues_identically(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        optimizer.zero_grad()
        (params[0].sin().sum() + params[1].square().sum()).backward()
        optimizer.step()
        scheduler.step()
    tensors = {
        "a": params[0].detach(),
        "b": params[1].detach(),
        "bf16": torch.randn(4, 4).to(torch.bfloat16),
        "ints": torch.arange(7, dtype=torch.int64),
        "transposed": torch.randn(3, 5).t(),  # not contiguous
    }
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "data": {"epoch": 1, "batch": 9}}
    path = save_checkpoint(tmp_path, 7, tensors, state, identity=IDENTITY, keep=3)

    loaded = load_latest_checkpoint(tmp_path, dict(IDENTITY))
    assert path.name == "step-000007" and loaded.path == path and loaded.step == 7
    assert loaded.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor)
    assert loaded.state["data"] == {"epoch": 1, "batch": 9}
    assert loaded.state["scheduler"] == scheduler.state_dict()
    manifest = json.loads((path / "manifest.json").read_text())
    assert loaded.manifest == manifest
    assert manifest["step"] == 7 and manifest["identity"] == IDENTITY and manifest["format_version"] == 1
    for name in ("tensors.safetensors", "state.pt"):
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # A fresh optimizer given the saved state takes exactly the step the original takes.
    clones = [torch.nn.Parameter(loaded.tensors["a"].clone()), torch.nn.Parameter(loaded.tensors["b"].clone())]
    resumed = torch.optim.AdamW(clones, lr=0.1)
    resumed.load_state_dict(loaded.state["optimizer"])
    for group in (params, clones):
        group[0].grad = torch.ones(5, 3)
        group[1].grad = torch.full((3,), -2.0)
    optimizer.step()
    resumed.step()
    assert all(torch.equal(p, c) for p, c in zip(params, clones, strict=True))


def test_restored_rng_state_reproduces_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _ = torch.rand(5), random.random(), np.random.rand()
    state = capture_rng_state()
    assert {"python", "torch", "numpy"} <= state.keys()
    save_checkpoint(tmp_path, 1, {}, {"rng": state}, identity=IDENTITY, keep=1)
    expected = (torch.rand(8), [random.random() for _ in range(4)], np.random.rand(4))
    _ = torch.rand(100), random.random(), np.random.rand(3)  # move every generator on

    restore_rng_state(load_latest_checkpoint(tmp_path, IDENTITY).state["rng"])
    assert torch.equal(torch.rand(8), expected[0])
    assert [random.random() for _ in range(4)] == expected[1]
    assert np.array_equal(np.random.rand(4), expected[2])
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"python": random.getstate()})


def test_keep_prunes_the_oldest(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert _folders(tmp_path) == ["step-000004", "step-000005"]
    assert load_latest_checkpoint(tmp_path, IDENTITY).step == 5
    entries = list_checkpoints(tmp_path, verify=True)
    assert [(e.step, e.problem) for e in entries] == [(5, None), (4, None)]
    assert entries[0].size_bytes == sum(f.stat().st_size for f in entries[0].path.iterdir())


def test_folder_without_manifest_is_skipped_for_the_one_before(tmp_path, caplog):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    partial = tmp_path / "checkpoints" / "step-000003"
    shutil.copytree(tmp_path / "checkpoints" / "step-000002", partial)
    (partial / "manifest.json").unlink()

    loaded = load_latest_checkpoint(tmp_path, IDENTITY)
    assert loaded.step == 2 and torch.equal(loaded.tensors["w"], torch.full((4, 3), 2.0))
    assert "step-000003" in caplog.text and "no manifest.json" in caplog.text
    assert list_checkpoints(tmp_path)[0].problem.startswith("it has no manifest.json")


def test_flipped_bytes_fail_the_sha256_and_the_one_before_loads(tmp_path, caplog):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, so the file still parses and keeps its size
    (path / "tensors.safetensors").write_bytes(bytes(data))

    assert load_latest_checkpoint(tmp_path, IDENTITY).step == 1
    assert "sha256" in caplog.text
    assert list_checkpoints(tmp_path)[0].problem is None  # a size-only check cannot see it
    assert "sha256" in list_checkpoints(tmp_path, verify=True)[0].problem


def test_truncated_file_is_skipped(tmp_path):
    _save(tmp_path, 1)
    state_file = _save(tmp_path, 2) / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-10])
    assert load_latest_checkpoint(tmp_path, IDENTITY).step == 1
    assert "truncated" in list_checkpoints(tmp_path)[0].problem


def test_no_usable_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path, IDENTITY) is None
    (_save(tmp_path, 1) / "state.pt").unlink()
    assert load_latest_checkpoint(tmp_path, IDENTITY) is None


def test_checkpoint_of_another_strategy_or_model_is_refused_in_one_line(tmp_path):
    _save(tmp_path, 4)
    other = {"model": "other\nmodel", "architecture": "0123abcd", "strategy": "lora", "lora": "r=8"}
    with pytest.raises(EdgetuneError) as info:
        load_latest_checkpoint(tmp_path, other)
    message = str(info.value)
    assert "\n" not in message
    assert "made with no lora, model='tiny-llama', strategy='zo', not lora='r=8', model='other\\nmodel'" in message
    assert "architecture" not in message  # only the keys that differ
    assert info.value.fix == "resume with the same config or start a new run directory"


def test_newer_format_version_is_refused_not_skipped(tmp_path):
    _save(tmp_path, 1)
    manifest_file = _save(tmp_path, 2) / "manifest.json"
    manifest_file.write_text(json.dumps(json.loads(manifest_file.read_text()) | {"format_version": 2}))
    with pytest.raises(EdgetuneError, match="format version 2"):
        load_latest_checkpoint(tmp_path, IDENTITY)


def test_stale_tmp_folders_are_cleaned_by_the_next_save(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step-000009-abcd"
    stale.mkdir(parents=True)
    (stale / "tensors.safetensors").write_bytes(b"half")
    _save(tmp_path, 1)
    assert _folders(tmp_path) == ["step-000001"]


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 3, value=1.0)
    _save(tmp_path, 3, value=2.0)
    assert _folders(tmp_path) == ["step-000003"]
    assert torch.equal(load_latest_checkpoint(tmp_path, IDENTITY).tensors["w"], torch.full((4, 3), 2.0))


def test_saving_an_earlier_step_drops_the_abandoned_later_ones(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    _save(tmp_path, 15)
    assert _folders(tmp_path) == ["step-000010", "step-000015"]


@pytest.mark.parametrize("where", ["_write_manifest", "_install"])
def test_kill_inside_a_save_resumes_from_the_one_before(tmp_path, monkeypatch, where):
    _save(tmp_path, 1)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, where, _kill)
        with pytest.raises(_Killed):
            _save(tmp_path, 2)
    assert [name.startswith(".tmp-step-000002-") for name in _folders(tmp_path)] == [True, False]
    assert load_latest_checkpoint(tmp_path, IDENTITY).step == 1
    _save(tmp_path, 2)
    assert _folders(tmp_path) == ["step-000001", "step-000002"]


def test_kill_between_the_renames_of_a_resave(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-step-"):  # the new folder's rename, after the old one moved aside
            raise _Killed()
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        with pytest.raises(_Killed):
            _save(tmp_path, 2, value=9.0)
    assert "step-000002" not in _folders(tmp_path)
    assert load_latest_checkpoint(tmp_path, IDENTITY).step == 1
    _save(tmp_path, 2, value=9.0)
    assert _folders(tmp_path) == ["step-000001", "step-000002"]


def test_invalid_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="keep must be an int >= 1, got 0"):
        _save(tmp_path, 1, keep=0)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        _save(tmp_path, -1)
    with pytest.raises(TypeError, match="identity"):
        save_checkpoint(tmp_path, 1, {}, {}, identity={"rank": 8}, keep=1)
    assert not (tmp_path / "checkpoints").exists()


_CHILD = """
import sys, torch
from pathlib import Path
from edgetune.train.checkpoint import save_checkpoint
run_dir, step = Path(sys.argv[1]), int(sys.argv[2])
big = torch.arange(2_000_000, dtype=torch.float32)
print("ready", flush=True)
while True:
    big[0] = step
    save_checkpoint(run_dir, step, {"w": big}, {"step": step, "m": big * 2}, identity={"m": "x"}, keep=2)
    print(step, flush=True)
    step += 1
"""


def test_sigkill_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path):
    rng = random.Random(0)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    expected = torch.arange(2_000_000, dtype=torch.float32)
    latest = None
    for trial in range(3):
        start = latest.step + 1 if latest else 1
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(start)], stdout=subprocess.PIPE, env=env, text=True
        )
        assert child.stdout.readline() == "ready\n"
        if trial:  # later trials kill after at least one save finished, the first one maybe before
            assert child.stdout.readline().strip() == str(start)
        delay = rng.uniform(0.0, 0.4)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()

        # Atomic rename: every step-* folder is complete, whatever moment the kill hit.
        assert all(entry.problem is None for entry in list_checkpoints(tmp_path, verify=True)), delay
        latest = load_latest_checkpoint(tmp_path, {"m": "x"})
        assert latest is not None or trial == 0
        if latest is not None:
            assert latest.state["step"] == latest.step and (latest.step >= start or trial == 0)
            expected[0] = latest.step
            assert torch.equal(latest.tensors["w"], expected) and torch.equal(latest.state["m"], expected * 2)


class _Payload:
    """Unpickled, this would create the marker file: what a tampered checkpoint could run on resume."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(checkpoint_dir: Path, state: object) -> None:
    """Replace a checkpoint's state.pt and rewrite its manifest to match, as whoever edits the folder can."""
    torch.save(state, checkpoint_dir / "state.pt")
    manifest = json.loads((checkpoint_dir / "manifest.json").read_text())
    data = (checkpoint_dir / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_pickled_payload_in_a_checkpoint_never_runs(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    _save(run_dir, 1)
    newest = _save(run_dir, 2)
    _plant(newest, {"step": 2, "evil": _Payload(marker)})
    loaded = load_latest_checkpoint(run_dir, IDENTITY)
    assert not marker.exists()
    assert loaded.step == 1  # the tampered checkpoint is skipped, the one before is used
    assert [e.problem for e in list_checkpoints(run_dir, verify=True)] == [None, None]  # sizes and hashes match


def test_a_payload_in_the_only_checkpoint_leaves_nothing_to_resume(tmp_path, caplog):
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    _plant(_save(run_dir, 1), _Payload(marker))
    assert load_latest_checkpoint(run_dir, IDENTITY) is None and not marker.exists()
    assert "could run code" in caplog.text


def test_the_state_a_trainer_saves_loads_without_running_anything(tmp_path):
    np.random.seed(3)
    state = {"rng": capture_rng_state(), "data": {"epoch": 1, "examples": 5}, "skipped": 0, "lrs": [0.1, (1, 2)]}
    _save(run_dir := tmp_path / "run", 1)
    _plant(run_dir / "checkpoints" / "step-000001", state)
    expected = np.random.random(3)
    np.random.seed(0)
    loaded = load_latest_checkpoint(run_dir, IDENTITY)
    restore_rng_state(loaded.state["rng"])
    assert np.array_equal(np.random.random(3), expected)
