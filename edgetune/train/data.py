"""Load a fine-tuning data set into token examples, split it, and batch it.

Supported files: ``.txt`` (the whole file, packed into blocks of exactly ``seq_len`` tokens), ``.csv`` (one text
per row of a column, packed the same way) and ``.jsonl`` with one kind of row per file: ``{"text": ...}`` (packed),
``{"prompt": ..., "completion": ...}`` (one example per row, loss on the completion only) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the tokenizer's chat template, loss on the
assistant turns only). Without a path, the bundled first chapters of *Pride and Prejudice* are used.

An example is a dict with ``input_ids`` and ``labels`` (1-D ``torch.long`` tensors, labels ``-100`` where there is
no loss) and ``length`` (int). Reading .jsonl rows and rendering chat rows live in ``edgetune.train.jsonl``.
"""

import csv
import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from edgetune.errors import EdgetuneError
from edgetune.train.jsonl import IGNORE_INDEX, chat_pairs, prompt_completion_pairs, read_rows, truncate_pairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".csv")
Example = dict[str, Any]
DataFormat = Literal["txt", "csv", "jsonl-text", "jsonl-prompt-completion", "jsonl-chat"]


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to cut it.

    Args:
        path: a .txt, .jsonl or .csv file; None uses the bundled Pride and Prejudice text.
        seq_len: tokens per packed block, and the most tokens one prompt/completion or chat example keeps.
        val_fraction: share of examples held out for validation (at least one example).
        seed: seeds the train/validation split.
        text_column: the column (.csv) or key (.jsonl) that holds plain text.
    """

    path: str | None = None
    seq_len: int = 256
    val_fraction: float = 0.1
    seed: int = 0
    text_column: str = "text"

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise EdgetuneError(f"data path {self.path!r} is invalid", "give a file path, or None for the default")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise EdgetuneError(f"seq_len={self.seq_len!r} is invalid", "set seq_len to an integer >= 2")
        if not isinstance(self.val_fraction, int | float) or not 0 < self.val_fraction < 1:
            raise EdgetuneError(f"val_fraction={self.val_fraction!r} is invalid", "set val_fraction between 0 and 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise EdgetuneError(f"seed={self.seed!r} is invalid", "set seed to an integer from 0 to 4294967295")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise EdgetuneError(f"text_column={self.text_column!r} is invalid", "name the column that holds the text")


@dataclass(frozen=True)
class DataStats:
    """What loading produced.

    Args:
        format: the file kind and, for .jsonl, the row kind.
        n_examples: train plus validation examples.
        n_train_tokens: tokens in the training examples.
        n_val_tokens: tokens in the validation examples.
        n_truncated: examples cut to seq_len (prompt/completion and chat rows).
        n_dropped: tokens in no example: the packing remainder shorter than one block, plus every token of
            examples dropped because truncation left them no token with a loss.
    """

    format: DataFormat
    n_examples: int
    n_train_tokens: int
    n_val_tokens: int
    n_truncated: int
    n_dropped: int


@dataclass(frozen=True)
class TokenizedData:
    """Train and validation examples plus loading statistics.

    Args:
        train: training examples.
        val: validation examples.
        stats: counts describing the load.
    """

    train: list[Example]
    val: list[Example]
    stats: DataStats


def default_data_path() -> Path:
    """Path of the bundled default data set.

    Returns:
        The bundled Pride and Prejudice text (Chapters 1-18, public domain; provenance in assets/README.md).
    """
    return Path(str(resources.files("edgetune").joinpath("assets", "pride_and_prejudice.txt")))


def load_dataset(cfg: DataConfig, tokenizer: "PreTrainedTokenizerBase") -> TokenizedData:
    """Read, tokenize and split the data set that ``cfg`` names.

    Args:
        cfg: the data settings.
        tokenizer: a Hugging Face tokenizer; chat rows need a fast one with a chat template.

    Returns:
        The deterministic train/validation split and its statistics.

    Raises:
        EdgetuneError: the file is missing, unreadable, empty, not UTF-8, of an unsupported type, malformed, or
            too short for two examples.
    """
    path = Path(cfg.path).expanduser() if cfg.path is not None else default_data_path()
    fmt, examples, n_truncated, n_dropped = _examples(path, _read_text(path), cfg, tokenizer)
    train, val = _split(examples, cfg.val_fraction, cfg.seed, str(path))
    stats = DataStats(
        format=fmt,
        n_examples=len(examples),
        n_train_tokens=sum(ex["length"] for ex in train),
        n_val_tokens=sum(ex["length"] for ex in val),
        n_truncated=n_truncated,
        n_dropped=n_dropped,
    )
    logger.debug("loaded %s: %s", path, stats)
    return TokenizedData(train=train, val=val, stats=stats)


def pad_token_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos token.

    Args:
        tokenizer: a Hugging Face tokenizer.

    Returns:
        The padding id (padding never receives a loss, so reusing eos is safe).

    Raises:
        EdgetuneError: the tokenizer has neither a pad nor an eos token.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise EdgetuneError("the tokenizer has no pad token and no eos token", "set tokenizer.pad_token before loading")


def batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate over one epoch of padded batches, resumable at any batch.

    The order depends only on ``(seed, epoch)``, so a run that stopped after batch ``k`` of an epoch resumes with
    ``start=k`` and sees exactly the batches it would have seen.

    Args:
        examples: examples from ``load_dataset``.
        batch_size: examples per batch; the last batch may be smaller.
        pad_id: the padding id (see ``pad_token_id``).
        shuffle: shuffle the examples; False keeps their order.
        seed: seeds the shuffle.
        epoch: the epoch number, mixed into the shuffle seed.
        start: index of the first batch to yield (batches already consumed this epoch).

    Returns:
        An iterator of dicts with ``input_ids``, ``labels`` and ``attention_mask``, each ``[batch, longest]``.

    Raises:
        EdgetuneError: batch_size < 1, there are no examples, or start is past the end of the epoch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EdgetuneError(f"batch_size={batch_size!r} is invalid", "set batch_size to an integer >= 1")
    if not examples:
        raise EdgetuneError("there are no examples to batch", "load a data set with at least one example per split")
    total = math.ceil(len(examples) / batch_size)
    if not 0 <= start <= total:
        raise EdgetuneError(f"start={start} is outside the epoch's {total} batches", f"use 0 <= start <= {total}")
    if shuffle:
        # seed in the high bits and epoch in the low bits never collide for epochs below 2**32.
        generator = torch.Generator().manual_seed(((seed << 32) + epoch) % 2**64)
        order = torch.randperm(len(examples), generator=generator).tolist()
    else:
        order = list(range(len(examples)))
    chunks = (order[b * batch_size : (b + 1) * batch_size] for b in range(start, total))
    return (collate([examples[i] for i in chunk], pad_id) for chunk in chunks)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into one batch.

    Args:
        examples: examples with 1-D ``input_ids`` and ``labels``.
        pad_id: the id written into padding positions.

    Returns:
        ``input_ids`` (pad_id on padding), ``labels`` (-100 on padding) and ``attention_mask`` (0 on padding),
        each ``[len(examples), longest]`` long.
    """
    longest = max(int(ex["input_ids"].numel()) for ex in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = int(ex["input_ids"].numel())
        input_ids[row, :n] = ex["input_ids"]
        labels[row, :n] = ex["labels"]
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _examples(
    path: Path, text: str, cfg: DataConfig, tokenizer: "PreTrainedTokenizerBase"
) -> tuple[DataFormat, list[Example], int, int]:
    """Examples of the file's format, with the truncated-example and dropped-token counts."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".csv"):
        texts = [text] if suffix == ".txt" else _csv_texts(path, text, cfg.text_column)
        return suffix[1:], *_pack(texts, tokenizer, cfg.seq_len, str(path))  # type: ignore[return-value]
    kind, rows = read_rows(path, text, cfg.text_column)
    if kind == "text":
        return "jsonl-text", *_pack([row[cfg.text_column] for row in rows], tokenizer, cfg.seq_len, str(path))
    if kind == "prompt-completion":
        pairs, fmt = prompt_completion_pairs(rows, tokenizer), "jsonl-prompt-completion"
    else:
        pairs, fmt = chat_pairs(rows, tokenizer), "jsonl-chat"
    kept, n_truncated, n_dropped = truncate_pairs(pairs, cfg.seq_len)
    if len(kept) < 2 and len(pairs) > len(kept):
        raise EdgetuneError(
            f"{path} keeps {len(kept)} of {len(pairs)} examples at seq_len={cfg.seq_len}: the others' prompts fill "
            "all of seq_len, leaving no completion token to learn",
            "raise data.seq_len (it must hold a prompt and part of its answer)",
        )
    if len(kept) < len(pairs):
        logger.warning("dropped %d examples with no completion/assistant token within seq_len", len(pairs) - len(kept))
    examples = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(lab), "length": len(ids)} for ids, lab in kept]
    return fmt, examples, n_truncated, n_dropped


def _read_text(path: Path) -> str:
    """The file's text with newlines normalised, or an EdgetuneError saying why it cannot be used."""
    if not path.exists():
        raise EdgetuneError(f"data file {path} does not exist", "check the path, or leave path unset for the default")
    if path.is_dir():
        raise EdgetuneError(f"data path {path} is a directory", f"point path at a {'/'.join(SUPPORTED_SUFFIXES)} file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise EdgetuneError(
            f"data file {path} has unsupported type {path.suffix or '(no suffix)'!r}",
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise EdgetuneError(f"data file {path} is not readable (permission denied)", "fix its permissions") from None
    except OSError as exc:
        raise EdgetuneError(f"data file {path} cannot be read ({exc})", "check the file and its disk") from None
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs put in front of exported CSVs.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgetuneError(f"data file {path} is not UTF-8 (bad byte at {exc.start})", "save it as UTF-8") from None
    if not text.strip():
        raise EdgetuneError(f"data file {path} is empty", "put text in it or point path at another file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _csv_texts(path: Path, text: str, column: str) -> list[str]:
    """The non-blank cells of ``column``."""
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = reader.fieldnames or []
        if column not in columns:
            shown = ", ".join(repr(name if len(name) <= 40 else name[:37] + "...") for name in columns[:20])
            raise EdgetuneError(
                f"{path} has no column {column!r} (columns: {shown}{', ...' if len(columns) > 20 else ''})",
                "set text_column to the column that holds the text",
            )
        texts = [row[column] for row in reader if (row.get(column) or "").strip()]
    except csv.Error as exc:
        # csv refuses a field over csv.field_size_limit() (131,072 characters); raising the limit would change
        # the process-wide setting of whatever application embeds edgetune.
        raise EdgetuneError(
            f"{path} is not valid CSV near line {reader.line_num} ({exc})",
            "fix that line; put texts longer than 131,072 characters in a .txt or .jsonl file",
        ) from None
    if not texts:
        raise EdgetuneError(f"{path} has no text in column {column!r}", "fill the column or pick another text_column")
    return texts


def _pack(
    texts: list[str], tokenizer: "PreTrainedTokenizerBase", seq_len: int, source: str
) -> tuple[list[Example], int, int]:
    """Concatenate texts (eos between them) and cut the tokens into seq_len blocks.

    Returns the blocks, 0 truncated examples (packing never truncates) and the dropped remainder's token count.
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
    return examples, 0, len(ids) - n_blocks * seq_len


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
