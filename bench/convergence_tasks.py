"""The three tasks of bench/convergence.py, all installed offline: domain text, instruction pairs, sentiment.

- ``text``: the bundled chapters of *Pride and Prejudice* cut into 64-token blocks by ``load_dataset`` (its seeded
  split); causal-LM loss on every token. Held out: the first ``held_out`` validation blocks.
- ``instruct``: English Q/A pairs of chatterbot-corpus 1.3.3 (PyPI, BSD-3, a 346 KB wheel with a YAML file per topic,
  ``conversations: [[question, answer, more answers...]]``). A pair is a conversation's first two statements, one
  per distinct question: 749 pairs (of 2,026 conversations; the tech-support file asks a few questions over and
  over with different answer flows). Each is a user and an assistant turn in the model's chat template, with the
  loss on the answer tokens only (``edgetune.train.tokens``). Held out: a split by a fixed seed.
- ``sentiment``: bench/sentiment.py's Rotten Tomatoes task: cross-entropy over the " terrible"/" great" logits at
  the prompt's end; held-out loss and accuracy.

A ``Task`` yields training batches in an order set by the run's seed and gives the loss of a batch (what backprop
differentiates and a zeroth-order step estimates) and the held-out evaluation. The held-out sets never depend on the
run's seed, so every run of a task is scored on the same examples.
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentiment  # bench/sentiment.py (the bench folder is on sys.path)
import torch
import yaml

from edgetune.optim.adafish_true_fisher import sampled_logits_grad
from edgetune.plan.registry import fetch_wheel_member
from edgetune.plan.sources import cache_dir
from edgetune.train.batching import batches, pad_token_id
from edgetune.train.chunked_loss import causal_lm_loss, causal_lm_loss_and_sampled_grad
from edgetune.train.data import DataConfig, load_dataset
from edgetune.train.evaluation import held_out_loss
from edgetune.train.tokens import sample_pairs, truncate_pairs

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("text", "instruct", "sentiment")
# An evaluation then costs about 3-7 training steps (bench/README.md); every run evaluates 11 times.
HELD_OUT: dict[str, int] = {"text": 32, "instruct": 32, "sentiment": 64}
TEXT_SEQ = 64
INSTRUCT_SEQ = 128  # 730 of the 749 rendered pairs fit; longer answers are cut (the loss keeps their first tokens)
SENTIMENT_TRAIN = 2048  # one epoch covers 500 zeroth-order steps of batch 4
SPLIT_SEED = 0  # the held-out sets; a run's own seed only orders the training batches
EVAL_BATCH = 16
CHATTERBOT = ("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english")
# The English files of the 1.3.3 wheel (its listing); each is fetched once into cache_dir()/"bench".
CHATTERBOT_TOPICS = (
    "ai botprofile coding computers conversations emotion food gossip greetings health history humor literature "
    "money movies politics psychology science sports tech_support trivia"
).split()

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """One benchmark task: training batches, the loss of a batch, and the held-out evaluation.

    Args:
        name: text, instruct or sentiment.
        train: the training examples.
        loss: the scalar loss of a batch (mean over its loss tokens or examples).
        evaluate: held-out ``loss`` (and ``accuracy`` for sentiment) of the model; called in eval mode, no grad.
        batches: endless training batches for ``(seed, batch_size)``; the order depends only on the seed.
        facts: what the report prints about the data (source, sizes, sequence length, baselines).
        sampled_loss: ``(model, batch, generator) -> (loss, output, grad of the loss at labels drawn from the model
            with respect to output)`` from one forward, for AdaFish's true Fisher (``AdaFish.sampled_fisher``).
    """

    name: str
    train: list[Any]
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    batches: Callable[[int, int], Iterator[Batch]]
    facts: dict[str, Any] = field(default_factory=dict)
    sampled_loss: Callable[[torch.nn.Module, Batch, torch.Generator], tuple[torch.Tensor, ...]] | None = None


def load_task(name: str, tokenizer: Any, held_out: int | None = None) -> Task:
    """Load a task by name.

    Args:
        name: one of ``TASKS``.
        tokenizer: the model's tokenizer (with its chat template, for instruct).
        held_out: held-out examples (blocks for text); None uses ``HELD_OUT``.

    Returns:
        The task.

    Raises:
        ValueError: an unknown task name.
    """
    loaders = {"text": text_task, "instruct": instruct_task, "sentiment": sentiment_task}
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return loaders[name](tokenizer, held_out or HELD_OUT[name])


def endless(examples: list[Any], batch_size: int, pad_id: int, seed: int) -> Iterator[Batch]:
    """Shuffled epochs one after the other; the order depends only on ``seed`` (and the epoch)."""
    epoch = 0
    while True:
        yield from batches(examples, batch_size, pad_id, shuffle=True, seed=seed, epoch=epoch)
        epoch += 1


def causal_lm_task(name: str, train: list[Any], val: list[Any], pad_id: int, facts: dict[str, Any]) -> Task:
    """A task trained with edgetune's chunked loss and scored by the token-weighted held-out cross-entropy.

    The held-out examples are batched in length order, so an evaluation pads little.
    """
    val = sorted(val, key=lambda example: int(example["length"]))
    return Task(
        name=name,
        train=train,
        loss=causal_lm_loss,
        evaluate=lambda model: {"loss": held_out_loss(model, val, EVAL_BATCH, pad_id, "cpu")},
        batches=lambda seed, batch_size: endless(train, batch_size, pad_id, seed),
        facts={**facts, "n_train": len(train), "n_held_out": len(val)},
        sampled_loss=causal_lm_loss_and_sampled_grad,
    )


def text_task(tokenizer: Any, held_out: int) -> Task:
    """Pride and Prejudice in 64-token blocks; held out: the first ``held_out`` of load_dataset's validation blocks."""
    data = load_dataset(DataConfig(seq_len=TEXT_SEQ, seed=SPLIT_SEED), tokenizer)
    facts = {"source": "bundled Pride and Prejudice (chapters 1-18)", "seq_len": TEXT_SEQ, "unit": "blocks"}
    return causal_lm_task("text", data.train, data.val[:held_out], pad_token_id(tokenizer), facts)


def pairs_folder() -> Path:
    """Where the chatterbot-corpus files are cached."""
    return cache_dir() / "bench" / "chatterbot-corpus-english"


def chatterbot_pairs() -> list[tuple[str, str]]:
    """One (question, first answer) pair per distinct question of chatterbot-corpus's English files, in file order.

    Raises:
        EdgetuneError: a file is not cached and cannot be fetched from the package registry.
    """
    folder = pairs_folder()
    answers: dict[str, str] = {}
    for topic in CHATTERBOT_TOPICS:
        path = folder / f"{topic}.yml"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            logger.info("fetching %s/%s.yml from %s==%s", CHATTERBOT[2], topic, *CHATTERBOT[:2])
            fetch_wheel_member(CHATTERBOT[0], CHATTERBOT[1], f"{CHATTERBOT[2]}/{topic}.yml", destination=path)
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            # YAML reads a bare "yes" or "42" as a bool or int; the corpus means them as text.
            turns = [" ".join(str(turn).split()) for turn in conversation]
            if len(turns) >= 2 and turns[0] and turns[1]:
                answers.setdefault(turns[0], turns[1])
    return list(answers.items())


def instruct_task(tokenizer: Any, held_out: int) -> Task:
    """chatterbot-corpus Q/A pairs in the chat template, loss on the answer; a fixed-seed permutation holds out some."""
    pairs = chatterbot_pairs()
    samples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    kept, n_truncated, n_dropped = truncate_pairs(sample_pairs(samples, tokenizer), INSTRUCT_SEQ)
    examples = [{"input_ids": torch.tensor(i), "labels": torch.tensor(lab), "length": len(i)} for i, lab in kept]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    val, train = [examples[i] for i in order[:held_out]], [examples[i] for i in order[held_out:]]
    facts = {
        "source": f"{CHATTERBOT[0]}=={CHATTERBOT[1]} English Q/A pairs, the model's chat template, loss on answers",
        "seq_len": INSTRUCT_SEQ,
        "unit": "pairs",
        "n_truncated": n_truncated,
        "n_dropped": n_dropped,
    }
    return causal_lm_task("instruct", train, val, pad_token_id(tokenizer), facts)


def sentiment_task(tokenizer: Any, held_out: int) -> Task:
    """bench/sentiment.py's verbalizer task with ``SENTIMENT_TRAIN`` training reviews; ``evaluate`` also gives the
    held-out accuracy."""
    data = sentiment.load_sentiment(tokenizer, SENTIMENT_TRAIN, held_out, seed=SPLIT_SEED)
    ids, pad_id = sentiment.verbalizer_ids(tokenizer), pad_token_id(tokenizer)
    ordered = sorted(data.val, key=lambda example: example[0].numel())  # batches of similar length pad little
    val = [sentiment.collate(ordered[i : i + EVAL_BATCH], pad_id) for i in range(0, len(ordered), EVAL_BATCH)]
    facts = {
        "source": f"Rotten Tomatoes ({sentiment.WHEEL[0]}=={sentiment.WHEEL[1]}), verbalizers {sentiment.VERBALIZERS}",
        "unit": "reviews",
        "seq_len": f"prompt + up to {sentiment.MAX_TEXT_TOKENS} review tokens",
        "majority_accuracy": data.majority_accuracy,
        "n_train": len(data.train),
        "n_held_out": len(data.val),
    }
    return Task(
        name="sentiment",
        train=data.train,
        loss=lambda model, batch: sentiment.loss_and_correct(model, batch, ids)[0],
        evaluate=lambda model: sentiment.evaluate(model, val, ids),
        batches=lambda seed, batch_size: sentiment.epochs(data.train, batch_size, pad_id, seed),
        facts=facts,
        sampled_loss=lambda model, batch, generator: _verbalizer_sampled(model, batch, ids, generator),
    )


def _verbalizer_sampled(
    model: torch.nn.Module, batch: Batch, ids: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The verbalizer loss, its two logits, and the loss's gradient there at labels drawn from their softmax."""
    logits = sentiment.verbalizer_logits(model, batch, ids)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    return loss, logits, sampled_logits_grad(logits.detach(), generator)
