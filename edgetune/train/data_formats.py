"""Recognise which of the common fine-tuning row schemas a data set uses, and turn its rows into samples.

Formats and the keys that mark them, in the order detection tries them when a row has several:

- messages: ``messages``, a list of ``{"role", "content"}`` (OpenAI / TRL conversational);
- sharegpt: ``conversations`` (or ``messages``) as a list of ``{"from", "value"}``, optional ``system``;
- alpaca: ``instruction`` and ``output``, optional ``input``, ``system`` and ``history`` (LLaMA-Factory's alpaca);
- prompt-completion: ``prompt`` and ``completion``, both strings or both lists of messages (TRL);
- text: the ``text_column`` key (``text`` unless configured).

Conversations carry the most structure, so they win; a bare ``text`` column is often a rendered copy of the others.

A sample is one of three shapes: ``{"text": str}``, ``{"prompt": str, "completion": str}`` (joined as they are,
never templated), or ``{"messages": [...], "tools": [...]}`` (``tools`` only when the row has them), whose
messages hold ``role`` (system, user, assistant or tool), a string ``content`` and, where given, ``tool_calls``,
``name`` and ``tool_call_id``. A conversational prompt/completion sample also has ``answer_from``, the index of
its first completion message: only assistant turns from there on are answers to learn, as in TRL.
"""

from dataclasses import dataclass
from typing import Any, Literal, get_args

from edgetune.errors import EdgetuneError
from edgetune.train.conversations import (
    alpaca_messages,
    checked_messages,
    sharegpt_messages,
    string_field,
    tools_of,
    type_error,
)
from edgetune.train.data_sources import RawData, show_keys

DataFormat = Literal["text", "alpaca", "sharegpt", "messages", "prompt-completion"]
FORMATS: tuple[str, ...] = get_args(DataFormat)
FORMAT_KEYS: dict[DataFormat, str] = {
    "text": '"text" (or data.text_column): a string',
    "alpaca": '"instruction" and "output": strings, optional "input", "system", "history"',
    "sharegpt": '"conversations": a list of {"from", "value"}, optional "system"',
    "messages": '"messages": a list of {"role", "content"}, optional "tools"',
    "prompt-completion": '"prompt" and "completion": two strings, or two lists of {"role", "content"}',
}


@dataclass(frozen=True)
class Samples:
    """The rows of a data set as canonical samples.

    Args:
        format: the format every row has.
        samples: one sample per kept row, in row order (see the module docstring for the shapes).
        dropped: how many rows were left out, by reason ("blank text", "empty answer", "no assistant turn").
    """

    format: DataFormat
    samples: list[dict]
    dropped: dict[str, int]


class _Dropped(Exception):
    """A row that is well formed but has nothing to learn from; ``reason`` is counted, not reported."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def detect_format(raw: RawData, text_column: str = "text") -> DataFormat:
    """The one format all rows share.

    Args:
        raw: the data from ``read_data``.
        text_column: the key that holds plain text.

    Returns:
        "text" for a .txt file, else the format of the rows.

    Raises:
        EdgetuneError: a row matches no format, or rows of different formats share the data set.
    """
    if raw.text is not None:
        return "text"
    if not raw.rows:
        raise EdgetuneError(f"{raw.source} has no rows", "point data.path at a data set with at least one row")
    found: DataFormat | None = None
    first = 0
    for i, row in enumerate(raw.rows):
        fmt = _row_format(row, text_column)
        if fmt is None:
            raise EdgetuneError(
                f"{raw.where(i)} has keys {show_keys(row)} which match no data format; expected one of: "
                + "; ".join(f"{name}: {_keys_line(name, text_column)}" for name in FORMATS),
                "rename the keys, set data.text_column to the column that holds plain text, or set data.format",
            )
        if found is None:
            found, first = fmt, i
        elif fmt != found:
            raise EdgetuneError(
                f"{raw.where(i)} is a {fmt} row but {raw.where(first)} is a {found} row", "keep one format per file"
            )
    assert found is not None  # rows is not empty
    return found


def normalise(raw: RawData, fmt: DataFormat | Literal["auto"] = "auto", text_column: str = "text") -> Samples:
    """Check every row against its format and turn it into a sample.

    Args:
        raw: the data from ``read_data``.
        fmt: the format the rows must have (the user's ``data.format``), or "auto" to detect it.
        text_column: the key that holds plain text.

    Returns:
        The samples and the counts of rows dropped for having nothing to learn from.

    Raises:
        EdgetuneError: ``fmt`` is unknown or does not fit a row, a row matches no format, formats are mixed, a
            value has the wrong type, or every row was dropped.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise EdgetuneError(f"data.format={fmt!r} is not a data format", f"use auto or one of {', '.join(FORMATS)}")
    if raw.text is not None:
        if fmt not in ("auto", "text"):
            raise EdgetuneError(
                f"data.format is {fmt!r} but {raw.source} is a .txt file, which is plain text",
                "remove data.format or set it to text",
            )
        return Samples(format="text", samples=[{"text": raw.text}], dropped={})
    if fmt == "auto":
        fmt = detect_format(raw, text_column)
    else:
        _check_fits(raw, fmt, text_column)
    convert = _CONVERTERS[fmt]
    samples: list[dict] = []
    dropped: dict[str, int] = {}
    for i, row in enumerate(raw.rows):
        try:
            samples.append(convert(row, raw.where(i), text_column))
        except _Dropped as drop:
            dropped[drop.reason] = dropped.get(drop.reason, 0) + 1
    if not samples:
        counts = ", ".join(f"{reason}: {n}" for reason, n in dropped.items())
        raise EdgetuneError(
            f"{raw.source} has no usable rows (all {len(raw.rows)} dropped; {counts})",
            "fill in the texts and answers, or point data.path at another data set",
        )
    return Samples(format=fmt, samples=samples, dropped=dropped)


def _keys_line(fmt: DataFormat, text_column: str) -> str:
    return FORMAT_KEYS[fmt] if fmt != "text" or text_column == "text" else f'"{text_column}": a string'


def _has(row: dict, key: str) -> bool:
    # Arrow-backed sources (parquet, datasets) give every row every column, with None where a row has no value.
    return row.get(key) is not None


def _uses_from(messages: Any) -> bool:
    """Whether a message list is written ShareGPT style, with "from"/"value" instead of "role"/"content"."""
    first = next((m for m in messages if isinstance(m, dict)), None) if isinstance(messages, list) else None
    return first is not None and "from" in first and "role" not in first


def _row_format(row: dict, text_column: str) -> DataFormat | None:
    if _has(row, "conversations"):
        return "sharegpt"
    if _has(row, "messages"):
        return "sharegpt" if _uses_from(row["messages"]) else "messages"
    if _has(row, "instruction") and _has(row, "output"):
        return "alpaca"
    if _has(row, "prompt") and _has(row, "completion"):
        return "prompt-completion"
    if text_column in row:  # a null text is a blank row, dropped later, not a row of no format
        return "text"
    if "instruction" in row and "output" in row:
        return "alpaca"  # an alpaca row with a null answer, dropped later
    return None


def _fits(row: dict, fmt: DataFormat, text_column: str) -> bool:
    if fmt == "text":
        return text_column in row
    if fmt == "alpaca":
        return "instruction" in row and "output" in row
    if fmt == "sharegpt":
        return _has(row, "conversations") or (_has(row, "messages") and _uses_from(row["messages"]))
    if fmt == "messages":
        return _has(row, "messages") and not _uses_from(row["messages"])
    return _has(row, "prompt") and _has(row, "completion")


def _check_fits(raw: RawData, fmt: DataFormat, text_column: str) -> None:
    for i, row in enumerate(raw.rows):
        if not _fits(row, fmt, text_column):
            raise EdgetuneError(
                f"{raw.where(i)} has keys {show_keys(row)} but data.format {fmt} needs " + _keys_line(fmt, text_column),
                "rename the keys, or change data.format (auto detects it)",
            )


def _text_sample(row: dict, where: str, text_column: str) -> dict:
    text = row[text_column]
    if text is None or (isinstance(text, str) and not text.strip()):
        raise _Dropped("blank text")
    return {"text": string_field(row, text_column, where)}


def _alpaca_sample(row: dict, where: str, text_column: str) -> dict:
    instruction = string_field(row, "instruction", where)
    output = string_field(row, "output", where, optional=True)
    messages = alpaca_messages(
        instruction,
        string_field(row, "input", where, optional=True),
        output,
        string_field(row, "system", where, optional=True),
        row.get("history"),
        where,
    )
    if not output.strip():
        raise _Dropped("empty answer")
    return {"messages": messages}


def _sharegpt_sample(row: dict, where: str, text_column: str) -> dict:
    key = "conversations" if _has(row, "conversations") else "messages"
    system = string_field(row, "system", where, optional=True)
    return _conversation(sharegpt_messages(row[key], key, system, where), row, where)


def _messages_sample(row: dict, where: str, text_column: str) -> dict:
    return _conversation(checked_messages(row["messages"], "messages", where), row, where)


def _prompt_completion_sample(row: dict, where: str, text_column: str) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise _Dropped("empty answer")
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = checked_messages(prompt, "prompt", where) + checked_messages(completion, "completion", where)
        # TRL puts only the completion in the loss, also when the prompt holds earlier assistant turns.
        return _conversation(messages, row, where) | {"answer_from": len(prompt)}
    if isinstance(prompt, str | list) and isinstance(completion, str | list):
        raise EdgetuneError(
            f"{where}: 'prompt' is a {type(prompt).__name__} but 'completion' is a {type(completion).__name__}",
            "make both strings, or both lists of {role, content} messages",
        )
    key, value = ("prompt", prompt) if not isinstance(prompt, str | list) else ("completion", completion)
    raise type_error(where, repr(key), value, "a string or a list of messages")


def _conversation(messages: list[dict], row: dict, where: str) -> dict:
    """The messages sample, or _Dropped when there is no assistant reply to learn."""
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise _Dropped("no assistant turn")
    if not replies[-1]["content"].strip() and not replies[-1].get("tool_calls"):
        raise _Dropped("empty answer")
    tools = tools_of(row, where)
    return {"messages": messages, "tools": tools} if tools is not None else {"messages": messages}


_CONVERTERS = {
    "text": _text_sample,
    "alpaca": _alpaca_sample,
    "sharegpt": _sharegpt_sample,
    "messages": _messages_sample,
    "prompt-completion": _prompt_completion_sample,
}
