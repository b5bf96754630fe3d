"""The typed config of ``edgetune train`` and ``edgetune plan``: nested frozen dataclasses, one YAML file on disk.

The YAML file is exactly ``TrainConfig.to_dict()``: five sections (model, data, lora, train, output) of scalars
and lists, no object paths. The sections check their own values on creation, so a typo or a wrong type fails at
once with a one-line ``EdgetuneError`` instead of part-way through a run; ``edgetune.train.config_file`` reads
files and ``section.key=value`` overrides into them. Every field carries one line of help that
``describe_fields`` turns into ``--help`` text, so the docs cannot drift from the code. Limits that need the model
(a sequence longer than it allows) are checked when the run is planned, not here.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from edgetune.errors import EdgetuneError
from edgetune.plan.budget import parse_bytes
from edgetune.plan.components import RunShape
from edgetune.plan.sources import DEFAULT_MODEL_KEY
from edgetune.plan.strategies import DEFAULT_LORA_TARGETS, STRATEGIES, ZerothOrder, resolve_targets
from edgetune.train.config_values import check_minimums, check_types, field_hints, plain, type_name, yaml_entry
from edgetune.train.data import DataConfig
from edgetune.train.loading import LoraSettings
from edgetune.train.schedule import SchedulerKind

# `edgetune train` with no arguments should finish in a few minutes on a 2-core CPU with SmolLM2-135M.
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 4
DEFAULT_STEPS = 60
DEFAULT_EVAL_EVERY = 20
DEFAULT_CHECKPOINT_EVERY = 20
DEFAULT_OUTPUT_DIR = "runs/edgetune"
# Seeds reach torch.Generator, numpy and HiZOO's per-step seeds (seed + step); 32 bits keep all of them valid.
MAX_SEED = 2**32 - 1

Device = Literal["cpu", "cuda", "auto"]

# DataConfig lives in edgetune.train.data and has no field metadata; its help lines live here, next to the others.
_DATA_HELP = {
    "path": "a .txt/.jsonl/.json/.csv/.parquet file, save_to_disk folder or hub data set id; null: Pride and Prejudice",
    "format": "auto detects it from the keys; or text, alpaca, sharegpt, messages, prompt-completion",
    "split": "the split of a hub data set or a saved DatasetDict",
    "subset": "the configuration (subset) of a hub data set, or null",
    "eval_path": "a separate held-out set in any accepted form; null holds out val_fraction of path",
    "eval_split": "the split of eval_path when it is a hub data set or a saved DatasetDict",
    "seq_len": "tokens per packed block or row, and the most tokens one example keeps (at most the model's limit)",
    "val_fraction": "share of examples held out for validation when there is no eval_path, between 0 and 1",
    "seed": "seeds the train/validation split",
    "text_column": "the column or key that holds plain text",
    "chat_template": "chatml, llama3, zephyr or a Jinja file for chat data; null keeps the model's own template",
    "train_on_prompt": "put prompt, system, user and tool tokens in the loss too (default: answers only)",
    "packing": "pack instruction and chat examples into full rows, each attending only to itself",
}


def _field(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class ModelSection:
    """Which model to fine-tune."""

    name: str = _field(
        DEFAULT_MODEL_KEY, "smollm2-135m, a local Hugging Face folder, a .gguf file, or a hub id (org/name)"
    )
    revision: str | None = _field(None, "a hub id's branch, tag or commit hash; null fetches main")

    def __post_init__(self) -> None:
        check_types(self, "model")
        if not self.name.strip():
            raise EdgetuneError("model.name is empty", f"name a model, e.g. model.name={DEFAULT_MODEL_KEY}")
        if self.revision is not None and not self.revision.strip():
            raise EdgetuneError("model.revision is empty", "name a branch, tag or commit hash, or use null for main")


@dataclass(frozen=True)
class LoraSection:
    """LoRA adapter shape; strategies that train every parameter ignore it."""

    rank: int = _field(16, "adapter rank r: more trainable parameters and memory as it grows")
    alpha: float = _field(32.0, "scaling numerator: the adapter output is multiplied by alpha / rank")
    dropout: float = _field(0.0, "dropout on the adapter input during training, in [0, 1)")
    targets: tuple[str, ...] = _field(
        DEFAULT_LORA_TARGETS, "names of the linear modules that get adapters, or all-linear for every one"
    )

    def __post_init__(self) -> None:
        check_types(self, "lora")
        if any(not name.strip() for name in self.targets):
            raise EdgetuneError(
                f"lora.targets={list(self.targets)!r} holds an empty name", "list module names, e.g. [q_proj, v_proj]"
            )
        resolve_targets(self.targets, [])  # refuses all-linear mixed with names
        self.to_settings()  # LoraSettings owns the range checks (rank, alpha, dropout, empty list)

    def to_settings(self) -> LoraSettings:
        """The adapter settings the model loader takes.

        Returns:
            The same rank, alpha, dropout and target modules as a ``LoraSettings``.
        """
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=self.targets)


@dataclass(frozen=True)
class TrainSection:
    """How to train: strategy, length, optimizer knobs, batches, evaluation, device and memory budget."""

    strategy: str | None = _field(None, "a strategy from `edgetune plan`; null takes the planner's recommendation")
    init_adapter: str | None = _field(
        None, "a peft LoRA adapter folder to start from (a run's or checkpoint's adapter/); lora.* must match it"
    )
    lr: float | None = _field(None, "learning rate; null uses the strategy's default")
    steps: int | None = _field(DEFAULT_STEPS, "optimizer steps to run; null when train.epochs sets the length")
    epochs: float | None = _field(None, "passes over the training data (fractions allowed); setting it clears steps")
    scheduler: SchedulerKind | None = _field(
        None,
        "after warmup: linear or cosine decay to 0, or constant; null: linear, constant for forward-only strategies",
    )
    warmup_steps: int = _field(0, "steps of linear warmup from 0 to the learning rate")
    warmup_ratio: float = _field(0.0, "warmup as a share of all steps, in [0, 1); use it or warmup_steps")
    weight_decay: float = _field(0.0, "decoupled weight decay of the optimizer")
    max_grad_norm: float | None = _field(1.0, "clip the gradient norm to this (backprop strategies); null: no clipping")
    zo_eps: float | None = _field(None, "perturbation scale of HiZOO/MeZO/FZOO; null uses 1e-3")
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
        check_types(self, "train")
        _check_strategy(self.strategy)
        self._check_init_adapter()
        for key, example in (
            ("lr", "a learning rate such as 1e-4"),
            ("zo_eps", "1e-3"),
            ("max_grad_norm", "1.0"),
            ("epochs", "1 or 2.5"),
        ):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise EdgetuneError(f"train.{key}={value!r} is not positive", f"set {example}, or null for the default")
        check_minimums(self, "train", batch_size=1, grad_accumulation=1, eval_every=1, max_nonfinite=1)
        check_minimums(self, "train", warmup_steps=0, seed=0)
        if self.seed > MAX_SEED:
            raise EdgetuneError(f"train.seed={self.seed} is above {MAX_SEED}", "set a seed such as 0, 42 or 1234")
        for key in ("steps", "eval_batches"):
            if getattr(self, key) is not None:
                check_minimums(self, "train", **{key: 1})
        self._check_length()
        if not 0.0 <= self.warmup_ratio < 1.0 or self.weight_decay < 0:
            bad = "warmup_ratio" if not 0.0 <= self.warmup_ratio < 1.0 else "weight_decay"
            raise EdgetuneError(f"train.{bad}={getattr(self, bad)!r} is out of range", _RANGES[bad])
        # Parsed once here; the trainer reads budget_bytes and never parses the text again.
        object.__setattr__(self, "_budget_bytes", None if self.budget is None else parse_bytes(self.budget))
        self._check_strategy_knobs()

    def _check_init_adapter(self) -> None:
        if self.init_adapter is None:
            return
        if not self.init_adapter.strip():
            raise EdgetuneError("train.init_adapter is empty", "name a peft adapter folder, or null to start fresh")
        strategy = STRATEGIES.get(self.strategy or "")
        if strategy is not None and not strategy.lora:
            raise EdgetuneError(
                f"train.init_adapter starts from LoRA adapters, but train.strategy={self.strategy} trains every "
                "parameter",
                "pick a LoRA strategy (e.g. adafish-lora or scaled-adamw-qlora-gc), or set train.init_adapter=null",
            )

    def _check_length(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise EdgetuneError(
                f"train.steps={self.steps} and train.epochs={self.epochs} "
                + ("are both set" if self.steps is not None else "are both null"),
                "set one of them and the other to null, e.g. train.epochs=2 train.steps=null",
            )
        if self.warmup_steps and self.warmup_ratio:
            raise EdgetuneError(
                f"train.warmup_steps={self.warmup_steps} and train.warmup_ratio={self.warmup_ratio} are both set",
                "set one of them, the other to 0",
            )

    def _check_strategy_knobs(self) -> None:
        strategy = STRATEGIES.get(self.strategy or "")
        if self.grad_accumulation > 1 and isinstance(strategy, ZerothOrder):
            raise EdgetuneError(
                f"train.grad_accumulation={self.grad_accumulation} has no effect with the forward-only strategy "
                f"{self.strategy}",
                "set train.grad_accumulation=1 and raise train.batch_size instead",
            )
        if self.zo_eps is not None and strategy is not None and strategy.needs_backward:
            raise EdgetuneError(
                f"train.zo_eps={self.zo_eps} has no effect with the backprop strategy {self.strategy}",
                "set train.zo_eps=null, or pick a forward-only strategy (hizoo-, mezo- or fzoo-qlora / -full)",
            )

    @property
    def budget_bytes(self) -> int | None:
        """The memory budget in bytes, or None when the device's free memory is used."""
        return self._budget_bytes

    def total_steps(self, train_examples: int) -> int:
        """Optimizer steps of the run: ``steps``, or what ``epochs`` passes over ``train_examples`` take."""
        if self.steps is not None:
            return self.steps
        batches_per_epoch = math.ceil(train_examples / self.batch_size)
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accumulation))

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``."""
        return self.warmup_steps or round(self.warmup_ratio * total_steps)


_RANGES = {
    "warmup_ratio": "set train.warmup_ratio in [0, 1), e.g. 0.03",
    "weight_decay": "set train.weight_decay >= 0, e.g. 0.0 or 0.01",
}


@dataclass(frozen=True)
class EvalSection:
    """What each evaluation shows besides the held-out loss."""

    prompts: tuple[str, ...] = _field(
        (), "prompts answered greedily at each evaluation, logged in steps.jsonl and shown after the run"
    )
    max_new_tokens: int = _field(48, "the longest answer to each of eval.prompts, in tokens")

    def __post_init__(self) -> None:
        check_types(self, "eval")
        check_minimums(self, "eval", max_new_tokens=1)
        if any(not str(prompt).strip() for prompt in self.prompts):
            raise EdgetuneError("eval.prompts holds an empty prompt", "give each prompt some text, or remove it")


@dataclass(frozen=True)
class OutputSection:
    """Where the adapter, checkpoints and logs go."""

    dir: str = _field(DEFAULT_OUTPUT_DIR, "folder for the adapter, checkpoints, logs and the memory report")
    checkpoint_every: int = _field(DEFAULT_CHECKPOINT_EVERY, "optimizer steps between checkpoints")
    keep_checkpoints: int = _field(2, "newest checkpoints kept; older ones are deleted")
    overwrite: bool = _field(False, "reuse a non-empty output folder, replacing what is there")

    def __post_init__(self) -> None:
        check_types(self, "output")
        if not self.dir.strip():
            raise EdgetuneError("output.dir is empty", f"name a folder, e.g. output.dir={DEFAULT_OUTPUT_DIR}")
        check_minimums(self, "output", checkpoint_every=1, keep_checkpoints=1)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataConfig,
    "lora": LoraSection,
    "train": TrainSection,
    "eval": EvalSection,
    "output": OutputSection,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``edgetune train`` needs; the YAML file on disk is exactly ``to_dict()``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=DEFAULT_SEQ_LEN))
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise EdgetuneError(
                    f"config section {name} is a {type(section).__name__}, not a {cls.__name__}",
                    f"pass {name}={cls.__name__}(...)",
                )

    def run_shape(self) -> RunShape:
        """The shape of the run this config trains, as the planner sizes it."""
        return RunShape(
            batch_size=self.train.batch_size,
            seq_len=self.data.seq_len,
            lora_rank=self.lora.rank,
            lora_targets=tuple(self.lora.targets),
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as plain nested data (lists, not tuples), the shape of the YAML file.

        Returns:
            ``{section: {key: value}}`` for every field.
        """
        return {
            name: {f.name: plain(getattr(getattr(self, name), f.name)) for f in dataclasses.fields(cls)}
            for name, cls in SECTIONS.items()
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
            lines += [f"  {yaml_entry(key, value)}  # {help_by_key[f'{name}.{key}']}" for key, value in values.items()]
        return "\n".join(lines) + "\n"


def describe_fields() -> list[tuple[str, str, str]]:
    """Every config key with its type and help line, for ``--help`` text.

    Returns:
        ``(dotted key, type, help)`` rows in file order, e.g. ``("train.lr", "float | null", "learning rate; ...")``.
    """
    rows = []
    for name, cls in SECTIONS.items():
        types_of = field_hints(cls)
        for f in dataclasses.fields(cls):
            help_text = _DATA_HELP.get(f.name, "") if cls is DataConfig else f.metadata.get("help", "")
            rows.append((f"{name}.{f.name}", type_name(types_of[f.name]), help_text))
    return rows


def _check_strategy(strategy: str | None) -> None:
    if strategy is None or strategy in STRATEGIES:
        return
    close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise EdgetuneError(
        f"unknown strategy train.strategy={strategy!r}",
        f"{hint}use one of {', '.join(STRATEGIES)}, or null to take the planner's recommendation",
    )
