"""Lease arithmetic: when a claimed task is stale, which timeout a task has hit, and backpressure.

These are the rules the reclaimer, the timeout scanner and the worker's claim loop apply, as
pure functions of the task's timestamps and ``now``. They decide; they do not read the clock,
sleep, query or update anything, and they import no trio, asyncio, SQL or protobuf code. The
store's SQL predicates must say the same thing (``heartbeat_at < now - interval``): a deadline
is *passed* only when ``now`` is strictly later than it, so a task is still healthy at the exact
moment its deadline falls. Deadlines are computed as ``start + timedelta(seconds=limit)``
(microsecond resolution) by every function here, so they never disagree about a boundary.

Durations are in seconds. All datetimes handed to one call must be timezone-aware (the store's
``timestamptz``); mixing naive and aware ones is a caller bug and raises ``TypeError``.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from everruns.errors import InvalidArgument

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_SCHEDULE_TO_START",
    "DEFAULT_STALE_AFTER",
    "DEFAULT_START_TO_CLOSE",
    "RECLAIM_INTERVAL",
    "TimeoutKind",
    "free_slots",
    "is_stale",
    "next_deadline",
    "should_claim",
    "timeout_kind",
]

DEFAULT_STALE_AFTER = 30.0
"""A claimed task whose last heartbeat is older than this is reclaimed (unless it has its own)."""
RECLAIM_INTERVAL = 10.0
"""How often the reclaimer looks for stale tasks."""
DEFAULT_SCHEDULE_TO_START = 60.0
"""Longest a task may wait in the queue before it is claimed."""
DEFAULT_START_TO_CLOSE = 300.0
"""Longest one attempt may run, from claim to result."""
DEFAULT_HEARTBEAT_TIMEOUT: float | None = None
"""Activities have no heartbeat timeout unless they set one."""

TimeoutKind = Literal["schedule_to_start", "start_to_close", "heartbeat"]


def _check_seconds(name: str, value: float | None) -> None:
    if value is None:
        return
    # `not value > 0` also refuses NaN; infinity is allowed and means "never".
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgument(f"{name} must be a number of seconds > 0 or None, got {value!r}")


def is_stale(
    heartbeat_at: dt.datetime,
    now: dt.datetime,
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
    heartbeat_timeout: float | None = None,
) -> bool:
    """Return whether a claimed task's holder should be presumed gone.

    Args:
        heartbeat_at: the task's last heartbeat (its claim time if it never beat).
        now: the current time.
        stale_after: the global staleness limit in seconds (30 by default).
        heartbeat_timeout: the task's own heartbeat timeout; when set it replaces
            ``stale_after``, whether longer or shorter.

    Returns:
        True when more than the limit has elapsed since ``heartbeat_at`` (exactly the limit is
        not stale yet). A heartbeat in the future (clock skew) is never stale.

    Raises:
        InvalidArgument: a limit is not a positive number.
    """
    _check_seconds("stale_after", stale_after)
    _check_seconds("heartbeat_timeout", heartbeat_timeout)
    limit = heartbeat_timeout if heartbeat_timeout is not None else stale_after
    try:
        return now > heartbeat_at + dt.timedelta(seconds=limit)
    except OverflowError:
        return False  # the limit reaches past the end of the calendar: never stale


def _deadlines(
    visible_at: dt.datetime,
    claimed_at: dt.datetime | None,
    heartbeat_at: dt.datetime | None,
    schedule_to_start: float | None,
    start_to_close: float | None,
    heartbeat_timeout: float | None,
) -> list[tuple[TimeoutKind, dt.datetime]]:
    # The deadline of every timeout that applies to the task in its current phase, in tie-break
    # order. Both public functions compare these same datetimes, so they can never disagree
    # about a boundary (float seconds and microsecond datetimes round differently).
    _check_seconds("schedule_to_start", schedule_to_start)
    _check_seconds("start_to_close", start_to_close)
    _check_seconds("heartbeat_timeout", heartbeat_timeout)
    spans: list[tuple[TimeoutKind, dt.datetime, float | None]]
    if claimed_at is None:
        spans = [("schedule_to_start", visible_at, schedule_to_start)]
    else:
        beat = heartbeat_at if heartbeat_at is not None else claimed_at
        spans = [
            ("start_to_close", claimed_at, start_to_close),
            ("heartbeat", beat, heartbeat_timeout),
        ]
    out: list[tuple[TimeoutKind, dt.datetime]] = []
    for kind, start, limit in spans:
        if limit is None:
            continue
        try:
            out.append((kind, start + dt.timedelta(seconds=limit)))
        except OverflowError:
            continue  # past the end of the calendar: never
    return out


def timeout_kind(
    visible_at: dt.datetime,
    claimed_at: dt.datetime | None,
    heartbeat_at: dt.datetime | None,
    now: dt.datetime,
    *,
    schedule_to_start: float | None,
    start_to_close: float | None,
    heartbeat_timeout: float | None,
) -> TimeoutKind | None:
    """Return which server-enforced timeout a task has passed, if any.

    A task that is not claimed (``claimed_at is None``) can only pass ``schedule_to_start``,
    counted from ``visible_at`` (when the attempt became claimable, so a retry's back-off delay
    does not count against it). A claimed task can pass ``start_to_close``, counted from
    ``claimed_at``, or ``heartbeat``, counted from ``heartbeat_at`` (``claimed_at`` if it never
    beat). When several have passed, the one whose deadline fell first is reported, as a scanner
    running at that instant would have seen; on a tie ``start_to_close`` wins over
    ``heartbeat``.

    Args:
        visible_at: when the task (this attempt) became claimable.
        claimed_at: when the current attempt was claimed, or None if the task is pending.
        heartbeat_at: the last heartbeat of the current attempt, if any.
        now: the current time.
        schedule_to_start: the task's limit in seconds, or None if not enforced.
        start_to_close: likewise.
        heartbeat_timeout: likewise.

    Returns:
        ``"schedule_to_start"``, ``"start_to_close"``, ``"heartbeat"``, or None if no deadline
        has passed (a deadline exactly equal to ``now`` has not).

    Raises:
        InvalidArgument: a limit is neither None nor a positive number.
    """
    best: tuple[TimeoutKind, dt.datetime] | None = None
    for kind, deadline in _deadlines(
        visible_at, claimed_at, heartbeat_at, schedule_to_start, start_to_close, heartbeat_timeout
    ):
        # Strict < keeps the earlier-listed kind on a tie.
        if now > deadline and (best is None or deadline < best[1]):
            best = (kind, deadline)
    return None if best is None else best[0]


def next_deadline(
    visible_at: dt.datetime,
    claimed_at: dt.datetime | None,
    heartbeat_at: dt.datetime | None,
    *,
    schedule_to_start: float | None,
    start_to_close: float | None,
    heartbeat_timeout: float | None,
) -> dt.datetime | None:
    """Return the earliest deadline among the timeouts that apply to the task now.

    The scanner can sleep until this moment (the timeout is passed just after it). A deadline
    may already be in the past; that means "scan now". Deadlines beyond ``datetime.max`` are
    treated as never.

    Args:
        visible_at: when the task (this attempt) became claimable.
        claimed_at: when the current attempt was claimed, or None if the task is pending.
        heartbeat_at: the last heartbeat of the current attempt, if any.
        schedule_to_start: the task's limit in seconds, or None if not enforced.
        start_to_close: likewise.
        heartbeat_timeout: likewise.

    Returns:
        The earliest deadline, or None when no timeout applies.

    Raises:
        InvalidArgument: a limit is neither None nor a positive number.
    """
    deadlines = _deadlines(
        visible_at, claimed_at, heartbeat_at, schedule_to_start, start_to_close, heartbeat_timeout
    )
    return min((d for _kind, d in deadlines), default=None)


def _check_load(load: int, capacity: int) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise InvalidArgument(f"capacity must be an integer >= 1, got {capacity!r}")
    if isinstance(load, bool) or not isinstance(load, int) or load < 0:
        raise InvalidArgument(f"load must be an integer >= 0, got {load!r}")


def free_slots(load: int, capacity: int) -> int:
    """Return how many more tasks a worker may run now.

    Args:
        load: tasks running.
        capacity: the worker's maximum concurrent tasks.

    Returns:
        ``capacity - load``, or 0 when the load already exceeds the capacity (e.g. lowered).

    Raises:
        InvalidArgument: ``capacity`` < 1 or ``load`` < 0.
    """
    _check_load(load, capacity)
    return max(0, capacity - load)


def should_claim(
    load: int,
    capacity: int,
    currently_paused: bool,
    high: float = 0.9,
    low: float = 0.7,
) -> bool:
    """Decide whether a worker should claim work, with hysteresis.

    A worker that is claiming stops once its load is above ``high`` of its capacity; a paused
    worker resumes only once its load is below ``low``. Between the two it keeps doing what it
    was doing, so it does not flap at one threshold. It never claims without a free slot.

    Args:
        load: tasks running.
        capacity: the worker's maximum concurrent tasks.
        currently_paused: whether the worker stopped claiming at its last decision.
        high: the utilisation above which claiming stops (0 < low <= high <= 1).
        low: the utilisation below which claiming resumes.

    Returns:
        True to claim (up to :func:`free_slots` tasks); the caller's new paused flag is the
        negation.

    Raises:
        InvalidArgument: a bad load, capacity or threshold.
    """
    _check_load(load, capacity)
    if not (0 < low <= high <= 1):
        raise InvalidArgument(
            f"backpressure thresholds need 0 < low <= high <= 1, got {low}, {high}"
        )
    if load >= capacity:
        return False
    utilisation = load / capacity
    if currently_paused:
        return utilisation < low
    return utilisation <= high
