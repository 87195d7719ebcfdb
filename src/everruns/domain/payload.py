"""Exact JSON payloads: what crosses the wire and the database as bytes/text.

Integers keep every digit, floats round-trip through their shortest repr, strings keep every
code point; values JSON cannot carry (sets, bytes, NaN, objects…) are refused with a message
naming the offending type and where it sits. No I/O here.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

from everruns.errors import PayloadError

__all__ = ["copy_json", "decode", "encode", "encode_text", "json_error"]

# One encoder for every payload: `json.dumps` with any option builds a new JSONEncoder per call,
# which costs as much as encoding a small payload.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _NotFinite(ValueError):
    """JSON text holds a number no double can carry, or a constant JSON does not have."""


def _finite(literal: str) -> float:
    """The float of a JSON number literal; refuses one beyond a double's range, which every
    reader would take as infinity (and Python writes back as ``Infinity``, not JSON)."""
    value = float(literal)
    if math.isinf(value):  # a JSON literal is never NaN
        shown = literal if len(literal) <= 24 else f"{literal[:10]}...{literal[-10:]}"
        raise _NotFinite(
            f"the number {shown} is beyond a double's range (it reads as infinity); "
            "send it as a string"
        )
    return value


def _no_constant(name: str) -> Any:
    raise _NotFinite(f"{name} is not a JSON value; use null or a string")


# What the control plane accepts from clients: `json.loads`, but refusing NaN, Infinity and
# numbers that overflow a double, none of which can be written back as JSON.
_STRICT: dict[str, Any] = {"parse_float": _finite, "parse_constant": _no_constant}
# The C scanner `json.loads` parses with, called without the layers around it (whitespace
# handling, error positions): a fifth of `json.loads`'s time for a small value.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(**_STRICT).scan_once  # type: ignore[attr-defined]
# The exact JSON of the three constants.
_SCALARS: dict[Any, str] = {None: "null", True: "true", False: "false"}


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain exact JSON: only the built-in types themselves, finite
    floats, str keys. It builds no path as it walks, so the payloads that pass (nearly all)
    cost a third of what `_check` costs them; False also for what only `_check` can judge
    (subclasses of the built-in types, which it accepts)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    # Plain loops: all() over a generator doubles the cost of the walk.
    if kind is dict:
        for key, item in value.items():  # noqa: SIM110
            if type(key) is not str or not _plain(item):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:  # noqa: SIM110
            if not _plain(item):
                return False
        return True
    return False


def _check(value: Any, path: str) -> None:
    # Walk explicitly: json.dumps' own error names neither the path nor, for NaN, the problem.
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(
                f"{path} is {value!r}, which JSON cannot carry; use null or a string"
            )
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(
                    f"{path} has a key of type {type(key).__name__}; JSON object keys must be str"
                )
            _check(item, f"{path}[{key!r}]")
        return
    raise PayloadError(
        f"{path} is of type {type(value).__module__}.{type(value).__qualname__}, "
        "which is not JSON-serializable; convert it to dict/list/str/int/float/bool/None"
    )


def _text(value: Any, what: str) -> str:
    """The JSON text of ``value``, which may still hold a lone surrogate (see `encode_text`)."""
    kind = type(value)
    try:
        if kind is int:  # the commonest input and id; JSONEncoder builds its C encoder per call
            return int.__repr__(value)
        if kind is bool or value is None:
            return _SCALARS[value]
        if not _plain(value):
            _check(value, what)
        return _ENCODER.encode(value)
    except ValueError as exc:  # an int past Python's limit of digits for a conversion to text
        reason = str(exc).split(";")[0]
        raise PayloadError(f"{what} cannot be written as JSON: {reason}") from None
    except RecursionError:
        raise PayloadError(
            f"{what} is nested too deeply (or contains itself) to be written as JSON"
        ) from None


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from os.fsdecode or JSON "\\udce9"
        raise PayloadError(
            f"{what} holds the lone surrogate {exc.object[exc.start]!r}, which UTF-8 cannot "
            "carry; decode the text it came from properly (or use errors='replace')"
        ) from None


def encode_text(value: Any, *, what: str = "payload") -> str:
    """Return the exact JSON text of ``value``.

    Raises:
        PayloadError: ``value`` contains something JSON cannot carry exactly (a type JSON does
            not have, NaN, a string UTF-8 cannot encode, nesting deeper than Python's
            recursion limit or a value that contains itself).
    """
    text = _text(value, what)
    if not text.isascii():
        _utf8(text, what)
    return text


def encode(value: Any, *, what: str = "payload") -> bytes:
    """Return the exact JSON of ``value`` as UTF-8 bytes (see `encode_text`)."""
    return _utf8(_text(value, what), what)


def json_error(text: str) -> str | None:
    """None when ``text`` is one JSON value, as `json.loads` reads it; else its message.

    Unlike `json.loads`, it refuses NaN, Infinity and -Infinity (not JSON) and a number
    beyond a double's range (``1e400``, which reads as infinity), so that every value it
    passes decodes to one that can be written back as JSON.

    Text that is a value from its first character to its last (what encoders write) costs one
    scan; anything else (surrounding whitespace, an error) is judged by `json.loads` itself.
    """
    try:
        end = _SCAN(text, 0)[1]
    except _NotFinite as exc:
        return str(exc)
    except (StopIteration, ValueError, RecursionError):  # no value there; a malformed one
        end = -1
    if end == len(text):
        return None
    try:
        json.loads(text, **_STRICT)
    except ValueError as exc:
        return str(exc)
    except RecursionError:
        return "it is nested too deeply"
    return None


def decode(data: bytes | str, *, what: str = "payload") -> Any:
    """Parse exact JSON; the empty string means null (proto3's default for bytes).

    Raises:
        PayloadError: ``data`` is not valid JSON text.
    """
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply to be read") from None


_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


def copy_json(value: Any, *, text: Callable[[str], str] | None = None) -> Any:
    """Return a deep copy of a JSON value, its strings (keys included) passed through
    ``text`` when given.

    Iterative: a value nested as deeply as the JSON parser and the payload layer accept (up to
    Python's recursion limit) is copied, where `copy.deepcopy` needs two frames a level and
    fails half-way there. Shared and cyclic dicts and lists stay so, as with `copy.deepcopy`;
    anything but the JSON types is left to it.
    """
    kind = type(value)
    if kind is str and text is not None:
        return text(value)
    if kind in _IMMUTABLE:
        return value
    if kind is not dict and kind is not list:
        return copy.deepcopy(value)
    top: Any = {} if kind is dict else []
    memo: dict[int, Any] = {id(value): top}
    stack: list[tuple[Any, Any]] = [(value, top)]
    while stack:
        source, target = stack.pop()
        into_dict = type(source) is dict
        for key, item in source.items() if into_dict else enumerate(source):
            kind = type(item)
            copied: Any
            if kind is str and text is not None:
                copied = text(item)
            elif kind in _IMMUTABLE:
                copied = item
            elif kind is dict or kind is list:
                copied = memo.get(id(item))
                if copied is None:
                    copied = memo[id(item)] = {} if kind is dict else []
                    stack.append((item, copied))
            else:
                copied = copy.deepcopy(item)
            if not into_dict:
                target.append(copied)
            elif text is not None and type(key) is str:
                target[text(key)] = copied
            else:
                target[key] = copied
    return top
