"""Workflow commands: what one workflow task asks the control plane to do.

Replaying a workflow yields commands (schedule an activity, start or cancel a timer, start a
child workflow, end the workflow). Each is an attrs value that validates itself, turns into the
history event it becomes when applied (``to_event``), and travels between worker and control
plane as a plain JSON object (``to_dict`` / ``command_from_dict``). This module only describes
commands; it neither applies them nor performs I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import attrs

from everruns.domain import history
from everruns.domain.limits import (
    MAX_INT4,
    MAX_SECONDS,
    MAX_SECONDS_TEXT,
    check_name,
    check_type_name,
    check_utf8,
)
from everruns.domain.retry import RetryPolicy
from everruns.errors import InvalidArgument

__all__ = [
    "ActivityOptions",
    "CancelTimer",
    "CancelWorkflow",
    "Command",
    "CompleteWorkflow",
    "ContinueAsNewWorkflow",
    "FailWorkflow",
    "RecordPatch",
    "ScheduleActivity",
    "StartChildWorkflow",
    "StartTimer",
    "command_from_dict",
    "is_terminal",
]


def _is_seconds(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # NaN compares false and infinity exceeds the bound, which keeps `now() + seconds` inside
    # PostgreSQL's timestamps.
    return 0 < value <= MAX_SECONDS


def _check_timeout(_inst: object, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not _is_seconds(value):
        raise InvalidArgument(
            f"{attr.name} must be a number of seconds > 0 and at most {MAX_SECONDS_TEXT}, "
            f"or None, got {value!r}"
        )


def _check_positive_seconds(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not _is_seconds(value):
        raise InvalidArgument(
            f"{attr.name} must be a number of seconds > 0 and at most {MAX_SECONDS_TEXT}, "
            f"got {value!r}"
        )


def _check_priority(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"priority must be an integer, got {value!r}")
    # The column is a PostgreSQL integer; refusing here beats an overflow in the apply transaction.
    if not -MAX_INT4 - 1 <= value <= MAX_INT4:
        raise InvalidArgument(f"priority must fit in 32 bits, got {value!r}")


# A command's names are sent to the control plane: one UTF-8 cannot carry (a lone surrogate)
# is refused here, in workflow code, where it fails the run with InvalidArgument; found only
# when the decision is encoded, it failed every workflow task and left the run stuck.


def _check_optional_name(_inst: object, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        check_utf8(check_name(value, attr.name), attr.name)


def _check_name(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    # The rule of every other name the control plane stores (workflow types, signal names).
    check_utf8(check_name(value, attr.name), attr.name)


def _check_type_name(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    check_utf8(check_type_name(value, attr.name), attr.name)


def _check_retry(_inst: object, _attr: attrs.Attribute[Any], value: RetryPolicy | None) -> None:
    if value is not None and not isinstance(value, RetryPolicy):
        raise InvalidArgument(f"retry must be a RetryPolicy or None, got {type(value).__name__}")


def _check_error(_inst: object, _attr: attrs.Attribute[Any], value: Mapping[str, Any]) -> None:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"error must be a JSON object, got {type(value).__name__}")
    for key in ("type", "message"):
        if not isinstance(value.get(key), str):
            raise InvalidArgument(f"error must have a string {key!r}, got {value.get(key)!r}")


@attrs.frozen
class ActivityOptions:
    """How an activity is run. ``None`` means "the control plane's default".

    Attributes:
        retry: the retry policy (default: 5 attempts, 1 s doubling to 60 s, ±10 % jitter).
        schedule_to_start_timeout: seconds the task may wait in the queue (default 60).
        start_to_close_timeout: seconds one attempt may run (default 300).
        heartbeat_timeout: seconds allowed between heartbeats (default: not enforced).
        priority: higher is claimed first.
        breaker_key: the circuit breaker guarding it (default: the activity type).

    Raises:
        InvalidArgument: a timeout is not a number of seconds > 0 and at most `MAX_SECONDS`
            (100 years), or another field is malformed.
    """

    retry: RetryPolicy | None = attrs.field(default=None, validator=_check_retry)
    schedule_to_start_timeout: float | None = attrs.field(default=None, validator=_check_timeout)
    start_to_close_timeout: float | None = attrs.field(default=None, validator=_check_timeout)
    heartbeat_timeout: float | None = attrs.field(default=None, validator=_check_timeout)
    priority: int = attrs.field(default=0, validator=_check_priority)
    breaker_key: str | None = attrs.field(default=None, validator=_check_optional_name)

    def merged_with(
        self,
        *,
        retry: RetryPolicy | None = None,
        schedule_to_start_timeout: float | None = None,
        start_to_close_timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        priority: int | None = None,
        breaker_key: str | None = None,
    ) -> ActivityOptions:
        """Return a copy where every argument that is not None replaces this object's value.

        Raises:
            InvalidArgument: a replacement is malformed.
        """
        changes: dict[str, Any] = {}
        for name, value in (
            ("retry", retry),
            ("schedule_to_start_timeout", schedule_to_start_timeout),
            ("start_to_close_timeout", start_to_close_timeout),
            ("heartbeat_timeout", heartbeat_timeout),
            ("priority", priority),
            ("breaker_key", breaker_key),
        ):
            if value is not None:
                changes[name] = value
        return attrs.evolve(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON object (the ``options`` of ``activity_scheduled``)."""
        return {
            "retry": None if self.retry is None else self.retry.to_dict(),
            "schedule_to_start_timeout": self.schedule_to_start_timeout,
            "start_to_close_timeout": self.start_to_close_timeout,
            "heartbeat_timeout": self.heartbeat_timeout,
            "priority": self.priority,
            "breaker_key": self.breaker_key,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivityOptions:
        """Build options from a JSON object such as `to_dict` returns; missing keys default.

        Returns:
            The options.

        Raises:
            InvalidArgument: ``d`` is not an object, has an unknown key or a malformed value.
        """
        if not isinstance(d, Mapping):
            raise InvalidArgument(f"activity options must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - _OPTION_NAMES)
        if unknown:
            raise InvalidArgument(
                f"activity options have unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(_OPTION_NAMES))}"
            )
        kwargs = {k: v for k, v in d.items() if v is not None}
        if "retry" in kwargs:
            kwargs["retry"] = RetryPolicy.from_dict(kwargs["retry"])
        return cls(**kwargs)


_OPTION_NAMES = frozenset(a.name for a in attrs.fields(ActivityOptions))


@attrs.frozen
class ScheduleActivity:
    """Run activity ``activity_type`` with ``input``; ``activity_id`` is the command id."""

    activity_id: str = attrs.field(validator=_check_name)
    activity_type: str = attrs.field(validator=_check_type_name)
    input: Any
    options: ActivityOptions = attrs.field(
        factory=ActivityOptions, validator=attrs.validators.instance_of(ActivityOptions)
    )

    @property
    def command_id(self) -> str:
        """The command id (here: the activity id)."""
        return self.activity_id

    def describe(self) -> str:
        """Return e.g. ``ScheduleActivity(id=3, type=charge)`` for error messages."""
        return f"ScheduleActivity(id={self.activity_id}, type={self.activity_type})"

    def to_event(self) -> dict[str, Any]:
        """Return the ``activity_scheduled`` event this command becomes."""
        return history.activity_scheduled(
            self.activity_id, self.activity_type, self.input, self.options.to_dict()
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {
            "type": "schedule_activity",
            "activity_id": self.activity_id,
            "activity_type": self.activity_type,
            "input": self.input,
            "options": self.options.to_dict(),
        }


@attrs.frozen
class StartTimer:
    """Fire timer ``timer_id`` after ``seconds``."""

    timer_id: str = attrs.field(validator=_check_name)
    seconds: float = attrs.field(validator=_check_positive_seconds)

    @property
    def command_id(self) -> str:
        """The command id (here: the timer id)."""
        return self.timer_id

    def describe(self) -> str:
        """Return e.g. ``StartTimer(id=3, seconds=5.0)`` for error messages."""
        return f"StartTimer(id={self.timer_id}, seconds={self.seconds})"

    def to_event(self) -> dict[str, Any]:
        """Return the ``timer_started`` event this command becomes."""
        return history.timer_started(self.timer_id, self.seconds)

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {"type": "start_timer", "timer_id": self.timer_id, "seconds": float(self.seconds)}


@attrs.frozen
class CancelTimer:
    """Cancel timer ``timer_id``; a no-op for the control plane if it has already fired."""

    timer_id: str = attrs.field(validator=_check_name)

    @property
    def command_id(self) -> str:
        """The id of the timer it cancels (it has no id of its own)."""
        return self.timer_id

    def describe(self) -> str:
        """Return e.g. ``CancelTimer(id=3)`` for error messages."""
        return f"CancelTimer(id={self.timer_id})"

    def to_event(self) -> dict[str, Any]:
        """Return the ``timer_cancelled`` event this command becomes."""
        return history.timer_cancelled(self.timer_id)

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {"type": "cancel_timer", "timer_id": self.timer_id}


@attrs.frozen
class RecordPatch:
    """Record that the run takes the new branch of ``ctx.patched(patch_id)``."""

    patch_id: str = attrs.field(validator=_check_name)

    @property
    def command_id(self) -> str:
        """The command id (here: the patch id)."""
        return self.patch_id

    def describe(self) -> str:
        """Return e.g. ``RecordPatch(id=new-tax-rule)`` for error messages."""
        return f"RecordPatch(id={self.patch_id})"

    def to_event(self) -> dict[str, Any]:
        """Return the ``patch_recorded`` event this command becomes."""
        return history.patch_recorded(self.patch_id)

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {"type": "record_patch", "patch_id": self.patch_id}


@attrs.frozen
class StartChildWorkflow:
    """Start a child run of ``workflow_type``; ``child_id`` is the command id."""

    child_id: str = attrs.field(validator=_check_name)
    workflow_type: str = attrs.field(validator=_check_type_name)
    workflow_id: str | None = attrs.field(validator=_check_optional_name)
    input: Any

    @property
    def command_id(self) -> str:
        """The command id (here: the child id)."""
        return self.child_id

    def describe(self) -> str:
        """Return e.g. ``StartChildWorkflow(id=3, type=ship, workflow_id=order-7:ship)`` for
        error messages."""
        return (
            f"StartChildWorkflow(id={self.child_id}, type={self.workflow_type}, "
            f"workflow_id={self.workflow_id})"
        )

    def to_event(self) -> dict[str, Any]:
        """Return the ``child_workflow_started`` event this command becomes."""
        return history.child_workflow_started(
            self.child_id, self.workflow_type, self.workflow_id, self.input
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {
            "type": "start_child_workflow",
            "child_id": self.child_id,
            "workflow_type": self.workflow_type,
            "workflow_id": self.workflow_id,
            "input": self.input,
        }


@attrs.frozen
class CompleteWorkflow:
    """End the workflow ``completed`` with ``result``."""

    result: Any

    @property
    def command_id(self) -> None:
        """Terminal commands have no id."""
        return None

    def describe(self) -> str:
        """Return ``CompleteWorkflow()`` for error messages."""
        return "CompleteWorkflow()"

    def to_event(self) -> dict[str, Any]:
        """Return the ``workflow_completed`` event this command becomes."""
        return history.workflow_completed(self.result)

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {"type": "complete_workflow", "result": self.result}


@attrs.frozen
class FailWorkflow:
    """End the workflow ``failed`` with ``error``: ``{type, message, traceback, non_retryable}``."""

    error: Mapping[str, Any] = attrs.field(validator=_check_error)

    @property
    def command_id(self) -> None:
        """Terminal commands have no id."""
        return None

    def describe(self) -> str:
        """Return e.g. ``FailWorkflow(type=ValueError)`` for error messages."""
        return f"FailWorkflow(type={self.error['type']})"

    def to_event(self) -> dict[str, Any]:
        """Return the ``workflow_failed`` event this command becomes."""
        return history.workflow_failed(self.error)

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {"type": "fail_workflow", "error": dict(self.error)}


@attrs.frozen
class CancelWorkflow:
    """End the workflow ``cancelled``."""

    @property
    def command_id(self) -> None:
        """Terminal commands have no id."""
        return None

    def describe(self) -> str:
        """Return ``CancelWorkflow()`` for error messages."""
        return "CancelWorkflow()"

    def to_event(self) -> dict[str, Any]:
        """Return the ``workflow_cancelled`` event this command becomes."""
        return history.workflow_cancelled()

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        return {"type": "cancel_workflow"}


def _check_signals(_inst: object, _attr: attrs.Attribute[Any], value: tuple[int, ...]) -> None:
    for seq in value:
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_INT4:
            raise InvalidArgument(
                f"a carried signal is named by its sequence number (1 to {MAX_INT4}), not {seq!r}"
            )
    if list(value) != sorted(set(value)):
        raise InvalidArgument(
            "carried signals are named once each, in arrival order (increasing sequence numbers)"
        )


def _check_flag(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{attr.name} must be true or false, not {value!r}")


def _signal_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


@attrs.frozen
class ContinueAsNewWorkflow:
    """End the workflow ``continued_as_new``: its workflow id goes on in a new run started
    with ``input``. ``signals`` names by sequence number the ``signal_received`` events this
    run had not consumed, which the new run gets first, in order (the control plane copies
    them from the history: they do not travel back); ``cancel``: a cancel request arrived
    after the code ended, which the new run gets."""

    input: Any = None
    signals: tuple[int, ...] = attrs.field(
        default=(), converter=_signal_tuple, validator=_check_signals
    )
    cancel: bool = attrs.field(default=False, validator=_check_flag)

    @property
    def command_id(self) -> None:
        """Terminal commands have no id."""
        return None

    def describe(self) -> str:
        """Return ``ContinueAsNewWorkflow()`` for error messages."""
        return "ContinueAsNewWorkflow()"

    def to_event(self) -> dict[str, Any]:
        """Return the ``workflow_continued_as_new`` event this command becomes (the control
        plane adds the new run's id)."""
        return history.workflow_continued_as_new(self.input, self.signals)

    def to_dict(self) -> dict[str, Any]:
        """Return the command as a JSON object for the wire."""
        wire: dict[str, Any] = {"type": "continue_as_new", "input": self.input}
        if self.signals:
            wire["signals"] = list(self.signals)
        if self.cancel:
            wire["cancel"] = True
        return wire


Command: TypeAlias = (
    ScheduleActivity
    | StartTimer
    | CancelTimer
    | StartChildWorkflow
    | CompleteWorkflow
    | FailWorkflow
    | CancelWorkflow
    | ContinueAsNewWorkflow
    | RecordPatch
)


def is_terminal(command: Command) -> bool:
    """Return whether ``command`` ends the workflow (complete, fail, cancel or continue as
    new)."""
    return isinstance(
        command, (CompleteWorkflow, FailWorkflow, CancelWorkflow, ContinueAsNewWorkflow)
    )


_WIRE_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # type: (required keys, optional keys), "type" excluded
    "schedule_activity": (
        frozenset({"activity_id", "activity_type"}),
        frozenset({"input", "options"}),
    ),
    "start_timer": (frozenset({"timer_id", "seconds"}), frozenset()),
    "cancel_timer": (frozenset({"timer_id"}), frozenset()),
    "start_child_workflow": (
        frozenset({"child_id", "workflow_type"}),
        frozenset({"workflow_id", "input"}),
    ),
    "complete_workflow": (frozenset(), frozenset({"result"})),
    "fail_workflow": (frozenset({"error"}), frozenset()),
    "cancel_workflow": (frozenset(), frozenset()),
    "continue_as_new": (frozenset(), frozenset({"input", "signals", "cancel"})),
    "record_patch": (frozenset({"patch_id"}), frozenset()),
}


def command_from_dict(d: Mapping[str, Any]) -> Command:
    """Build a command from its wire JSON object (the inverse of ``to_dict``).

    Args:
        d: an object with a ``type`` such as ``"schedule_activity"`` and that command's fields.

    Returns:
        The command.

    Raises:
        InvalidArgument: ``d`` is not an object, its type is unknown, a required field is
            missing, an unknown field is present, or a value is malformed.
    """
    if not isinstance(d, Mapping):
        raise InvalidArgument(f"a command must be a JSON object, got {type(d).__name__}")
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in _WIRE_FIELDS:
        raise InvalidArgument(
            f"unknown command type {kind!r}; expected one of {', '.join(sorted(_WIRE_FIELDS))}"
        )
    required, optional = _WIRE_FIELDS[kind]
    keys = set(d) - {"type"}
    missing = sorted(required - keys)
    if missing:
        raise InvalidArgument(f"command {kind!r} lacks field(s) {', '.join(missing)}")
    extra = sorted(keys - required - optional)
    if extra:
        raise InvalidArgument(f"command {kind!r} has unknown field(s) {', '.join(extra)}")
    if kind == "schedule_activity":
        return ScheduleActivity(
            activity_id=d["activity_id"],
            activity_type=d["activity_type"],
            input=d.get("input"),
            options=ActivityOptions.from_dict(d.get("options") or {}),
        )
    if kind == "start_timer":
        return StartTimer(timer_id=d["timer_id"], seconds=d["seconds"])
    if kind == "cancel_timer":
        return CancelTimer(timer_id=d["timer_id"])
    if kind == "start_child_workflow":
        return StartChildWorkflow(
            child_id=d["child_id"],
            workflow_type=d["workflow_type"],
            workflow_id=d.get("workflow_id"),
            input=d.get("input"),
        )
    if kind == "complete_workflow":
        return CompleteWorkflow(result=d.get("result"))
    if kind == "fail_workflow":
        return FailWorkflow(error=d["error"])
    if kind == "record_patch":
        return RecordPatch(patch_id=d["patch_id"])
    if kind == "continue_as_new":
        signals = d.get("signals") or []
        if not isinstance(signals, list):
            raise InvalidArgument(f"continue_as_new signals must be a list, got {signals!r}")
        return ContinueAsNewWorkflow(
            input=d.get("input"), signals=signals, cancel=d.get("cancel", False)
        )
    return CancelWorkflow()
