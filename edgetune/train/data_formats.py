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

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from edgetune.errors import EdgetuneError
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

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers (LLaMA-Factory's names included): function_call is the assistant calling a tool, written as
# text in "value"; observation is the tool's answer.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
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


def _type_error(where: str, label: str, value: Any, expected: str) -> EdgetuneError:
    """``label`` names the value as messages show it: a quoted key, or a message's field ("'messages' item 2 ...")."""
    name = type(value).__name__
    kind = "null" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return EdgetuneError(f"{where}: {label} is {kind}, not {expected}", f"make {label} {expected}")


def _string(row: dict, key: str, where: str, *, optional: bool = False, inside: str = "") -> str:
    """``row[key]`` as a string; ``inside`` names the message or part that ``row`` is, for messages."""
    value = row.get(key)
    if isinstance(value, str) or (value is None and optional):
        return value or ""
    raise _type_error(where, f"{inside} {key!r}".lstrip(), value, "a string")


def _text_sample(row: dict, where: str, text_column: str) -> dict:
    text = row[text_column]
    if text is None or (isinstance(text, str) and not text.strip()):
        raise _Dropped("blank text")
    return {"text": _string(row, text_column, where)}


def _alpaca_sample(row: dict, where: str, text_column: str) -> dict:
    instruction = _string(row, "instruction", where)
    output = _string(row, "output", where, optional=True)
    messages = _alpaca_messages(
        instruction,
        _string(row, "input", where, optional=True),
        output,
        _string(row, "system", where, optional=True),
        row.get("history"),
        where,
    )
    if not output.strip():
        raise _Dropped("empty answer")
    return {"messages": messages}


def _sharegpt_sample(row: dict, where: str, text_column: str) -> dict:
    key = "conversations" if _has(row, "conversations") else "messages"
    system = _string(row, "system", where, optional=True)
    return _conversation(_sharegpt_messages(row[key], key, system, where), row, where)


def _messages_sample(row: dict, where: str, text_column: str) -> dict:
    return _conversation(_checked_messages(row["messages"], "messages", where), row, where)


def _prompt_completion_sample(row: dict, where: str, text_column: str) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise _Dropped("empty answer")
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = _checked_messages(prompt, "prompt", where) + _checked_messages(completion, "completion", where)
        # TRL puts only the completion in the loss, also when the prompt holds earlier assistant turns.
        return _conversation(messages, row, where) | {"answer_from": len(prompt)}
    if isinstance(prompt, str | list) and isinstance(completion, str | list):
        raise EdgetuneError(
            f"{where}: 'prompt' is a {type(prompt).__name__} but 'completion' is a {type(completion).__name__}",
            "make both strings, or both lists of {role, content} messages",
        )
    key, value = ("prompt", prompt) if not isinstance(prompt, str | list) else ("completion", completion)
    raise _type_error(where, repr(key), value, "a string or a list of messages")


def _conversation(messages: list[dict], row: dict, where: str) -> dict:
    """The messages sample, or _Dropped when there is no assistant reply to learn."""
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise _Dropped("no assistant turn")
    if not replies[-1]["content"].strip() and not replies[-1].get("tool_calls"):
        raise _Dropped("empty answer")
    tools = _tools_of(row, where)
    return {"messages": messages, "tools": tools} if tools is not None else {"messages": messages}


_CONVERTERS = {
    "text": _text_sample,
    "alpaca": _alpaca_sample,
    "sharegpt": _sharegpt_sample,
    "messages": _messages_sample,
    "prompt-completion": _prompt_completion_sample,
}


def _checked_messages(messages: Any, key: str, where: str) -> list[dict]:
    """Messages in canonical form: role checked, content a string, tool fields passed through."""
    if not isinstance(messages, list):
        raise _type_error(where, repr(key), messages, 'a list of {"role", "content"} messages')
    return [_message(m, f"{key!r} item {n}", where) for n, m in enumerate(messages, start=1)]


def _message(message: Any, what: str, where: str) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        found = f"keys {show_keys(message)}" if isinstance(message, dict) else f"a {type(message).__name__}"
        raise EdgetuneError(
            f'{where}: {what} is not a {{"role", "content"}} message (found {found})',
            'write messages as {"role": "user", "content": "..."}',
        )
    role = message["role"]
    if role not in ROLES:
        raise EdgetuneError(f"{where}: {what} has role {role!r}", f"use one of the roles {', '.join(ROLES)}")
    out = {"role": role, "content": _content(message.get("content"), what, where)}
    for field, kind in (("tool_calls", list), ("name", str), ("tool_call_id", str)):
        value = message.get(field)
        if value is not None and not isinstance(value, kind):
            raise _type_error(where, f"{what} {field!r}", value, f"a {kind.__name__}")
        if value is not None:
            out[field] = value
    if message.get("content") is None and not (role == "assistant" and out.get("tool_calls")):
        raise EdgetuneError(
            f"{where}: {what} has no content",
            "give it a content string (only an assistant turn with tool_calls may have none)",
        )
    return out


def _content(content: Any, what: str, where: str) -> str:
    """A message's content as one string; a list of parts is joined, since edgetune trains text-only models."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise _type_error(where, f"{what} 'content'", content, "a string or a list of text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = repr(kind) if kind is not None else f"a {type(part).__name__}"
            raise EdgetuneError(
                f"{where}: {what} has a content part of type {shown}, not text",
                "remove the non-text parts or the row (edgetune trains text-only models)",
            )
        texts.append(_string(part, "text", where, inside=f"{what} content part"))
    return "".join(texts)


def _sharegpt_messages(turns: Any, key: str, system: str, where: str) -> list[dict]:
    """ShareGPT turns as messages, after the row's system prompt when it has one."""
    if not isinstance(turns, list):
        raise _type_error(where, repr(key), turns, 'a list of {"from", "value"} turns')
    messages = [{"role": "system", "content": system}] if system else []
    for n, turn in enumerate(turns, start=1):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            found = f"'from' {speaker!r}" if isinstance(turn, dict) and "from" in turn else "no 'from'"
            raise EdgetuneError(
                f"{where}: {key!r} item {n} has {found}",
                f"set 'from' to one of {', '.join(SHAREGPT_ROLES)}",
            )
        messages.append(
            {"role": SHAREGPT_ROLES[speaker], "content": _string(turn, "value", where, inside=f"{key!r} item {n}")}
        )
    return messages


def _alpaca_messages(instruction: str, extra: str, output: str, system: str, history: Any, where: str) -> list[dict]:
    """An alpaca row as messages: system, the history pairs, then the instruction and its output."""
    messages = [{"role": "system", "content": system}] if system else []
    if history is not None:
        pairs_ok = isinstance(history, list) and all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history
        )
        if not pairs_ok:
            raise _type_error(where, "'history'", history, "a list of [user, assistant] string pairs")
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    # The instruction and its input are joined with one newline, as LLaMA-Factory's alpaca converter does.
    user = instruction + "\n" + extra if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _tools_of(row: dict, where: str) -> list | None:
    """The row's tool schemas; a JSON string (as LLaMA-Factory and many hub data sets store them) is parsed."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise EdgetuneError(f"{where}: 'tools' is a string but not valid JSON", "write it as a JSON list") from None
    if tools is not None and not isinstance(tools, list):
        raise _type_error(where, "'tools'", tools, "a list of tool schemas")
    return tools
