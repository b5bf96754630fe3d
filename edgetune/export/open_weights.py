"""What ``edgetune export``, ``chat`` and ``generate`` take: a run folder, one of its checkpoints, or a peft adapter.

- A run folder: its finished result (``open_finished_run``).
- A checkpoint, ``RUN/checkpoints/step-N``: the base and strategy the run trained with (its manifest's identity,
  the same as the run's ``run.json``), the weights from the checkpoint's ``adapter/``, used only once the
  manifest's sizes and hashes check out.
- A peft LoRA adapter folder from anywhere, with ``base`` (a model name, folder, .gguf or hub id, as
  ``resolve_model`` takes): there is no architecture hash to compare, so ``check_same_base`` checks the adapter's
  modules and shapes against the base instead; the base is used in bf16 (float32 on a CPU), like a bf16 run's.

Each is described as a ``FinishedRun``, so the merge and the chat loader treat all three alike.
"""

import json
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export.finished_run import FinishedRun, open_finished_run
from edgetune.plan.strategies import Inference, get_strategy
from edgetune.train.adapter_folder import is_adapter_folder, read_adapter_folder
from edgetune.train.checkpoint import ADAPTER_DIR, is_checkpoint_folder, verified_manifest
from edgetune.train.run_folder import RUN_FILE, SOURCE_FILE, is_run_identity

# An adapter trained elsewhere: no edgetune strategy trained it; it is loaded and merged like a bf16 run's.
FOREIGN_ADAPTER = Inference(name="peft-adapter", base="bf16", lora=True, summary="a peft LoRA adapter from elsewhere")
_WHAT = "a run folder of `edgetune train`, one of its checkpoints/step-N folders, or a peft adapter folder with --base"


def open_weights(path: str | Path, *, base: str | None = None) -> FinishedRun:
    """Describe a run folder, a checkpoint folder or (with ``base``) a peft adapter folder, checked.

    Raises:
        EdgetuneError: not a folder, none of the three, ``base`` given for a run or checkpoint (which name their
            own base) or missing for an adapter, or a damaged, incomplete or full-parameter checkpoint.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise EdgetuneError(f"{folder} is not a folder", f"pass {_WHAT}")
    if (folder / RUN_FILE).is_file() or is_checkpoint_folder(folder):
        if base is not None:
            raise EdgetuneError(
                f"--base {base} was given for {folder}, which names the base it was trained on",
                "drop --base; it is for a peft adapter folder trained elsewhere",
            )
        return open_finished_run(folder) if (folder / RUN_FILE).is_file() else open_checkpoint(folder)
    if is_adapter_folder(folder):
        return open_adapter(folder, base)
    raise EdgetuneError(
        f"{folder} is not an edgetune run folder (no {RUN_FILE}), a checkpoint or a peft adapter folder",
        f"pass {_WHAT}",
    )


def open_checkpoint(folder: Path) -> FinishedRun:
    """The adapters of one checkpoint of a LoRA run, with the run's base and strategy.

    Raises:
        EdgetuneError: the checkpoint fails its manifest, is of a full-parameter run, or predates ``adapter/``.
    """
    run_dir = folder.parent.parent if (folder.parent.parent / RUN_FILE).is_file() else folder
    manifest = verified_manifest(folder)
    identity = manifest["identity"]
    if not is_run_identity(identity):
        raise EdgetuneError(f"checkpoint {folder} does not say which run made it", "pass the run folder instead")
    if not get_strategy(identity["strategy"]).lora:
        raise EdgetuneError(
            f"checkpoint {folder} is of a {identity['strategy']} run, whose checkpoints hold weights for resume only",
            f"export or chat with the finished run ({run_dir}), or finish it with `edgetune train --resume {run_dir}`",
        )
    adapter_dir = folder / ADAPTER_DIR
    if f"{ADAPTER_DIR}/adapter_config.json" not in manifest["files"]:
        raise EdgetuneError(
            f"checkpoint {folder} has no {ADAPTER_DIR}/ folder (an older edgetune wrote it)",
            f"pass the finished run ({run_dir}), or resume it with `edgetune train --resume {run_dir}` for new "
            "checkpoints",
        )
    recorded = _provenance(adapter_dir)
    # The strategy that wrote these weights: an out-of-memory move may have left the run's first one.
    strategy = get_strategy(str(recorded.get("strategy") or identity["strategy"]))
    revision = recorded.get("revision") if isinstance(recorded.get("revision"), str) else identity.get("revision")
    return FinishedRun(
        run_dir, identity["model"], strategy, adapter_dir, identity["architecture"], revision, origin="checkpoint"
    )


def open_adapter(folder: Path, base: str | None) -> FinishedRun:
    """A peft LoRA adapter folder trained elsewhere, to be used on ``base`` (``check_same_base`` checks the fit).

    Raises:
        EdgetuneError: no ``base``, or the folder is not a LoRA adapter edgetune can load.
    """
    adapter = read_adapter_folder(folder, "pass a folder that `PeftModel.save_pretrained` wrote, with --base MODEL")
    if base is None:
        raise EdgetuneError(
            f"{folder} is a peft adapter folder, which does not say for certain which weights it was trained on",
            f"pass --base MODEL (the adapter names {adapter.base or 'no base'})",
        )
    return FinishedRun(folder, base, FOREIGN_ADAPTER, folder, None, origin="adapter")


def _provenance(adapter_dir: Path) -> dict:
    try:
        value = json.loads((adapter_dir / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
