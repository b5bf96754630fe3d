"""Reading configs: a YAML file and ``section.key=value`` overrides into a ``TrainConfig``, and a resumed run's config.

Unknown keys get a did-you-mean that also knows what other tools call a key (``learning_rate``, ``lora_r``,
``max_steps``, ...), so a config carried over from Unsloth, axolotl, LLaMA-Factory or TRL names the edgetune key.
A resumed run keeps its saved ``config.yaml``; only keys that do not change what the run is may differ.
"""

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from edgetune.errors import EdgetuneError
from edgetune.train.config import SECTIONS, TrainConfig
from edgetune.train.config_values import Loader, accepts_str, coerce, field_hints, show

# What other fine-tuning tools (HF Trainer/TRL, peft, axolotl, LLaMA-Factory, Unsloth, torchtune) call edgetune's keys.
ALIASES: dict[str, str] = {
    "learning_rate": "train.lr",
    "max_steps": "train.steps",
    "num_steps": "train.steps",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "gradient_accumulation_steps": "train.grad_accumulation",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler",
    "warmup": "train.warmup_steps",
    "eval_steps": "train.eval_every",
    "optimizer": "train.strategy",
    "optim": "train.strategy",
    "lora_r": "lora.rank",
    "r": "lora.rank",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets",
    "lora_target_modules": "lora.targets",
    "lora_target": "lora.targets",
    "model_name_or_path": "model.name",
    "base_model": "model.name",
    "model_name": "model.name",
    "max_seq_length": "data.seq_len",
    "max_length": "data.seq_len",
    "sequence_len": "data.seq_len",
    "cutoff_len": "data.seq_len",
    "max_seq_len": "data.seq_len",
    "dataset": "data.path",
    "datasets": "data.path",
    "dataset_text_field": "data.text_column",
    "output_dir": "output.dir",
    "save_steps": "output.checkpoint_every",
    "save_total_limit": "output.keep_checkpoints",
}
# Keys a resumed run may change: how long it runs and how often it evaluates and saves, not what it trains.
RESUMABLE_KEYS = (
    "train.steps",
    "train.epochs",
    "train.eval_every",
    "train.eval_batches",
    "train.max_nonfinite",
    "train.force",
    "eval.prompts",
    "eval.max_new_tokens",
    "output.checkpoint_every",
    "output.keep_checkpoints",
)
LENGTH_KEYS = ("steps", "epochs")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file (or start from the defaults), apply ``section.key=value`` overrides, validate it.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: e.g. ``["train.lr=3e-4", "lora.targets=[q_proj,v_proj]", "train.strategy=null"]``; later ones
            win, and all win over the file. Setting one of ``train.steps`` and ``train.epochs`` clears the other.

    Returns:
        The validated config.

    Raises:
        EdgetuneError: the file is missing, unreadable or not a YAML mapping; an override lacks ``=``; a key is
            unknown; a value has the wrong type or is out of range.
    """
    raw = _read_yaml(Path(path).expanduser()) if path is not None else {}
    train = raw.get("train")
    if isinstance(train, dict) and train.get("epochs") is not None and "steps" not in train:
        train["steps"] = None  # a file that gives epochs means them, not the default step count
    for override in overrides:
        _apply_override(raw, override)
    origin = str(path) if path is not None else "the overrides"
    _check_keys(raw, list(SECTIONS), "", origin)
    defaults = TrainConfig()
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name)
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise EdgetuneError(
                f"section {name} in {origin} is {show(values)}, not a mapping of keys",
                f"indent its keys below `{name}:`, e.g. `{name}: {{{dataclasses.fields(cls)[0].name}: ...}}`",
            )
        _check_keys(values, [f.name for f in dataclasses.fields(cls)], f"{name}.", origin)
        types_of = field_hints(cls)
        coerced = {key: coerce(f"{name}.{key}", value, types_of[key]) for key, value in values.items()}
        sections[name] = dataclasses.replace(getattr(defaults, name), **coerced)
    return TrainConfig(**sections)


def resume_config(
    run_dir: str | Path, path: str | Path | None = None, overrides: Sequence[str] = ()
) -> tuple[TrainConfig, list[str]]:
    """The config a resumed run continues with, and the changes it applies (e.g. ``train.steps: 60 -> 100``).

    The run's saved ``config.yaml`` is the base; a config file given with the resume replaces it, and overrides
    apply on top. Only ``RESUMABLE_KEYS`` may differ from the saved config.

    Raises:
        EdgetuneError: the folder has no config.yaml, a file or override does not parse, or a key that defines the
            run (model, strategy, LoRA shape, data, ...) differs; the message names every such key.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        raise EdgetuneError(
            f"{run_dir} has no config.yaml, so it is not an edgetune run folder",
            "pass the output folder of an earlier `edgetune train`",
        )
    where = f"output.dir={run_dir}"
    saved = load_config(saved_path, [where])
    requested = load_config(path if path is not None else saved_path, [*overrides, where])
    before, after = _flat(saved), _flat(requested)
    changed = [key for key in after if after[key] != before[key]]
    fixed = [key for key in changed if key not in RESUMABLE_KEYS]
    if fixed:
        shown = ", ".join(f"{key}={before[key]!r}, not {after[key]!r}" for key in fixed)
        raise EdgetuneError(
            f"{run_dir} holds a run with {shown}, and a resume keeps what a run trains",
            f"resume with the same config (a resume may change only {', '.join(RESUMABLE_KEYS)}), or start a new "
            "run in another output.dir",
        )
    return requested, [f"{key}: {_text(before[key])} -> {_text(after[key])}" for key in changed]


def _flat(config: TrainConfig) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


def _read_yaml(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgetuneError(
            f"config file {path} does not exist", "check the path, or start one with `edgetune train --print-config`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"cannot read config file {path} ({exc})", "pass a readable UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or type(exc).__name__).split())
        raise EdgetuneError(
            f"config file {path} is not valid YAML ({problem}{where})",
            "fix the syntax there: `key: value` pairs, sections indented with spaces",
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EdgetuneError(
            f"config file {path} holds {show(data)} at the top, not a mapping of sections",
            f"start it with section names such as `train:`; valid sections: {', '.join(SECTIONS)}",
        )
    return data


def _apply_override(raw: dict[Any, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip():
        raise EdgetuneError(
            f"override {override!r} has no '='", "write section.key=value, e.g. train.lr=3e-4 or lora.rank=8"
        )
    origin = f"override {override!r}"
    _check_keys({parts[0]: None}, list(SECTIONS), "", origin)
    if len(parts) != 2:
        raise EdgetuneError(
            f"override key {key.strip()!r} is not section.key", f"set one key at a time, e.g. {parts[0]}.<key>=value"
        )
    section, name = parts
    cls = SECTIONS[section]
    _check_keys({name: None}, [f.name for f in dataclasses.fields(cls)], f"{section}.", origin)
    values = raw.get(section)
    if values is None:
        values = raw[section] = {}
    if isinstance(values, dict):  # a non-mapping section is reported when the config is built
        values[name] = _override_value(text.strip(), field_hints(cls)[name])
        if section == "train" and name in LENGTH_KEYS and values[name] is not None:
            # The run's length is steps or epochs: naming one replaces the other, wherever it came from.
            values[LENGTH_KEYS[1 - LENGTH_KEYS.index(name)]] = None


def _override_value(text: str, hint: Any) -> Any:
    try:
        value = yaml.load(text, Loader=Loader) if text else ""
    except yaml.YAMLError:
        value = text
    # A string field keeps the text as typed, so model.name=1e3 or data.path=2024 stay strings; only null is special.
    if value is not None and not isinstance(value, str) and accepts_str(hint):
        return text
    return value


def _check_keys(values: dict[Any, Any], valid: list[str], prefix: str, origin: str) -> None:
    for key in values:
        if key not in valid:
            where = prefix.rstrip(".") or "the top level"
            alias = ALIASES.get(str(key))
            if alias is not None:
                hint = f"did you mean {alias}? ({key} is its name in other tools) "
            else:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise EdgetuneError(
                f"unknown key {prefix}{key} in {origin}", f"{hint}valid keys in {where}: {', '.join(valid)}"
            )
