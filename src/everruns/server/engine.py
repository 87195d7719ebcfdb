"""The control plane's engine: what each request does to the durable state, one transaction each.

Every change that belongs together happens in one transaction: a workflow task's commands are
applied whole or not at all (events, activity tasks, timers, child runs, status); an activity's
result is recorded together with the event that wakes its workflow. Every task operation is
fenced by the task's lease. The engine knows nothing about gRPC (the services translate) and
decides no policy the pure core owns (retry delays, breaker transitions).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import attrs
import trio

from everruns._aio.pg import Connection, sqlstate_of
from everruns.domain import history as ev
from everruns.domain.breaker import BreakerConfig
from everruns.domain.budget import text_bytes
from everruns.domain.commands import (
    CancelTimer,
    CancelWorkflow,
    Command,
    CompleteWorkflow,
    ContinueAsNewWorkflow,
    FailWorkflow,
    RecordPatch,
    ScheduleActivity,
    StartChildWorkflow,
    StartTimer,
    command_from_dict,
)
from everruns.domain.cron import Spec, check_overlap, parse_spec
from everruns.domain.lease import timeout_kind
from everruns.domain.limits import check_name, check_type_name, shown
from everruns.domain.parts import split_keeping_keys
from everruns.domain.payload import decode, encode_text, json_error
from everruns.domain.replay import continues_decision, superseded_by, unseen_input
from everruns.domain.retry import RetryPolicy
from everruns.errors import (
    NOT_SERVED_ERROR,
    WORKER_SHUTDOWN_ERROR,
    AlreadyExists,
    DatabaseError,
    EverrunsError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StaleLease,
)
from everruns.server.claims import CLAIM_LIMIT_SECONDS, ClaimGroups, claim_overran
from everruns.server.config import ServerConfig
from everruns.server.notifier import Notifier, TaskInterest
from everruns.store.models import (
    Incarnation,
    ScheduleDefinition,
    ScheduleRecord,
    StoredEvent,
    Task,
    TaskRef,
    WorkflowRun,
)
from everruns.store.store import (
    Continuation,
    Decision,
    DecisionAhead,
    FailOutcome,
    NewEvent,
    NewTask,
    RunEnd,
    Store,
)

__all__ = ["ClaimedTask", "DutySkip", "Engine", "Skipped", "StartRequest", "StartedRun"]

log = logging.getLogger("everruns.server")

START_STATEMENT_ROWS = 500
"""Starts per statement of a batch; a larger batch is split into statements that run side by
side (at 1,000 starts on PostgreSQL 15 here, two statements of 500 at once took 73-94 ms
against 127-145 ms for one of 1,000)."""
START_STATEMENTS_AT_ONCE = 4
_NONE_STARTED: Mapping[str, uuid.UUID] = {}  # no activities started ahead
_START_SEQUENCE = 1  # the sequence number of a run's first event, its start
_RELEASE_ROUNDS = 4  # looks at a lost worker's tasks, at most (`release_worker`)
_GIVE_BACK_SECONDS = 5.0  # bounded cleanup: tasks handed to a poll that left go back
SERVED_FRESH_SECONDS = 60.0
"""How long the control plane trusts what it remembers a worker serves (`Engine._served_by`)
without reading its registration again: a safety net, since a registration on any control
plane makes every other forget the worker at once (NOTIFY), and a lost LISTEN connection makes
it forget every worker."""


class StartRequest(NamedTuple):
    """One run to start. A tuple: a batch makes one per start, at a third of an attrs
    class's cost."""

    workflow_type: str
    input: str  # exact JSON text
    workflow_id: str | None = None
    # The run id a request asks for (`request_run_id`): if that run exists, whatever its
    # state, it is the answer and nothing starts, so a retried request cannot start twice.
    run_id: uuid.UUID | None = None


CAPACITY_LOCK = 0x6576_0003
"""Advisory lock under which a start counts the queue and inserts (EVERRUNS_MAX_PENDING_TASKS);
beside the duties' locks (`duties.RECLAIM_LOCK`, `duties.RETENTION_LOCK`)."""

MAX_SCHEDULE_ID_LENGTH = 491
"""The longest schedule id: a firing's workflow id is the schedule id, '@' and the firing's UTC
time (`schedule_workflow_id`), within `MAX_NAME_LENGTH`."""

_FIRE_BATCH = 50
"""Due schedules fired in one transaction, each in a savepoint: under the 64 subtransactions
PostgreSQL keeps in a backend's cache (beyond them, every snapshot taken meanwhile looks
subtransactions up on disk)."""

_REQUEST_IDS = uuid.UUID("5f0e2a6c-3b8d-4c51-9a7e-2d4b8c1f6e93")


def request_run_id(request_id: str) -> uuid.UUID | None:
    """The run id a start request's idempotency key asks for (None: no key). Derived, so that
    any text can be a key and the same key always names the same run."""
    if not request_id:
        return None
    return uuid.uuid5(_REQUEST_IDS, check_name(request_id, "request_id"))


class StartedRun(NamedTuple):
    """What starting a workflow returns: its id and the run started (or found open)."""

    workflow_id: str
    run_id: uuid.UUID


@attrs.frozen
class DutySkip:
    """What a duty was about to do to a task it had locked when it found the task's run held
    by another transaction, and the claim it judged: the follow-up does it only while the task
    is still that attempt in that state (`Engine.finish_skipped`)."""

    duty: Literal["lost", "stale", "timeout"]  # release_worker, reclaim_stale, enforce_timeouts
    attempt: int
    lease_token: int | None
    heartbeat_at: datetime | None
    reason: str = ""  # why a lost worker's tasks are released

    @classmethod
    def of(
        cls, task: Task, duty: Literal["lost", "stale", "timeout"], reason: str = ""
    ) -> DutySkip:
        return cls(duty, task.attempt, task.lease_token, task.heartbeat_at, reason)


@attrs.frozen
class Skipped:
    """A row a transaction skipped rather than wait for another transaction that held it: an
    open child run of a run ending or cancelled (``child``), an open activity task of such a
    run, or (``duty``) a task a duty had locked whose run another transaction held."""

    row_id: uuid.UUID
    child: bool
    duty: DutySkip | None = None

    @property
    def what(self) -> str:
        """What the row is and what is left to do, for a log line."""
        if self.duty is not None:
            return {
                "lost": f"lost worker's task {self.row_id}: its release is left to the stale rule",
                "stale": f"stale task {self.row_id}: its release is left to the next reclaim round",
                "timeout": f"timed-out task {self.row_id}: its timeout is left to the next round",
            }[self.duty.duty]
        if self.child:
            return f"child run {self.row_id}: its cancellation is left to the reclaim round"
        return f"activity task {self.row_id}: its cancellation is left to the reclaim round"


@attrs.frozen
class ClaimedTask:
    """A claimed task as handed to a worker (workflow tasks carry their history)."""

    task: Task
    workflow_type: str
    history: list[StoredEvent]
    claimed_at: datetime
    # Workflow tasks: the worker may start the activities its decision schedules before they
    # are recorded (a run's first workflow task, first attempt, every breaker closed).
    may_start_activities: bool = False


@attrs.frozen
class WorkflowTaskCompletion:
    """One workflow task's completion, as `Engine.complete_workflow_tasks` takes it."""

    task_id: uuid.UUID
    lease_token: int
    seen_sequence: int
    commands_json: str
    claim_time: datetime
    max_eager: int = 0
    # Activities the worker started before sending this: activity id -> the task id it chose.
    started: Mapping[str, uuid.UUID] = attrs.field(factory=dict)


@attrs.frozen
class FollowUpDecision:
    """A worker's decision, made ahead, for the workflow task an activity's result wakes
    (`Engine.complete_activities`; the checks are `continues_decision`'s)."""

    result: int  # the index of that result among those of the call
    run_id: uuid.UUID
    activity_id: str
    after_sequence: int
    after_time: datetime
    seen_sequence: int
    commands_json: str
    decided_at: datetime


def _error_dict(text: str) -> dict[str, Any]:
    try:
        value = decode(text, what="error")
    except Exception:
        value = None
    if not isinstance(value, dict):
        return {"type": "Error", "message": str(text)[:2000], "non_retryable": False}
    return value


def _check_open(run: WorkflowRun, workflow_id: str, verb: str) -> None:
    if not run.is_open:
        raise FailedPrecondition(
            f"cannot {verb} workflow {workflow_id!r}: it has already ended {run.status}"
        )


class Engine:
    """Durable operations the control plane serves."""

    schedules_fired_by: datetime | None = None
    """When the last call of `fire_due_schedules` began: what was due by then and is due still
    is held by another transaction (`Store.seconds_until_due`)."""

    def __init__(self, store: Store, config: ServerConfig, notifier: Notifier) -> None:
        self.store = store
        self.config = config
        self.notifier = notifier
        self.breakers = BreakerConfig()
        # Whether some breaker may be open or half-open: then claims take the careful path
        # (probe accounting). A stale "no" only delays half-open probes, since the fast claim
        # never hands out tasks of an unclosed breaker.
        self._unclosed_for_claims = _UnclosedBreakers(self.store)
        # The same question for workflow tasks handed out (`_breakers_closed`), asked on its
        # own clock so that it never delays what claims learn.
        self._unclosed_for_start_ahead = _UnclosedBreakers(self.store)
        # What each worker serves, (activity types, workflow types, when read): it decides
        # which tasks are handed to a worker unasked (eager dispatch, follow-up claims), so it
        # must follow re-registrations made on other control planes (`_forget_served`).
        self._served: dict[str, tuple[frozenset[str], frozenset[str], float]] = {}
        self._served_epoch = 0  # bumped by every change: a read begun before is not kept
        notifier.watch_registrations(self._forget_served)
        # With EVERRUNS_MAX_PENDING_TASKS, a start's count and its insert are one step: one
        # start at a time per control plane waits for the database's lock (`_within_capacity`),
        # the others here, holding no connection.
        self._capacity = trio.Lock()
        self._claims: ClaimGroups[
            tuple[tuple[str, ...], tuple[str, ...]], Task, dict[uuid.UUID, list[StoredEvent]]
        ] = ClaimGroups(self._claim_slots)
        # Open children and activity tasks a run's end or cancellation skipped (another
        # transaction held them), for `skipped`: cancelled as soon as that transaction lets go.
        self._skipped: set[Skipped] = set()
        self._skipped_added = trio.Event()

    # ------------------------------------------------------------------ input checks

    def check_payload(self, text: str, what: str) -> str:
        """Validate a client payload: size limit and JSON syntax. Returns it unchanged."""
        _check_size(self.config, text, what)
        error = json_error(text)
        if error is not None:
            raise InvalidArgument(f"{what} is not valid JSON: {error}")
        return text

    @asynccontextmanager
    async def _within_capacity(self, requests: Sequence[StartRequest]) -> AsyncIterator[None]:
        """Refuse starts that would take the queue past ``EVERRUNS_MAX_PENDING_TASKS``, and
        keep the count true until they have committed: the count and the starts run under one
        transaction-scoped advisory lock, shared by every control plane on the database (each
        plane's starts queue for it one at a time, holding no connection while they wait).
        Only the starts that would add a run count: one whose workflow id has an open run, or
        whose request id names a run already, returns that run and adds nothing, and the
        starts of a batch that name one new workflow id add one run between them."""
        limit = self.config.max_pending_tasks
        if not limit:
            yield
            return
        async with self._capacity, self.store.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CAPACITY_LOCK)
            adding = await self.store.count_new_runs(
                conn, [(r.workflow_id or None, r.run_id) for r in requests]
            )
            if adding and await self.store.count_pending(conn) + adding > limit:
                raise self._queue_full()
            yield

    def _queue_full(self) -> ResourceExhausted:
        """What a start refused under ``EVERRUNS_MAX_PENDING_TASKS`` raises."""
        return ResourceExhausted(
            f"{self.config.max_pending_tasks} tasks are already waiting "
            "(EVERRUNS_MAX_PENDING_TASKS); retry later"
        )

    # ------------------------------------------------------------------ starting

    async def start_workflows(
        self, requests: Sequence[StartRequest]
    ) -> list[tuple[StartedRun, bool]]:
        """Start runs (idempotent per open workflow id): one run handed to a waiting poll
        (`_start_handed`), or in statements of up to `START_STATEMENT_ROWS`."""
        types: set[str] = set()  # a batch names a few types for many starts: each is checked once
        for request in requests:
            if request.workflow_type not in types:
                check_type_name(request.workflow_type, "workflow_type")
                types.add(request.workflow_type)
            if request.workflow_id is not None:
                check_name(request.workflow_id, "workflow_id")
            self.check_payload(request.input, "input")
        rows = [(r.workflow_id or "", r.workflow_type, r.input, r.run_id) for r in requests]
        async with self._within_capacity(requests):
            taker = (
                self.notifier.reserve_claimer(f"workflow:{rows[0][1]}") if len(rows) == 1 else None
            )
            if taker is not None:
                started = [await self._start_handed(rows[0], taker)]
            else:
                started = await self._start_statements(rows)
        results: list[tuple[StartedRun, bool]] = []
        for request, (workflow_id, run_id, created) in zip(requests, started, strict=True):
            if run_id is None:  # its open run ended in the same instant: start it again
                results.extend(
                    await self.start_workflows([request._replace(workflow_id=workflow_id)])
                )
            else:
                results.append((StartedRun(workflow_id, run_id), created))
        return results

    async def _start_handed(
        self, row: tuple[str, str, str, uuid.UUID | None], taker: TaskInterest
    ) -> tuple[str, uuid.UUID | None, bool]:
        """Eager start: start the run of ``row`` (as `Store.start_workflows` takes it) with
        its workflow task claimed for the worker whose long poll ``taker`` is (reserved for
        this), and hand the task to that poll, which answers at once: no NOTIFY, no claim
        statement. Returns what `Store.start_workflows` returns for the row. A task the poll
        can no longer take (it has left) goes back to the queue; one whose start was
        cancelled after its commit waits for its lease to lapse, as any claim whose answer is
        lost."""
        assert taker.worker is not None
        handed: list[ClaimedTask] = []
        if row[3] is None:  # a run id of our own: known, should the reply of the start be lost
            row = (*row[:3], uuid.uuid4())
        try:
            breakers_closed = await self._breakers_closed()  # before: the start then hands out
            try:
                workflow_id, run_id, task, history = await self.store.start_workflow_for(
                    taker.worker, *row
                )
            except DatabaseError:
                # It may have committed (the connection died before its answer came): its
                # task, claimed for the waiting poll, which will not get it, goes back.
                assert row[3] is not None
                with trio.move_on_after(_GIVE_BACK_SECONDS, shield=True):
                    try:
                        await self._give_back(
                            await self.store.claimed_first_task_of(row[3], taker.worker)
                        )
                    except DatabaseError:
                        pass  # the stale rule frees it
                raise
            if task is not None:
                assert task.claimed_at is not None
                may_start = breakers_closed and _starts_afresh(task, history)
                handed.append(
                    ClaimedTask(task, task.type_name, history, task.claimed_at, may_start)
                )
        finally:
            if not self.notifier.settle(taker, handed):
                await self._give_back(handed)
        return workflow_id, run_id, task is not None

    async def give_back_undelivered(self, handed: Sequence[TaskRef]) -> None:
        """Give back the tasks a reply handed out that its caller never took: it gave up on
        the call as the reply was made, or the reply could not be sent (`Undelivered`). Those
        still under the lease the reply carried go back to the queue, their attempt
        uncharged, at once instead of after the stale rule."""
        log.info("giving back %d task(s) of a reply its caller did not take", len(handed))
        await self._give_back(handed)

    async def _give_back(self, handed: Sequence[ClaimedTask | Task | TaskRef]) -> None:
        """Return tasks claimed for a call that did not take them (a poll that ended, a reply
        that was not sent) to the queue, their attempt uncharged (NOTIFY wakes another
        claimer). One no longer under the lease it was claimed with is left alone. Shielded
        and bounded (`_GIVE_BACK_SECONDS`): callers give back from their cleanup."""
        if not handed:
            return
        tasks = [c.task if isinstance(c, ClaimedTask) else c for c in handed]
        with trio.move_on_after(_GIVE_BACK_SECONDS, shield=True):
            try:
                async with self.store.transaction() as conn:
                    # Tasks in id order, then breakers in key order, as every transaction
                    # that holds several takes them. A handed-out activity of a half-open
                    # breaker was its probe: going back unjudged, it frees the probe's slot
                    # (`Store.release_probe`; the breaker stayed half-open for good before).
                    probes: list[Task] = []
                    for task in sorted(tasks, key=lambda t: t.task_id):
                        if task.kind == "activity" and task.lease_token is not None:
                            held = await self.store.lock_claim(conn, task.task_id, task.lease_token)
                            if held is None:  # no longer this claim: left alone
                                continue
                            probes.append(held)
                        await self.store.unclaim(conn, task)
                    for held in sorted(probes, key=lambda t: (t.effective_breaker_key, t.task_id)):
                        await self.store.release_probe(conn, held)
            except EverrunsError as exc:  # their leases lapse and the reclaimer frees them
                log.warning(
                    "could not give back %d task(s) claimed for a call: %s", len(handed), exc
                )

    async def _start_statements(
        self, rows: list[tuple[str, str, str, uuid.UUID | None]]
    ) -> list[tuple[str, uuid.UUID | None, bool]]:
        """`Store.start_workflows` for ``rows``: one statement, or for more than
        `START_STATEMENT_ROWS` several, up to `START_STATEMENTS_AT_ONCE` at a time, each in its
        own transaction (PostgreSQL runs a statement on one core). The rows of one workflow id
        share a statement. If one fails, no further one begins, those running finish, and its
        error is raised: the runs the others started stand (as after a lost reply, a retry
        with workflow ids finds them)."""
        parts = split_keeping_keys([row[0] for row in rows], START_STATEMENT_ROWS)
        if len(parts) <= 1:
            return await self.store.start_workflows(rows)
        started: list[tuple[str, uuid.UUID | None, bool]] = [("", None, False)] * len(rows)
        failures: list[EverrunsError] = []
        limiter = trio.CapacityLimiter(START_STATEMENTS_AT_ONCE)

        async def start_part(part: list[int]) -> None:
            async with limiter:
                if failures:
                    return
                try:
                    done = await self.store.start_workflows([rows[n] for n in part])
                except EverrunsError as exc:  # raised once the others have ended (not as a group)
                    failures.append(exc)
                    return
            for n, one in zip(part, done, strict=True):
                started[n] = one

        async with trio.open_nursery() as nursery:
            for part in parts:
                nursery.start_soon(start_part, part)
        if failures:
            raise failures[0]
        return started

    async def _start(
        self,
        conn: Connection,
        request: StartRequest,
        *,
        parent: WorkflowRun | None = None,
        child_id: str | None = None,
        continues: WorkflowRun | None = None,
        then: Sequence[NewEvent] = (),
    ) -> tuple[WorkflowRun, bool]:
        """Create a run (with ``request.run_id`` if given) and its start, or find the open run
        of its workflow id; ``continues``: the run it goes on from (`_continue`), ``then``: the
        events that follow its start (the signals it carries)."""
        workflow_id = request.workflow_id or str(uuid.uuid4())
        run, created = await self.store.create_workflow(
            conn,
            workflow_id=workflow_id,
            workflow_type=request.workflow_type,
            input=request.input,
            run_id=request.run_id,
            parent_run_id=parent.run_id if parent else None,
            parent_child_id=child_id,
        )
        if created:
            started = ev.workflow_started(
                request.workflow_type,
                workflow_id,
                str(run.run_id),
                None,
                parent=(
                    {"workflow_id": parent.workflow_id, "run_id": str(parent.run_id)}
                    if parent
                    else None
                ),
                continued_from=str(continues.run_id) if continues else None,
            )
            events = [NewEvent.of(started, input=request.input), *then]
            await self.store.append_events(conn, run, events, expected_last=0)
            await self.store.ensure_workflow_task(conn, run)
        return run, created

    # ------------------------------------------------------------------ lookups

    async def find_run(
        self,
        workflow_id: str,
        run_id: str = "",
        *,
        conn: Connection | None = None,
    ) -> WorkflowRun:
        """The run named by workflow id and optional run id (latest run when empty)."""
        check_name(workflow_id, "workflow_id")
        return await self.store.get_workflow(workflow_id, _run_uuid(run_id), conn=conn)

    async def _lock_open(
        self, conn: Connection, workflow_id: str, run_id: str, verb: str
    ) -> WorkflowRun:
        run = await self._locked(conn, workflow_id, run_id)
        _check_open(run, workflow_id, verb)
        return run

    async def _locked(self, conn: Connection, workflow_id: str, run_id: str) -> WorkflowRun:
        """The run named, locked; for a run that continued as new, the run its workflow goes
        on in (a signal or cancel sent to a handle of an earlier run of the chain reaches the
        open one)."""
        run = await self.find_run(workflow_id, run_id, conn=conn)
        while True:
            while run.continued_run_id is not None:
                run = await self.store.get_run(run.continued_run_id, conn=conn)
            locked = await self.store.lock_run(conn, run.run_id)
            if locked.continued_run_id is None:
                return locked
            run = locked  # it continued while this waited for its lock

    # ------------------------------------------------------------------ signals and cancel

    async def signal(self, workflow_id: str, run_id: str, name: str, payload: str) -> None:
        """Deliver a signal to an open run."""
        check_name(name, "signal name")
        self.check_payload(payload, "signal payload")
        async with self.store.transaction() as conn:
            run = await self._lock_open(conn, workflow_id, run_id, "signal")
            await self.store.add_signal(conn, run, name, payload)
            event = NewEvent.of(ev.signal_received(name, None), payload=payload)
            await self.store.append_events(conn, run, [event])
            await self.store.ensure_workflow_task(conn, run)

    async def cancel(self, workflow_id: str, run_id: str, reason: str) -> None:
        """Request cancellation of an open run: its code sees the request, its activities are
        cancelled (pending ones at once, running ones on their workers)."""
        async with self.store.transaction() as conn:
            run = await self._locked(conn, workflow_id, run_id)
            if run.status == "cancelled" and run.cancel_requested_at is not None:
                return  # requested before and done: cancelling is idempotent
            _check_open(run, workflow_id, "cancel")
            await self._request_cancel(conn, run, reason)

    async def _request_cancel(self, conn: Connection, run: WorkflowRun, reason: str) -> None:
        """Record a cancel request on a locked open run, cancel its activities, and pass the
        request on to its open children (a cancelled parent does not leave orphans running;
        those another transaction holds are cancelled later: `_cancel_children`)."""
        if run.cancel_requested_at is not None:
            return  # already requested: cancelling is idempotent
        if run.started_at is None and not await self.store.workflow_task_held(conn, run.run_id):
            # No worker ever picked it up (a type no worker serves, say): no code ran that
            # could see the request, so the run ends cancelled here, freeing its workflow id.
            await self.store.request_run_cancel(conn, run.run_id)
            await self.store.append_events(
                conn,
                run,
                [
                    NewEvent.of(ev.workflow_cancel_requested(reason)),
                    NewEvent.of(ev.workflow_cancelled()),
                ],
            )
            ended = await self.store.end_run(conn, run.run_id, "cancelled")
            await self._after_end(conn, ended, RunEnd("cancelled"))
            return
        await self.store.add_signal(conn, run, "cancel", "null", signal_type="cancel")
        await self.store.request_run_cancel(conn, run.run_id)
        events = [NewEvent.of(ev.workflow_cancel_requested(reason))]
        events += await self._cancel_activities(conn, run)
        await self.store.append_events(conn, run, events)
        await self.store.ensure_workflow_task(conn, run)
        await self._cancel_children(conn, run, f"parent workflow {run.workflow_id!r} was cancelled")

    async def _cancel_activities(self, conn: Connection, run: WorkflowRun) -> list[NewEvent]:
        """Cancel the open activities of a run this transaction holds (flag the claimed ones),
        never waiting for one: the results statement holds an activity's task and then waits
        for its run, so waiting for a task while holding the run deadlocked with it. A task
        another transaction holds is skipped here and cancelled once that transaction lets
        go, by `cancel_if_abandoned` from `duties.run_follow_ups`; should this control plane
        stop first, by the reclaim round's sweep (`cancel_abandoned_activities`), which finds
        it by the record of its skip this transaction writes. Returns the events of the tasks
        cancelled here."""
        tasks, skipped = await self.store.lock_open_activities(conn, run.run_id)
        await self.store.remember_skipped(conn, run.run_id, skipped, children=False)
        events = [
            await self._cancel_activity(conn, task)
            for task in tasks
            if not task.requeue_count  # an operator's requeue runs whatever its run does
        ]
        self._follow_up(Skipped(task_id, child=False) for task_id in skipped)
        return events

    async def _cancel_activity(self, conn: Connection, task: Task) -> NewEvent:
        """Cancel a locked open activity task: a pending one at once, a claimed one by asking
        its holder to stop. Returns the event that records it."""
        assert task.activity_id is not None
        if task.status == "pending":
            await self.store.cancel_task(conn, task.task_id)
            return NewEvent.of(ev.activity_cancelled(task.activity_id))
        await self.store.request_task_cancel(conn, task)
        return NewEvent.of(ev.activity_cancel_requested(task.activity_id))

    async def cancel_if_abandoned(self, task_id: uuid.UUID, *, wait: bool) -> bool:
        """Cancel an open activity task that its run's end or cancel request skipped (another
        transaction held it), unless an operator requeued it or it was flagged already; return
        whether this call cancelled it. Its event goes into the run's history while the run
        is open (an ended run's records no more), with a workflow task to see it.

        One transaction: it locks the task (with ``wait``, waiting for whoever holds it;
        without, leaving a task another transaction holds alone), then its run, waiting, as
        the results statement does: so it sees the run as the transaction that skipped the
        task left it. Nothing waits for a task while holding its run. The skip's record
        (`Store.remember_skipped`, written by the transaction that skipped the
        task) is settled here: found, that transaction committed; missing, it rolled back (an
        end that failed, whose run stays open with perhaps an earlier cancel request that
        the code answered with this very task: a clean-up activity, left to run) or another
        call settled it."""
        async with self.store.transaction() as conn:
            task = await self.store.lock_open_task(conn, task_id, wait=wait)
            if task is None:  # closed meanwhile, or (without ``wait``) held by another
                await self.store.forget_skipped_if_closed(conn, task_id)
                return False
            try:
                run = await self.store.lock_run(conn, task.run_id)
            except NotFound:
                return False  # gone, with its tasks and their records
            if not await self.store.forget_skipped(conn, task_id):
                return False
            if (
                task.activity_id is None
                or task.requeue_count
                or task.cancel_requested_at is not None
            ):
                return False
            event = await self._cancel_activity(conn, task)
            if run.is_open:
                await self.store.append_events(conn, run, [event])
                await self.store.ensure_workflow_task(conn, run)
            return True

    async def cancel_abandoned_activities(self, *, batch: int = 200) -> int:
        """The reclaim round's sweep: cancel the activity tasks a run's end or cancel request
        skipped and nobody came back to (the control plane that skipped them stopped before
        its follow-up, say). It reads the skips' records alone, never the queue. Each task is
        its own transaction, which leaves a task another transaction holds alone (found again
        next round). Returns how many it cancelled."""
        cancelled = await self._sweep(
            self.store.find_abandoned_activities, self.cancel_if_abandoned, batch
        )
        if cancelled:
            log.warning("cancelled %d activity task(s) their run left open", cancelled)
        return cancelled

    # ------------------------------------------------------------------ claiming

    async def poll(
        self,
        worker_id: str,
        *,
        workflow_types: Sequence[str],
        activity_types: Sequence[str],
        max_tasks: int,
        wait_s: float,
    ) -> list[ClaimedTask]:
        """Claim up to ``max_tasks`` tasks, waiting up to ``wait_s`` for one to appear.

        The wait is woken by NOTIFY (new or released tasks) and by the due-scanner (delayed
        tasks becoming visible), never by polling; or it ends with the workflow task a start
        claimed for this worker and handed to it (eager start, `_start_handed`).
        """
        if max_tasks <= 0:
            return []
        keys = _claim_keys(workflow_types, activity_types)
        with self.notifier.claim_interest(keys, worker_id) as interest:
            claimed: list[ClaimedTask] = []
            try:
                with trio.move_on_after(max(0.0, wait_s)):
                    woken = False
                    while True:
                        claimed = await self._claim_unless_quiet(
                            interest,
                            worker_id,
                            workflow_types,
                            activity_types,
                            max_tasks,
                            woken=woken,
                        )
                        if claimed:
                            break
                        if not interest.event.is_set():  # not poked while we were claiming
                            await interest.wait()
                        if interest.handed:
                            break
                        woken = interest.woken_by is not None
                        interest.rearm()
                if not claimed:
                    if interest.reserved:  # a start is handing this poll its task: wait for it
                        await interest.wait()
                    claimed = interest.take()
                # The claim is shielded (it finishes once begun), so the poll may have been
                # cancelled meanwhile (its worker's connection dropped, say): no reply will
                # carry these tasks, and `release_worker` may have looked already. They go
                # back (below), not left claimed for a gone worker until the stale rule.
                await trio.lowlevel.checkpoint_if_cancelled()
                return claimed
            except BaseException:
                await self._give_back(claimed)
                raise
            finally:
                if interest.handed:  # handed over but not taken: this poll was cancelled
                    await self._give_back(interest.take())

    async def _claim_unless_quiet(
        self,
        interest: TaskInterest | None,
        worker_id: str,
        workflow_types: Sequence[str],
        activity_types: Sequence[str],
        limit: int,
        *,
        woken: bool,
    ) -> list[ClaimedTask]:
        """Claim, unless a running or recent claim of the same keys makes it pointless (a
        claimer woken for a new task always claims: several are woken for several tasks).

        A claim that left claimable tasks behind wakes the next claimer of each key (not
        itself), which claims in turn.
        """
        keys = (
            interest.keys if interest is not None else _claim_keys(workflow_types, activity_types)
        )
        if not woken and not self.notifier.claim_needed(keys):
            return []
        stamps = self.notifier.claim_started(keys)
        drained = False
        try:
            # A claim that has begun finishes, and its tasks are handed out: cancelled midway
            # (the poll's wait ending, say), it could commit and hand nothing out, leaving its
            # tasks claimed by a worker that never heard of them until stale reclamation.
            with trio.move_on_after(CLAIM_LIMIT_SECONDS, shield=True) as scope:
                claimed, more = await self._claim(worker_id, workflow_types, activity_types, limit)
            if scope.cancelled_caught:
                raise claim_overran(CLAIM_LIMIT_SECONDS)
            drained = not more
        finally:
            self.notifier.claim_ended(stamps, drained=drained, claimer=interest)
        return claimed

    async def _claim(
        self,
        worker_id: str,
        workflow_types: Sequence[str],
        activity_types: Sequence[str],
        limit: int,
    ) -> tuple[list[ClaimedTask], bool]:
        """Claim up to ``limit`` tasks; also returns whether claimable tasks may be left."""
        if activity_types and await self._breakers_may_be_unclosed():
            async with self.store.transaction() as conn:
                blocked, probes = await self.store.admit_breakers(conn, self.breakers)
            tasks = await self.store.claim_tasks(
                worker_id,
                workflow_types=workflow_types,
                activity_types=activity_types,
                limit=limit,
                blocked_keys=blocked,
            )
            more = len(tasks) == limit  # this claim cannot tell: assume so
            histories = None
        else:
            key = (tuple(workflow_types), tuple(activity_types))
            claimed, more, histories = await self._claims.claim(key, worker_id, limit)
            tasks = list(claimed)
            probes = None
        try:
            if probes:
                tasks = await self._admit_probes(tasks, probes)
            return await self._hand_out(tasks, histories), more
        except BaseException:
            # Claimed (committed) but not handed out: back to the queue, not left claimed for
            # a worker that never hears of them until the stale rule charges their attempt.
            await self._give_back(tasks)
            raise

    async def _claim_slots(
        self, key: tuple[tuple[str, ...], tuple[str, ...]], slots: list[str]
    ) -> tuple[list[Task], bool, dict[uuid.UUID, list[StoredEvent]]]:
        """One claim statement for a group of claimers (`ClaimGroups`)."""
        workflow_types, activity_types = key
        return await self.store.claim_tasks_for(
            slots, workflow_types=workflow_types, activity_types=activity_types
        )

    async def _hand_out(
        self,
        tasks: Sequence[Task],
        histories: dict[uuid.UUID, list[StoredEvent]] | None = None,
    ) -> list[ClaimedTask]:
        """What a worker gets for tasks claimed for it: activities as they are, workflow tasks
        with their run's history (their run marked running; those of runs that ended
        meanwhile are closed and left out). ``histories``: already read by the claim, for the
        runs still open."""
        for task in tasks:
            if task.kind == "activity":
                self.notifier.deadline_added(
                    _earliest(task.start_to_close_s, task.heartbeat_timeout_s)
                )
        claimed = []
        workflow_tasks = [t for t in tasks if t.kind == "workflow"]
        if workflow_tasks:
            if histories is None:
                histories = await self.store.start_runs([t.run_id for t in workflow_tasks])
            await self.store.close_workflow_tasks(
                [t.task_id for t in workflow_tasks if t.run_id not in histories]
            )
        for task in tasks:
            assert task.claimed_at is not None
            if task.kind == "activity":
                claimed.append(ClaimedTask(task, "", [], task.claimed_at))
            elif histories is not None and task.run_id in histories:
                history = histories[task.run_id]
                may_start = _starts_afresh(task, history) and await self._breakers_closed()
                claimed.append(
                    ClaimedTask(task, task.type_name, history, task.claimed_at, may_start)
                )
        return claimed

    async def _breakers_may_be_unclosed(self) -> bool:
        return await self._unclosed_for_claims.read()

    async def _breakers_closed(self) -> bool:
        """Whether every circuit breaker is closed, for `ClaimedTask.may_start_activities`
        (see `_starts_afresh` for the rest): checked at most once a second (the statement
        applying a decision still holds back the activities of a breaker that opened since,
        and the worker then cancels them), and never failing the hand-out it is asked for
        (tasks already claimed must reach their worker): a failed read answers no."""
        try:
            return not await self._unclosed_for_start_ahead.read()
        except DatabaseError as exc:
            log.warning("could not read the circuit breakers (%s); no start ahead", exc)
            return False

    async def _admit_probes(self, tasks: list[Task], probes: dict[str, int]) -> list[Task]:
        """Let through only as many tasks of a half-open breaker as it has probe slots; the
        others go back to the queue uncharged.

        The tasks a breaker gates are locked first, in id order, then their breakers, in key
        order: the order of every transaction that holds a task and then its breaker (a
        failed attempt, the release of a lost worker's tasks, which locks them in id order
        too) and of every one that takes several breakers (another claim's
        `Store.admit_breakers`, the duties' `Store.lock_breakers`). Holding a breaker while
        waiting for a task deadlocked with such a release, and breakers taken in task order
        with another claim. A gated task that is no longer this claim (the release gave it
        back meanwhile) is left out."""
        gated = {
            t.task_id for t in tasks if t.kind == "activity" and t.effective_breaker_key in probes
        }
        kept = [t for t in tasks if t.task_id not in gated]
        async with self.store.transaction() as conn:
            held = []
            # uuid order, as PostgreSQL's (find_tasks_of_worker's ORDER BY id)
            for task in sorted((t for t in tasks if t.task_id in gated), key=lambda t: t.task_id):
                assert task.lease_token is not None
                if await self.store.lock_claim(conn, task.task_id, task.lease_token) is not None:
                    held.append(task)
            # Breakers in key order, as every transaction that takes several does.
            for task in sorted(held, key=lambda t: (t.effective_breaker_key, t.task_id)):
                if await self.store.admit_probe(conn, task.effective_breaker_key, self.breakers):
                    kept.append(task)
                else:
                    await self.store.unclaim(conn, task)
        order = {t.task_id: n for n, t in enumerate(tasks)}
        return sorted(kept, key=lambda t: order[t.task_id])

    # ------------------------------------------------------------------ workflow tasks

    async def complete_workflow_task(
        self,
        task_id: uuid.UUID,
        lease_token: int,
        worker_id: str,
        seen_sequence: int,
        commands_json: str,
        claim_time: datetime,
        *,
        max_eager: int = 0,
        started: Mapping[str, uuid.UUID] | None = None,
    ) -> tuple[bool, bool, list[ClaimedTask]]:
        """Apply a workflow task's commands in one transaction.

        With ``max_eager`` > 0, up to that many of the activities it schedules that the worker
        serves are handed to it in the reply (eager dispatch: no NOTIFY/poll round trip).
        ``started`` names those the worker already runs (activity id -> the task id it chose):
        their tasks get those ids and are handed back first, unless their breaker is not
        closed (the worker then cancels them).

        Returns:
            ``(accepted, superseded, eager_tasks)``: superseded when events that arrived
            meanwhile make the commands stale (`superseded_by`; the pending workflow task
            replays them, nothing is lost); other input is held past the decision.

        Raises:
            StaleLease: the caller does not hold the task's lease.
            InvalidArgument: the commands are malformed.
        """
        (result,) = await self.complete_workflow_tasks(
            worker_id,
            [
                WorkflowTaskCompletion(
                    task_id,
                    lease_token,
                    seen_sequence,
                    commands_json,
                    claim_time,
                    max_eager,
                    started or {},
                )
            ],
        )
        if isinstance(result, EverrunsError):
            raise result
        return result

    async def complete_workflow_tasks(
        self, worker_id: str, completions: Sequence[WorkflowTaskCompletion]
    ) -> list[tuple[bool, bool, list[ClaimedTask]] | EverrunsError]:
        """`complete_workflow_task` for several tasks of one worker.

        Fast path: completions whose commands need no read (activities, or an end alone) are
        applied in one statement and one transaction, each only if the history is still what
        its replay saw. The others, and any whose conditions failed there, each take the
        general path under their run's lock (concurrently), which says why.

        Returns:
            Per completion, in order: what `complete_workflow_task` returns, or the error it
            would raise (StaleLease, InvalidArgument...).

        Raises:
            DatabaseError: the database failed; nothing of the batch statement was applied,
                and the general paths that ran meanwhile are each their own transaction (a
                retried call finds those stale).
        """
        results: list[tuple[bool, bool, list[ClaimedTask]] | EverrunsError | None] = [None] * len(
            completions
        )
        # Activities may start ahead only for a run's first workflow task (`_starts_afresh`):
        # a decision made on more history than the start names none that this honours.
        completions = [
            c if c.seen_sequence == _START_SEQUENCE else attrs.evolve(c, started={})
            for c in completions
        ]
        plans: list[tuple[int, list[Command], _Outcome | None]] = []
        for n, c in enumerate(completions):
            try:
                commands = _parse_commands(c.commands_json)
                outcome = self._fast_outcome(worker_id, commands, c.claim_time)
                if outcome is not None:
                    _take_started_ids(outcome, c.started)
                plans.append((n, commands, outcome))
            except EverrunsError as exc:
                results[n] = exc
        fast = [(n, outcome) for n, _, outcome in plans if outcome is not None]
        decisions = []
        for n, outcome in fast:
            c = completions[n]
            decisions.append(
                Decision(
                    c.task_id,
                    c.lease_token,
                    c.seen_sequence,
                    outcome.events,
                    outcome.activities,
                    await self._eager_flags(worker_id, outcome.activities, c.max_eager, c.started),
                    outcome.end,
                )
            )
        eager_for = worker_id if any(any(d.eager) for d in decisions) else None
        try:
            applied = await self.store.apply_workflow_tasks(decisions, eager_for=eager_for)
        except DatabaseError:
            raise
        except EverrunsError:
            # One completion broke a rule the database enforces (a duplicate activity id,
            # say), which rolled back the whole statement: each goes its own way instead, so
            # only the guilty one is refused.
            applied = [(False, [])] * len(decisions)
        try:
            done = await self._complete_rest(worker_id, completions, plans, fast, applied, results)
            # Its statements commit whole even when the call is cancelled meanwhile (its
            # worker gone): then no reply carries the activities claimed for the worker.
            await trio.lowlevel.checkpoint_if_cancelled()
            return done
        except BaseException:
            # No reply carries the activities claimed for the worker (the call was cancelled,
            # or a general path failed): back to the queue, not left until their leases lapse.
            # Not the activities the worker started ahead: they ran there already (and may
            # have killed it), so they stay claimed, to be released with their attempt counted.
            ahead = {task_id for c in completions for task_id in c.started.values()}
            await self._give_back(
                [
                    t
                    for r in results
                    if isinstance(r, tuple)
                    for t in r[2]
                    if t.task.task_id not in ahead
                ]
            )
            raise

    async def _complete_rest(
        self,
        worker_id: str,
        completions: Sequence[WorkflowTaskCompletion],
        plans: list[tuple[int, list[Command], _Outcome | None]],
        fast: list[tuple[int, _Outcome]],
        applied: Sequence[tuple[bool, list[Task]]],
        results: list[tuple[bool, bool, list[ClaimedTask]] | EverrunsError | None],
    ) -> list[tuple[bool, bool, list[ClaimedTask]] | EverrunsError]:
        """The rest of `complete_workflow_tasks` once its statement has committed: what the
        fast path applied, then the general path of the others (``results`` is filled in)."""
        done = set()
        for (n, outcome), (ok, claimed) in zip(fast, applied, strict=True):
            if ok:
                c = completions[n]
                results[n] = (
                    True,
                    False,
                    self._scheduled(outcome.activities, claimed, c.claim_time),
                )
                done.add(n)

        failures: list[DatabaseError] = []

        async def general(n: int, commands: list[Command]) -> None:
            c = completions[n]
            try:
                results[n] = await self._complete_under_lock(
                    c.task_id,
                    c.lease_token,
                    worker_id,
                    c.seen_sequence,
                    commands,
                    c.claim_time,
                    c.max_eager,
                    c.started,
                )
            except DatabaseError as exc:
                failures.append(exc)  # the whole call fails (and is retried)
            except StaleLease as exc:
                results[n] = await self._handed_out_before(worker_id, c) or exc
            except EverrunsError as exc:
                results[n] = exc

        async with trio.open_nursery() as nursery:
            for n, commands, _ in plans:
                if n not in done:
                    nursery.start_soon(general, n, commands)
        if failures:
            raise failures[0]
        return [r for r in results if r is not None]

    async def _recorded_before(
        self, worker_id: str, task_id: uuid.UUID, lease_token: int
    ) -> tuple[str | None, list[Task]]:
        """A result no longer under its lease may be the retry of one this worker sent whose
        reply was lost: the result recorded under this very lease (the same text: then it
        stands, and is not refused), with the run's next workflow task claimed for the worker
        by the same statement (the reply it missed). ``(None, [])`` when none was recorded
        under that lease, or when the database cannot say."""
        try:
            return await self.store.handed_out_by_result(task_id, lease_token, worker_id)
        except DatabaseError:
            return None, []

    async def _handed_out_before(
        self, worker_id: str, c: WorkflowTaskCompletion
    ) -> tuple[bool, bool, list[ClaimedTask]] | None:
        """A completion whose task is no longer under its lease may be the retry of one this
        worker made whose reply was lost (the control plane stopped, the connection broke):
        the task was completed with this very lease, and the activities it claimed for the
        worker wait under its name, unknown to it, until the stale rule releases them (30 s,
        and activities started ahead were cancelled by the worker meanwhile). Found, they are
        the reply the worker missed; None otherwise."""
        try:
            tasks = await self.store.handed_out_by_completion(c.task_id, c.lease_token, worker_id)
        except DatabaseError:
            return None  # the stale verdict stands; the stale rule releases them
        if not tasks:
            return None
        return True, False, [ClaimedTask(t, "", [], t.claimed_at or c.claim_time) for t in tasks]

    def _fast_outcome(
        self, worker_id: str, commands: Sequence[Command], claim_time: datetime
    ) -> _Outcome | None:
        """What the commands write, when all of them need no read (activities, or an end
        alone); None when they must be applied under the run's lock.

        Raises:
            InvalidArgument: a second command that ends the run.
        """
        completed = NewEvent.of(ev.workflow_task_completed(worker_id, claim_time))
        fast = _Outcome([completed])
        if all(_plan(self.config, command, fast) for command in commands) and not (
            fast.end and fast.activities
        ):
            return fast
        return None

    async def _complete_under_lock(
        self,
        task_id: uuid.UUID,
        lease_token: int,
        worker_id: str,
        seen_sequence: int,
        commands: Sequence[Command],
        claim_time: datetime,
        max_eager: int,
        started: Mapping[str, uuid.UUID],
    ) -> tuple[bool, bool, list[ClaimedTask]]:
        """The general path of a workflow task's completion, under its run's lock."""
        async with self.store.transaction() as conn:
            run = await self.store.lock_leased_with_run(conn, task_id, lease_token)
            if not run.is_open:
                await self.store.close_workflow_task(conn, task_id)
                return False, True, []
            if not _START_SEQUENCE <= seen_sequence <= run.last_sequence_num:
                raise InvalidArgument(
                    f"seen_sequence {seen_sequence} is outside the history of run "
                    f"{run.run_id} (1 to {run.last_sequence_num})"
                )
            held = None  # the decision's view, when events it did not see are held past it
            wake = False
            if run.last_sequence_num != seen_sequence:
                unseen = await self.store.load_events(run.run_id, after=seen_sequence, conn=conn)
                if superseded_by(commands, unseen) is not None:
                    await self.store.close_workflow_task(conn, task_id)
                    await self.store.ensure_workflow_task(conn, run)
                    return False, True, []
                held = seen_sequence
                wake = unseen_input(unseen)  # held input needs a workflow task after this one
            completed = ev.workflow_task_completed(worker_id, claim_time, seen_sequence=held)
            outcome = _Outcome([NewEvent.of(completed)])
            for command in commands:
                await self._apply(conn, run, command, outcome)
            _take_started_ids(outcome, started)
            if started:
                taken = await self.store.taken_task_ids(conn, list(started.values()))
                if taken:
                    raise InvalidArgument(
                        f"started: task id {min(taken)} is taken; choose new UUIDs"
                    )
            # Activities scheduled by the task that ends the run are cancelled, never handed out.
            budget = 0 if outcome.end else max_eager
            eager = await self._eager_flags(worker_id, outcome.activities, budget, started)
            applied, claimed = await self.store.apply_workflow_task(
                task_id,
                lease_token,
                run.last_sequence_num,
                outcome.events,
                outcome.activities,
                eager_for=worker_id if any(eager) else None,
                eager=eager,
                end=outcome.end,
                simple_end_only=False,
                conn=conn,
            )
            if not applied:  # we hold the task's lease and the run's lock: cannot happen
                raise FailedPrecondition(f"workflow task {task_id} changed under its lock")
            if outcome.end is not None:
                await self._after_end(conn, run, outcome.end)
            elif outcome.wake or wake:
                await self.store.ensure_workflow_task(conn, run)
        return True, False, self._scheduled(outcome.activities, claimed, claim_time)

    def _scheduled(
        self, activities: Sequence[NewTask], claimed: Sequence[Task], claim_time: datetime
    ) -> list[ClaimedTask]:
        """After a commit: arm the deadline watch for new activities; the eager claims."""
        for new in activities:
            self.notifier.deadline_added(_earliest(new.schedule_to_start_s, new.start_to_close_s))
        return [ClaimedTask(t, "", [], t.claimed_at or claim_time) for t in claimed]

    async def _eager_flags(
        self,
        worker_id: str,
        activities: Sequence[NewTask],
        budget: int,
        started: Mapping[str, uuid.UUID] = _NONE_STARTED,
    ) -> list[bool]:
        """Which new activities go straight to the completing worker: of the types it serves,
        those it ``started`` already, then the first others, in the ``budget`` slots it
        offers (each started one holds one of them, even if it does not come back)."""
        if budget <= 0 or not activities:
            return []
        served = await self.activity_types_of(worker_id)
        flags = [False] * len(activities)
        for n, task in enumerate(activities):
            if budget > 0 and task.activity_id in started:
                # It holds one of the slots offered whether or not it comes back.
                flags[n] = task.activity_type in served
                budget -= 1
        for n, task in enumerate(activities):
            if budget > 0 and task.activity_id not in started and task.activity_type in served:
                flags[n] = True
                budget -= 1
        return flags

    def note_worker(
        self, worker_id: str, activity_types: Sequence[str], workflow_types: Sequence[str]
    ) -> None:
        """Remember what a worker serves (for eager dispatch), as it registers here."""
        self._served_epoch += 1
        self._served[worker_id] = (
            frozenset(activity_types),
            frozenset(workflow_types),
            trio.current_time(),
        )

    def _forget_served(self, worker_id: str | None) -> None:
        """A worker (None: any worker) registered somewhere: read its types again when next
        needed."""
        self._served_epoch += 1
        if worker_id is None:
            self._served.clear()
        else:
            self._served.pop(worker_id, None)

    async def _served_by(self, worker_id: str) -> tuple[frozenset[str], frozenset[str]]:
        """What a worker serves, ``(activity types, workflow types)``: remembered, read again
        from its registration when forgotten or older than `SERVED_FRESH_SECONDS` (a failed
        read keeps what was remembered). An unknown worker serves nothing."""
        now = trio.current_time()
        entry = self._served.get(worker_id)
        if entry is not None and now - entry[2] < SERVED_FRESH_SECONDS:
            return entry[0], entry[1]
        epoch = self._served_epoch
        try:
            record = await self.store.get_worker(worker_id)
        except DatabaseError:
            if entry is None:
                raise
            return entry[0], entry[1]
        if record is None:
            served: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        else:
            served = (frozenset(record.activity_types), frozenset(record.workflow_types))
        if self._served_epoch == epoch:  # no registration came in while it was read
            self._served[worker_id] = (*served, now)
        return served

    async def activity_types_of(self, worker_id: str) -> frozenset[str]:
        """The activity types a worker registered (remembered: `_served_by`)."""
        return (await self._served_by(worker_id))[0]

    async def workflow_types_of(self, worker_id: str) -> frozenset[str]:
        """The workflow types a worker registered (remembered: `_served_by`)."""
        return (await self._served_by(worker_id))[1]

    async def _apply(
        self, conn: Connection, run: WorkflowRun, command: Command, outcome: _Outcome
    ) -> None:
        """Apply one command under the run's lock: what needs no read is planned into
        ``outcome`` (written by one statement after the last command); timers and children
        are written here."""
        if _plan(self.config, command, outcome, locked=True):
            return
        if isinstance(command, StartTimer):
            await self.store.start_timer(conn, run, command.timer_id, command.seconds)
            outcome.events.append(NewEvent.of(command.to_event()))
        elif isinstance(command, CancelTimer):
            await self.store.cancel_timer(conn, run.run_id, command.timer_id)
            outcome.events.append(NewEvent.of(command.to_event()))
        elif isinstance(command, StartChildWorkflow):
            events = await self._start_child(conn, run, command)
            outcome.events.extend(events)
            outcome.wake |= len(events) > 1
        elif isinstance(command, ContinueAsNewWorkflow):
            signals = await self._carried_signals(conn, run, command.signals)
            _continue_as_new(self.config, command, signals, outcome)
        else:
            raise InvalidArgument(f"unknown command {command!r}")

    async def _carried_signals(
        self, conn: Connection, run: WorkflowRun, seqs: Sequence[int]
    ) -> tuple[NewEvent, ...]:
        """The ``signal_received`` events of ``run`` that a decision continuing as new names
        (by sequence number), to be appended to the new run as they are.

        Raises:
            InvalidArgument: a number names no signal of the run.
        """
        if not seqs:
            return ()
        wanted = set(seqs)
        found = {
            e.sequence_num: e
            for e in await self.store.load_events(run.run_id, after=min(wanted) - 1, conn=conn)
            if e.sequence_num in wanted and e.type == ev.SIGNAL_RECEIVED
        }
        missing = sorted(wanted - set(found))
        if missing:
            raise InvalidArgument(
                f"continue_as_new: seq {missing[0]} of run {run.run_id} is not a signal"
            )
        # Marked so that replay buffers them before the new run's code takes its first step.
        return tuple(NewEvent.of({**decode(found[seq].payload), "carried": True}) for seq in seqs)

    async def _start_child(
        self, conn: Connection, run: WorkflowRun, command: StartChildWorkflow
    ) -> list[NewEvent]:
        """The events of a child's start: ``child_workflow_started``, then, when its workflow
        id is taken by an open run (AlreadyExists) or its input is too large (the child is not
        started), ``child_workflow_failed``."""
        child_wid = command.workflow_id or f"{run.workflow_id}/{command.child_id}"
        what = f"input of child workflow {child_wid!r}"
        input_text = encode_text(command.input, what=what)
        started = NewEvent.of(command.to_event(), input=input_text)
        error = _too_large(self.config, input_text, what)
        if error is not None:
            return [started, NewEvent.of(ev.child_workflow_failed(command.child_id, error))]
        child, created = await self._start(
            conn,
            StartRequest(command.workflow_type, input_text, child_wid),
            parent=run,
            child_id=command.child_id,
        )
        if created:
            return [started]
        taken = {
            "type": "AlreadyExists",
            "message": f"workflow {child_wid!r} is already running (run {child.run_id})",
            "non_retryable": True,
        }
        return [started, NewEvent.of(ev.child_workflow_failed(command.child_id, taken))]

    async def _after_end(self, conn: Connection, run: WorkflowRun, end: RunEnd) -> None:
        """What ending a run does beyond its own row (written by the statement that ended
        it): its pending workflow task, its activities and children, its parent."""
        await self.store.drop_pending_workflow_tasks(conn, run.run_id)
        await self.store.cancel_timers_of_run(conn, run.run_id)  # nothing fires into an ended run
        # Activities the code no longer waits for are cancelled, not left to run (an ended
        # run's history records no more events: those of the cancellations are dropped).
        await self._cancel_activities(conn, run)
        await self._cancel_children(
            conn, run, f"parent workflow {run.workflow_id!r} ended {end.status}"
        )
        if end.continued is not None:
            await self._continue(conn, run, end.continued)
        elif run.parent_run_id is not None and run.parent_child_id is not None:
            await self._tell_parent(conn, run, end.status, result=end.result, error=end.error)

    async def _continue(self, conn: Connection, run: WorkflowRun, next: Continuation) -> None:
        """Start the run that ``run``, ended ``continued_as_new``, goes on in: same workflow id
        and type, same parent (told only when the chain's last run ends), with the signals
        ``run`` had not consumed delivered first. Its code has been running: it starts
        ``running``, so a cancel request is one its code sees (and may clean up after), as
        are a cancel request ``run``'s code did not see and a parent's end or cancellation
        that passed the ended run by (another transaction held it, so it was skipped)."""
        # Child, then parent: the order of every transaction that holds both. (A parent row
        # retention deleted has set parent_run_id to NULL, under this run's lock.)
        parent = None
        if run.parent_run_id is not None:
            parent = await self.store.lock_run(conn, run.parent_run_id)
        new, created = await self._start(
            conn,
            StartRequest(run.workflow_type, next.input, run.workflow_id, next.run_id),
            parent=parent,
            child_id=run.parent_child_id,
            continues=run,
            then=next.signals,
        )
        if not created:  # this transaction holds the one open run it ended: cannot happen
            raise FailedPrecondition(
                f"workflow {run.workflow_id!r} has another open run ({new.run_id})"
            )
        await self.store.set_running(conn, new.run_id)
        await self.store.set_continued(conn, run.run_id, new.run_id)
        reason: str | None
        if next.cancel:
            reason = f"cancel requested of run {run.run_id} as it continued as new"
        else:  # judged as for the run it continues: the chain's child started before
            reason = _orphaned_because(attrs.evolve(new, created_at=run.created_at), parent)
        if reason is not None:
            running = await self.store.lock_run(conn, new.run_id)  # read again: running now
            await self._request_cancel(conn, running, reason)

    async def _cancel_children(self, conn: Connection, run: WorkflowRun, reason: str) -> None:
        """Pass a cancel request on to the open children of ``run`` (which this transaction
        holds), never waiting for one. A child's end holds the child and then waits for its
        parent (`_tell_parent`): a parent that waited for its child while holding itself
        deadlocked with it, and PostgreSQL aborted one of the two after a second. A child
        another transaction holds is skipped here and cancelled once that transaction lets
        go, by `cancel_if_orphaned` from `duties.run_follow_ups`; should this control
        plane stop first, by the reclaim round's sweep (`cancel_orphaned_children`)."""
        children, skipped = await self.store.lock_open_children(conn, run.run_id)
        await self.store.remember_skipped(conn, run.run_id, skipped, children=True)
        for child in children:
            await self._request_cancel(conn, child, reason)
        self._follow_up(Skipped(child_id, child=True) for child_id in skipped)

    def _follow_up(self, skipped: Iterable[Skipped]) -> None:
        before = len(self._skipped)
        self._skipped.update(skipped)
        if len(self._skipped) > before:
            self._skipped_added.set()

    async def skipped(self) -> list[Skipped]:
        """Wait until a run's end or cancellation has skipped children or activity tasks
        (another transaction held them), or a duty has skipped tasks (another transaction held their
        run); return them, each once. Perhaps before the transaction that skipped them has
        ended: `follow_up` waits for it."""
        await self._skipped_added.wait()
        self._skipped_added = trio.Event()
        skipped = list(self._skipped)
        self._skipped.clear()
        return skipped

    async def follow_up(self, skipped: Skipped) -> bool:
        """Cancel what a run's end or cancellation skipped, or do what a duty skipped,
        waiting for the transaction that holds it (`cancel_if_orphaned`,
        `cancel_if_abandoned`, `finish_skipped`); return whether it did."""
        if skipped.duty is not None:
            return await self.finish_skipped(skipped.row_id, skipped.duty)
        if skipped.child:
            return await self.cancel_if_orphaned(skipped.row_id, wait=True)
        return await self.cancel_if_abandoned(skipped.row_id, wait=True)

    async def cancel_if_orphaned(self, child_id: uuid.UUID, *, wait: bool) -> bool:
        """Request the cancellation of an open child run whose parent ended, is gone, or had
        its own cancellation requested after the child started, unless it was requested
        already (`_orphaned_because`); return whether this call requested it.

        One transaction: it locks the child (with ``wait``, waiting for whoever holds it;
        without, leaving a child another transaction holds alone), then its parent, waiting,
        as a child's end does: so it sees the parent as the transaction that skipped the child
        left it, committed or rolled back. Nothing waits for a child while holding its parent.
        The skip's record (`Store.remember_skipped`) is settled here, whatever the outcome.
        """
        async with self.store.transaction() as conn:
            if wait:
                try:
                    child: WorkflowRun | None = await self.store.lock_run(conn, child_id)
                except NotFound:
                    child = None
            else:
                child = await self.store.lock_run_unless_held(conn, child_id)
            if child is None:  # gone, or (without ``wait``) held by another
                await self.store.forget_skipped_if_closed(conn, child_id)
                return False
            parent = None
            if child.parent_run_id is not None:
                parent = await self.store.lock_run(conn, child.parent_run_id)
            await self.store.forget_skipped(conn, child_id)  # settled, whatever follows
            reason = _orphaned_because(child, parent)
            if reason is None:
                return False
            await self._request_cancel(conn, child, reason)
            return True

    async def cancel_orphaned_children(self, *, batch: int = 200) -> int:
        """The reclaim round's sweep: request the cancellation of the open child runs that
        their parent's end or cancel request skipped and nobody came back to (the control
        plane that skipped them stopped before its follow-up, say), and of those whose parent
        is gone. It reads the skips' records and the children without a parent, never every
        open child. Each child is its own transaction, which leaves a child another
        transaction holds alone (found again next round). Returns how many it requested."""
        requested = await self._sweep(
            self.store.find_orphaned_children, self.cancel_if_orphaned, batch
        )
        if requested:
            log.warning(
                "requested the cancellation of %d child run(s) their parent left open", requested
            )
        return requested

    @staticmethod
    async def _sweep(
        find: Callable[..., Awaitable[list[uuid.UUID]]],
        cancel: Callable[..., Awaitable[bool]],
        batch: int,
    ) -> int:
        """Cancel, in batches, what ``find`` returns, each without waiting for a row another
        transaction holds (``wait=False``: found again next round); return how many."""
        done_in_all = 0
        while True:
            found = await find(limit=batch)
            done = 0
            for row_id in found:
                done += await cancel(row_id, wait=False)
            done_in_all += done
            if len(found) < batch or not done:
                return done_in_all

    async def _tell_parent(
        self,
        conn: Connection,
        child: WorkflowRun,
        status: str,
        *,
        result: str | None,
        error: dict[str, Any] | None,
    ) -> None:
        assert child.parent_run_id is not None and child.parent_child_id is not None
        parent = await self.store.lock_run(conn, child.parent_run_id)
        if not parent.is_open:
            return
        if status == "completed":
            event = NewEvent.of(
                ev.child_workflow_completed(child.parent_child_id, None), result=result or "null"
            )
        else:
            failure = error or {
                "type": "WorkflowCancelled",
                "message": f"child workflow {child.workflow_id!r} was cancelled",
            }
            event = NewEvent.of(ev.child_workflow_failed(child.parent_child_id, failure))
        await self.store.append_events(conn, parent, [event])
        await self.store.ensure_workflow_task(conn, parent)

    async def fail_workflow_task(
        self,
        task_id: uuid.UUID,
        lease_token: int,
        worker_id: str,
        error_json: str,
        *,
        non_determinism: bool,
        seen_sequence: int = 0,
    ) -> None:
        """Record a workflow task the worker could not complete; the run is marked stuck and
        is not retried in a loop (a new event, or a worker of its type that registers or stops,
        gives it another try: `Store.retry_stuck_runs`). One the worker gives back
        because it does not serve its type (`NOT_SERVED_ERROR`) goes back to the queue instead
        (``seen_sequence`` is not looked at then).

        ``seen_sequence`` is the last event of the history the worker replayed (0: unknown, a
        worker older than the field). When input follows it, the task failed without that
        input, whose own try it took (`unseen_input`): the run is marked stuck all the same
        and a workflow task replays it once more, with the input.

        A run whose cancellation was requested ends cancelled instead: its code cannot run to
        see the request (the stuck message tells the operator to cancel such a run).

        Raises:
            StaleLease: the caller does not hold the task's lease.
            InvalidArgument: ``seen_sequence`` is neither 0 nor in the run's history.
        """
        error = _error_dict(error_json)
        kind = "non-determinism" if non_determinism else "workflow task failed"
        reason = f"{kind}: {error.get('message', '')}"
        again = False
        async with self.store.transaction() as conn:
            task = await self.store.lock_leased(conn, task_id, lease_token)
            if error.get("type") == NOT_SERVED_ERROR:
                # Handed to a worker that does not serve its type: back to the queue for
                # another (uncharged); the run is not to blame.
                await self.store.release_task(conn, task, error, charge=False)
                log.warning("worker %s gave back %s: %s", worker_id, task_id, reason)
                return
            run = await self.store.lock_run(conn, task.run_id)
            await self.store.close_workflow_task(conn, task_id)
            if not run.is_open:
                return
            if not 0 <= seen_sequence <= run.last_sequence_num:
                raise InvalidArgument(
                    f"seen_sequence {seen_sequence} is outside the history of run "
                    f"{run.run_id} (1 to {run.last_sequence_num}, or 0: unknown)"
                )
            failed = NewEvent.of(ev.workflow_task_failed({**error, "worker_id": worker_id}))
            if run.cancel_requested_at is not None:
                await self.store.append_events(
                    conn, run, [failed, NewEvent.of(ev.workflow_cancelled())]
                )
                ended = await self.store.end_run(conn, run.run_id, "cancelled")
                await self._after_end(conn, ended, RunEnd("cancelled"))
            else:
                unseen: list[StoredEvent] = []
                if 0 < seen_sequence < run.last_sequence_num:
                    unseen = await self.store.load_events(
                        run.run_id, after=seen_sequence, conn=conn
                    )
                    again = unseen_input(unseen)
                # The history's last event: the last of those just read, if any were.
                last = unseen or await self.store.load_events(
                    run.run_id, after=run.last_sequence_num - 1, conn=conn
                )
                # The same failure again with nothing new in between (a stuck run's retry
                # while the code it needs is not deployed): the history already says so.
                if not (last and repeats_failure(last[-1].data, error)):
                    await self.store.append_events(conn, run, [failed])
                await self.store.set_stuck(conn, run.run_id, reason[:4000])
                if again:
                    await self.store.ensure_workflow_task(conn, run)
        if run.cancel_requested_at is not None:
            log.warning(
                "workflow %s ended cancelled: its code could not run to see the request (%s)",
                run.workflow_id,
                reason,
            )
        elif again:
            log.error(
                "workflow %s is stuck: %s; it replays once more with the input that task "
                "did not see",
                run.workflow_id,
                reason,
            )
        else:
            log.error("workflow %s is stuck: %s", run.workflow_id, reason)

    # ------------------------------------------------------------------ activity tasks

    async def complete_activity(
        self,
        task_id: uuid.UUID,
        lease_token: int,
        worker_id: str,
        result: str,
        *,
        max_eager: int = 0,
    ) -> list[ClaimedTask]:
        """Record an activity's result and wake its workflow (`complete_activities` for one
        result; only the follow-up workflow task is handed back, with ``max_eager`` >= 1).

        Raises:
            StaleLease: the caller does not hold the task's lease.
            InvalidArgument, ResourceExhausted: the result is not acceptable.
        """
        (verdict,), handed, _ = await self.complete_activities(
            worker_id,
            [(task_id, lease_token, result)],
            max_new_tasks=min(max_eager, 1),
            claim_queued=False,
        )
        if verdict is not None:
            raise verdict
        return handed

    async def complete_activities(
        self,
        worker_id: str,
        results: Sequence[tuple[uuid.UUID, int, str]],
        *,
        max_new_tasks: int = 0,
        claim_queued: bool = True,
        follow_ups: Sequence[FollowUpDecision] = (),
    ) -> tuple[list[EverrunsError | None], list[ClaimedTask], set[int]]:
        """Record several activities' results in one statement (group commit), then claim up
        to ``max_new_tasks`` tasks for the worker: the follow-up workflow tasks first (eager
        dispatch), then (``claim_queued``) visible tasks of the types it serves, without
        waiting. A requeued dead letter's result stays on its task row only: its workflow has
        moved on.

        ``results`` are ``(task_id, lease_token, result_json)``; each is checked and accepted
        or refused on its own. A follow-up workflow task for which ``follow_ups`` has the
        worker's decision, made ahead on the history it now has (`continues_decision`), is
        completed with it at once instead of being handed out; the tasks that decision
        schedules for the worker are handed out in its place.

        Returns:
            Per result, in order: None when recorded, else why it was refused (the error the
            single call would raise); the tasks claimed for the worker; and the indexes of
            the results whose follow-up decision was applied.
        """
        verdicts: list[EverrunsError | None] = [None] * len(results)
        valid = []
        for n, (task_id, lease_token, result) in enumerate(results):
            try:
                self.check_payload(result, "activity result")
            except EverrunsError as exc:
                verdicts[n] = exc
            else:
                valid.append((n, (task_id, lease_token, result)))
        activity_types, workflow_types = await self._served_by(worker_id)
        position = {n: p for p, (n, _) in enumerate(valid)}
        ahead, planned, later = await self._plan_ahead(
            worker_id, follow_ups, position, max_new_tasks
        )
        # A worker that serves no workflow gets no follow-up task back, so the claim for its
        # freed slots does not depend on the results: it runs beside their statement.
        claimed: list[ClaimedTask] = []
        beside = claim_queued and max_new_tasks > 0 and bool(activity_types) and not workflow_types

        async def claim_beside() -> None:
            try:
                claimed.extend(
                    await self._claim_unless_quiet(
                        None, worker_id, [], sorted(activity_types), max_new_tasks, woken=False
                    )
                )
            except EverrunsError as exc:  # the results stand; the slots refill by polling
                log.warning("claim beside recorded results failed: %s", exc)

        # Claimed for the worker: given back if no reply carries them (the call cancelled, or
        # failing), not left until their leases lapse. Until the results are recorded, only
        # what the claim beside them put in `claimed`.
        outstanding: list[ClaimedTask | Task] = []
        try:
            async with trio.open_nursery() as nursery:
                if beside:
                    nursery.start_soon(claim_beside)
                recorded: tuple[Any, ...] | EverrunsError
                try:
                    recorded = await self._record_results(
                        worker_id,
                        [result for _, result in valid],
                        workflow_types,
                        max_new_tasks,
                        ahead,
                    )
                except EverrunsError as exc:
                    recorded = exc  # raised once the claim beside it has ended (not as a group)
            if isinstance(recorded, EverrunsError):
                raise recorded
            done, eager, histories, applied = recorded
            outstanding = [*claimed, *eager, *(t for tasks in applied.values() for t in tasks)]
            again: list[Task] = []
            for p, (n, (task_id, lease_token, result)) in enumerate(valid):
                if p not in done:  # not under its lease, or another of the same task was
                    earlier, follow_up = await self._recorded_before(
                        worker_id, task_id, lease_token
                    )
                    if earlier != result:
                        verdicts[n] = await self.store.stale_reason(task_id, lease_token)
                    else:  # this very result, recorded by a call whose reply was lost: it
                        again += follow_up  # stands, and its follow-up is handed out again
            outstanding += again
            for breaker_key in [key for key in done.values() if key is not None]:  # one per success
                async with self.store.transaction() as conn:
                    await self.store.record_breaker_success_if_tracked(
                        conn, breaker_key, config=self.breakers
                    )
            decided: set[int] = set()
            scheduled: list[ClaimedTask] = []
            for p, new_tasks in applied.items():
                f, outcome = planned[p]
                decided.add(f.result)
                scheduled.extend(self._scheduled(outcome.activities, new_tasks, f.decided_at))
            if later and eager:
                recorded_ok = {n for n, verdict in enumerate(verdicts) if verdict is None}
                eager, more, decided_later = await self._apply_follow_ups(
                    worker_id,
                    [(f, results[f.result][2]) for f in later if f.result in recorded_ok],
                    eager,
                    histories,
                )
                outstanding += more
                scheduled += more
                decided |= decided_later
            claimed = scheduled + claimed
            handed = await self._hand_out(eager, histories) + claimed
            # Their histories were not read by this call's statement. (Two copies of one result
            # in a call: the follow-up is this call's own, handed out once.)
            ours = {t.task_id for t in eager}
            again = list({t.task_id: t for t in again if t.task_id not in ours}.values())
            if again:
                handed += await self._hand_out(again)
            room = max_new_tasks - len(handed)
            if not beside and claim_queued and room > 0 and (activity_types or workflow_types):
                late = await self._claim_unless_quiet(
                    None,
                    worker_id,
                    sorted(workflow_types),
                    sorted(activity_types),
                    room,
                    woken=False,
                )
                outstanding += late
                handed += late
            # The claims are shielded: a call cancelled meanwhile (its worker gone) has no
            # reply to carry what they claimed, which goes back (below).
            await trio.lowlevel.checkpoint_if_cancelled()
            return verdicts, handed, decided
        except BaseException:
            await self._give_back(outstanding or claimed)
            raise

    async def _record_results(
        self,
        worker_id: str,
        results: Sequence[tuple[uuid.UUID, int, str]],
        workflow_types: frozenset[str],
        max_new_tasks: int,
        ahead: Sequence[DecisionAhead],
    ) -> tuple[Any, ...]:
        """The results' statement (`Store.complete_activities`), with the decisions made
        ahead; if one of those breaks a rule the database enforces (a duplicate activity id,
        say: the whole statement is rolled back), again without them, so that the results
        stand and the workflow tasks go out to be replayed, where the worker's own decision
        meets the refusal."""

        async def record(decisions: Sequence[DecisionAhead]) -> tuple[Any, ...]:
            return await self.store.complete_activities(
                results,
                worker_id,
                eager_types=sorted(workflow_types),
                max_eager=max(0, max_new_tasks),
                decisions=decisions,
            )

        try:
            return await record(ahead)
        except DatabaseError:
            raise
        except EverrunsError as exc:
            if not ahead:
                raise
            log.warning("decisions made ahead were not applied: %s", exc)
        return await record(())

    async def _plan_ahead(
        self,
        worker_id: str,
        follow_ups: Sequence[FollowUpDecision],
        position: dict[int, int],
        max_new_tasks: int,
    ) -> tuple[
        list[DecisionAhead], dict[int, tuple[FollowUpDecision, _Outcome]], list[FollowUpDecision]
    ]:
        """Split decisions made ahead into those the results' statement applies itself (their
        commands need no read: activities, or an end alone) and the others, applied after it
        under their runs' locks (`_apply_follow_ups`). Those of results refused here, and
        malformed ones, are dropped: their workflow tasks go out and are replayed. A decision
        claims its first activity for the worker only if the worker offered slots.

        Returns:
            The decisions for the statement; each with its plan, by the position of the
            result it follows among those sent; the others.
        """
        ahead: list[DecisionAhead] = []
        planned: dict[int, tuple[FollowUpDecision, _Outcome]] = {}
        later: list[FollowUpDecision] = []
        for f in follow_ups:
            p = position.get(f.result)
            if p is None:
                continue
            try:
                commands = _parse_commands(f.commands_json)
                outcome = self._fast_outcome(worker_id, commands, f.decided_at)
            except EverrunsError as exc:
                log.info("decision made ahead for run %s left out: %s", f.run_id, exc)
                continue
            if outcome is None:
                later.append(f)
                continue
            planned[p] = (f, outcome)
            ahead.append(
                DecisionAhead(
                    p,
                    f.run_id,
                    f.activity_id,
                    f.after_sequence,
                    ev.format_time(f.after_time),
                    f.seen_sequence,
                    outcome.events,
                    outcome.activities,
                    # The slot the workflow task would have taken, if the worker offered any.
                    await self._eager_flags(worker_id, outcome.activities, min(1, max_new_tasks)),
                    outcome.end,
                )
            )
        return ahead, planned, later

    async def _apply_follow_ups(
        self,
        worker_id: str,
        follow_ups: Sequence[tuple[FollowUpDecision, str]],
        eager: list[Task],
        histories: dict[uuid.UUID, list[StoredEvent]],
    ) -> tuple[list[Task], list[ClaimedTask], set[int]]:
        """Complete the follow-up workflow tasks just claimed for the worker with its
        decisions made ahead (each with the result it follows, as sent), where the history
        is what each decision assumed, that result included.

        Returns:
            The workflow tasks still to hand out (those without an applicable decision, or
            whose completion failed: the worker replays them as usual); the tasks the applied
            decisions scheduled for the worker; the indexes of the results they follow.
        """
        waiting = {task.run_id: task for task in eager}
        tries: list[tuple[FollowUpDecision, int, Task]] = []
        for f, result in follow_ups:
            task = waiting.get(f.run_id)
            if task is None or task.lease_token is None:
                continue
            if continues_decision(
                histories.get(f.run_id, ()),
                after_sequence=f.after_sequence,
                after_time=f.after_time,
                worker_id=worker_id,
                activity_id=f.activity_id,
                result=decode(result, what="activity result"),
                seen_sequence=f.seen_sequence,
            ):
                tries.append((f, task.lease_token, task))
                del waiting[f.run_id]  # one decision per workflow task
        if not tries:
            return eager, [], set()
        try:
            outcomes = await self.complete_workflow_tasks(
                worker_id,
                [
                    WorkflowTaskCompletion(
                        task.task_id,
                        lease,
                        f.seen_sequence,
                        f.commands_json,
                        f.decided_at,
                        max_eager=1,  # the slot the workflow task would have taken
                    )
                    for f, lease, task in tries
                ],
            )
        except DatabaseError as exc:  # the results stand; the tasks go out to be replayed
            log.warning("decisions made ahead were not applied: %s", exc)
            return eager, [], set()
        closed: set[uuid.UUID] = set()
        scheduled: list[ClaimedTask] = []
        decided: set[int] = set()
        for (f, _, task), outcome in zip(tries, outcomes, strict=True):
            if isinstance(outcome, EverrunsError):
                continue  # handed out: the worker's own replay meets the same refusal
            accepted, _, new_tasks = outcome
            closed.add(task.task_id)  # applied, or superseded (a new task is pending)
            if accepted:
                decided.add(f.result)
                scheduled.extend(new_tasks)
        return [t for t in eager if t.task_id not in closed], scheduled, decided

    async def fail_activity(
        self,
        task_id: uuid.UUID,
        lease_token: int,
        worker_id: str,
        error_json: str,
        *,
        non_retryable: bool = False,
        cancelled: bool = False,
        release: bool = False,
    ) -> tuple[bool, float]:
        """Record a failed (or cancelled, or released) attempt.

        Returns:
            ``(will_retry, delay_seconds)``.
        """
        error = _error_dict(error_json)
        async with self.store.transaction() as conn:
            task = await self.store.lock_leased(conn, task_id, lease_token)
            if task.activity_id is None:
                raise InvalidArgument(
                    f"task {task_id} is a workflow task: report its failure with FailWorkflowTask"
                )
            if cancelled:
                await self.store.cancel_task(conn, task_id)
                await self.store.release_probe(conn, task)
                await self._record(
                    conn,
                    task,
                    [
                        ev.activity_started(task.activity_id, task.attempt, worker_id),
                        ev.activity_cancelled(task.activity_id),
                    ],
                    wake=True,
                )
                return False, 0.0
            if release:
                # A graceful stop's release (the worker's error type says so) is not charged:
                # a task on its last attempt goes to another worker, not to the dead letters.
                # Nor is one the worker was handed but does not serve (our mistake, not its).
                uncharged = error.get("type") in (WORKER_SHUTDOWN_ERROR, NOT_SERVED_ERROR)
                outcome = await self.store.release_task(conn, task, error, charge=not uncharged)
            else:
                outcome = await self.store._fail_locked(
                    conn, task, error, non_retryable=non_retryable
                )
                await self._breaker_failure(conn, task)
            events = [
                ev.activity_started(task.activity_id, task.attempt, worker_id),
                _attempt_end(
                    outcome,
                    ev.activity_failed(task.activity_id, error, task.attempt, outcome.will_retry),
                ),
            ]
            await self._record(conn, task, events, wake=not outcome.will_retry)
        return outcome.will_retry, outcome.delay

    async def _record(
        self, conn: Connection, task: Task, events: list[dict[str, Any]], *, wake: bool
    ) -> None:
        run = await self.store.lock_run(conn, task.run_id)
        if not run.is_open or task.requeue_count:
            return
        await self.store.append_events(conn, run, [NewEvent.of(e) for e in events])
        if wake:
            await self.store.ensure_workflow_task(conn, run)

    async def _breaker_failure(self, conn: Connection, task: Task) -> None:
        # A task claimed before its breaker last opened was no probe: its failure moves nothing.
        state = await self.store.record_breaker_outcome(
            conn,
            task.effective_breaker_key,
            success=False,
            config=self.breakers,
            claimed_at=task.claimed_at,
        )
        if state.state != "closed":
            self._unclosed_for_claims.opened()
            self._unclosed_for_start_ahead.opened()

    async def heartbeat(self, task_id: uuid.UUID, lease_token: int, details: str | None) -> bool:
        """Refresh a task's heartbeat; return whether its cancellation was requested."""
        if details is not None:
            self.check_payload(details, "heartbeat details")
        return await self.store.heartbeat(task_id, lease_token, details)

    # ------------------------------------------------------------------ liveness

    async def retry_stuck(
        self, worker_id: str, event: str, workflow_types: Sequence[str] | None = None
    ) -> None:
        """Give the stuck runs of the workflow types of a worker that registered, stopped or
        was lost (``event``) another try (`Store.retry_stuck_runs`; ``workflow_types``: those
        it registered, else those it serves): new code (a fix, or one that keeps an old branch
        behind ``ctx.patched``) resumes them without an event sent to each, and in a rolling
        deploy the runs an old worker made stuck get their try as the old workers leave. Best
        effort: a failure leaves them stuck, as before, and is logged."""
        try:
            if workflow_types is None:
                workflow_types = sorted(await self.workflow_types_of(worker_id))
            retried = await self.store.retry_stuck_runs(workflow_types)
        except DatabaseError as exc:
            log.warning(
                "could not give stuck runs another try (worker %s %s): %s", worker_id, event, exc
            )
            return
        if retried:
            log.info(
                "%d stuck run(s) of %s get another try: worker %s %s",
                len(retried),
                ",".join(workflow_types),
                worker_id,
                event,
            )

    async def release_worker(
        self, worker_id: str, reason: str, *, incarnation: Incarnation | None = None
    ) -> int:
        """Release the tasks of a worker incarnation whose connection dropped; return how many
        this call released (not those it left to the follow-ups, below).

        ``incarnation`` names the run of the worker's process the connection belonged to
        (None: the worker's current one). While the worker's registration is still that
        incarnation's (however often it registered again), the worker is marked lost and
        every task it holds is released. If another incarnation registered since (a new
        process with the same WORKER_ID, perhaps on another control plane), the worker is
        left as it is and only the tasks claimed before that incarnation first registered
        are released: they belong to incarnations that are gone, and the others to the live
        one. The worker's row is locked while a look decides, so a registration lands either
        before the look (and is taken into account) or after it.

        The mark and the first release are one transaction: whoever sees the worker lost
        sees its tasks released, and whoever gets its tasks next sees it lost, but for an
        activity task whose run another transaction held. A look locks the tasks, then their
        runs at once, skipping (never waiting for) a run another transaction holds: holding
        one run while waiting for another deadlocked with a child's end, which holds the
        child and waits for its parent. Such a task is released by `finish_skipped`, from
        `duties.run_follow_ups`, once that transaction lets go (should that fail, by the
        stale rule). A call of that worker still being applied when its connection dropped
        either rolls back (its tasks are then waited for and released here) or commits tasks
        claimed for the worker after this looked: so it looks again (past the tasks left to
        the follow-ups), until a look finds nothing (a few rounds at most: nothing new is
        claimed for a worker whose connection is gone). The first look's "nothing" is not
        trusted: a look that waited for such a call's rows re-checks those rows alone, and
        misses the tasks the call's commit claimed for the worker."""
        released = 0
        handed: set[uuid.UUID] = set()  # skipped, left to the follow-ups
        for round_ in range(_RELEASE_ROUNDS):
            async with self.store.transaction() as conn:
                current = await self.store.lock_worker_registration(conn, worker_id)
                if incarnation is None or current is None or current.names(incarnation):
                    newer = None
                else:
                    newer = current  # another incarnation's registration
                if round_ == 0 and newer is None:
                    await self.store.stop_worker(worker_id, lost=True, conn=conn)
                tasks = await self.store.tasks_held_by(
                    conn,
                    worker_id,
                    claimed_before=None if newer is None else newer.started_at,
                    besides=handed,  # the follow-ups' (which may hold them, waiting)
                )
                await self.store.lock_breakers(conn, _probe_keys(tasks), create=False)
                ready, skipped = await self._lock_runs_of(conn, tasks)
                for task in ready:
                    await self._release_lost(conn, task, reason)
            self._follow_up(
                Skipped(t.task_id, child=False, duty=DutySkip.of(t, "lost", reason))
                for t in skipped
            )
            handed.update(t.task_id for t in skipped)
            released += len(ready)
            if not tasks and round_ > 0:
                break
        if released:
            log.warning("released %d task(s) of worker %s: %s", released, worker_id, reason)
        if handed:
            log.warning(
                "%d task(s) of worker %s are released once the transactions holding their "
                "runs let go: %s",
                len(handed),
                worker_id,
                reason,
            )
        await self.retry_stuck(worker_id, "lost")  # as for a worker that stops cleanly
        return released

    async def _release_lost(self, conn: Connection, task: Task, reason: str) -> None:
        """Release a locked task of a lost worker (`release_worker`)."""
        error = {"type": "WorkerLost", "message": reason, "non_retryable": False}
        outcome = await self.store.release_task(conn, task, error)
        if task.kind == "activity" and task.activity_id is not None:
            failed = ev.activity_failed(task.activity_id, error, task.attempt, outcome.will_retry)
            await self._record(
                conn, task, _attempt_events(outcome, failed), wake=not outcome.will_retry
            )

    async def reclaim_stale(self, conn: Connection) -> int:
        """Release tasks whose holder stopped heartbeating (the operator guide's 30 s rule);
        return how many were released here.

        The stale tasks are locked (skipping those another transaction holds), then the runs
        of the activity tasks among them at once, skipping (never waiting for) a run another
        transaction holds: holding one run while waiting for another deadlocked with a
        child's end, which holds the child and waits for its parent. Such a task is released
        by `finish_skipped`, from `duties.run_follow_ups`, once that transaction lets go (or,
        still stale, by a later round)."""
        tasks = await self.store.stale_tasks(conn, stale_after=self.config.stale_after)
        await self.store.lock_breakers(conn, _probe_keys(tasks), create=False)
        ready, skipped = await self._lock_runs_of(conn, tasks)
        for task in ready:
            await self._release_stale(conn, task)
        self._follow_up(
            Skipped(t.task_id, child=False, duty=DutySkip.of(t, "stale")) for t in skipped
        )
        return len(ready)

    async def _release_stale(self, conn: Connection, task: Task) -> None:
        """Release a locked stale task (`reclaim_stale`)."""
        outcome = await self.store.release_stale(conn, task)
        if task.kind == "activity" and task.activity_id is not None:
            event = ev.activity_timed_out(
                task.activity_id, "heartbeat", task.attempt, outcome.will_retry
            )
            await self._record(
                conn, task, _attempt_events(outcome, event), wake=not outcome.will_retry
            )
        log.warning("stale task %s (%s): %s", task.task_id, task.type_name, outcome.verdict)

    async def enforce_timeouts(self) -> int:
        """Fail the attempts whose schedule-to-start, start-to-close or heartbeat timeout has
        expired; each is an ``activity_timed_out`` event and counts as a failed attempt.
        Holders of timed-out claims are told to stop. Returns how many were failed here.

        One transaction locks the timed-out tasks (skipping those another transaction
        holds), the breakers their failures count against, then their runs at once,
        skipping (never waiting for) a run another transaction holds: holding one run while
        waiting for another deadlocked with a child's end, which holds the child and waits
        for its parent. Such a task is timed out by `finish_skipped`, from
        `duties.run_follow_ups`, once that transaction lets go (or, still timed out, by a
        later round)."""
        async with self.store.transaction() as conn:
            now = await self.store.now(conn)
            tasks = await self.store.timed_out_tasks(conn)
            # A failed attempt takes its breaker, then its run (as `fail_activity` does):
            # the breakers first, then, never waiting, the runs.
            claimed = [t.effective_breaker_key for t in tasks if t.status == "claimed"]
            await self.store.lock_breakers(conn, claimed, create=True)
            ready, skipped = await self._lock_runs_of(conn, tasks)
            for task in ready:
                await self._time_out(conn, task, now)
        self._follow_up(
            Skipped(t.task_id, child=False, duty=DutySkip.of(t, "timeout")) for t in skipped
        )
        return len(ready)

    async def _time_out(self, conn: Connection, task: Task, now: datetime) -> None:
        """Fail the attempt of a locked timed-out activity task (`enforce_timeouts`)."""
        assert task.activity_id is not None
        kind = timeout_kind(
            task.visible_at,
            task.claimed_at,
            task.heartbeat_at,
            now,
            schedule_to_start=task.schedule_to_start_s,
            start_to_close=task.start_to_close_s,
            heartbeat_timeout=task.heartbeat_timeout_s,
        ) or ("schedule_to_start" if task.status == "pending" else "start_to_close")
        if task.status == "claimed":
            await self.store.tell_holder_to_stop(conn, task)
        error = {
            "type": "ActivityTimeout",
            "message": f"{kind.replace('_', '-')} timeout expired",
            "timeout_kind": kind,
            "non_retryable": False,
        }
        outcome = await self.store.time_out(conn, task, kind, error)
        if kind != "schedule_to_start":
            await self._breaker_failure(conn, task)
        event = ev.activity_timed_out(
            task.activity_id, kind, outcome.task.attempt, outcome.will_retry
        )
        await self._record(conn, task, _attempt_events(outcome, event), wake=not outcome.will_retry)
        log.warning(
            "activity %s of workflow %s: %s timeout (attempt %d, %s)",
            task.type_name,
            task.workflow_id,
            kind,
            outcome.task.attempt,
            outcome.verdict,
        )

    async def _lock_runs_of(
        self, conn: Connection, tasks: Sequence[Task]
    ) -> tuple[list[Task], list[Task]]:
        """Lock, in one statement, the runs of the locked ``tasks`` that record in their run
        (activity tasks), skipping (never waiting for) those another transaction holds.
        Returns the tasks to handle now (those, and workflow tasks, which lock no run) and
        the tasks whose run another transaction holds (a task's row keeps its run: the run
        cannot be gone)."""
        runs = {t.run_id for t in tasks if t.activity_id is not None}
        if not runs:
            return list(tasks), []
        locked = await self.store.lock_runs_unless_held(conn, runs)
        ready = [t for t in tasks if t.activity_id is None or t.run_id in locked]
        return ready, [t for t in tasks if t.activity_id is not None and t.run_id not in locked]

    async def finish_skipped(self, task_id: uuid.UUID, skip: DutySkip) -> bool:
        """Do what a duty skipped (another transaction held the task's run): release a lost
        worker's task or a stale one, or fail a timed-out attempt; return whether it did.

        One transaction, which locks the task, waiting for whoever holds it, and goes on
        only while it is still the attempt the duty judged, in the same state (for a stale
        task: no heartbeat since; for a timed-out one: still past its timeout); then locks
        the task's run, waiting, as the results statement and `fail_activity` do (the task,
        then its breaker, then its one run). It holds no other run while it waits."""
        async with self.store.transaction() as conn:
            if skip.duty == "timeout":
                task = await self.store.lock_timed_out_task(
                    conn, task_id, attempt=skip.attempt, lease_token=skip.lease_token
                )
            elif skip.lease_token is None:
                return False
            else:
                task = await self.store.lock_claim(conn, task_id, skip.lease_token)
                if (
                    task is not None
                    and skip.duty == "stale"
                    and task.heartbeat_at != skip.heartbeat_at
                ):
                    task = None  # it heartbeated since: no longer stale
            if task is None:
                return False
            if skip.duty == "timeout":
                await self._time_out(conn, task, await self.store.now(conn))
            elif skip.duty == "stale":
                await self._release_stale(conn, task)
            else:
                await self._release_lost(conn, task, skip.reason)
            return True

    async def delete_expired(self, *, lock: int | None = None) -> int:
        """Delete ended runs older than the retention period, in bounded batches; each batch
        only while it holds advisory lock ``lock`` (then one control plane deletes at a time:
        another that finds it held ends its round)."""
        if self.config.retention_seconds <= 0:
            return 0
        deleted = 0
        while True:
            async with self.store.transaction() as conn:
                if lock is not None and not await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1)", lock
                ):
                    break
                batch = await self.store.delete_expired_runs(
                    conn, older_than=self.config.retention_seconds, limit=500
                )
            deleted += batch
            if batch < 500:
                break
        if deleted:
            log.info("retention: deleted %d ended workflow runs", deleted)
        return deleted

    # ------------------------------------------------------------------ timers

    async def fire_due_timers(self) -> int:
        """Fire every due timer (append timer_fired, wake the workflow); return how many.

        The due timers are read without locking, in batches of up to 200, and each batch is
        fired in one transaction (`Store.fire_timers`) that locks the batch's runs first and
        their timers second, as every other path does. It never waits for a lock: the runs
        are locked with SKIP LOCKED, and a run whose live workflow task another transaction
        holds is skipped too (a dead worker's release makes such a task pending without the
        run's lock, and inserting another would wait for that release). Holding runs while waiting
        for another, or a timer while waiting for its run, deadlocked with cancels,
        completions and retention. A timer whose run is skipped is left pending for the next
        round (another control plane may be firing it; the due-scanner looks again shortly);
        one whose run ended is marked cancelled, not fired.
        """
        fired = 0
        after = None
        while True:
            due = await self.store.due_timers(after=after, limit=200)
            if due:
                async with self.store.transaction() as conn:
                    fired += await self.store.fire_timers(conn, due)
            if len(due) < 200:
                return fired
            after = due[-1]

    # ------------------------------------------------------------------ schedules

    def _schedule_fields(
        self, schedule_id: str, spec: str, workflow_type: str, input: str, overlap: str
    ) -> Spec:
        check_name(schedule_id, "schedule_id", limit=MAX_SCHEDULE_ID_LENGTH)
        parsed = parse_spec(spec, "spec")
        check_type_name(workflow_type, "workflow_type")
        self.check_payload(input, "input")
        check_overlap(overlap)
        return parsed

    async def create_schedule(
        self,
        schedule_id: str,
        *,
        spec: str,
        workflow_type: str,
        input: str,
        overlap: str = "skip",
        paused: bool = False,
        replace: bool = False,
    ) -> tuple[ScheduleRecord, bool]:
        """Create a schedule (``paused``: created paused); returns it and whether it was
        created. The same definition again returns the schedule unchanged, paused or not (a
        retried create, or one made at every deploy); another one is refused unless
        ``replace``, which keeps what the schedule fired so far, whether it is paused, and its
        next firing when its spec is unchanged (else the next firing is the spec's next one
        from now).

        Raises:
            InvalidArgument: a field is malformed (the spec names its fault).
            ResourceExhausted: the input is over ``EVERRUNS_MAX_PAYLOAD_BYTES``.
            AlreadyExists: the id names a schedule with another definition, without
                ``replace``.
        """
        parsed = self._schedule_fields(schedule_id, spec, workflow_type, input, overlap)
        definition = ScheduleDefinition(parsed.text, workflow_type, input, overlap)
        async with self.store.transaction() as conn:
            now = await self.store.now(conn)
            existing = await self.store.lock_schedule(conn, schedule_id)
            if existing is None:
                created = await self.store.insert_schedule(
                    conn,
                    schedule_id,
                    definition,
                    next_fire_at=parsed.next_after(now),
                    paused=paused,
                )
                if created is not None:
                    return created, True
                # Another create of this id committed first: judged as if it came before.
                existing = await self.store.lock_schedule(conn, schedule_id)
                if existing is None:  # and was deleted since
                    raise FailedPrecondition(
                        f"schedule {schedule_id!r} was created and deleted meanwhile; retry"
                    )
            if existing.definition == definition:
                return existing, False
            if not replace:
                raise AlreadyExists(
                    f"schedule {schedule_id!r} exists with another definition "
                    "(replace it to change it)"
                )
            keep = existing.spec == parsed.text
            next_fire_at = existing.next_fire_at if keep else parsed.next_after(now)
            replaced = await self.store.replace_schedule(
                conn, schedule_id, definition, next_fire_at=next_fire_at
            )
            assert replaced is not None  # its row is locked
            return replaced, False

    async def pause_schedule(self, schedule_id: str, *, paused: bool) -> ScheduleRecord:
        """Pause a schedule, or resume it (idempotent). A resumed schedule fires next at its
        spec's next time from now: what it missed while paused is not fired.

        Raises:
            NotFound: no such schedule.
        """
        check_name(schedule_id, "schedule_id", limit=MAX_SCHEDULE_ID_LENGTH)
        async with self.store.transaction() as conn:
            existing = await self.store.lock_schedule(conn, schedule_id)
            if existing is None:
                raise NotFound(f"no schedule {schedule_id!r}")
            if existing.paused == paused:
                return existing
            next_fire_at = None
            if not paused:
                try:
                    spec = parse_spec(existing.spec, "spec")
                except InvalidArgument as exc:
                    raise FailedPrecondition(
                        f"schedule {schedule_id!r} cannot resume: its {exc}; create it again "
                        "with a spec that parses (replace)"
                    ) from None
                next_fire_at = spec.next_after(await self.store.now(conn))
            changed = await self.store.pause_schedule(
                conn, schedule_id, paused=paused, next_fire_at=next_fire_at
            )
            assert changed is not None  # its row is locked
            return changed

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule; the runs it started go on.

        Raises:
            NotFound: no such schedule (a retried delete whose first try succeeded, too).
        """
        check_name(schedule_id, "schedule_id", limit=MAX_SCHEDULE_ID_LENGTH)
        if not await self.store.delete_schedule(schedule_id):
            raise NotFound(f"no schedule {schedule_id!r}")

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord:
        """One schedule.

        Raises:
            NotFound: no such schedule.
        """
        check_name(schedule_id, "schedule_id", limit=MAX_SCHEDULE_ID_LENGTH)
        found = await self.store.get_schedule(schedule_id)
        if found is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        return found

    async def trigger_schedule(self, schedule_id: str) -> tuple[ScheduleRecord, WorkflowRun, bool]:
        """Start a run of a schedule now, besides its times (an operator's "run it now"), with
        the workflow id its firing would have at this second; whether paused or not, and
        whatever its overlap (asked for explicitly). It counts as a firing (``fired_count``,
        its last run); its next time stays. Returns the schedule, the run and whether it was
        created (not when the firing of this very second started it).

        Raises:
            NotFound: no such schedule.
            ResourceExhausted: ``EVERRUNS_MAX_PENDING_TASKS`` tasks already wait.
        """
        check_name(schedule_id, "schedule_id", limit=MAX_SCHEDULE_ID_LENGTH)
        async with self.store.transaction() as conn:
            schedule = await self.store.lock_schedule(conn, schedule_id)
            if schedule is None:
                raise NotFound(f"no schedule {schedule_id!r}")
            room = await self._room_for_firings(conn)
            if room is not None and room <= 0:
                raise self._queue_full()
            # The clock after the row's lock was had (a firing may have held it).
            now = (await self.store.statement_now(conn)).replace(microsecond=0)
            return await self._fire_at(conn, schedule, now, next_fire_at=schedule.next_fire_at)

    async def fire_due_schedules(self) -> int:
        """Fire every due schedule that is not paused; return how many runs started.

        Each batch of up to `_FIRE_BATCH` is one transaction that locks the due rows (SKIP
        LOCKED: a schedule another control plane is firing is left to it), starts their runs
        and moves each schedule's next firing on, so that a firing starts its run exactly
        once. A schedule due several times over (the control plane was down) fires once, for
        the first time it missed, then at its next time from now. A firing is skipped, and
        counted so, when the schedule's overlap is 'skip' and the run it started last is
        still open (a run that continued as new counts as open), or when
        ``EVERRUNS_MAX_PENDING_TASKS`` tasks already wait."""
        started = 0
        due_by: datetime | None = None
        while True:
            async with self.store.transaction() as conn:
                now = await self.store.now(conn)
                if due_by is None:
                    # Only what was due when the call began: a batch that takes longer than a
                    # schedule's interval must not find the schedules it fired due again (the
                    # call would not end).
                    due_by = self.schedules_fired_by = now
                due = await self.store.lock_due_schedules(conn, due_by=due_by, limit=_FIRE_BATCH)
                if not due:
                    return started
                room = await self._room_for_firings(conn)
                for schedule in due:
                    if await self._fire(conn, schedule, now, room):
                        started += 1
                        room = None if room is None else room - 1
            if len(due) < _FIRE_BATCH:
                return started

    async def _room_for_firings(self, conn: Connection) -> int | None:
        """How many runs the firings may start under ``EVERRUNS_MAX_PENDING_TASKS`` (None: no
        limit), counted under the starts' advisory lock (held to the commit)."""
        limit = self.config.max_pending_tasks
        if not limit:
            return None
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CAPACITY_LOCK)
        return max(0, limit - await self.store.count_pending(conn))

    async def _fire(
        self, conn: Connection, schedule: ScheduleRecord, now: datetime, room: int | None
    ) -> bool:
        """Fire one locked, due schedule; True when it started a run. A schedule the firing
        cannot use (a spec that does not parse, a row the database refuses to start a run of:
        edited by hand) is paused with the reason, not retried, and the batch goes on; only a
        lost connection or an aborted transaction fails the batch (its next round retries)."""
        try:
            async with conn.transaction():  # a savepoint: a firing that fails is undone alone
                return await self._fire_once(conn, schedule, now, room)
        except (EverrunsError, ValueError) as exc:
            if not _refused_by_data(exc):  # passing (a timeout, a lost connection): retried
                raise
            reason = f"{type(exc).__name__}: {exc}"
            log.error("schedule %r paused: %s", schedule.schedule_id, reason)
            await self.store.pause_schedule(
                conn, schedule.schedule_id, paused=True, next_fire_at=None, reason=reason
            )
            return False

    async def _fire_once(
        self, conn: Connection, schedule: ScheduleRecord, now: datetime, room: int | None
    ) -> bool:
        spec = parse_spec(schedule.spec, "spec")
        next_fire_at = spec.next_after(max(schedule.next_fire_at, now))
        last = schedule.last_workflow_id
        if schedule.overlap == "skip" and last and await self.store.workflow_id_open(conn, last):
            log.info(
                "schedule %r skipped its firing of %s: %s is still open",
                schedule.schedule_id,
                schedule.next_fire_at.isoformat(),
                last,
            )
        elif room is not None and room <= 0:
            log.warning(
                "schedule %r skipped its firing of %s: %d tasks are already waiting "
                "(EVERRUNS_MAX_PENDING_TASKS)",
                schedule.schedule_id,
                schedule.next_fire_at.isoformat(),
                self.config.max_pending_tasks,
            )
        else:
            _, _, created = await self._fire_at(
                conn, schedule, schedule.next_fire_at, next_fire_at=next_fire_at
            )
            return created
        await self.store.advance_schedule(
            conn, schedule, next_fire_at=next_fire_at, run=None, fired_at=schedule.next_fire_at
        )
        return False

    async def _fire_at(
        self, conn: Connection, schedule: ScheduleRecord, at: datetime, *, next_fire_at: datetime
    ) -> tuple[ScheduleRecord, WorkflowRun, bool]:
        """Start the run of ``schedule``'s firing for ``at`` (a time it fell due, or a
        trigger's) and record it, with ``next_fire_at`` its next time; returns the schedule as
        recorded, the run and whether it was created. A run open under that workflow id
        already (started by hand, or by a trigger in the second this time fell due) is the
        firing's run: not started twice."""
        request = StartRequest(
            schedule.workflow_type, schedule.input, schedule_workflow_id(schedule.schedule_id, at)
        )
        run, created = await self._start(conn, request)
        recorded = await self.store.advance_schedule(
            conn, schedule, next_fire_at=next_fire_at, run=run, created=created, fired_at=at
        )
        return recorded, run, created


class _UnclosedBreakers:
    """Whether some circuit breaker may be open or half-open, as the database said at most a
    second ago (`Store.any_unclosed_breaker`), or as this control plane learnt since."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._unclosed = True
        self._read_at = float("-inf")

    async def read(self) -> bool:
        """Raises:
        DatabaseError: the read failed (it is tried again on the next call)."""
        now = trio.current_time()
        if now - self._read_at >= 1.0:
            self._unclosed = await self._store.any_unclosed_breaker()
            self._read_at = now
        return self._unclosed

    def opened(self) -> None:
        """This control plane saw a breaker open or go half-open."""
        self._unclosed = True


def _orphaned_because(child: WorkflowRun, parent: WorkflowRun | None) -> str | None:
    """Why the open child run ``child``, its cancellation not requested, must be cancelled,
    given its ``parent`` (None: its row is gone); None if it may run on. A parent that ended
    leaves no child running; a parent whose cancellation was requested passes the request on
    to the children it started before it (not to those its code starts afterwards, having
    seen it: clean-up). ``cancel_requested_at`` is taken under the parent's lock, after every
    earlier child's start and before every later one's (`set_cancel_requested`)."""
    if not child.is_open or child.cancel_requested_at is not None:
        return None
    if parent is None:
        return None if child.parent_child_id is None else "its parent workflow run is gone"
    if not parent.is_open:
        return f"parent workflow {parent.workflow_id!r} ended {parent.status}"
    if parent.cancel_requested_at is not None and child.created_at < parent.cancel_requested_at:
        return f"parent workflow {parent.workflow_id!r} was cancelled"
    return None


def _probe_keys(tasks: Iterable[Task]) -> list[str]:
    """The breaker keys of the claimed activity tasks among ``tasks``: a release writes the
    breaker of one that was a half-open breaker's probe (`Store.release_probe`)."""
    return [t.effective_breaker_key for t in tasks if t.may_be_probe]


def _attempt_end(outcome: FailOutcome, event: dict[str, Any]) -> dict[str, Any]:
    """The event that ends an activity's attempt: ``event`` (its failure or timeout), or
    ``activity_cancelled`` when the task was cancelled instead of retried (its cancellation
    had been requested), so that the workflow sees ActivityCancelled, as when the holder
    reports the cancellation itself."""
    activity_id = outcome.task.activity_id
    if outcome.cancelled and activity_id is not None:
        return ev.activity_cancelled(activity_id)
    return event


def _attempt_events(outcome: FailOutcome, event: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of an attempt the control plane ended (its holder lost or silent, or a
    timeout): ``activity_started`` on the holder, when there was one, then how it ended. A
    holder that reports its attempt records the same pair (see `fail_activity`), so every
    attempt's end follows its start in the history, whoever ended it."""
    end = _attempt_end(outcome, event)
    activity_id = outcome.task.activity_id
    if outcome.held_by is None or activity_id is None:
        return [end]
    return [ev.activity_started(activity_id, outcome.task.attempt, outcome.held_by), end]


@attrs.define
class _Outcome:
    """What a workflow task's commands add: events, activities to enqueue, how the run ends."""

    events: list[NewEvent]
    activities: list[NewTask] = attrs.field(factory=list)
    end: RunEnd | None = None
    refused: set[str] = attrs.field(factory=set)
    """Activities that failed at once, never enqueued (their input is too large)."""
    wake: bool = False
    """The commands added an input event of their own (a child refused at once): the run
    needs a workflow task to see it."""


def repeats_failure(last_event: Mapping[str, Any], error: Mapping[str, Any]) -> bool:
    """Whether ``last_event`` is a ``workflow_task_failed`` of the same error (type and
    message; the worker, its traceback aside): recording ``error`` after it would add nothing."""
    if last_event.get("type") != ev.WORKFLOW_TASK_FAILED:
        return False
    before = last_event.get("error")
    return (
        isinstance(before, Mapping)
        and before.get("type") == error.get("type")
        and before.get("message") == error.get("message")
    )


def _size_error(config: ServerConfig, text: str, what: str) -> str | None:
    """Why a payload is over ``EVERRUNS_MAX_PAYLOAD_BYTES``, or None when it is not."""
    size = text_bytes(text)
    if size <= config.max_payload_bytes:
        return None
    return (
        f"{what} is too large: {size} bytes; the limit is "
        f"{config.max_payload_bytes} bytes (EVERRUNS_MAX_PAYLOAD_BYTES)"
    )


def _check_size(config: ServerConfig, text: str, what: str) -> str:
    """Refuse a payload a client or an activity sends over ``EVERRUNS_MAX_PAYLOAD_BYTES``."""
    message = _size_error(config, text, what)
    if message is not None:
        raise ResourceExhausted(message)
    return text


def _too_large(config: ServerConfig, text: str, what: str) -> dict[str, Any] | None:
    """The error of a payload that workflow code sends over ``EVERRUNS_MAX_PAYLOAD_BYTES`` (an
    activity's or child's input, its result), or None. Not a refusal of the whole decision,
    which replay would make again and again (the run stuck for good): the one command fails,
    in a way the workflow code sees and may handle (`ActivityError`, `ChildWorkflowError`),
    or its run fails."""
    message = _size_error(config, text, what)
    if message is None:
        return None
    return {"type": TOO_LARGE_ERROR, "message": message, "non_retryable": True}


TOO_LARGE_ERROR = "everruns.errors.ResourceExhausted"
"""The error type of a payload over the limit, as workflow code sees it."""


def _plan(
    config: ServerConfig, command: Command, outcome: _Outcome, *, locked: bool = False
) -> bool:
    """Add a command that needs no read (an activity, the run's end) to ``outcome``; False for
    a command that must be applied under the run's lock (timers, children, and, unless
    ``locked``, an activity whose input is too large: it fails at once, which needs a
    workflow task to tell the code).

    Raises:
        InvalidArgument: a second command that ends the run.
    """
    if isinstance(command, ScheduleActivity):
        options = command.options
        what = f"input of activity {command.activity_id}"
        input_text = encode_text(command.input, what=what)
        error = _too_large(config, input_text, what)
        if error is not None:
            if not locked:
                return False
            outcome.events.append(NewEvent.of(command.to_event(), input=input_text))
            failed = ev.activity_failed(command.activity_id, error, 1, False)
            outcome.events.append(NewEvent.of(failed))
            outcome.refused.add(command.activity_id)
            outcome.wake = True
            return True
        outcome.activities.append(
            NewTask(
                activity_type=command.activity_type,
                activity_id=command.activity_id,
                input=input_text,
                retry=options.retry or RetryPolicy(),
                priority=options.priority,
                schedule_to_start_s=options.schedule_to_start_timeout
                or config.schedule_to_start_timeout,
                start_to_close_s=options.start_to_close_timeout or config.start_to_close_timeout,
                heartbeat_timeout_s=options.heartbeat_timeout,
                breaker_key=options.breaker_key,
            )
        )
        outcome.events.append(NewEvent.of(command.to_event(), input=input_text))
        return True
    if isinstance(command, RecordPatch):  # only its event: the code took a new branch
        outcome.events.append(NewEvent.of(command.to_event()))
        return True
    if isinstance(command, CompleteWorkflow | FailWorkflow | CancelWorkflow):
        if outcome.end is not None:
            raise InvalidArgument(f"the run already ended {outcome.end.status}: {command!r}")
        if isinstance(command, CompleteWorkflow):
            result = encode_text(command.result, what="workflow result")
            error = _too_large(config, result, "workflow result")
            if error is not None:
                outcome.end = RunEnd("failed", error=error)
                outcome.events.append(NewEvent.of(ev.workflow_failed(error)))
            else:
                outcome.end = RunEnd("completed", result=result)
                outcome.events.append(NewEvent.of(command.to_event(), result=result))
        elif isinstance(command, FailWorkflow):
            outcome.end = RunEnd("failed", error=dict(command.error))
            outcome.events.append(NewEvent.of(command.to_event()))
        else:
            outcome.end = RunEnd("cancelled")
            outcome.events.append(NewEvent.of(command.to_event()))
        return True
    return False


def _continue_as_new(
    config: ServerConfig,
    command: ContinueAsNewWorkflow,
    signals: tuple[NewEvent, ...],
    outcome: _Outcome,
) -> None:
    """Plan a run's end ``continued_as_new``: its event names the new run (its id chosen
    here; `Engine._continue` starts it once the end is written). An input over the payload
    limit fails the run instead, as a result over it does."""
    if outcome.end is not None:
        raise InvalidArgument(f"the run already ended {outcome.end.status}: {command!r}")
    what = "input of continue_as_new"
    input_text = encode_text(command.input, what=what)
    error = _too_large(config, input_text, what)
    if error is not None:
        outcome.end = RunEnd("failed", error=error)
        outcome.events.append(NewEvent.of(ev.workflow_failed(error)))
        return
    run_id = uuid.uuid4()
    outcome.end = RunEnd(
        "continued_as_new",
        continued=Continuation(run_id, input_text, signals, command.cancel),
    )
    event = ev.workflow_continued_as_new(None, command.signals, str(run_id))
    outcome.events.append(NewEvent.of(event, input=input_text))


def _starts_afresh(task: Task, history: Sequence[StoredEvent]) -> bool:
    """Whether workflow task ``task`` may let its worker start activities ahead of its
    decision (breakers aside): only the first workflow task of a run (its history is the
    start alone), on its first attempt.

    A later workflow task reacts to events (results, signals, timers, a cancel request);
    when this rule was made, more of them arriving meanwhile superseded its decision, the
    activities started ahead being cancelled and started again by the next one (side effects
    run twice with nothing gone wrong). Input is now held past a decision and only a cancel
    request (or an end) supersedes one, so this could widen; not measured, not done. And a
    task handed out again lost its worker (or its lease) before its decision was applied,
    maybe to an activity started ahead that crashed the worker, which no attempt count would
    stop; this time the activities are recorded first, and their attempts count."""
    return task.attempt == 1 and all(e.type == "workflow_started" for e in history)


def _take_started_ids(outcome: _Outcome, started: Mapping[str, uuid.UUID]) -> None:
    """Give the activities the worker started ahead the task ids it chose for them.

    Raises:
        InvalidArgument: ``started`` names an activity these commands do not schedule.
    """
    if not started:
        return
    scheduled = {task.activity_id for task in outcome.activities}
    # One refused at once is not handed back: the worker cancels what it started ahead.
    unknown = sorted(set(started) - scheduled - outcome.refused)
    if unknown:
        raise InvalidArgument(
            f"started names activities these commands do not schedule: {', '.join(unknown)}"
        )
    outcome.activities[:] = [
        attrs.evolve(task, task_id=started[task.activity_id])
        if task.activity_id in started
        else task
        for task in outcome.activities
    ]


def _claim_keys(workflow_types: Sequence[str], activity_types: Sequence[str]) -> list[str]:
    """The notifier keys of the task types a claimer serves."""
    return [f"workflow:{t}" for t in workflow_types] + [f"activity:{t}" for t in activity_types]


def _earliest(*seconds: float | None) -> float | None:
    known = [s for s in seconds if s is not None]
    return min(known) if known else None


def _run_uuid(run_id: str) -> uuid.UUID | None:
    if not run_id:
        return None
    try:
        return uuid.UUID(run_id)
    except ValueError:
        raise InvalidArgument(f"run_id {shown(run_id)} is not a UUID") from None


def parse_task_id(task_id: str) -> uuid.UUID:
    """A task id from the wire, or InvalidArgument."""
    try:
        return uuid.UUID(task_id)
    except ValueError:
        raise InvalidArgument(f"task_id {shown(task_id)} is not a UUID") from None


def _parse_commands(text: str) -> list[Command]:
    try:
        raw = json.loads(text) if text else []
    except ValueError as exc:
        raise InvalidArgument(f"commands are not valid JSON: {exc}") from exc
    if not isinstance(raw, list):
        raise InvalidArgument("commands must be a JSON array")
    try:
        return [command_from_dict(item) for item in raw]
    except InvalidArgument:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"malformed command: {exc}") from exc


_YEAR_3000 = 32503680000.0


# SQLSTATE classes of errors a row's contents cause (data exceptions, integrity constraint
# violations), and an error raised by a trigger of the operator's: a firing refused so is
# refused again next time. Any other (a statement timeout, a lock timeout, a lost connection,
# a deadlock) may pass.
_DATA_ERROR_CLASSES = ("22", "23")
_RAISED_BY_TRIGGER = "P0001"


def _refused_by_data(exc: BaseException) -> bool:
    """Whether a schedule's firing failed because of the schedule's row (its spec, its names,
    what a trigger makes of them), not because of the database's state."""
    state = sqlstate_of(exc)
    if state is None:  # raised by everruns itself: a spec that does not parse, a year 9999
        return not isinstance(exc, DatabaseError)
    return state[:2] in _DATA_ERROR_CLASSES or state == _RAISED_BY_TRIGGER


def schedule_workflow_id(schedule_id: str, fire_at: datetime) -> str:
    """The workflow id of a schedule's firing at ``fire_at``: ``nightly@2026-11-28T03:00:00Z``
    (so each firing starts at most one run, and its id tells when it was due)."""
    return f"{schedule_id}@{fire_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def utc_from_timestamp(value: float, what: str = "time") -> datetime:
    """A wire timestamp (unix seconds) as an aware datetime; 0 (or less) means now.

    Raises:
        InvalidArgument: ``value`` is not a number of seconds before the year 3000 (NaN,
            infinite).
    """
    if value <= 0:
        return datetime.now(UTC)
    if not value < _YEAR_3000:  # also NaN
        raise InvalidArgument(f"{what} {value!r} is not a time")
    return datetime.fromtimestamp(value, UTC)
