"""Load a fine-tuning data set into token examples, split it, pack it and batch it.

``edgetune.train.data_sources`` reads the rows (.txt, .jsonl, .json, .csv, .parquet, a ``save_to_disk`` folder or a
hub data set), ``edgetune.train.data_formats`` detects their format and turns them into canonical samples, and
``edgetune.train.tokens`` makes token pairs with loss masks. Plain text is concatenated (eos between documents) and
cut into blocks of exactly ``seq_len`` tokens; instruction and chat examples are packed whole into rows of at most
``seq_len`` tokens (``edgetune.train.packing``), or padded per batch with ``packing=False``. Without a path, the
bundled first chapters of *Pride and Prejudice* are used.

An example is a dict with ``input_ids`` and ``labels`` (1-D ``torch.long`` tensors, labels ``-100`` where there is
no loss), ``length`` (int) and, for packed rows, ``position_ids``.
"""

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgetune.errors import EdgetuneError
from edgetune.train.batching import pack
from edgetune.train.chat_templates import apply_template, require_template
from edgetune.train.data_formats import FORMATS, Samples, normalise
from edgetune.train.data_sources import read_data
from edgetune.train.tokens import IGNORE_INDEX, sample_pairs, truncate_pairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Example = dict[str, Any]


@dataclass(frozen=True)
class DataConfig:
    """Where the data is, what it looks like, and how to cut it.

    Args:
        path: a .txt, .jsonl, .json, .csv or .parquet file, a ``save_to_disk`` folder, or a hub data set id; None
            uses the bundled Pride and Prejudice text.
        format: ``auto`` (detected from the keys) or one of text, alpaca, sharegpt, messages, prompt-completion.
        split: the split of a hub data set or a saved ``DatasetDict``.
        subset: the configuration (subset) of a hub data set.
        eval_path: a separate held-out set in any accepted form; None holds out ``val_fraction`` of ``path``.
        eval_split: the split of ``eval_path`` when it is a hub data set or a saved ``DatasetDict``.
        seq_len: tokens per packed block or row, and the most tokens one example keeps.
        val_fraction: share of examples held out for validation (at least one example) without ``eval_path``.
        seed: seeds the train/validation split.
        text_column: the column or key that holds plain text.
        chat_template: a built-in template (chatml, llama3, zephyr) or a Jinja file; None keeps the model's own.
        train_on_prompt: put prompt, system, user and tool tokens in the loss too.
        packing: pack instruction and chat examples into full rows (each attends only to itself).
    """

    path: str | None = None
    format: str = "auto"
    split: str = "train"
    subset: str | None = None
    eval_path: str | None = None
    eval_split: str = "test"
    seq_len: int = 256
    val_fraction: float = 0.1
    seed: int = 0
    text_column: str = "text"
    chat_template: str | None = None
    train_on_prompt: bool = False
    packing: bool = True

    def __post_init__(self) -> None:
        for key in ("path", "eval_path", "subset", "chat_template"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise EdgetuneError(f"data.{key}={value!r} is invalid", "give a non-empty string, or null")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise EdgetuneError(f"seq_len={self.seq_len!r} is invalid", "set seq_len to an integer >= 2")
        if not isinstance(self.val_fraction, int | float) or not 0 < self.val_fraction < 1:
            raise EdgetuneError(f"val_fraction={self.val_fraction!r} is invalid", "set val_fraction between 0 and 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise EdgetuneError(f"seed={self.seed!r} is invalid", "set seed to an integer from 0 to 4294967295")
        for key in ("text_column", "split", "eval_split"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise EdgetuneError(f"data.{key}={getattr(self, key)!r} is invalid", "give a non-empty name")
        if self.format not in ("auto", *FORMATS):
            raise EdgetuneError(f"data.format={self.format!r} is unknown", f"use auto or one of {', '.join(FORMATS)}")
        for key in ("train_on_prompt", "packing"):
            if not isinstance(getattr(self, key), bool):
                raise EdgetuneError(f"data.{key}={getattr(self, key)!r} is invalid", "set it to true or false")


@dataclass(frozen=True)
class DataStats:
    """What loading produced, for the data report printed before training.

    Args:
        source: the data as messages name it.
        format: the detected (or chosen) row format.
        n_rows: rows read (documents for text), training source plus a separate eval source.
        n_examples: examples after dropping, train plus validation (packed text blocks for text).
        n_held_out: of those, the validation examples.
        n_train_tokens: tokens in the training examples.
        n_val_tokens: tokens in the validation examples.
        n_loss_tokens: training tokens that count in the loss.
        n_truncated: examples cut to seq_len.
        dropped: rows dropped, by reason.
        n_remainder_tokens: text tokens after the last full block, in no example.
        n_train_rows: rows the trainer draws batches from (packed rows when packing).
        packed: whether instruction or chat examples were packed.
    """

    source: str
    format: str
    n_rows: int
    n_examples: int
    n_held_out: int
    n_train_tokens: int
    n_val_tokens: int
    n_loss_tokens: int
    n_truncated: int
    dropped: dict[str, int] = field(default_factory=dict)
    n_remainder_tokens: int = 0
    n_train_rows: int = 0
    packed: bool = False

    def describe(self) -> str:
        """The data report in one line."""
        total = self.n_train_tokens + self.n_val_tokens
        share = self.n_loss_tokens / max(self.n_train_tokens, 1)
        line = (
            f"data: {self.format} from {self.source}: {self.n_rows:,} row{'s' if self.n_rows != 1 else ''}, "
            f"{self.n_examples:,} examples ({self.n_examples - self.n_held_out:,} training, {self.n_held_out:,} held "
            f"out), "
            f"{total:,} tokens ({share:.0%} of training tokens in the loss)"
        )
        if self.packed:
            line += f", packed into {self.n_train_rows:,} training rows"
        line += f"; {self.n_truncated:,} truncated"
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in self.dropped.items())
        line += f", {dropped:,} dropped" + (f" ({reasons})" if reasons else "")
        if self.n_remainder_tokens:
            line += f", {self.n_remainder_tokens:,} tokens after the last full block unused"
        return line


@dataclass(frozen=True)
class TokenizedData:
    """Train and validation examples plus loading statistics.

    Args:
        train: training examples (packed rows when packing).
        val: validation examples (packed rows when packing).
        stats: counts describing the load.
        warnings: things the user should know about the data (printed before training).
    """

    train: list[Example]
    val: list[Example]
    stats: DataStats
    warnings: tuple[str, ...] = ()


def default_data_path() -> Path:
    """Path of the bundled default data set.

    Returns:
        The bundled Pride and Prejudice text (Chapters 1-18, public domain; provenance in assets/README.md).
    """
    return Path(str(resources.files("edgetune").joinpath("assets", "pride_and_prejudice.txt")))


def load_dataset(cfg: DataConfig, tokenizer: "PreTrainedTokenizerBase") -> TokenizedData:
    """Read, tokenize, split and pack the data set that ``cfg`` names.

    Args:
        cfg: the data settings.
        tokenizer: a Hugging Face tokenizer; chat data needs a chat template (its own or ``cfg.chat_template``),
            which is set on this tokenizer so that the run saves it.

    Returns:
        The deterministic train/validation split and its statistics.

    Raises:
        EdgetuneError: the data cannot be read, a row does not fit its format, the template is missing or
            renders no assistant turn, or too few examples are left to train and validate.
    """
    warnings = apply_template(tokenizer, cfg.chat_template)
    train_part = _tokenized(
        read_data(cfg.path or str(default_data_path()), split=cfg.split, subset=cfg.subset), cfg, tokenizer
    )
    if cfg.eval_path is None:
        train, val = _split(train_part.examples, cfg.val_fraction, cfg.seed, train_part.source)
        parts = [train_part]
    else:
        eval_part = _tokenized(read_data(cfg.eval_path, split=cfg.eval_split, subset=cfg.subset), cfg, tokenizer)
        if not eval_part.examples:
            raise EdgetuneError(f"{eval_part.source} gives no evaluation example", "check data.eval_path and its rows")
        train, val, parts = train_part.examples, eval_part.examples, [train_part, eval_part]
    if not train:
        raise EdgetuneError(f"{train_part.source} gives no training example", "use more data or a larger seq_len")
    packed, n_held_out = cfg.packing and train_part.format != "text", len(val)
    if packed:
        train, val = pack(train, cfg.seq_len), pack(val, cfg.seq_len)
    stats = _stats(parts, train, val, packed, n_held_out)
    logger.debug("loaded %s", stats)
    return TokenizedData(train=train, val=val, stats=stats, warnings=tuple(warnings))


def _stats(parts: list["_Part"], train: list[Example], val: list[Example], packed: bool, n_held_out: int) -> DataStats:
    dropped: dict[str, int] = {}
    for part in parts:
        for reason, n in part.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return DataStats(
        source=parts[0].source,
        format=parts[0].format,
        n_rows=sum(part.n_rows for part in parts),
        n_examples=sum(len(part.examples) for part in parts),
        n_held_out=n_held_out,
        n_train_tokens=sum(int(ex["length"]) for ex in train),
        n_val_tokens=sum(int(ex["length"]) for ex in val),
        n_loss_tokens=sum(int((ex["labels"] != IGNORE_INDEX).sum()) for ex in train),
        n_truncated=sum(part.n_truncated for part in parts),
        dropped=dropped,
        n_remainder_tokens=sum(part.n_remainder for part in parts),
        n_train_rows=len(train),
        packed=packed,
    )


@dataclass(frozen=True)
class _Part:
    """One source's examples and counts."""

    source: str
    format: str
    n_rows: int
    examples: list[Example]
    n_truncated: int
    dropped: dict[str, int]
    n_remainder: int


def _tokenized(raw: Any, cfg: DataConfig, tokenizer: "PreTrainedTokenizerBase") -> _Part:
    samples: Samples = normalise(raw, cfg.format, cfg.text_column)
    n_rows = len(raw.rows) if raw.text is None else 1
    dropped = dict(samples.dropped)
    if samples.format == "text":
        blocks, remainder = _text_blocks([s["text"] for s in samples.samples], tokenizer, cfg.seq_len, raw.source)
        return _Part(raw.source, "text", n_rows, blocks, 0, dropped, remainder)
    if "messages" in (samples.samples[0] if samples.samples else {}):
        require_template(tokenizer, samples.format)
    pairs = sample_pairs(samples.samples, tokenizer, train_on_prompt=cfg.train_on_prompt)
    kept, n_truncated, n_no_loss = truncate_pairs(pairs, cfg.seq_len)
    if n_no_loss:
        dropped[f"no answer token within seq_len={cfg.seq_len}"] = n_no_loss
        if len(kept) < 2:
            raise EdgetuneError(
                f"{raw.source} keeps {len(kept)} of {len(pairs)} examples at seq_len={cfg.seq_len}: the others' "
                "prompts fill all of seq_len, leaving no answer token to learn",
                "raise data.seq_len (it must hold a prompt and part of its answer)",
            )
    examples = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(lab), "length": len(ids)} for ids, lab in kept]
    return _Part(raw.source, samples.format, n_rows, examples, n_truncated, dropped, 0)


def _text_blocks(
    texts: list[str], tokenizer: "PreTrainedTokenizerBase", seq_len: int, source: str
) -> tuple[list[Example], int]:
    """Concatenate texts (eos between them) and cut the tokens into seq_len blocks.

    Returns the blocks and the unused remainder's token count.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # verbose=False: a whole book is far longer than model_max_length, which is expected before packing.
    for i, doc in enumerate(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(doc)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise EdgetuneError(
            f"{source} has {len(ids)} tokens, fewer than one block of seq_len={seq_len}",
            "use a longer text or a smaller seq_len",
        )
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    examples = [{"input_ids": block, "labels": block.clone(), "length": seq_len} for block in blocks]
    return examples, len(ids) - n_blocks * seq_len


def _split(examples: list[Example], val_fraction: float, seed: int, source: str) -> tuple[list[Example], list[Example]]:
    """Seeded split: validation gets max(1, round(n * val_fraction)) examples, training keeps at least one."""
    n = len(examples)
    if n < 2:
        raise EdgetuneError(
            f"{source} gives {n} example(s), too few to split into train and validation",
            "use more data or a smaller seq_len",
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    # Sorting keeps each split in file order, so an unshuffled pass reads a packed text front to back.
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]
