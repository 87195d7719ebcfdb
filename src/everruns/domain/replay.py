"""The replay driver: run workflow code over its event history and return the new commands.

`replay` is a pure function: history in, commands out. It re-executes the workflow function from
the start with a small deterministic scheduler of plain coroutines (not Trio, whose scheduling
order is deliberately random, and not asyncio): ctx awaitables yield a request to the driver,
which steps ready coroutines in creation order and resolves each request from the history event
with the same command id. The history is cut into batches at ``workflow_task_completed`` markers
(events a marker's decision did not see, held while it travelled, open the next batch); the
commands each batch issues must equal the command events recorded after its marker, or
`NonDeterminismError` is raised; the commands issued after the last marker are the result.
Nothing here performs I/O, reads the clock or uses global randomness; awaiting anything that is
not a ctx operation stops the replay with `IllegalAwait` instead of hanging. Workflow code runs
with the caller's Trio run hidden, so it meets the same refusal whether the replay runs on a
Trio task or in a thread, and cannot touch the calling task.
"""

from __future__ import annotations

import contextvars
import heapq
import json
import sys
import types
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

import attrs

from everruns.domain import history as h
from everruns.domain import payload
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
    is_terminal,
)
from everruns.domain.context import (
    WorkflowContext,
    WorkflowInfo,
    _Future,
    _Wait,
    nondeterminism,
)
from everruns.domain.history import HistoryEvent
from everruns.domain.registry import Registry
from everruns.errors import (
    ContinueAsNew,
    IllegalAwait,
    InvalidArgument,
    PayloadError,
    WorkflowCancelled,
)

__all__ = [
    "FollowUp",
    "RecordedEvent",
    "ReplayResult",
    "Replayer",
    "continues_decision",
    "error_from_exception",
    "replay",
    "superseded_by",
    "unseen_input",
]

# Event loops and their helpers: a frame from one of these inside workflow code means the code
# tried to use a real event loop, which the replay driver is not.
_FOREIGN_PACKAGES = frozenset(
    {"trio", "asyncio", "anyio", "trio_asyncio", "sniffio", "curio", "uvloop", "outcome"}
)
_MAX_TRACEBACK_CHARS = 8000


@attrs.frozen
class ReplayResult:
    """What a workflow task answers.

    Attributes:
        commands: the commands issued after the last marker, in issue order (not yet in the
            history); empty when the workflow is still waiting on what it already asked for.
        completed: the workflow function has ended, so a terminal command is either the last
            of ``commands`` or already recorded in the history.
        seen_sequence: the sequence number of the last history event replayed (what the
            completion must carry so the control plane can detect a grown history).
        cancel_requested: a ``workflow_cancel_requested`` event has been delivered.
    """

    commands: list[Command]
    completed: bool
    seen_sequence: int
    cancel_requested: bool


@attrs.define
class _Batch:
    inputs: list[HistoryEvent]
    marker: HistoryEvent | None
    recorded: list[HistoryEvent]


class _Task:
    """A coroutine the driver steps; index 0 is the workflow function itself."""

    __slots__ = ("coro", "done", "future", "index", "token", "waiting", "wake")

    def __init__(self, index: int, coro: Coroutine[Any, Any, Any]) -> None:
        self.index = index
        self.coro = coro
        self.future = _Future()
        self.done = False
        # (True, value) to send, (False, exception) to throw; None while blocked or finished.
        self.wake: tuple[bool, Any] | None = (True, None)
        self.waiting: _Future | None = None
        # Bumped on every wake-up so a stale callback (e.g. a future resolved after the task
        # was interrupted by a cancellation) cannot wake the task a second time.
        self.token = 0


class _Driver:
    """Steps the workflow's coroutines and feeds them history events; one per replay call."""

    def __init__(
        self,
        workflow_fn: Callable[..., Any],
        info: WorkflowInfo,
        registry: Registry | None,
    ) -> None:
        self.workflow_fn = workflow_fn
        self.info = info
        self.ctx = WorkflowContext(info, scheduler=self, registry=registry)
        self.tasks: list[_Task] = []
        self.ready: list[int] = []
        self.started = False
        self.ended = False
        # The first refusal `_TrioTrap` gave workflow code: it ends the replay even if the
        # code caught it.
        self.refused: _TrioRefused | None = None

    # ------------------------------------------------------------------------- scheduling

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> _Future:
        try:
            self.ctx._check_open()
        except BaseException:
            coro.close()
            raise
        if not self.ctx._is_open():
            # Closing (or closed) and past its refusals: the coroutine never runs, and what
            # awaits it yields a wait nothing answers (see `_check_open`).
            _close_quietly(coro)
            return _Future()
        task = _Task(len(self.tasks), coro)
        self.tasks.append(task)
        heapq.heappush(self.ready, task.index)
        return task.future

    def _wake(self, task: _Task, token: int, future: _Future) -> None:
        if task.token != token or task.done:
            return
        task.token += 1
        task.waiting = None
        exc = future.exception()
        task.wake = (True, future.value()) if exc is None else (False, exc)
        heapq.heappush(self.ready, task.index)

    def interrupt_blocked(self, reason: str) -> None:
        """Throw `WorkflowCancelled` into every coroutine blocked on a ctx awaitable."""
        for task in self.tasks:
            if task.done or task.waiting is None:
                continue
            task.token += 1
            task.waiting = None
            message = "the workflow was asked to cancel" + (f": {reason}" if reason else "")
            task.wake = (False, WorkflowCancelled(message))
            heapq.heappush(self.ready, task.index)

    def run(self) -> None:
        """Step ready coroutines, lowest creation index first, until all are blocked."""
        while self.ready and not self.ended:
            task = self.tasks[heapq.heappop(self.ready)]
            if task.wake is None or task.done:
                continue
            self._step(task)

    def _step(self, task: _Task) -> None:
        assert task.wake is not None
        send, value = task.wake
        task.wake = None
        try:
            yielded = task.coro.send(value) if send else task.coro.throw(value)
        except StopIteration as stop:
            self._check_refused()
            self._finish(task, stop.value, None)
            return
        except KeyboardInterrupt:
            raise  # the operator's, not the workflow's
        except BaseException as exc:
            # Any other BaseException (SystemExit, GeneratorExit, a custom one) is workflow code
            # failing like any error: left to escape it would take the worker down, on every
            # worker that claims the task. No real trio.Cancelled can arrive here: stepping is
            # synchronous, and Trio delivers a cancellation only to a task blocked in Trio.
            self._check_refused()
            if isinstance(exc, IllegalAwait):
                raise  # a bug in the workflow code: fail the workflow task, not the workflow
            illegal = _illegal_call(self.info, exc)
            if illegal is not None:
                raise illegal from exc
            self._finish(task, None, exc)
            return
        self._check_refused()
        if isinstance(yielded, _Wait) and yielded.ctx is self.ctx:
            future = yielded.future
            task.waiting = future
            token = task.token
            future.add_done_callback(lambda f: self._wake(task, token, f))
            return
        # Close at once: the coroutine is stopped at an await nothing will ever answer.
        error = _illegal_yield(self.info, task.coro, yielded)
        _close_quietly(task.coro)
        task.done = True
        raise error

    def _check_refused(self) -> None:
        refused = self.refused
        if refused is not None:
            raise _illegal_call(self.info, refused) or IllegalAwait(str(refused)) from refused

    def _finish(self, task: _Task, value: Any, exc: BaseException | None) -> None:
        task.done = True
        if exc is None:
            task.future.set_result(value)
        else:
            task.future.set_exception(exc)
        if task.index == 0:
            self.ended = True
            self.ctx._main_ended = True
            if isinstance(exc, ContinueAsNew):
                # the signals it carries are filled in at the batch's end (`_take_commands`)
                self.ctx._emit(_continue_command(exc))
            else:
                self.ctx._emit(_terminal_command(value, exc))

    # --------------------------------------------------------------------------- history

    def deliver(self, event: HistoryEvent) -> None:
        if event.type == h.WORKFLOW_STARTED:
            if self.started:
                raise nondeterminism(
                    self.info, f"history has a second workflow_started at seq {event.sequence_num}"
                )
            self.started = True
            self.spawn(_main(self.workflow_fn, self.ctx, event.data.get("input")))
            if _before_code(event):
                return  # its code starts once the signals it carries are buffered
        elif _before_code(event):
            self.ctx._apply_input(event)  # a carried signal: buffered, no code runs yet
            return
        else:
            # Only a continued run's code that has not taken its first step is ready here:
            # it takes it before any other event (as a run's code does at its start).
            self.run()
            if self.ctx._apply_input(event):
                if self.ended:  # a cancel no code will see (one that continues hands it on)
                    self.ctx._cancel_after_end = True
                self.interrupt_blocked(str(event.data.get("reason") or ""))
        self.run()

    def close(self) -> None:
        """Unwind every unfinished coroutine now, so none is finalised later by the GC."""
        self.ctx._begin_close()
        for task in reversed(self.tasks):
            if not task.done:
                task.done = True
                _close_quietly(task.coro)
        self.ctx._end_close()


async def _main(workflow_fn: Callable[..., Any], ctx: WorkflowContext, input: Any) -> Any:
    return await workflow_fn(ctx, payload.copy_json(input))


def _close_quietly(coro: Coroutine[Any, Any, Any]) -> None:
    # Workflow code that raises while being discarded (even SystemExit from a `finally:`) can
    # change nothing any more; only the operator's Ctrl-C goes on.
    try:
        coro.close()
    except KeyboardInterrupt:
        raise
    except BaseException:
        pass


def _terminal_command(value: Any, exc: BaseException | None) -> Command:
    if exc is None:
        try:
            exact = _json_value(value)
        except PayloadError as bad:
            return FailWorkflow(error=error_from_exception(bad))
        return CompleteWorkflow(result=exact)
    if isinstance(exc, WorkflowCancelled):
        return CancelWorkflow()
    return FailWorkflow(error=error_from_exception(exc))


def _before_code(event: HistoryEvent) -> bool:
    """Whether ``event`` is delivered before any code runs: the start of a run that continues
    another, and the signals it carries (``carried``), which its code finds waiting, as the
    run it continues left them, before it takes its first step."""
    if event.type == h.WORKFLOW_STARTED:
        return event.data.get("continued_from") is not None
    return event.type == h.SIGNAL_RECEIVED and event.data.get("carried") is True


def _continue_command(exc: ContinueAsNew) -> Command:
    """`ctx.continue_as_new` checked its input; a `ContinueAsNew` raised by hand may hold
    anything: not exact JSON, the run fails saying so."""
    try:
        exact = payload.decode(payload.encode_text(exc.input, what="input of continue_as_new"))
    except PayloadError as bad:
        return FailWorkflow(error=error_from_exception(bad))
    return ContinueAsNewWorkflow(input=exact)


def _json_value(value: Any) -> Any:
    return payload.decode(payload.encode_text(value, what="workflow result"))


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _format_traceback(exc: BaseException) -> str:
    # Source lines are left out on purpose: looking them up reads files, and replay is pure.
    blocks: list[str] = []
    for item in reversed(h.exception_chain(exc, 5)):
        lines = ["Traceback (most recent call last):"]
        tb = item.__traceback__
        while tb is not None:
            # The driver's own frames say nothing about the workflow's bug.
            if tb.tb_frame.f_globals.get("__name__") != __name__:
                code = tb.tb_frame.f_code
                lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
            tb = tb.tb_next
        lines.append(f"{_type_name(item)}: {h.exception_text(item)}")
        blocks.append("\n".join(lines))
    text = "\n\nThe above exception was the direct cause of the following exception:\n\n".join(
        blocks
    )
    return text[-_MAX_TRACEBACK_CHARS:]


def error_from_exception(exc: BaseException) -> dict[str, Any]:
    """Return the ``error`` object recorded when workflow code raises ``exc``.

    Returns:
        ``{"type", "message", "traceback", "non_retryable": True}``; a workflow's failure is
        final, so it is always non-retryable. ``type`` is the bare name for builtins and the
        qualified name otherwise. Text UTF-8 cannot carry (a lone surrogate) is escaped
        (``\\udce9``), so the error can always be sent.
    """
    return h.error_info(
        _type_name(exc),
        h.exception_text(exc),
        traceback=_format_traceback(exc),
        non_retryable=True,
    )


# ----------------------------------------------------------------------------- illegal awaits


def _top_package(module: object) -> str:
    return module.split(".", 1)[0] if isinstance(module, str) else ""


def _frame_of(obj: object) -> types.FrameType | None:
    frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
    return frame if isinstance(frame, types.FrameType) else None


def _describe_frame(frame: types.FrameType) -> str:
    return f"{frame.f_code.co_qualname} at {frame.f_code.co_filename}:{frame.f_lineno}"


def _advice(what: str) -> str:
    if "sleep" in what.lower():
        return "Use `await ctx.sleep(seconds)` for a durable sleep."
    return (
        "Do I/O in an activity and run it with `await ctx.execute_activity(...)`; use "
        "`await ctx.sleep(seconds)` to wait and `await ctx.gather(...)` for concurrency."
    )


def _illegal_yield(info: WorkflowInfo, coro: object, yielded: object) -> IllegalAwait:
    # Follow the chain of awaits down from the task to find the first library call (e.g.
    # trio.sleep) and the workflow frame that made it.
    user_frame: types.FrameType | None = None
    library_call: str | None = None
    current: object = coro
    for _ in range(200):
        frame = _frame_of(current)
        if frame is None:
            break
        module = frame.f_globals.get("__name__")
        top = _top_package(module)
        if top in _FOREIGN_PACKAGES:
            library_call = f"{top}.{frame.f_code.co_qualname}"
            break
        # Report the coroutine that awaited, not a generator-based ``__await__`` it called.
        is_coroutine = hasattr(current, "cr_frame")
        if is_coroutine and not (isinstance(module, str) and module.startswith("everruns.")):
            user_frame = frame
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
        if current is None:
            break
    if library_call is not None:
        what = f"{library_call}()"
    elif isinstance(yielded, _Wait):
        what = "an operation of another workflow's ctx"
    elif hasattr(yielded, "_asyncio_future_blocking"):
        what = f"an asyncio future ({type(yielded).__qualname__})"
    else:
        kind = type(yielded)
        origin = _top_package(kind.__module__)
        what = f"an object of type {kind.__module__}.{kind.__qualname__}" + (
            f" (a {origin} primitive)" if origin in _FOREIGN_PACKAGES else ""
        )
    where = f" in {_describe_frame(user_frame)}" if user_frame is not None else ""
    return IllegalAwait(
        f"{info.describe()} awaited {what}{where}, which is not a ctx operation: workflow code "
        f"runs in everruns' deterministic replay driver, not in an event loop, and may await "
        f"only what ctx gives it. {_advice(what)}"
    )


def _illegal_call(info: WorkflowInfo, exc: BaseException) -> IllegalAwait | None:
    # Outside a running loop trio.sleep/asyncio.sleep fail with RuntimeError before they yield
    # anything, and inside a replay Trio refuses (`_TrioRefused`): the same bug as awaiting them
    # inside a loop, so report it the same way. A loop's own cancellation (trio.Cancelled,
    # asyncio.CancelledError) can only come from such a call too. So can any exception an
    # event loop package raises itself, whatever its type: an asyncio primitive (Event.wait,
    # Queue.get, a contended Semaphore) binds to the running loop, finds none, and fails with
    # an AttributeError. An exception workflow code raises itself is raised in its own frame,
    # and stays the workflow's failure.
    refused = isinstance(exc, _TrioRefused)
    foreign = not isinstance(exc, Exception) and (
        _top_package(type(exc).__module__) in _FOREIGN_PACKAGES
    )
    from_loop = _raised_by_foreign_package(exc)
    if not (refused or foreign or from_loop or isinstance(exc, RuntimeError)):
        return None
    tb = exc.__traceback__
    previous: types.FrameType | None = None
    while tb is not None:
        frame = tb.tb_frame
        top = _top_package(frame.f_globals.get("__name__"))
        if top in _FOREIGN_PACKAGES:
            what = f"{top}.{frame.f_code.co_qualname}()"
            where = f" in {_describe_frame(previous)}" if previous is not None else ""
            return IllegalAwait(
                f"{info.describe()} called {what}{where}, which needs a running event loop "
                f"({h.exception_text(exc)}): workflow code runs in everruns' deterministic "
                f"replay driver and may await only what ctx gives it. {_advice(what)}"
            )
        previous = frame
        tb = tb.tb_next
    if refused or foreign:
        return IllegalAwait(
            f"{info.describe()} raised {_type_name(exc)} ({h.exception_text(exc)}), which only "
            "an event loop raises: workflow code runs in everruns' deterministic replay driver "
            f"and may await only what ctx gives it. {_advice('')}"
        )
    return None


def _raised_by_foreign_package(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _top_package(tb.tb_frame.f_globals.get("__name__")) in _FOREIGN_PACKAGES


class _TrioRefused(BaseException):
    """What workflow code meets when it reaches for Trio during a replay.

    A BaseException, so that an ``except Exception`` around the call does not take it for an
    error the workflow can handle; the driver notes it anyway (`_Driver.refused`), so a bare
    ``except:`` hides nothing either.
    """


class _TrioTrap:
    """Stands in for Trio's runner and current task while workflow code runs: reading or
    setting any attribute of them (which every Trio operation does) raises `_TrioRefused`,
    noted by the driver."""

    __slots__ = ("_driver",)
    _driver: _Driver

    # What Trio's SIGINT handler reads of the current task, between any two bytecodes of
    # workflow code: "protected" has it deliver Ctrl-C to the worker at its next checkpoint.
    _ki_protected = True
    coro = types.SimpleNamespace(cr_frame=None)

    def __init__(self, driver: _Driver) -> None:
        object.__setattr__(self, "_driver", driver)

    def _refuse(self, name: str) -> NoReturn:
        refused = _TrioRefused(f"Trio's run is hidden from workflow code; it asked for {name!r}")
        if self._driver.refused is None:
            self._driver.refused = refused
        raise refused

    def __getattr__(self, name: str) -> NoReturn:
        self._refuse(name)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        self._refuse(name)

    def __delattr__(self, name: str) -> NoReturn:
        self._refuse(name)


class _HiddenTrio:
    """For the length of a ``with``, hide the calling thread's Trio run from workflow code.

    Trio's per-thread run context (its runner and current task) is replaced by `_TrioTrap`s,
    and the async generator hooks and sniffio name Trio sets are put aside. On a Trio task or in
    a worker thread, workflow code then sees the same thing: Trio refuses, the driver notes it,
    and nothing the code does reaches the calling task (a cancel scope entered on it, a
    checkpoint). Trio is found through ``sys.modules``: the domain does not import it, and a
    process that has not imported it has no run to hide.
    """

    __slots__ = ("_driver", "_hooks", "_saved", "_sniffio", "_sniffio_name", "_state")

    def __init__(self, driver: _Driver) -> None:
        self._driver = driver
        self._hooks: Any = None
        self._sniffio: Any = None
        self._sniffio_name: str | None = None
        self._state: dict[str, Any] | None = None
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        # Trio's hooks would adopt the workflow's async generators and later finalise them
        # in a Trio task; without hooks they are closed as in any thread.
        self._hooks = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(None, None)
        sniffio = getattr(sys.modules.get("sniffio"), "thread_local", None)
        if sniffio is not None:
            self._sniffio, self._sniffio_name = sniffio, sniffio.name
            sniffio.name = None
        run_context = getattr(sys.modules.get("trio._core._run"), "GLOBAL_RUN_CONTEXT", None)
        state = getattr(run_context, "__dict__", None)  # this thread's
        if isinstance(state, dict):
            self._state, self._saved = state, dict(state)
            trap = _TrioTrap(self._driver)
            state.clear()
            state.update(runner=trap, task=trap)

    def __exit__(self, *exc_info: object) -> None:
        if self._state is not None:
            self._state.clear()
            self._state.update(self._saved)
        if self._sniffio is not None:
            self._sniffio.name = self._sniffio_name
        sys.set_asyncgen_hooks(*self._hooks)


# --------------------------------------------------------------------------------- batching


def _split(history: Sequence[HistoryEvent], info: WorkflowInfo) -> list[_Batch]:
    if not history:
        raise nondeterminism(info, "the history is empty (it must start with workflow_started)")
    for position, event in enumerate(history, start=1):
        if event.sequence_num != position:
            raise nondeterminism(
                info,
                f"history event #{position} has sequence number {event.sequence_num}; "
                "sequence numbers must run 1, 2, 3, … without gaps",
            )
    first = history[0]
    if first.type != h.WORKFLOW_STARTED:
        raise nondeterminism(info, f"history starts with {first.type} instead of workflow_started")
    for key, expected in (
        ("workflow_id", info.workflow_id),
        ("run_id", info.run_id),
        ("workflow_type", info.workflow_type),
    ):
        recorded = first.data.get(key)
        if recorded is not None and recorded != expected:
            raise nondeterminism(
                info, f"workflow_started at seq 1 has {key}={recorded!r}, not {expected!r}"
            )
    return _batches(history, info, floor=first.sequence_num)


def _batches(events: Sequence[HistoryEvent], info: WorkflowInfo, *, floor: int) -> list[_Batch]:
    """Cut events into batches: the inputs a decision saw, then the marker that records it and
    the command events recorded after it; the last batch has no marker. Inputs after the
    ``seen_sequence`` a marker records arrived while its decision travelled and were held: they
    open the next batch. ``floor`` is the last event the first decision must have seen."""
    batches: list[_Batch] = []
    inputs: list[HistoryEvent] = []
    for event in events:
        if event.type == h.MARKER_EVENT_TYPE:
            seen = _marker_seen(info, event, floor)
            batches.append(
                _Batch(
                    inputs=[e for e in inputs if e.sequence_num <= seen], marker=event, recorded=[]
                )
            )
            inputs = [e for e in inputs if e.sequence_num > seen]
            floor = event.sequence_num
        elif event.type in h.COMMAND_EVENT_TYPES:
            if not batches:
                raise nondeterminism(
                    info,
                    f"history has {event.describe()} at seq {event.sequence_num}, before any "
                    "workflow task completed",
                )
            batches[-1].recorded.append(event)
            floor = event.sequence_num
        elif event.type in h.INPUT_EVENT_TYPES or event.type in h.IGNORED_EVENT_TYPES:
            inputs.append(event)
        else:
            raise nondeterminism(
                info,
                f"history has an event of unknown type {event.type!r} at seq "
                f"{event.sequence_num}; is this worker older than the control plane?",
            )
    batches.append(_Batch(inputs=inputs, marker=None, recorded=[]))
    return batches


def _marker_seen(info: WorkflowInfo, marker: HistoryEvent, floor: int) -> int:
    """The last event the decision a marker records was made on: the ``seen_sequence`` it
    records, else every event before it."""
    seen = marker.data.get("seen_sequence")
    if seen is None:
        return marker.sequence_num - 1
    if (
        isinstance(seen, bool)
        or not isinstance(seen, int)
        or not floor <= seen < marker.sequence_num
    ):
        raise nondeterminism(
            info,
            f"the workflow_task_completed at seq {marker.sequence_num} records seen_sequence="
            f"{seen!r}; a decision sees the events of the one before it (to seq {floor}) and "
            "none after its own marker",
        )
    return seen


def _marker_time(info: WorkflowInfo, marker: HistoryEvent) -> datetime:
    raw = marker.data.get("time")
    if raw is None:
        fallback = marker.time
        return fallback.replace(tzinfo=UTC) if fallback.tzinfo is None else fallback
    try:
        return h.parse_time(raw)
    except InvalidArgument as exc:
        raise nondeterminism(
            info, f"the workflow_task_completed at seq {marker.sequence_num} has a bad time: {exc}"
        ) from exc


def _matches(command: Command, event: HistoryEvent) -> bool:
    data = event.data
    if isinstance(command, ScheduleActivity):
        return (
            event.type == h.ACTIVITY_SCHEDULED
            and data.get("activity_id") == command.activity_id
            and data.get("activity_type") == command.activity_type
        )
    if isinstance(command, StartTimer):
        seconds = data.get("seconds")
        return (
            event.type == h.TIMER_STARTED
            and data.get("timer_id") == command.timer_id
            and isinstance(seconds, (int, float))
            and not isinstance(seconds, bool)
            and float(seconds) == float(command.seconds)
        )
    if isinstance(command, CancelTimer):
        return event.type == h.TIMER_CANCELLED and data.get("timer_id") == command.timer_id
    if isinstance(command, StartChildWorkflow):
        return (
            event.type == h.CHILD_WORKFLOW_STARTED
            and data.get("child_id") == command.child_id
            and data.get("workflow_type") == command.workflow_type
            # the child it names: code that now starts another one has changed (a history
            # written without the id, by an early version, matches any)
            and data.get("workflow_id") in (None, command.workflow_id)
        )
    if isinstance(command, RecordPatch):
        return event.type == h.PATCH_RECORDED and data.get("patch_id") == command.patch_id
    if isinstance(command, CompleteWorkflow):
        return event.type == h.WORKFLOW_COMPLETED
    if isinstance(command, FailWorkflow):
        return event.type == h.WORKFLOW_FAILED
    if isinstance(command, ContinueAsNewWorkflow):
        return event.type == h.WORKFLOW_CONTINUED_AS_NEW
    return event.type == h.WORKFLOW_CANCELLED


def _recorded_patches(batch: _Batch) -> frozenset[str]:
    """The patch ids a replayed batch's decision recorded (`WorkflowContext.patched`)."""
    return frozenset(
        str(e.data.get("patch_id")) for e in batch.recorded if e.type == h.PATCH_RECORDED
    )


def _compare(
    driver: _Driver, batch: _Batch, issued: list[Command], patches: frozenset[str]
) -> None:
    """Check a replayed batch's commands against what its decision recorded (``patches``:
    the patch ids it recorded, `_recorded_patches`)."""
    assert batch.marker is not None
    recorded: Sequence[HistoryEvent] = batch.recorded
    asked = {c.patch_id for c in issued if isinstance(c, RecordPatch)}
    if patches or asked:
        # Patches are compared apart, as a set: the code answers `patched` from what the
        # batch recorded, and a recorded patch it no longer asks about (its old branch
        # removed) is ignored. One it took that was not recorded (a decision that was not
        # this one) is not.
        unrecorded = asked - patches
        if unrecorded:
            raise nondeterminism(
                driver.info,
                f"replay took patch {sorted(unrecorded)[0]!r}, which the workflow task "
                f"completed at seq {batch.marker.sequence_num} did not record",
            )
        issued = [c for c in issued if not isinstance(c, RecordPatch)]
        recorded = [e for e in recorded if e.type != h.PATCH_RECORDED]
    for index in range(max(len(issued), len(recorded))):
        if index >= len(issued):
            event = recorded[index]
            raise nondeterminism(
                driver.info,
                f"history has {event.describe()} at seq {event.sequence_num}, replay issued "
                f"no command there (only {len(issued)} for the workflow task completed at seq "
                f"{batch.marker.sequence_num})",
            )
        command = issued[index]
        if index >= len(recorded):
            after = recorded[-1].sequence_num if recorded else batch.marker.sequence_num
            raise nondeterminism(
                driver.info,
                f"history has no command event after seq {after} (the workflow task completed "
                f"at seq {batch.marker.sequence_num} recorded {len(recorded)}), replay issued "
                f"{command.describe()}",
            )
        event = recorded[index]
        if not _matches(command, event):
            raise nondeterminism(
                driver.info,
                f"history has {event.describe()} at seq {event.sequence_num}, replay issued "
                f"{command.describe()}",
            )
        if isinstance(command, (ScheduleActivity, StartTimer, StartChildWorkflow)):
            driver.ctx._confirm(command.command_id)


# ----------------------------------------------------------------------------------- entry


def replay(
    workflow_fn: Callable[..., Any],
    history: Sequence[HistoryEvent],
    *,
    info: WorkflowInfo,
    now: datetime,
    registry: Registry | None = None,
) -> ReplayResult:
    """Replay ``workflow_fn`` over its history and return the commands it issues next.

    Each batch of input events (those before a ``workflow_task_completed`` marker) is delivered
    one event at a time, in order; after each, the workflow's coroutines run until every one is
    blocked. The commands a batch issues must equal the command events recorded after its
    marker (type and id; activity and child types; timer seconds). During recorded batches
    ``ctx.now()`` is the marker's ``time`` and ``ctx.is_replaying`` is true; after the last
    marker ``ctx.now()`` is ``now``. The workflow is called as ``await workflow_fn(ctx, input)``.

    Args:
        workflow_fn: the ``async def wf(ctx, input)`` to run.
        history: the run's full history, sequence numbers 1, 2, 3, …
        info: the run's identity (checked against ``workflow_started``).
        now: the claim time of the workflow task (timezone-aware).
        registry: where to look up default options of activities named by string.

    Returns:
        The `ReplayResult`. A workflow that returns gives `CompleteWorkflow` (a result that is
        not exact JSON gives `FailWorkflow` with a `PayloadError`), one that lets
        `WorkflowCancelled` escape gives `CancelWorkflow`, any other exception (a
        BaseException such as SystemExit too; only KeyboardInterrupt propagates)
        `FailWorkflow` with ``non_retryable`` true.

    Raises:
        NonDeterminismError: the code issued other commands than recorded, an event names an id
            the code never issued, or the history is malformed (gaps, no ``workflow_started``
            first, unknown event types).
        IllegalAwait: workflow code awaited (or called) something from an event loop library,
            or an object that is not a ctx awaitable. Trio's run is hidden from workflow code,
            on a Trio task as in a thread: any use of it is refused, and ends the replay even
            when the code catches the refusal.
        InvalidArgument: ``now`` is naive or ``workflow_fn`` is not callable.
    """
    replayer = Replayer(workflow_fn, info=info, registry=registry)
    try:
        return replayer.replay(history, now=now)
    finally:
        replayer.close()


class Replayer:
    """A workflow's replay, kept open from one workflow task to the next.

    `replay` runs the whole history, as the function `replay` does, and leaves the workflow's
    coroutines suspended where they wait. `advance` then takes only the events that came after
    those it has seen, when they continue from the decision it made: the marker recording that
    decision, exactly its command events (compared, as a full replay compares them), then new
    events. What the workflow sees is what a full replay would show it, so the answer is the
    same; anything else (a gap, a decision that was not recorded, another clock) makes
    `advance` return None, and the caller replays in full. A replayer serves one run, one task
    at a time, and must be closed.

    Args:
        workflow_fn: the ``async def wf(ctx, input)`` to run.
        info: the run's identity.
        registry: where to look up default options of activities named by string.
    """

    def __init__(
        self,
        workflow_fn: Callable[..., Any],
        *,
        info: WorkflowInfo,
        registry: Registry | None = None,
    ) -> None:
        if not callable(workflow_fn):
            raise InvalidArgument(f"workflow_fn must be callable, got {type(workflow_fn).__name__}")
        self._info = info
        # The workflow's coroutines run in a context of their own, the same for every task:
        # a context variable set before an await is still set after it, whichever task (or
        # thread) delivers the event that resumes it.
        self._context = contextvars.copy_context()
        self._driver = _Driver(workflow_fn, info, registry)
        self._seen = 0  # the sequence number of the last event delivered
        self._issued: list[Command] = []  # commands of the open (last) batch, not yet recorded
        self._clock: datetime | None = None  # the open batch's clock
        self._closed = False

    @property
    def info(self) -> WorkflowInfo:
        """The run this replayer replays."""
        return self._info

    @property
    def seen_sequence(self) -> int:
        """The sequence number of the last history event replayed (0 before `replay`)."""
        return self._seen

    def replay(self, history: Sequence[HistoryEvent], *, now: datetime) -> ReplayResult:
        """Replay the whole history (see the function `replay`); only once per replayer."""
        _check_now(now)
        if self._seen:
            raise InvalidArgument(
                "this replayer has replayed a history already (or failed to); use advance, or a "
                "new Replayer"
            )
        return self._run(_split(history, self._info), now, history[-1].sequence_num)

    def advance(self, events: Sequence[HistoryEvent], *, now: datetime) -> ReplayResult | None:
        """Go on with ``events``, the history after `seen_sequence`; None when they do not
        continue from this replayer's last decision (the caller then replays in full).

        Raises:
            NonDeterminismError, IllegalAwait: as a full replay would for the same history.
        """
        _check_now(now)
        if self._closed or self._seen <= 0 or not events:
            return None
        if any(e.sequence_num != self._seen + n for n, e in enumerate(events, start=1)):
            return None
        # The decision recorded first must be this replayer's: made on what it had seen.
        marker = next((e for e in events if e.type == h.MARKER_EVENT_TYPE), None)
        if marker is None or marker.data.get("seen_sequence", self._seen) != self._seen:
            return None
        batches = _batches(events, self._info, floor=self._seen)
        marker = batches[0].marker
        # The open batch must end with the marker recording its decision, under the clock the
        # decision was made with (the claim time it carries).
        if marker is None or _marker_time(self._info, marker) != self._clock:
            return None
        return self._run(batches, now, events[-1].sequence_num, continuing=True)

    def follow_up(
        self,
        activity_id: str,
        attempt: int,
        result: Any,
        *,
        worker_id: str,
        now: datetime,
    ) -> FollowUp | None:
        """Decide ahead the workflow task that an activity's result will wake.

        Assumes the history grows by exactly what the control plane records when this
        replayer's last decision and then the result are applied: the decision's
        ``workflow_task_completed`` (from ``worker_id``, at this replayer's clock), one
        ``activity_scheduled`` per command it issued, then the activity's
        ``activity_started`` and ``activity_completed``. Applies that history as `advance`
        would, with ``now`` (or the last decision's clock, if later) as the new task's clock.
        The control plane checks the assumption
        (`continues_decision`) before it applies the answer; the caller closes this replayer
        when it does not, since the replayer then holds a history that was never recorded.

        Returns:
            The decision, or None when it cannot be made ahead (nothing decided yet, or the
            last decision issued more than activities: its events are not one per command).

        Raises:
            NonDeterminismError, IllegalAwait: as a full replay would for the same history.
        """
        _check_now(now)
        clock = self._clock
        if self._closed or self._seen <= 0 or clock is None or self._driver.ended:
            return None
        if not all(isinstance(c, ScheduleActivity) for c in self._issued):
            return None
        now = max(now, clock)
        after = self._seen
        data = [h.workflow_task_completed(worker_id, clock)]
        data += [command.to_event() for command in self._issued]
        data += [
            h.activity_started(activity_id, attempt, worker_id),
            h.activity_completed(activity_id, result, attempt),
        ]
        events = [HistoryEvent.of(after + n, d, time=now) for n, d in enumerate(data, start=1)]
        answer = self.advance(events, now=now)
        if answer is None:  # cannot happen: the events continue from the last decision
            return None
        return FollowUp(answer, after_sequence=after, after_time=clock, decided_at=now)

    def _run(
        self,
        batches: list[_Batch],
        now: datetime,
        last: int,
        *,
        continuing: bool = False,
    ) -> ReplayResult:
        with _HiddenTrio(self._driver):
            return self._context.run(self._run_batches, batches, now, last, continuing)

    def _run_batches(
        self, batches: list[_Batch], now: datetime, last: int, continuing: bool
    ) -> ReplayResult:
        driver = self._driver
        result: list[Command] = []
        self._seen = -1  # broken until this run ends well
        for n, batch in enumerate(batches):
            issued_before = self._issued if continuing and n == 0 else []
            patches: frozenset[str] = frozenset()
            if batch.marker is not None:
                driver.ctx._set_clock(_marker_time(self._info, batch.marker), replaying=True)
                patches = _recorded_patches(batch)
                driver.ctx._set_recorded_patches(patches)
            else:
                self._clock = now.astimezone(UTC)
                driver.ctx._set_clock(self._clock, replaying=False)
                driver.ctx._set_recorded_patches(None)
            for event in batch.inputs:
                driver.deliver(event)
            driver.run()  # a batch of a continued run's start and carried signals alone
            issued = issued_before + driver.ctx._take_commands()
            if batch.marker is not None:
                _compare(driver, batch, issued, patches)
            else:
                result = issued
        self._issued = result
        self._seen = last
        return ReplayResult(
            commands=list(result),
            completed=driver.ended,
            seen_sequence=last,
            cancel_requested=driver.ctx.cancel_requested,
        )

    def close(self) -> None:
        """Unwind the workflow's coroutines now (idempotent)."""
        if not self._closed:
            self._closed = True
            with _HiddenTrio(self._driver):
                self._context.run(self._driver.close)


@attrs.frozen
class FollowUp:
    """A decision made ahead by `Replayer.follow_up`.

    Attributes:
        result: the decision, as a workflow task would answer it.
        after_sequence: the last sequence number the replayer had seen before the decision
            it continues from.
        after_time: the clock of that decision (the time its marker records).
        decided_at: the clock of this decision (the time its marker must record).
    """

    result: ReplayResult
    after_sequence: int
    after_time: datetime
    decided_at: datetime


class RecordedEvent(Protocol):
    """What `continues_decision` reads of a recorded event."""

    @property
    def sequence_num(self) -> int: ...

    @property
    def type(self) -> str: ...

    @property
    def data(self) -> Mapping[str, Any]: ...


def continues_decision(
    history: Sequence[RecordedEvent],
    *,
    after_sequence: int,
    after_time: datetime,
    worker_id: str,
    activity_id: str,
    result: Any,
    seen_sequence: int,
) -> bool:
    """Whether a run's history is what `Replayer.follow_up` assumed: after ``after_sequence``,
    the marker of a decision by ``worker_id`` at ``after_time``, only ``activity_scheduled``
    events, then ``activity_id``'s ``activity_started`` and its ``activity_completed`` with
    ``result`` (the same JSON value), the last at ``seen_sequence``. Pure; ``history`` in
    sequence order."""
    tail = [e for e in history if e.sequence_num > after_sequence]
    if len(tail) < 3 or len(tail) != seen_sequence - after_sequence:
        return False
    if any(e.sequence_num != after_sequence + n for n, e in enumerate(tail, start=1)):
        return False
    marker, *scheduled, started, completed = tail
    if marker.type != h.MARKER_EVENT_TYPE:
        return False
    mark = marker.data
    if mark.get("worker_id") != worker_id:
        return False
    time = mark.get("time")
    try:
        if not isinstance(time, str) or h.parse_time(time) != after_time:
            return False
    except InvalidArgument:
        return False
    if not (
        all(e.type == h.ACTIVITY_SCHEDULED for e in scheduled)
        and started.type == h.ACTIVITY_STARTED
        and completed.type == h.ACTIVITY_COMPLETED
        and started.data.get("activity_id") == activity_id
    ):
        return False
    done = completed.data
    # The same JSON value, told apart as JSON tells them (1, 1.0 and true are three values).
    return done.get("activity_id") == activity_id and json.dumps(done.get("result")) == json.dumps(
        result
    )


def superseded_by(
    commands: Sequence[Command], unseen: Sequence[RecordedEvent]
) -> RecordedEvent | None:
    """The first of the events a decision was not made on (``unseen``: those appended after its
    ``seen_sequence``) that makes its commands stale; None when the commands still hold, and
    are applied with those events held for the next decision (its marker records
    ``seen_sequence``; replay delivers them after its commands). Pure.

    Stale: another decision's events (a marker or a command event); a cancel request (it
    cancelled the activities the run had, so the code must see it before it schedules more);
    any input when the decision ends the run (ending without seeing it would lose it).
    Diagnostic events never are. A timer that fired unseen by a decision cancelling it is not
    either: its firing, delivered after the cancel, is ignored, as when it fires first."""
    ends = any(is_terminal(c) for c in commands)
    for event in unseen:
        kind = event.type
        if kind in (h.MARKER_EVENT_TYPE, h.WORKFLOW_CANCEL_REQUESTED):
            return event
        if kind in h.COMMAND_EVENT_TYPES or (ends and kind in h.INPUT_EVENT_TYPES):
            return event
    return None


def unseen_input(unseen: Sequence[RecordedEvent]) -> bool:
    """Whether events a workflow task was not given (``unseen``: those appended after the
    history it replayed) hold input, which another workflow task must replay. Pure.

    Their arrival made sure a workflow task was pending, but the pending one may have been
    that very task, claimed a moment later by a statement whose snapshot predates them: then
    no other task is coming for them unless the task's end makes one."""
    return any(event.type in h.INPUT_EVENT_TYPES for event in unseen)


def _check_now(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidArgument(f"now must be timezone-aware, got naive {now!r}")
