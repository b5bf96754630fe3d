"""Conversations in canonical form: messages checked and normalised, ShareGPT turns and alpaca rows as messages.

``edgetune.train.data_formats`` decides which format a row has; these helpers turn the conversational ones into
``{"role", "content", ...}`` messages and say in one line what is wrong with a row that cannot be.
"""

import json
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.train.data_sources import show_keys

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


def string_field(row: dict, key: str, where: str, *, optional: bool = False, inside: str = "") -> str:
    """``row[key]`` as a string; ``inside`` names the message or part that ``row`` is, for messages."""
    value = row.get(key)
    if isinstance(value, str) or (value is None and optional):
        return value or ""
    raise type_error(where, f"{inside} {key!r}".lstrip(), value, "a string")


def type_error(where: str, label: str, value: Any, expected: str) -> EdgetuneError:
    """``label`` names the value as messages show it: a quoted key, or a message's field ("'messages' item 2 ...")."""
    name = type(value).__name__
    kind = "null" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return EdgetuneError(f"{where}: {label} is {kind}, not {expected}", f"make {label} {expected}")


def checked_messages(messages: Any, key: str, where: str) -> list[dict]:
    """Messages in canonical form: role checked, content a string, tool fields passed through."""
    if not isinstance(messages, list):
        raise type_error(where, repr(key), messages, 'a list of {"role", "content"} messages')
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
            raise type_error(where, f"{what} {field!r}", value, f"a {kind.__name__}")
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
        raise type_error(where, f"{what} 'content'", content, "a string or a list of text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = repr(kind) if kind is not None else f"a {type(part).__name__}"
            raise EdgetuneError(
                f"{where}: {what} has a content part of type {shown}, not text",
                "remove the non-text parts or the row (edgetune trains text-only models)",
            )
        texts.append(string_field(part, "text", where, inside=f"{what} content part"))
    return "".join(texts)


def sharegpt_messages(turns: Any, key: str, system: str, where: str) -> list[dict]:
    """ShareGPT turns as messages, after the row's system prompt when it has one."""
    if not isinstance(turns, list):
        raise type_error(where, repr(key), turns, 'a list of {"from", "value"} turns')
    messages = [{"role": "system", "content": system}] if system else []
    for n, turn in enumerate(turns, start=1):
        if isinstance(turn, dict) and "from" not in turn and "role" in turn:
            # Many hub sets keep the ShareGPT key but write OpenAI-style turns.
            messages.append(_message(turn, f"{key!r} item {n}", where))
            continue
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            found = f"'from' {speaker!r}" if isinstance(turn, dict) and "from" in turn else "no 'from'"
            raise EdgetuneError(
                f"{where}: {key!r} item {n} has {found}",
                f"set 'from' to one of {', '.join(SHAREGPT_ROLES)}",
            )
        messages.append(
            {"role": SHAREGPT_ROLES[speaker], "content": string_field(turn, "value", where, inside=f"{key!r} item {n}")}
        )
    return messages


def alpaca_messages(instruction: str, extra: str, output: str, system: str, history: Any, where: str) -> list[dict]:
    """An alpaca row as messages: system, the history pairs, then the instruction and its output."""
    messages = [{"role": "system", "content": system}] if system else []
    if history is not None:
        pairs_ok = isinstance(history, list) and all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history
        )
        if not pairs_ok:
            raise type_error(where, "'history'", history, "a list of [user, assistant] string pairs")
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    # The instruction and its input are joined with one newline, as LLaMA-Factory's alpaca converter does.
    user = instruction + "\n" + extra if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def tools_of(row: dict, where: str) -> list | None:
    """The row's tool schemas; a JSON string (as LLaMA-Factory and many hub data sets store them) is parsed."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise EdgetuneError(f"{where}: 'tools' is a string but not valid JSON", "write it as a JSON list") from None
    if tools is not None and not isinstance(tools, list):
        raise type_error(where, "'tools'", tools, "a list of tool schemas")
    return tools
