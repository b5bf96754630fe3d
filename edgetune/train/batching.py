"""Batches: padded batches of examples, and instruction or chat examples packed into rows that each attend only to
themselves.

``batches`` yields one epoch in a seeded, resumable order. ``pack`` places whole examples into rows of at most
``seq_len`` tokens.

Padding a batch of chat examples to its longest spends positions on padding (a third of them on the chat example;
packed rows at batch 4 measured 1.21x the tokens per second on a 2-core CPU, ``bench/results/packing.md``). A packed row
concatenates whole examples; its ``position_ids`` restart at 0 at every example, and the batch carries no
``attention_mask``. From exactly that (and no KV cache: ``load_model``
sets ``use_cache=False``), transformers' mask builder (``masking_utils.find_packed_sequence_indices``) makes a
block-diagonal causal mask for SDPA and eager attention on any device, and its flash-attention path turns the same
position ids into variable-length sequence offsets, so no token attends across an example boundary with any kernel
(TRL's ``padding_free`` packing works the same way). The first label of every example is ``-100``: the token
before it belongs to another example.

Examples are placed best-fit-decreasing (longest first, into the fullest row that still has room), which fills
rows to within a few tokens; the placement depends only on the lengths, so a resumed run packs identically.
"""

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from edgetune.errors import EdgetuneError
from edgetune.train.tokens import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Example = dict[str, Any]


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
        examples: examples with 1-D ``input_ids`` and ``labels``, or packed rows (see ``collate_packed``).
        pad_id: the id written into padding positions.

    Returns:
        ``input_ids`` (pad_id on padding), ``labels`` (-100 on padding) and ``attention_mask`` (0 on padding),
        each ``[len(examples), longest]`` long; packed rows get ``position_ids`` instead of the mask.
    """
    if "position_ids" in examples[0]:
        return collate_packed(examples, pad_id)
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


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Packed rows of whole examples.

    Args:
        examples: examples with 1-D ``input_ids`` and ``labels``, each at most ``seq_len`` long.
        seq_len: the most tokens in one row.

    Returns:
        Rows with ``input_ids``, ``labels`` and ``position_ids`` (1-D long tensors), ``length`` and ``n_examples``.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    # room[k] is the free space of rows[slot[k]], kept sorted so the best fit is one bisect away.
    room: list[int] = []
    slot: list[int] = []
    for index in order:
        n = len(examples[index]["input_ids"])
        k = bisect.bisect_left(room, n)
        if k == len(room):
            rows.append([index])
            row, free = len(rows) - 1, seq_len - n
        else:
            row, free = slot.pop(k), room.pop(k) - n
            rows[row].append(index)
        k = bisect.bisect_left(room, free)
        room.insert(k, free)
        slot.insert(k, row)
    return [_join([examples[i] for i in members]) for members in rows]


def _join(members: list[Example]) -> Example:
    labels = []
    for ex in members:
        own = ex["labels"].clone()
        own[0] = IGNORE_INDEX
        labels.append(own)
    return {
        "input_ids": torch.cat([ex["input_ids"] for ex in members]),
        "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(len(ex["input_ids"])) for ex in members]),
        "length": sum(int(ex["length"]) for ex in members),
        "n_examples": len(members),
    }


def collate_packed(rows: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into one batch without an attention mask.

    The padding gets positions 0, 1, ... like an example of its own, so it attends only to itself, and labels
    ``-100``.

    Args:
        rows: rows from ``pack``.
        pad_id: the id written into padding positions.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids``, each ``[len(rows), longest]`` long.
    """
    longest = max(int(row["input_ids"].numel()) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(longest).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        n = int(row["input_ids"].numel())
        input_ids[r, :n] = row["input_ids"]
        labels[r, :n] = row["labels"]
        position_ids[r, :n] = row["position_ids"]
        position_ids[r, n:] = torch.arange(longest - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
