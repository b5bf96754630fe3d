"""Reading a finished run folder back: which base, which strategy, and the trained weights, all checked.

The exporters start here, so every way a folder can be unusable (not a run, unfinished, a damaged adapter, a
base model that changed since training) ends in one ``EdgetuneError`` that names the folder and the fix.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import ModelSource
from edgetune.plan.strategies import Strategy, get_strategy
from edgetune.train.run_folder import RUN_FILE, SOURCE_FILE, architecture_hash, is_run_identity

logger = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class FinishedRun:
    """A run folder whose result can be loaded.

    Attributes:
        run_dir: the folder.
        model_name: the ``model.name`` the run trained (an alias, a folder, a .gguf file or a hub id).
        strategy: the strategy of the saved weights (the last one, if an out-of-memory fallback changed it).
        weights_dir: ``adapter/`` (LoRA runs, peft format) or ``model/`` (full-parameter runs).
        architecture: the hash of the base's config.json recorded when the run started; None for a peft adapter
            trained elsewhere, whose modules and shapes are checked against the base instead.
        revision: for a hub model, the commit the run trained on (else the revision it pinned), so an export
            merges into those weights even after the hub's main branch moved.
        origin: ``run`` (a finished run), ``checkpoint`` (a checkpoint's ``adapter/``, see
            ``edgetune.export.open_weights``) or ``adapter`` (a peft adapter folder from elsewhere).
    """

    run_dir: Path
    model_name: str
    strategy: Strategy
    weights_dir: Path
    architecture: str | None
    revision: str | None = None
    origin: str = "run"

    @property
    def is_lora(self) -> bool:
        return self.strategy.lora


def open_finished_run(path: str | Path) -> FinishedRun:
    """Check a run folder and describe what it produced.

    Raises:
        EdgetuneError: not a folder, not an edgetune run, no saved result, or a missing or damaged adapter.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise EdgetuneError(f"{run_dir} is not a folder", "pass the output folder of an `edgetune train` run")
    identity = _read_json(run_dir / RUN_FILE, run_dir).get("identity")
    if not is_run_identity(identity):
        raise EdgetuneError(
            f"{run_dir / RUN_FILE} does not describe an edgetune run", "pass the output folder of `edgetune train`"
        )
    summary_file = run_dir / "summary.json"
    summary = _read_json(summary_file, run_dir) if summary_file.is_file() else {}
    strategy = get_strategy(str(summary.get("strategy") or identity["strategy"]))
    status = summary.get("status", "finished")
    if status != "finished":
        logger.warning(
            "%s ended %r after %s steps: the export holds that model, not a finished run's (finish it with "
            "`edgetune train --resume %s`)",
            run_dir,
            status,
            summary.get("steps_done", "?"),
            run_dir,
        )
    weights_dir = run_dir / ("adapter" if strategy.lora else "model")
    if not weights_dir.is_dir():
        raise EdgetuneError(
            f"{run_dir} has no {weights_dir.name}/ folder, so its training did not finish",
            f"finish it with `edgetune train --resume {run_dir}`",
        )
    if strategy.lora:
        _check_adapter(weights_dir, run_dir)
    revision = _trained_revision(weights_dir, run_dir) or identity.get("revision")
    return FinishedRun(run_dir, str(identity["model"]), strategy, weights_dir, str(identity["architecture"]), revision)


def _trained_revision(weights_dir: Path, run_dir: Path) -> str | None:
    """The hub commit recorded beside the weights; runs saved before edgetune recorded it have none."""
    recorded = weights_dir / SOURCE_FILE
    if not recorded.is_file():
        return None
    revision = _read_json(recorded, run_dir).get("revision")
    return revision if isinstance(revision, str) else None


def tokenizer_dir(run: FinishedRun, source: ModelSource) -> Path:
    """The tokenizer a run's weights go with: the one training saved beside them (with the chat template it
    rendered, which the base's may lack), else the base's (a peft adapter from elsewhere may come without one)."""
    return run.weights_dir if (run.weights_dir / "tokenizer_config.json").is_file() else source.path


def load_run_tokenizer(run: FinishedRun, source: ModelSource):  # -> transformers.PreTrainedTokenizerBase
    """The tokenizer of ``tokenizer_dir``; the base's gets a pad token as training gave it one."""
    from transformers import AutoTokenizer

    from edgetune.train.loading import load_tokenizer

    folder = tokenizer_dir(run, source)
    return AutoTokenizer.from_pretrained(folder) if folder == run.weights_dir else load_tokenizer(source)


def check_same_base(run: FinishedRun, source: ModelSource, on_event: Callable[[str], None] | None = None) -> None:
    """Refuse a base whose config changed since training: the adapters would be merged into another model.

    An adapter from elsewhere has no recorded hash: its adapted modules and their shapes must exist in the base.

    Raises:
        EdgetuneError: the config.json hash differs from the one the run recorded, or the adapter does not fit.
    """
    if run.architecture is None:
        adapter = _check_adapter_fits(run, source)
        (on_event or logger.info)(
            f"{run.weights_dir}: rank-{adapter.rank} LoRA adapter trained on {adapter.base or 'an unnamed base'}, "
            f"used on {run.model_name}"
        )
        return
    if architecture_hash(source) != run.architecture:
        raise EdgetuneError(
            f"the base model {run.model_name} ({source.path}) is not the one {run.run_dir} was trained on "
            "(its config.json changed)",
            "restore the original model folder, or train again on the new one",
        )


def _check_adapter_fits(run: FinishedRun, source: ModelSource):  # -> AdapterFolder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.train.adapter_folder import check_fits, read_adapter_folder

    fix = "pass the --base the adapter was trained on (same architecture and size)"
    adapter = read_adapter_folder(run.weights_dir, fix)
    with torch.device("meta"):  # the module tree and shapes only, no memory
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source.config_file))
    check_fits(adapter, skeleton, run.model_name, fix)
    return adapter


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EdgetuneError(
            f"{run_dir} is not an edgetune run folder (no {path.name})", "pass the output folder of `edgetune train`"
        )
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"{path} is damaged ({exc})", "pass an intact run folder, or train again") from exc
    if not isinstance(value, dict):
        raise EdgetuneError(f"{path} is damaged (not a JSON object)", "pass an intact run folder, or train again")
    return value


def _check_adapter(adapter_dir: Path, run_dir: Path) -> None:
    from safetensors import SafetensorError, safe_open

    fix = f"retrain, or resume the run from its last checkpoint: `edgetune train --resume {run_dir}`"
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise EdgetuneError(f"the adapter in {adapter_dir} is incomplete (no {', '.join(missing)})", fix)
    config = _read_json(adapter_dir / "adapter_config.json", run_dir)
    if config.get("peft_type") != "LORA":
        raise EdgetuneError(f"{adapter_dir / 'adapter_config.json'} is not a LoRA adapter config", fix)
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(weights, framework="pt") as handle:
            names = list(handle.keys())
            for name in names:  # reads every tensor: a truncated file fails here, not halfway through a merge
                handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise EdgetuneError(f"the adapter file {weights} is damaged ({str(exc).splitlines()[0]})", fix) from exc
    if not any("lora_A" in name for name in names):
        raise EdgetuneError(f"the adapter file {weights} holds no LoRA weights", fix)
