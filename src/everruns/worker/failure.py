"""How a worker describes a failed activity or workflow task to the control plane.

An exception becomes the ``error`` object of ``docs/internals.md``: its qualified type name,
its message, a short traceback (the last frames only, so error histories stay small) and
whether it is non-retryable (`everruns.NonRetryableError`). Messages are bounded in size. This
module only formats; it decides nothing about retries.
"""

from __future__ import annotations

import traceback
from typing import Any

from everruns.domain.history import error_info, exception_chain, exception_text
from everruns.domain.limits import is_delay
from everruns.errors import NonRetryableError, RetryAfter

__all__ = [
    "MAX_LEAVES",
    "MAX_MESSAGE_CHARS",
    "MAX_TRACEBACK_CHARS",
    "TRACEBACK_FRAMES",
    "error_from_exception",
    "make_error",
    "short_traceback",
    "type_name",
]

TRACEBACK_FRAMES = 10
MAX_MESSAGE_CHARS = 4000
MAX_TRACEBACK_CHARS = 8000


def type_name(exc: BaseException) -> str:
    """Return ``module.QualName`` of the exception's class (``builtins.ValueError`` too)."""
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _bounded(text: str, limit: int, *, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    marker = "…"
    return marker + text[-(limit - 1) :] if keep_end else text[: limit - 1] + marker


def _message(exc: BaseException) -> str:
    # A broken __str__ must not hide the original failure (nor fail the worker).
    return _bounded(exception_text(exc), MAX_MESSAGE_CHARS)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
_CHAIN_LINKS = 5  # chained exceptions shown at most, the latest ones


def short_traceback(exc: BaseException, *, frames: int = TRACEBACK_FRAMES) -> str:
    """Return the traceback of ``exc`` limited to its last ``frames`` frames (per chained
    exception), its latest `_CHAIN_LINKS` chained exceptions, an exception group's first
    `TRACEBACK_LEAVES` errors (anywhere in the chain: formatting builds an entry for every
    error first), and `MAX_TRACEBACK_CHARS` characters, keeping the end. ``exc`` and its chain
    are read, never changed."""
    try:
        links = exception_chain(exc, _CHAIN_LINKS)  # newest first
        text = _link_text(links[-1], frames)
        for newer, older in zip(links[-2::-1], links[:0:-1], strict=True):
            separator = _CAUSE if newer.__cause__ is older else _CONTEXT
            text += separator + _link_text(newer, frames)
    except Exception:  # formatting must never turn one failure into another
        text = f"{type_name(exc)}: {_message(exc)}\n"
    return _bounded(text, MAX_TRACEBACK_CHARS, keep_end=True)


def _link_text(exc: BaseException, frames: int) -> str:
    """One exception of a chain, without its chain. Python's formatting builds an entry for
    the whole chain (and every error of every group in it) even when it shows one link, so
    a plain exception is formatted here from its frames, and a group as a stand-in (a new
    group of its first `TRACEBACK_LEAVES` errors, without its chain)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        message = exc.message if isinstance(exc.message, str) else ""
        shown = BaseExceptionGroup(f"{type_name(exc)}: {message}", leaves[:TRACEBACK_LEAVES])
        shown.__traceback__ = exc.__traceback__
        if len(leaves) > TRACEBACK_LEAVES:
            more = "more" if len(leaves) >= MAX_LEAVES else str(len(leaves) - TRACEBACK_LEAVES)
            shown.add_note(f"(the first {TRACEBACK_LEAVES} of its errors; {more} left out)")
        return "".join(traceback.format_exception(shown, limit=-frames, chain=False))
    lines = []
    if exc.__traceback__ is not None:
        lines.append("Traceback (most recent call last):\n")
        lines += traceback.format_list(traceback.extract_tb(exc.__traceback__, limit=-frames))
    lines.append(f"{type_name(exc)}: {_message(exc)}\n")
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        lines += [f"{note}\n" for note in notes[:TRACEBACK_LEAVES] if isinstance(note, str)]
    return "".join(lines)


def make_error(type: str, message: str, *, non_retryable: bool = False) -> dict[str, Any]:
    """Return an error object made by the worker itself (no exception, no traceback)."""
    return error_info(type, _bounded(message, MAX_MESSAGE_CHARS), non_retryable=non_retryable)


def error_from_exception(
    exc: BaseException, *, non_retryable: bool | None = None
) -> dict[str, Any]:
    """Return the error object for an exception raised by an activity.

    An exception group (what a Trio nursery raises) is read by its leaves: one error alone,
    wrapped by however many nurseries, is described as itself (its type, so a retry policy's
    ``non_retryable_error_types`` matches it, and its message; the traceback is the group's),
    the attempt is non-retryable when any leaf is a `NonRetryableError`, and it waits for the
    longest `RetryAfter` among them.

    Args:
        exc: the exception.
        non_retryable: override; by default true exactly when a `NonRetryableError` is raised
            (alone or in a group).

    Returns:
        ``{"type", "message", "traceback", "non_retryable"}``, and ``"retry_after"`` for a
        `RetryAfter`.
    """
    leaves = _leaves(exc)
    described = leaves[0] if len(leaves) == 1 else exc
    if non_retryable is None:
        non_retryable = any(isinstance(leaf, NonRetryableError) for leaf in leaves)
    # Checked again: the attribute may have been changed since, and a NaN would not encode.
    waits = [
        float(wait)
        for leaf in leaves
        if isinstance(leaf, RetryAfter) and is_delay(wait := getattr(leaf, "seconds", None))
    ]
    return error_info(
        type_name(described),
        _message(described),
        traceback=short_traceback(exc),
        non_retryable=non_retryable,
        retry_after=max(waits) if waits else None,
    )


MAX_LEAVES = 1000
"""How many of a group's errors are looked at (a group of more is described by these)."""


TRACEBACK_LEAVES = 15
"""How many of a group's errors its traceback shows (Python's own display stops at 15 too, but
builds an entry for every one first)."""


def _leaves(exc: BaseException) -> list[BaseException]:
    """The errors of ``exc`` that are not groups, in order (``[exc]`` for a plain one), at
    most `MAX_LEAVES`; a group that holds itself is not looked into twice."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    leaves: list[BaseException] = []
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack and len(leaves) < MAX_LEAVES:
        item = stack.pop()
        if isinstance(item, BaseExceptionGroup):
            if id(item) not in seen:
                seen.add(id(item))
                stack.extend(reversed(item.exceptions))
        else:
            leaves.append(item)
    return leaves or [exc]
