"""`ActivityContext`: what an activity function receives as ``ctx``.

It tells the activity who it is (`ActivityInfo`), which attempt this is, what the previous
attempt recorded with its last heartbeat, and lets it heartbeat (``ctx.heartbeat(details)``),
which keeps its lease alive and records progress for a later attempt. Heartbeating only records
the details and wakes the worker's heartbeat scheduler; the network call happens there, so
``heartbeat`` is a plain sync method, callable from async activities and from the threads that
run sync ones. This module does no I/O itself.

Cancellation: an async activity is cancelled as Trio cancels anything (``trio.Cancelled`` at
its current ``await``; ``finally`` blocks run). A sync activity runs in a thread that Trio
cannot interrupt: when its attempt is cancelled (a cancel request, a lost lease, the end of a
shutdown's grace period, an immediate stop), the worker abandons the thread, sets
``ctx.cancel_requested`` and reports the attempt at once. The thread runs on until the function
returns (sooner if it looks at ``ctx.cancel_requested``): its result is dropped, its heartbeats
are ignored, and it keeps one of the worker's ``max_sync_threads`` until it ends. Two things
follow. The task goes back to the queue at once, so another worker's attempt may run while the
abandoned thread still does: a sync activity's side effects must tolerate an overlapping
attempt (they must be idempotent anyway). And the thread belongs to no one: when the process
exits (``python -m everruns.worker`` after its stop), it ends mid-call, with no ``finally``
run; an embedded ``Worker.run`` returns while it still runs.

Errors: anything an activity raises fails its attempt (retried as its policy says), even a
``BaseException``; only Trio's ``Cancelled`` and a ``KeyboardInterrupt`` out of an *async*
activity are the worker's (the operator's Ctrl-C arrives on the Trio thread). A sync activity's
``KeyboardInterrupt`` is its own (Python delivers Ctrl-C to the main thread only) and fails its
attempt like any other exception.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import attrs

from everruns.domain import payload

__all__ = ["ActivityContext", "ActivityInfo"]


@attrs.frozen
class ActivityInfo:
    """Who a running activity attempt is.

    Attributes:
        workflow_id: the business key of the workflow that scheduled it.
        run_id: that workflow's run.
        workflow_type: that workflow's registered name when this worker knows it (an
            activity it started ahead of its workflow's decision); empty for a task the
            control plane handed out, which does not carry it.
        activity_id: the command id within the run; stable across attempts, so usable as an
            idempotency key.
        activity_type: the activity's registered name.
        attempt: this attempt's number, from 1.
        max_attempts: attempts allowed in total.
        task_id: the task queue row (for logs).
        heartbeat_timeout: seconds allowed between heartbeats, or None if not enforced.
        start_to_close_timeout: seconds this attempt may run, or None for the server default.
        scheduled_at: when the task became due.
        started_at: when this attempt was claimed.

    An activity started ahead of its workflow's decision sees the worker's own view until the
    control plane's reply binds its task (then ``ctx.info`` is the task's): until then its
    timeouts are what the workflow code asked for (None where it relied on the control
    plane's defaults) and its times are the worker's clock.
    """

    workflow_id: str
    run_id: str
    workflow_type: str
    activity_id: str
    activity_type: str
    attempt: int
    max_attempts: int
    task_id: str = ""
    heartbeat_timeout: float | None = None
    start_to_close_timeout: float | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None


class ActivityContext:
    """The ``ctx`` argument of an activity: ``fn(ctx, input)``.

    Only the worker creates it (tests may too, to call an activity directly).

    Args:
        info: who the activity is.
        heartbeat_details: the details the previous attempt recorded last, decoded.
        on_heartbeat: called (from any thread) after each ``heartbeat``; the worker uses it to
            send the heartbeat at once.
    """

    def __init__(
        self,
        info: ActivityInfo,
        *,
        heartbeat_details: Any = None,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self._info = info
        self._previous_details = heartbeat_details
        self._on_heartbeat = on_heartbeat
        self._lock = threading.Lock()
        self._pending: bytes | None = None
        self._in_flight: bytes | None = None  # taken by a heartbeat not answered yet
        self._cancel_requested = False

    @property
    def info(self) -> ActivityInfo:
        """Who this activity attempt is."""
        return self._info

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self._info.attempt

    @property
    def heartbeat_details(self) -> Any:
        """The details the previous attempt passed to its last ``heartbeat``, or None."""
        return self._previous_details

    @property
    def cancel_requested(self) -> bool:
        """True once the worker decided to stop this attempt (cancel request, lost lease or
        shutdown). Sync activities, which cannot be interrupted, can poll it and return early:
        their attempt is reported without them, and their result dropped."""
        return self._cancel_requested

    def heartbeat(self, details: Any = None) -> None:
        """Report progress: keep the lease alive and record ``details`` for a later attempt.

        Cheap and non-blocking: the worker sends it in the background, at once. ``None``
        keeps the details recorded last.

        Args:
            details: JSON progress details, or None.

        Raises:
            PayloadError: ``details`` is not exact JSON (names the offending type).
        """
        encoded = None if details is None else payload.encode(details, what="heartbeat details")
        with self._lock:
            if encoded is not None:
                self._pending = encoded
        if self._on_heartbeat is not None:
            self._on_heartbeat()

    def _take_details(self) -> bytes | None:
        """Return the details not yet sent, or None, for a heartbeat to send: they count as in
        flight until `_sent` (or `_requeue_details`)."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._in_flight = pending
            return pending

    def _sent(self, details: bytes) -> None:
        """The heartbeat carrying ``details`` was answered (or refused them for good)."""
        with self._lock:
            if self._in_flight is details:
                self._in_flight = None

    def _requeue_details(self, details: bytes) -> None:
        """Put back details whose sending failed, unless newer ones arrived meanwhile."""
        with self._lock:
            if self._in_flight is details:
                self._in_flight = None
            if self._pending is None:
                self._pending = details

    def _take_unsent(self) -> bytes | None:
        """For the attempt's last report: the details recorded last that the control plane
        may not have, those of a heartbeat still in flight included (its call is cancelled as
        the attempt ends, and it puts them back only after the report has looked)."""
        with self._lock:
            details = self._pending if self._pending is not None else self._in_flight
            self._pending = self._in_flight = None
            return details

    def _mark_cancel_requested(self) -> None:
        self._cancel_requested = True

    def __repr__(self) -> str:
        i = self._info
        return (
            f"<ActivityContext {i.activity_type} id={i.activity_id} attempt={i.attempt}/"
            f"{i.max_attempts} workflow_id={i.workflow_id!r}>"
        )
