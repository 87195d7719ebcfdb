"""`WorkflowContext`: everything workflow code may use, as ``ctx``, to act durably.

Workflow code runs inside the replay driver (`everruns.domain.replay`). Each ``ctx`` operation
that has an effect issues a command (numbered in issue order, so ids are stable across replays)
and returns an awaitable that, when it must wait, yields a request to the driver; the driver
resolves it from the history event carrying the same command id. Time and randomness come from
the history and from a generator seeded with the run id, never from the host, so every replay of
the same history sees the same values. This module must stay pure: no clock, no global RNG, no
I/O, no trio or asyncio — only the bookkeeping between workflow code and the driver.
"""

from __future__ import annotations

import functools
import inspect
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

import attrs

from everruns.domain import history, payload
from everruns.domain.commands import (
    ActivityOptions,
    CancelTimer,
    Command,
    ContinueAsNewWorkflow,
    RecordPatch,
    ScheduleActivity,
    StartChildWorkflow,
    StartTimer,
)
from everruns.domain.history import HistoryEvent
from everruns.domain.limits import (
    MAX_SECONDS,
    MAX_SECONDS_TEXT,
    check_name,
    check_utf8,
    is_finite_number,
)
from everruns.domain.registry import (
    ActivityDefinition,
    Registry,
    WorkflowDefinition,
    definition_of,
    name_of,
)
from everruns.domain.retry import RetryPolicy
from everruns.errors import (
    ActivityCancelled,
    ActivityError,
    ChildWorkflowError,
    ContinueAsNew,
    IllegalAwait,
    InvalidArgument,
    NonDeterminismError,
    WorkflowCancelled,
)

__all__ = [
    "ActivityHandle",
    "ChildWorkflowHandle",
    "WorkflowContext",
    "WorkflowInfo",
]


@attrs.frozen
class WorkflowInfo:
    """Who the running workflow is.

    Attributes:
        workflow_id: the business key chosen at start.
        run_id: this execution of it (seeds ``ctx.random()``).
        workflow_type: the registered workflow name.
    """

    workflow_id: str
    run_id: str
    workflow_type: str

    def describe(self) -> str:
        """Return ``workflow 'type' (workflow_id='…', run_id=…)`` for messages."""
        return (
            f"workflow {self.workflow_type!r} "
            f"(workflow_id={self.workflow_id!r}, run_id={self.run_id})"
        )


def nondeterminism(info: WorkflowInfo, detail: str) -> NonDeterminismError:
    """Return the error replay raises when history and code disagree (or history is corrupt)."""
    return NonDeterminismError(
        f"{info.describe()} does not match its history: {detail}. Workflow code must issue "
        "the same commands in the same order on every replay; run code compatible with the "
        "recorded history for this run, or cancel it"
    )


class _Future:
    """A one-shot result slot, resolved by the driver from a history event."""

    __slots__ = ("_callbacks", "_done", "_exception", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[_Future], None]] = []

    def done(self) -> bool:
        return self._done

    def exception(self) -> BaseException | None:
        return self._exception

    def value(self) -> Any:
        return self._value

    def result(self) -> Any:
        if self._exception is not None:
            raise self._exception
        return self._value

    def set_result(self, value: Any) -> None:
        self._settle(value, None)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(None, exc)

    def add_done_callback(self, callback: Callable[[_Future], None]) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def _settle(self, value: Any, exc: BaseException | None) -> None:
        if self._done:
            raise RuntimeError("internal error: future resolved twice")
        self._done, self._value, self._exception = True, value, exc
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


class _Wait:
    """What a blocked ctx awaitable yields to the driver: "resume me when this resolves"."""

    __slots__ = ("ctx", "future")

    def __init__(self, ctx: WorkflowContext, future: _Future) -> None:
        self.ctx = ctx
        self.future = future

    def __repr__(self) -> str:
        return "<everruns ctx wait>"


def _wait(ctx: WorkflowContext, future: _Future) -> Generator[Any, Any, Any]:
    # A resolved future answers without a round trip through the driver, so awaiting it can
    # never change which coroutine runs next.
    if future.done():
        return future.result()
    if ctx._closing:
        ctx._check_open()  # unwinds the coroutine being closed, until the bound is spent
    # A ctx of a finished replay still yields: the running driver sees a foreign request and
    # reports it as an IllegalAwait. So does a ctx being closed once it has refused
    # `_MAX_REFUSALS` times: `coroutine.close()` then ends (the driver swallows its
    # "coroutine ignored GeneratorExit") instead of spinning in a loop that catches everything.
    return (yield _Wait(ctx, future))


class _Blocker:
    __slots__ = ("_ctx", "_future")

    def __init__(self, ctx: WorkflowContext, future: _Future) -> None:
        self._ctx = ctx
        self._future = future

    def __await__(self) -> Generator[Any, Any, Any]:
        return _wait(self._ctx, self._future)


class ActivityHandle:
    """A scheduled activity; ``await handle`` returns its result or raises `ActivityError`.

    It may be awaited several times, and by several coroutines; all see the same outcome.
    """

    __slots__ = ("_ctx", "_future", "activity_id", "activity_type")

    def __init__(
        self, ctx: WorkflowContext, activity_id: str, activity_type: str, future: _Future
    ) -> None:
        self._ctx = ctx
        self._future = future
        self.activity_id = activity_id
        self.activity_type = activity_type

    def done(self) -> bool:
        """Return whether its outcome is known (awaiting it will not wait)."""
        return self._future.done()

    def __await__(self) -> Generator[Any, Any, Any]:
        return _wait(self._ctx, self._future)

    def __repr__(self) -> str:
        return f"<ActivityHandle id={self.activity_id} type={self.activity_type}>"


class ChildWorkflowHandle:
    """A started child workflow; ``await handle`` returns its result or raises
    `ChildWorkflowError`."""

    __slots__ = ("_ctx", "_future", "child_id", "workflow_id", "workflow_type")

    def __init__(
        self,
        ctx: WorkflowContext,
        child_id: str,
        workflow_type: str,
        workflow_id: str,
        future: _Future,
    ) -> None:
        self._ctx = ctx
        self._future = future
        self.child_id = child_id
        self.workflow_type = workflow_type
        self.workflow_id = workflow_id

    def done(self) -> bool:
        """Return whether its outcome is known (awaiting it will not wait)."""
        return self._future.done()

    def __await__(self) -> Generator[Any, Any, Any]:
        return _wait(self._ctx, self._future)

    def __repr__(self) -> str:
        return f"<ChildWorkflowHandle id={self.child_id} workflow_id={self.workflow_id}>"


class _Scheduler(Protocol):
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> _Future: ...


@attrs.define
class _Pending:
    """An issued command that history events may answer."""

    kind: str  # "activity" | "timer" | "child"
    name: str  # activity or workflow type; "" for timers
    future: _Future
    confirmed: bool = False  # matched against its recorded command event
    cancelled: bool = False  # timers: CancelTimer issued, a late timer_fired is ignored


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# How many times a ctx that is being closed, or was closed, refuses an operation by raising
# (GeneratorExit while its replay's coroutines are closed, IllegalAwait after): enough for any
# unwinding `finally:` and for every misuse to be reported, few enough that workflow code that
# catches everything in a loop (a bare ``except:``) cannot spin for ever. Past it, operations
# issue nothing and their awaits yield, so the loop stops at its next await.
_MAX_REFUSALS = 1000


def _check_seconds(what: str, value: float, *, allow_zero: bool) -> float:
    if not is_finite_number(value):
        raise InvalidArgument(f"{what} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{what} must be >= 0 seconds, got {value!r}")
    if value > MAX_SECONDS:  # the control plane could not store the timer
        raise InvalidArgument(f"{what} must be at most {MAX_SECONDS_TEXT}, got {value!r}")
    return float(value)


def _json_copy(value: Any, what: str) -> Any:
    # Round-trip through exact JSON: refuses what the wire cannot carry (here, inside workflow
    # code, where the user can see it) and detaches the command from later mutation.
    return payload.decode(payload.encode_text(value, what=what), what=what)


class WorkflowContext:
    """The ``ctx`` argument of a workflow function.

    Only the driver creates it. Every awaitable it returns must be awaited from the workflow's
    own coroutines; awaiting anything else (``trio.sleep``, asyncio futures) is an
    `IllegalAwait`.
    """

    def __init__(
        self, info: WorkflowInfo, *, scheduler: _Scheduler, registry: Registry | None = None
    ) -> None:
        self._info = info
        self._scheduler = scheduler
        self._registry = registry
        # str seeds are hashed with SHA-512 by `random`, so the stream is the same in every
        # process regardless of PYTHONHASHSEED.
        self._rng = random.Random(f"everruns:{info.run_id}")
        self._now = _EPOCH
        self._replaying = False
        self._cancel_requested = False
        self._closing = False
        self._closed = False
        self._refusals = 0  # see `_MAX_REFUSALS`
        self._counter = 0
        self._commands: list[Command] = []
        self._pending: dict[str, _Pending] = {}
        # Signals not consumed yet, by name, each with its sequence number (arrival order).
        self._signals: dict[str, deque[tuple[int, Any]]] = {}
        # The workflow function has returned or raised: what arrives now is for no code
        # (a run that continues as new hands it on: signals, a cancel request).
        self._main_ended = False
        self._cancel_after_end = False
        self._signal_waiters: dict[str, deque[_Future]] = {}
        self._patches: dict[str, bool] = {}  # ctx.patched's answers, once given
        # The patch ids the decision being replayed recorded; None while deciding anew.
        self._recorded_patches: frozenset[str] | None = None

    # ----------------------------------------------------------------- deterministic values

    @property
    def info(self) -> WorkflowInfo:
        """The workflow id, run id and type."""
        return self._info

    @property
    def is_replaying(self) -> bool:
        """True while re-executing a part of the history that was already recorded.

        Use it only to silence side effects such as logging; never to change what the
        workflow does.
        """
        return self._replaying

    @property
    def cancel_requested(self) -> bool:
        """True once a cancellation of this workflow has been delivered."""
        return self._cancel_requested

    def now(self) -> datetime:
        """Return the workflow's current time (UTC, aware).

        It is the time the current workflow task was claimed, recorded in history, so it is the
        same on every replay; it does not advance while the code runs.
        """
        return self._now

    def random(self) -> float:
        """Return a float in [0, 1) from the run's deterministic random stream."""
        return self._rng.random()

    def uuid4(self) -> uuid.UUID:
        """Return a version-4 UUID from the run's deterministic random stream."""
        return uuid.UUID(int=self._rng.getrandbits(128), version=4)

    def patched(self, patch_id: str) -> bool:
        """Return whether the run takes the new branch of a code change named ``patch_id``.

        To change a workflow's code while runs of it are under way, keep the old code in the
        ``else`` branch::

            if ctx.patched("tax-in-cents"):
                total = await ctx.execute_activity(total_in_cents, order)
            else:
                total = await ctx.execute_activity(total_in_euros, order)

        A run deciding this point anew takes the new branch (True), and its history records
        so (a ``patch_recorded`` event). A run replaying a decision made before the change
        takes the old one (False), as it did then: its history stays valid. The answer is the
        same for every call with the same id in a run. Once no run that took the old branch
        is open, the old branch and the call can go: a recorded patch the code no longer
        asks about is ignored on replay.

        Args:
            patch_id: a name for the change, unique within the workflow (as any name: 1 to
                512 characters).

        Raises:
            InvalidArgument: ``patch_id`` is not a valid name.
        """
        self._check_open()
        decided = self._patches.get(patch_id) if isinstance(patch_id, str) else None
        if decided is None:
            check_utf8(check_name(patch_id, "patch_id"), "patch_id")  # it is sent
            recorded = self._recorded_patches
            decided = recorded is None or patch_id in recorded
            self._patches[patch_id] = decided
            if decided:
                self._emit(RecordPatch(patch_id))
        return decided

    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this run and go on in a new run of the same workflow id, started with
        ``input``, in one transaction: the way to keep a long-lived workflow's history (what
        each of its workflow tasks replays) bounded. Raises `everruns.ContinueAsNew`; let it
        propagate out of the workflow function::

            if iteration >= 1000:
                ctx.continue_as_new({"iteration": 0, "total": total})

        The new run has a new run id and a fresh history (its ``workflow_started`` names the
        run it continues); its parent, if any, stays its parent and is told only when the
        last run of the chain ends. Signals that arrived and no ``wait_signal`` took are
        delivered to the new run, in order. Like any end of a run, it cancels the run's
        activities, timers and children still open. A client awaiting the result of any run
        of the chain gets the result of the last one.

        Raises:
            ContinueAsNew: always.
            PayloadError: ``input`` is not exact JSON.
        """
        self._check_open()
        raise ContinueAsNew(
            payload.decode(payload.encode_text(input, what="input of continue_as_new"))
        )

    # ----------------------------------------------------------------------------- activities

    def start_activity(
        self,
        activity: str | Callable[..., Any],
        input: Any = None,
        *,
        retry: RetryPolicy | None = None,
        schedule_to_start_timeout: float | None = None,
        start_to_close_timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        priority: int | None = None,
        breaker_key: str | None = None,
    ) -> ActivityHandle:
        """Schedule an activity now and return a handle to await its outcome later.

        The command is issued at call time, so activity ids follow call order. Options left
        None take the activity's registered defaults (from ``@activity(...)``), then the control
        plane's.

        Args:
            activity: the activity function or its registered name.
            input: its JSON input.
            retry: retry policy.
            schedule_to_start_timeout: seconds the task may wait in the queue.
            start_to_close_timeout: seconds one attempt may run.
            heartbeat_timeout: seconds the control plane waits without a heartbeat for an
                attempt before it times the attempt out. The worker heartbeats each running
                activity on its own (at least every third of this), so this catches a worker
                that died or hung (its event loop blocked), not an activity that is slow or
                stuck while its worker is well: bound that with ``start_to_close_timeout``.
            priority: higher is claimed first.
            breaker_key: circuit breaker key.

        Returns:
            The handle; awaiting it returns the result or raises `ActivityError` /
            `ActivityCancelled`.

        Raises:
            InvalidArgument: an option is malformed, or ``activity`` is a workflow.
            PayloadError: ``input`` is not exact JSON.
        """
        self._check_open()
        activity_type = name_of(activity)
        defaults = ActivityOptions()
        definition = None if isinstance(activity, str) else definition_of(activity)
        if isinstance(definition, WorkflowDefinition):
            raise InvalidArgument(
                f"{activity_type!r} is a workflow; start it with ctx.execute_child_workflow"
            )
        if isinstance(definition, ActivityDefinition):
            defaults = definition.options
        elif self._registry is not None:
            registered = self._registry.get_activity(activity_type)
            if registered is not None:
                defaults = registered.options
        options = defaults.merged_with(
            retry=retry,
            schedule_to_start_timeout=schedule_to_start_timeout,
            start_to_close_timeout=start_to_close_timeout,
            heartbeat_timeout=heartbeat_timeout,
            priority=priority,
            breaker_key=breaker_key,
        )
        data = _json_copy(input, f"input of activity {activity_type!r}")
        activity_id = self._next_id()
        future = self._register(activity_id, "activity", activity_type)
        self._emit(ScheduleActivity(activity_id, activity_type, data, options))
        return ActivityHandle(self, activity_id, activity_type, future)

    async def execute_activity(
        self,
        activity: str | Callable[..., Any],
        input: Any = None,
        *,
        retry: RetryPolicy | None = None,
        schedule_to_start_timeout: float | None = None,
        start_to_close_timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        priority: int | None = None,
        breaker_key: str | None = None,
    ) -> Any:
        """Run an activity and return its result (see `start_activity` for the arguments).

        Returns:
            The activity's JSON result.

        Raises:
            ActivityError: it failed for good (``error_type``, ``attempt``, ``activity_type``
                and the recorded ``details`` say how).
            ActivityCancelled: it was cancelled.
            WorkflowCancelled: the workflow was cancelled while waiting (the activity is
                cancelled by the control plane).
            InvalidArgument, PayloadError: as `start_activity`.
        """
        handle = self.start_activity(
            activity,
            input,
            retry=retry,
            schedule_to_start_timeout=schedule_to_start_timeout,
            start_to_close_timeout=start_to_close_timeout,
            heartbeat_timeout=heartbeat_timeout,
            priority=priority,
            breaker_key=breaker_key,
        )
        return await handle

    # ---------------------------------------------------------------------------- concurrency

    async def gather(self, *aws: Awaitable[Any]) -> list[Any]:
        """Wait for several awaitables and return their results in argument order.

        Handles (`ActivityHandle`, `ChildWorkflowHandle`) are waited on directly. Coroutines
        (e.g. ``ctx.execute_activity(...)`` or your own ``async def``) each become a child
        coroutine of the driver, created in argument order, so commands they issue follow
        argument order. The first failure (in the order the driver sees them) is raised at
        once; the other children keep running and their outcomes are discarded. If the
        workflow is cancelled while waiting, ``WorkflowCancelled`` is raised in every blocked
        child, and here once the child coroutines have finished, as a Trio nursery and
        ``asyncio.gather`` do: the cleanup they run on cancellation (a compensating activity,
        say) is issued before the workflow can end.

        Returns:
            The results, in argument order.

        Raises:
            InvalidArgument: an argument is not awaitable.
            WorkflowCancelled: the workflow was cancelled while waiting (once the child
                coroutines have finished).
            Exception: the first failure among the awaitables.
        """
        for aw in aws:
            if not inspect.isawaitable(aw):
                for other in aws:
                    if inspect.iscoroutine(other):
                        other.close()
                raise InvalidArgument(
                    f"ctx.gather takes awaitables (handles or coroutines), got {type(aw).__name__}"
                )
        futures: list[_Future] = []
        children: list[_Future] = []  # of the coroutines run here, not of the handles
        for aw in aws:
            if isinstance(aw, (ActivityHandle, ChildWorkflowHandle)) and aw._ctx is self:
                futures.append(aw._future)
            else:
                futures.append(self._spawn(aw))
                children.append(futures[-1])
        if not futures:
            return []
        combined = _Future()
        results: list[Any] = [None] * len(futures)
        remaining = [len(futures)]

        def on_done(index: int, future: _Future) -> None:
            if combined.done():
                return
            exc = future.exception()
            if exc is not None:
                combined.set_exception(exc)
                return
            results[index] = future.value()
            remaining[0] -= 1
            if remaining[0] == 0:
                combined.set_result(results)

        for index, future in enumerate(futures):
            future.add_done_callback(functools.partial(on_done, index))
        try:
            gathered: list[Any] = await _Blocker(self, combined)
        except WorkflowCancelled:
            # Interrupted while waiting (not a child's own failure, which settles `combined`):
            # the blocked children were interrupted too, and run after this coroutine, which
            # the driver created first. Waiting for them keeps their cleanup from being cut
            # short by the workflow ending. Deterministic: it only waits on the history.
            if not combined.done():
                await self._all_settled(children)
            raise
        return gathered

    async def _all_settled(self, futures: list[_Future]) -> None:
        """Wait until every one of ``futures`` is resolved, whatever its outcome."""
        unsettled = [f for f in futures if not f.done()]
        settled = _Future()
        remaining = [len(unsettled)]

        def on_done(_: _Future) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                settled.set_result(None)

        for future in unsettled:
            future.add_done_callback(on_done)
        while unsettled and not settled.done():
            try:
                await _Blocker(self, settled)
            except WorkflowCancelled:
                pass  # cancelled again: the children were interrupted again, and go on

    def _spawn(self, aw: Awaitable[Any]) -> _Future:
        if inspect.iscoroutine(aw):
            return self._scheduler.spawn(aw)
        return self._scheduler.spawn(_await_any(aw))

    # --------------------------------------------------------------------------------- timers

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on a durable timer (it survives worker restarts).

        ``0`` returns at once and issues no command.

        Raises:
            InvalidArgument: ``seconds`` is negative, not a finite number, or more than
                `MAX_SECONDS` (100 years).
            WorkflowCancelled: the workflow was cancelled while sleeping (the timer is then
                cancelled too).
        """
        seconds = _check_seconds("ctx.sleep seconds", seconds, allow_zero=True)
        if seconds == 0:
            return
        timer_id, fired = self._start_timer(seconds)
        try:
            await _Blocker(self, fired)
        except Exception:
            if not fired.done() and self._is_open():
                self._cancel_timer(timer_id)
            raise

    def _start_timer(self, seconds: float) -> tuple[str, _Future]:
        self._check_open()
        timer_id = self._next_id()
        future = self._register(timer_id, "timer", "")
        self._emit(StartTimer(timer_id, seconds))
        return timer_id, future

    def _cancel_timer(self, timer_id: str) -> None:
        self._check_open()
        self._pending[timer_id].cancelled = True
        self._emit(CancelTimer(timer_id))

    # -------------------------------------------------------------------------------- signals

    async def wait_signal(self, name: str, timeout: float | None = None) -> Any:
        """Return the payload of the oldest signal ``name`` not consumed yet, waiting if needed.

        Signals that arrived before the call are buffered and consumed in arrival order; each
        signal is consumed by exactly one call. With ``timeout``, a durable timer is started
        (only if no signal is buffered); if the signal wins, the timer is cancelled
        (``CancelTimer``). ``timeout=0`` polls: it returns a buffered signal or raises at once.

        Returns:
            The signal's JSON payload.

        Raises:
            TimeoutError: ``timeout`` seconds passed with no such signal (the builtin, so
                ``except TimeoutError`` reads naturally in workflow code).
            InvalidArgument: ``name`` is empty or ``timeout`` is negative, not finite, or
                more than `MAX_SECONDS` (100 years).
            WorkflowCancelled: the workflow was cancelled while waiting.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"signal name must be a non-empty string, got {name!r}")
        limit = None if timeout is None else _check_seconds("timeout", timeout, allow_zero=True)
        buffered = self._signals.get(name)
        if buffered:
            return buffered.popleft()[1]
        if limit == 0:
            raise TimeoutError(f"no signal {name!r} has arrived (timeout=0)")
        self._check_open()
        waiter = _Future()
        self._signal_waiters.setdefault(name, deque()).append(waiter)
        try:
            if limit is None:
                return await _Blocker(self, waiter)
            timer_id, fired = self._start_timer(limit)
            first = _Future()

            def settle(winner: _Future) -> None:
                if first.done():
                    return
                if winner is fired:
                    # Withdraw at once, so a signal recorded after the timer fired is buffered
                    # for a later wait instead of being consumed by this one, which timed out.
                    self._signal_waiters[name].remove(waiter)
                first.set_result(winner)

            waiter.add_done_callback(settle)
            fired.add_done_callback(settle)
            try:
                winner = await _Blocker(self, first)
            except Exception:
                if not fired.done() and self._is_open():
                    self._cancel_timer(timer_id)
                raise
            if winner is fired:
                raise TimeoutError(f"no signal {name!r} arrived within {limit:g} s")
            self._cancel_timer(timer_id)
            return waiter.value()
        finally:
            waiters = self._signal_waiters[name]
            if not waiter.done() and waiter in waiters:
                waiters.remove(waiter)

    # ------------------------------------------------------------------------ child workflows

    def start_child_workflow(
        self,
        workflow: str | Callable[..., Any],
        input: Any = None,
        *,
        workflow_id: str | None = None,
    ) -> ChildWorkflowHandle:
        """Start a child workflow now and return a handle to await its result later.

        Args:
            workflow: the workflow function or its registered name.
            input: its JSON input.
            workflow_id: the child's workflow id; by default ``"<run_id>/<child_id>"``, which
                is deterministic and unique to this run.

        Returns:
            The handle; awaiting it returns the child's result or raises `ChildWorkflowError`.

        Raises:
            InvalidArgument: ``workflow`` is an activity, or ``workflow_id`` is empty.
            PayloadError: ``input`` is not exact JSON.
        """
        self._check_open()
        workflow_type = name_of(workflow)
        definition = None if isinstance(workflow, str) else definition_of(workflow)
        if isinstance(definition, ActivityDefinition):
            raise InvalidArgument(
                f"{workflow_type!r} is an activity; run it with ctx.execute_activity"
            )
        if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
            raise InvalidArgument(f"workflow_id must be a non-empty string, got {workflow_id!r}")
        data = _json_copy(input, f"input of child workflow {workflow_type!r}")
        child_id = self._next_id()
        chosen = workflow_id if workflow_id is not None else f"{self._info.run_id}/{child_id}"
        future = self._register(child_id, "child", workflow_type)
        self._emit(StartChildWorkflow(child_id, workflow_type, chosen, data))
        return ChildWorkflowHandle(self, child_id, workflow_type, chosen, future)

    async def execute_child_workflow(
        self,
        workflow: str | Callable[..., Any],
        input: Any = None,
        *,
        workflow_id: str | None = None,
    ) -> Any:
        """Run a child workflow and return its result (see `start_child_workflow`).

        Returns:
            The child's JSON result.

        Raises:
            ChildWorkflowError: the child failed or was cancelled.
            WorkflowCancelled: this workflow was cancelled while waiting.
            InvalidArgument, PayloadError: as `start_child_workflow`.
        """
        return await self.start_child_workflow(workflow, input, workflow_id=workflow_id)

    # ------------------------------------------------------------- driver side (replay only)

    def _is_open(self) -> bool:
        return not (self._closing or self._closed)

    def _check_open(self) -> None:
        # After replay has produced its result, leftover coroutines are closed; a `finally:`
        # that tries to issue or wait must unwind instead of adding commands nobody will read.
        # The refusals are bounded (`_MAX_REFUSALS`): code that catches them and carries on in
        # a loop must reach an await that yields, or closing it would never return.
        if self._is_open() or self._refusals >= _MAX_REFUSALS:
            return
        self._refusals += 1
        if self._closing:
            raise GeneratorExit
        raise IllegalAwait(
            f"the ctx of {self._info.describe()} was used after its replay ended; use only "
            "the ctx passed to the running workflow function (do not keep it in globals)"
        )

    def _next_id(self) -> str:
        self._counter += 1
        return str(self._counter)

    def _register(self, command_id: str, kind: str, name: str) -> _Future:
        future = _Future()
        self._pending[command_id] = _Pending(kind=kind, name=name, future=future)
        return future

    def _emit(self, command: Command) -> None:
        self._check_open()
        if self._is_open():  # a closing or closed replay's commands are read by nobody
            self._commands.append(command)

    def _take_commands(self) -> list[Command]:
        """The commands issued since the last call: at the end of a batch, once all its
        events are delivered. A run that continues as new carries every signal no
        ``wait_signal`` took, also those of its batch delivered after its code ended, and a
        cancel request its code did not see."""
        taken, self._commands = self._commands, []
        if taken and isinstance(taken[-1], ContinueAsNewWorkflow):
            taken[-1] = attrs.evolve(
                taken[-1], signals=self._unconsumed_signals(), cancel=self._cancel_after_end
            )
        return taken

    def _set_clock(self, now: datetime, *, replaying: bool) -> None:
        self._now = now
        self._replaying = replaying

    def _set_recorded_patches(self, recorded: frozenset[str] | None) -> None:
        self._recorded_patches = recorded

    def _begin_close(self) -> None:
        self._closing = True

    def _end_close(self) -> None:
        self._closing = False
        self._closed = True

    def _confirm(self, command_id: str) -> None:
        self._pending[command_id].confirmed = True

    def _apply_input(self, event: HistoryEvent) -> bool:
        """Resolve what ``event`` answers; return True if it is a cancellation request.

        Raises:
            NonDeterminismError: the event names an id replay never issued (or whose command
                is not recorded), an id of another kind, or one that already ended.
        """
        kind = event.type
        data = event.data
        if kind in (history.WORKFLOW_TASK_SCHEDULED, history.WORKFLOW_TASK_FAILED):
            return False
        if kind == history.WORKFLOW_CANCEL_REQUESTED:
            self._cancel_requested = True
            return True
        if kind == history.SIGNAL_RECEIVED:
            self._deliver_signal(event)
            return False
        if kind in (history.ACTIVITY_STARTED, history.ACTIVITY_CANCEL_REQUESTED):
            self._known(event, "activity", "activity_id")
            return False
        if kind == history.ACTIVITY_COMPLETED:
            entry = self._live(event, "activity", "activity_id")
            entry.future.set_result(payload.copy_json(data.get("result")))
            return False
        if kind in (history.ACTIVITY_FAILED, history.ACTIVITY_TIMED_OUT):
            if data.get("will_retry"):
                self._known(event, "activity", "activity_id")
                return False
            entry = self._live(event, "activity", "activity_id")
            entry.future.set_exception(self._activity_error(event, entry))
            return False
        if kind == history.ACTIVITY_CANCELLED:
            entry = self._live(event, "activity", "activity_id")
            activity_id = str(data.get("activity_id"))
            entry.future.set_exception(
                ActivityCancelled(
                    f"activity {entry.name!r} (id {activity_id}) was cancelled",
                    activity_id=activity_id,
                    activity_type=entry.name,
                    error_type="ActivityCancelled",
                )
            )
            return False
        if kind == history.TIMER_FIRED:
            entry = self._known(event, "timer", "timer_id")
            if entry.cancelled:
                # The timer fired before the control plane applied our CancelTimer: a race
                # the history records faithfully and the workflow no longer cares about.
                return False
            self._check_not_ended(event, entry)
            entry.future.set_result(None)
            return False
        if kind == history.CHILD_WORKFLOW_COMPLETED:
            entry = self._live(event, "child", "child_id")
            entry.future.set_result(payload.copy_json(data.get("result")))
            return False
        if kind == history.CHILD_WORKFLOW_FAILED:
            entry = self._live(event, "child", "child_id")
            error = _error_of(data)
            child_id = str(data.get("child_id"))
            entry.future.set_exception(
                ChildWorkflowError(
                    f"child workflow {entry.name!r} (id {child_id}) failed: "
                    f"{error['type']}: {error['message']}",
                    child_id=child_id,
                    error_type=str(error["type"]),
                )
            )
            return False
        raise nondeterminism(
            self._info,
            f"history has {event.describe()} at seq {event.sequence_num}, an event replay "
            "cannot interpret here",
        )

    def _known(self, event: HistoryEvent, kind: str, key: str) -> _Pending:
        command_id = event.data.get(key)
        entry = self._pending.get(command_id) if isinstance(command_id, str) else None
        if entry is None or not entry.confirmed:
            raise nondeterminism(
                self._info,
                f"history has {event.describe()} at seq {event.sequence_num}, but replay "
                f"issued no recorded {kind} with id {command_id!r}",
            )
        if entry.kind != kind:
            raise nondeterminism(
                self._info,
                f"history has {event.describe()} at seq {event.sequence_num}, but command "
                f"{command_id} is a {entry.kind}, not a {kind}",
            )
        return entry

    def _live(self, event: HistoryEvent, kind: str, key: str) -> _Pending:
        entry = self._known(event, kind, key)
        self._check_not_ended(event, entry)
        return entry

    def _check_not_ended(self, event: HistoryEvent, entry: _Pending) -> None:
        if entry.future.done():
            raise nondeterminism(
                self._info,
                f"history has {event.describe()} at seq {event.sequence_num}, but that "
                f"{entry.kind} had already ended earlier in the history",
            )

    def _activity_error(self, event: HistoryEvent, entry: _Pending) -> ActivityError:
        data = event.data
        activity_id = str(data.get("activity_id"))
        attempt = data.get("attempt")
        attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0
        if event.type == history.ACTIVITY_TIMED_OUT:
            timeout_kind = str(data.get("kind", "unknown"))
            return ActivityError(
                f"activity {entry.name!r} (id {activity_id}) timed out ({timeout_kind}) "
                f"on attempt {attempt}",
                activity_id=activity_id,
                activity_type=entry.name,
                error_type="ActivityTimeout",
                attempt=attempt,
                details={"kind": timeout_kind},
            )
        error = _error_of(data)
        return ActivityError(
            f"activity {entry.name!r} (id {activity_id}) failed after {attempt} attempt(s): "
            f"{error['type']}: {error['message']}",
            activity_id=activity_id,
            activity_type=entry.name,
            error_type=str(error["type"]),
            attempt=attempt,
            details=error,
        )

    def _deliver_signal(self, event: HistoryEvent) -> None:
        name = event.data.get("name")
        if not isinstance(name, str) or not name:
            raise nondeterminism(
                self._info, f"signal at seq {event.sequence_num} has no valid name ({name!r})"
            )
        value = payload.copy_json(event.data.get("payload"))
        waiters = self._signal_waiters.get(name)
        if waiters and not self._main_ended:
            waiters.popleft().set_result(value)
        else:  # after the end, not for a branch that will never run again
            self._signals.setdefault(name, deque()).append((event.sequence_num, value))

    def _unconsumed_signals(self) -> list[int]:
        """The sequence numbers of the signals that arrived and no ``wait_signal`` took, in
        arrival order."""
        return sorted(seq for buffered in self._signals.values() for seq, _ in buffered)


def _error_of(data: Mapping[str, Any]) -> dict[str, Any]:
    raw = data.get("error")
    error = dict(raw) if isinstance(raw, Mapping) else {}
    error.setdefault("type", "Error")
    error.setdefault("message", "")
    return error


async def _await_any(aw: Awaitable[Any]) -> Any:
    return await aw
