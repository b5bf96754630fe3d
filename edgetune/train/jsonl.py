"""Rows of a .jsonl data file: read and check them, and turn prompt/completion and chat rows into token pairs.

A token pair is ``(input_ids, labels)`` as two equal-length int lists, with labels ``-100`` where there is no loss.
``truncate_pairs`` cuts them to ``seq_len``; ``edgetune.train.data`` makes tensors of them and packs plain ``text``
rows.

Chat rows get loss only on the assistant turns. Each assistant turn's character span is found by rendering the
conversation up to the turn with ``add_generation_prompt=True`` (where the reply starts) and up to and including
the turn (where it ends); the fast tokenizer's offset mapping then marks the tokens inside the spans.
"""

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgetune.errors import EdgetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
RowKind = Literal["text", "prompt-completion", "chat"]
TokenPair = tuple[list[int], list[int]]


def read_rows(path: Path, text: str, text_column: str) -> tuple[RowKind, list[dict[str, Any]]]:
    """Parse and check the rows of a .jsonl file; blank lines are skipped.

    Args:
        path: the file, named in error messages.
        text: its contents (not blank).
        text_column: the key that holds plain text.

    Returns:
        The one row kind the file uses and its rows.

    Raises:
        EdgetuneError: a line is not a JSON object, a row has none of the expected keys or a value of the wrong
            type, or the file mixes row kinds.
    """
    expected = f'"{text_column}", "prompt" and "completion", or "messages"'
    kind: RowKind | None = None
    first_line = 0
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() would break apart.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdgetuneError(
                f"{path} line {line_no} is not valid JSON ({exc.msg})",
                f"write one JSON object per line with {expected}",
            ) from None
        row_kind = _row_kind(row, text_column)
        if row_kind is None:
            found = f"keys {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise EdgetuneError(
                f"{path} line {line_no} has none of the expected keys (found {found})", f"give every row {expected}"
            )
        _check_values(row, row_kind, text_column, f"{path} line {line_no}")
        if kind is None:
            kind, first_line = row_kind, line_no
        elif row_kind != kind:
            raise EdgetuneError(
                f"{path} line {line_no} is a {row_kind} row but line {first_line} is a {kind} row",
                "keep one kind of row per file",
            )
        rows.append(row)
    if kind is None:
        raise EdgetuneError(f"{path} has no rows", f"write one JSON object per line with {expected}")
    return kind, rows


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
    """Token pairs for chat rows, with loss on the assistant turns (content and end-of-turn token).

    If the template does not render a conversation's prefixes as prefixes of the whole (some templates rewrite
    earlier turns), or the tokenizer is not a fast one, that conversation gets loss on every token; a warning is
    logged once per call.

    Args:
        rows: rows with ``messages``, a list of ``{"role", "content"}`` dicts.
        tokenizer: a Hugging Face tokenizer with a chat template.

    Returns:
        One (input_ids, labels) pair per row.

    Raises:
        EdgetuneError: the tokenizer has no chat template, or the template fails on a conversation.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise EdgetuneError(
            'the tokenizer has no chat template, which rows with "messages" need',
            "use a chat model's tokenizer, set tokenizer.chat_template, or write prompt/completion rows",
        )
    pairs = []
    warned = False
    for row_no, row in enumerate(rows, start=1):
        full = _render(tokenizer, row["messages"], row_no)
        pair = _assistant_pair(tokenizer, row["messages"], full) if getattr(tokenizer, "is_fast", False) else None
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
        The kept pairs, how many were cut, and how many tokens the dropped pairs held.
    """
    kept = []
    n_truncated = n_dropped = 0
    for ids, labels in pairs:
        if len(ids) > seq_len:
            n_truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        # A pair without a single target token adds nothing to training and makes a batch's mean loss NaN.
        if all(label == IGNORE_INDEX for label in labels):
            n_dropped += len(ids)
            continue
        kept.append((ids, labels))
    return kept, n_truncated, n_dropped


def _row_kind(row: Any, text_column: str) -> RowKind | None:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if text_column in row:
        return "text"
    return None


def _check_values(row: dict[str, Any], kind: RowKind, text_column: str, where: str) -> None:
    """Raise an EdgetuneError naming ``where`` if a value has the wrong type."""
    keys = {"text": [text_column], "prompt-completion": ["prompt", "completion"], "chat": []}[kind]
    for key in keys:
        if not isinstance(row[key], str):
            raise EdgetuneError(f"{where}: {key!r} is a {type(row[key]).__name__}, not a string", "make it a string")
    if kind == "chat":
        messages = row["messages"]
        ok = isinstance(messages, list) and messages != []
        ok = ok and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        if not ok or not all(isinstance(m.get("content"), str) for m in messages):
            raise EdgetuneError(
                f'{where}: "messages" is not a non-empty list of {{"role": str, "content": str}} objects',
                'write it as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
            )


def _render(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], row_no: int) -> str:
    """The whole conversation as the chat template writes it."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    # Templates are user-supplied Jinja that may raise anything (raise_exception, TemplateError, TypeError).
    except Exception as exc:
        raise EdgetuneError(
            f"the chat template failed on conversation {row_no} ({exc})", "check the roles and order of its messages"
        ) from None


def _assistant_pair(
    tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], full: str
) -> TokenPair | None:
    """Labels on assistant spans only, or None when the template's prefixes do not line up with ``full``."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            return None  # transformers refuses to render the empty conversation before it
        try:
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
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
