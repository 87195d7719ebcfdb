"""The workflow event history: event type names, the `HistoryEvent` value, and event builders.

Every fact about a workflow run is an event, a JSON object with a ``type`` (see
``docs/internals.md``); this module names those types, sorts them into the roles they play in
replay (command events, input events, the marker, ignored ones), and builds the event objects so
that the control plane, the replay engine and the tests all write the same shapes. It must stay a
vocabulary: no I/O, no clock, no decisions about what a workflow does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from everruns.domain.limits import is_finite_number
from everruns.errors import InvalidArgument

__all__ = [
    "ACTIVITY_CANCELLED",
    "ACTIVITY_CANCEL_REQUESTED",
    "ACTIVITY_COMPLETED",
    "ACTIVITY_FAILED",
    "ACTIVITY_SCHEDULED",
    "ACTIVITY_STARTED",
    "ACTIVITY_TIMED_OUT",
    "ALL_EVENT_TYPES",
    "CHILD_WORKFLOW_COMPLETED",
    "CHILD_WORKFLOW_FAILED",
    "CHILD_WORKFLOW_STARTED",
    "COMMAND_EVENT_TYPES",
    "IGNORED_EVENT_TYPES",
    "INPUT_EVENT_TYPES",
    "MARKER_EVENT_TYPE",
    "PATCH_RECORDED",
    "SIGNAL_RECEIVED",
    "TERMINAL_EVENT_TYPES",
    "TIMER_CANCELLED",
    "TIMER_FIRED",
    "TIMER_STARTED",
    "WORKFLOW_CANCELLED",
    "WORKFLOW_CANCEL_REQUESTED",
    "WORKFLOW_COMPLETED",
    "WORKFLOW_CONTINUED_AS_NEW",
    "WORKFLOW_FAILED",
    "WORKFLOW_STARTED",
    "WORKFLOW_TASK_COMPLETED",
    "WORKFLOW_TASK_FAILED",
    "WORKFLOW_TASK_SCHEDULED",
    "HistoryEvent",
    "activity_cancel_requested",
    "activity_cancelled",
    "activity_completed",
    "activity_failed",
    "activity_scheduled",
    "activity_started",
    "activity_timed_out",
    "child_workflow_completed",
    "child_workflow_failed",
    "child_workflow_started",
    "error_info",
    "exception_chain",
    "exception_text",
    "format_time",
    "parse_time",
    "patch_recorded",
    "signal_received",
    "timer_cancelled",
    "timer_fired",
    "timer_started",
    "workflow_cancel_requested",
    "workflow_cancelled",
    "workflow_completed",
    "workflow_continued_as_new",
    "workflow_failed",
    "workflow_started",
    "workflow_task_completed",
    "workflow_task_failed",
    "workflow_task_scheduled",
]

WORKFLOW_STARTED = "workflow_started"
WORKFLOW_TASK_SCHEDULED = "workflow_task_scheduled"
WORKFLOW_TASK_COMPLETED = "workflow_task_completed"
WORKFLOW_TASK_FAILED = "workflow_task_failed"
ACTIVITY_SCHEDULED = "activity_scheduled"
ACTIVITY_STARTED = "activity_started"
ACTIVITY_COMPLETED = "activity_completed"
ACTIVITY_FAILED = "activity_failed"
ACTIVITY_TIMED_OUT = "activity_timed_out"
ACTIVITY_CANCEL_REQUESTED = "activity_cancel_requested"
ACTIVITY_CANCELLED = "activity_cancelled"
TIMER_STARTED = "timer_started"
TIMER_FIRED = "timer_fired"
TIMER_CANCELLED = "timer_cancelled"
SIGNAL_RECEIVED = "signal_received"
CHILD_WORKFLOW_STARTED = "child_workflow_started"
CHILD_WORKFLOW_COMPLETED = "child_workflow_completed"
CHILD_WORKFLOW_FAILED = "child_workflow_failed"
WORKFLOW_CANCEL_REQUESTED = "workflow_cancel_requested"
WORKFLOW_COMPLETED = "workflow_completed"
WORKFLOW_FAILED = "workflow_failed"
WORKFLOW_CANCELLED = "workflow_cancelled"
WORKFLOW_CONTINUED_AS_NEW = "workflow_continued_as_new"
PATCH_RECORDED = "patch_recorded"

MARKER_EVENT_TYPE = WORKFLOW_TASK_COMPLETED
"""Ends a replay batch: the command events recorded after it are that workflow task's result."""

COMMAND_EVENT_TYPES: frozenset[str] = frozenset(
    {
        ACTIVITY_SCHEDULED,
        TIMER_STARTED,
        TIMER_CANCELLED,
        CHILD_WORKFLOW_STARTED,
        WORKFLOW_COMPLETED,
        WORKFLOW_FAILED,
        WORKFLOW_CANCELLED,
        WORKFLOW_CONTINUED_AS_NEW,
        PATCH_RECORDED,
    }
)
"""Events written only when a workflow task's commands are applied."""

TERMINAL_EVENT_TYPES: frozenset[str] = frozenset(
    {WORKFLOW_COMPLETED, WORKFLOW_FAILED, WORKFLOW_CANCELLED, WORKFLOW_CONTINUED_AS_NEW}
)

INPUT_EVENT_TYPES: frozenset[str] = frozenset(
    {
        WORKFLOW_STARTED,
        ACTIVITY_COMPLETED,
        ACTIVITY_FAILED,
        ACTIVITY_TIMED_OUT,
        ACTIVITY_CANCELLED,
        TIMER_FIRED,
        SIGNAL_RECEIVED,
        CHILD_WORKFLOW_COMPLETED,
        CHILD_WORKFLOW_FAILED,
        WORKFLOW_CANCEL_REQUESTED,
    }
)
"""Events that may wake workflow code. ``activity_failed``/``activity_timed_out`` only do so
when ``will_retry`` is false; otherwise replay merely checks that their id is known."""

IGNORED_EVENT_TYPES: frozenset[str] = frozenset(
    {WORKFLOW_TASK_SCHEDULED, WORKFLOW_TASK_FAILED, ACTIVITY_STARTED, ACTIVITY_CANCEL_REQUESTED}
)
"""Diagnostic events: replay checks the ids they name but never wakes workflow code for them."""

ALL_EVENT_TYPES: frozenset[str] = (
    COMMAND_EVENT_TYPES | INPUT_EVENT_TYPES | IGNORED_EVENT_TYPES | {MARKER_EVENT_TYPE}
)


def _is_object(value: Any) -> bool:
    # A dict first: the ABC's isinstance check is what costs, on every event replayed.
    return type(value) is dict or isinstance(value, Mapping)


def _check_data(inst: HistoryEvent, _attr: attrs.Attribute[Any], value: Mapping[str, Any]) -> None:
    if not _is_object(value):
        raise InvalidArgument(f"event data must be a JSON object, got {type(value).__name__}")
    recorded = value.get("type", inst.type)
    if recorded != inst.type:
        raise InvalidArgument(f"event data says type {recorded!r} but the event is {inst.type!r}")


def _check_type(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"event type must be a non-empty string, got {value!r}")


def _check_seq(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"sequence_num must be an integer >= 1, got {value!r}")


@attrs.frozen
class HistoryEvent:
    """One recorded event of a workflow run.

    ``data`` is the whole event object exactly as stored in the ``payload`` column, so it
    includes ``"type"`` too (when present it must equal ``type``); readers take fields from it
    with ``event.data["activity_id"]`` and never need to know the column layout.

    Attributes:
        sequence_num: position in the run's history, from 1.
        type: the event type, one of the ``*_EVENT_TYPES`` names of this module.
        data: the event's JSON object.
        time: when the control plane recorded it (UTC).

    Raises:
        InvalidArgument: a field is malformed.
    """

    sequence_num: int = attrs.field(validator=_check_seq)
    type: str = attrs.field(validator=_check_type)
    data: Mapping[str, Any] = attrs.field(validator=_check_data)
    time: datetime

    @classmethod
    def of(cls, sequence_num: int, data: Mapping[str, Any], *, time: datetime) -> HistoryEvent:
        """Build an event from its JSON object, taking the type from ``data["type"]``.

        Returns:
            The event.

        Raises:
            InvalidArgument: ``data`` has no string ``type`` or another field is malformed.
        """
        if not _is_object(data) or not isinstance(data.get("type"), str):
            raise InvalidArgument("event data must be a JSON object with a string 'type'")
        return cls(sequence_num=sequence_num, type=data["type"], data=data, time=time)

    def describe(self) -> str:
        """Return a short operator-readable form such as ``activity_scheduled(id=3, type=charge)``.

        Returns:
            The description (used in non-determinism messages).
        """
        d = self.data
        parts: list[str] = []
        for key in ("activity_id", "timer_id", "child_id", "patch_id"):
            if key in d:
                parts.append(f"id={d[key]}")
        if self.type == ACTIVITY_SCHEDULED:
            parts.append(f"type={d.get('activity_type')}")
        elif self.type == CHILD_WORKFLOW_STARTED:
            parts.append(f"type={d.get('workflow_type')}")
            if d.get("workflow_id") is not None:
                parts.append(f"workflow_id={d['workflow_id']}")
        elif self.type == TIMER_STARTED:
            parts.append(f"seconds={d.get('seconds')}")
        elif self.type == SIGNAL_RECEIVED:
            parts.append(f"name={d.get('name')}")
        return f"{self.type}({', '.join(parts)})"


def format_time(value: datetime) -> str:
    """Return ``value`` as ISO-8601 in UTC (the form of the marker's ``time`` field).

    Raises:
        InvalidArgument: ``value`` is naive (has no timezone).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"time must be timezone-aware, got naive {value!r}")
    return value.astimezone(UTC).isoformat()


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 time; a naive one is taken as UTC.

    Returns:
        An aware datetime in UTC.

    Raises:
        InvalidArgument: ``text`` is not an ISO-8601 time.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"time must be an ISO-8601 string, got {type(text).__name__}")
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidArgument(f"time {text!r} is not ISO-8601") from exc
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def exception_chain(exc: BaseException, limit: int) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (``__cause__``, else
    ``__context__`` unless suppressed, as a traceback shows them), newest first, each once,
    at most ``limit``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < limit and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return chain


def exception_text(exc: BaseException) -> str:
    """Return ``str(exc)``, or a placeholder when the exception's own ``__str__`` raises.

    Exceptions come from user code, and a broken ``__str__`` (an attribute it reads never set)
    must not turn the failure being reported into another one. Any exception ``__str__``
    raises gives ``<unprintable TypeName: ErrorType: message>``, as any exception workflow code
    raises is its failure; only the operator's KeyboardInterrupt propagates.

    Returns:
        The exception's message, or the placeholder.
    """
    try:
        return str(exc)
    except KeyboardInterrupt:
        raise
    except BaseException as bad:
        try:
            why = f"{type(bad).__name__}: {bad}"
        except KeyboardInterrupt:
            raise
        except BaseException:
            why = type(bad).__name__
        return f"<unprintable {type(exc).__name__}: {why}>"


def error_info(
    type: str,
    message: str,
    *,
    traceback: str = "",
    non_retryable: bool = False,
    retry_after: float | None = None,
) -> dict[str, Any]:
    """Return the ``error`` object carried by failure events (text UTF-8 cannot carry, a
    lone surrogate, written as its escape: the object must reach the control plane).

    Returns:
        ``{"type", "message", "traceback", "non_retryable"}``, and ``"retry_after"`` (the
        least delay before the next attempt, `everruns.RetryAfter`'s) when given.
    """
    info: dict[str, Any] = {
        "type": _sendable(type),
        "message": _sendable(message),
        "traceback": _sendable(traceback),
        "non_retryable": non_retryable,
    }
    if retry_after is not None:
        info["retry_after"] = retry_after
    return info


def _sendable(text: str) -> str:
    # A lone surrogate (a file name from os.fsdecode, a JSON "\udce9" escape) cannot be sent
    # as UTF-8: left in, the failure could not be reported, and a workflow's run would stay
    # stuck instead of failed, an activity's attempt unreported. Written as its escape, as
    # `repr` would show it.
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _seconds(value: float) -> float:
    if not is_finite_number(value):
        raise InvalidArgument(f"seconds must be a finite number, got {value!r}")
    return float(value)


def workflow_started(
    workflow_type: str,
    workflow_id: str,
    run_id: str,
    input: Any,
    *,
    parent: Mapping[str, Any] | None = None,
    continued_from: str | None = None,
) -> dict[str, Any]:
    """Return a ``workflow_started`` event (``parent`` only when the run is a child,
    ``continued_from`` only when it goes on from that run, which continued as new)."""
    event: dict[str, Any] = {
        "type": WORKFLOW_STARTED,
        "workflow_type": workflow_type,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "input": input,
    }
    if parent is not None:
        event["parent"] = dict(parent)
    if continued_from is not None:
        event["continued_from"] = continued_from
    return event


def workflow_task_scheduled() -> dict[str, Any]:
    """Return a ``workflow_task_scheduled`` event."""
    return {"type": WORKFLOW_TASK_SCHEDULED}


def workflow_task_completed(
    worker_id: str, time: datetime, *, seen_sequence: int | None = None
) -> dict[str, Any]:
    """Return the marker event; ``time`` is the claim time replay will give ``ctx.now()``.

    ``seen_sequence`` is recorded when the decision was made on less history than precedes
    its marker (events arrived while it travelled and were held for the next decision):
    replay then delivers the events after ``seen_sequence`` after this decision's commands.

    Raises:
        InvalidArgument: ``time`` is naive.
    """
    event: dict[str, Any] = {
        "type": WORKFLOW_TASK_COMPLETED,
        "worker_id": worker_id,
        "time": format_time(time),
    }
    if seen_sequence is not None:
        event["seen_sequence"] = seen_sequence
    return event


def workflow_task_failed(error: Mapping[str, Any]) -> dict[str, Any]:
    """Return a ``workflow_task_failed`` event."""
    return {"type": WORKFLOW_TASK_FAILED, "error": dict(error)}


def activity_scheduled(
    activity_id: str, activity_type: str, input: Any, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Return an ``activity_scheduled`` event."""
    return {
        "type": ACTIVITY_SCHEDULED,
        "activity_id": activity_id,
        "activity_type": activity_type,
        "input": input,
        "options": dict(options),
    }


def activity_started(activity_id: str, attempt: int, worker_id: str) -> dict[str, Any]:
    """Return an ``activity_started`` event."""
    return {
        "type": ACTIVITY_STARTED,
        "activity_id": activity_id,
        "attempt": attempt,
        "worker_id": worker_id,
    }


def activity_completed(activity_id: str, result: Any, attempt: int) -> dict[str, Any]:
    """Return an ``activity_completed`` event."""
    return {
        "type": ACTIVITY_COMPLETED,
        "activity_id": activity_id,
        "result": result,
        "attempt": attempt,
    }


def activity_failed(
    activity_id: str, error: Mapping[str, Any], attempt: int, will_retry: bool
) -> dict[str, Any]:
    """Return an ``activity_failed`` event; replay wakes the workflow only if not ``will_retry``."""
    return {
        "type": ACTIVITY_FAILED,
        "activity_id": activity_id,
        "error": dict(error),
        "attempt": attempt,
        "will_retry": will_retry,
    }


def activity_timed_out(
    activity_id: str, kind: str, attempt: int, will_retry: bool
) -> dict[str, Any]:
    """Return an ``activity_timed_out`` event (``kind`` names the timeout that expired)."""
    return {
        "type": ACTIVITY_TIMED_OUT,
        "activity_id": activity_id,
        "kind": kind,
        "attempt": attempt,
        "will_retry": will_retry,
    }


def activity_cancel_requested(activity_id: str) -> dict[str, Any]:
    """Return an ``activity_cancel_requested`` event."""
    return {"type": ACTIVITY_CANCEL_REQUESTED, "activity_id": activity_id}


def activity_cancelled(activity_id: str) -> dict[str, Any]:
    """Return an ``activity_cancelled`` event."""
    return {"type": ACTIVITY_CANCELLED, "activity_id": activity_id}


def timer_started(timer_id: str, seconds: float) -> dict[str, Any]:
    """Return a ``timer_started`` event.

    Raises:
        InvalidArgument: ``seconds`` is not a finite number.
    """
    return {"type": TIMER_STARTED, "timer_id": timer_id, "seconds": _seconds(seconds)}


def timer_fired(timer_id: str) -> dict[str, Any]:
    """Return a ``timer_fired`` event."""
    return {"type": TIMER_FIRED, "timer_id": timer_id}


def timer_cancelled(timer_id: str) -> dict[str, Any]:
    """Return a ``timer_cancelled`` event."""
    return {"type": TIMER_CANCELLED, "timer_id": timer_id}


def patch_recorded(patch_id: str) -> dict[str, Any]:
    """Return a ``patch_recorded`` event: the run took the new branch of ``ctx.patched``."""
    return {"type": PATCH_RECORDED, "patch_id": patch_id}


def signal_received(name: str, payload: Any) -> dict[str, Any]:
    """Return a ``signal_received`` event."""
    return {"type": SIGNAL_RECEIVED, "name": name, "payload": payload}


def child_workflow_started(
    child_id: str, workflow_type: str, workflow_id: str | None, input: Any
) -> dict[str, Any]:
    """Return a ``child_workflow_started`` event."""
    return {
        "type": CHILD_WORKFLOW_STARTED,
        "child_id": child_id,
        "workflow_type": workflow_type,
        "workflow_id": workflow_id,
        "input": input,
    }


def child_workflow_completed(child_id: str, result: Any) -> dict[str, Any]:
    """Return a ``child_workflow_completed`` event."""
    return {"type": CHILD_WORKFLOW_COMPLETED, "child_id": child_id, "result": result}


def child_workflow_failed(child_id: str, error: Mapping[str, Any]) -> dict[str, Any]:
    """Return a ``child_workflow_failed`` event (also used when the child was cancelled)."""
    return {"type": CHILD_WORKFLOW_FAILED, "child_id": child_id, "error": dict(error)}


def workflow_cancel_requested(reason: str = "") -> dict[str, Any]:
    """Return a ``workflow_cancel_requested`` event."""
    return {"type": WORKFLOW_CANCEL_REQUESTED, "reason": reason}


def workflow_completed(result: Any) -> dict[str, Any]:
    """Return a ``workflow_completed`` event."""
    return {"type": WORKFLOW_COMPLETED, "result": result}


def workflow_failed(error: Mapping[str, Any]) -> dict[str, Any]:
    """Return a ``workflow_failed`` event."""
    return {"type": WORKFLOW_FAILED, "error": dict(error)}


def workflow_cancelled() -> dict[str, Any]:
    """Return a ``workflow_cancelled`` event."""
    return {"type": WORKFLOW_CANCELLED}


def workflow_continued_as_new(
    input: Any, signals: Sequence[int] = (), new_run_id: str | None = None
) -> dict[str, Any]:
    """Return a ``workflow_continued_as_new`` event: the run ended, and its workflow goes on
    in run ``new_run_id`` with ``input`` and the ``signal_received`` events (by sequence
    number) it had not consumed."""
    event: dict[str, Any] = {
        "type": WORKFLOW_CONTINUED_AS_NEW,
        "input": input,
        "signals": list(signals),
    }
    if new_run_id is not None:
        event["new_run_id"] = new_run_id
    return event
