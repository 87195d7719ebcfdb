"""The store: every durable operation of the engine, each one transaction over PostgreSQL.

Methods take and return attrs values; the SQL they run lives in ``queries.sql``. Every task
operation after a claim is fenced by the lease token, and each compound change (kill a task and
write its dead letter; append an event and schedule its workflow task) happens in one
transaction. Time comes from the database clock. What this module must not do: decide policy
that belongs to the pure core (retry delays, breaker transitions) — it calls the core for that.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import attrs

from everruns._aio.pg import Connection, Pool, Row
from everruns.domain import breaker as breaker_math
from everruns.domain.limits import MAX_SECONDS
from everruns.domain.payload import encode_text
from everruns.domain.retry import RetryPolicy, decide_retry, retry_after_of
from everruns.errors import (
    AlreadyExists,
    ConcurrencyConflict,
    FailedPrecondition,
    NotFound,
    StaleLease,
)
from everruns.store.models import (
    BreakerRecord,
    DeadLetter,
    DueTimer,
    ScheduleDefinition,
    ScheduleRecord,
    Signal,
    StoredEvent,
    Task,
    TaskRef,
    WorkerRecord,
    WorkerRegistration,
    WorkflowRun,
)
from everruns.store.queries import QUERIES as Q

__all__ = ["Decision", "DecisionAhead", "FailOutcome", "NewEvent", "NewTask", "Store"]

T = TypeVar("T")

CHANNEL_TASKS = "everruns_tasks"
CHANNEL_CANCEL = "everruns_cancel"
CHANNEL_RUNS = "everruns_runs"
STRAGGLING_AFTER_S = 1.0
"""A task waiting visible longer than this is re-announced by the due-scanner (a safety net for
a wake-up lost anywhere)."""
CHANNEL_TIMERS = "everruns_timers"
CHANNEL_WORKERS = "everruns_workers"
"""A worker (re-)registered, maybe serving other types: its id (see `upsert_worker`)."""

STUCK_RETRIES_AT_ONCE = 1000
"""Stuck runs one worker's registration gives another try at most (the rest at the next)."""


@attrs.frozen
class NewEvent:
    """An event to append: its type, its JSON fields, and fields given as exact JSON text.

    ``raw`` fields (payloads: input, result) are spliced into the event's JSON text as they
    are, so a payload is stored byte for byte as it arrived, without a decode/encode trip.
    """

    type: str
    data: dict[str, Any]
    raw: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def of(cls, event: dict[str, Any], **raw: str) -> NewEvent:
        """From a domain event dict (which carries its ``type``)."""
        data = dict(event)
        kind = str(data.pop("type"))
        for key in raw:
            data.pop(key, None)
        return cls(kind, data, raw)

    def text(self) -> str:
        text = encode_text({"type": self.type, **self.data}, what="event")
        if not self.raw:
            return text
        extra = ",".join(f"{encode_text(k)}:{v}" for k, v in self.raw.items())
        return f"{text[:-1]},{extra}}}"


@attrs.frozen
class NewTask:
    """An activity task to enqueue (for a run given beside it)."""

    activity_type: str
    activity_id: str
    input: str = "null"
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    priority: int = 0
    visible_at: datetime | None = None
    schedule_to_start_s: float | None = None
    start_to_close_s: float | None = None
    heartbeat_timeout_s: float | None = None
    breaker_key: str | None = None
    task_id: uuid.UUID = attrs.field(factory=uuid.uuid4)


@attrs.frozen
class Continuation:
    """The run a run that continues as new goes on in: its id (chosen ahead, so that the
    ending run's event names it), its input (JSON text), the ``signal_received`` events it
    gets first (copied from the ending run's history), and whether a cancel request the code
    did not see goes on with it."""

    run_id: uuid.UUID
    input: str
    signals: tuple[NewEvent, ...] = ()
    cancel: bool = False


@attrs.frozen
class RunEnd:
    """How a workflow task ends its run: completed with ``result`` (JSON text), failed with
    ``error``, cancelled, or continued as new in the run ``continued`` names."""

    status: str
    result: str | None = None
    error: dict[str, Any] | None = None
    continued: Continuation | None = None


@attrs.frozen
class Decision:
    """A workflow task's outcome, to apply with `Store.apply_workflow_tasks`: its events, the
    activities it schedules (``eager`` flags which go straight to the completing worker) and
    how it ends its run, if it does."""

    task_id: uuid.UUID
    lease_token: int
    expected_sequence: int
    events: Sequence[NewEvent]
    activities: Sequence[NewTask] = ()
    eager: Sequence[bool] = ()
    end: RunEnd | None = None


@attrs.frozen
class DecisionAhead:
    """A worker's decision, made ahead, of the workflow task an activity's result wakes, to
    apply with that result in `Store.complete_activities` (see queries.sql for when it does).

    ``result`` is the position of that result among the completions; ``after_sequence`` and
    ``after_time`` (as its marker records it) name the decision it continues; the history it
    saw ends at ``seen_sequence``; the rest is what it writes, as in `Decision`."""

    result: int
    run_id: uuid.UUID
    activity_id: str
    after_sequence: int
    after_time: str
    seen_sequence: int
    events: Sequence[NewEvent]
    activities: Sequence[NewTask] = ()
    eager: Sequence[bool] = ()
    end: RunEnd | None = None


def _decision_columns(
    decisions: Sequence[Decision | DecisionAhead], eager_for: str | None
) -> tuple[list[list[Any]], list[Any]]:
    """What decisions write, as a statement's parallel arrays: their run ends (status, result,
    error) and event counts, then their events (decision number from 1, position, type, JSON
    text), then their activities (decision number, the `_activity_columns`, eager flags)."""
    ends = [_end_columns(d.end) for d in decisions]
    events: list[list[Any]] = [[], [], [], []]
    activities: list[NewTask] = []
    activity_nos: list[int] = []
    flags: list[bool] = []
    for no, d in enumerate(decisions, 1):
        for n, event in enumerate(d.events, 1):
            for column, value in zip(events, (no, n, event.type, event.text()), strict=True):
                column.append(value)
        activities.extend(d.activities)
        activity_nos.extend([no] * len(d.activities))
        flags.extend(_eager_flags(d.eager, len(d.activities), eager_for))
    per_decision: list[list[Any]] = [[len(d.events) for d in decisions]]
    per_decision += ([e[i] for e in ends] for i in range(3))
    return per_decision, [*events, activity_nos, *_activity_columns(activities), flags]


def _activity_columns(activities: Sequence[NewTask]) -> list[list[Any]]:
    """The parallel arrays an enqueueing statement takes, one per column (ids to breaker keys)."""
    return [
        [t.task_id for t in activities],
        [t.activity_type for t in activities],
        [t.activity_id for t in activities],
        [t.input for t in activities],
        [t.retry.max_attempts for t in activities],
        [t.priority for t in activities],
        [encode_text(t.retry.to_dict(), what="retry policy") for t in activities],
        [t.schedule_to_start_s for t in activities],
        [t.start_to_close_s for t in activities],
        [t.heartbeat_timeout_s for t in activities],
        [t.breaker_key for t in activities],
    ]


def _end_columns(end: RunEnd | None) -> tuple[str | None, str | None, str | None]:
    """A run end as the statement's (status, result, error) parameters."""
    if end is None:
        return None, None, None
    error = (
        encode_text(end.error, what="error")
        if end.status == "failed" and end.error is not None
        else None
    )
    return end.status, end.result if end.status == "completed" else None, error


@attrs.frozen
class FailOutcome:
    """What became of a failed attempt."""

    task: Task
    will_retry: bool
    delay: float
    dead_letter: DeadLetter | None
    held_by: str | None = None
    """The worker whose claim the control plane ended (a release or a timeout), if any: that
    attempt started on it, though the worker never reported it."""

    @property
    def cancelled(self) -> bool:
        """The task was cancelled instead of retried (its cancellation had been requested)."""
        return self.task.status == "cancelled"

    @property
    def verdict(self) -> str:
        """What became of the task, for logs."""
        if self.will_retry:
            return "will retry"
        if self.dead_letter is not None:
            return "dead-lettered"
        return "cancelled" if self.cancelled else f"closed ({self.task.status})"


def _stored_policy(stored: dict[str, Any]) -> RetryPolicy:
    """The retry policy a task was written with. One written before intervals were bounded
    may hold an interval past `MAX_SECONDS`: it is read as `MAX_SECONDS`, so that the failure
    of an attempt is recorded whatever policy its task holds."""
    bounded = {
        key: min(value, MAX_SECONDS)
        if key in _INTERVALS and isinstance(value, float | int) and not isinstance(value, bool)
        else value
        for key, value in stored.items()
    }
    return RetryPolicy.from_dict(bounded) if bounded else RetryPolicy()


_INTERVALS = frozenset({"initial_interval", "maximum_interval"})


def _error_line(error: dict[str, Any]) -> str:
    kind = error.get("type") or "Error"
    message = error.get("message") or ""
    return f"{kind}: {message}" if message else str(kind)


class Store:
    """Durable operations over one connection pool."""

    def __init__(self, pool: Pool, *, rng: random.Random | None = None) -> None:
        self.pool = pool
        self._rng = rng or random.Random()

    async def warm_up(self) -> int:
        """Open the pool to its size, every connection with every statement of queries.sql
        prepared (`Pool.warm_up`); return how many connections warmed up.

        Raises:
            DatabaseError, DatabaseUnavailable: a statement would not prepare, or no connection.
        """
        return await self.pool.warm_up(list(Q.values()))

    # ---------------------------------------------------------------- transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection in a transaction, for callers composing several operations."""
        async with self.pool.transaction() as conn:
            yield conn

    async def statement_now(self, conn: Connection) -> datetime:
        """The database clock as of this statement (`now` is the transaction's start)."""
        value: datetime = await conn.fetchval(Q["statement_now"])
        return value

    async def now(self, conn: Connection | None = None) -> datetime:
        """The database clock."""
        if conn is not None:
            value: datetime = await conn.fetchval(Q["now"])
            return value
        value = await self.pool.fetchval(Q["now"])
        return value

    # ---------------------------------------------------------------- workflows

    async def create_workflow(
        self,
        conn: Connection,
        *,
        workflow_id: str,
        workflow_type: str,
        input: str,
        run_id: uuid.UUID | None = None,
        parent_run_id: uuid.UUID | None = None,
        parent_child_id: str | None = None,
    ) -> tuple[WorkflowRun, bool]:
        """Create a run, or return the open run of ``workflow_id`` (idempotent start).

        Returns:
            The run and whether it was created now.
        """
        row = await conn.fetchrow(
            Q["insert_workflow"],
            run_id or uuid.uuid4(),
            workflow_id,
            workflow_type,
            input,
            parent_run_id,
            parent_child_id,
        )
        if row is not None:
            return WorkflowRun.from_row(row), True
        existing = await conn.fetchrow(Q["get_open_run"], workflow_id)
        if existing is None:  # it ended between our insert and this read: start anew
            return await self.create_workflow(
                conn,
                workflow_id=workflow_id,
                workflow_type=workflow_type,
                input=input,
                run_id=run_id,
                parent_run_id=parent_run_id,
                parent_child_id=parent_child_id,
            )
        return WorkflowRun.from_row(existing), False

    async def start_workflows(
        self, requests: Sequence[tuple[str, str, str, uuid.UUID | None]]
    ) -> list[tuple[str, uuid.UUID | None, bool]]:
        """Start ``(workflow_id, workflow_type, input, run_id)`` runs in one statement (an
        empty workflow id: the database generates a UUID; a run id: the run the request asks
        for, returned as it is if it exists, else None for a generated one).

        Returns:
            Per request, in order: the workflow id, the run id (the new run, the run asked for
            that existed, or the open run that already had that workflow id; None only if that
            run ended in the same instant) and whether it was created now.
        """
        # The short forms of the columns most batches allow: every element asyncpg encodes
        # costs the control plane's asyncio thread about a microsecond.
        ids = [r[0] for r in requests]
        types = [r[1] for r in requests]
        run_ids = [r[3] for r in requests]
        rows = await self.pool.fetch(
            Q["start_workflows"],
            ids if any(ids) else [],
            types[:1] if len(set(types)) == 1 else types,
            [r[2] for r in requests],
            run_ids if any(run_ids) else [],
        )
        return [(r["workflow_id"], r["run_id"], r["created"]) for r in rows]

    async def start_workflow_for(
        self,
        worker_id: str,
        workflow_id: str,
        workflow_type: str,
        input: str,
        run_id: uuid.UUID | None = None,
    ) -> tuple[str, uuid.UUID | None, Task | None, list[StoredEvent]]:
        """Start one run with its workflow task claimed for ``worker_id`` (eager start; an
        empty workflow id: the database generates a UUID; ``run_id`` as in `start_workflows`).

        Returns:
            The workflow id; the run id (the new run, the run asked for that existed, or the
            open run that already had that id; None only if that run ended in the same
            instant); for a new run its claimed workflow task and its history (the one
            workflow_started event), else None and [].
        """
        row = await self.pool.fetchrow(
            Q["start_workflow_for"], workflow_id, workflow_type, input, worker_id, run_id
        )
        assert row is not None  # the statement always answers its one request
        if not row["created"]:
            return row["started_workflow_id"], row["started_run_id"], None, []
        event = StoredEvent(row["sequence_num"], row["event_type"], row["payload"], row["event_at"])
        return row["started_workflow_id"], row["started_run_id"], Task.from_row(row), [event]

    async def get_workflow(
        self, workflow_id: str, run_id: uuid.UUID | None = None, *, conn: Connection | None = None
    ) -> WorkflowRun:
        """Return a run (the newest of ``workflow_id`` when ``run_id`` is None).

        Raises:
            NotFound: no such workflow or run.
        """
        db = conn or self.pool
        if run_id is not None:
            row = await db.fetchrow(Q["get_run"], run_id)
            if row is not None and row["workflow_id"] != workflow_id and workflow_id:
                row = None
        else:
            row = await db.fetchrow(Q["get_latest_run"], workflow_id)
        if row is None:
            which = f"workflow {workflow_id!r}" + (f" run {run_id}" if run_id else "")
            raise NotFound(f"{which} not found")
        return WorkflowRun.from_row(row)

    async def get_run(self, run_id: uuid.UUID, *, conn: Connection | None = None) -> WorkflowRun:
        """Return a run by run id.

        Raises:
            NotFound: no such run.
        """
        row = await (conn or self.pool).fetchrow(Q["get_run"], run_id)
        if row is None:
            raise NotFound(f"workflow run {run_id} not found")
        return WorkflowRun.from_row(row)

    async def lock_run(self, conn: Connection, run_id: uuid.UUID) -> WorkflowRun:
        """Lock a run's row for this transaction (the per-run mutex) and return it."""
        row = await conn.fetchrow(Q["lock_run"], run_id)
        if row is None:
            raise NotFound(f"workflow run {run_id} not found")
        return WorkflowRun.from_row(row)

    async def _fetch_planned_for_values(self, query: str, *args: Any) -> list[Row]:
        """Run an operator's query whose best plan depends on which of its optional filters
        are set: planned for the values at hand, whatever plan mode the pool's connections
        use (the control plane's prefer one generic plan per statement)."""
        async with self.pool.transaction() as conn:
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            return await conn.fetch(query, *args)

    async def list_workflows(
        self,
        *,
        workflow_type: str | None = None,
        status: str | None = None,
        limit: int = 50,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[WorkflowRun]:
        """Runs newest first; pass the last run's ``(created_at, run_id)`` as ``after`` to page."""
        rows = await self._fetch_planned_for_values(
            Q["list_workflows"],
            workflow_type,
            status,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [WorkflowRun.from_row(r) for r in rows]

    async def set_running(self, conn: Connection, run_id: uuid.UUID) -> None:
        """pending → running (no-op for a running run)."""
        await conn.execute(Q["set_run_running"], run_id)

    async def end_run(
        self,
        conn: Connection,
        run_id: uuid.UUID,
        status: str,
        *,
        result: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> WorkflowRun:
        """Record a run's end (completed with ``result``, failed with ``error``, or cancelled).

        Raises:
            FailedPrecondition: the run has already ended.
        """
        if status not in ("completed", "failed", "cancelled"):
            raise ValueError(f"not a final status: {status!r}")
        row = await conn.fetchrow(
            Q["end_run"],
            run_id,
            status,
            result if status == "completed" else None,
            encode_text(error, what="error") if error is not None and status == "failed" else None,
        )
        if row is None:
            run = await self.get_run(run_id, conn=conn)
            raise FailedPrecondition(f"workflow {run.workflow_id!r} has already ended {run.status}")
        await self.notify(conn, CHANNEL_RUNS, str(run_id))
        return WorkflowRun.from_row(row)

    async def set_continued(
        self, conn: Connection, run_id: uuid.UUID, continued_run_id: uuid.UUID
    ) -> None:
        """Record the run that ``run_id``, ended ``continued_as_new``, goes on in."""
        await conn.execute(Q["set_continued"], run_id, continued_run_id)

    async def lock_open_children(
        self, conn: Connection, run_id: uuid.UUID
    ) -> tuple[list[WorkflowRun], list[uuid.UUID]]:
        """The open child runs of a run the caller holds, locked, oldest first, and the ids of
        those another transaction holds: skipped, never waited for (a child's end holds the
        child, then waits for its parent)."""
        rows = await conn.fetch(Q["lock_open_children"], run_id)
        locked = [WorkflowRun.from_row(r) for r in rows if r["locked"]]
        return locked, [r["id"] for r in rows if not r["locked"]]

    async def lock_open_activities(
        self, conn: Connection, run_id: uuid.UUID
    ) -> tuple[list[Task], list[uuid.UUID]]:
        """The open (pending or claimed) activity tasks of a run the caller holds, locked,
        oldest first, and the ids of those another transaction holds: skipped, never waited
        for (the results statement holds a task, then waits for its run)."""
        rows = await conn.fetch(Q["lock_open_activities"], run_id)
        locked = [Task.from_row(r) for r in rows if r["locked"]]
        return locked, [r["id"] for r in rows if not r["locked"]]

    async def lock_open_task(
        self, conn: Connection, task_id: uuid.UUID, *, wait: bool
    ) -> Task | None:
        """Lock an open (pending or claimed) task: with ``wait``, waiting for whoever holds
        it; without, None when another transaction holds it. None if it is not open."""
        query = Q["lock_open_task"] if wait else Q["lock_open_task_unless_held"]
        row = await conn.fetchrow(query, task_id)
        return None if row is None else Task.from_row(row)

    async def find_abandoned_activities(self, *, limit: int) -> list[uuid.UUID]:
        """Up to ``limit`` activity tasks a run's cancel request or end skipped (another
        transaction held them) that nobody has settled yet (read without locks)."""
        return [r["id"] for r in await self.pool.fetch(Q["find_abandoned_activities"], limit)]

    async def remember_skipped(
        self, conn: Connection, run_id: uuid.UUID, ids: Sequence[uuid.UUID], *, children: bool
    ) -> None:
        """Record, in the transaction that skipped them, the activity tasks (or, with
        ``children``, the child runs) that the cancel request or end of run ``run_id`` (which
        it holds) could not cancel."""
        if ids:
            kind = "child" if children else "activity"
            await conn.execute(Q["remember_skipped"], run_id, kind, list(ids))

    async def forget_skipped(self, conn: Connection, row_id: uuid.UUID) -> bool:
        """Settle a skipped task's or child's record (the caller holds it and the run that
        skipped it); return whether there was one: whether the skip committed."""
        return bool(await conn.fetchval(Q["forget_skipped"], row_id))

    async def forget_skipped_if_closed(self, conn: Connection, row_id: uuid.UUID) -> None:
        """Settle a skipped task's or child's record if it is no longer open (holding nothing)."""
        await conn.execute(Q["forget_skipped_if_closed"], row_id)

    async def lock_run_unless_held(self, conn: Connection, run_id: uuid.UUID) -> WorkflowRun | None:
        """Lock a run's row unless another transaction holds it; None then, or if it is gone."""
        row = await conn.fetchrow(Q["lock_run_unless_held"], run_id)
        return None if row is None else WorkflowRun.from_row(row)

    async def find_orphaned_children(self, *, limit: int) -> list[uuid.UUID]:
        """Up to ``limit`` child runs a parent's end or cancel request skipped that nobody has
        settled yet, and open children with no cancel request whose parent is gone (read
        without locks)."""
        return [r["id"] for r in await self.pool.fetch(Q["find_orphaned_children"], limit)]

    async def request_run_cancel(self, conn: Connection, run_id: uuid.UUID) -> None:
        """Remember that cancellation of a run was requested (idempotent)."""
        await conn.execute(Q["set_cancel_requested"], run_id)

    async def retry_stuck_runs(
        self, workflow_types: Sequence[str], *, limit: int = STUCK_RETRIES_AT_ONCE
    ) -> list[uuid.UUID]:
        """Give open runs of ``workflow_types`` marked stuck another try (a pending workflow
        task each, for those with none out; at most ``limit``); return their run ids. Runs
        another transaction holds are skipped."""
        if not workflow_types:
            return []
        rows = await self.pool.fetch(Q["retry_stuck_runs"], list(workflow_types), limit)
        return [r["run_id"] for r in rows]

    async def set_stuck(self, conn: Connection, run_id: uuid.UUID, reason: str) -> None:
        """Mark an open run stuck (it stays visible and is not retried in a loop: see
        `retry_stuck_runs`)."""
        await conn.execute(Q["set_run_stuck"], run_id, reason)

    # ---------------------------------------------------------------- events

    async def append_events(
        self,
        conn: Connection,
        run: WorkflowRun,
        events: Sequence[NewEvent],
        *,
        expected_last: int | None = None,
    ) -> int:
        """Append events to a run's history; return the new last sequence number.

        With ``expected_last``, the append succeeds only if the history still ends there
        (optimistic concurrency); without it the caller must hold the run lock.

        Raises:
            ConcurrencyConflict: the history no longer ends at ``expected_last``.
        """
        if not events:
            return run.last_sequence_num
        if expected_last is None:
            last = await conn.fetchval(Q["reserve_sequence"], run.run_id, len(events))
        else:
            last = await conn.fetchval(
                Q["reserve_sequence_if"], run.run_id, expected_last, len(events)
            )
            if last is None:
                raise ConcurrencyConflict(
                    f"history of workflow {run.workflow_id!r} moved past sequence {expected_last}"
                )
        first = int(last) - len(events) + 1
        await conn.execute(
            Q["insert_events"],
            run.run_id,
            run.workflow_id,
            list(range(first, int(last) + 1)),
            [e.type for e in events],
            [e.text() for e in events],
        )
        return int(last)

    async def load_events(
        self,
        run_id: uuid.UUID,
        *,
        after: int = 0,
        limit: int | None = None,
        conn: Connection | None = None,
    ) -> list[StoredEvent]:
        """A run's events after sequence ``after``, in order."""
        rows = await (conn or self.pool).fetch(Q["load_events"], run_id, after, limit)
        return [StoredEvent.from_row(r) for r in rows]

    # ---------------------------------------------------------------- tasks

    async def notify(self, conn: Connection, channel: str, payload: str) -> None:
        """NOTIFY on commit of the current transaction."""
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def enqueue_activity(self, conn: Connection, run: WorkflowRun, task: NewTask) -> Task:
        """Enqueue an activity task of ``run`` (visible at ``visible_at`` or now)."""
        row = await conn.fetchrow(
            Q["insert_task"],
            task.task_id,
            run.run_id,
            run.workflow_id,
            "activity",
            task.activity_type,
            task.activity_id,
            task.input,
            task.retry.max_attempts,
            task.priority,
            task.visible_at,
            encode_text(task.retry.to_dict(), what="retry policy"),
            task.schedule_to_start_s,
            task.start_to_close_s,
            task.heartbeat_timeout_s,
            task.breaker_key,
        )
        assert row is not None
        await self.notify(conn, CHANNEL_TASKS, f"activity:{task.activity_type}")
        return Task.from_row(row)

    async def handed_out_by_result(
        self, task_id: uuid.UUID, lease_token: int, worker_id: str
    ) -> tuple[str | None, list[Task]]:
        """The result recorded for activity task ``task_id`` under ``lease_token`` (None if
        none was), and the follow-up workflow task that recording claimed for ``worker_id``
        and that it still holds (none or one)."""
        rows = await self.pool.fetch(Q["handed_out_by_result"], task_id, lease_token, worker_id)
        recorded = rows[0]["recorded"] if rows else None
        return recorded, [Task.from_row(row) for row in rows if row["id"] is not None]

    async def claimed_first_task_of(self, run_id: uuid.UUID, worker_id: str) -> list[Task]:
        """Run ``run_id``'s first workflow task, if it is claimed for ``worker_id``."""
        rows = await self.pool.fetch(Q["claimed_first_task_of"], run_id, worker_id)
        return [Task.from_row(row) for row in rows]

    async def handed_out_by_completion(
        self, task_id: uuid.UUID, lease_token: int, worker_id: str
    ) -> list[Task]:
        """The activity tasks that completing workflow task ``task_id`` under ``lease_token``
        claimed for ``worker_id`` (eager dispatch, or started ahead) and that it still holds."""
        rows = await self.pool.fetch(Q["handed_out_by_completion"], task_id, lease_token, worker_id)
        return [Task.from_row(row) for row in rows]

    async def taken_task_ids(
        self, conn: Connection, task_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        """Which of ``task_ids`` name a task already."""
        rows = await conn.fetch(Q["taken_task_ids"], list(task_ids))
        return {row["id"] for row in rows}

    async def lock_leased_with_run(
        self, conn: Connection, task_id: uuid.UUID, lease_token: int
    ) -> WorkflowRun:
        """Lock a claimed task under its lease together with its run; return the run.

        Raises:
            StaleLease: the task is not claimed under that lease (anymore).
        """
        row = await conn.fetchrow(Q["lock_leased_with_run"], task_id, lease_token)
        if row is None:
            raise await self._stale(conn, task_id, lease_token)
        return WorkflowRun.from_row(row)

    async def apply_workflow_task(
        self,
        task_id: uuid.UUID,
        lease_token: int,
        expected_sequence: int,
        events: Sequence[NewEvent],
        activities: Sequence[NewTask] = (),
        *,
        eager_for: str | None = None,
        eager: Sequence[bool] = (),
        end: RunEnd | None = None,
        simple_end_only: bool = True,
        conn: Connection | None = None,
    ) -> tuple[bool, list[Task]]:
        """Apply a workflow task's outcome in one statement (see queries.sql): enqueue its
        activities, append its events, close the task, mark the run's signals processed and,
        with ``end``, end the run.

        Nothing is written unless the caller holds the task's lease, the run is open and its
        history ends at ``expected_sequence`` (and, with ``end`` and ``simple_end_only``, the
        run has no parent, no other open task, no open child and no pending timer). Without
        ``conn`` the statement is its own transaction: one round trip.

        Activities flagged in ``eager`` are claimed at once for worker ``eager_for`` (unless
        their circuit breaker is not closed).

        Returns:
            ``(applied, eager_claims)``.
        """
        ((applied, claimed),) = await self.apply_workflow_tasks(
            [Decision(task_id, lease_token, expected_sequence, events, activities, eager, end)],
            eager_for=eager_for,
            simple_end_only=simple_end_only,
            conn=conn,
        )
        return applied, claimed

    async def apply_workflow_tasks(
        self,
        decisions: Sequence[Decision],
        *,
        eager_for: str | None = None,
        simple_end_only: bool = True,
        conn: Connection | None = None,
    ) -> list[tuple[bool, list[Task]]]:
        """`apply_workflow_task` for several tasks, in one statement and one transaction.

        Each is applied or not on its own, under the same conditions; of several tasks of one
        run, only the first can be applied. Activities flagged ``eager`` are claimed at once
        for worker ``eager_for``.

        Returns:
            ``(applied, eager_claims)`` per decision, in order.
        """
        if not decisions:
            return []
        (counts, *ends), written = _decision_columns(decisions, eager_for)
        rows = await (conn or self.pool).fetch(
            Q["apply_workflow_tasks"],
            [d.task_id for d in decisions],
            [d.lease_token for d in decisions],
            [d.expected_sequence for d in decisions],
            counts,
            *ends,
            *written,
            eager_for,
            simple_end_only,
        )
        applied = [False] * len(decisions)
        claimed: list[list[Task]] = [[] for _ in decisions]
        for row in rows:
            k = row["task_no"] - 1
            applied[k] = bool(row["applied"])
            if row["id"] is not None:
                claimed[k].append(Task.from_row(row))
        return list(zip(applied, claimed, strict=True))

    async def ensure_workflow_task(self, conn: Connection, run: WorkflowRun) -> bool:
        """Make sure the run has a pending workflow task; return True if one was created."""
        created = await conn.fetchval(
            Q["ensure_workflow_task"], uuid.uuid4(), run.run_id, run.workflow_id, run.workflow_type
        )
        if created is not None:
            await self.notify(conn, CHANNEL_TASKS, f"workflow:{run.workflow_type}")
        return created is not None

    async def claim_tasks(
        self,
        worker_id: str,
        *,
        workflow_types: Sequence[str] = (),
        activity_types: Sequence[str] = (),
        limit: int,
        blocked_keys: Sequence[str] = (),
    ) -> list[Task]:
        """Claim up to ``limit`` visible pending tasks of the given types.

        Each claim increments the attempt and draws a fresh lease token; rows locked by another
        claimer are skipped, so concurrent claimers never get the same task.
        """
        if limit <= 0 or not (workflow_types or activity_types):
            return []
        rows: Sequence[Any] = await self.pool.fetch(
            Q["claim_tasks"],
            worker_id,
            list(workflow_types),
            list(activity_types),
            limit,
            list(blocked_keys),
        )
        return _in_claim_order(rows)

    async def any_unclosed_breaker(self) -> bool:
        """Whether any circuit breaker is open or half-open."""
        return bool(await self.pool.fetchval(Q["any_unclosed_breaker"]))

    async def claim_tasks_fast(
        self,
        worker_id: str,
        *,
        workflow_types: Sequence[str] = (),
        activity_types: Sequence[str] = (),
        limit: int,
    ) -> tuple[list[Task], bool, dict[uuid.UUID, list[StoredEvent]]]:
        """`claim_tasks` in one statement, leaving the tasks of every unclosed breaker alone.

        Returns:
            The tasks; whether claimable tasks of these types were left behind; and the full
            history of each claimed workflow task's run that is still open (the statement
            also marked those runs running). A workflow task whose run is missing from it
            belongs to a run that has ended.
        """
        if limit <= 0:
            return [], False, {}
        return await self.claim_tasks_for(
            [worker_id] * limit, workflow_types=workflow_types, activity_types=activity_types
        )

    async def claim_tasks_for(
        self,
        slots: Sequence[str],
        *,
        workflow_types: Sequence[str] = (),
        activity_types: Sequence[str] = (),
    ) -> tuple[list[Task], bool, dict[uuid.UUID, list[StoredEvent]]]:
        """`claim_tasks_fast` for several claimers at once: ``slots`` names the worker of each
        slot to fill, and the n-th task returned (in claim order) is claimed for ``slots[n]``.
        """
        if not slots or not (workflow_types or activity_types):
            return [], False, {}
        rows = await self.pool.fetch(
            Q["claim_tasks_fast"],
            list(slots),
            list(workflow_types),
            list(activity_types),
            len(slots),
        )
        more = bool(rows) and bool(rows[0]["more_pending"])
        ranked = sorted(rows, key=lambda r: r["claim_rank"])
        return [Task.from_row(r) for r in ranked], more, _histories(rows)

    async def start_runs(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[StoredEvent]]:
        """Mark runs running (pending -> running) and read their histories, in one statement.

        Returns:
            The full history of each run still open (runs that ended are left out).
        """
        histories: dict[uuid.UUID, list[StoredEvent]] = {}
        for row in await self.pool.fetch(Q["start_runs"], list(run_ids)):
            events = histories.setdefault(row["run_id"], [])
            if row["sequence_num"] is not None:
                events.append(StoredEvent.from_row(row))
        return histories

    async def close_workflow_tasks(self, task_ids: Sequence[uuid.UUID]) -> None:
        """Close several workflow tasks at once."""
        if task_ids:
            await self.pool.execute(Q["close_workflow_tasks"], list(task_ids))

    async def complete_activities(
        self,
        completions: Sequence[tuple[uuid.UUID, int, str]],
        worker_id: str,
        *,
        eager_types: Sequence[str] = (),
        max_eager: int = 0,
        decisions: Sequence[DecisionAhead] = (),
    ) -> tuple[
        dict[int, str | None], list[Task], dict[uuid.UUID, list[StoredEvent]], dict[int, list[Task]]
    ]:
        """Complete several activities (``(task_id, lease_token, result_json)``) in one
        statement and wake their workflows, handing up to ``max_eager`` follow-up workflow
        tasks of ``eager_types`` to ``worker_id``, and apply in it the ``decisions`` made ahead
        that still hold (see queries.sql).

        Returns:
            The completions applied, by their index in ``completions`` (of a task given
            twice, at most one is: the one under the lease that holds, or either one when
            both name it), each with its breaker key if that breaker is half-open and the
            task was its probe; the workflow tasks handed to the worker; their runs' full
            histories; and, by the index of the completion it follows, each decision applied
            with the activities it scheduled that were claimed for the worker.
        """
        (counts, *ends), written = _decision_columns(decisions, worker_id)
        rows = await self.pool.fetch(
            Q["complete_activities"],
            [c[0] for c in completions],
            [c[1] for c in completions],
            [c[2] for c in completions],
            worker_id,
            list(eager_types),
            max_eager,
            [d.result + 1 for d in decisions],
            [d.run_id for d in decisions],
            [d.activity_id for d in decisions],
            [d.after_sequence for d in decisions],
            [d.after_time for d in decisions],
            [d.seen_sequence for d in decisions],
            counts,
            *ends,
            *written,
        )
        done = {r["done_ord"] - 1: r["breaker"] for r in rows if r["task_id"] is not None}
        decided: dict[int, list[Task]] = {
            r["done_ord"] - 1: [] for r in rows if r["task_id"] is not None and r["decided"]
        }
        handed = []
        for r in rows:
            if r["id"] is None:
                continue
            if r["decided_no"] is None:
                handed.append(r)
            else:
                decided.setdefault(decisions[r["decided_no"] - 1].result, []).append(
                    Task.from_row(r)
                )
        return done, [Task.from_row(r) for r in handed], _histories(handed), decided

    async def stale_reason(self, task_id: uuid.UUID, lease_token: int) -> StaleLease:
        """Why a report under ``lease_token`` was refused (the task is gone or not yours)."""
        async with self.pool.acquire() as conn:
            return await self._stale(conn, task_id, lease_token)

    async def get_task(self, task_id: uuid.UUID, *, conn: Connection | None = None) -> Task:
        """Return a task.

        Raises:
            NotFound: no such task.
        """
        row = await (conn or self.pool).fetchrow(Q["get_task"], task_id)
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return Task.from_row(row)

    async def _stale(self, conn: Connection, task_id: uuid.UUID, lease_token: int) -> StaleLease:
        row = await conn.fetchrow(Q["get_task"], task_id)
        if row is None:
            return StaleLease(f"task {task_id} does not exist")
        task = Task.from_row(row)
        if task.status != "claimed":
            return StaleLease(
                f"task {task_id} is {task.status}; lease {lease_token} is no longer valid"
            )
        return StaleLease(
            f"task {task_id} is now held by {task.claimed_by} under lease {task.lease_token}; "
            f"lease {lease_token} is stale"
        )

    async def lock_leased(self, conn: Connection, task_id: uuid.UUID, lease_token: int) -> Task:
        """Lock a claimed task for this transaction if ``lease_token`` is its current lease.

        Raises:
            StaleLease: the task is not claimed under that lease (anymore).
        """
        task = await self.lock_claim(conn, task_id, lease_token)
        if task is None:
            raise await self._stale(conn, task_id, lease_token)
        return task

    async def heartbeat(
        self, task_id: uuid.UUID, lease_token: int, details: str | None = None
    ) -> bool:
        """Refresh a task's heartbeat; return whether cancellation was requested.

        Raises:
            StaleLease: the caller does not hold the task's current lease.
        """
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(Q["heartbeat_task"], task_id, lease_token, details)
            if row is None:
                raise await self._stale(conn, task_id, lease_token)
            return row["cancel_requested_at"] is not None

    async def fail_task(
        self,
        conn: Connection,
        task_id: uuid.UUID,
        lease_token: int,
        error: dict[str, Any],
        *,
        non_retryable: bool = False,
    ) -> FailOutcome:
        """Record a failed attempt: retry after backoff, or kill it into the dead-letter queue;
        a task whose cancellation was requested is cancelled instead, whatever its attempts.

        The dead letter is written in the same transaction that marks the task dead.

        Raises:
            StaleLease: the caller does not hold the task's current lease.
        """
        task = await self.lock_leased(conn, task_id, lease_token)
        return await self._fail_locked(conn, task, error, non_retryable=non_retryable)

    async def _fail_locked(
        self, conn: Connection, task: Task, error: dict[str, Any], *, non_retryable: bool
    ) -> FailOutcome:
        entry = {**error, "attempt": task.attempt}
        if task.cancel_requested_at is not None:
            # Cancelled, whatever its attempts or its error: never dead-lettered (the workflow
            # asked for it to stop, and sees ActivityCancelled). retry_task closes it so.
            row = await conn.fetchrow(
                Q["retry_task"], task.task_id, 0.0, encode_text(entry, what="error")
            )
            assert row is not None
            return FailOutcome(Task.from_row(row), False, 0.0, None)
        policy = attrs.evolve(_stored_policy(task.retry_policy), max_attempts=task.max_attempts)
        decision = decide_retry(
            policy,
            task.attempt,
            str(error.get("type", "")),
            non_retryable or bool(error.get("non_retryable")),
            self._rng.random(),
            retry_after_of(error),
        )
        if decision.retry:
            row = await conn.fetchrow(
                Q["retry_task"], task.task_id, decision.delay, encode_text(entry, what="error")
            )
            assert row is not None
            retried = Task.from_row(row)
            if retried.status != "pending":  # its cancellation was requested: not run again
                return FailOutcome(retried, False, 0.0, None)
            await self.notify(conn, CHANNEL_TIMERS, "retry")
            return FailOutcome(retried, True, decision.delay, None)
        dead_task, letter = await self._kill(conn, task, entry)
        return FailOutcome(dead_task, False, 0.0, letter)

    async def _kill(
        self, conn: Connection, task: Task, error: dict[str, Any]
    ) -> tuple[Task, DeadLetter]:
        row = await conn.fetchrow(Q["kill_task"], task.task_id, encode_text(error, what="error"))
        assert row is not None
        letter = await conn.fetchrow(
            Q["insert_dead_letter"], uuid.uuid4(), task.task_id, _error_line(error)
        )
        assert letter is not None
        return Task.from_row(row), DeadLetter.from_row(letter)

    async def release_task(
        self, conn: Connection, task: Task, reason: dict[str, Any], *, charge: bool = True
    ) -> FailOutcome:
        """Give a claimed task back (its holder is gone); dead-letter it past ``max_attempts``.

        The attempt the holder consumed stays counted, so a task that keeps killing its
        workers ends in the dead-letter queue instead of looping. Not ``charge``d (a worker
        that stops gracefully gives back what outlived its grace period: that attempt was
        interrupted, not spent), the task gets one attempt more instead, so attempts keep
        their numbers and its budget is whole. A task with no use in the queue is closed
        instead (see queries.sql): then ``will_retry`` is False. So is a task whose
        cancellation was requested, on its last attempt too: cancelled, not dead-lettered.
        """
        entry = {**reason, "attempt": task.attempt}
        holder = task.claimed_by
        await self.release_probe(conn, task)
        if (
            charge
            and task.kind == "activity"
            and task.cancel_requested_at is None  # else the release cancels it
            and task.attempt >= task.max_attempts
        ):
            dead_task, letter = await self._kill(conn, task, entry)
            return FailOutcome(dead_task, False, 0.0, letter, holder)
        release = partial(
            conn.fetchrow, Q["release_task"], task.task_id, encode_text(entry), not charge
        )
        row = await self._unless_superseded(conn, task, release)
        assert row is not None
        released = Task.from_row(row)
        if released.status != "pending":
            return FailOutcome(released, False, 0.0, None, holder)
        await self.notify(conn, CHANNEL_TASKS, f"{task.kind}:{task.type_name}")
        return FailOutcome(released, True, 0.0, None, holder)

    async def cancel_task(self, conn: Connection, task_id: uuid.UUID) -> Task | None:
        """Close a pending or claimed task as cancelled; None if it had already finished."""
        row = await conn.fetchrow(Q["cancel_task"], task_id)
        return None if row is None else Task.from_row(row)

    async def reclaim_stale(
        self, conn: Connection, *, stale_after: float, limit: int = 500
    ) -> list[FailOutcome]:
        """Release claimed tasks whose heartbeat is older than ``stale_after`` seconds (or a
        workflow task's own heartbeat timeout, when shorter); each release counts the attempt.
        An activity's own heartbeat timeout is `time_out`'s (a failed attempt, retried after
        its policy's backoff), not a release. (The control plane's duty releases them one by
        one, `stale_tasks` then `release_stale`, recording each in its run's history.)"""
        return [
            await self.release_stale(conn, task)
            for task in await self.stale_tasks(conn, stale_after=stale_after, limit=limit)
        ]

    async def stale_tasks(
        self, conn: Connection, *, stale_after: float, limit: int = 500
    ) -> list[Task]:
        """Lock and return up to ``limit`` claimed tasks that `reclaim_stale` would release,
        skipping (never waiting for) those another transaction holds."""
        return [
            Task.from_row(r) for r in await conn.fetch(Q["find_stale_tasks"], stale_after, limit)
        ]

    async def release_stale(self, conn: Connection, task: Task) -> FailOutcome:
        """Release a locked stale task (`reclaim_stale`), counting its attempt."""
        return await self.release_task(
            conn,
            task,
            {
                "type": "HeartbeatTimeout",
                "message": f"no heartbeat from {task.claimed_by} since {task.heartbeat_at}",
                "non_retryable": False,
            },
        )

    async def tasks_held_by(
        self,
        conn: Connection,
        worker_id: str,
        *,
        claimed_before: datetime | None = None,
        besides: Iterable[uuid.UUID] = (),
    ) -> list[Task]:
        """Lock and return every task a worker holds (with ``claimed_before``, only those
        claimed before then), but those of ``besides``, waiting for those another
        transaction holds."""
        rows = await conn.fetch(Q["find_tasks_of_worker"], worker_id, claimed_before, list(besides))
        return [Task.from_row(r) for r in rows]

    async def lock_claim(
        self, conn: Connection, task_id: uuid.UUID, lease_token: int
    ) -> Task | None:
        """Lock a task, waiting for whoever holds it, if it is still claimed under
        ``lease_token`` (the same claim: every claim draws a new token); else None."""
        row = await conn.fetchrow(Q["lock_task_lease"], task_id, lease_token)
        return None if row is None else Task.from_row(row)

    async def lock_runs_unless_held(
        self, conn: Connection, run_ids: Iterable[uuid.UUID]
    ) -> set[uuid.UUID]:
        """Lock the runs ``run_ids`` in one statement, skipping (never waiting for) those
        another transaction holds; return the ids locked (a run that is gone is left out)."""
        rows = await conn.fetch(Q["lock_runs_unless_held"], list(set(run_ids)))
        return {r["id"] for r in rows}

    async def count_pending(self, conn: Connection | None = None) -> int:
        """How many tasks wait in the queue."""
        return int(await (conn or self.pool).fetchval(Q["count_pending_tasks"]))

    async def count_new_runs(
        self, conn: Connection, starts: Sequence[tuple[str | None, uuid.UUID | None]]
    ) -> int:
        """How many runs the ``(workflow_id, run_id)`` starts of a batch would add (None: no
        workflow id, a generated one; no run id asked for), as `start_workflows` decides: a
        run id that names a run adds none, nor does a workflow id with an open run, and the
        starts of one new workflow id add one run together."""
        # Starts that name neither always add a run: only their number goes to the database.
        named = [(w, r) for w, r in starts if w is not None or r is not None]
        return int(
            await conn.fetchval(
                Q["count_new_runs"],
                [w for w, _ in named],
                [r for _, r in named],
                len(starts) - len(named),
            )
        )

    async def tasks_of_run(
        self,
        run_id: uuid.UUID,
        *,
        kind: str = "activity",
        statuses: Sequence[str] = ("pending", "claimed"),
        conn: Connection | None = None,
    ) -> list[Task]:
        """A run's tasks of one kind in the given statuses, oldest first."""
        rows = await (conn or self.pool).fetch(Q["tasks_of_run"], run_id, kind, list(statuses))
        return [Task.from_row(r) for r in rows]

    async def pending_timers(self, run_id: uuid.UUID) -> list[tuple[str, datetime]]:
        """A run's timers that have not fired: ``(timer_id, fire_at)``, soonest first."""
        rows = await self.pool.fetch(Q["pending_timers_of_run"], run_id)
        return [(r["timer_id"], r["fire_at"]) for r in rows]

    async def request_task_cancel(self, conn: Connection, task: Task) -> None:
        """Flag a claimed task for cancellation and push the request to its holder.

        The flag outlives the attempt: a task whose cancellation was requested is not put
        back in the queue when this attempt fails or its holder goes away.
        """
        row = await conn.fetchrow(Q["request_task_cancel"], task.task_id)
        if row is not None:
            await self._push_cancel(conn, row["claimed_by"], task.task_id, row["lease_token"])

    async def tell_holder_to_stop(self, conn: Connection, task: Task) -> None:
        """Push a stop to the holder of a locked claimed task whose attempt is ending anyway (a
        timeout); unlike `request_task_cancel`, nothing is stored for the task's next attempt."""
        if task.claimed_by is not None and task.lease_token is not None:
            await self._push_cancel(conn, task.claimed_by, task.task_id, task.lease_token)

    async def _push_cancel(
        self, conn: Connection, holder: str, task_id: uuid.UUID, lease_token: int
    ) -> None:
        await self.notify(conn, CHANNEL_CANCEL, f"{holder}\t{task_id}\t{lease_token}")

    async def close_workflow_task(self, conn: Connection, task_id: uuid.UUID) -> None:
        """Close a workflow task (applied, superseded or abandoned)."""
        await conn.execute(Q["close_workflow_task"], task_id)

    async def workflow_task_held(self, conn: Connection, run_id: uuid.UUID) -> bool:
        """Whether a worker holds one of the run's workflow tasks (waits for a claim of one
        under way; its open workflow tasks stay locked until ``conn``'s transaction ends)."""
        return bool(await conn.fetchval(Q["workflow_task_held"], run_id))

    async def drop_pending_workflow_tasks(self, conn: Connection, run_id: uuid.UUID) -> None:
        """Cancel the pending workflow task of a run that has ended."""
        await conn.execute(Q["cancel_pending_workflow_tasks"], run_id)

    async def worker_serves(self, type_name: str, kind: str) -> bool:
        """Whether an active worker serves this workflow (kind 'workflow') or activity type."""
        return bool(await self.pool.fetchval(Q["worker_serves"], type_name, kind))

    # ---------------------------------------------------------------- timers

    async def start_timer(
        self, conn: Connection, run: WorkflowRun, timer_id: str, seconds: float
    ) -> datetime | None:
        """Start a durable timer; return when it fires (None if it already existed)."""
        fire_at: datetime | None = await conn.fetchval(
            Q["insert_timer"], run.run_id, run.workflow_id, timer_id, seconds
        )
        if fire_at is not None:
            await self.notify(conn, CHANNEL_TIMERS, "timer")
        return fire_at

    async def cancel_timer(self, conn: Connection, run_id: uuid.UUID, timer_id: str) -> None:
        """Cancel a pending timer."""
        await conn.execute(Q["cancel_timer"], run_id, timer_id)

    async def cancel_timers_of_run(self, conn: Connection, run_id: uuid.UUID) -> None:
        """Cancel every pending timer of a run that ended (under its lock)."""
        await conn.execute(Q["cancel_timers_of_run"], run_id)

    async def due_timers(self, *, after: DueTimer | None = None, limit: int) -> list[DueTimer]:
        """Up to ``limit`` due pending timers, oldest first, after ``after`` (None: from the
        first), read without locking them (`fire_timers` settles them)."""
        rows = await self.pool.fetch(
            Q["due_timers"],
            limit,
            after.fire_at if after else None,
            after.id if after else None,
        )
        return [DueTimer.from_row(r) for r in rows]

    async def fire_timers(self, conn: Connection, due: Sequence[DueTimer]) -> int:
        """Fire a batch of due timers, read in (fire_at, id) order by `due_timers`; return how
        many fired into open runs.

        The batch's runs are locked first, in one statement, skipping (never waiting for)
        those another transaction holds. A second statement, whose snapshot then holds every
        row committed under those locks, fires the pending timers of the runs locked up to
        the batch's last, in (fire_at, id) order: in an open run a timer_fired event each and
        a pending workflow task, in an ended run the timers cancelled. It skips a run whose
        live workflow task another transaction holds. A skipped run's timers stay pending for
        a later round; the earlier ones of a run fire with, and before, any later one.
        """
        if not due:
            return 0
        rows = await conn.fetch(Q["lock_runs_unless_held"], list({t.run_id for t in due}))
        if not rows:
            return 0
        last = due[-1]
        fired: int = await conn.fetchval(
            Q["fire_timers_of_locked_runs"], [r["id"] for r in rows], last.fire_at, last.id
        )
        return fired

    async def newly_visible_keys(
        self, since: datetime, *, straggling_after: float = STRAGGLING_AFTER_S
    ) -> tuple[list[str], datetime, float | None]:
        """Keys (``kind:type``) of pending tasks that became visible after ``since`` or have
        waited visible longer than ``straggling_after`` seconds, the database time to pass
        as ``since`` next time, and the seconds until stragglers should be looked for again:
        when a key's next task, waiting now, will have waited that long, or at most
        ``straggling_after`` while one straggles (None: no task waits)."""
        rows = await self.pool.fetch(Q["newly_visible_keys"], since, straggling_after)
        if not rows:  # the statement returns at least one row; this keeps the types honest
            return [], await self.now(), None
        later = rows[0]["next_straggler_s"]
        keys = [r["key"] for r in rows if r["key"] is not None]
        return keys, rows[0]["now"], None if later is None else max(0.0, float(later))

    async def seconds_until_due(
        self, *, breaker_open_duration: float, schedules_fired_by: datetime | None = None
    ) -> float | None:
        """Seconds until the next timer fires, delayed task becomes visible, open breaker may
        admit probes or schedule fires (None: none). A schedule due by
        ``schedules_fired_by`` (when the round's firing began) and due still is held by another
        transaction: it counts as a second away."""
        value = await self.pool.fetchval(Q["next_due"], breaker_open_duration, schedules_fired_by)
        return None if value is None else float(value)

    async def breakers_due_since(self, since: datetime, *, open_duration: float) -> bool:
        """Whether an open breaker's open duration ended after ``since``."""
        return bool(await self.pool.fetchval(Q["breakers_due_since"], since, open_duration))

    async def timed_out_tasks(self, conn: Connection, *, limit: int = 500) -> list[Task]:
        """Lock activity tasks past a server-enforced timeout.

        A pending task that a circuit breaker holds is not one: its schedule-to-start deadline
        is renewed instead (tasks wait behind an open breaker without burning attempts).
        """
        await conn.execute(Q["renew_held_start_deadlines"])
        return [Task.from_row(r) for r in await conn.fetch(Q["find_timed_out_tasks"], limit)]

    async def lock_timed_out_task(
        self, conn: Connection, task_id: uuid.UUID, *, attempt: int, lease_token: int | None
    ) -> Task | None:
        """Lock an activity task, waiting for whoever holds it, if it is still attempt
        ``attempt`` under ``lease_token`` (None for a pending task that never had one) and
        still past a timeout `timed_out_tasks` enforces; else None."""
        row = await conn.fetchrow(Q["lock_timed_out_task"], task_id, attempt, lease_token)
        return None if row is None else Task.from_row(row)

    async def time_out(
        self, conn: Connection, task: Task, kind: str, error: dict[str, Any]
    ) -> FailOutcome:
        """Fail the current attempt of a locked task because a timeout of ``kind`` expired.

        A schedule-to-start timeout charges the attempt the task never got to make.
        """
        if task.status == "pending":
            row = await conn.fetchrow(Q["charge_attempt"], task.task_id)
            assert row is not None
            task = Task.from_row(row)
        outcome = await self._fail_locked(conn, task, error, non_retryable=False)
        return attrs.evolve(outcome, held_by=task.claimed_by)

    async def seconds_until_timeout(self) -> float | None:
        """Seconds until the next activity timeout could expire (None: nothing to watch)."""
        value = await self.pool.fetchval(Q["next_timeout"])
        return None if value is None else float(value)

    async def delete_expired_runs(self, conn: Connection, *, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` runs that ended more than ``older_than`` seconds ago (lock
        them, then delete those still without a live task, in a snapshot taken after the
        locks)."""
        locked = [r["id"] for r in await conn.fetch(Q["lock_expired_runs"], older_than, limit)]
        if not locked:
            return 0
        return len(await conn.fetch(Q["delete_expired_runs"], locked))

    # ---------------------------------------------------------------- dead letters

    async def list_dead_letters(
        self, *, limit: int = 50, after: tuple[datetime, uuid.UUID] | None = None
    ) -> list[DeadLetter]:
        """Dead letters newest first (keyset-paged by the last one's ``(dead_at, id)``)."""
        rows = await self._fetch_planned_for_values(
            Q["list_dead_letters"], after[0] if after else None, after[1] if after else None, limit
        )
        return [DeadLetter.from_row(r) for r in rows]

    async def requeue_dead_letter(self, conn: Connection, dead_letter_id: uuid.UUID) -> Task:
        """Put a dead letter's task back in the queue with fresh attempts: an activity gets
        its retry policy's budget again (not one a drain's release added to its last life).

        Raises:
            NotFound: no such dead letter.
            FailedPrecondition: it was already requeued.
        """
        await conn.fetchrow(Q["lock_run_of_dead_letter"], dead_letter_id)
        row = await conn.fetchrow(Q["mark_requeue"], dead_letter_id)
        if row is None:
            existing = await conn.fetchrow(Q["get_dead_letter"], dead_letter_id)
            if existing is None:
                raise NotFound(f"dead letter {dead_letter_id} not found")
            raise FailedPrecondition(
                f"dead letter {dead_letter_id} was already requeued at "
                f"{existing['requeue_applied_at']}"
            )
        return await self._revive(conn, DeadLetter.from_row(row))

    async def _revive(self, conn: Connection, letter: DeadLetter) -> Task:
        # The budget of a policy that names none, as a task enqueued without one gets it.
        task = await conn.fetchrow(Q["revive_task"], letter.task_id, RetryPolicy().max_attempts)
        if task is None:
            raise FailedPrecondition(
                f"task {letter.task_id} of dead letter {letter.id} is not dead"
            )
        revived = Task.from_row(task)
        await self.notify(conn, CHANNEL_TASKS, f"{revived.kind}:{revived.type_name}")
        return revived

    async def apply_operator_requeues(self, conn: Connection, *, limit: int = 100) -> list[Task]:
        """Apply requeues an operator wrote with the runbook's ``UPDATE ... SET requeued_at``."""
        revived = []
        for row in await conn.fetch(Q["claim_operator_requeues"], limit):
            letter = DeadLetter.from_row(row)
            try:
                revived.append(await self._revive(conn, letter))
            except FailedPrecondition:
                continue  # the task is not dead any more (already revived another way)
        return revived

    # ---------------------------------------------------------------- signals

    async def add_signal(
        self,
        conn: Connection,
        run: WorkflowRun,
        name: str,
        payload: str,
        *,
        signal_type: str = "custom",
    ) -> Signal:
        """Record a signal for a run (arrival order is the id order)."""
        row = await conn.fetchrow(
            Q["insert_signal"], run.run_id, run.workflow_id, signal_type, name, payload
        )
        assert row is not None
        return Signal.from_row(row)

    async def list_signals(
        self, run_id: uuid.UUID, *, unprocessed_only: bool = False
    ) -> list[Signal]:
        """A run's signals in arrival order."""
        rows = await self.pool.fetch(Q["list_signals"], run_id, unprocessed_only)
        return [Signal.from_row(r) for r in rows]

    async def mark_signals_processed(self, conn: Connection, ids: Sequence[int]) -> None:
        """Mark signals processed."""
        if ids:
            await conn.execute(Q["mark_signals_processed"], list(ids))

    # ---------------------------------------------------------------- workers

    async def register_worker(
        self,
        worker_id: str,
        *,
        activity_types: Sequence[str],
        workflow_types: Sequence[str],
        max_concurrency: int,
        host: str = "",
        pid: int | None = None,
        version: str = "",
        incarnation: str | None = None,
    ) -> WorkerRecord:
        """Register (or re-register) a worker as active, as ``incarnation`` (the token of the
        worker process's run; None: an older worker that sends none)."""
        row = await self.pool.fetchrow(
            Q["upsert_worker"],
            worker_id,
            list(activity_types),
            list(workflow_types),
            max_concurrency,
            host,
            pid,
            version,
            incarnation,
        )
        assert row is not None
        return WorkerRecord.from_row(row)

    async def worker_heartbeat(
        self,
        worker_id: str,
        *,
        current_load: int,
        status: str = "active",
        incarnation: str | None = None,
    ) -> WorkerRecord | None:
        """Record a worker heartbeat of ``incarnation`` (None: a worker that sends no token);
        None if the worker is unknown or stopped, or lost under another incarnation
        (re-register)."""
        if status not in ("active", "draining"):
            raise ValueError(f"a live worker is active or draining, not {status!r}")
        row = await self.pool.fetchrow(
            Q["heartbeat_worker"], worker_id, current_load, status, incarnation
        )
        return None if row is None else WorkerRecord.from_row(row)

    async def worker_registered_at(self, worker_id: str) -> datetime | None:
        """When the worker's current registration was made (``started_at``), which names the
        incarnation of a worker that sends no token; None if it never registered."""
        registered_at: datetime | None = await self.pool.fetchval(
            Q["worker_registered_at"], worker_id
        )
        return registered_at

    async def lock_worker_registration(
        self, conn: Connection, worker_id: str
    ) -> WorkerRegistration | None:
        """The worker's current registration, its row locked until ``conn``'s transaction
        ends, so that no registration of the worker lands meanwhile; None if it never
        registered."""
        row = await conn.fetchrow(Q["lock_worker_registration"], worker_id)
        return None if row is None else WorkerRegistration.from_row(row)

    async def stop_worker(
        self,
        worker_id: str,
        *,
        lost: bool = False,
        incarnation: str | None = None,
        conn: Connection | None = None,
    ) -> WorkerRecord | None:
        """Mark a worker stopped (clean exit) or lost; None if it was not live (or, with
        ``incarnation``, if another incarnation of it is the registered one)."""
        db = conn or self.pool
        row = await db.fetchrow(
            Q["stop_worker"], worker_id, "lost" if lost else "stopped", incarnation
        )
        return None if row is None else WorkerRecord.from_row(row)

    async def mark_lost_workers(self, *, missed_after: float) -> list[str]:
        """Mark workers silent for ``missed_after`` seconds as lost; return their ids."""
        rows = await self.pool.fetch(Q["mark_lost_workers"], missed_after)
        return [r["id"] for r in rows]

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        """One worker's registration, or None."""
        row = await self.pool.fetchrow(Q["get_worker"], worker_id)
        return None if row is None else WorkerRecord.from_row(row)

    async def list_workers(self, *, include_stopped: bool = False) -> list[WorkerRecord]:
        """Workers, newest first."""
        rows = await self.pool.fetch(Q["list_workers"], include_stopped)
        return [WorkerRecord.from_row(r) for r in rows]

    # ---------------------------------------------------------------- circuit breakers

    async def _locked_breaker(self, conn: Connection, key: str) -> breaker_math.BreakerState:
        await conn.execute(Q["ensure_breaker"], key)
        row = await conn.fetchrow(Q["lock_breaker"], key)
        assert row is not None
        return _breaker_from_row(row)

    async def _save_breaker(
        self, conn: Connection, state: breaker_math.BreakerState
    ) -> breaker_math.BreakerState:
        row = await conn.fetchrow(
            Q["save_breaker"],
            state.key,
            state.state,
            state.failure_count,
            state.success_count,
            state.probes_in_flight,
            state.window_started_at,
            state.opened_at,
            state.last_failure_at,
            list(state.recent_failures),
        )
        assert row is not None
        return _breaker_from_row(row)

    async def record_breaker_outcome(
        self,
        conn: Connection,
        key: str,
        *,
        success: bool,
        config: breaker_math.BreakerConfig,
        claimed_at: datetime | None,
    ) -> breaker_math.BreakerState:
        """Apply one success or failure to a breaker atomically (row lock + pure transition).

        ``claimed_at`` is when the task was claimed: a failure of one claimed before the
        breaker last opened was no probe's and moves nothing (`breaker.is_probe`)."""
        state = await self._locked_breaker(conn, key)
        now = await self.now(conn)
        new = (
            breaker_math.on_success(state, config, now)
            if success
            else breaker_math.on_failure(state, config, now, claimed_at=claimed_at)
        )
        return await self._save_breaker(conn, new)

    async def lock_breakers(self, conn: Connection, keys: Iterable[str], *, create: bool) -> None:
        """Lock the breakers of ``keys`` in key order, as a transaction that is about to lock
        runs does first (failing an attempt takes its breaker, then its run): with
        ``create``, every one (made closed where missing, as a recorded outcome makes it);
        without, only those not closed (the ones a released probe may write)."""
        if not create:
            await conn.execute(Q["lock_unclosed_breakers_of"], sorted(set(keys)))
            return
        for key in sorted(set(keys)):
            await self._locked_breaker(conn, key)

    async def record_breaker_success_if_tracked(
        self, conn: Connection, key: str, *, config: breaker_math.BreakerConfig
    ) -> None:
        """Apply a success to a breaker that is not closed (a closed one has nothing to learn
        from a success, so the common path costs one indexed read and no write)."""
        row = await conn.fetchrow(Q["lock_unclosed_breaker"], key)
        if row is None:
            return
        now = await self.now(conn)
        await self._save_breaker(conn, breaker_math.on_success(_breaker_from_row(row), config, now))
        # A probe slot was freed (or the breaker closed): held tasks may go now.
        await self.notify(conn, CHANNEL_TASKS, "*")

    async def release_probe(self, conn: Connection, task: Task) -> None:
        """Free the probe slot of a half-open breaker if the claimed activity ``task`` was its
        probe and ends without a verdict (cancelled, released, reclaimed); held tasks may go."""
        if not task.may_be_probe:
            return
        key = task.effective_breaker_key
        if await conn.fetchval(Q["release_probe"], key, task.claimed_at) is not None:
            await self.notify(conn, CHANNEL_TASKS, "*")

    async def admit_probe(
        self, conn: Connection, key: str, config: breaker_math.BreakerConfig
    ) -> bool:
        """Count one more probe of a half-open breaker if it has a slot (atomic)."""
        state = await self._locked_breaker(conn, key)
        admitted, new = breaker_math.admit(state, config, await self.now(conn))
        if new != state:
            await self._save_breaker(conn, new)
        return admitted

    async def unclaim(self, conn: Connection, task: Task | TaskRef) -> None:
        """Return a just-claimed task to the queue without charging its attempt (nothing if
        it is no longer under the lease it was claimed with)."""
        await self._unless_superseded(
            conn, task, partial(conn.execute, Q["unclaim_task"], task.task_id, task.lease_token)
        )
        await self.notify(conn, CHANNEL_TASKS, f"{task.kind}:{task.type_name}")

    async def _unless_superseded(
        self, conn: Connection, task: Task | TaskRef, statement: Callable[[], Awaitable[T]]
    ) -> T | Row | None:
        """Run ``statement``, which makes the claimed ``task`` pending again (or closes a
        workflow task whose run has another one pending), in a savepoint when ``task`` is a
        workflow task: another transaction (a signal's) may have made a workflow task of the
        run pending and not committed yet, which the statement sees only as a unique violation
        once it commits. The task is then closed, as superseded, and its row returned."""
        if task.kind != "workflow":
            return await statement()
        try:
            async with conn.transaction():  # a savepoint
                return await statement()
        except AlreadyExists:
            return await conn.fetchrow(Q["close_superseded_task"], task.task_id, task.lease_token)

    async def get_breaker(self, key: str) -> breaker_math.BreakerState:
        """A breaker's state (closed if it has never seen a failure)."""
        async with self.pool.transaction() as conn:
            return await self._locked_breaker(conn, key)

    async def list_breakers(self) -> list[BreakerRecord]:
        """Every breaker by key, with when its row last changed."""
        return [BreakerRecord.from_row(r) for r in await self.pool.fetch(Q["list_breakers"])]

    # ---------------------------------------------------------------- schedules

    async def lock_schedule(self, conn: Connection, schedule_id: str) -> ScheduleRecord | None:
        """A schedule, its row locked (None: there is none)."""
        row = await conn.fetchrow(Q["lock_schedule"], schedule_id)
        return None if row is None else ScheduleRecord.from_row(row)

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        """A schedule (None: there is none)."""
        row = await self.pool.fetchrow(Q["get_schedule"], schedule_id)
        return None if row is None else ScheduleRecord.from_row(row)

    async def insert_schedule(
        self,
        conn: Connection,
        schedule_id: str,
        definition: ScheduleDefinition,
        *,
        next_fire_at: datetime,
        paused: bool = False,
    ) -> ScheduleRecord | None:
        """Create the schedule, ``paused`` or not; None when its id is taken. Wakes the
        due-scanners."""
        row = await conn.fetchrow(
            Q["insert_schedule"], schedule_id, *definition, next_fire_at, paused
        )
        return None if row is None else ScheduleRecord.from_row(row)

    async def replace_schedule(
        self,
        conn: Connection,
        schedule_id: str,
        definition: ScheduleDefinition,
        *,
        next_fire_at: datetime,
    ) -> ScheduleRecord | None:
        """Replace the definition of a schedule the caller has locked (paused or not, it stays
        so). Wakes the due-scanners."""
        row = await conn.fetchrow(Q["replace_schedule"], schedule_id, *definition, next_fire_at)
        return None if row is None else ScheduleRecord.from_row(row)

    async def pause_schedule(
        self,
        conn: Connection,
        schedule_id: str,
        *,
        paused: bool,
        next_fire_at: datetime | None,
        reason: str | None = None,
    ) -> ScheduleRecord | None:
        """Pause or resume a schedule (resumed: its next firing is ``next_fire_at``;
        ``reason``: why the control plane paused it)."""
        row = await conn.fetchrow(Q["pause_schedule"], schedule_id, paused, next_fire_at, reason)
        return None if row is None else ScheduleRecord.from_row(row)

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule; False when there was none."""
        return await self.pool.fetchval(Q["delete_schedule"], schedule_id) is not None

    async def list_schedules(self, *, after: str | None, limit: int) -> list[ScheduleRecord]:
        """Schedules by id, those after ``after``, at most ``limit``."""
        rows = await self.pool.fetch(Q["list_schedules"], after, limit)
        return [ScheduleRecord.from_row(r) for r in rows]

    async def lock_due_schedules(
        self, conn: Connection, *, due_by: datetime, limit: int
    ) -> list[ScheduleRecord]:
        """Lock schedules that are not paused and were due by ``due_by`` (those another
        transaction holds are skipped), in due order."""
        rows = await conn.fetch(Q["lock_due_schedules"], limit, due_by)
        return [ScheduleRecord.from_row(r) for r in rows]

    async def workflow_id_open(self, conn: Connection, workflow_id: str) -> bool:
        """Whether ``workflow_id`` has an open run."""
        return bool(await conn.fetchval(Q["workflow_id_open"], workflow_id))

    async def advance_schedule(
        self,
        conn: Connection,
        schedule: ScheduleRecord,
        *,
        next_fire_at: datetime,
        run: WorkflowRun | None,
        fired_at: datetime,
        created: bool = False,
    ) -> ScheduleRecord:
        """Record a firing of a locked schedule for ``fired_at``: its run (``created``: started
        by it, else found open under its workflow id), or none (skipped). Returns the schedule
        as recorded."""
        row = await conn.fetchrow(
            Q["advance_schedule"],
            schedule.schedule_id,
            next_fire_at,
            run.workflow_id if run else None,
            run.run_id if run else None,
            fired_at,
            created,
        )
        assert row is not None  # its row is locked
        return ScheduleRecord.from_row(row)

    async def reset_breaker(self, key: str) -> None:
        """Close a breaker and forget its counts (idempotent).

        A key with no row is a closed breaker already (it has no counts to forget), so a
        retried reset, a second one or one of a key never seen succeeds without a change.
        """
        async with self.pool.transaction() as conn:
            if await conn.fetchval(Q["delete_breaker"], key) is None:
                return  # closed already: nothing is held, nobody to wake
            # Its held tasks may run now: wake every claimer (a breaker key need not be a type).
            await self.notify(conn, CHANNEL_TASKS, "*")

    async def admit_breakers(
        self, conn: Connection, config: breaker_math.BreakerConfig
    ) -> tuple[list[str], dict[str, int]]:
        """Decide, atomically, which breaker keys may hand out tasks now.

        Returns:
            The keys that are blocked, and for half-open keys the number of probes they may
            still admit (the caller claims at most that many and reports them with
            `start_probes`).
        """
        blocked: list[str] = []
        probes: dict[str, int] = {}
        rows = await conn.fetch(Q["lock_unclosed_breakers"])
        if not rows:
            return blocked, probes
        now = await self.now(conn)
        for row in rows:
            state = _breaker_from_row(row)
            budget = breaker_math.probe_budget(state, config, now)
            if budget is None:
                continue
            if budget == 0:
                blocked.append(state.key)
            else:
                probes[state.key] = budget
        return blocked, probes


def _histories(rows: Sequence[Any]) -> dict[uuid.UUID, list[StoredEvent]]:
    """The histories a statement brought with the workflow tasks it handed out (parallel
    arrays per row), for the runs still open."""
    return {
        r["run_id"]: [
            StoredEvent(*event)
            for event in zip(
                r["seqs"] or (),
                r["types"] or (),
                r["payloads"] or (),
                r["times"] or (),
                strict=True,
            )
        ]
        for r in rows
        if r["kind"] == "workflow" and r["run_open"]
    }


def _eager_flags(eager: Sequence[bool], count: int, eager_for: str | None) -> list[bool]:
    """One flag per activity: which go straight to ``eager_for`` (none without a worker)."""
    flags = list(eager)[:count] if eager_for is not None else []
    return flags + [False] * (count - len(flags))


def _in_claim_order(rows: Sequence[Any]) -> list[Task]:
    # UPDATE ... RETURNING gives no order: hand tasks out as the claim ranked them.
    return sorted((Task.from_row(r) for r in rows), key=lambda t: (-t.priority, t.visible_at))


def _breaker_from_row(row: Any) -> breaker_math.BreakerState:
    return BreakerRecord.from_row(row).breaker
