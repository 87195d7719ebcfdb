"""`Client` and `WorkflowHandle`: start, signal, cancel, await and inspect workflows over gRPC.

This is the caller's side of `WorkflowService`. It turns Python values into exact JSON payloads
before any request is sent (so a value JSON cannot carry fails here, naming its type), turns the
replies into frozen attrs values with aware UTC datetimes (no protobuf class reaches the caller),
and retries a request only when repeating it cannot change anything: reads, and a start whose
workflow id the caller chose. It holds no engine logic and never touches PostgreSQL; it must not
import the server or the worker.
"""

from __future__ import annotations

import math
import os
import random
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from everruns._aio import open_aio_loop
from everruns._aio.grpc import RpcChannel, client_tls, client_tls_from_env, open_channel
from everruns._proto.everruns import v1 as pb
from everruns.domain.address import (
    DEFAULT_GRPC_ADDRESS,
    call_stream_from_env,
    check_auth_token,
    parse_address,
)
from everruns.domain.budget import ENVELOPE_BYTES, SEND_BUDGET, field_bytes, split, text_bytes
from everruns.domain.cron import check_overlap
from everruns.domain.limits import check_name
from everruns.domain.limits import check_utf8 as _check_text
from everruns.domain.packing import pack_blobs, unpack_uuids
from everruns.domain.payload import decode, encode
from everruns.domain.registry import ActivityDefinition, definition_of, name_of
from everruns.domain.status import TERMINAL_WORKFLOW_STATUSES, WORKFLOW_STATUSES
from everruns.errors import (
    ClientClosed,
    InvalidArgument,
    PayloadError,
    ResourceExhausted,
    RpcError,
    ServerTimeout,
    ServerUnavailable,
    WorkflowFailed,
)

if TYPE_CHECKING:
    from everruns.agent.session import TurnHandle

__all__ = [
    "DEFAULT_ADDRESS",
    "MAX_PAGE_SIZE",
    "MAX_STARTS_PER_CALL",
    "CircuitBreakerInfo",
    "Client",
    "DeadLetterInfo",
    "HistoryEvent",
    "PendingActivity",
    "PendingTimer",
    "ScheduleInfo",
    "WorkerInfo",
    "WorkflowDescription",
    "WorkflowHandle",
    "WorkflowStart",
    "WorkflowSummary",
    "describe_error",
    "parse_address",
]

DEFAULT_ADDRESS = DEFAULT_GRPC_ADDRESS

# Delays before the 2nd, 3rd and 4th try of a retryable request: a control plane that refuses
# connections is reported within about two seconds, a restarting one is ridden over. A try that
# got no answer in time (ServerTimeout) is not repeated: a peer that accepts connections but
# stays silent is reported after _aio.grpc.CONNECT_TIMEOUT (5 s), a call it accepted and never
# answered after its deadline.
RETRY_DELAYS: tuple[float, ...] = (0.1, 0.4, 1.2)
# Per-request deadline; AwaitResult adds its long-poll budget on top.
RPC_TIMEOUT = 30.0
# Long-poll budget of one AwaitResult: short enough that proxies keep the stream open.
AWAIT_POLL_SECONDS = 20.0
# How long past a caller's timeout a poll under way may still answer.
LATE_REPLY_SECONDS = 5.0
# The largest page a listing may ask for: the wire's int32 is far larger (and wraps past it), the
# control plane returns at most this many events per page and fewer runs or dead letters.
MAX_PAGE_SIZE = 10_000
# Starts per StartWorkflows call, the control plane's limit; a larger batch takes several calls.
MAX_STARTS_PER_CALL = 10_000
# The most a start's fields take in a StartWorkflows request beside its input, its type and its
# workflow id (its end offset in the packed inputs, its request id).
_START_FIELDS = 48
# What every control plane reads in one message (EVERRUNS_MAX_MESSAGE_BYTES is at least 64 KiB
# and 4 payloads more), its call stream's envelope left aside.
_ALWAYS_READ = 64 * 1024 - ENVELOPE_BYTES

Reply = TypeVar("Reply")
WorkflowRef = str | Callable[..., Any]


def _time(seconds: float) -> datetime | None:
    # The wire's "not set" is 0.
    return datetime.fromtimestamp(seconds, tz=UTC) if seconds else None


def _required_time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _error(data: bytes, what: str) -> dict[str, Any] | None:
    value = decode(data, what=what)
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    # An error object is always a dict; keep anything else readable instead of failing.
    return {"type": "Error", "message": str(value)}


def _error_list(data: bytes, what: str) -> tuple[dict[str, Any], ...]:
    value = decode(data, what=what)
    if not isinstance(value, list):
        return ()
    return tuple(
        item if isinstance(item, dict) else {"type": "Error", "message": str(item)}
        for item in value
    )


def describe_error(error: dict[str, Any] | None) -> str:
    """Return an error object (``{"type", "message", ...}``) as one line ``Type: message``."""
    if not error:
        return ""
    kind = str(error.get("type") or "Error")
    message = str(error.get("message") or "").strip().splitlines()
    return f"{kind}: {message[0]}" if message else kind


@attrs.frozen
class WorkflowSummary:
    """One line of a workflow listing.

    Attributes:
        workflow_id: the business key.
        run_id: this execution of it.
        workflow_type: registered workflow name.
        status: pending, running, completed, failed, cancelled or continued_as_new.
        created_at: when the run was started.
        completed_at: when the run ended; None while it is open.
    """

    workflow_id: str
    run_id: str
    workflow_type: str
    status: str
    created_at: datetime
    completed_at: datetime | None

    @classmethod
    def from_proto(cls, msg: Any) -> WorkflowSummary:
        """Build from a ``pb.WorkflowSummary``."""
        return cls(
            workflow_id=msg.workflow_id,
            run_id=msg.run_id,
            workflow_type=msg.workflow_type,
            status=msg.status,
            created_at=_required_time(msg.created_at),
            completed_at=_time(msg.completed_at),
        )


@attrs.frozen
class PendingActivity:
    """An activity of a run that has not finished yet.

    Attributes:
        activity_id: command id within the run.
        activity_type: registered activity name.
        status: task status, e.g. ``pending`` or ``claimed``.
        attempt: attempts made so far.
        max_attempts: attempts allowed in total.
        last_error: error object of the latest failure, or None.
        error_history: every failure's error object, oldest first.
        claimed_by: worker holding the current claim, or None.
        next_attempt_at: when a pending activity held back (its retry backoff, or the least
            delay a failed attempt asked for with `everruns.RetryAfter`) is due; None when it
            is due now or not pending.
    """

    activity_id: str
    activity_type: str
    status: str
    attempt: int
    max_attempts: int
    last_error: dict[str, Any] | None
    error_history: tuple[dict[str, Any], ...]
    claimed_by: str | None
    next_attempt_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: Any) -> PendingActivity:
        """Build from a ``pb.ActivityInfo``."""
        return cls(
            activity_id=msg.activity_id,
            activity_type=msg.activity_type,
            status=msg.status,
            attempt=msg.attempt,
            max_attempts=msg.max_attempts,
            last_error=_error(msg.last_error, "last_error"),
            error_history=_error_list(msg.error_history, "error_history"),
            claimed_by=msg.claimed_by or None,
            next_attempt_at=_time(msg.next_attempt_at),
        )


def deadline_after(timeout: float | None) -> float:
    """The Trio deadline ``timeout`` seconds from now (None: no deadline, ``math.inf``).

    Raises:
        InvalidArgument: ``timeout`` is not a number of seconds >= 0 (negative, NaN, a bool).
    """
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise InvalidArgument(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    try:
        return trio.current_time() + timeout
    except OverflowError:  # an integer past a float's range: longer than any wait, as inf
        return math.inf


@attrs.frozen
class PendingTimer:
    """A timer of a run (``ctx.sleep``) that has not fired yet.

    Attributes:
        timer_id: its command id within the run.
        fire_at: when it fires.
    """

    timer_id: str
    fire_at: datetime

    @classmethod
    def from_proto(cls, msg: Any) -> PendingTimer:
        """Build from a ``pb.PendingTimer``."""
        return cls(timer_id=msg.timer_id, fire_at=_required_time(msg.fire_at))


@attrs.frozen
class WorkflowDescription:
    """Everything known about one run.

    Attributes:
        workflow_id: the business key.
        run_id: this execution of it.
        workflow_type: registered workflow name.
        status: pending, running, completed, failed, cancelled or continued_as_new.
        input: the start input (decoded JSON).
        result: the result (decoded JSON); None until completed.
        error: the error object (``{"type", "message", "traceback", ...}``) when failed, else None.
        created_at: when the run was started.
        updated_at: last status or history change.
        completed_at: when the run ended; None while open.
        stuck_reason: why no progress is made (e.g. non-determinism), or None.
        parent_workflow_id: the parent's workflow id for a child run, else None.
        pending_activities: activities not finished yet, with their attempts and errors.
        waiting_for_worker: no live worker serves a type this run needs.
        pending_timers: timers not fired yet (an open run's), soonest first.
        continued_run_id: for a run that ended ``continued_as_new``, the run its workflow
            goes on in; else None.
    """

    workflow_id: str
    run_id: str
    workflow_type: str
    status: str
    input: Any
    result: Any
    error: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime | None
    completed_at: datetime | None
    stuck_reason: str | None
    parent_workflow_id: str | None
    pending_activities: tuple[PendingActivity, ...]
    waiting_for_worker: bool
    pending_timers: tuple[PendingTimer, ...] = ()
    continued_run_id: str | None = None

    @property
    def is_open(self) -> bool:
        """Whether the run is still pending or running."""
        return self.status not in TERMINAL_WORKFLOW_STATUSES

    @classmethod
    def from_proto(cls, msg: Any) -> WorkflowDescription:
        """Build from a ``pb.WorkflowDescription``."""
        return cls(
            workflow_id=msg.workflow_id,
            run_id=msg.run_id,
            workflow_type=msg.workflow_type,
            status=msg.status,
            input=decode(msg.input, what="input"),
            result=decode(msg.result, what="result"),
            error=_error(msg.error, "error"),
            created_at=_required_time(msg.created_at),
            updated_at=_time(msg.updated_at),
            completed_at=_time(msg.completed_at),
            stuck_reason=msg.stuck_reason or None,
            parent_workflow_id=msg.parent_workflow_id or None,
            pending_activities=tuple(PendingActivity.from_proto(a) for a in msg.pending_activities),
            waiting_for_worker=msg.waiting_for_worker,
            pending_timers=tuple(PendingTimer.from_proto(t) for t in msg.pending_timers),
            continued_run_id=msg.continued_run_id or None,
        )


@attrs.frozen
class HistoryEvent:
    """One event of a run's history (see docs/internals.md, "Event history").

    Attributes:
        sequence_num: position in the history, from 1.
        type: event type, e.g. ``activity_completed``.
        data: the whole event as a JSON object, ``type`` included.
        time: when it was appended.
    """

    sequence_num: int
    type: str
    data: dict[str, Any]
    time: datetime

    @classmethod
    def from_proto(cls, msg: Any) -> HistoryEvent:
        """Build from a ``pb.HistoryEvent``."""
        data = decode(msg.data, what=f"event {msg.sequence_num}")
        return cls(
            sequence_num=msg.sequence_num,
            type=msg.type,
            data=data if isinstance(data, dict) else {"type": msg.type, "value": data},
            time=_required_time(msg.time),
        )


@attrs.frozen
class DeadLetterInfo:
    """A task that exhausted its attempts or failed non-retryably.

    Attributes:
        id: the dead letter; pass it to `Client.requeue_dead_letter`.
        task_id: the task that died.
        workflow_id, run_id: its run.
        activity_type: registered activity name.
        input: the activity input (decoded JSON).
        attempts: attempts made before it died.
        last_error: error object of the final failure.
        error_history: every failure's error object, oldest first.
        dead_at: when it was dead-lettered.
        requeued_at: when it was put back, or None.
    """

    id: str
    task_id: str
    workflow_id: str
    run_id: str
    activity_type: str
    input: Any
    attempts: int
    last_error: dict[str, Any] | None
    error_history: tuple[dict[str, Any], ...]
    dead_at: datetime
    requeued_at: datetime | None

    @classmethod
    def from_proto(cls, msg: Any) -> DeadLetterInfo:
        """Build from a ``pb.DeadLetter``."""
        return cls(
            id=msg.id,
            task_id=msg.task_id,
            workflow_id=msg.workflow_id,
            run_id=msg.run_id,
            activity_type=msg.activity_type,
            input=decode(msg.input, what="input"),
            attempts=msg.attempts,
            last_error=_error(msg.last_error, "last_error"),
            error_history=_error_list(msg.error_history, "error_history"),
            dead_at=_required_time(msg.dead_at),
            requeued_at=_time(msg.requeued_at),
        )


@attrs.frozen
class WorkerInfo:
    """A registered worker as the control plane sees it.

    Attributes:
        id: worker id.
        status: active, draining, stopped or lost.
        activity_types, workflow_types: what it serves.
        max_concurrency: task slots.
        current_load: slots in use at its last heartbeat.
        host, pid, version: where and what it runs.
        started_at: when it registered.
        last_heartbeat_at: its latest heartbeat, or None.
    """

    id: str
    status: str
    activity_types: tuple[str, ...]
    workflow_types: tuple[str, ...]
    max_concurrency: int
    current_load: int
    host: str
    pid: int
    version: str
    started_at: datetime | None
    last_heartbeat_at: datetime | None

    @classmethod
    def from_proto(cls, msg: Any) -> WorkerInfo:
        """Build from a ``pb.WorkerInfo``."""
        return cls(
            id=msg.id,
            status=msg.status,
            activity_types=tuple(msg.activity_types),
            workflow_types=tuple(msg.workflow_types),
            max_concurrency=msg.max_concurrency,
            current_load=msg.current_load,
            host=msg.host,
            pid=msg.pid,
            version=msg.version,
            started_at=_time(msg.started_at),
            last_heartbeat_at=_time(msg.last_heartbeat_at),
        )


@attrs.frozen
class CircuitBreakerInfo:
    """The shared state of one circuit breaker.

    Attributes:
        key: breaker key (the activity type by default).
        state: closed, open or half_open.
        failure_count: failures in the current window.
        success_count: successes while half-open.
        probes_in_flight: half-open probes handed out and not finished.
        opened_at: when it opened, or None while closed.
        updated_at: last change to its state, counts or probes, or None.
    """

    key: str
    state: str
    failure_count: int
    success_count: int
    probes_in_flight: int
    opened_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_proto(cls, msg: Any) -> CircuitBreakerInfo:
        """Build from a ``pb.CircuitBreaker``."""
        return cls(
            key=msg.key,
            state=msg.state,
            failure_count=msg.failure_count,
            success_count=msg.success_count,
            probes_in_flight=msg.probes_in_flight,
            opened_at=_time(msg.opened_at),
            updated_at=_time(msg.updated_at),
        )


@attrs.frozen
class ScheduleInfo:
    """A schedule: a workflow started at the times its spec names.

    Attributes:
        schedule_id: its id; each run it starts has the workflow id
            ``<schedule_id>@<UTC time it was due, e.g. 2026-11-28T03:00:00Z>``.
        spec: the cron expression (UTC) or ``@every <duration>``, normalized.
        workflow_type: the workflow each firing starts.
        input: each run's input (decoded JSON).
        overlap: ``"skip"`` (a firing while the last run is open starts nothing) or ``"allow"``.
        paused: whether it is paused.
        paused_reason: why the control plane paused it (a spec or a row edited by hand
            into one it cannot fire), or None.
        next_fire_at: when it fires next (a paused one: the time it had when paused;
            resuming sets the spec's next time from then).
        last_fired_at: the time its last run was for (when it was due, or when it was
            triggered), or None.
        last_workflow_id: that run's workflow id, or None.
        last_run_id: that run's id, or None.
        fired_count: runs started.
        skipped_count: firings skipped (overlap, or ``EVERRUNS_MAX_PENDING_TASKS`` reached).
        created_at: when it was created.
    """

    schedule_id: str
    spec: str
    workflow_type: str
    input: Any
    overlap: str
    paused: bool
    paused_reason: str | None
    next_fire_at: datetime
    last_fired_at: datetime | None
    last_workflow_id: str | None
    last_run_id: str | None
    fired_count: int
    skipped_count: int
    created_at: datetime

    @classmethod
    def from_proto(cls, msg: Any) -> ScheduleInfo:
        """Build from a ``pb.Schedule``."""
        return cls(
            schedule_id=msg.schedule_id,
            spec=msg.spec,
            workflow_type=msg.workflow_type,
            input=decode(msg.input, what="input"),
            overlap=msg.overlap,
            paused=msg.paused,
            paused_reason=msg.paused_reason or None,
            next_fire_at=_required_time(msg.next_fire_at),
            last_fired_at=_time(msg.last_fired_at),
            last_workflow_id=msg.last_workflow_id or None,
            last_run_id=msg.last_run_id or None,
            fired_count=msg.fired_count,
            skipped_count=msg.skipped_count,
            created_at=_required_time(msg.created_at),
        )


@attrs.frozen
class WorkflowStart:
    """One entry of `Client.start_workflows`.

    Attributes:
        workflow: the decorated workflow function or its registered name.
        input: the input, any exact-JSON value.
        workflow_id: the business key; None lets the server generate one.
    """

    workflow: WorkflowRef
    input: Any = None
    workflow_id: str | None = None


_MAX_INT64 = 2**63 - 1


def _check_string(value: str, what: str) -> str:
    """Return ``value`` if it is a string the wire can carry (an id, a page token)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    return _check_text(value, what)


def _page_token(value: str | None) -> str:
    """A page token as the request carries it: "" for the first page."""
    return "" if value is None else _check_string(value, "page_token")


def _check_flag(value: bool, what: str) -> bool:
    """Refuse a flag that is not a bool ("no" would mean yes)."""
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be True or False, got {value!r}")
    return value


def _check_workflow_id(workflow_id: str | None) -> str:
    if workflow_id is None:
        return ""
    if not isinstance(workflow_id, str) or not workflow_id.strip():
        raise InvalidArgument(f"workflow_id must be a non-empty string, got {workflow_id!r}")
    return _check_text(workflow_id, "workflow_id")


def _workflow_type(workflow: WorkflowRef) -> str:
    """The registered name of ``workflow``, checked as the control plane would check it.

    Raises:
        InvalidArgument: ``workflow`` is an @activity function (a run of that type would wait
            for a worker that never comes), or its name cannot be stored or sent.
    """
    definition = definition_of(workflow)
    if isinstance(definition, ActivityDefinition):
        raise InvalidArgument(
            f"{definition.name!r} is an activity, not a workflow; start a workflow, which runs "
            "it with ctx.execute_activity"
        )
    return _check_text(check_name(name_of(workflow), "workflow_type"), "workflow_type")


def _workflow_ids(ids: list[str | None]) -> list[str]:
    """The workflow_ids column of a columnar start: empty when the server names them all."""
    checked = [_check_workflow_id(i) for i in ids]
    return checked if any(checked) else []


def _check_page_size(value: int, what: str, lowest: int) -> None:
    """Refuse a page size the wire cannot carry as meant (it is an int32, and wraps)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not lowest <= value <= MAX_PAGE_SIZE
    ):
        raise InvalidArgument(
            f"{what} must be an integer from {lowest} to {MAX_PAGE_SIZE}, got {value!r}"
        )


def _start_request(workflow: WorkflowRef, input: Any, workflow_id: str | None) -> Any:
    name = _workflow_type(workflow)
    return pb.StartWorkflowRequest(
        workflow_type=name,
        input=encode(input, what=f"input of workflow {name!r}"),
        workflow_id=_check_workflow_id(workflow_id),
        # A start that names its workflow is retried: the key makes a retry find the run its
        # first try started even if that run has ended since.
        request_id="" if workflow_id is None else _request_key(),
    )


_LIMIT_SAID = re.compile(r"limit of (\d+) bytes \(EVERRUNS_MAX_MESSAGE_BYTES\)")


def _message_limit_in(message: str) -> int | None:
    """The message limit a control plane's refusal names, or None for another refusal."""
    found = _LIMIT_SAID.search(message)
    return int(found.group(1)) if found else None


def _request_key() -> str:
    """A fresh idempotency key for one start request (sent again, unchanged, by its retries)."""
    return uuid.uuid4().hex


def _failure(description: WorkflowDescription) -> WorkflowFailed:
    what = f"workflow {description.workflow_id!r} (run {description.run_id})"
    if description.status == "cancelled":
        message = f"{what} was cancelled"
    else:
        detail = describe_error(description.error)
        message = f"{what} {description.status}" + (f": {detail}" if detail else "")
    return WorkflowFailed(message, status=description.status, error=description.error)


class WorkflowHandle:
    """A reference to a workflow id (and optionally one run of it) through a `Client`.

    Attributes:
        workflow_id: the business key.
        run_id: the run this handle is pinned to, or None for "the latest run".
        created: True when `Client.start_workflow` created this run, False when the id was
            already running (idempotent start) or the handle came from `Client.get_handle`.
    """

    __slots__ = ("_client", "created", "run_id", "workflow_id")

    def __init__(
        self, client: Client, workflow_id: str, run_id: str | None = None, *, created: bool = False
    ) -> None:
        self._client = client
        self.workflow_id = workflow_id
        self.run_id = run_id or None
        self.created = created

    def __repr__(self) -> str:
        return (
            f"WorkflowHandle(workflow_id={self.workflow_id!r}, run_id={self.run_id!r}, "
            f"created={self.created!r})"
        )

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end and return its result.

        Long-polls the control plane, so the answer arrives as soon as the run ends. A handle
        without a run id follows the run that is the latest when the wait begins. A run that
        continued as new (`WorkflowContext.continue_as_new`) is followed to the last run of
        its chain, whose end is the answer.

        Args:
            timeout: seconds to wait in all; None (or ``math.inf``, or a number too large
                for a float) waits as long as it takes. At least one poll is made and its
                reply decides, so 0 returns the result of a run that has already ended and
                raises TimeoutError for an open one; a reply under way at the deadline gets
                `LATE_REPLY_SECONDS` more (then the control plane counts as unavailable).

        Returns:
            The workflow's result (decoded JSON).

        Raises:
            WorkflowFailed: the run ended ``failed`` or ``cancelled`` (``status`` and ``error``
                say how).
            TimeoutError: the run was still open after ``timeout`` seconds.
            InvalidArgument: ``timeout`` is negative or NaN.
            NotFound: no such workflow or run.
            ServerUnavailable: the control plane stayed unreachable through the retries, or
                until ``timeout`` ran out (an unreachable server is not a timeout).

        Cancelling the calling scope abandons the wait; the workflow is unaffected.
        """
        deadline = deadline_after(timeout)
        run_id = self.run_id or ""
        while True:
            # Each poll asks the server to answer by the deadline, and its reply is awaited even
            # when it arrives a little after (cancelling it could hide a run that has ended),
            # for at most LATE_REPLY_SECONDS when the caller set a timeout.
            wait_s = max(0.0, min(AWAIT_POLL_SECONDS, deadline - trio.current_time()))
            late = RPC_TIMEOUT if timeout is None else LATE_REPLY_SECONDS
            reply = await self._client._call(
                self._client._stub.await_result,
                pb.AwaitResultRequest(workflow_id=self.workflow_id, run_id=run_id, wait_s=wait_s),
                retry=True,
                timeout=wait_s + late,
                retry_until=deadline,
            )
            description = WorkflowDescription.from_proto(reply.workflow)
            run_id = run_id or description.run_id
            if reply.done:
                if description.status == "completed":
                    return description.result
                raise _failure(description)
            if trio.current_time() >= deadline:
                raise TimeoutError(
                    f"workflow {self.workflow_id!r} was still open after {timeout:g} s; "
                    "wait longer or check it with `everruns workflow show`"
                )

    async def signal(self, name: str, payload: Any = None) -> None:
        """Deliver the signal ``name`` with a JSON payload to the open run.

        Raises:
            PayloadError: the payload is not exact JSON (nothing is sent).
            InvalidArgument: the name is empty or cannot be sent as UTF-8.
            NotFound: no such workflow or run.
            FailedPrecondition: the run has ended (the message says its final status).
            ServerUnavailable: the control plane is unreachable (not retried: a signal is not
                idempotent).
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgument("a signal name must be a non-empty string")
        _check_text(name, "signal name")
        data = encode(payload, what=f"payload of signal {name!r}")
        await self._client._call(
            self._client._stub.signal_workflow,
            pb.SignalWorkflowRequest(
                workflow_id=self.workflow_id, run_id=self.run_id or "", name=name, payload=data
            ),
            retry=False,
        )

    async def cancel(self, reason: str = "") -> None:
        """Ask the open run to cancel; the workflow code sees the request and may clean up.

        Returns once the request is recorded, not when the run has ended (use `result`). A
        run no worker has picked up yet ends cancelled at once. Cancelling again is a no-op,
        also once the run has ended cancelled, so the call is retried like a read; a handle
        without a run id cancels the run that is the workflow id's latest when called.

        Raises:
            InvalidArgument: ``reason`` is not a string UTF-8 can carry.
            NotFound: no such workflow or run.
            FailedPrecondition: the run has ended otherwise (the message says how).
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        if not isinstance(reason, str):
            raise InvalidArgument(f"reason must be a string, got {reason!r}")
        _check_text(reason, "reason")
        run_id = self.run_id
        if run_id is None:  # pinned, so that a retry cannot cancel a run started meanwhile
            run_id = (await self.describe()).run_id
        await self._client._call(
            self._client._stub.cancel_workflow,
            pb.CancelWorkflowRequest(workflow_id=self.workflow_id, run_id=run_id, reason=reason),
            retry=True,
        )

    async def describe(self) -> WorkflowDescription:
        """Return the run's status, payloads and pending activities.

        Raises:
            NotFound: no such workflow or run.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        reply = await self._client._call(
            self._client._stub.describe_workflow,
            pb.DescribeWorkflowRequest(workflow_id=self.workflow_id, run_id=self.run_id or ""),
            retry=True,
        )
        return WorkflowDescription.from_proto(reply.workflow)

    async def history(self, *, after_sequence: int = 0, page_size: int = 0) -> list[HistoryEvent]:
        """Return the run's event history, fetching every page.

        A handle without a run id reads the run that is the workflow id's latest when called:
        it is looked up once, before the first page, so that a run started while the pages
        are read cannot mix its events into the answer.

        Args:
            after_sequence: only events with a higher sequence number.
            page_size: events per request, up to `MAX_PAGE_SIZE` (0: the server's default).

        Raises:
            InvalidArgument: ``page_size`` is outside 0 to `MAX_PAGE_SIZE`, or
                ``after_sequence`` is not an integer from 0 to 2**63 - 1.
            NotFound: no such workflow or run.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        _check_page_size(page_size, "page_size", 0)
        if (
            isinstance(after_sequence, bool)
            or not isinstance(after_sequence, int)
            or not 0 <= after_sequence <= _MAX_INT64
        ):  # the wire's int64 would wrap it into a value never given
            raise InvalidArgument(
                f"after_sequence must be an integer from 0 to {_MAX_INT64}, got {after_sequence!r}"
            )
        run_id = self.run_id
        if run_id is None:  # pinned: each page would be resolved to the latest run again
            run_id = (await self.describe()).run_id
        events: list[HistoryEvent] = []
        after = after_sequence
        while True:
            reply = await self._client._call(
                self._client._stub.get_history,
                pb.GetHistoryRequest(
                    workflow_id=self.workflow_id,
                    run_id=run_id,
                    after_sequence=after,
                    limit=page_size,
                ),
                retry=True,
            )
            events.extend(HistoryEvent.from_proto(e) for e in reply.events)
            # Stop on an empty page too, so a server that never says "done" cannot loop us.
            if not reply.next_after or not reply.events or reply.next_after <= after:
                return events
            after = reply.next_after


class Client:
    """A connection to an everruns control plane; open it with `Client.connect`.

    Attributes:
        address: the ``host:port`` it talks to.
    """

    def __init__(self, channel: RpcChannel) -> None:
        self._channel = channel
        self._stub = pb.WorkflowServiceStub(channel.raw)
        self.address = channel.address
        self._closed = False  # set as its `connect` block ends

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str | None = None,
        *,
        auth_token: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
        call_stream: bool | None = None,
    ) -> AsyncIterator[Client]:
        """Open a client for the block: ``async with Client.connect("127.0.0.1:9001") as c:``.

        Opens the trio-asyncio loop if none is open yet (re-entrant). Connections are made
        lazily, so an unreachable server is reported by the first call, not here: one that
        refuses connections within about two seconds (the retries), one that accepts them but
        does not answer within 5 s (`ServerTimeout`). Once the block has ended, the client and
        its handles raise `ClientClosed`.

        Args:
            address: ``host:port``; default ``GRPC_ADDRESS`` or 127.0.0.1:9001.
            auth_token: bearer token; default ``EVERRUNS_AUTH_TOKEN``.
            tls: an SSL context, True for the system's default one, None/False for plaintext.
            call_stream: send calls over the control plane's call stream (one HTTP/2 stream
                for all of them) where it serves one; False: one HTTP/2 stream per call;
                default ``EVERRUNS_CALL_STREAM`` (on).

        Raises:
            ConfigError: the address is not host:port, ``EVERRUNS_CALL_STREAM`` or
                ``EVERRUNS_TLS`` is not a switch, or ``EVERRUNS_TLS_CA`` cannot be used.
        """
        if address is None:
            address = os.environ.get("GRPC_ADDRESS") or DEFAULT_ADDRESS
            host, port = parse_address(address, setting="GRPC_ADDRESS")
        else:
            host, port = parse_address(address, setting="address")
        if auth_token is None:
            auth_token = check_auth_token(os.environ.get("EVERRUNS_AUTH_TOKEN") or None)
        else:
            check_auth_token(auth_token, setting="auth_token")
        if call_stream is None:
            call_stream = call_stream_from_env(os.environ)
        if not (tls is None or isinstance(tls, (bool, ssl.SSLContext))):
            raise InvalidArgument(
                f"tls must be an ssl.SSLContext, True (the system's trust store) or "
                f"None/False (plaintext), got {tls!r}"
            )
        if not (call_stream is None or isinstance(call_stream, bool)):
            raise InvalidArgument(f"call_stream must be True, False or None, got {call_stream!r}")
        if tls is None:
            context = client_tls_from_env(os.environ)
        else:
            context = client_tls(None) if tls is True else (tls or None)
        # What the block raises comes out as it was raised: no nursery of ours wraps it (a
        # caller's own ExceptionGroup stays a group).
        async with (
            open_aio_loop(),
            open_channel(
                host, port, auth_token=auth_token, tls=context, call_stream=call_stream
            ) as channel,
        ):
            client = cls(channel)
            try:
                yield client
            finally:
                client._closed = True

    async def _call(
        self,
        method: Callable[..., Awaitable[Reply]],
        request: Any,
        *,
        retry: bool,
        timeout: float = RPC_TIMEOUT,
        retry_until: float = math.inf,
    ) -> Reply:
        """Make the call; with ``retry``, try again after `RETRY_DELAYS` while the control plane
        is unreachable, but never sleep past ``retry_until`` (a `trio.current_time` value):
        then the last ServerUnavailable is raised. A try that got no answer in time
        (ServerTimeout: the connection or the call) is not repeated; it waited longer than the
        retries are meant to ride over.

        Raises:
            ClientClosed: the client's `connect` block has ended; nothing is sent.
        """
        delays = iter(RETRY_DELAYS if retry else ())
        while True:
            if self._closed:
                raise ClientClosed(
                    "this Client is closed (its `async with Client.connect()` block has ended); "
                    "open a new one to call the control plane"
                )
            try:
                return await self._channel.unary(method, request, timeout=timeout)
            except ServerTimeout:
                raise
            except ServerUnavailable:
                delay = next(delays, None)
                if delay is None:
                    raise
                delay *= random.uniform(0.9, 1.1)
                if trio.current_time() + delay > retry_until:
                    raise
            await trio.sleep(delay)

    async def start_workflow(
        self, workflow: WorkflowRef, input: Any = None, *, workflow_id: str | None = None
    ) -> WorkflowHandle:
        """Start a run of ``workflow``, or find the open run of ``workflow_id``.

        Args:
            workflow: the decorated workflow function or its registered name. A type no worker
                serves yet is accepted; the run waits (``describe().waiting_for_worker``).
            input: the input, any exact-JSON value.
            workflow_id: the business key; None lets the server generate a UUID.

        Returns:
            A handle pinned to the run; ``handle.created`` is False when ``workflow_id`` already
            had an open run, which is returned instead of starting another.

        Raises:
            PayloadError: ``input`` is not exact JSON; raised before anything is sent.
            InvalidArgument: bad workflow name or id (one UTF-8 cannot carry included), or
                ``workflow`` is an @activity function; raised before anything is sent.
            ResourceExhausted: the control plane sheds load, or the input is too large.
            ServerUnavailable: the control plane is unreachable (retried only when
                ``workflow_id`` is given: each request carries an idempotency key, so a retry
                whose first try did reach the server returns that run, ended or not, and
                reports ``created`` False).
        """
        request = _start_request(workflow, input, workflow_id)
        reply = await self._call(self._stub.start_workflow, request, retry=workflow_id is not None)
        return WorkflowHandle(self, reply.workflow_id, reply.run_id, created=reply.created)

    async def start_workflows(
        self, starts: Sequence[WorkflowStart | tuple[Any, ...]]
    ) -> list[WorkflowHandle]:
        """Start several runs in one round trip (or a few, for a large batch).

        A batch is sent in calls of at most `MAX_STARTS_PER_CALL` starts and about
        `everruns.domain.budget.SEND_BUDGET` bytes each (a single start larger than that goes
        alone), one after another. The control plane writes up to 500 starts per statement; a
        larger call is split into statements that run side by side, each in its own
        transaction (the starts of one workflow id share one). If a call fails, some of the
        runs may have started: name workflow ids and a retry returns those runs instead of
        starting them again.

        Args:
            starts: `WorkflowStart` values, or tuples ``(workflow, input[, workflow_id])``.

        Returns:
            One handle per entry, in order.

        Raises:
            PayloadError: an input is not exact JSON; nothing is sent.
            InvalidArgument: an entry is malformed, or names an @activity function.
            ResourceExhausted: the control plane sheds load, or a start is over its limits
                (the earlier calls' runs have started).
            ServerUnavailable: the control plane is unreachable (retried only when every entry
                names its workflow id; as for `start_workflow`, a retry returns the runs its
                first try started).
        """
        given = [_start_fields(s) for s in starts]
        if not given:
            return []
        # A workflow id named twice is sent once: the later starts answer as the control
        # plane answers them in one call (the first's run, not created), also when a large
        # batch is cut into calls and the run ends between them.
        first: dict[str, int] = {}
        for n, (_, _, workflow_id) in enumerate(given):
            if workflow_id is not None:
                first.setdefault(workflow_id, n)
        sent = [n for n, (_, _, w) in enumerate(given) if w is None or first[w] == n]
        # Every entry is checked (its type, its input) before anything is sent.
        all_types = [_workflow_type(workflow) for workflow, _, _ in given]
        all_encoded = _encoded_inputs(given, all_types)
        entries = [given[n] for n in sent]
        types = [all_types[n] for n in sent]
        encoded = [all_encoded[n] for n in sent]
        retry = all(workflow_id is not None for _, _, workflow_id in entries)
        handles: list[WorkflowHandle] = []
        chunks = await self._start_chunks(entries, types, encoded)
        learnt = False
        while chunks:
            chunk = chunks.pop(0)
            cut = slice(chunk.start, chunk.stop)
            try:
                handles += await self._start_batch(entries[cut], types[cut], encoded[cut], retry)
            except ResourceExhausted as exc:
                # Over a message limit the client did not know (no call stream): refused
                # unread, so the rest is cut again to it and sent, once.
                said = _message_limit_in(str(exc))
                if said is None or learnt:
                    raise
                learnt = True
                rest = await self._start_chunks(
                    entries[cut.start :], types[cut.start :], encoded[cut.start :], limit=said
                )
                chunks = [range(r.start + cut.start, r.stop + cut.start) for r in rest]
        if len(sent) == len(given):
            return handles
        by_index = dict(zip(sent, handles, strict=True))
        return [
            by_index.get(n)
            or WorkflowHandle(self, str(w), by_index[first[str(w)]].run_id, created=False)
            for n, (_, _, w) in enumerate(given)
        ]

    async def _start_chunks(
        self,
        entries: Sequence[tuple[WorkflowRef, Any, str | None]],
        types: Sequence[str],
        encoded: Sequence[bytes],
        *,
        limit: int | None = None,
    ) -> list[range]:
        """The starts of each StartWorkflows call: at most `MAX_STARTS_PER_CALL`, within
        `SEND_BUDGET` bytes unless alone, and within the control plane's message limit
        (``limit``, else as its call stream tells it)."""
        # A bound first, at C speed (4 bytes per character at most in UTF-8): most batches
        # fit any control plane's limit (it reads at least 64 KiB) and go in one call.
        bound = sum(map(len, encoded)) + len(entries) * (_START_FIELDS + 20)
        bound += 4 * (sum(map(len, types)) + sum(len(w or "") for _, _, w in entries))
        if bound <= _ALWAYS_READ and len(entries) <= MAX_STARTS_PER_CALL:
            return [range(len(entries))]
        if limit is None:
            limit = await self._channel.message_limit()
        budget = min(SEND_BUDGET, limit - ENVELOPE_BYTES) if limit > 0 else SEND_BUDGET
        if bound <= budget and len(entries) <= MAX_STARTS_PER_CALL:
            return [range(len(entries))]
        sizes = [
            len(data)
            + field_bytes(text_bytes(name))
            + field_bytes(text_bytes(workflow_id or ""))
            + _START_FIELDS
            for (_, _, workflow_id), name, data in zip(entries, types, encoded, strict=True)
        ]
        return split(sizes, budget=budget, max_items=MAX_STARTS_PER_CALL)

    async def _start_batch(
        self,
        entries: Sequence[tuple[WorkflowRef, Any, str | None]],
        types: Sequence[str],
        encoded: Sequence[bytes],
        retry: bool,
    ) -> list[WorkflowHandle]:
        """One StartWorkflows call for ``entries`` (their types and encoded inputs)."""
        # Sent and answered in the packed form: a few blobs instead of a message per run.
        inputs, ends = pack_blobs(encoded)
        request = pb.StartWorkflowsRequest(
            packed_workflow_types=[types[0]] if len(set(types)) == 1 else types,
            packed_inputs=inputs,
            input_ends=ends,
            workflow_ids=_workflow_ids([workflow_id for _, _, workflow_id in entries]),
            packed_reply=True,
            # as in `_start_request`: for the retries
            request_ids=[_request_key() for _ in entries] if retry else [],
        )
        reply = await self._call(self._stub.start_workflows, request, retry=retry)
        try:
            run_ids = unpack_uuids(reply.packed_run_ids, "packed_run_ids")
            generated = unpack_uuids(reply.packed_generated_ids, "packed_generated_ids")
        except InvalidArgument as exc:
            raise RpcError(f"StartWorkflows answered malformed ids: {exc}") from exc
        unnamed = sum(workflow_id is None for _, _, workflow_id in entries)
        counts = (len(run_ids), len(reply.packed_created), len(generated))
        if counts != (len(entries), len(entries), unnamed):
            raise RpcError(
                f"StartWorkflows answered {counts[0]} runs, {counts[1]} created flags and "
                f"{counts[2]} generated ids for {len(entries)} starts ({unnamed} unnamed); "
                "is the control plane older than this client?"
            )
        named = iter(generated)
        return [
            WorkflowHandle(
                self,
                workflow_id if workflow_id is not None else next(named),
                run_id,
                created=bool(created),
            )
            for (_, _, workflow_id), run_id, created in zip(
                entries, run_ids, reply.packed_created, strict=True
            )
        ]

    def get_handle(self, workflow_id: str, run_id: str | None = None) -> WorkflowHandle:
        """Return a handle to an existing workflow id (its latest run unless ``run_id``).

        Raises:
            InvalidArgument: ``workflow_id`` is empty, or it or ``run_id`` cannot be sent as
                UTF-8. An unknown id is only reported (NotFound) by the handle's calls.
        """
        if workflow_id is None:  # a start's None means "generate one"; a handle's names one
            raise InvalidArgument("workflow_id must be a non-empty string, got None")
        if run_id is not None and not isinstance(run_id, str):
            raise InvalidArgument(f"run_id must be a string or None, got {run_id!r}")
        return WorkflowHandle(
            self,
            _check_workflow_id(workflow_id),
            _check_text(run_id, "run_id") if isinstance(run_id, str) else run_id,
        )

    async def send_message(self, session_id: str, text: str, **options: Any) -> TurnHandle:
        """Send a message to an agent session; its own turn will answer it, after earlier ones.

        A convenience for `everruns.agent.send_message` (same options: ``max_steps``,
        ``provider``, ``model``, ``tools``, ``llm_retry``, ``tool_retry``).

        Returns:
            A `everruns.agent.TurnHandle`: ``stream()`` yields the turn's events as they
            happen, ``result()`` gives the answer.
        """
        from everruns.agent.session import send_message

        return await send_message(self, session_id, text, **options)

    async def list_workflows(
        self,
        workflow_type: WorkflowRef | None = None,
        status: str | None = None,
        limit: int = 50,
        page_token: str | None = None,
    ) -> tuple[list[WorkflowSummary], str | None]:
        """Return one page of runs, newest first.

        Args:
            workflow_type: only runs of this workflow (function or name).
            status: only runs in this status (pending, running, completed, failed, cancelled,
                continued_as_new).
            limit: page size, 1 to `MAX_PAGE_SIZE` (the server may return fewer per page).
            page_token: the token returned with the previous page.

        Returns:
            ``(runs, next_page_token)``; the token is None on the last page.

        Raises:
            InvalidArgument: unknown status, a bad workflow type, a limit outside 1 to
                `MAX_PAGE_SIZE`, or a page token that is not a string.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        if status is not None and status not in WORKFLOW_STATUSES:
            raise InvalidArgument(f"status {status!r} is not one of {', '.join(WORKFLOW_STATUSES)}")
        _check_page_size(limit, "limit", 1)
        reply = await self._call(
            self._stub.list_workflows,
            pb.ListWorkflowsRequest(
                workflow_type=_workflow_type(workflow_type) if workflow_type is not None else "",
                status=status or "",
                limit=limit,
                page_token=_page_token(page_token),
            ),
            retry=True,
        )
        runs = [WorkflowSummary.from_proto(w) for w in reply.workflows]
        return runs, reply.next_page_token or None

    async def list_dead_letters(
        self, limit: int = 50, page_token: str | None = None
    ) -> tuple[list[DeadLetterInfo], str | None]:
        """Return one page of dead-lettered tasks, newest first.

        Args:
            limit: page size, 1 to `MAX_PAGE_SIZE` (the server may return fewer per page).
            page_token: the token returned with the previous page.

        Returns:
            ``(dead_letters, next_page_token)``; the token is None on the last page.

        Raises:
            InvalidArgument: a limit outside 1 to `MAX_PAGE_SIZE`, or a page token that is
                not a string.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        _check_page_size(limit, "limit", 1)
        reply = await self._call(
            self._stub.list_dead_letters,
            pb.ListDeadLettersRequest(limit=limit, page_token=_page_token(page_token)),
            retry=True,
        )
        letters = [DeadLetterInfo.from_proto(d) for d in reply.dead_letters]
        return letters, reply.next_page_token or None

    async def requeue_dead_letter(self, dead_letter_id: str) -> str:
        """Put a dead-lettered task back in the queue with fresh attempts.

        Returns:
            The id of the task put back.

        Raises:
            InvalidArgument: the id is not a string, or not a dead letter's id (a UUID).
            NotFound: no such dead letter.
            FailedPrecondition: it was requeued already.
            ServerUnavailable: the control plane is unreachable.
        """
        reply = await self._call(
            self._stub.requeue_dead_letter,
            pb.RequeueDeadLetterRequest(id=_check_string(dead_letter_id, "dead_letter_id")),
            retry=False,
        )
        task_id: str = reply.task_id
        return task_id

    async def list_workers(self, include_stopped: bool = False) -> list[WorkerInfo]:
        """Return the registered workers (only live ones unless ``include_stopped``).

        Raises:
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        reply = await self._call(
            self._stub.list_workers,
            pb.ListWorkersRequest(include_stopped=_check_flag(include_stopped, "include_stopped")),
            retry=True,
        )
        return [WorkerInfo.from_proto(w) for w in reply.workers]

    async def list_circuit_breakers(self) -> list[CircuitBreakerInfo]:
        """Return every circuit breaker with recorded state.

        Raises:
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        reply = await self._call(
            self._stub.list_circuit_breakers, pb.ListCircuitBreakersRequest(), retry=True
        )
        return [CircuitBreakerInfo.from_proto(b) for b in reply.breakers]

    async def reset_circuit_breaker(self, key: str) -> None:
        """Close a circuit breaker and clear its counters (idempotent).

        A key with no recorded state is a closed breaker already: resetting it succeeds and
        changes nothing, as a second reset (or a retry of one whose reply was lost) does.

        Raises:
            InvalidArgument: ``key`` is empty or not a name the control plane accepts.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        await self._call(
            self._stub.reset_circuit_breaker,
            pb.ResetCircuitBreakerRequest(key=_check_text(check_name(key, "key"), "key")),
            retry=True,
        )

    async def create_schedule(
        self,
        schedule_id: str,
        workflow: WorkflowRef,
        input: Any = None,
        *,
        spec: str,
        overlap: str = "skip",
        paused: bool = False,
        replace: bool = False,
    ) -> tuple[ScheduleInfo, bool]:
        """Start ``workflow`` with ``input`` at every time ``spec`` names, from now on.

        The control plane fires a due schedule once, whichever of its replicas is up; a
        schedule due several times while none was fires once when one is back, then keeps its
        times. Each firing's run has the workflow id ``<schedule_id>@<time it was due>``.

        Args:
            schedule_id: the schedule's id (at most 491 characters).
            workflow: the decorated workflow function or its registered name.
            input: each run's input, any exact-JSON value.
            spec: a cron expression of five fields (minute hour day-of-month month
                day-of-week, in UTC; ``@hourly``, ``@daily``... too), or ``@every <duration>``
                (``@every 30s``, ``@every 1h30m``: times at multiples of it since the Unix
                epoch).
            overlap: ``"skip"``: a firing while the run it started last is still open starts
                nothing (counted in ``skipped_count``); ``"allow"``: it starts another run.
            paused: create it paused (`resume_schedule` starts it); a schedule that exists
                stays as it is, paused or not.
            replace: replace another definition under ``schedule_id`` instead of refusing
                (what it fired so far, and whether it is paused, stay).

        Returns:
            ``(schedule, created)``. The same definition again returns the existing schedule
            unchanged with ``created`` False, so a create may be retried or run at every
            deploy (a retry whose first try was applied also says False).

        Raises:
            InvalidArgument: a malformed field; a spec's fault is named (``minute 75 is out of
                range``), and a spec that can never fire is refused.
            AlreadyExists: ``schedule_id`` names a schedule with another definition (and not
                ``replace``).
            PayloadError: ``input`` is not exact JSON; raised before anything is sent.
            ResourceExhausted: ``input`` is over the control plane's payload limit.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        name = _workflow_type(workflow)
        request = pb.CreateScheduleRequest(
            schedule_id=_check_string(schedule_id, "schedule_id"),
            spec=_check_string(spec, "spec"),
            workflow_type=name,
            input=encode(input, what=f"input of schedule {schedule_id!r}"),
            overlap=check_overlap(overlap),
            paused=_check_flag(paused, "paused"),
            replace=_check_flag(replace, "replace"),
        )
        # Retried: a create whose first try was applied finds the same definition.
        reply = await self._call(self._stub.create_schedule, request, retry=True)
        return ScheduleInfo.from_proto(reply.schedule), bool(reply.created)

    async def describe_schedule(self, schedule_id: str) -> ScheduleInfo:
        """One schedule.

        Raises:
            NotFound: no such schedule.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        reply = await self._call(
            self._stub.describe_schedule,
            pb.DescribeScheduleRequest(schedule_id=_check_string(schedule_id, "schedule_id")),
            retry=True,
        )
        return ScheduleInfo.from_proto(reply.schedule)

    async def list_schedules(
        self, limit: int = 100, page_token: str | None = None
    ) -> tuple[list[ScheduleInfo], str | None]:
        """Return one page of schedules, by id.

        Returns:
            ``(schedules, next_page_token)``; the token is None on the last page.

        Raises:
            InvalidArgument: a limit outside 1 to `MAX_PAGE_SIZE`, or a bad page token.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        _check_page_size(limit, "limit", 1)
        reply = await self._call(
            self._stub.list_schedules,
            pb.ListSchedulesRequest(limit=limit, page_token=_page_token(page_token)),
            retry=True,
        )
        schedules = [ScheduleInfo.from_proto(s) for s in reply.schedules]
        return schedules, reply.next_page_token or None

    async def pause_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Pause a schedule: it fires no more until resumed (idempotent).

        Raises:
            NotFound: no such schedule.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        return await self._pause_schedule(schedule_id, paused=True)

    async def resume_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Resume a paused schedule (idempotent): it fires next at its spec's next time from
        now; the times it missed while paused are not fired.

        Raises:
            NotFound: no such schedule.
            ServerUnavailable: the control plane stayed unreachable through the retries.
        """
        return await self._pause_schedule(schedule_id, paused=False)

    async def _pause_schedule(self, schedule_id: str, *, paused: bool) -> ScheduleInfo:
        reply = await self._call(
            self._stub.pause_schedule,
            pb.PauseScheduleRequest(
                schedule_id=_check_string(schedule_id, "schedule_id"), paused=paused
            ),
            retry=True,
        )
        return ScheduleInfo.from_proto(reply.schedule)

    async def trigger_schedule(self, schedule_id: str) -> WorkflowHandle:
        """Start a run of a schedule now, besides its times (paused or not, whatever its
        overlap); its next time stays. The run's workflow id is ``<schedule_id>@<now>``, to
        the second: a trigger in the second a time falls due shares that firing's run.

        Returns:
            A handle pinned to the run started (or to the open run of that workflow id).

        Raises:
            NotFound: no such schedule.
            ResourceExhausted: ``EVERRUNS_MAX_PENDING_TASKS`` tasks already wait.
            ServerUnavailable: the control plane is unreachable (not retried: a retry of a
                trigger that was applied would start a second run).
        """
        reply = await self._call(
            self._stub.trigger_schedule,
            pb.TriggerScheduleRequest(schedule_id=_check_string(schedule_id, "schedule_id")),
            retry=False,
        )
        return WorkflowHandle(self, reply.workflow_id, reply.run_id, created=reply.created)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule; the runs it started go on.

        Raises:
            NotFound: no such schedule.
            ServerUnavailable: the control plane is unreachable (not retried: a retry of a
                delete that was applied would say NotFound).
        """
        await self._call(
            self._stub.delete_schedule,
            pb.DeleteScheduleRequest(schedule_id=_check_string(schedule_id, "schedule_id")),
            retry=False,
        )


def _start_fields(entry: WorkflowStart | tuple[Any, ...]) -> tuple[WorkflowRef, Any, str | None]:
    """``(workflow, input, workflow_id)`` of one entry of `Client.start_workflows`."""
    if isinstance(entry, WorkflowStart):
        return entry.workflow, entry.input, entry.workflow_id
    if not isinstance(entry, tuple) or not 1 <= len(entry) <= 3:
        raise InvalidArgument(
            "each start must be a WorkflowStart or a tuple (workflow, input[, workflow_id]), "
            f"got {entry!r}"
        )
    return entry + (None,) * (3 - len(entry))


def _encoded_inputs(
    entries: Sequence[tuple[WorkflowRef, Any, str | None]], types: Sequence[str]
) -> list[bytes]:
    """Each entry's input as exact JSON; a bad one is named by its workflow.

    Raises:
        PayloadError: an input is not exact JSON.
    """
    try:
        return [encode(value) for _, value, _ in entries]
    except PayloadError as exc:
        unnamed = exc  # found again below, outside this handler: named, and not chained
    for (_, value, _), name in zip(entries, types, strict=True):
        encode(value, what=f"input of workflow {name!r}")
    raise unnamed
