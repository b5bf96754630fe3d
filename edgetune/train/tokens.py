"""Token pairs from canonical samples: raw prompt/completion strings and conversations through the chat template.

A token pair is ``(input_ids, labels)`` as two equal-length int lists, with labels ``-100`` where there is no loss.
``truncate_pairs`` cuts them to ``seq_len``. Plain text samples are packed into blocks by ``edgetune.train.data``.

Loss masks (``train_on_prompt=False``, the default, as TRL's ``completion_only_loss`` and LLaMA-Factory's
``train_on_prompt: false``):
- prompt/completion strings: loss on the completion and the eos after it.
- conversations: loss on the assistant turns (their content, tool calls and end-of-turn token), none on system,
  user and tool turns. Each assistant turn's character span is found by rendering the conversation up to the turn
  with ``add_generation_prompt=True`` (where the reply starts) and up to and including the turn (where it ends);
  the fast tokenizer's offset mapping then marks the tokens inside the spans.
With ``train_on_prompt=True`` every token has a loss.
"""

import logging
from typing import TYPE_CHECKING, Any

from edgetune.errors import EdgetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TokenPair = tuple[list[int], list[int]]


def sample_pairs(
    samples: list[dict[str, Any]], tokenizer: "PreTrainedTokenizerBase", *, train_on_prompt: bool = False
) -> list[TokenPair]:
    """Token pairs for prompt/completion or conversation samples (one kind per list).

    Args:
        samples: ``{"prompt", "completion"}`` strings or ``{"messages", optional "tools"}`` conversations.
        tokenizer: a Hugging Face tokenizer; conversations need its chat template.
        train_on_prompt: put prompt, system, user and tool tokens in the loss too.

    Returns:
        One pair per sample.

    Raises:
        EdgetuneError: the template fails on a conversation or renders no assistant turn at all.
    """
    if not samples:
        return []
    if "messages" not in samples[0]:
        pairs = prompt_completion_pairs(samples, tokenizer)
    else:
        pairs = chat_pairs(samples, tokenizer)
        if not train_on_prompt and all(label == IGNORE_INDEX for _, labels in pairs for label in labels):
            raise EdgetuneError(
                "the chat template renders no assistant turn, so no token would be in the loss",
                "use a template that writes assistant messages (data.chat_template), or set data.train_on_prompt=true",
            )
    return [(ids, list(ids)) for ids, _ in pairs] if train_on_prompt else pairs


def prompt_completion_pairs(rows: list[dict[str, Any]], tokenizer: "PreTrainedTokenizerBase") -> list[TokenPair]:
    """Token pairs for prompt/completion rows: [bos] + prompt (no loss) + completion + eos (loss).

    Prompt and completion are tokenized separately and joined as they are, so any space or newline between
    them must be in the data.

    Args:
        rows: rows with string ``prompt`` and ``completion``.
        tokenizer: a Hugging Face tokenizer.

    Returns:
        One (input_ids, labels) pair per row; bos only where the tokenizer adds one to every text.
    """
    bos = tokenizer("", add_special_tokens=True)["input_ids"]
    # Llama-style tokenizers add exactly [bos] to every text and their models expect it; others add nothing.
    bos = bos if tokenizer.bos_token_id is not None and bos == [tokenizer.bos_token_id] else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=False, verbose=False)["input_ids"]
    completions = tokenizer([row["completion"] for row in rows], add_special_tokens=False, verbose=False)["input_ids"]
    pairs = []
    for prompt, completion in zip(prompts, completions, strict=True):
        target = completion + eos
        pairs.append((bos + prompt + target, [IGNORE_INDEX] * (len(bos) + len(prompt)) + target))
    return pairs


def chat_pairs(rows: list[dict[str, Any]], tokenizer: "PreTrainedTokenizerBase") -> list[TokenPair]:
    """Token pairs for conversations, with loss on the assistant turns (content and end-of-turn token).

    If the template does not render a conversation's prefixes as prefixes of the whole (some templates rewrite
    earlier turns), or the tokenizer is not a fast one, that conversation gets loss on every token; a warning is
    logged once per call.

    Args:
        rows: ``{"messages": [{"role", "content", ...}], optional "tools": [...]}`` conversations; an optional
            ``answer_from`` (conversational prompt/completion) keeps earlier assistant turns out of the loss.
        tokenizer: a Hugging Face tokenizer with a chat template.

    Returns:
        One (input_ids, labels) pair per row.

    Raises:
        EdgetuneError: the template fails on a conversation.
    """
    pairs = []
    warned = False
    for row_no, row in enumerate(rows, start=1):
        messages, tools = row["messages"], row.get("tools")
        full = _render(tokenizer, messages, tools, row_no)
        fast = getattr(tokenizer, "is_fast", False)
        answer_from = row.get("answer_from", 0)
        pair = _assistant_pair(tokenizer, messages, tools, full, answer_from) if fast else None
        if pair is None:
            if not warned:
                logger.warning("cannot locate assistant turns with this tokenizer/template; training on all tokens")
                warned = True
            ids = tokenizer(full, add_special_tokens=False, verbose=False)["input_ids"]
            pair = (ids, list(ids))
        pairs.append(pair)
    return pairs


def truncate_pairs(pairs: list[TokenPair], seq_len: int) -> tuple[list[TokenPair], int, int]:
    """Keep the first seq_len tokens of each pair and drop pairs left without a token that has a loss.

    Args:
        pairs: (input_ids, labels) pairs.
        seq_len: the most tokens a pair keeps.

    Returns:
        The kept pairs, how many were cut, and how many pairs were dropped.
    """
    kept = []
    n_truncated = n_dropped = 0
    for ids, labels in pairs:
        if len(ids) > seq_len:
            n_truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        # A pair without a single target token adds nothing to training and makes a batch's mean loss NaN.
        if all(label == IGNORE_INDEX for label in labels):
            n_dropped += 1
            continue
        kept.append((ids, labels))
    return kept, n_truncated, n_dropped


def _render(tokenizer: "PreTrainedTokenizerBase", messages: list[dict], tools: list | None, row_no: int) -> str:
    """The whole conversation as the chat template writes it."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    # Templates are user-supplied Jinja that may raise anything (raise_exception, TemplateError, TypeError).
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise EdgetuneError(
            f"the chat template failed on conversation {row_no} ({reason})",
            "check the roles and order of its messages, or set data.chat_template",
        ) from None


def _assistant_pair(
    tokenizer: "PreTrainedTokenizerBase", messages: list[dict], tools: list | None, full: str, answer_from: int = 0
) -> TokenPair | None:
    """Labels on the assistant spans from message ``answer_from`` on, or None when the template's prefixes do not
    line up with ``full``."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < answer_from:
            continue
        if i == 0:
            return None  # transformers refuses to render the empty conversation before it
        try:
            before = tokenizer.apply_chat_template(
                messages[:i], tools=tools, tokenize=False, add_generation_prompt=True
            )
            through = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
        except Exception:  # a template may refuse a prefix (e.g. one ending on a user turn); see _render
            return None
        if not (through.startswith(before) and full.startswith(through)):
            return None
        # The newline a template writes after the end-of-turn token is layout, not part of the reply.
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    labels = [
        token if a < b and any(a < end and b > start for start, end in spans) else IGNORE_INDEX
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return list(enc["input_ids"]), labels
