"""The worker runtime: claim tasks from the control plane, run them, report their outcome.

`Worker.run` owns one nursery holding the worker's services — the claim (poll) loop, the worker
heartbeat, the cancellation stream — and, inside it, one nursery per claimed task holding the
task body, its lease heartbeat and its cancellation watch: if any of them fails or the control
plane says "cancel", the task's scope is cancelled and the others unwind. The worker claims only
free slots (`TaskSlots`), retries every call with backoff while the control plane is
unreachable, and never drops a finished task's outcome: it is retried until the control plane
accepts it or says the lease is stale. Shutdown is graceful (`Worker.shutdown`): stop claiming,
report ``draining``, give running tasks the grace period, then cancel them and release them to
other workers. Workflow tasks are decided by the pure replay engine (`everruns.domain.replay`);
this module never interprets history itself and never touches the database.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import ssl
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, TypeVar, cast

import attrs
import outcome
import trio

from everruns._aio import open_aio_loop
from everruns._aio.grpc import RpcChannel, client_tls_from_env, error_for_status, open_channel
from everruns._proto.everruns import v1 as pb
from everruns.domain import payload
from everruns.domain.budget import ENVELOPE_BYTES, SEND_BUDGET, field_bytes, text_bytes, within
from everruns.domain.commands import ScheduleActivity, is_terminal
from everruns.domain.context import WorkflowInfo
from everruns.domain.history import HistoryEvent, exception_text
from everruns.domain.limits import MAX_SECONDS, MAX_SECONDS_TEXT
from everruns.domain.registry import ActivityDefinition, Registry, default_registry
from everruns.domain.replay import FollowUp, Replayer
from everruns.domain.retry import RetryPolicy
from everruns.errors import (
    NOT_SERVED_ERROR,
    WORKER_SHUTDOWN_ERROR,
    ConcurrencyConflict,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NonDeterminismError,
    NotFound,
    PayloadError,
    ResourceExhausted,
    RpcError,
    ServerUnavailable,
    StaleLease,
)
from everruns.worker.activity import ActivityContext, ActivityInfo
from everruns.worker.backoff import Backoff
from everruns.worker.batch import Batcher, BatcherClosed
from everruns.worker.config import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_GRPC_ADDRESS,
    DEFAULT_MAX_CONCURRENT_TASKS,
    WorkerConfig,
    default_worker_id,
    parse_address,
)
from everruns.worker.failure import error_from_exception, make_error, type_name
from everruns.worker.heartbeats import Beat, Heartbeats
from everruns.worker.replays import ReplayCache
from everruns.worker.slots import Slot, TaskSlots, Thread

__all__ = ["Worker"]

log = logging.getLogger("everruns.worker")

Reply = TypeVar("Reply")

POLL_WAIT = 20.0
"""Long-poll budget of one PollTasks call, in seconds."""
RPC_TIMEOUT = 30.0
"""A call unanswered for this long (beyond its own long-poll budget) counts as unreachable."""
FINAL_REPORT_BUDGET = 5.0
"""Time a task being torn down (shutdown, cancelled run) may spend reporting its outcome."""
DEFAULT_HEARTBEAT_INTERVAL = 10.0
"""Worker and activity heartbeat period when the control plane names none."""
REPLAY_THREADS = 2
"""Replays of long histories run in threads so they never stall heartbeats; they are
CPU-bound, so a couple of threads is enough."""
INLINE_REPLAY_EVENTS = 32
"""A history this short is replayed on the Trio thread: a thread hop costs more than the
replay (workflow code orchestrates; its heavy work belongs in activities)."""
STREAM_SILENCE_LIMIT = 60.0
"""The cancellation stream carries keepalives; silent this long, it is presumed dead and
reopened."""
STREAM_OPEN_WAIT = 5.0
"""How long a new worker waits for its cancellation stream to open before it claims anyway."""
_EARLY_CANCELS = 256
KEPT_REPLAYS = 1000
"""Runs whose replay a worker keeps open for their next workflow task (least recently used
beyond)."""
MAX_RESULTS_PER_CALL = 256
"""Activity results one CompleteActivityTasks call carries at most."""

# Verdicts on a reported result: dropped (stale), refused, or failed for good (never accepted).
_RESULT_REFUSALS = (RpcError, FailedPrecondition, NotFound, InvalidArgument, ResourceExhausted)
# gRPC statuses (as RpcError.status) that say "try again later" rather than "no".
_TRANSIENT_STATUSES = frozenset({"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "CANCELLED"})


def _version() -> str:
    try:
        return metadata.version("everruns")
    except metadata.PackageNotFoundError:
        return "unknown"


def _refuses_size(exc: BaseException) -> bool:
    # RESOURCE_EXHAUSTED means both "busy, retry later" and "payload too large"; only the
    # second must not be retried forever. The message is all the status carries.
    text = str(exc).lower()
    return isinstance(exc, ResourceExhausted) and (
        "too large" in text or "payload" in text or "max_message_bytes" in text
    )


def is_transient(exc: BaseException) -> bool:
    """Return whether a failed call should be retried with backoff.

    Unreachable or restarting control planes, backpressure (RESOURCE_EXHAUSTED, except for a
    payload that is too large) and server-side errors that may clear (INTERNAL, UNKNOWN) are
    transient; a verdict about the request (stale lease, not found, invalid) is not.
    """
    if isinstance(exc, (ServerUnavailable, ConcurrencyConflict)):
        return True
    if isinstance(exc, ResourceExhausted):
        return not _refuses_size(exc)
    return isinstance(exc, RpcError) and exc.status in _TRANSIENT_STATUSES


def _is_stale(exc: BaseException) -> bool:
    return isinstance(exc, (FailedPrecondition, StaleLease, NotFound))


def _history_events(history: Sequence[Any]) -> list[HistoryEvent]:
    """A task's history (protocol messages) as replay takes it.

    Raises:
        PayloadError, InvalidArgument: an event is not a JSON object with a type.
    """
    return [
        HistoryEvent.of(
            e.sequence_num,
            payload.decode(e.data, what=f"history event {e.sequence_num}"),
            time=datetime.fromtimestamp(e.time, UTC),
        )
        for e in history
    ]


_FINAL_REPORT_TRIES = 2
"""Tries of a report made while the worker stops (shielded, within `FINAL_REPORT_BUDGET`): a
control plane that does not answer twice is most likely stopping too (an app that embeds both
cancels both); it releases the task itself when it sees the worker's connection drop. Before,
the report backed off for the whole 5 s budget against a closed port."""
_FINAL_DETAILS_BUDGET = 1.0
"""Time the last heartbeat details of an activity released at a stop may take, out of
`FINAL_REPORT_BUDGET`: the release that follows them matters more."""


def _ours(exc: BaseException) -> bool:
    """Whether ``exc`` is Trio's cancellation or an interrupt, or a group holding one: the
    worker's to handle, never an activity's failure. Not asked of what a sync activity's
    thread raised: that is all the activity's own (`Worker._call_activity`)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(lambda e: isinstance(e, trio.Cancelled | KeyboardInterrupt)) is not None
    return isinstance(exc, trio.Cancelled | KeyboardInterrupt)


def _activity_info(task: Any) -> ActivityInfo:
    """What an activity attempt sees of itself (`ActivityContext.info`), from its task."""
    return ActivityInfo(
        workflow_id=task.workflow_id,
        run_id=task.run_id,
        workflow_type=task.workflow_type,
        activity_id=task.activity_id,
        activity_type=task.activity_type,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        task_id=task.task_id,
        heartbeat_timeout=task.heartbeat_timeout_s or None,
        start_to_close_timeout=task.start_to_close_s or None,
        scheduled_at=_time_or_none(task.scheduled_at),
        started_at=_time_or_none(task.claimed_at),
    )


def _time_or_none(seconds: float) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


# --------------------------------------------------------------------------------- outcomes


@attrs.frozen
class _Completed:
    result: bytes


@attrs.frozen
class _Failed:
    error: dict[str, Any]
    non_retryable: bool
    # Given back to the queue for another worker (FailActivityTask's release), not failed.
    release: bool = False


@attrs.frozen
class _Decided:
    commands: bytes
    seen_sequence: int
    # The activities the commands schedule, unless they also end the run (then none starts).
    activities: tuple[ScheduleActivity, ...] = ()


@attrs.frozen
class _WorkflowTaskFailed:
    error: dict[str, Any]
    non_determinism: bool


_Outcome = _Completed | _Failed | _Decided | _WorkflowTaskFailed


@attrs.define
class _Ahead:
    """The decision made ahead for the workflow task an activity's result wakes: the run's
    replay, taken out of the cache until the control plane says whether it applied it."""

    fn: Callable[..., Any]
    replayer: Replayer
    follow_up: FollowUp
    commands: bytes
    decided: bool = False


class _RunningTask:
    """A claimed task and what the worker knows about it while it runs."""

    def __init__(self, task: Any, slot: Slot) -> None:
        self.task = task
        self.slot: Slot | None = slot
        self.scope: trio.CancelScope | None = None
        self.beat: Beat[_RunningTask] | None = None
        self.cancel_reason: str | None = None
        self.stale_reason: str | None = None
        self.ctx: ActivityContext | None = None
        self.outcome: _Outcome | None = None
        # A sync activity's thread, taken with its slot (`TaskSlots.start`); it goes with the
        # activity's thread, or back when none is started.
        self.thread: Thread | None = None
        self.claim_time: float = task.claimed_at
        self.received = trio.current_time()
        self.ahead: _Ahead | None = None
        # An activity started ahead of its decision's reply: set once the reply hands its task
        # over (`task` then carries the lease) or says it will not (`stale_reason` then says
        # why). None for a task claimed as usual.
        self.bound: trio.Event | None = None

    async def wait_bound(self) -> bool:
        """Wait until the task is ours to report on; False if it never will be."""
        if self.bound is not None:
            await self.bound.wait()
        return self.stale_reason is None

    @property
    def key(self) -> str:
        return str(self.task.task_id)

    def take_slot(self) -> Slot | None:
        """Take the task's slot over, to release it or to run another task in it; None when
        it was taken already. Whoever takes it owns it: nobody else releases it."""
        slot, self.slot = self.slot, None
        return slot

    def describe(self) -> str:
        t = self.task
        if t.kind == "activity":
            return (
                f"activity {t.activity_type!r} (id {t.activity_id}, attempt {t.attempt}, "
                f"workflow_id={t.workflow_id!r})"
            )
        return f"workflow task of {t.workflow_type!r} (workflow_id={t.workflow_id!r})"

    def open_scope(self) -> trio.CancelScope:
        """The scope the task's work runs in: cancelled at once if it must stop already, and
        by `request_cancel` or `mark_stale` later."""
        self.scope = trio.CancelScope()
        if self.cancel_reason is not None or self.stale_reason is not None:
            self.scope.cancel()
        return self.scope

    def request_cancel(self, reason: str) -> None:
        if self.cancel_reason is None and self.stale_reason is None:
            self.cancel_reason = reason
        self._stop()

    def mark_stale(self, reason: str) -> None:
        if self.stale_reason is None:
            self.stale_reason = reason
        self._stop()

    def _stop(self) -> None:
        if self.ctx is not None:
            self.ctx._mark_cancel_requested()
        if self.scope is not None:
            self.scope.cancel()


# ----------------------------------------------------------------------------------- worker


class Worker:
    """Runs the workflows and activities of a registry for one control plane.

    Embed it in a Trio program with ``await nursery.start(worker.run)``, or run it as a process
    with ``python -m everruns.worker MODULE ...``.

    Args:
        registry: where the workflow and activity functions are registered.
        address: the control plane's ``host:port``.
        worker_id: this worker's unique name (default ``hostname-pid-random``).
        max_concurrent_tasks: task slots; the worker never holds more claimed tasks.
        auth_token: bearer token, if the control plane requires one.
        tls: TLS context for the connection (None: plaintext).
        grace_period: seconds `shutdown` lets running tasks finish before cancelling them.
        max_sync_threads: threads for sync activities (default: one per task slot). A worker
            claims a sync activity only with a thread free for it (fewer threads than slots
            make its claims smaller while it serves sync activities, and leave sync
            activities out of them while every thread is busy); a thread abandoned by a stop
            counts until it ends.
        poll_wait: long-poll budget of one claim call, in seconds (> 0, at most `MAX_SECONDS`).
        start_ahead: start the activities a decision schedules while it is on its way (see
            `WorkerConfig.start_ahead`).

    Raises:
        ConfigError: an argument is invalid; the message names it.
    """

    def __init__(
        self,
        registry: Registry = default_registry,
        *,
        address: str = DEFAULT_GRPC_ADDRESS,
        worker_id: str | None = None,
        max_concurrent_tasks: int = DEFAULT_MAX_CONCURRENT_TASKS,
        auth_token: str | None = None,
        tls: ssl.SSLContext | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        max_sync_threads: int | None = None,
        poll_wait: float = POLL_WAIT,
        start_ahead: bool = True,
    ) -> None:
        if isinstance(poll_wait, bool) or not (
            isinstance(poll_wait, (int, float)) and 0 < poll_wait <= MAX_SECONDS
        ):
            raise ConfigError(
                f"poll_wait must be a number of seconds > 0 and at most {MAX_SECONDS_TEXT}, "
                f"got {poll_wait!r}"
            )
        host, port = parse_address(address, setting="address")
        config = WorkerConfig(
            host=host,
            port=port,
            worker_id=worker_id if worker_id is not None else default_worker_id(),
            max_concurrent_tasks=max_concurrent_tasks,
            auth_token=auth_token,
            grace_period=grace_period,
            max_sync_threads=max_sync_threads,
            start_ahead=start_ahead,
        )
        self._init(config, registry, tls, poll_wait)

    @classmethod
    def from_config(
        cls,
        config: WorkerConfig,
        registry: Registry = default_registry,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> Worker:
        """Return a worker for ``config``."""
        worker = cls.__new__(cls)
        worker._init(config, registry, tls, POLL_WAIT)
        return worker

    @classmethod
    def from_env(
        cls,
        registry: Registry = default_registry,
        *,
        env: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Worker:
        """Return a worker configured from the environment (see `WorkerConfig.from_env`).

        Reads ``GRPC_ADDRESS``, ``WORKER_ID``, ``MAX_CONCURRENT_TASKS``,
        ``EVERRUNS_AUTH_TOKEN``, ``EVERRUNS_WORKER_GRACE_PERIOD`` and, unless ``tls`` is given,
        ``EVERRUNS_TLS`` and ``EVERRUNS_TLS_CA``; never ``DATABASE_URL``.

        Raises:
            ConfigError: a variable has a bad value; the message names it.
        """
        if tls is None:
            tls = client_tls_from_env(os.environ if env is None else env)
        return cls.from_config(WorkerConfig.from_env(env), registry, tls=tls)

    def _init(
        self, config: WorkerConfig, registry: Registry, tls: ssl.SSLContext | None, poll: float
    ) -> None:
        self.config = config
        self.registry = registry
        self._tls = tls
        self._poll_wait = poll
        self._slots = TaskSlots(config.max_concurrent_tasks, threads=config.max_sync_threads)
        # The sync activity types served, read when `run` starts: offered slots need threads.
        self._sync_types: frozenset[str] = frozenset()
        self._replay_limiter = trio.CapacityLimiter(REPLAY_THREADS)
        self._rng = random.Random()
        self._running: dict[str, _RunningTask] = {}
        self._early_cancels: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._drain_requested = trio.Event()
        self._stream_open = trio.Event()  # the cancellation stream has delivered a message
        self._heartbeat_wakeup = trio.Event()
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self._registering: trio.CancelScope | None = None
        self._channel: RpcChannel | None = None
        self._stub: Any = None
        self._task_nursery: trio.Nursery | None = None
        self._results: Batcher[_RunningTask, BaseException | None] = Batcher(
            self._send_results, max_batch=MAX_RESULTS_PER_CALL, size=_result_bytes
        )
        self._heartbeats: Heartbeats[_RunningTask] = Heartbeats(self._send_heartbeat)
        self._replays = ReplayCache(KEPT_REPLAYS)
        self._decided_ahead = 0
        self._decisions: Batcher[Any, Any] = Batcher(
            self._send_decisions, max_batch=MAX_RESULTS_PER_CALL, size=_request_bytes
        )
        # The largest message the control plane reads, as it said at registration (0: not
        # said, an older one): a decision over it fails its workflow task instead of being sent.
        self._max_message_bytes = 0
        self._token: trio.lowlevel.TrioToken | None = None
        # Names this run of the worker (made when `run` starts) on every registration,
        # heartbeat and cancellation stream: the control plane releases the tasks of this
        # run when its connection drops, even if it registered again meanwhile.
        self._incarnation = ""
        self._run_called = False
        self._released = 0

    # ------------------------------------------------------------------------ public surface

    @property
    def worker_id(self) -> str:
        """This worker's name, as the control plane lists it."""
        return self.config.worker_id

    @property
    def address(self) -> str:
        """The control plane's ``host:port``."""
        return self.config.address

    @property
    def load(self) -> int:
        """Tasks running now."""
        return self._slots.load

    @property
    def decided_ahead(self) -> int:
        """Workflow tasks this worker decided ahead, with the result that woke them, and the
        control plane applied (each saved a round trip and a replay)."""
        return self._decided_ahead

    @property
    def draining(self) -> bool:
        """Whether `shutdown` was called."""
        return self._drain_requested.is_set()

    def shutdown(self) -> None:
        """Start a graceful shutdown and return at once; `run` returns when it is done.

        The worker stops claiming, reports ``draining``, lets running tasks finish within the
        grace period, then cancels the rest and releases them so another worker takes them at
        once. Calling it again does nothing. Call it from the Trio thread running the worker.
        """
        if self._drain_requested.is_set():
            return
        self._drain_requested.set()
        if self._registering is not None:
            self._registering.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown` has drained the worker, or until cancelled.

        Opens the trio-asyncio loop (or joins an open one) and the channel, registers, reports
        readiness through ``task_status`` once registered, then claims and runs tasks. While
        the control plane is unreachable it keeps retrying with backoff and never gives up.

        Cancellation: an immediate stop; running tasks are cancelled and released to other
        workers (each report shielded and bounded), finished ones still report their outcome.

        Raises:
            RpcError: the control plane refused the registration for good (e.g. a wrong
                bearer token).
            RuntimeError: ``run`` was already called on this worker.
        """
        if self._run_called:
            raise RuntimeError("Worker.run may be called only once per Worker")
        self._run_called = True
        self._incarnation = str(uuid.uuid4())
        self._token = trio.lowlevel.current_trio_token()
        self._sync_types = frozenset(
            name
            for name in self.registry.activity_types()
            if (d := self.registry.get_activity(name)) is not None and not d.is_async
        )
        cfg = self.config
        async with (
            open_aio_loop(),
            open_channel(
                cfg.host,
                cfg.port,
                auth_token=cfg.auth_token,
                tls=self._tls,
                call_stream=cfg.call_stream,
            ) as channel,
        ):
            self._channel = channel
            self._stub = pb.WorkerServiceStub(channel.raw)
            with trio.CancelScope() as registering:
                self._registering = registering
                await self._register()
            self._registering = None
            if registering.cancelled_caught:
                log.info("worker %s stopped before it could register", cfg.worker_id)
                task_status.started()
                return
            log.info(
                "worker %s registered with the control plane at %s (%d slots)",
                cfg.worker_id,
                cfg.address,
                cfg.max_concurrent_tasks,
            )
            async with trio.open_nursery() as services:
                services.start_soon(self._worker_heartbeat_loop)
                await services.start(self._results.run)
                await services.start(self._heartbeats.run)
                await services.start(self._decisions.run)
                # Shielded so that even an immediate stop closes the stream only after the
                # goodbye below: its drop is what makes the control plane mark us lost.
                stream_scope = trio.CancelScope(shield=True)
                services.start_soon(self._cancellation_loop, stream_scope)
                try:
                    # Claim only once the control plane follows the worker's connection (its
                    # first message on the stream): a worker that dies right after its first
                    # claim then has its tasks released at once, not by the stale-heartbeat
                    # rule 30 s later.
                    with trio.move_on_after(STREAM_OPEN_WAIT):
                        await self._stream_open.wait()
                except BaseException:
                    # Stopped before it claimed anything: the shielded stream goes too (left
                    # open, it kept reconnecting, and the services nursery waited for ever).
                    stream_scope.cancel()
                    raise
                try:
                    with trio.CancelScope() as tasks_scope:
                        async with trio.open_nursery() as tasks:
                            self._task_nursery = tasks
                            poll_scope = trio.CancelScope()
                            tasks.start_soon(self._poll_loop, poll_scope)
                            services.start_soon(self._drain_watch, tasks_scope, poll_scope)
                            task_status.started()
                    if tasks_scope.cancelled_caught:
                        log.warning(
                            "worker %s: grace period of %g s over; %d unfinished task(s) were "
                            "cancelled and released to other workers",
                            cfg.worker_id,
                            cfg.grace_period,
                            self._released,
                        )
                finally:
                    # No task runs any more; one handed back from now on is left unstarted.
                    self._task_nursery = None
                    # No task replays any more: unwind the workflows kept open now, not when
                    # the garbage collector finds them.
                    self._replays.close()
                    # Say goodbye while the cancellation stream is still open, so the control
                    # plane records a clean stop rather than a lost worker.
                    with trio.move_on_after(FINAL_REPORT_BUDGET, shield=True):
                        await self._goodbye()
                    stream_scope.cancel()
                    services.cancel_scope.cancel()
                log.info(
                    "worker %s drained and stopped (%d workflow task(s) decided ahead)",
                    cfg.worker_id,
                    self._decided_ahead,
                )

    # ----------------------------------------------------------------------------- calls

    async def _call(
        self,
        method: Callable[..., Awaitable[Reply]],
        request: Any,
        *,
        what: str,
        budget: float = RPC_TIMEOUT,
    ) -> Reply:
        """One call; no answer within ``budget`` counts as an unreachable control plane."""
        assert self._channel is not None
        with trio.move_on_after(budget):
            return await self._channel.unary(method, request)
        raise ServerUnavailable(f"{what}: no answer within {budget:g} s")

    async def _call_until_answered(
        self,
        method: Callable[..., Awaitable[Reply]],
        request: Any,
        *,
        what: str,
        budget: float = RPC_TIMEOUT,
        tries: int | None = None,
    ) -> Reply:
        """Call until the control plane gives a verdict, backing off while it cannot (at most
        ``tries`` times, when given).

        Raises:
            FailedPrecondition, NotFound, InvalidArgument, RpcError: a non-transient verdict.
            ServerUnavailable...: still transient after ``tries`` tries.
        """
        backoff = Backoff(rng=self._rng)
        while True:
            try:
                reply = await self._call(method, request, what=what, budget=budget)
            except (RpcError, ResourceExhausted, ConcurrencyConflict) as exc:
                if not is_transient(exc) or (tries is not None and backoff.failures + 1 >= tries):
                    raise
                delay = backoff.next_delay()
                self._log_retry(what, exc, delay)
                await trio.sleep(delay)
            else:
                if backoff.failures:
                    log.info("control plane at %s answered %s again", self.config.address, what)
                return reply

    def _log_retry(
        self, what: str, exc: BaseException, delay: float, *, level: int = logging.WARNING
    ) -> None:
        if isinstance(exc, ServerUnavailable):
            log.log(
                level,
                "control plane at %s unreachable, retrying in %.1f s (%s)",
                self.config.address,
                delay,
                exc,
            )
        else:
            log.log(
                level,
                "control plane at %s refused %s for now (%s), retrying in %.1f s",
                self.config.address,
                what,
                exc,
                delay,
            )

    async def _register(self) -> None:
        request = pb.RegisterWorkerRequest(
            worker_id=self.config.worker_id,
            activity_types=self.registry.activity_types(),
            workflow_types=self.registry.workflow_types(),
            max_concurrency=self.config.max_concurrent_tasks,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=_version(),
            incarnation=self._incarnation,
        )
        reply = await self._call_until_answered(
            self._stub.register_worker, request, what="RegisterWorker"
        )
        interval = float(reply.heartbeat_interval_s)
        self._heartbeat_interval = interval if interval > 0 else DEFAULT_HEARTBEAT_INTERVAL
        limit = self._max_message_bytes = max(0, int(reply.max_message_bytes))
        budget = min(SEND_BUDGET, limit - ENVELOPE_BYTES) if limit else SEND_BUDGET
        self._results.max_bytes = self._decisions.max_bytes = budget

    async def _goodbye(self) -> None:
        request = pb.WorkerHeartbeatRequest(
            worker_id=self.config.worker_id,
            current_load=0,
            status="stopped",
            incarnation=self._incarnation,
        )
        try:
            await self._call(self._stub.worker_heartbeat, request, what="WorkerHeartbeat")
        except Exception as exc:
            log.info(
                "could not tell the control plane that worker %s stopped: %s", self.worker_id, exc
            )

    # -------------------------------------------------------------------------- services

    async def _worker_heartbeat_loop(self) -> None:
        backoff = Backoff(rng=self._rng)
        wait = self._heartbeat_interval
        while True:
            with trio.move_on_after(wait):
                await self._heartbeat_wakeup.wait()
            self._heartbeat_wakeup = trio.Event()
            request = pb.WorkerHeartbeatRequest(
                worker_id=self.config.worker_id,
                current_load=self._slots.load,
                status="draining" if self.draining else "active",
                incarnation=self._incarnation,
            )
            try:
                reply = await self._call(
                    self._stub.worker_heartbeat, request, what="WorkerHeartbeat"
                )
                if not reply.known and not self.draining:
                    log.warning(
                        "the control plane no longer knows worker %s; registering again",
                        self.config.worker_id,
                    )
                    await self._register()
                # A draining worker is not registered again: its goodbye ("stopped") may have
                # landed before this heartbeat ("draining"), which it would undo.
            except Exception as exc:
                wait = min(self._heartbeat_interval, backoff.next_delay())
                if is_transient(exc):
                    # The claim loop already reports the outage; say it here only once.
                    level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                    self._log_retry("WorkerHeartbeat", exc, wait, level=level)
                else:
                    log.error("worker heartbeat refused: %s (retrying in %.1f s)", exc, wait)
                continue
            backoff.reset()
            wait = self._heartbeat_interval

    async def _cancellation_loop(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._follow_cancellations()

    async def _follow_cancellations(self) -> None:
        assert self._channel is not None
        backoff = Backoff(rng=self._rng)
        request = pb.StreamCancellationsRequest(
            worker_id=self.config.worker_id, incarnation=self._incarnation
        )
        while True:
            try:
                with trio.CancelScope() as watchdog:
                    watchdog.deadline = trio.current_time() + STREAM_SILENCE_LIMIT
                    # RpcChannel.stream is an async generator: close it promptly, not at GC.
                    stream = cast(
                        AsyncGenerator[Any, None],
                        self._channel.stream(self._stub.stream_cancellations, request),
                    )
                    async with aclosing(stream):
                        async for message in stream:
                            watchdog.deadline = trio.current_time() + STREAM_SILENCE_LIMIT
                            self._stream_open.set()
                            backoff.reset()
                            if not message.keepalive:
                                self._dispatch_cancel(
                                    message.task_id, message.lease_token, message.reason
                                )
                if watchdog.cancelled_caught:
                    # A half-open connection delivers nothing, not even keepalives.
                    why = f"nothing received for {STREAM_SILENCE_LIMIT:g} s"
                else:
                    why = "the control plane closed it"
            except RpcError as exc:
                why = str(exc)
            except Exception as exc:  # a malformed message must not end cancellation delivery
                log.exception("cancellation stream failed unexpectedly")
                why = f"{type(exc).__name__}: {exc}"
            delay = backoff.next_delay()
            log.log(
                logging.WARNING if backoff.failures == 1 else logging.DEBUG,
                "cancellation stream from the control plane at %s broke (%s); reconnecting "
                "in %.1f s",
                self.config.address,
                why,
                delay,
            )
            await trio.sleep(delay)

    def _dispatch_cancel(self, task_id: str, lease_token: int, reason: str) -> None:
        why = reason or "cancellation requested by the control plane"
        handle = self._running.get(task_id)
        if handle is None or (handle.bound is not None and not handle.bound.is_set()):
            # The claim reply may still be on its way, or the decision's reply that binds an
            # activity started ahead to its lease (`_bind`): remember it for a moment.
            self._early_cancels[(task_id, lease_token)] = why
            while len(self._early_cancels) > _EARLY_CANCELS:
                self._early_cancels.popitem(last=False)
            return
        if handle.task.lease_token != lease_token:
            log.debug("ignoring a cancellation of %s for another lease", handle.describe())
            return
        log.info("cancelling %s: %s", handle.describe(), why)
        handle.request_cancel(why)

    async def _drain_watch(
        self, tasks_scope: trio.CancelScope, poll_scope: trio.CancelScope
    ) -> None:
        await self._drain_requested.wait()
        grace = self.config.grace_period
        log.info(
            "worker %s draining: no new tasks; %d running task(s) have %g s to finish",
            self.config.worker_id,
            len(self._running),
            grace,
        )
        poll_scope.cancel()
        self._heartbeat_wakeup.set()
        deadline = trio.current_time() + grace
        tasks_scope.deadline = min(tasks_scope.deadline, deadline)
        await trio.sleep_until(deadline)
        # Sync activities cannot be interrupted: their threads, abandoned as their tasks are
        # cancelled, are told to stop early here (and by `_run_sync_activity`).
        for handle in self._running.values():
            if handle.ctx is not None:
                handle.ctx._mark_cancel_requested()

    # ---------------------------------------------------------------------------- claims

    async def _poll_loop(self, scope: trio.CancelScope) -> None:
        with scope:
            all_activity_types = self.registry.activity_types()
            workflow_types = self.registry.workflow_types()
            if not all_activity_types and not workflow_types:
                log.warning("worker %s serves nothing; it will not claim tasks", self.worker_id)
                await trio.sleep_forever()
            other_types = [t for t in all_activity_types if t not in self._sync_types]
            backoff = Backoff(rng=self._rng)
            # Set when the poll sent without the sync types (below) has ended; None: none sent.
            threadless: trio.Event | None = None
            async with trio.open_nursery() as polls:
                while True:
                    free = await self._slots.wait_claimable()
                    slots = self._slots.reserve(free)
                    if self._sync_types:
                        # A sync activity is claimed only with a thread free for it: claimed
                        # without, its start-to-close clock would run while it waits for one.
                        # So the claim is no larger than the free threads, or leaves the sync
                        # types out while every thread is busy.
                        threaded = self._slots.add_threads(slots)
                        for slot in slots[threaded or len(slots) :]:
                            self._slots.release(slot)
                        slots = slots[: threaded or len(slots)]
                        if not threaded:
                            # That poll runs beside this loop, which polls again with the sync
                            # types as soon as a thread is free (a failed or cancelled
                            # activity's thread, or an abandoned one that ended: no result
                            # call's claim refills those). The poll out is not cancelled: its
                            # reply may carry tasks already claimed for this worker.
                            if (other_types or workflow_types) and (
                                threadless is None or threadless.is_set()
                            ):
                                if len(slots) > 1:
                                    # One free slot stays out of it, for the poll with the
                                    # sync types a thread coming free calls for: an abandoned
                                    # thread ends after its task gave its slot back, and a poll
                                    # holding every free slot would leave it idle until then.
                                    self._slots.release(slots.pop())
                                threadless = trio.Event()
                                polls.start_soon(
                                    self._poll_without_threads,
                                    slots,
                                    other_types,
                                    workflow_types,
                                    backoff,
                                    threadless,
                                )
                            else:
                                for slot in slots:
                                    self._slots.release(slot)
                            await self._until_thread_or(threadless)
                            continue
                    await self._poll(slots, all_activity_types, workflow_types, backoff)

    async def _poll_without_threads(
        self,
        slots: list[Slot],
        activity_types: list[str],
        workflow_types: list[str],
        backoff: Backoff,
        ended: trio.Event,
    ) -> None:
        try:
            await self._poll(slots, activity_types, workflow_types, backoff)
        finally:
            ended.set()

    async def _until_thread_or(self, ended: trio.Event | None) -> None:
        """Return once a thread for sync activities is free, or ``ended`` is set."""
        if ended is None or ended.is_set():
            await self._slots.wait_thread()
            return
        async with trio.open_nursery() as nursery:

            async def first(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, self._slots.wait_thread)
            nursery.start_soon(first, ended.wait)

    async def _poll(
        self,
        slots: list[Slot],
        activity_types: list[str],
        workflow_types: list[str],
        backoff: Backoff,
    ) -> None:
        """One long poll for ``slots`` (reserved, given back unless a task claimed starts in
        them); backs off after a failure."""
        used = 0
        asked_at = trio.current_time()
        try:
            request = pb.PollTasksRequest(
                worker_id=self.config.worker_id,
                max_tasks=len(slots),
                activity_types=activity_types,
                workflow_types=workflow_types,
                wait_s=self._poll_wait,
            )
            try:
                reply = await self._call(
                    self._stub.poll_tasks,
                    request,
                    what="PollTasks",
                    budget=self._poll_wait + RPC_TIMEOUT,
                )
            except Exception as exc:
                delay = backoff.next_delay()
                if is_transient(exc):
                    self._log_retry("PollTasks", exc, delay)
                else:
                    log.error("PollTasks refused: %s (retrying in %.1f s)", exc, delay)
                    if isinstance(exc, (NotFound, FailedPrecondition)):
                        self._heartbeat_wakeup.set()  # re-register if forgotten
                for slot in slots:
                    self._slots.release(slot)
                slots = []
                await trio.sleep(delay)
                return
            if backoff.failures:
                log.info("control plane at %s answers again", self.config.address)
                backoff.reset()
            used = self._start_tasks(reply.tasks, slots, what="PollTasks")
        finally:
            for slot in slots[used:]:
                self._slots.release(slot)
        if used:
            # Let the tasks just started run before this loop spends the next moment
            # encoding and sending its next long poll (twice: Trio may run the tasks
            # of one scheduling batch in either order). Measured: w4 latency p50
            # 7.2-7.6 -> 6.2-6.6 ms.
            for _ in range(2):
                await trio.lowlevel.checkpoint()
        elif trio.current_time() - asked_at < self._poll_wait / 2:
            # A long poll that comes back empty-handed at once (a control plane that
            # is shutting down, say) must not turn into a busy loop.
            await trio.sleep(min(1.0, self._poll_wait / 2))

    def _start_tasks(self, tasks: Sequence[Any], slots: Sequence[Slot], *, what: str) -> int:
        """Start each claimed task in a slot it was claimed for; return how many slots used.

        Tasks beyond the slots, or all of them once the worker runs no more tasks, are left
        for the control plane to reclaim."""
        nursery = self._task_nursery
        count = min(len(tasks), len(slots)) if nursery is not None else 0
        if len(tasks) > count:
            log.error(
                "%s handed out %d task(s) and the worker can run %d of them now; the others "
                "are left for the control plane to reclaim",
                what,
                len(tasks),
                count,
            )
        if nursery is None:
            return 0
        for task, slot in zip(tasks[:count], slots[:count], strict=True):
            self._launch(nursery, _RunningTask(task, slot))
        return count

    def _launch(self, nursery: trio.Nursery, handle: _RunningTask) -> None:
        """Run ``handle``'s task in its slot, as a task of the worker's task nursery."""
        assert handle.slot is not None
        task = handle.task
        handle.thread = self._slots.start(
            handle.slot,
            needs_thread=task.kind == "activity" and task.activity_type in self._sync_types,
        )
        ahead = " (ahead)" if handle.bound is not None else ""
        nursery.start_soon(
            self._run_task, handle, name=f"everruns task {task.kind} {task.task_id}{ahead}"
        )

    def _eager_offer(self, finished: Sequence[_RunningTask]) -> tuple[list[Slot], int]:
        """Reserve free slots for tasks a completion may hand back; return them and how many
        slots to offer in all, the finished tasks' own slots first (each passes on).

        A worker that runs sync activities offers only slots it has a thread for (any task
        handed back may be a sync activity); `_adopt_new_tasks` uses only those."""
        if self.draining:
            return [], 0
        extra = self._slots.reserve_eager(self._slots.free)
        if not self._sync_types:
            return extra, len(finished) + len(extra)
        own = [h.slot for h in finished if h.slot is not None]
        self._slots.add_threads([*own, *extra])
        kept = [slot for slot in extra if slot.thread is not None]
        for slot in extra[len(kept) :]:
            self._slots.release(slot)
        return kept, sum(slot.thread is not None for slot in own) + len(kept)

    # ------------------------------------------------------------------------------ tasks

    async def _run_task(self, handle: _RunningTask) -> None:
        task = handle.task
        self._running[handle.key] = handle
        early = self._early_cancels.pop((handle.key, task.lease_token), None)
        if early is not None:
            handle.request_cancel(early)
        try:
            if task.kind == "activity":
                await self._run_activity(handle)
            elif task.kind == "workflow":
                await self._run_workflow_task(handle)
            else:
                log.error(
                    "task %s has unknown kind %r; leaving it to the control plane",
                    task.task_id,
                    task.kind,
                )
        except Exception:
            log.exception(
                "internal error while running %s; the control plane will release it",
                handle.describe(),
            )
        finally:
            if handle.thread is not None:
                handle.thread.give_back()  # unless its thread runs on (abandoned): it ends it
            if self._running.get(handle.key) is handle:
                del self._running[handle.key]
            # A completion that handed back a task may have taken the slot over already.
            own = handle.take_slot()
            if own is not None:
                self._slots.release(own)

    # ------------------------------------------------------------------------- activities

    async def _run_activity(self, handle: _RunningTask) -> None:
        task = handle.task
        definition = self.registry.get_activity(task.activity_type)
        args: Any = None
        if definition is None:
            # A control plane handed it over on an older registration of this worker id
            # (another process, other code): not the activity's fault, so it goes back to the
            # queue for a worker that serves it, its attempt uncharged.
            handle.outcome = _Failed(
                make_error(
                    NOT_SERVED_ERROR,
                    f"worker {self.worker_id} has no activity named {task.activity_type!r} "
                    f"(it serves {', '.join(self.registry.activity_types()) or 'none'}); "
                    "given back to the queue",
                ),
                False,
                release=True,
            )
            log.warning("%s", handle.outcome.error["message"])
        else:
            try:
                args = payload.decode(task.input, what=f"input of activity {task.activity_type!r}")
                previous = payload.decode(task.heartbeat_details, what="heartbeat details")
            except PayloadError as exc:
                handle.outcome = _Failed(error_from_exception(exc, non_retryable=True), True)
            else:
                handle.ctx = self._activity_context(handle, previous)
        reported = internal = False
        try:
            if handle.outcome is None and definition is not None:
                handle.beat = self._heartbeats.add(handle, self._beat_interval(handle.task))
                try:
                    with handle.open_scope():
                        handle.outcome = await self._call_activity(definition, handle, args)
                finally:
                    self._heartbeats.remove(handle.beat)
            await self._finish_activity(handle)
            reported = True
        except Exception:
            internal = True
            raise
        finally:
            if not reported:
                with trio.move_on_after(FINAL_REPORT_BUDGET, shield=True):
                    await self._final_activity_report(handle, internal=internal)

    def _activity_context(self, handle: _RunningTask, previous: Any) -> ActivityContext:
        token = self._token
        assert token is not None

        def on_heartbeat() -> None:
            # Called from the activity (maybe in a thread): hop onto the Trio thread.
            try:
                token.run_sync_soon(self._poke, handle)
            except trio.RunFinishedError:
                pass

        info = _activity_info(handle.task)
        ctx = ActivityContext(info, heartbeat_details=previous, on_heartbeat=on_heartbeat)
        if handle.cancel_reason is not None or handle.stale_reason is not None:
            ctx._mark_cancel_requested()
        return ctx

    async def _call_activity(
        self, definition: ActivityDefinition, handle: _RunningTask, args: Any
    ) -> _Completed | _Failed:
        ctx = handle.ctx
        try:
            if definition.is_async:
                value = await definition.fn(ctx, args)
            else:
                ran = await self._run_sync_activity(definition, handle, args)
                if isinstance(ran, outcome.Error):
                    # Whatever the thread raised is the activity's own, a KeyboardInterrupt
                    # too: Python delivers Ctrl-C to the main thread only. The worker's own
                    # cancellation comes out of `_run_sync_activity` itself.
                    return self._activity_failed(handle, ran.error)
                value = ran.unwrap()
        except BaseException as exc:
            # Any error of the activity's own fails this attempt, not the worker, which would
            # crash each worker the task went to next: SystemExit (a script's sys.exit()),
            # GeneratorExit, a library's BaseException. Not trio's Cancelled (its scope was
            # cancelled: the cancel request, or the worker stopping) nor a KeyboardInterrupt
            # out of an async activity (the operator's Ctrl-C, delivered on the Trio thread).
            if _ours(exc):
                raise
            return self._activity_failed(handle, exc)
        try:
            result = payload.encode(value, what=f"result of activity {definition.name!r}")
        except PayloadError as exc:
            return _Failed(error_from_exception(exc, non_retryable=True), True)
        return _Completed(result)

    def _activity_failed(self, handle: _RunningTask, exc: BaseException) -> _Failed:
        log.info("%s failed: %s: %s", handle.describe(), type_name(exc), exception_text(exc))
        error = error_from_exception(exc)
        return _Failed(error, bool(error["non_retryable"]))

    async def _run_sync_activity(
        self, definition: ActivityDefinition, handle: _RunningTask, args: Any
    ) -> outcome.Outcome[Any]:
        """Run a sync activity in its thread (taken with its slot); return what the thread
        returned or raised.

        Cancellation (a cancel request, a lost lease, the grace period over, the host app
        cancelling `Worker.run`): Trio cannot interrupt the thread, so it is abandoned at once
        and told (``ctx.cancel_requested``); `Cancelled` goes on, and the task is reported
        (released, or cancelled) without waiting for the thread. The thread runs on until the
        activity returns, its outcome dropped and its heartbeats ignored; it counts against
        ``max_sync_threads`` until then.
        """
        ctx = handle.ctx
        assert ctx is not None
        while handle.thread is None:
            # Not taken with the claim: a control plane handed out a sync activity when the
            # worker did not offer a thread for one.
            handle.thread = self._slots.new_thread()
            if handle.thread is None:
                await self._slots.wait_thread()
        try:
            # Captured in the thread, so that what the thread raised is told apart from what
            # the Trio thread raises here (Cancelled, or the operator's KeyboardInterrupt).
            return await trio.to_thread.run_sync(
                functools.partial(outcome.capture, definition.fn, ctx, args),
                # Held already; Trio releases it when the thread really ends (`Thread`).
                limiter=cast(trio.CapacityLimiter, handle.thread),
                abandon_on_cancel=True,
            )
        except BaseException:
            ctx._mark_cancel_requested()
            raise

    def _beat_interval(self, task: Any) -> float:
        # The control plane announces the period it needs (it releases tasks after a few
        # missed beats); an activity's own heartbeat timeout can only make it shorter.
        timeout = float(task.heartbeat_timeout_s)
        interval = self._heartbeat_interval
        return min(interval, timeout / 3) if timeout > 0 else interval

    def _poke(self, handle: _RunningTask) -> None:
        if handle.beat is not None:
            self._heartbeats.poke(handle.beat)

    async def _send_heartbeat(self, beat: Beat[_RunningTask]) -> float | None:
        """One RecordHeartbeat call; returns when the next is due, or None to stop beating."""
        handle = beat.subject
        if not await handle.wait_bound():
            return None
        task = handle.task
        ctx = handle.ctx
        assert ctx is not None
        details = ctx._take_details()
        request = pb.RecordHeartbeatRequest(
            task_id=task.task_id, lease_token=task.lease_token, details=details or b""
        )
        try:
            reply = await self._call(
                self._stub.record_heartbeat,
                request,
                what="RecordHeartbeat",
                budget=max(beat.interval, 5.0),
            )
        except trio.Cancelled:
            # The attempt ended meanwhile: its report sends what this one may not have.
            if details is not None:
                ctx._requeue_details(details)
            raise
        except Exception as exc:
            if _is_stale(exc):
                log.warning("%s lost its lease (%s); stopping it", handle.describe(), exc)
                handle.mark_stale(str(exc))
                return None
            if beat.backoff is None:
                beat.backoff = Backoff(rng=self._rng)
            delay = min(beat.interval, beat.backoff.next_delay())
            if is_transient(exc):
                if details is not None:
                    ctx._requeue_details(details)
                self._log_retry("RecordHeartbeat", exc, delay)
            elif details is not None:
                # Sent again they would be refused again (e.g. too large), with every later
                # heartbeat: the lease would never be renewed.
                ctx._sent(details)
                log.warning(
                    "dropping the heartbeat details of %s: the control plane refused them "
                    "(%s); the next heartbeat goes without",
                    handle.describe(),
                    exc,
                )
            else:
                log.error("heartbeat of %s refused: %s", handle.describe(), exc)
            return trio.current_time() + delay
        if details is not None:
            ctx._sent(details)
        if beat.backoff is not None:
            beat.backoff.reset()
        if reply.cancel_requested:
            log.info("cancelling %s: cancellation requested", handle.describe())
            handle.request_cancel("cancellation requested by the workflow")
            return None
        return beat.last_sent + beat.interval

    async def _finish_activity(self, handle: _RunningTask) -> None:
        if handle.bound is not None and not await handle.wait_bound():
            log.debug("%s ends unreported: %s", handle.describe(), handle.stale_reason)
            return
        if handle.stale_reason is not None:
            log.warning(
                "dropping the outcome of %s: its lease is no longer valid (%s)",
                handle.describe(),
                handle.stale_reason,
            )
            return
        outcome = handle.outcome
        if isinstance(outcome, _Completed):
            await self._complete_activity(handle, outcome)
        elif isinstance(outcome, _Failed):
            await self._fail_activity(handle, outcome)
        else:
            await self._fail_activity(handle, self._cancelled_failure(handle), cancelled=True)

    def _cancelled_failure(self, handle: _RunningTask) -> _Failed:
        reason = handle.cancel_reason or "cancelled"
        return _Failed(
            make_error("everruns.errors.ActivityCancelled", f"activity cancelled: {reason}"), False
        )

    async def _complete_activity(self, handle: _RunningTask, outcome: _Completed) -> None:
        """Report a result with the other results ready now (one call for all of them), and
        with the decision its workflow's next task will make, when this worker can tell."""
        handle.ahead = self._decide_ahead(handle, outcome)
        if handle.ahead is not None and not within(_result_bytes(handle), self._max_message_bytes):
            self._settle_ahead(handle)  # too large to send: its workflow task will say so
        try:
            refusal = await self._results.submit(handle)
        except BatcherClosed:
            await self._complete_activity_alone(handle, outcome)
            return
        except _RESULT_REFUSALS as exc:
            refusal = exc
        finally:
            self._settle_ahead(handle)
        if refusal is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s completed", handle.describe())
        else:
            await self._result_refused(handle, refusal)

    def _decide_ahead(self, handle: _RunningTask, outcome: _Completed) -> _Ahead | None:
        """Make the decision that the workflow task this result wakes would make, on the
        run's replay kept from its last task (`Replayer.follow_up`). Sent with the result,
        the control plane applies it at once when the history is what it assumes: one call
        instead of two, and no replay of the task. None when there is no such replay."""
        task = handle.task
        if self.draining or not task.activity_id:
            return None
        kept = self._replays.take_current(task.run_id, self._workflow_fn)
        if kept is None:
            return None
        fn, replayer = kept
        elapsed = trio.current_time() - handle.received
        now = datetime.fromtimestamp(task.claimed_at + elapsed, UTC)
        try:
            result = payload.decode(outcome.result, what="activity result")
            follow_up = replayer.follow_up(
                task.activity_id, task.attempt, result, worker_id=self.worker_id, now=now
            )
            if follow_up is None:
                self._replays.keep(task.run_id, fn, replayer)  # left as it was
                return None
            commands = payload.encode(
                [command.to_dict() for command in follow_up.result.commands],
                what="workflow commands",
            )
        except Exception:
            # The workflow task will report this when it replays: nothing is decided ahead.
            log.debug("no decision ahead for %s", handle.describe(), exc_info=True)
            replayer.close()
            return None
        return _Ahead(fn, replayer, follow_up, commands)

    def _workflow_fn(self, workflow_type: str) -> Callable[..., Any] | None:
        """The function registered for a workflow type now (None: no longer registered)."""
        try:
            return self.registry.workflow(workflow_type).fn
        except NotFound:
            return None

    def _settle_ahead(self, handle: _RunningTask) -> None:
        """Keep the run's replay if its decision made ahead was applied, else close it (it
        holds a history that was not recorded)."""
        ahead, handle.ahead = handle.ahead, None
        if ahead is None:
            return
        self._decided_ahead += ahead.decided
        if ahead.decided and not ahead.follow_up.result.completed:
            self._replays.keep(handle.task.run_id, ahead.fn, ahead.replayer)
        else:
            ahead.replayer.close()

    def _decision_ahead(self, n: int, handle: _RunningTask) -> pb.FollowUpDecision | None:
        ahead = handle.ahead
        if ahead is None:
            return None
        follow_up = ahead.follow_up
        return pb.FollowUpDecision(
            result=n,
            run_id=handle.task.run_id,
            activity_id=handle.task.activity_id,
            after_sequence=follow_up.after_sequence,
            after_time=follow_up.after_time.timestamp(),
            seen_sequence=follow_up.result.seen_sequence,
            commands=ahead.commands,
            decided_at=follow_up.decided_at.timestamp(),
        )

    async def _send_results(self, handles: list[_RunningTask]) -> list[BaseException | None]:
        """One CompleteActivityTasks call for a batch of results; the reply's new tasks start
        in the slots of the results sent (accepted or refused: the control plane claims a task
        for each whatever its verdict), then in free slots offered with the call."""
        extra, offer = self._eager_offer(handles)
        used = 0
        try:
            results = []
            for handle in handles:
                assert isinstance(handle.outcome, _Completed)
                results.append(
                    pb.ActivityResult(
                        task_id=handle.task.task_id,
                        lease_token=handle.task.lease_token,
                        result=handle.outcome.result,
                    )
                )
            decisions = [self._decision_ahead(n, h) for n, h in enumerate(handles)]
            request = pb.CompleteActivityTasksRequest(
                worker_id=self.config.worker_id,
                results=results,
                max_new_tasks=offer,
                decisions=[d for d in decisions if d is not None],
            )
            reply = await self._call_until_answered(
                self._stub.complete_activity_tasks, request, what="CompleteActivityTasks"
            )
            refusals = _refusals(
                reply.outcomes, len(handles), "CompleteActivityTasks", lambda o: not o.accepted
            )
            for handle, outcome, refusal in zip(handles, reply.outcomes, refusals, strict=True):
                if handle.ahead is not None:
                    handle.ahead.decided = refusal is None and outcome.decided
                    self._settle_ahead(handle)  # before the tasks handed back can use it
            used = self._adopt_new_tasks(
                reply.new_tasks, handles, extra, what="CompleteActivityTasks"
            )
        finally:
            for slot in extra[used:]:
                self._slots.release(slot)
        return refusals

    def _adopt_new_tasks(
        self,
        tasks: Sequence[Any],
        finished: Sequence[_RunningTask],
        extra: list[Slot],
        *,
        what: str,
    ) -> int:
        """Start tasks handed back by a completion: first in the slots of the finished tasks
        (each slot passes on), then in the extra slots offered; returns extra used.

        A finished task whose report was abandoned (cancelled at the end of the grace period
        while its batch was in flight) may have released its slot already: it has none to
        pass on. Nor does one whose slot was not offered, for want of a thread
        (`_eager_offer`)."""
        freed: list[Slot] = []
        for handle in finished:
            if len(freed) == len(tasks) or self._task_nursery is None:
                break
            if handle.slot is None or (self._sync_types and handle.slot.thread is None):
                continue
            slot = handle.take_slot()
            assert slot is not None
            freed.append(slot)
        return self._start_tasks(tasks, [*freed, *extra], what=what) - len(freed)

    async def _result_refused(self, handle: _RunningTask, exc: BaseException) -> None:
        """Act on the control plane's refusal of a result (see `_RESULT_REFUSALS`)."""
        task = handle.task
        if isinstance(exc, RpcError):
            self._refused(handle, exc)
        elif isinstance(exc, (FailedPrecondition, NotFound)):
            self._dropped(handle, exc)
        elif isinstance(exc, (InvalidArgument, ResourceExhausted)):
            # The control plane will never take this result (e.g. too large): fail the
            # attempt for good with its reason rather than retry it forever.
            failure = _Failed(
                make_error(
                    type_name(exc),
                    f"the control plane refused the result of activity "
                    f"{task.activity_type!r}: {exc}",
                    non_retryable=True,
                ),
                True,
            )
            await self._fail_activity(handle, failure)
        else:
            raise exc

    async def _complete_activity_alone(self, handle: _RunningTask, outcome: _Completed) -> None:
        task = handle.task
        extra, offer = self._eager_offer([handle])
        used = 0
        try:
            request = pb.CompleteActivityTaskRequest(
                task_id=task.task_id,
                lease_token=task.lease_token,
                worker_id=self.config.worker_id,
                result=outcome.result,
                max_eager_tasks=offer,
            )
            try:
                reply = await self._call_until_answered(
                    self._stub.complete_activity_task, request, what="CompleteActivityTask"
                )
            except _RESULT_REFUSALS as exc:
                await self._result_refused(handle, exc)
                return
            log.debug("%s completed", handle.describe())
            used = self._adopt_new_tasks(
                reply.eager_tasks, [handle] if offer else [], extra, what="eager dispatch"
            )
        finally:
            for slot in extra[used:]:
                self._slots.release(slot)

    async def _fail_activity(
        self, handle: _RunningTask, failure: _Failed, *, cancelled: bool = False
    ) -> None:
        task = handle.task
        if not cancelled and handle.ctx is not None:
            await self._send_last_details(handle, handle.ctx)
        request = pb.FailActivityTaskRequest(
            task_id=task.task_id,
            lease_token=task.lease_token,
            worker_id=self.config.worker_id,
            error=payload.encode(failure.error, what="error"),
            non_retryable=failure.non_retryable,
            cancelled=cancelled,
            release=failure.release,
        )
        try:
            reply = await self._call_until_answered(
                self._stub.fail_activity_task, request, what="FailActivityTask"
            )
        except (FailedPrecondition, NotFound) as exc:
            self._dropped(handle, exc)
            return
        except (RpcError, InvalidArgument, ResourceExhausted) as exc:
            self._refused(handle, exc)
            return
        if cancelled:
            log.info("%s reported cancelled", handle.describe())
        elif failure.release:
            log.info("gave %s back to the queue", handle.describe())
        elif reply.will_retry:
            log.info("%s will be retried", handle.describe())
        else:
            log.warning("%s failed for good: %s", handle.describe(), failure.error["message"])

    async def _send_last_details(self, handle: _RunningTask, ctx: ActivityContext) -> None:
        """Send the heartbeat details the attempt recorded last, if the heartbeat scheduler
        has not (recorded just before the failure, or within the minimum gap between beats):
        the next attempt resumes from them. Best effort: the failure is reported either way."""
        details = ctx._take_unsent()
        if details is None:
            return
        request = pb.RecordHeartbeatRequest(
            task_id=handle.task.task_id, lease_token=handle.task.lease_token, details=details
        )
        try:
            await self._call(
                self._stub.record_heartbeat, request, what="RecordHeartbeat", budget=5.0
            )
        except Exception as exc:
            log.warning(
                "the last heartbeat details of %s were not recorded: %s", handle.describe(), exc
            )

    async def _final_activity_report(self, handle: _RunningTask, *, internal: bool) -> None:
        """Report what can be reported while the worker itself is being stopped, or when an
        error of its own (``internal``) ended the attempt (shielded)."""
        if not await handle.wait_bound():
            return
        task = handle.task
        outcome = handle.outcome
        try:
            if isinstance(outcome, _Completed):
                await self._call_until_answered(
                    self._stub.complete_activity_task,
                    pb.CompleteActivityTaskRequest(
                        task_id=task.task_id,
                        lease_token=task.lease_token,
                        worker_id=self.config.worker_id,
                        result=outcome.result,
                    ),
                    what="CompleteActivityTask",
                    tries=_FINAL_REPORT_TRIES,
                )
                return
            cancelled = outcome is None and handle.cancel_reason is not None
            release = (outcome is None and not cancelled) or (
                isinstance(outcome, _Failed) and outcome.release
            )
            if not cancelled and handle.stale_reason is None and handle.ctx is not None:
                # The next attempt resumes from the progress this one recorded last, as after
                # any failure (`_fail_activity`); within the minimum gap between heartbeats it
                # is still pending. Best effort, and bounded: the report matters more.
                with trio.move_on_after(_FINAL_DETAILS_BUDGET):
                    await self._send_last_details(handle, handle.ctx)
            if isinstance(outcome, _Failed):
                failure = outcome
            elif cancelled:
                failure = self._cancelled_failure(handle)
            elif not internal:
                failure = _Failed(
                    make_error(
                        WORKER_SHUTDOWN_ERROR,
                        f"worker {self.worker_id} stopped before the activity finished; "
                        "released to another worker",
                    ),
                    False,
                )
            else:  # not a stop: a failure of the worker's own ended the attempt
                failure = _Failed(
                    make_error(
                        "everruns.WorkerError",
                        f"worker {self.worker_id} failed while running the activity (its log "
                        "says why); released to another worker",
                    ),
                    False,
                )
            await self._call_until_answered(
                self._stub.fail_activity_task,
                pb.FailActivityTaskRequest(
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    worker_id=self.config.worker_id,
                    error=payload.encode(failure.error, what="error"),
                    non_retryable=failure.non_retryable,
                    cancelled=cancelled,
                    release=release,
                ),
                what="FailActivityTask",
                tries=_FINAL_REPORT_TRIES,
            )
            if release:
                self._released += 1
                log.info("released %s to another worker", handle.describe())
        except Exception as exc:
            log.warning(
                "could not report %s while stopping (%s); the control plane will release it "
                "when it sees this worker gone",
                handle.describe(),
                exc,
            )

    def _dropped(self, handle: _RunningTask, exc: BaseException) -> None:
        log.warning(
            "dropping the outcome of %s: the control plane says its lease is stale (%s)",
            handle.describe(),
            exc,
        )

    def _refused(self, handle: _RunningTask, exc: BaseException) -> None:
        log.error("the control plane refused the outcome of %s: %s", handle.describe(), exc)

    # --------------------------------------------------------------------- workflow tasks

    async def _run_workflow_task(self, handle: _RunningTask) -> None:
        reported = False
        try:
            if len(handle.task.history) <= INLINE_REPLAY_EVENTS:
                handle.outcome = self._decide(handle)
            else:
                with handle.open_scope():
                    handle.outcome = await trio.to_thread.run_sync(
                        self._decide, handle, limiter=self._replay_limiter
                    )
            await self._finish_workflow_task(handle)
            reported = True
        finally:
            if not reported and handle.outcome is not None:
                with trio.move_on_after(FINAL_REPORT_BUDGET, shield=True):
                    await self._finish_workflow_task(handle, eager=False)

    def _decide(self, handle: _RunningTask) -> _Decided | _WorkflowTaskFailed:
        """Replay the workflow over its history (runs in a thread; pure)."""
        task = handle.task
        try:
            definition = self.registry.workflow(task.workflow_type)
        except NotFound as exc:
            # Handed over on an older registration of this worker id (as an activity can
            # be, `_run_activity`): given back to the queue, the run not marked stuck.
            self._replays.drop(task.run_id)
            log.warning("worker %s: %s; giving %s back", self.worker_id, exc, handle.describe())
            return _WorkflowTaskFailed(
                make_error(NOT_SERVED_ERROR, f"worker {self.worker_id}: {exc}"), False
            )
        info = WorkflowInfo(
            workflow_id=task.workflow_id, run_id=task.run_id, workflow_type=task.workflow_type
        )
        if not handle.claim_time:
            handle.claim_time = datetime.now(UTC).timestamp()
        now = datetime.fromtimestamp(handle.claim_time, UTC)
        # The run's replay kept from its last task goes on from there when the history does;
        # otherwise (none kept, another worker's task in between, any error) replay in full.
        kept = self._replays.take(task.run_id, definition.fn)
        result = None
        if kept is not None:
            try:
                seen = kept.seen_sequence
                news = _history_events([e for e in task.history if e.sequence_num > seen])
                result = kept.advance(news, now=now)
            except Exception:
                log.debug("replaying %s in full", handle.describe(), exc_info=True)
            finally:
                if result is None:
                    kept.close()
        if result is None:
            try:
                events = _history_events(task.history)
            except (InvalidArgument, PayloadError) as exc:
                bad = NonDeterminismError(f"{info.describe()} has an unreadable history: {exc}")
                return _WorkflowTaskFailed(error_from_exception(bad, non_retryable=True), True)
            kept = Replayer(definition.fn, info=info, registry=self.registry)
            try:
                result = kept.replay(events, now=now)
            except NonDeterminismError as exc:
                kept.close()
                return _WorkflowTaskFailed(error_from_exception(exc, non_retryable=True), True)
            except Exception as exc:
                kept.close()
                return _WorkflowTaskFailed(error_from_exception(exc), False)
            except BaseException:
                kept.close()
                raise
        assert kept is not None
        try:
            commands = payload.encode(
                [command.to_dict() for command in result.commands], what="workflow commands"
            )
        except Exception as exc:
            kept.close()
            return _WorkflowTaskFailed(error_from_exception(exc), False)
        ends = any(is_terminal(c) for c in result.commands)
        activities = (
            () if ends else tuple(c for c in result.commands if isinstance(c, ScheduleActivity))
        )
        size = _decision_bytes(
            task.task_id, self.config.worker_id, commands, (a.activity_id for a in activities)
        )
        if not within(size, self._max_message_bytes):
            # Sent, it would be refused unread, and again at every try: the run is stuck
            # with why instead, as with a replay error.
            kept.close()
            too_large = ResourceExhausted(
                # The commands' own size: the same on any worker (a stuck run's retry that
                # fails the same way is not recorded again).
                f"the {len(result.commands)} commands of this workflow task "
                f"({len(commands)} bytes) do not fit in one message under the control "
                f"plane's limit of {self._max_message_bytes} bytes "
                "(EVERRUNS_MAX_MESSAGE_BYTES); issue fewer or smaller commands per workflow task"
            )
            return _WorkflowTaskFailed(make_error(type_name(too_large), str(too_large)), False)
        if result.completed:
            kept.close()
        else:
            self._replays.keep(task.run_id, definition.fn, kept)
        return _Decided(commands, result.seen_sequence, activities)

    async def _finish_workflow_task(self, handle: _RunningTask, *, eager: bool = True) -> None:
        task = handle.task
        if handle.stale_reason is not None or handle.cancel_reason is not None:
            log.info(
                "dropping the decision of %s: %s",
                handle.describe(),
                handle.stale_reason or handle.cancel_reason,
            )
            return
        outcome = handle.outcome
        if isinstance(outcome, _WorkflowTaskFailed):
            await self._fail_workflow_task(handle, outcome)
            return
        assert isinstance(outcome, _Decided)
        extra, offer = self._eager_offer([handle]) if eager else ([], 0)
        ahead = self._start_ahead(handle, outcome.activities, extra)
        used = len(ahead)  # the first slots of `extra`, each now owned by its activity
        try:
            request = pb.CompleteWorkflowTaskRequest(
                task_id=task.task_id,
                lease_token=task.lease_token,
                worker_id=self.config.worker_id,
                seen_sequence=outcome.seen_sequence,
                commands=outcome.commands,
                claim_time=handle.claim_time,
                max_eager_tasks=offer,
                started=[
                    pb.StartedActivity(activity_id=a.task.activity_id, task_id=key)
                    for key, a in ahead.items()
                ],
            )
            try:
                reply = await self._complete_decision(request)
            except (FailedPrecondition, NotFound) as exc:
                self._dropped(handle, exc)
                return
            except (InvalidArgument, ResourceExhausted) as exc:
                failure = _WorkflowTaskFailed(
                    make_error(type_name(exc), f"the control plane refused the commands: {exc}"),
                    False,
                )
                await self._fail_workflow_task(handle, failure)
                return
            except RpcError as exc:
                self._refused(handle, exc)
                return
            if reply.superseded:
                log.debug("%s superseded by newer history", handle.describe())
            others = []
            for new in reply.eager_tasks:
                started = ahead.pop(new.task_id, None)
                if started is None:
                    others.append(new)
                else:
                    self._bind(started, new)
            used += self._adopt_new_tasks(
                others, [handle] if offer else [], extra[used:], what="eager dispatch"
            )
        finally:
            for started in ahead.values():
                started.mark_stale(
                    "started ahead of its decision, which the control plane did not apply or "
                    "did not hand it back for"
                )
                assert started.bound is not None
                started.bound.set()
            for slot in extra[used:]:
                self._slots.release(slot)

    def _start_ahead(
        self, handle: _RunningTask, activities: Sequence[ScheduleActivity], extra: list[Slot]
    ) -> dict[str, _RunningTask]:
        """Start the activities a decision schedules that this worker runs, in the free slots
        reserved for its reply (the first of ``extra``), before the decision is sent; returns
        them by the task ids chosen for them. The reply binds each to its task (`_bind`) or
        they are cancelled and their outcome dropped: at least once, as any activity.

        Only when the control plane said every circuit breaker was closed when it handed out
        the workflow task (the statement applying the decision holds back one that opened
        since), and never while draining."""
        started: dict[str, _RunningTask] = {}
        nursery = self._task_nursery
        if (
            not activities
            or not self.config.start_ahead
            or not handle.task.may_start_activities
            or self.draining
            or nursery is None
        ):
            return started
        task = handle.task
        now = datetime.now(UTC).timestamp()
        for command in activities:
            if len(started) == len(extra):
                break
            if self.registry.get_activity(command.activity_type) is None:
                continue
            options = command.options
            try:
                encoded = payload.encode(command.input, what="activity input")
            except PayloadError:
                continue  # the control plane refuses the commands; the decision says why
            provisional = pb.Task(
                task_id=str(uuid.uuid4()),
                kind="activity",
                workflow_id=task.workflow_id,
                run_id=task.run_id,
                workflow_type=task.workflow_type,
                activity_type=command.activity_type,
                activity_id=command.activity_id,
                input=encoded,
                attempt=1,
                max_attempts=(options.retry or RetryPolicy()).max_attempts,
                heartbeat_timeout_s=options.heartbeat_timeout or 0.0,
                start_to_close_s=options.start_to_close_timeout or 0.0,
                scheduled_at=now,
                claimed_at=now,
            )
            running = _RunningTask(provisional, extra[len(started)])
            running.bound = trio.Event()
            started[running.key] = running
            self._launch(nursery, running)
        return started

    def _bind(self, handle: _RunningTask, task: Any) -> None:
        """An activity started ahead is ours: its task (with the lease) was handed back. Its
        ``ctx.info`` becomes the task's (the control plane's defaults applied, its times)."""
        handle.task = task
        if handle.ctx is not None:
            # The workflow's type is the worker's to tell: the control plane hands an
            # activity's task out without it.
            known = handle.ctx.info.workflow_type
            handle.ctx._info = attrs.evolve(
                _activity_info(task), workflow_type=task.workflow_type or known
            )
        handle.claim_time = task.claimed_at
        handle.received = trio.current_time()
        early = self._early_cancels.pop((handle.key, task.lease_token), None)
        if early is not None:
            handle.request_cancel(early)
        assert handle.bound is not None
        handle.bound.set()

    async def _complete_decision(self, request: Any) -> Any:
        """Send a workflow task's commands with the other decisions ready now (one call for
        all of them), or alone when the batcher is not running; return the task's own reply.

        Raises:
            FailedPrecondition, NotFound, InvalidArgument, ResourceExhausted, RpcError: the
                control plane refused this task's commands (as CompleteWorkflowTask would).
        """
        try:
            reply = await self._decisions.submit(request)
        except BatcherClosed:
            return await self._call_until_answered(
                self._stub.complete_workflow_task, request, what="CompleteWorkflowTask"
            )
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _send_decisions(self, requests: list[Any]) -> list[Any]:
        """One CompleteWorkflowTasks call for a batch of decisions: per decision, its reply or
        why it was refused."""
        reply = await self._call_until_answered(
            self._stub.complete_workflow_tasks,
            pb.CompleteWorkflowTasksRequest(completions=requests),
            what="CompleteWorkflowTasks",
        )
        outcomes = reply.outcomes
        refusals = _refusals(
            outcomes, len(requests), "CompleteWorkflowTasks", lambda o: bool(o.refused_status)
        )
        return [o if why is None else why for o, why in zip(outcomes, refusals, strict=True)]

    async def _fail_workflow_task(self, handle: _RunningTask, failure: _WorkflowTaskFailed) -> None:
        task = handle.task
        # Whichever way the replay failed, it was given the whole history the task carries:
        # input recorded after it gets the run another try (0: none was replayed).
        seen = max((e.sequence_num for e in task.history), default=0)
        if failure.non_determinism:
            log.error("%s is stuck: %s", handle.describe(), failure.error["message"])
        elif failure.error["type"] == NOT_SERVED_ERROR:
            seen = 0  # a give-back, warned of already (`_decide`): nothing was replayed
        else:
            log.error(
                "%s failed: %s: %s",
                handle.describe(),
                failure.error["type"],
                failure.error["message"],
            )
        request = pb.FailWorkflowTaskRequest(
            task_id=task.task_id,
            lease_token=task.lease_token,
            worker_id=self.config.worker_id,
            error=payload.encode(failure.error, what="error"),
            non_determinism=failure.non_determinism,
            seen_sequence=seen,
        )
        try:
            await self._call_until_answered(
                self._stub.fail_workflow_task, request, what="FailWorkflowTask"
            )
        except (FailedPrecondition, NotFound) as exc:
            self._dropped(handle, exc)
        except (RpcError, InvalidArgument, ResourceExhausted) as exc:
            self._refused(handle, exc)


_INTEGERS = 64  # the most a request's integer, float and flag fields take together


def _result_bytes(handle: _RunningTask) -> int:
    """At most what a completed activity adds to a CompleteActivityTasks request: its
    result and its decision made ahead."""
    task = handle.task
    outcome = handle.outcome
    result = len(outcome.result) if isinstance(outcome, _Completed) else 0
    size = field_bytes(field_bytes(result) + field_bytes(text_bytes(task.task_id)) + _INTEGERS)
    ahead = handle.ahead
    if ahead is not None:
        size += field_bytes(
            field_bytes(len(ahead.commands))
            + field_bytes(text_bytes(task.run_id))
            + field_bytes(text_bytes(task.activity_id))
            + _INTEGERS
        )
    return size


def _decision_bytes(task_id: str, worker_id: str, commands: bytes, started: Iterable[str]) -> int:
    """At most what a workflow task's decision takes in a CompleteWorkflowTasks request,
    ``started`` the ids of the activities it may start ahead."""
    size = (
        field_bytes(len(commands))
        + field_bytes(text_bytes(task_id))
        + field_bytes(text_bytes(worker_id))
        + _INTEGERS
    )
    for activity_id in started:
        size += field_bytes(field_bytes(text_bytes(activity_id)) + field_bytes(36))  # a UUID
    return field_bytes(size)


def _request_bytes(request: Any) -> int:
    """`_decision_bytes` of a CompleteWorkflowTaskRequest."""
    return _decision_bytes(
        request.task_id,
        request.worker_id,
        request.commands,
        (started.activity_id for started in request.started),
    )


def _refusals(
    outcomes: Sequence[Any], sent: int, what: str, refused: Callable[[Any], bool]
) -> list[BaseException | None]:
    """Per item of a batch call's reply: None unless ``refused`` says so, else the error the
    single call would have raised.

    Raises:
        RpcError: the reply does not answer every item sent.
    """
    if len(outcomes) != sent:
        raise RpcError(f"{what} answered {len(outcomes)} outcomes for {sent} items")
    return [
        error_for_status(o.refused_status, o.message, what) if refused(o) else None
        for o in outcomes
    ]
