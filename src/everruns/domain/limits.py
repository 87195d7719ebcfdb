"""What the database can hold: the bounds input is checked against where it enters.

A value PostgreSQL cannot store (a duration past the range of its intervals and timestamps, an
integer past ``integer``, a NUL character in ``text`` or ``jsonb``) passes Python's own checks,
then fails deep in a transaction as an internal error, which workers retry without end. So
commands, retry policies, requests and the configuration are checked against these bounds as
they come in, and the caller gets one line naming the field instead. No I/O here.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

from everruns.errors import InvalidArgument

__all__ = [
    "MAX_INCARNATION_LENGTH",
    "MAX_INT4",
    "MAX_NAME_LENGTH",
    "MAX_SECONDS",
    "MAX_SECONDS_TEXT",
    "MAX_WORKER_ID_LENGTH",
    "check_name",
    "check_text",
    "check_type_name",
    "check_worker_id",
    "escape_nul_in_json",
    "is_delay",
    "shown",
]

MAX_SECONDS = 100 * 365.25 * 86400.0
"""The longest duration accepted anywhere (timers, timeouts, retry intervals, the control
plane's configured limits): 100 years, 3,155,760,000 s. PostgreSQL's intervals end near 292,000
years; 100 years keeps ``now() + d`` far from every edge, and no real timeout is longer."""

MAX_SECONDS_TEXT = f"{MAX_SECONDS:.0f} s (100 years)"
"""`MAX_SECONDS` as error messages spell it."""

MAX_INT4 = 2**31 - 1
"""The largest value of a PostgreSQL ``integer`` column (attempts, priorities)."""

MAX_NAME_LENGTH = 512
"""The longest type, id or key name: the ``CHECK (length(...) BETWEEN 1 AND 512)`` of the
name columns."""

MAX_WORKER_ID_LENGTH = 256
"""The longest worker id: ``durable_workers.id`` is ``CHECK (length(id) BETWEEN 1 AND 256)``."""

MAX_INCARNATION_LENGTH = 256
"""The longest incarnation token a worker may send: ``durable_workers.incarnation`` is
``CHECK (length(incarnation) BETWEEN 1 AND 256)``."""

_NUL_ESCAPE = "\\u0000"  # how JSON text spells a NUL character


def check_name(value: object, what: str, *, limit: int = MAX_NAME_LENGTH) -> str:
    """Return ``value`` if it can name a type, id, signal or breaker key.

    Args:
        value: the name.
        what: the field, for the message (``"activity_type"``).

    Returns:
        ``value`` unchanged.

    Raises:
        InvalidArgument: ``value`` is not a string, is empty or only spaces, is longer than
            ``limit`` (`MAX_NAME_LENGTH`), or holds a NUL character (PostgreSQL text cannot);
            the one-line message names ``what``.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL characters")
    return value


def shown(value: str, limit: int = 80) -> str:
    """``value`` as an error message quotes it: ``repr``, cut to ``limit`` characters (a bad
    value may be huge; the message must stay a line)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_text(value: str, what: str, *, limit: int = MAX_NAME_LENGTH) -> str:
    """Return ``value`` if PostgreSQL text can hold it within ``limit`` characters: optional
    descriptive text (a worker's host or version), which may be empty.

    Raises:
        InvalidArgument: too long, or holds a NUL character.
    """
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL characters")
    return value


def check_utf8(value: str, what: str) -> str:
    """Return ``value`` if the wire (UTF-8) can carry it: a lone surrogate (a file name from
    ``os.fsdecode``, a JSON ``"\\udce9"`` escape) cannot.

    Raises:
        InvalidArgument: names ``what`` and the position of the character.
    """
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{what} {shown(value)} cannot be sent: UTF-8 cannot encode the character at "
            f"position {exc.start} ({exc.reason})"
        ) from None
    return value


def check_worker_id(value: object) -> str:
    """`check_name` for a worker id, whose column allows `MAX_WORKER_ID_LENGTH` characters."""
    return check_name(value, "worker_id", limit=MAX_WORKER_ID_LENGTH)


def check_type_name(value: object, what: str) -> str:
    """`check_name` for a workflow or activity type, which also has no surrounding spaces:
    the registry refuses such names, so a run or an activity of that type would wait for a
    worker that can never register it.

    Raises:
        InvalidArgument: as `check_name`, or ``value`` begins or ends with a space.
    """
    name = check_name(value, what)
    if name.strip() != name:
        raise InvalidArgument(f"{what} {name!r} must not begin or end with spaces")
    return name


def escape_nul_in_json(text: str) -> str:
    """Return JSON text whose strings hold no NUL character, each written ``\\x00`` instead.

    For reports that must be kept whatever they hold, such as a failed attempt's error: a NUL
    in them would make PostgreSQL refuse the whole report, so it is escaped, not refused.
    Text that is not JSON gets its raw NUL characters escaped the same way and stays as it
    is otherwise. Text without NUL (nearly all) costs two scans and is returned unchanged.

    Args:
        text: the JSON text from the wire.

    Returns:
        ``text``, or an equivalent JSON text (keys and values alike escaped).
    """
    # A raw NUL is never valid JSON: that text is kept whole as a message.
    text = text.replace("\x00", "\\x00")
    if _NUL_ESCAPE not in text:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text  # kept as a message: no NUL character in it
    return json.dumps(_escaped(value), ensure_ascii=False)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    return value


def is_delay(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a number of seconds from 0 to `MAX_SECONDS`: an int or float, not
    a bool (NaN compares false, infinity and an int past a float's range exceed the bound, so
    ``now() + value`` stays inside PostgreSQL's timestamps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= MAX_SECONDS


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is a real number a float can hold: an int or float, not a bool, not
    NaN or infinite, and no int past a float's range (``math.isfinite`` raises OverflowError
    for one: ``ctx.sleep(10**400)`` failed the run with it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
