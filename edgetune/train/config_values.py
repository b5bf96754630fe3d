"""How config values are read, checked and written: strict types, YAML that round-trips, short value pictures.

Shared by the config dataclasses (``edgetune.train.config``) and the file reader (``edgetune.train.config_file``).
"""

import dataclasses
import difflib
import functools
import re
import reprlib
import sys
import types
import typing
from typing import Any, Literal

import yaml

from edgetune.errors import EdgetuneError


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1, and so PyYAML, demands ``3.0e-4``)."""


class Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as ``1e5``, so they load back as strings."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
DUMP_OPTIONS: dict[str, Any] = {"Dumper": Dumper, "sort_keys": False, "width": 1 << 30, "allow_unicode": True}


def check_types(section: Any, name: str) -> None:
    """Type-check (and normalise: int to float, list to tuple) every field of a section built in Python."""
    types_of = field_hints(type(section))
    for f in dataclasses.fields(section):
        object.__setattr__(section, f.name, coerce(f"{name}.{f.name}", getattr(section, f.name), types_of[f.name]))


def check_minimums(section: Any, name: str, **minimums: int) -> None:
    """Raise when a field is below its minimum (integers only)."""
    for key, low in minimums.items():
        value = getattr(section, key)
        if value < low:
            raise EdgetuneError(f"{name}.{key}={value} is below {low}", f"set {name}.{key} to an integer >= {low}")


def is_union(hint: Any) -> bool:
    """``X | None``: ``types.UnionType``, or ``typing.Union`` where X is a ``Literal`` (which ``|`` builds)."""
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


def coerce(key: str, value: Any, hint: Any) -> Any:
    """The value for a field of type ``hint``, after strict checks: no bools as numbers, no floats as ints."""
    if is_union(hint):  # X | None
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, str) and value in allowed:
            return value
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint_text = f"did you mean {close[0]}? " if close else ""
        raise EdgetuneError(f"{key}={show(value)} is not allowed", f"{hint_text}use one of {', '.join(allowed)}")
    if hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not abs(value) <= sys.float_info.max:  # NaN compares False too; huge ints would overflow float()
            raise EdgetuneError(f"{key}={value!r} is not a finite number", f"set {key} to a number such as 1e-4")
        return float(value)
    if typing.get_origin(hint) is tuple:
        items = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(item, str) for item in items):
            return tuple(items)
    expected = "a list of names" if typing.get_origin(hint) is tuple else _EXPECTED[hint]
    unquote = " without quotes" if isinstance(value, str) else ""
    raise EdgetuneError(f"{key} must be {expected}, got {show(value)}", f"set {key} to {expected}{unquote}")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def accepts_str(hint: Any) -> bool:
    return hint is str or is_union(hint) and str in typing.get_args(hint)


def type_name(hint: Any) -> str:
    if is_union(hint):
        return " | ".join("null" if arg is type(None) else type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " | ".join(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "list[str]"
    return hint.__name__


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def show(value: Any) -> str:
    """A short, one-line picture of a value and its type for error messages."""
    if value is None:
        return "null"
    # reprlib stops at a few levels and items: YAML aliases can nest a 400-byte file into a value whose full repr
    # is gigabytes long, and the work must stay bounded, not only the output.
    text = _SHORT.repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 3, 60, 60, 60
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = 6


def yaml_entry(key: str, value: Any) -> str:
    # Double quotes keep strings with newlines or tabs on one line (escaped), so the help comment can follow.
    style = '"' if isinstance(value, str) and not value.isprintable() else None
    flow = None if isinstance(value, list) else False  # None: lists of names in [a, b] form, scalars plain
    text = yaml.dump({key: value}, default_flow_style=flow, default_style=style, **DUMP_OPTIONS)
    return text.rstrip("\n")
