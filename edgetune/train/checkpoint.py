"""Crash-safe training checkpoints: a folder renamed into place after its manifest, verified on resume.

``RUN_DIR/checkpoints/step-000123/`` holds ``tensors.safetensors`` (trainable weights), ``state.pt`` (optimizer,
scheduler, RNG states, data position, counters: whatever the trainer passes), for LoRA runs ``adapter/`` (the same
adapters in peft format, loadable with ``PeftModel.from_pretrained``, with the tokenizer) and ``manifest.json``
(format version, step, identity, size and sha256 of each file, creation time). Checkpoints without ``adapter/``
(older ones, full-parameter runs) are just as valid. A save writes into ``.tmp-step-000123-<random>/``,
fsyncs each file, writes and fsyncs the manifest last, fsyncs the folder, renames it into place and fsyncs
``checkpoints/``. A kill at any moment leaves complete ``step-*`` folders plus at most a ``.tmp-*`` folder, which the
next save deletes; a folder damaged later (bad copy, bit rot) fails its sizes or hashes and resume falls back to the
one before. Step order is write order: a save deletes higher steps (left by a run resumed from an earlier step, an
abandoned timeline), then all but the ``keep`` newest. One process writes a run folder at a time.

Nothing read from a checkpoint can run code. ``state.pt`` is read with ``torch.load(weights_only=True)``, whose
unpickler builds only tensors and plain data (numbers, strings, lists, tuples, dicts) and refuses any other object
before it is created; the trainer's state is made of just those (the numpy RNG state is stored as a list). A
manifest cannot vouch for a file, since whoever edits a folder can rewrite it too: a ``state.pt`` that holds
anything else is reported as unusable and resume falls back to the checkpoint before it.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from edgetune import __version__
from edgetune.errors import EdgetuneError

logger = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "edgetune-checkpoint", 1
TENSORS_FILE, STATE_FILE, MANIFEST_FILE = "tensors.safetensors", "state.pt", "manifest.json"
ADAPTER_DIR = "adapter"
# The files of adapter/ a manifest may list: plain names one level down, so no entry can point outside the folder.
_ADAPTER_ENTRY = re.compile(rf"{ADAPTER_DIR}/[A-Za-z0-9_][A-Za-z0-9._-]*")
_ADAPTER_REQUIRED = (f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/adapter_model.safetensors")
_STEP_DIR = re.compile(r"step-([0-9]+)")
_TMP_PREFIX = ".tmp-"
_NEW_RUN_FIX = "resume with the same config or start a new run directory"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read back after its manifest, sizes and hashes checked out.

    Attributes:
        step: the step it was saved at.
        tensors: the trainable weights by name, on CPU.
        state: the trainer's state dict as saved, tensors on CPU.
        path: the checkpoint folder.
        manifest: the parsed manifest.json.
    """

    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")


@dataclass(frozen=True)
class CheckpointEntry:
    """One ``step-*`` folder, as listed for reports.

    Attributes:
        step: the step in the folder name.
        path: the folder.
        size_bytes: the bytes of the files in it.
        problem: why resume would skip it, or None when it checks out.
    """

    step: int
    path: Path
    size_bytes: int
    problem: str | None

    def __post_init__(self) -> None:
        if self.step < 0 or self.size_bytes < 0:
            raise ValueError(f"step and size_bytes must be >= 0, got {self.step} and {self.size_bytes}")


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    identity: dict[str, str],
    keep: int,
    write_adapter: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically, then delete higher steps, all but the ``keep`` newest and stale temp folders.

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        step: the training step; a checkpoint of the same step is replaced.
        tensors: trainable weights by name (any device; copied to CPU). Tensors must not share storage.
        state: a picklable dict (optimizer and scheduler state dicts, ``capture_rng_state()``, data position).
        identity: what a resume must match, e.g. model name, config hash, strategy, LoRA settings.
        keep: how many checkpoints to keep, counting this one.
        write_adapter: writes a peft adapter folder into the path it is given (``adapter/`` of the temporary
            folder), so the adapter lands with the rest and its files are covered by the manifest.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: step < 0 or keep < 1.
        TypeError: tensors, state or identity have the wrong types.
        OSError: the write failed (the temporary folder is removed).
    """
    _check_save_args(step, tensors, state, identity, keep)
    root = run_dir / "checkpoints"
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_dir(run_dir)  # else a power cut could lose the folder that holds the first checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step-{step:06d}-", dir=root))
    try:
        files = _write_payload(tmp, tensors, state, write_adapter)
        _write_manifest(tmp, step, identity, files)
        final = _install(tmp, root / f"step-{step:06d}")
    except Exception:
        # A failed write (full disk, unpicklable state) must not leave gigabytes behind. A kill skips this and
        # leaves the .tmp folder, which the next save removes.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, step, keep)
    return final


def load_latest_checkpoint(run_dir: Path, identity: dict[str, str]) -> LoadedCheckpoint | None:
    """Load the newest checkpoint that checks out, skipping (with a warning) any that are incomplete or corrupt.

    Args:
        run_dir: the run folder given to ``save_checkpoint``.
        identity: this run's identity; the checkpoint's must be equal.

    Returns:
        The checkpoint, or None when ``run_dir`` has no usable one.

    Raises:
        EdgetuneError: the newest usable checkpoint was made with another identity or format version.
    """
    dirs = _step_dirs(run_dir / "checkpoints")
    for step, path in dirs:
        manifest, problem = _read_manifest(path)
        if manifest is not None:
            if manifest["format_version"] != FORMAT_VERSION:
                # Not corrupt, just unreadable here: falling back would resume from an older step.
                raise EdgetuneError(f"checkpoint {path} {_version_problem(manifest)}", _NEW_RUN_FIX)
            problem = _check_files(path, step, manifest, hashes=True)
        if problem is not None:
            logger.warning("skipping checkpoint %s: %s", path, problem)
            continue
        _check_identity(path, manifest["identity"], identity)
        from safetensors.torch import load_file

        tensors = load_file(str(path / TENSORS_FILE), device="cpu")
        state, problem = _load_state(path / STATE_FILE)
        if problem is not None:
            logger.warning("skipping checkpoint %s: %s", path, problem)
            continue
        logger.info("resuming from checkpoint %s (step %d)", path, step)
        return LoadedCheckpoint(step=step, tensors=tensors, state=state, path=path, manifest=manifest)
    if dirs:
        logger.warning("none of the %d checkpoints in %s is complete", len(dirs), run_dir / "checkpoints")
    return None


def list_checkpoints(run_dir: Path, *, verify: bool = False) -> list[CheckpointEntry]:
    """The ``step-*`` folders of a run, newest first, each with the problem resume would skip it for.

    Args:
        run_dir: the run folder.
        verify: also check sha256 hashes (reads every file); otherwise only the manifest and file sizes.

    Returns:
        One entry per folder; an empty list when there are none.
    """
    entries = []
    for step, path in _step_dirs(run_dir / "checkpoints"):
        manifest, problem = _read_manifest(path)
        if manifest is not None:
            problem = _version_problem(manifest) or _check_files(path, step, manifest, hashes=verify)
        size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        entries.append(CheckpointEntry(step=step, path=path, size_bytes=size_bytes, problem=problem))
    return entries


def is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` looks like a checkpoint folder: ``step-N`` holding a manifest (not yet verified)."""
    return _STEP_DIR.fullmatch(path.name) is not None and (path / MANIFEST_FILE).is_file()


def verified_manifest(path: Path) -> dict[str, Any]:
    """The manifest of one checkpoint folder, once its format, sizes and sha256 hashes checked out.

    Args:
        path: a ``step-N`` folder (``is_checkpoint_folder``).

    Returns:
        The parsed manifest.json.

    Raises:
        EdgetuneError: the checkpoint is incomplete, damaged or of another format version.
    """
    match = _STEP_DIR.fullmatch(path.name)
    manifest, problem = _read_manifest(path)
    if manifest is not None:
        step = int(match.group(1)) if match else -1
        problem = _version_problem(manifest) or _check_files(path, step, manifest, hashes=True)
    if problem is not None:
        raise EdgetuneError(
            f"checkpoint {path} cannot be used: {problem}",
            "pass another checkpoint of the run (an earlier step-* folder), or the run folder itself",
        )
    return manifest


def capture_rng_state() -> dict[str, Any]:
    """The states of the global RNGs: python ``random``, torch CPU, and numpy and CUDA when in use.

    Returns:
        A picklable dict for ``restore_rng_state``.
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    # A generator never imported or initialized has not been drawn from, and probing CUDA would create a context
    # (hundreds of MB of device memory) in a CPU-only run.
    if "numpy" in sys.modules:
        # As plain data: weights_only loading refuses numpy arrays (their unpickling goes through numpy's code).
        name, keys, position, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = (name, keys.tolist(), position, has_gauss, cached)
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs to a state from ``capture_rng_state``.

    Args:
        state: the captured dict. CUDA states for devices that are not visible are skipped with a warning.

    Raises:
        ValueError: the dict lacks the python or torch state.
    """
    missing = sorted({"python", "torch"} - state.keys())
    if missing:
        raise ValueError(f"RNG state lacks {missing}; pass a dict from capture_rng_state()")
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy  # installed with transformers; imported here because only numpy users need it

        name, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), position, has_gauss, cached))
    cuda_states = state.get("cuda", [])
    visible = torch.cuda.device_count() if cuda_states and torch.cuda.is_available() else 0
    if len(cuda_states) > visible:
        logger.warning("restoring %d of %d saved CUDA RNG states: fewer devices are visible", visible, len(cuda_states))
    for index, cuda_state in enumerate(cuda_states[:visible]):
        torch.cuda.set_rng_state(cuda_state, index)


def _check_save_args(step: Any, tensors: Any, state: Any, identity: Any, keep: Any) -> None:
    for name, value, least in (("step", step, 0), ("keep", keep, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(t) for k, t in tensors.items()):
        raise TypeError(f"tensors must map str to torch.Tensor, got {type(tensors).__name__}")
    if not isinstance(state, dict) or not _is_str_dict(identity):
        raise TypeError(
            f"state must be a dict and identity a dict of str to str, got {type(state).__name__} and {identity!r}"
        )


def _is_str_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _write_payload(
    folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], write_adapter: Callable[[Path], None] | None
) -> dict[str, Any]:
    from safetensors.torch import save_file

    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(folder / TENSORS_FILE))
    torch.save(state, folder / STATE_FILE)
    names = [TENSORS_FILE, STATE_FILE]
    if write_adapter is not None:
        write_adapter(folder / ADAPTER_DIR)
        names += sorted(f"{ADAPTER_DIR}/{p.name}" for p in (folder / ADAPTER_DIR).iterdir() if p.is_file())
        unlisted = [name for name in (*names[2:], *_ADAPTER_REQUIRED) if not _ADAPTER_ENTRY.fullmatch(name)]
        if unlisted or not set(_ADAPTER_REQUIRED) <= set(names):
            raise ValueError(f"the adapter writer wrote {names[2:]}; it must write {list(_ADAPTER_REQUIRED)}")
        _fsync_dir(folder / ADAPTER_DIR)
    files = {}
    for name in names:
        _fsync_file(folder / name)
        files[name] = {"size_bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    return files


def _write_manifest(folder: Path, step: int, identity: dict[str, str], files: dict[str, Any]) -> None:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    versions = {"edgetune": __version__, "torch": torch.__version__}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "identity": dict(identity)}
    manifest |= {"files": files, "created": created, "versions": versions}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    _fsync_file(folder / MANIFEST_FILE)
    _fsync_dir(folder)


def _install(tmp: Path, final: Path) -> Path:
    # rename() cannot replace a non-empty folder, so an existing checkpoint of this step moves aside first. A kill
    # between the two renames leaves this step only in .tmp folders; resume then falls back to the step before.
    aside = _temp_name(final) if final.exists() else None
    if aside is not None:
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _prune(root: Path, step: int, keep: int) -> None:
    others = [(s, path) for s, path in _step_dirs(root) if s != step]
    newer = [path for s, path in others if s > step]
    for path in newer:
        logger.info("deleting checkpoint %s: it is newer than step %d, from before this run resumed", path, step)
    # Renaming before deleting means a kill mid-delete leaves a .tmp folder, never a half-deleted step-* folder.
    for path in newer + [path for s, path in others if s < step][keep - 1 :]:
        os.replace(path, _temp_name(path))
    _fsync_dir(root)
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{_TMP_PREFIX}old-{path.name}-{os.urandom(4).hex()}")


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, key=lambda item: item[0], reverse=True)


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "it has no manifest.json (its write was interrupted)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"its manifest.json is unreadable ({exc})"
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or type(version) is not int:
        return None, "its manifest.json is not an edgetune checkpoint manifest"
    return manifest, None


def _version_problem(manifest: dict[str, Any]) -> str | None:
    version = manifest["format_version"]
    if version == FORMAT_VERSION:
        return None
    return f"has checkpoint format version {version} but edgetune {__version__} reads version {FORMAT_VERSION}"


def _check_files(path: Path, step: int, manifest: dict[str, Any], *, hashes: bool) -> str | None:
    if manifest.get("step") != step:
        return f"its manifest says step {manifest.get('step')!r}, its folder name step {step}"
    if not _is_str_dict(manifest.get("identity")):
        return "its manifest has no identity"
    files = manifest.get("files")
    # Only the two known names and plain names in adapter/ are accepted, so a manifest cannot point outside its folder.
    if not isinstance(files, dict) or not _known_files(set(files)):
        return f"its manifest lists files {sorted(files) if isinstance(files, dict) else files!r}"
    for name, info in sorted(files.items()):
        expected = info.get("size_bytes") if isinstance(info, dict) else None
        if not (path / name).is_file():
            return f"{name} is missing"
        if (size_bytes := (path / name).stat().st_size) != expected:
            return f"{name} has {size_bytes} bytes but its manifest says {expected!r} (the file is truncated)"
        if hashes and _sha256(path / name) != info.get("sha256"):
            return f"{name} does not match the sha256 in its manifest (the file is corrupt)"
    return None


def _known_files(names: set[str]) -> bool:
    adapter = names - {TENSORS_FILE, STATE_FILE}
    if not {TENSORS_FILE, STATE_FILE} <= names or not all(_ADAPTER_ENTRY.fullmatch(name) for name in adapter):
        return False
    return not adapter or set(_ADAPTER_REQUIRED) <= adapter


def _load_state(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The trainer's state, or why it cannot be used; only tensors and plain data are ever built."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises several types; all mean "not usable"
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        unsafe = "Unsupported global" in str(exc) or "weights_only" in str(exc).lower()
        if unsafe:
            return (
                None,
                f"{STATE_FILE} holds objects other than tensors and plain data; it was not loaded, since "
                "unpickling them could run code",
            )
        return None, f"{STATE_FILE} is unreadable ({detail})"
    if not isinstance(state, dict):
        return None, f"{STATE_FILE} does not hold a state dict"
    return state, None


def _check_identity(path: Path, saved: dict[str, str], wanted: dict[str, str]) -> None:
    if saved == wanted:
        return
    keys = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))

    def describe(identity: dict[str, str]) -> str:
        # repr() keeps the message on one line whatever the values hold.
        return ", ".join(f"{k}={identity[k]!r}" if k in identity else f"no {k}" for k in keys)

    raise EdgetuneError(f"checkpoint {path} was made with {describe(saved)}, not {describe(wanted)}", _NEW_RUN_FIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    # r+b, not rb: Windows only flushes handles opened for writing.
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Windows cannot open a folder for fsync; NTFS journals renames.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
