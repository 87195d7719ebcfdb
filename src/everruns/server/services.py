"""The gRPC services of the control plane, as Trio code: proto requests in, proto replies out.

Each method validates its request's fields, calls the engine or the store, and converts the
answer. Errors are everruns exceptions; the bridge in ``everruns._aio.grpc`` turns them into gRPC
statuses with their messages. No SQL and no engine decisions here.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import trio

from everruns._aio.grpc import status_for
from everruns._proto.everruns import v1 as pb
from everruns.domain.limits import (
    MAX_INCARNATION_LENGTH,
    MAX_INT4,
    check_name,
    check_text,
    check_type_name,
    check_worker_id,
    escape_nul_in_json,
    shown,
)
from everruns.domain.packing import pack_uuids, unpack_blobs
from everruns.domain.status import WORKFLOW_STATUSES
from everruns.errors import EverrunsError, InvalidArgument, NotFound
from everruns.server.engine import (
    ClaimedTask,
    Engine,
    FollowUpDecision,
    StartRequest,
    WorkflowTaskCompletion,
    parse_task_id,
    request_run_id,
    utc_from_timestamp,
)
from everruns.store.models import (
    DeadLetter,
    Incarnation,
    ScheduleRecord,
    StoredEvent,
    Task,
    TaskRef,
    WorkerRecord,
    WorkflowRun,
)

__all__ = ["UndeliveredTasks", "WorkerService", "WorkflowService"]

log = logging.getLogger("everruns.server")

HEARTBEAT_INTERVAL = 10.0
_MAX_POLL_WAIT = 60.0
_MAX_STARTS = 10_000  # runs per StartWorkflows call
_MAX_BATCH = 1000  # results per CompleteActivityTasks call, and tasks claimed by one
_CANCEL_KEEPALIVE = 15.0


def _incarnation(token: str) -> str | None:
    """A worker's incarnation token as its request carries it; None for none (an older
    worker)."""
    return check_text(token, "incarnation", limit=MAX_INCARNATION_LENGTH) or None


def _ts(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


def _text(data: bytes, what: str) -> str:
    """A JSON payload from the wire as text ('null' when empty)."""
    if not data:
        return "null"
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what} is not UTF-8: {exc}") from exc


def _bytes(text: str | None) -> bytes:
    return b"" if text is None else text.encode()


def _json_bytes(value: Any) -> bytes:
    return b"" if value is None else json.dumps(value, ensure_ascii=False).encode()


def _event(event: StoredEvent) -> pb.HistoryEvent:
    return pb.HistoryEvent(
        sequence_num=event.sequence_num,
        type=event.type,
        data=event.payload.encode(),
        time=_ts(event.created_at),
    )


def _task(claimed: ClaimedTask) -> pb.Task:
    task = claimed.task
    return pb.Task(
        task_id=str(task.task_id),
        kind=task.kind,
        lease_token=task.lease_token or 0,
        workflow_id=task.workflow_id,
        run_id=str(task.run_id),
        workflow_type=claimed.workflow_type or (task.type_name if task.kind == "workflow" else ""),
        activity_type=task.type_name if task.kind == "activity" else "",
        activity_id=task.activity_id or "",
        input=_bytes(task.input) if task.kind == "activity" else b"",
        attempt=task.attempt,
        max_attempts=task.max_attempts if task.kind == "activity" else 1,
        heartbeat_timeout_s=task.heartbeat_timeout_s or 0.0,
        start_to_close_s=task.start_to_close_s or 0.0,
        scheduled_at=_ts(task.visible_at),
        claimed_at=_ts(claimed.claimed_at),
        history=[_event(e) for e in claimed.history],
        heartbeat_details=_bytes(task.heartbeat_details),
        may_start_activities=claimed.may_start_activities,
    )


def _started(
    request: pb.CompleteWorkflowTaskRequest, ids: set[uuid.UUID] | None = None
) -> dict[str, uuid.UUID]:
    """The activities a worker started ahead of its commands: activity id -> chosen task id.

    ``ids``: the task ids named so far by the call (the other completions of a batch); this
    one's are added.

    Raises:
        InvalidArgument: an id is missing, not a UUID, or named twice.
    """
    started: dict[str, uuid.UUID] = {}
    ids = set() if ids is None else ids
    for item in request.started:
        if not item.activity_id:
            raise InvalidArgument("started: an activity id is empty")
        task_id = parse_task_id(item.task_id)
        if item.activity_id in started or task_id in ids:
            raise InvalidArgument(
                f"started names activity {item.activity_id!r} or task {task_id} twice"
            )
        started[item.activity_id] = task_id
        ids.add(task_id)
    return started


def _lease(token: int) -> int:
    if token <= 0:
        raise InvalidArgument(f"lease_token {token} is not a lease token")
    return token


def _wait_s(value: float) -> float:
    """A long poll's wait from the wire, capped at `_MAX_POLL_WAIT`."""
    if not value >= 0:  # also NaN, which no timeout accepts
        raise InvalidArgument(f"wait_s must not be negative or NaN, got {value}")
    return min(value, _MAX_POLL_WAIT)


def _limit(value: int, default: int, most: int) -> int:
    """A page size from the wire: 0 means ``default``, and at most ``most``."""
    if value < 0:
        raise InvalidArgument(f"limit must not be negative, got {value}")
    return min(value or default, most)


def _error(data: bytes) -> str:
    """A failure report's error from the wire, its NUL characters escaped: PostgreSQL cannot
    store them, and a failure report is kept whatever it holds."""
    return escape_nul_in_json(_text(data, "error"))


_GIVE_BACKS_AT_ONCE = 4  # transactions giving back undelivered replies' tasks at a time


class UndeliveredTasks:
    """What the control plane does with a poll's reply its worker never takes (the bridge's
    `Undelivered`): the tasks it claimed go back to the queue at once, under the lease the
    reply carried, instead of waiting for the stale rule while a live worker that never heard
    of them holds them.

    Only a poll's: a worker that gives up on a completion sends the same request again, and
    the control plane hands the retry the tasks the first call claimed for it, under the same
    leases (`Engine._handed_out_before`), among them the activities the worker started ahead
    of its decision and runs already. Giving those back would have them run twice."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._limiter = trio.CapacityLimiter(_GIVE_BACKS_AT_ONCE)

    def handed(self, reply: Any) -> list[tuple[str, int, str, str]]:
        if type(reply) is not pb.PollTasksResponse:
            return []
        # Made for every poll's reply, kept for the latest ones: plain fields, no history.
        return [
            (
                task.task_id,
                task.lease_token,
                task.kind,
                task.activity_type if task.kind == "activity" else task.workflow_type,
            )
            for task in reply.tasks
        ]

    async def give_back(self, handed: Sequence[tuple[str, int, str, str]]) -> None:
        try:
            refs = [
                TaskRef(uuid.UUID(id_), lease, kind, type_) for id_, lease, kind, type_ in handed
            ]
            async with self._limiter:
                await self.engine.give_back_undelivered(refs)
        except Exception:  # one give-back failing must not end the server's methods
            log.exception("could not give back %d task(s) of an undelivered reply", len(handed))


class WorkerService:
    """WorkerService: what workers call."""

    def __init__(self, engine: Engine, shutting_down: trio.Event) -> None:
        self.engine = engine
        self.store = engine.store
        self._shutting_down = shutting_down

    async def register_worker(self, request: pb.RegisterWorkerRequest) -> pb.RegisterWorkerResponse:
        check_worker_id(request.worker_id)
        if request.max_concurrency < 1:
            raise InvalidArgument(
                f"max_concurrency must be at least 1, got {request.max_concurrency}"
            )
        for name in [*request.activity_types, *request.workflow_types]:
            check_type_name(name, "type name")
        check_text(request.host, "host")
        check_text(request.version, "version")
        self.engine.note_worker(request.worker_id, request.activity_types, request.workflow_types)
        record = await self.store.register_worker(
            request.worker_id,
            activity_types=request.activity_types,
            workflow_types=request.workflow_types,
            max_concurrency=request.max_concurrency,
            host=request.host,
            pid=request.pid or None,
            version=request.version,
            incarnation=_incarnation(request.incarnation),
        )
        log.info(
            "worker %s registered (%d slots; workflows %s; activities %s)",
            record.id,
            record.max_concurrency,
            ",".join(record.workflow_types) or "-",
            ",".join(record.activity_types) or "-",
        )
        await self.engine.retry_stuck(record.id, "registered", record.workflow_types)
        # Beat at least three times per stale limit, so a healthy task is never reclaimed.
        interval = min(
            HEARTBEAT_INTERVAL,
            self.engine.config.stale_after / 3,
            self.engine.config.worker_lost_after / 3,
        )
        return pb.RegisterWorkerResponse(
            heartbeat_interval_s=interval,
            server_time=_ts(record.last_heartbeat_at),
            max_message_bytes=self.engine.config.max_message_bytes,
        )

    async def worker_heartbeat(
        self, request: pb.WorkerHeartbeatRequest
    ) -> pb.WorkerHeartbeatResponse:
        check_worker_id(request.worker_id)
        status = request.status or "active"
        incarnation = _incarnation(request.incarnation)
        if status == "stopped":  # a clean exit: the worker says goodbye
            await self.store.stop_worker(request.worker_id, incarnation=incarnation)
            # In a rolling deploy, a run the old code made stuck meanwhile gets another try
            # as the old workers leave (another worker serving its type takes it).
            await self.engine.retry_stuck(request.worker_id, "stopped")
            return pb.WorkerHeartbeatResponse(ok=True, known=True)
        if status not in ("active", "draining"):
            raise InvalidArgument(f"status must be active, draining or stopped, got {status!r}")
        record = await self.store.worker_heartbeat(
            request.worker_id,
            current_load=max(0, request.current_load),
            status=status,
            incarnation=incarnation,
        )
        return pb.WorkerHeartbeatResponse(ok=record is not None, known=record is not None)

    async def poll_tasks(self, request: pb.PollTasksRequest) -> pb.PollTasksResponse:
        check_worker_id(request.worker_id)
        wait_s = _wait_s(request.wait_s)
        claimed = await self.engine.poll(
            request.worker_id,
            workflow_types=request.workflow_types,
            activity_types=request.activity_types,
            max_tasks=min(request.max_tasks, 1000),
            wait_s=wait_s,
        )
        return pb.PollTasksResponse(tasks=[_task(c) for c in claimed])

    async def record_heartbeat(
        self, request: pb.RecordHeartbeatRequest
    ) -> pb.RecordHeartbeatResponse:
        details = _text(request.details, "details") if request.details else None
        cancel = await self.engine.heartbeat(
            parse_task_id(request.task_id), _lease(request.lease_token), details
        )
        return pb.RecordHeartbeatResponse(cancel_requested=cancel)

    async def complete_workflow_task(
        self, request: pb.CompleteWorkflowTaskRequest
    ) -> pb.CompleteWorkflowTaskResponse:
        accepted, superseded, eager = await self.engine.complete_workflow_task(
            parse_task_id(request.task_id),
            _lease(request.lease_token),
            request.worker_id,
            request.seen_sequence,
            _text(request.commands, "commands") if request.commands else "[]",
            utc_from_timestamp(request.claim_time, "claim_time"),
            max_eager=max(0, request.max_eager_tasks),
            started=_started(request),
        )
        return pb.CompleteWorkflowTaskResponse(
            accepted=accepted, superseded=superseded, eager_tasks=[_task(c) for c in eager]
        )

    async def complete_workflow_tasks(
        self, request: pb.CompleteWorkflowTasksRequest
    ) -> pb.CompleteWorkflowTasksResponse:
        if len(request.completions) > _MAX_BATCH:
            raise InvalidArgument(
                f"at most {_MAX_BATCH} completions per call, got {len(request.completions)}"
            )
        # Those on the fast path are applied in one statement; the others each in its own
        # transaction, concurrently. Answered in request order.
        outcomes = [pb.WorkflowTaskOutcome() for _ in request.completions]
        by_worker: dict[str, list[tuple[int, WorkflowTaskCompletion]]] = {}
        started_ids: set[uuid.UUID] = set()
        for n, completion in enumerate(request.completions):
            try:
                parsed = WorkflowTaskCompletion(
                    parse_task_id(completion.task_id),
                    _lease(completion.lease_token),
                    completion.seen_sequence,
                    _text(completion.commands, "commands") if completion.commands else "[]",
                    utc_from_timestamp(completion.claim_time, "claim_time"),
                    max(0, completion.max_eager_tasks),
                    _started(completion, started_ids),
                )
            except EverrunsError as why:
                outcomes[n] = pb.WorkflowTaskOutcome(**_refused(why))
            else:
                by_worker.setdefault(completion.worker_id, []).append((n, parsed))
        for worker_id, items in by_worker.items():  # one worker's, in practice
            done = await self.engine.complete_workflow_tasks(worker_id, [c for _, c in items])
            for (n, _), result in zip(items, done, strict=True):
                if isinstance(result, EverrunsError):
                    outcomes[n] = pb.WorkflowTaskOutcome(**_refused(result))
                else:
                    accepted, superseded, eager = result
                    outcomes[n] = pb.WorkflowTaskOutcome(
                        accepted=accepted,
                        superseded=superseded,
                        eager_tasks=[_task(c) for c in eager],
                    )
        return pb.CompleteWorkflowTasksResponse(outcomes=outcomes)

    async def fail_workflow_task(
        self, request: pb.FailWorkflowTaskRequest
    ) -> pb.FailWorkflowTaskResponse:
        await self.engine.fail_workflow_task(
            parse_task_id(request.task_id),
            _lease(request.lease_token),
            request.worker_id,
            _error(request.error),
            non_determinism=request.non_determinism,
            seen_sequence=request.seen_sequence,
        )
        return pb.FailWorkflowTaskResponse()

    async def complete_activity_task(
        self, request: pb.CompleteActivityTaskRequest
    ) -> pb.CompleteActivityTaskResponse:
        eager = await self.engine.complete_activity(
            parse_task_id(request.task_id),
            _lease(request.lease_token),
            request.worker_id,
            _text(request.result, "result"),
            max_eager=max(0, request.max_eager_tasks),
        )
        return pb.CompleteActivityTaskResponse(accepted=True, eager_tasks=[_task(c) for c in eager])

    async def complete_activity_tasks(
        self, request: pb.CompleteActivityTasksRequest
    ) -> pb.CompleteActivityTasksResponse:
        check_worker_id(request.worker_id)
        if len(request.results) > _MAX_BATCH:
            raise InvalidArgument(
                f"at most {_MAX_BATCH} results per call, got {len(request.results)}"
            )
        # Each result's verdict, by position: refused here (malformed) or by the engine.
        verdicts: list[EverrunsError | None] = [None] * len(request.results)
        parsed: list[tuple[int, tuple[uuid.UUID, int, str]]] = []
        for n, item in enumerate(request.results):
            try:
                parsed.append(
                    (
                        n,
                        (
                            parse_task_id(item.task_id),
                            _lease(item.lease_token),
                            _text(item.result, "result"),
                        ),
                    )
                )
            except EverrunsError as exc:
                verdicts[n] = exc
        position = {n: p for p, (n, _) in enumerate(parsed)}
        applied, claimed, decided = await self.engine.complete_activities(
            request.worker_id,
            [result for _, result in parsed],
            max_new_tasks=min(max(0, request.max_new_tasks), _MAX_BATCH),
            follow_ups=_follow_ups(request.decisions, position),
        )
        for (n, _), verdict in zip(parsed, applied, strict=True):
            verdicts[n] = verdict
        outcomes = [
            pb.ActivityResultOutcome(accepted=True, decided=position.get(n) in decided)
            if why is None
            else pb.ActivityResultOutcome(**_refused(why))
            for n, why in enumerate(verdicts)
        ]
        return pb.CompleteActivityTasksResponse(
            outcomes=outcomes, new_tasks=[_task(c) for c in claimed]
        )

    async def fail_activity_task(
        self, request: pb.FailActivityTaskRequest
    ) -> pb.FailActivityTaskResponse:
        will_retry, delay = await self.engine.fail_activity(
            parse_task_id(request.task_id),
            _lease(request.lease_token),
            request.worker_id,
            _error(request.error),
            non_retryable=request.non_retryable,
            cancelled=request.cancelled,
            release=request.release,
        )
        retry_at = time.time() + delay if will_retry else 0.0
        return pb.FailActivityTaskResponse(will_retry=will_retry, retry_at=retry_at)

    async def stream_cancellations(
        self,
        request: pb.StreamCancellationsRequest,
        send: Callable[[pb.Cancellation], Awaitable[None]],
    ) -> None:
        """Push cancellations of the worker's tasks; when the worker's connection drops (and
        this control plane is not itself shutting down), release the tasks it held.

        The stream belongs to an incarnation of the worker: the one its token names, or for
        a worker that sends none, the registration current when it opens (a worker
        registers, then opens its stream). Its drop releases nothing while another stream of
        the same incarnation is open here (a live worker reconnected); otherwise it releases
        that incarnation's tasks, and marks the worker lost only if no other incarnation
        registered since (`Engine.release_worker`)."""
        worker_id = check_worker_id(request.worker_id)
        token = _incarnation(request.incarnation)
        if token is not None:
            incarnation = Incarnation.of_token(token)
        else:
            registered_at = await self.store.worker_registered_at(worker_id)
            incarnation = Incarnation.registered(registered_at or BEFORE_ANY_REGISTRATION)
        try:
            with self.engine.notifier.subscribe_cancellations(worker_id, incarnation) as notices:
                await send(pb.Cancellation(keepalive=True))
                while True:
                    with trio.move_on_after(_CANCEL_KEEPALIVE) as idle:
                        task_id, lease = await notices.receive()
                    if idle.cancelled_caught:
                        await send(pb.Cancellation(keepalive=True))
                    else:
                        await send(
                            pb.Cancellation(
                                task_id=task_id, lease_token=lease, reason="cancel requested"
                            )
                        )
        finally:
            if not self._shutting_down.is_set() and not self.engine.notifier.has_cancel_stream(
                worker_id, incarnation
            ):
                with trio.move_on_after(10, shield=True):
                    await self.engine.release_worker(
                        worker_id,
                        f"connection of worker {worker_id} dropped",
                        incarnation=incarnation,
                    )


BEFORE_ANY_REGISTRATION = datetime.min.replace(tzinfo=UTC)
"""The incarnation of a cancellation stream without a token opened before its worker ever
registered: older than any registration of it."""


MAX_CANCEL_REASON = 4000
"""Characters of a cancel reason (a line for people; it is recorded in the history)."""


class WorkflowService:
    """WorkflowService: what clients and operators call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store

    async def start_workflow(self, request: pb.StartWorkflowRequest) -> pb.StartWorkflowResponse:
        ((run, created),) = await self.engine.start_workflows([_start_request(request)])
        return pb.StartWorkflowResponse(
            workflow_id=run.workflow_id, run_id=str(run.run_id), created=created
        )

    async def start_workflows(self, request: pb.StartWorkflowsRequest) -> pb.StartWorkflowsResponse:
        starts = (
            [_start_request(r) for r in request.requests]
            if request.requests
            else _columnar_starts(request)
        )
        if len(starts) > _MAX_STARTS:
            raise InvalidArgument(f"at most {_MAX_STARTS} workflows per StartWorkflows call")
        results = await self.engine.start_workflows(starts)
        if request.packed_reply:
            return pb.StartWorkflowsResponse(
                packed_run_ids=pack_uuids(run.run_id for run, _ in results),
                packed_created=bytes(created for _, created in results),
                packed_generated_ids=pack_uuids(
                    run.workflow_id
                    for (run, _), start in zip(results, starts, strict=True)
                    if start.workflow_id is None
                ),
            )
        if request.columnar_reply:
            return pb.StartWorkflowsResponse(
                workflow_ids=[run.workflow_id for run, _ in results],
                run_ids=[str(run.run_id) for run, _ in results],
                created=[created for _, created in results],
            )
        return pb.StartWorkflowsResponse(
            responses=[
                pb.StartWorkflowResponse(
                    workflow_id=run.workflow_id, run_id=str(run.run_id), created=created
                )
                for run, created in results
            ]
        )

    async def signal_workflow(self, request: pb.SignalWorkflowRequest) -> pb.SignalWorkflowResponse:
        await self.engine.signal(
            request.workflow_id, request.run_id, request.name, _text(request.payload, "payload")
        )
        return pb.SignalWorkflowResponse()

    async def cancel_workflow(self, request: pb.CancelWorkflowRequest) -> pb.CancelWorkflowResponse:
        # The reason goes into the run's history, which every later workflow task carries.
        check_text(request.reason, "cancel reason", limit=MAX_CANCEL_REASON)
        await self.engine.cancel(request.workflow_id, request.run_id, request.reason)
        return pb.CancelWorkflowResponse()

    async def _describe(self, run: WorkflowRun) -> pb.WorkflowDescription:
        tasks = await self.store.tasks_of_run(run.run_id)
        # The database's clock, which wrote visible_at (this host's may differ).
        now = await self.store.now() if any(t.status == "pending" for t in tasks) else None
        waiting = False
        timers: list[tuple[str, datetime]] = []
        if run.is_open:
            timers = await self.store.pending_timers(run.run_id)
            waiting = not await self.store.worker_serves(run.workflow_type, "workflow")
            for type_name in sorted({t.type_name for t in tasks if t.status == "pending"}):
                if waiting:
                    break
                waiting = not await self.store.worker_serves(type_name, "activity")
        parent_wid = ""
        if run.parent_run_id is not None:
            try:
                parent_wid = (await self.store.get_run(run.parent_run_id)).workflow_id
            except NotFound:
                parent_wid = ""
        return pb.WorkflowDescription(
            workflow_id=run.workflow_id,
            run_id=str(run.run_id),
            workflow_type=run.workflow_type,
            status=run.status,
            input=_bytes(run.input),
            result=_bytes(run.result),
            error=_json_bytes(run.error),
            created_at=_ts(run.created_at),
            updated_at=_ts(run.updated_at),
            completed_at=_ts(run.completed_at),
            stuck_reason=run.stuck_reason or "",
            parent_workflow_id=parent_wid,
            pending_activities=[_activity_info(t, now) for t in tasks],
            waiting_for_worker=waiting,
            pending_timers=[pb.PendingTimer(timer_id=t, fire_at=_ts(at)) for t, at in timers],
            continued_run_id=str(run.continued_run_id or ""),
        )

    async def describe_workflow(
        self, request: pb.DescribeWorkflowRequest
    ) -> pb.DescribeWorkflowResponse:
        run = await self.engine.find_run(request.workflow_id, request.run_id)
        return pb.DescribeWorkflowResponse(workflow=await self._describe(run))

    async def get_history(self, request: pb.GetHistoryRequest) -> pb.GetHistoryResponse:
        if request.after_sequence < 0:
            raise InvalidArgument(
                f"after_sequence must not be negative, got {request.after_sequence}"
            )
        limit = _limit(request.limit, 1000, 10_000)
        run = await self.engine.find_run(request.workflow_id, request.run_id)
        if request.after_sequence >= MAX_INT4:
            # Sequence numbers are PostgreSQL integers: none comes after this one, and a larger
            # parameter would fail in the query (an INTERNAL error) instead of matching nothing.
            return pb.GetHistoryResponse(events=[], next_after=0)
        events = await self.store.load_events(run.run_id, after=request.after_sequence, limit=limit)
        next_after = events[-1].sequence_num if len(events) == limit else 0
        return pb.GetHistoryResponse(events=[_event(e) for e in events], next_after=next_after)

    async def list_workflows(self, request: pb.ListWorkflowsRequest) -> pb.ListWorkflowsResponse:
        limit = _limit(request.limit, 50, 1000)
        if request.status and request.status not in WORKFLOW_STATUSES:
            raise InvalidArgument(f"unknown status {request.status!r}")
        workflow_type = request.workflow_type or None
        if workflow_type is not None:  # a NUL would reach PostgreSQL and fail as INTERNAL
            check_name(workflow_type, "workflow_type")
        after = _page_cursor(request.page_token)
        runs = await self.store.list_workflows(
            workflow_type=workflow_type,
            status=request.status or None,
            limit=limit,
            after=after,
        )
        token = _page_token(runs[-1].created_at, runs[-1].run_id) if len(runs) == limit else ""
        return pb.ListWorkflowsResponse(
            workflows=[
                pb.WorkflowSummary(
                    workflow_id=r.workflow_id,
                    run_id=str(r.run_id),
                    workflow_type=r.workflow_type,
                    status=r.status,
                    created_at=_ts(r.created_at),
                    completed_at=_ts(r.completed_at),
                )
                for r in runs
            ],
            next_page_token=token,
        )

    async def await_result(self, request: pb.AwaitResultRequest) -> pb.AwaitResultResponse:
        wait_s = _wait_s(request.wait_s)
        run = await self.engine.find_run(request.workflow_id, request.run_id)
        with trio.move_on_after(wait_s):
            # A run that continued as new ends in the chain's last run: its result is awaited.
            while run.is_open or run.continued_run_id is not None:
                if run.continued_run_id is not None:
                    run = await self.store.get_run(run.continued_run_id)
                    continue
                with self.engine.notifier.watch_run(str(run.run_id)) as changed:
                    run = await self.store.get_run(run.run_id)
                    if not run.is_open:
                        continue
                    await changed.wait()
                run = await self.store.get_run(run.run_id)
        while run.continued_run_id is not None:  # a chain that ended within the wait's time
            run = await self.store.get_run(run.continued_run_id)
        return pb.AwaitResultResponse(done=not run.is_open, workflow=await self._describe(run))

    async def list_dead_letters(
        self, request: pb.ListDeadLettersRequest
    ) -> pb.ListDeadLettersResponse:
        limit = _limit(request.limit, 50, 1000)
        letters = await self.store.list_dead_letters(
            limit=limit, after=_page_cursor(request.page_token)
        )
        token = _page_token(letters[-1].dead_at, letters[-1].id) if len(letters) == limit else ""
        return pb.ListDeadLettersResponse(
            dead_letters=[_dead_letter(d) for d in letters], next_page_token=token
        )

    async def requeue_dead_letter(
        self, request: pb.RequeueDeadLetterRequest
    ) -> pb.RequeueDeadLetterResponse:
        try:
            letter_id = uuid.UUID(request.id)
        except ValueError:
            raise InvalidArgument(f"dead letter id {request.id!r} is not a UUID") from None
        async with self.store.transaction() as conn:
            task = await self.store.requeue_dead_letter(conn, letter_id)
        return pb.RequeueDeadLetterResponse(task_id=str(task.task_id))

    async def list_workers(self, request: pb.ListWorkersRequest) -> pb.ListWorkersResponse:
        workers = await self.store.list_workers(include_stopped=request.include_stopped)
        return pb.ListWorkersResponse(workers=[_worker(w) for w in workers])

    async def list_circuit_breakers(
        self, request: pb.ListCircuitBreakersRequest
    ) -> pb.ListCircuitBreakersResponse:
        return pb.ListCircuitBreakersResponse(
            breakers=[
                pb.CircuitBreaker(
                    key=r.breaker.key,
                    state=r.breaker.state,
                    failure_count=r.breaker.failure_count,
                    success_count=r.breaker.success_count,
                    probes_in_flight=r.breaker.probes_in_flight,
                    opened_at=_ts(r.breaker.opened_at),
                    updated_at=_ts(r.updated_at),
                )
                for r in await self.store.list_breakers()
            ]
        )

    async def reset_circuit_breaker(
        self, request: pb.ResetCircuitBreakerRequest
    ) -> pb.ResetCircuitBreakerResponse:
        await self.store.reset_breaker(check_name(request.key, "key"))
        return pb.ResetCircuitBreakerResponse()

    async def create_schedule(self, request: pb.CreateScheduleRequest) -> pb.CreateScheduleResponse:
        schedule, created = await self.engine.create_schedule(
            request.schedule_id,
            spec=request.spec,
            workflow_type=request.workflow_type,
            input=_text(request.input, "input"),
            overlap=request.overlap or "skip",
            paused=request.paused,
            replace=request.replace,
        )
        return pb.CreateScheduleResponse(schedule=_schedule(schedule), created=created)

    async def describe_schedule(
        self, request: pb.DescribeScheduleRequest
    ) -> pb.DescribeScheduleResponse:
        schedule = await self.engine.get_schedule(request.schedule_id)
        return pb.DescribeScheduleResponse(schedule=_schedule(schedule))

    async def list_schedules(self, request: pb.ListSchedulesRequest) -> pb.ListSchedulesResponse:
        limit = _limit(request.limit, 100, 1000)
        after = _schedule_cursor(request.page_token)
        schedules = await self.store.list_schedules(after=after, limit=limit)
        token = _schedule_token(schedules[-1].schedule_id) if len(schedules) == limit else ""
        return pb.ListSchedulesResponse(
            schedules=[_schedule(s) for s in schedules], next_page_token=token
        )

    async def pause_schedule(self, request: pb.PauseScheduleRequest) -> pb.PauseScheduleResponse:
        schedule = await self.engine.pause_schedule(request.schedule_id, paused=request.paused)
        return pb.PauseScheduleResponse(schedule=_schedule(schedule))

    async def trigger_schedule(
        self, request: pb.TriggerScheduleRequest
    ) -> pb.TriggerScheduleResponse:
        schedule, run, created = await self.engine.trigger_schedule(request.schedule_id)
        return pb.TriggerScheduleResponse(
            schedule=_schedule(schedule),
            workflow_id=run.workflow_id,
            run_id=str(run.run_id),
            created=created,
        )

    async def delete_schedule(self, request: pb.DeleteScheduleRequest) -> pb.DeleteScheduleResponse:
        await self.engine.delete_schedule(request.schedule_id)
        return pb.DeleteScheduleResponse()


def _refused(why: EverrunsError) -> dict[str, str]:
    """The fields of a batch item's outcome that say why it was refused: the gRPC status the
    single call would have failed with, and the message."""
    return {"refused_status": status_for(why).name, "message": str(why)}


def _wire_time(value: float, what: str) -> datetime:
    """A wire timestamp that must be given (`utc_from_timestamp` without its "0 is now")."""
    if not value > 0:  # also NaN
        raise InvalidArgument(f"{what} {value!r} is not a time")
    return utc_from_timestamp(value, what)


def _follow_ups(
    decisions: list[pb.FollowUpDecision], position: dict[int, int]
) -> list[FollowUpDecision]:
    """The well-formed decisions of a CompleteActivityTasks call, each naming its result by
    its place among the results the engine gets (``position``: request index -> that place).
    A malformed one is left out with a warning: its workflow task then goes out as usual."""
    follow_ups: list[FollowUpDecision] = []
    seen: set[int] = set()
    for d in decisions:
        place = position.get(d.result)
        problem = None
        if place is None or place in seen:
            problem = f"result {d.result} is not a well-formed result of the call, or twice"
        elif not 0 < d.after_sequence < d.seen_sequence:
            problem = f"sequence numbers {d.after_sequence} and {d.seen_sequence} are out of order"
        elif not d.activity_id:
            problem = "it names no activity"
        if problem is None:
            try:
                run_id = uuid.UUID(d.run_id)
                commands = _text(d.commands, "commands")
                after_time = _wire_time(d.after_time, "after_time")
                decided_at = _wire_time(d.decided_at, "decided_at")
            except (ValueError, InvalidArgument) as exc:
                problem = str(exc)
        if problem is not None:
            log.warning("CompleteActivityTasks: decision made ahead left out: %s", problem)
            continue
        assert place is not None
        seen.add(place)
        follow_ups.append(
            FollowUpDecision(
                result=place,
                run_id=run_id,
                activity_id=d.activity_id,
                after_sequence=d.after_sequence,
                after_time=after_time,
                seen_sequence=d.seen_sequence,
                commands_json=commands,
                decided_at=decided_at,
            )
        )
    return follow_ups


def _start_request(request: pb.StartWorkflowRequest) -> StartRequest:
    return StartRequest(
        workflow_type=request.workflow_type,
        input=_text(request.input, "input"),
        workflow_id=request.workflow_id or None,
        run_id=request_run_id(request.request_id),
    )


def _columnar_starts(request: pb.StartWorkflowsRequest) -> list[StartRequest]:
    """The starts of a StartWorkflows request in its columnar (or packed) form."""
    types, inputs, ids = request.workflow_types, request.inputs, request.workflow_ids
    if request.packed_workflow_types:
        if types or inputs:
            raise InvalidArgument("the packed form leaves workflow_types and inputs empty")
        types = request.packed_workflow_types
        inputs = unpack_blobs(request.packed_inputs, request.input_ends, "packed_inputs")
    count = max(len(types), len(inputs), len(ids))
    if len(types) not in (1, count):
        raise InvalidArgument(
            f"workflow_types must name one type or one per start ({count}), got {len(types)}"
        )
    # Column by column (a start's fields are positional: StartRequest is a tuple).
    texts = [_text(data, "input") for data in inputs]
    texts += ["null"] * (count - len(texts))
    named = [i or None for i in ids] + [None] * (count - len(ids))
    if len(request.request_ids) > count:
        raise InvalidArgument(
            f"request_ids has {len(request.request_ids)} entries for {count} starts"
        )
    keys = [key for key in request.request_ids if key]
    if len(set(keys)) != len(keys):
        raise InvalidArgument("request_ids must not name one request twice")
    run_ids = [request_run_id(key) for key in request.request_ids]
    run_ids += [None] * (count - len(run_ids))
    return list(
        map(
            StartRequest,
            repeat(types[0], count) if len(types) == 1 else types,
            texts,
            named,
            run_ids,
        )
    )


def _activity_info(task: Task, now: datetime | None) -> pb.ActivityInfo:
    # a retry not yet due (`now` is given when any task is pending)
    held = task.status == "pending" and now is not None and task.visible_at > now
    return pb.ActivityInfo(
        activity_id=task.activity_id or "",
        activity_type=task.type_name,
        status=task.status,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        last_error=_json_bytes(task.last_error),
        error_history=_json_bytes(task.error_history) if task.error_history else b"",
        claimed_by=task.claimed_by or "",
        next_attempt_at=_ts(task.visible_at) if held else 0.0,
    )


def _dead_letter(letter: DeadLetter) -> pb.DeadLetter:
    return pb.DeadLetter(
        id=str(letter.id),
        task_id=str(letter.task_id),
        workflow_id=letter.workflow_id,
        run_id=str(letter.run_id),
        activity_type=letter.activity_type,
        input=_bytes(letter.input),
        attempts=letter.attempts,
        last_error=_json_bytes(letter.error_history[-1] if letter.error_history else None)
        or _json_bytes({"message": letter.last_error}),
        error_history=_json_bytes(letter.error_history),
        dead_at=_ts(letter.dead_at),
        requeued_at=_ts(letter.requeued_at),
    )


def _worker(worker: WorkerRecord) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        id=worker.id,
        status=worker.status,
        activity_types=list(worker.activity_types),
        workflow_types=list(worker.workflow_types),
        max_concurrency=worker.max_concurrency,
        current_load=worker.current_load,
        host=worker.host,
        pid=worker.pid or 0,
        version=worker.version,
        started_at=_ts(worker.started_at),
        last_heartbeat_at=_ts(worker.last_heartbeat_at),
    )


def _schedule(schedule: ScheduleRecord) -> pb.Schedule:
    return pb.Schedule(
        schedule_id=schedule.schedule_id,
        spec=schedule.spec,
        workflow_type=schedule.workflow_type,
        input=_bytes(schedule.input),
        overlap=schedule.overlap,
        paused=schedule.paused,
        next_fire_at=_ts(schedule.next_fire_at),
        last_fired_at=_ts(schedule.last_fired_at),
        last_workflow_id=schedule.last_workflow_id or "",
        last_run_id=str(schedule.last_run_id) if schedule.last_run_id else "",
        fired_count=schedule.fired_count,
        skipped_count=schedule.skipped_count,
        created_at=_ts(schedule.created_at),
        paused_reason=schedule.paused_reason or "",
    )


def _schedule_token(schedule_id: str) -> str:
    return base64.urlsafe_b64encode(schedule_id.encode()).decode()


def _schedule_cursor(token: str) -> str | None:
    if not token:
        return None
    try:
        after = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise InvalidArgument(f"page_token {shown(token)} is not one this server issued") from None
    return check_name(after, "page_token")


def _page_token(at: datetime, row_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{row_id}".encode()).decode()


def _page_cursor(token: str) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    try:
        at, _, row_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        when = datetime.fromisoformat(at)
        if when.utcoffset() is None:  # this server issues aware times only
            raise ValueError(at)
        # PostgreSQL stores any time Python holds in UTC; one that leaves Python's range when
        # moved to UTC (year 1 at +05:00) raises OverflowError here instead of a DataError there.
        return when.astimezone(UTC), uuid.UUID(row_id)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"page_token {shown(token)} is not one this server issued") from None
