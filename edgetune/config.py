"""The typed config of ``edgetune train``: nested frozen dataclasses, a YAML file on disk, dotted overrides.

The YAML file is exactly ``TrainConfig.to_dict()``: five sections (model, data, lora, train, output) of scalars
and lists, no object paths. ``load_config`` reads a file, applies ``section.key=value`` overrides and builds the
dataclasses with strict types, so a typo or a wrong type fails at once with a one-line ``EdgetuneError`` instead
of part-way through a run. Every field carries one line of help that ``describe_fields`` turns into ``--help``
text, so the docs cannot drift from the code. Limits that need the model (a sequence longer than it allows) are
checked by the trainer, not here.
"""

import dataclasses
import difflib
import functools
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgetune.budget import parse_bytes
from edgetune.data import DataConfig
from edgetune.errors import EdgetuneError
from edgetune.loading import DEFAULT_LORA_TARGETS, LoraSettings
from edgetune.sources import DEFAULT_MODEL_KEY
from edgetune.strategies import STRATEGIES, ZerothOrder

# `edgetune train` with no arguments should finish in a few minutes on a 2-core CPU with SmolLM2-135M.
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 4
DEFAULT_STEPS = 60
DEFAULT_EVAL_EVERY = 20
DEFAULT_CHECKPOINT_EVERY = 20
DEFAULT_OUTPUT_DIR = "runs/edgetune"

Device = Literal["cpu", "cuda", "auto"]

# DataConfig lives in edgetune.data and has no field metadata; its help lines live here, next to the others.
_DATA_HELP = {
    "path": "a .txt, .jsonl or .csv file; null uses the bundled Pride and Prejudice text",
    "seq_len": "tokens per packed block, and the most tokens one example keeps (at most the model's limit)",
    "val_fraction": "share of examples held out for validation, between 0 and 1",
    "seed": "seeds the train/validation split",
    "text_column": "the .csv column or .jsonl key that holds plain text",
}


def _field(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class ModelSection:
    """Which model to fine-tune."""

    name: str = _field(DEFAULT_MODEL_KEY, "smollm2-135m, a local Hugging Face folder, or a hub id already cached")

    def __post_init__(self) -> None:
        _check_types(self, "model")
        if not self.name.strip():
            raise EdgetuneError("model.name is empty", f"name a model, e.g. model.name={DEFAULT_MODEL_KEY}")


@dataclass(frozen=True)
class LoraSection:
    """LoRA adapter shape; strategies that train every parameter ignore it."""

    rank: int = _field(16, "adapter rank r: more trainable parameters and memory as it grows")
    alpha: float = _field(32.0, "scaling numerator: the adapter output is multiplied by alpha / rank")
    dropout: float = _field(0.0, "dropout on the adapter input during training, in [0, 1)")
    targets: tuple[str, ...] = _field(DEFAULT_LORA_TARGETS, "names of the linear modules that get adapters")

    def __post_init__(self) -> None:
        _check_types(self, "lora")
        if any(not name.strip() for name in self.targets):
            raise EdgetuneError(
                f"lora.targets={list(self.targets)!r} holds an empty name", "list module names, e.g. [q_proj, v_proj]"
            )
        self.to_settings()  # LoraSettings owns the range checks (rank, alpha, dropout, empty list)

    def to_settings(self) -> LoraSettings:
        """The adapter settings the model loader takes.

        Returns:
            The same rank, alpha, dropout and target modules as a ``LoraSettings``.
        """
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=self.targets)


@dataclass(frozen=True)
class TrainSection:
    """How to train: strategy, optimizer steps, batches, evaluation, device and memory budget."""

    strategy: str | None = _field(None, "a strategy from `edgetune plan`; null takes the planner's recommendation")
    lr: float | None = _field(None, "learning rate; null uses the strategy's default")
    steps: int = _field(DEFAULT_STEPS, "optimizer steps to run")
    batch_size: int = _field(DEFAULT_BATCH_SIZE, "examples per forward pass: more memory, smoother steps")
    grad_accumulation: int = _field(1, "batches summed into one optimizer step (backprop strategies only)")
    eval_every: int = _field(DEFAULT_EVAL_EVERY, "optimizer steps between validation losses")
    eval_batches: int | None = _field(None, "validation batches per evaluation; null uses the whole split")
    seed: int = _field(0, "seeds adapter initialisation, batch order and zeroth-order perturbations")
    device: Device = _field("auto", "cpu, cuda, or auto (cuda when a GPU is present)")
    max_nonfinite: int = _field(5, "the run stops after this many NaN/inf losses in a row (those steps are skipped)")
    budget: str | None = _field(None, "memory to plan for, e.g. 6GiB; null uses the device's free memory")
    force: bool = _field(False, "train even when the planner says the run does not fit the budget")

    def __post_init__(self) -> None:
        _check_types(self, "train")
        _check_strategy(self.strategy)
        if self.lr is not None and self.lr <= 0:
            raise EdgetuneError(
                f"train.lr={self.lr!r} is not positive", "set a learning rate such as 1e-4, or null for the default"
            )
        _check_minimums(self, "train", steps=1, batch_size=1, grad_accumulation=1, eval_every=1, max_nonfinite=1)
        if self.eval_batches is not None:
            _check_minimums(self, "train", eval_batches=1)
        if self.budget is not None:
            parse_bytes(self.budget)
        if self.grad_accumulation > 1 and isinstance(STRATEGIES.get(self.strategy or ""), ZerothOrder):
            raise EdgetuneError(
                f"train.grad_accumulation={self.grad_accumulation} has no effect with the forward-only strategy "
                f"{self.strategy}",
                "set train.grad_accumulation=1 and raise train.batch_size instead",
            )

    @property
    def budget_bytes(self) -> int | None:
        """The memory budget in bytes, or None when the device's free memory is used."""
        return None if self.budget is None else parse_bytes(self.budget)


@dataclass(frozen=True)
class OutputSection:
    """Where the adapter, checkpoints and logs go."""

    dir: str = _field(DEFAULT_OUTPUT_DIR, "folder for the adapter, checkpoints, logs and the memory report")
    checkpoint_every: int = _field(DEFAULT_CHECKPOINT_EVERY, "optimizer steps between checkpoints")
    keep_checkpoints: int = _field(2, "newest checkpoints kept; older ones are deleted")
    overwrite: bool = _field(False, "reuse a non-empty output folder, replacing what is there")

    def __post_init__(self) -> None:
        _check_types(self, "output")
        if not self.dir.strip():
            raise EdgetuneError("output.dir is empty", f"name a folder, e.g. output.dir={DEFAULT_OUTPUT_DIR}")
        _check_minimums(self, "output", checkpoint_every=1, keep_checkpoints=1)


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataConfig,
    "lora": LoraSection,
    "train": TrainSection,
    "output": OutputSection,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``edgetune train`` needs; the YAML file on disk is exactly ``to_dict()``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=DEFAULT_SEQ_LEN))
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise EdgetuneError(
                    f"config section {name} is a {type(section).__name__}, not a {cls.__name__}",
                    f"pass {name}={cls.__name__}(...)",
                )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as plain nested data (lists, not tuples), the shape of the YAML file.

        Returns:
            ``{section: {key: value}}`` for every field.
        """
        return {
            name: {f.name: _plain(getattr(getattr(self, name), f.name)) for f in dataclasses.fields(cls)}
            for name, cls in _SECTIONS.items()
        }

    def to_yaml(self, path: str = "this.yaml") -> str:
        """The config as YAML that ``load_config`` reads back to an equal config, one help comment per key.

        Args:
            path: the file name the first-line comment uses in its ``edgetune train`` command.

        Returns:
            The YAML text, starting with a comment that says how to run it.
        """
        help_by_key = {key: text for key, _, text in describe_fields()}
        lines = [f"# edgetune train {path}", f"# Any key can be overridden: edgetune train {path} train.steps=100"]
        for name, values in self.to_dict().items():
            lines.append(f"{name}:")
            lines += [f"  {_yaml_entry(key, value)}  # {help_by_key[f'{name}.{key}']}" for key, value in values.items()]
        return "\n".join(lines) + "\n"


def describe_fields() -> list[tuple[str, str, str]]:
    """Every config key with its type and help line, for ``--help`` text.

    Returns:
        ``(dotted key, type, help)`` rows in file order, e.g. ``("train.lr", "float | null", "learning rate; ...")``.
    """
    rows = []
    for name, cls in _SECTIONS.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            help_text = _DATA_HELP.get(f.name, "") if cls is DataConfig else f.metadata.get("help", "")
            rows.append((f"{name}.{f.name}", _type_name(hints[f.name]), help_text))
    return rows


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file (or start from the defaults), apply ``section.key=value`` overrides, validate it.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: e.g. ``["train.lr=3e-4", "lora.targets=[q_proj,v_proj]", "train.strategy=null"]``; later ones
            win, and all win over the file.

    Returns:
        The validated config.

    Raises:
        EdgetuneError: the file is missing, unreadable or not a YAML mapping; an override lacks ``=``; a key is
            unknown; a value has the wrong type or is out of range.
    """
    raw = _read_yaml(Path(path).expanduser()) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    origin = str(path) if path is not None else "the overrides"
    _check_keys(raw, list(_SECTIONS), "", origin)
    defaults = TrainConfig()
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name)
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise EdgetuneError(
                f"section {name} in {origin} is {_show(values)}, not a mapping of keys",
                f"indent its keys below `{name}:`, e.g. `{name}: {{{dataclasses.fields(cls)[0].name}: ...}}`",
            )
        _check_keys(values, [f.name for f in dataclasses.fields(cls)], f"{name}.", origin)
        hints = _hints(cls)
        coerced = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
        sections[name] = dataclasses.replace(getattr(defaults, name), **coerced)
    return TrainConfig(**sections)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1, and so PyYAML, demands ``3.0e-4``)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as ``1e5``, so they load back as strings."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
_DUMP_OPTIONS: dict[str, Any] = {"Dumper": _Dumper, "sort_keys": False, "width": 1 << 30, "allow_unicode": True}


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
        data = yaml.load(text, Loader=_Loader)
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
            f"config file {path} holds {_show(data)} at the top, not a mapping of sections",
            f"start it with section names such as `train:`; valid sections: {', '.join(_SECTIONS)}",
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
    _check_keys({parts[0]: None}, list(_SECTIONS), "", origin)
    if len(parts) != 2:
        raise EdgetuneError(
            f"override key {key.strip()!r} is not section.key", f"set one key at a time, e.g. {parts[0]}.<key>=value"
        )
    section, name = parts
    cls = _SECTIONS[section]
    _check_keys({name: None}, [f.name for f in dataclasses.fields(cls)], f"{section}.", origin)
    values = raw.get(section)
    if values is None:
        values = raw[section] = {}
    if isinstance(values, dict):  # a non-mapping section is reported when the config is built
        values[name] = _override_value(text.strip(), _hints(cls)[name])


def _override_value(text: str, hint: Any) -> Any:
    try:
        value = yaml.load(text, Loader=_Loader) if text else ""
    except yaml.YAMLError:
        value = text
    # A string field keeps the text as typed, so model.name=1e3 or data.path=2024 stay strings; only null is special.
    if value is not None and not isinstance(value, str) and _accepts_str(hint):
        return text
    return value


def _check_keys(values: dict[Any, Any], valid: list[str], prefix: str, origin: str) -> None:
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            where = prefix.rstrip(".") or "the top level"
            raise EdgetuneError(
                f"unknown key {prefix}{key} in {origin}", f"{hint}valid keys in {where}: {', '.join(valid)}"
            )


def _check_types(section: Any, name: str) -> None:
    """Type-check (and normalise: int to float, list to tuple) every field of a section built in Python."""
    hints = _hints(type(section))
    for f in dataclasses.fields(section):
        object.__setattr__(section, f.name, _coerce(f"{name}.{f.name}", getattr(section, f.name), hints[f.name]))


def _check_minimums(section: Any, name: str, **minimums: int) -> None:
    for key, low in minimums.items():
        value = getattr(section, key)
        if value < low:
            raise EdgetuneError(f"{name}.{key}={value} is below {low}", f"set {name}.{key} to an integer >= {low}")


def _check_strategy(strategy: str | None) -> None:
    if strategy is None or strategy in STRATEGIES:
        return
    close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise EdgetuneError(
        f"unknown strategy train.strategy={strategy!r}",
        f"{hint}use one of {', '.join(STRATEGIES)}, or null to take the planner's recommendation",
    )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """The value for a field of type ``hint``, after strict checks: no bools as numbers, no floats as ints."""
    if isinstance(hint, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, str) and value in allowed:
            return value
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint_text = f"did you mean {close[0]}? " if close else ""
        raise EdgetuneError(f"{key}={_show(value)} is not allowed", f"{hint_text}use one of {', '.join(allowed)}")
    if hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not abs(value) <= sys.float_info.max:  # NaN compares False too; huge ints would overflow float()
            raise EdgetuneError(f"{key}={value!r} is not a finite number", f"set {key} to a number such as 1e-4")
        return float(value)
    if typing.get_origin(hint) is tuple:
        items = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(item, str) for item in items):
            return tuple(items)
    expected = "a list of names" if typing.get_origin(hint) is tuple else _EXPECTED[hint]
    unquote = " without quotes" if isinstance(value, str) else ""
    raise EdgetuneError(f"{key} must be {expected}, got {_show(value)}", f"set {key} to {expected}{unquote}")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _accepts_str(hint: Any) -> bool:
    return hint is str or isinstance(hint, types.UnionType) and str in typing.get_args(hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " | ".join("null" if arg is type(None) else _type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " | ".join(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "list[str]"
    return hint.__name__


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _show(value: Any) -> str:
    """A short, one-line picture of a value and its type for error messages."""
    if value is None:
        return "null"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _yaml_entry(key: str, value: Any) -> str:
    # Double quotes keep strings with newlines or tabs on one line (escaped), so the help comment can follow.
    style = '"' if isinstance(value, str) and not value.isprintable() else None
    flow = None if isinstance(value, list) else False  # None: lists of names in [a, b] form, scalars plain
    text = yaml.dump({key: value}, default_flow_style=flow, default_style=style, **_DUMP_OPTIONS)
    return text.rstrip("\n")
