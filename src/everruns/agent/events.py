"""Turn events: what a client following a turn sees, derived from the turn's event history.

A turn's progress is already durable in its workflow history (activities scheduled, completed,
failed; the workflow's end), so the live events are a pure mapping of that history — nothing
extra is written and nothing can disagree with what happened. `TurnEventMapper` is fed history
events in sequence order and returns the `TurnEvent`s they mean:

    turn.started      the turn began (its text)
    input.processed   process_input chose provider, model, tools and step limit
    reason.started    LLM call ``step`` began
    reason.completed  LLM call ``step`` answered (its text and the tools it asked for)
    reason.retrying   an LLM call attempt failed and will be retried
    tool.called       a tool call began (tool name and arguments)
    tool.retrying     a tool attempt failed and will be retried
    tool.result       a tool call ended (``result`` or ``error``)
    turn.completed    the turn ended with an outcome (``answered`` / ``turn_limit_reached``)
    turn.failed       the turn failed (its error)
    turn.cancelled    the turn was cancelled

Pure: no I/O, no clock; the fetching lives in `everruns.agent.session`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from everruns.agent.tools import TOOL_ACTIVITY_PREFIX

__all__ = ["TERMINAL_KINDS", "TurnEvent", "TurnEventMapper"]

TERMINAL_KINDS = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})


@attrs.frozen
class TurnEvent:
    """One step of a turn, as a client follows it.

    Attributes:
        kind: e.g. ``tool.called`` (see the module docstring for the list).
        workflow_id: the turn's workflow id.
        sequence_num: the history event it comes from.
        time: when that event was recorded (None when unknown).
        step: the LLM step it belongs to (1-based), or None before the first.
        data: what happened: text, tool name and arguments, result, error, outcome…
    """

    kind: str
    workflow_id: str
    sequence_num: int
    time: datetime | None
    step: int | None
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        """Whether this event ends the turn."""
        return self.kind in TERMINAL_KINDS

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (``time`` as ISO 8601)."""
        return {
            "kind": self.kind,
            "workflow_id": self.workflow_id,
            "sequence_num": self.sequence_num,
            "time": self.time.isoformat() if self.time is not None else None,
            "step": self.step,
            "data": self.data,
        }


def _error_text(error: Any) -> str:
    if isinstance(error, Mapping):
        kind = str(error.get("type") or "Error").rsplit(".", 1)[-1]
        return f"{kind}: {error.get('message') or ''}".strip()
    return str(error)


class TurnEventMapper:
    """Turns one turn's history events, fed in order, into `TurnEvent`s.

    Args:
        workflow_id: the turn's workflow id (copied into every event).
    """

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.finished = False
        self._step: int | None = None
        # activity_id -> (activity_type, the step it belongs to)
        self._activities: dict[str, tuple[str, int | None]] = {}
        self._sequence_num = 0
        self._time: datetime | None = None

    def feed(
        self,
        event_type: str,
        data: Mapping[str, Any],
        sequence_num: int,
        time: datetime | None = None,
    ) -> list[TurnEvent]:
        """Map one history event.

        Returns:
            The turn events it means (often none: markers and bookkeeping map to nothing).
        """
        self._sequence_num, self._time = sequence_num, time
        if event_type == "workflow_started":
            return self._started(data)
        if event_type == "activity_scheduled":
            return self._scheduled(data)
        if event_type in _ACTIVITY_ENDINGS:
            return self._ended(event_type, data)
        if event_type == "workflow_completed":
            result = data.get("result")
            summary = dict(result) if isinstance(result, Mapping) else {"result": result}
            summary.pop("messages", None)  # the whole conversation is not an event
            return self._emit("turn.completed", self._step, summary)
        if event_type == "workflow_failed":
            error = data.get("error")
            return self._emit(
                "turn.failed",
                self._step,
                {
                    "error": dict(error) if isinstance(error, Mapping) else {"message": str(error)},
                    "message": _error_text(error),
                },
            )
        if event_type == "workflow_cancelled":
            return self._emit("turn.cancelled", self._step, {})
        return []

    def _emit(self, kind: str, step: int | None, data: dict[str, Any]) -> list[TurnEvent]:
        if kind in TERMINAL_KINDS:
            self.finished = True
        return [TurnEvent(kind, self.workflow_id, self._sequence_num, self._time, step, data)]

    def _started(self, data: Mapping[str, Any]) -> list[TurnEvent]:
        turn = data.get("input")
        turn = turn if isinstance(turn, Mapping) else {}
        message = turn.get("message")
        message = message if isinstance(message, Mapping) else {}
        return self._emit(
            "turn.started",
            None,
            {
                "session_id": turn.get("session_id"),
                "turn": turn.get("turn"),
                "message_id": message.get("message_id"),
                "text": message.get("text"),
            },
        )

    def _scheduled(self, data: Mapping[str, Any]) -> list[TurnEvent]:
        activity_id = str(data.get("activity_id"))
        activity_type = str(data.get("activity_type"))
        value = data.get("input")
        if activity_type == "reason":
            step = value.get("step") if isinstance(value, Mapping) else None
            self._step = step if isinstance(step, int) else (self._step or 0) + 1
            self._activities[activity_id] = (activity_type, self._step)
            return self._emit("reason.started", self._step, {})
        self._activities[activity_id] = (activity_type, self._step)
        tool = _tool_of(activity_type)
        if tool is None:
            return []
        return self._emit(
            "tool.called",
            self._step,
            {"activity_id": activity_id, "tool": tool, "arguments": value},
        )

    def _ended(self, event_type: str, data: Mapping[str, Any]) -> list[TurnEvent]:
        activity_id = str(data.get("activity_id"))
        known = self._activities.get(activity_id)
        if known is None:
            return []
        activity_type, step = known
        tool = _tool_of(activity_type)
        about: dict[str, Any] = {} if tool is None else {"activity_id": activity_id, "tool": tool}
        if event_type in ("activity_failed", "activity_timed_out"):
            if event_type == "activity_failed":
                error = _error_text(data.get("error"))
            else:
                error = f"timed out ({data.get('kind', 'unknown')})"
            if data.get("will_retry"):
                attempt = data.get("attempt")
                if activity_type == "reason":
                    return self._emit("reason.retrying", step, {"attempt": attempt, "error": error})
                if tool is not None:
                    return self._emit(
                        "tool.retrying", step, {**about, "attempt": attempt, "error": error}
                    )
                return []
            return self._emit("tool.result", step, {**about, "error": error}) if tool else []
        if event_type == "activity_cancelled":
            return self._emit("tool.result", step, {**about, "error": "cancelled"}) if tool else []
        result = data.get("result")
        if tool is not None:
            return self._emit("tool.result", step, {**about, "result": result})
        if activity_type == "process_input" and isinstance(result, Mapping):
            tools = result.get("tools") or []
            return self._emit(
                "input.processed",
                None,
                {
                    "provider": result.get("provider"),
                    "model": result.get("model"),
                    "tools": [t.get("name") for t in tools if isinstance(t, Mapping)],
                    "max_steps": result.get("max_steps"),
                },
            )
        if activity_type == "reason" and isinstance(result, Mapping):
            calls = result.get("tool_calls") or []
            return self._emit(
                "reason.completed",
                step,
                {
                    "content": result.get("content") or "",
                    "tool_calls": [
                        {"name": c.get("name"), "arguments": c.get("arguments")}
                        for c in calls
                        if isinstance(c, Mapping)
                    ],
                },
            )
        return []


_ACTIVITY_ENDINGS = frozenset(
    {"activity_completed", "activity_failed", "activity_timed_out", "activity_cancelled"}
)


def _tool_of(activity_type: str) -> str | None:
    if activity_type.startswith(TOOL_ACTIVITY_PREFIX):
        return activity_type[len(TOOL_ACTIVITY_PREFIX) :]
    return None
