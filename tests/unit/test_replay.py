"""The replay engine, scenario by scenario, against an in-memory stand-in for the control plane."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import re
import signal
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain import history as h
from everruns.domain.commands import (
    ActivityOptions,
    CancelTimer,
    CancelWorkflow,
    Command,
    CompleteWorkflow,
    FailWorkflow,
    ScheduleActivity,
    StartChildWorkflow,
    StartTimer,
    command_from_dict,
    is_terminal,
)
from everruns.domain.context import ActivityHandle, WorkflowContext, WorkflowInfo
from everruns.domain.history import HistoryEvent
from everruns.domain.limits import MAX_SECONDS
from everruns.domain.registry import Registry, activity
from everruns.domain.replay import Replayer, ReplayResult, replay
from everruns.domain.retry import RetryPolicy
from everruns.errors import (
    ActivityError,
    ChildWorkflowError,
    IllegalAwait,
    InvalidArgument,
    NonDeterminismError,
    WorkflowCancelled,
)

INFO = WorkflowInfo(workflow_id="order-42", run_id="run-1", workflow_type="checkout")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class ActivityBoom(Exception):
    """Raised by fake activities to make them fail."""


class Sim:
    """Plays the control plane for one run: applies commands, produces their outcomes.

    Outcomes of commands wait in ``pending`` (keyed by command id) until released into the
    history, so a test decides what arrives when and in which order.
    """

    def __init__(
        self,
        wf: Callable[..., Any],
        input: Any = None,
        *,
        activities: dict[str, Callable[[Any], Any]] | None = None,
        children: dict[str, Callable[[Any], Any]] | None = None,
        info: WorkflowInfo = INFO,
        registry: Registry | None = None,
    ) -> None:
        self.wf = wf
        self.info = info
        self.registry = registry
        self.activities = activities or {}
        self.children = children or {}
        self.events: list[dict[str, Any]] = [
            h.workflow_started(info.workflow_type, info.workflow_id, info.run_id, input)
        ]
        self.clock = T0
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.tasks: list[list[Command]] = []
        self.completed = False

    def history(self) -> list[HistoryEvent]:
        return [
            HistoryEvent.of(i, e, time=T0 + timedelta(seconds=i))
            for i, e in enumerate(self.events, start=1)
        ]

    def replay(self) -> ReplayResult:
        return replay(
            self.wf, self.history(), info=self.info, now=self.clock, registry=self.registry
        )

    def step(self) -> list[Command]:
        """Run one workflow task and apply its commands, as the control plane would."""
        result = self.replay()
        self.events.append(h.workflow_task_completed("worker-1", self.clock))
        for command in result.commands:
            self.events.append(command.to_event())
            self._apply(command)
        self.tasks.append(result.commands)
        self.completed = result.completed
        self.clock += timedelta(seconds=10)
        return result.commands

    def _apply(self, command: Command) -> None:
        if isinstance(command, ScheduleActivity):
            fn = self.activities.get(command.activity_type)
            out: list[dict[str, Any]] = [h.activity_started(command.activity_id, 1, "w")]
            try:
                value = (
                    fn(command.input)
                    if fn is not None
                    else f"{command.activity_type}({command.input})"
                )
            except Exception as exc:
                error = h.error_info(type(exc).__name__, str(exc), traceback="tb")
                out.append(h.activity_failed(command.activity_id, error, 1, will_retry=True))
                out.append(h.activity_failed(command.activity_id, error, 2, will_retry=False))
            else:
                out.append(h.activity_completed(command.activity_id, value, 1))
            self.pending[command.activity_id] = out
        elif isinstance(command, StartTimer):
            self.pending[command.timer_id] = [h.timer_fired(command.timer_id)]
        elif isinstance(command, CancelTimer):
            self.pending.pop(command.timer_id, None)
        elif isinstance(command, StartChildWorkflow):
            fn = self.children.get(command.workflow_type)
            try:
                value = fn(command.input) if fn is not None else f"child:{command.input}"
            except Exception as exc:
                error = h.error_info(type(exc).__name__, str(exc))
                event = h.child_workflow_failed(command.child_id, error)
            else:
                event = h.child_workflow_completed(command.child_id, value)
            self.pending[command.child_id] = [event]

    def release(self, *ids: str) -> None:
        for command_id in ids:
            self.events.extend(self.pending.pop(command_id))

    def release_all(self) -> None:
        for command_id in sorted(self.pending, key=int):
            self.release(command_id)

    def signal(self, name: str, value: Any) -> None:
        self.events.append(h.signal_received(name, value))

    def cancel(self, reason: str = "user asked") -> None:
        self.events.append(h.workflow_cancel_requested(reason))

    def run(self, max_tasks: int = 200) -> dict[str, Any]:
        """Alternate workflow tasks and releases until the workflow ends; return its last event."""
        for _ in range(max_tasks):
            self.step()
            if self.completed:
                self.check_replays()
                return self.events[-1]
            self.release_all()
        raise AssertionError("the workflow did not finish")

    def check_replays(self) -> None:
        """Replaying the whole recorded history again must add nothing."""
        again = self.replay()
        assert again.commands == []
        assert again.completed == self.completed


def commands_of(sim: Sim) -> list[list[str]]:
    return [[c.describe() for c in task] for task in sim.tasks]


# ------------------------------------------------------------------------------------ basics


async def three_in_a_row(ctx: WorkflowContext, n: int) -> list[Any]:
    a = await ctx.execute_activity("double", n)
    b = await ctx.execute_activity("double", a)
    c = await ctx.execute_activity("describe", b)
    return [a, b, c]


def test_sequential_activities_each_get_their_own_task() -> None:
    sim = Sim(three_in_a_row, 3, activities={"double": lambda x: 2 * x})
    final = sim.run()
    assert final == h.workflow_completed([6, 12, "describe(12)"])
    assert commands_of(sim) == [
        ["ScheduleActivity(id=1, type=double)"],
        ["ScheduleActivity(id=2, type=double)"],
        ["ScheduleActivity(id=3, type=describe)"],
        ["CompleteWorkflow()"],
    ]
    scheduled = [e for e in sim.events if e["type"] == h.ACTIVITY_SCHEDULED]
    assert [e["input"] for e in scheduled] == [3, 6, 12]


def test_workflow_waiting_on_recorded_commands_issues_nothing_new() -> None:
    sim = Sim(three_in_a_row, 1)
    sim.step()
    result = sim.replay()
    assert result.commands == []
    assert not result.completed
    assert result.seen_sequence == len(sim.events)


async def gather_coroutines(ctx: WorkflowContext, _: None) -> list[Any]:
    return await ctx.gather(
        ctx.execute_activity("a", 1), ctx.execute_activity("b", 2), ctx.execute_activity("c", 3)
    )


def test_gather_of_coroutines_schedules_in_argument_order_and_keeps_it() -> None:
    sim = Sim(gather_coroutines)
    assert [c.describe() for c in sim.step()] == [
        "ScheduleActivity(id=1, type=a)",
        "ScheduleActivity(id=2, type=b)",
        "ScheduleActivity(id=3, type=c)",
    ]
    sim.release("3")
    assert sim.step() == []
    sim.release("1", "2")
    assert sim.step() == [CompleteWorkflow(["a(1)", "b(2)", "c(3)"])]
    sim.check_replays()


async def handles_awaited_backwards(ctx: WorkflowContext, _: None) -> list[Any]:
    handles = [ctx.start_activity("step", i) for i in range(3)]
    assert [hd.activity_id for hd in handles] == ["1", "2", "3"]
    results = [await hd for hd in reversed(handles)]
    return [await handles[0], *results]


def test_activity_handles_issue_at_call_time() -> None:
    sim = Sim(handles_awaited_backwards)
    assert len(sim.step()) == 3
    sim.release("1")
    assert sim.step() == []  # still waiting on handle 3
    final = sim.run()
    assert final["result"] == ["step(0)", "step(2)", "step(1)", "step(0)"]


async def fan_out(ctx: WorkflowContext, n: int) -> int:
    results = await ctx.gather(*(ctx.execute_activity("square", i) for i in range(n)))
    assert results == [i * i for i in range(n)]
    return sum(results)


def test_hundred_way_fan_out_completes_in_any_order() -> None:
    sim = Sim(fan_out, 100, activities={"square": lambda x: x * x})
    started = time.perf_counter()
    first = sim.step()
    assert [c.command_id for c in first] == [str(i) for i in range(1, 101)]
    ids = [str(i) for i in range(100, 0, -1)]
    for chunk in range(0, 100, 7):
        sim.release(*ids[chunk : chunk + 7])
        sim.step()
        if sim.completed:
            break
    assert sim.events[-1] == h.workflow_completed(sum(i * i for i in range(100)))
    sim.check_replays()
    assert time.perf_counter() - started < 5


async def gather_handles_and_children(ctx: WorkflowContext, _: None) -> list[Any]:
    handle = ctx.start_activity("first")

    async def branch(tag: str) -> str:
        await ctx.sleep(1)
        return str(await ctx.execute_activity("leaf", tag))

    return await ctx.gather(handle, branch("x"), branch("y"))


def test_gather_mixes_handles_and_coroutines() -> None:
    sim = Sim(gather_handles_and_children)
    final = sim.run()
    assert final["result"] == ["first(None)", "leaf(x)", "leaf(y)"]
    assert commands_of(sim)[:2] == [
        [
            "ScheduleActivity(id=1, type=first)",
            "StartTimer(id=2, seconds=1.0)",
            "StartTimer(id=3, seconds=1.0)",
        ],
        ["ScheduleActivity(id=4, type=leaf)", "ScheduleActivity(id=5, type=leaf)"],
    ]


async def gather_first_failure(ctx: WorkflowContext, _: None) -> Any:
    async def slow() -> str:
        await ctx.sleep(5)
        await ctx.execute_activity("after_sleep")
        return "slow"

    try:
        await ctx.gather(slow(), ctx.execute_activity("bad"))
    except ActivityError as exc:
        await ctx.sleep(10)
        return f"caught {exc.error_type}"
    return "no failure"


def test_gather_raises_first_failure_while_others_keep_running() -> None:
    sim = Sim(gather_first_failure, activities={"bad": _boom})
    assert [c.describe() for c in sim.step()] == [
        "StartTimer(id=1, seconds=5.0)",
        "ScheduleActivity(id=2, type=bad)",
    ]
    sim.release("2")
    assert [c.describe() for c in sim.step()] == ["StartTimer(id=3, seconds=10.0)"]
    sim.release("1")  # the abandoned branch still runs and issues its activity
    assert [c.describe() for c in sim.step()] == ["ScheduleActivity(id=4, type=after_sleep)"]
    final = sim.run()
    assert final == h.workflow_completed("caught ActivityBoom")


def test_gather_of_nothing_and_of_non_awaitables() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> Any:
        assert await ctx.gather() == []
        await ctx.gather(ctx.execute_activity("never"), 42)  # type: ignore[arg-type]

    sim = Sim(wf)
    sim.step()
    event = sim.events[-1]
    assert event["type"] == h.WORKFLOW_FAILED
    assert event["error"]["type"] == "everruns.errors.InvalidArgument"
    assert "int" in event["error"]["message"]
    assert sim.tasks == [[sim.tasks[0][0]]]  # the closed coroutine issued nothing


def _boom(_input: Any) -> Any:
    raise ActivityBoom("card declined")


# ------------------------------------------------------------------------------------ timers


async def sleeper(ctx: WorkflowContext, _: None) -> list[str]:
    before = ctx.now()
    await ctx.sleep(0)  # no command
    await ctx.sleep(30)
    return [before.isoformat(), ctx.now().isoformat()]


def test_sleep_is_a_durable_timer_and_now_advances_with_tasks() -> None:
    sim = Sim(sleeper)
    assert sim.step() == [StartTimer("1", 30.0)]
    sim.release("1")
    assert sim.step() == [
        CompleteWorkflow([T0.isoformat(), (T0 + timedelta(seconds=10)).isoformat()])
    ]
    sim.check_replays()


def test_negative_sleep_fails_the_workflow() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> None:
        await ctx.sleep(-1)

    sim = Sim(wf)
    sim.step()
    assert sim.events[-1]["type"] == h.WORKFLOW_FAILED
    assert sim.events[-1]["error"]["type"] == "everruns.errors.InvalidArgument"
    assert sim.events[-1]["error"]["non_retryable"] is True


def test_a_sleep_longer_than_100_years_fails_the_workflow() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> None:
        await ctx.sleep(1e13)  # the control plane could not store the timer

    sim = Sim(wf)
    sim.step()
    assert sim.events[-1]["type"] == h.WORKFLOW_FAILED
    assert sim.events[-1]["error"]["type"] == "everruns.errors.InvalidArgument"
    assert "100 years" in sim.events[-1]["error"]["message"]


# ----------------------------------------------------------------------------------- signals


async def two_approvals(ctx: WorkflowContext, _: None) -> list[Any]:
    first = await ctx.wait_signal("approve")
    second = await ctx.wait_signal("approve")
    return [first, second]


def test_signals_sent_before_the_wait_are_buffered_in_arrival_order() -> None:
    async def busy_then_two_approvals(ctx: WorkflowContext, _: None) -> list[Any]:
        await ctx.execute_activity("busy")
        return await two_approvals(ctx, None)

    sim = Sim(busy_then_two_approvals)
    sim.step()
    sim.signal("approve", {"by": "ann"})  # arrive while the activity runs
    sim.signal("other", 0)
    sim.signal("approve", {"by": "bob"})
    assert sim.step() == []
    sim.release("1")
    assert sim.step() == [CompleteWorkflow([{"by": "ann"}, {"by": "bob"}])]
    sim.check_replays()


def test_signals_after_the_wait_wake_it() -> None:
    sim = Sim(two_approvals)
    assert sim.step() == []
    sim.signal("approve", 1)
    assert sim.step() == []
    sim.signal("approve", 2)
    sim.signal("approve", 3)  # left buffered
    assert sim.step() == [CompleteWorkflow([1, 2])]
    sim.check_replays()


async def approval_with_timeout(ctx: WorkflowContext, _: None) -> Any:
    try:
        return await ctx.wait_signal("approve", timeout=3600)
    except TimeoutError as exc:
        return f"timeout: {exc}"


def test_wait_signal_timeout_fires() -> None:
    sim = Sim(approval_with_timeout)
    assert sim.step() == [StartTimer("1", 3600.0)]
    sim.release("1")
    assert sim.step() == [CompleteWorkflow("timeout: no signal 'approve' arrived within 3600 s")]
    sim.check_replays()


def test_wait_signal_won_by_the_signal_cancels_its_timer() -> None:
    sim = Sim(approval_with_timeout)
    sim.step()
    sim.signal("approve", "yes")
    fired = sim.pending["1"]
    assert sim.step() == [CancelTimer("1"), CompleteWorkflow("yes")]
    # A timer_fired the control plane recorded before applying the cancel is harmless.
    sim.events.extend(fired)
    assert sim.replay().commands == []


def test_wait_signal_timer_and_signal_in_one_batch_first_event_wins() -> None:
    sim = Sim(approval_with_timeout)
    sim.step()
    sim.release("1")
    sim.signal("approve", "late")
    assert sim.step() == [CompleteWorkflow("timeout: no signal 'approve' arrived within 3600 s")]


def test_wait_signal_with_buffered_signal_starts_no_timer_and_zero_timeout_polls() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> list[Any]:
        await ctx.execute_activity("busy")
        got = await ctx.wait_signal("s", timeout=60)
        try:
            await ctx.wait_signal("s", timeout=0)
        except TimeoutError:
            return [got, "empty"]
        return [got, "not empty"]

    sim = Sim(wf)
    sim.step()
    sim.signal("s", 7)  # arrives while the activity runs: buffered
    sim.release("1")
    assert sim.step() == [CompleteWorkflow([7, "empty"])]


def test_events_are_delivered_one_at_a_time() -> None:
    # The workflow runs until blocked after each event, so a signal recorded right after
    # workflow_started (in the same batch) arrives while the wait is already blocked.
    sim = Sim(approval_with_timeout)
    sim.signal("approve", "early")
    assert sim.step() == [StartTimer("1", 3600.0), CancelTimer("1"), CompleteWorkflow("early")]
    sim.check_replays()


# --------------------------------------------------------------------------- child workflows


async def parent(ctx: WorkflowContext, _: None) -> list[Any]:
    ok = await ctx.execute_child_workflow("ship", {"box": 1})
    try:
        await ctx.execute_child_workflow("ship_broken", 2, workflow_id="custom-id")
    except ChildWorkflowError as exc:
        return [ok, exc.child_id, exc.error_type]
    return [ok]


def test_child_workflows_results_and_failures() -> None:
    def broken(_: Any) -> Any:
        raise ValueError("no truck")

    sim = Sim(parent, children={"ship_broken": broken})
    assert sim.step() == [StartChildWorkflow("1", "ship", "run-1/1", {"box": 1})]
    final = sim.run()
    assert final == h.workflow_completed(["child:{'box': 1}", "2", "ValueError"])
    started = [e for e in sim.events if e["type"] == h.CHILD_WORKFLOW_STARTED]
    assert [e["workflow_id"] for e in started] == ["run-1/1", "custom-id"]


def test_activity_and_workflow_kinds_are_not_confused() -> None:
    registry = Registry()

    @activity(registry=registry)
    async def charge(_ctx: Any, _x: Any) -> None: ...

    async def wf(ctx: WorkflowContext, _: None) -> None:
        await ctx.execute_child_workflow(charge)

    sim = Sim(wf)
    sim.step()
    assert "ctx.execute_activity" in sim.events[-1]["error"]["message"]


# ------------------------------------------------------------------------ failures & errors


async def catches_failure(ctx: WorkflowContext, _: None) -> dict[str, Any]:
    try:
        await ctx.execute_activity("charge", {"amount": 5})
    except ActivityError as exc:
        return {
            "type": exc.error_type,
            "attempt": exc.attempt,
            "activity": exc.activity_type,
            "id": exc.activity_id,
            "message": str(exc),
        }
    return {}


def test_activity_failure_is_an_activity_error_in_workflow_code() -> None:
    sim = Sim(catches_failure, activities={"charge": _boom})
    final = sim.run()
    assert final["result"] == {
        "type": "ActivityBoom",
        "attempt": 2,
        "activity": "charge",
        "id": "1",
        "message": "activity 'charge' (id 1) failed after 2 attempt(s): ActivityBoom: card declined",
    }


def test_timed_out_and_cancelled_activities_raise() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> list[str]:
        out = []
        for name in ("a", "b"):
            try:
                await ctx.execute_activity(name)
            except ActivityError as exc:
                out.append(f"{type(exc).__name__}:{exc.error_type}:{exc.details}")
        return out

    sim = Sim(wf)
    sim.step()
    sim.events.append(h.activity_timed_out("1", "start_to_close", 1, will_retry=True))
    assert sim.step() == []
    sim.events.append(h.activity_timed_out("1", "start_to_close", 2, will_retry=False))
    sim.step()
    sim.events.append(h.activity_cancelled("2"))
    sim.step()
    assert sim.events[-1]["result"] == [
        "ActivityError:ActivityTimeout:{'kind': 'start_to_close'}",
        "ActivityCancelled:ActivityCancelled:{}",
    ]


def test_uncaught_failure_fails_the_workflow_with_a_traceback() -> None:
    sim = Sim(three_in_a_row, 1, activities={"double": _boom})
    final = sim.run()
    assert final["type"] == h.WORKFLOW_FAILED
    error = final["error"]
    assert error["type"] == "everruns.errors.ActivityError"
    assert error["non_retryable"] is True
    assert "three_in_a_row" in error["traceback"]
    assert "card declined" in error["message"]


def test_non_json_result_fails_the_workflow() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> Any:
        return {1, 2}

    sim = Sim(wf)
    sim.step()
    assert sim.events[-1]["type"] == h.WORKFLOW_FAILED
    assert sim.events[-1]["error"]["type"] == "everruns.errors.PayloadError"


def test_non_json_activity_input_is_refused_in_workflow_code() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> str:
        try:
            await ctx.execute_activity("a", {"when": datetime(2024, 1, 1)})
        except TypeError as exc:
            return str(exc)
        return "accepted"

    sim = Sim(wf)
    assert sim.step()[0] == CompleteWorkflow(
        "input of activity 'a'['when'] is of type datetime.datetime, which is not "
        "JSON-serializable; convert it to dict/list/str/int/float/bool/None"
    )


# ------------------------------------------------------------------------------ cancellation


async def cancellable(ctx: WorkflowContext, _: None) -> Any:
    try:
        await ctx.execute_activity("long_job")
    except WorkflowCancelled:
        assert ctx.cancel_requested
        await ctx.execute_activity("cleanup")
        raise
    return "finished"


def test_cancellation_raises_at_the_await_and_cleanup_still_runs() -> None:
    sim = Sim(cancellable)
    sim.step()
    sim.cancel()
    assert [c.describe() for c in sim.step()] == ["ScheduleActivity(id=2, type=cleanup)"]
    sim.release("2")
    assert sim.step() == [CancelWorkflow()]
    # The abandoned activity's late outcome is recorded after the end; replay ignores it.
    sim.release("1")
    sim.check_replays()
    assert sim.replay().cancel_requested


def test_cancellation_reaches_every_blocked_coroutine_and_cancels_timers() -> None:
    seen: list[str] = []

    async def wf(ctx: WorkflowContext, _: None) -> Any:
        async def sleeper() -> None:
            try:
                await ctx.sleep(100)
            except WorkflowCancelled:
                seen.append("sleeper")
                raise

        async def waiter() -> None:
            try:
                await ctx.wait_signal("never", timeout=50)
            except WorkflowCancelled:
                seen.append("waiter")
                raise

        try:
            await ctx.gather(sleeper(), waiter())
        except WorkflowCancelled:
            seen.append("main")
            return "cleaned up"
        return "not cancelled"

    sim = Sim(wf)
    assert [c.describe() for c in sim.step()] == [
        "StartTimer(id=1, seconds=100.0)",
        "StartTimer(id=2, seconds=50.0)",
    ]
    sim.cancel()
    seen.clear()
    # The gather waits for the children it was interrupted with (as a Trio nursery does):
    # they cancel their timers, then the main coroutine sees the cancellation and returns.
    assert sim.step() == [CancelTimer("1"), CancelTimer("2"), CompleteWorkflow("cleaned up")]
    assert seen == ["sleeper", "waiter", "main"]


def test_cancel_requested_while_sleeping_children_unwind_in_creation_order() -> None:
    seen: list[str] = []

    async def wf(ctx: WorkflowContext, _: None) -> Any:
        async def child(tag: str) -> None:
            try:
                await ctx.sleep(5)
            except WorkflowCancelled:
                seen.append(tag)
                await ctx.execute_activity("undo", tag)
                raise

        handle_a = ctx.start_activity("blocker")
        results = ctx.gather(child("x"), child("y"))
        try:
            await results
        except WorkflowCancelled:
            seen.append("main")
            await handle_a
            raise

    sim = Sim(wf)
    sim.step()
    sim.cancel()
    seen.clear()
    assert [c.describe() for c in sim.step()] == [
        "CancelTimer(id=2)",
        "ScheduleActivity(id=4, type=undo)",
        "CancelTimer(id=3)",
        "ScheduleActivity(id=5, type=undo)",
    ]
    # The main coroutine goes on once its children have finished undoing.
    assert seen == ["x", "y"]
    sim.release("4")
    seen.clear()
    assert sim.step() == [] and seen == ["x", "y"]
    sim.release("5")
    seen.clear()
    assert sim.step() == [] and seen == ["x", "y", "main"]
    sim.release("1")
    assert sim.step() == [CancelWorkflow()]
    sim.check_replays()


# -------------------------------------------------------------------------- non-determinism


def _recorded(wf: Callable[..., Any], tasks: int, **kwargs: Any) -> Sim:
    sim = Sim(wf, **kwargs)
    for _ in range(tasks):
        sim.step()
        sim.release_all()
    return sim


def _replay_with(sim: Sim, other: Callable[..., Any]) -> str:
    with pytest.raises(NonDeterminismError) as caught:
        replay(other, sim.history(), info=INFO, now=sim.clock)
    message = str(caught.value)
    assert "checkout" in message and "order-42" in message
    return message


async def v1(ctx: WorkflowContext, _: None) -> None:
    await ctx.execute_activity("a")
    await ctx.execute_activity("b")
    await ctx.wait_signal("never")


def test_changed_activity_type_is_detected() -> None:
    async def v2(ctx: WorkflowContext, _: None) -> None:
        await ctx.execute_activity("a")
        await ctx.execute_activity("c")

    message = _replay_with(_recorded(v1, 2), v2)
    seq = _seq_of(_recorded(v1, 2), h.ACTIVITY_SCHEDULED, 1)
    assert (
        f"history has activity_scheduled(id=2, type=b) at seq {seq}, "
        "replay issued ScheduleActivity(id=2, type=c)"
    ) in message


def test_swapped_order_is_detected() -> None:
    async def v2(ctx: WorkflowContext, _: None) -> None:
        await ctx.execute_activity("b")
        await ctx.execute_activity("a")

    message = _replay_with(_recorded(v1, 2), v2)
    assert "history has activity_scheduled(id=1, type=a) at seq 3, " in message
    assert "replay issued ScheduleActivity(id=1, type=b)" in message


def test_timer_instead_of_activity_is_detected() -> None:
    async def v2(ctx: WorkflowContext, _: None) -> None:
        await ctx.sleep(3)

    message = _replay_with(_recorded(v1, 1), v2)
    assert "activity_scheduled(id=1, type=a) at seq 3" in message
    assert "StartTimer(id=1, seconds=3.0)" in message


def test_extra_command_is_detected() -> None:
    async def v2(ctx: WorkflowContext, _: None) -> None:
        ctx.start_activity("a")
        await ctx.execute_activity("extra")

    message = _replay_with(_recorded(v1, 1), v2)
    assert "history has no command event after seq 3" in message
    assert "replay issued ScheduleActivity(id=2, type=extra)" in message


def test_missing_command_is_detected() -> None:
    async def v2(ctx: WorkflowContext, _: None) -> None:
        await ctx.wait_signal("never")

    message = _replay_with(_recorded(v1, 1), v2)
    assert "history has activity_scheduled(id=1, type=a) at seq 3, replay issued no command" in (
        message
    )


def test_changed_timer_duration_is_detected() -> None:
    async def short(ctx: WorkflowContext, _: None) -> None:
        await ctx.sleep(5)

    async def longer(ctx: WorkflowContext, _: None) -> None:
        await ctx.sleep(6)

    message = _replay_with(_recorded(short, 1), longer)
    assert (
        "timer_started(id=1, seconds=5.0) at seq 3, replay issued StartTimer(id=1, seconds=6.0)"
        in (message)
    )


def test_different_result_but_same_commands_is_not_an_error() -> None:
    async def returns_two(ctx: WorkflowContext, _: None) -> int:
        return 2

    async def returns_three(ctx: WorkflowContext, _: None) -> int:
        return 3

    sim = _recorded(returns_two, 1)
    assert replay(returns_three, sim.history(), info=INFO, now=T0).completed


def _seq_of(sim: Sim, event_type: str, index: int) -> int:
    return [e.sequence_num for e in sim.history() if e.type == event_type][index]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda ev: ev.append(h.activity_completed("9", 1, 1)),
            r"issued no recorded activity with id '9'",
        ),
        (lambda ev: ev.append(h.timer_fired("1")), r"command 1 is a activity, not a timer"),
        (lambda ev: ev.append(h.activity_completed("1", 1, 1)), r"had already ended"),
        (lambda ev: ev.append({"type": "mystery"}), r"unknown type 'mystery'"),
        (
            lambda ev: ev.append(h.workflow_started("checkout", "order-42", "run-1", None)),
            r"second workflow_started",
        ),
        (lambda ev: ev.insert(0, h.signal_received("x", 1)), r"starts with signal_received"),
        (
            lambda ev: ev.append(h.timer_started("7", 1)),
            r"no command event after seq|replay issued no command",
        ),
        (
            lambda ev: ev.__delitem__(slice(2, None)),
            r"replay issued ScheduleActivity\(id=1, type=a\)",
        ),
        (
            lambda ev: ev.__setitem__(0, h.workflow_started("checkout", "other", "run-1", None)),
            r"workflow_id='other'",
        ),
    ],
    ids=[
        "unknown-id",
        "wrong-kind",
        "double-completion",
        "unknown-event-type",
        "second-start",
        "no-start",
        "stray-command",
        "history-ends-after-marker",
        "other-run",
    ],
)
def test_corrupt_histories_are_refused(
    mutate: Callable[[list[dict[str, Any]]], None], expected: str
) -> None:
    sim = _recorded(v1, 1)  # started, marker, scheduled(1), started, completed(1)
    sim.events = sim.events[:5]
    mutate(sim.events)
    with pytest.raises(NonDeterminismError, match=expected):
        sim.replay()


def test_sequence_gaps_and_empty_histories_are_refused() -> None:
    sim = _recorded(v1, 1)
    events = sim.history()
    gapped = [
        events[0],
        *(HistoryEvent(e.sequence_num + 1, e.type, e.data, e.time) for e in events[1:]),
    ]
    with pytest.raises(NonDeterminismError, match="without gaps"):
        replay(v1, gapped, info=INFO, now=T0)
    with pytest.raises(NonDeterminismError, match="empty"):
        replay(v1, [], info=INFO, now=T0)
    with pytest.raises(InvalidArgument, match="naive"):
        replay(v1, events, info=INFO, now=datetime(2024, 1, 1))


# ---------------------------------------------------------------------------- illegal awaits


class FakeAsyncioFuture:
    """Awaits like an asyncio future: yields itself to whoever drives the coroutine."""

    _asyncio_future_blocking = False

    def __await__(self) -> Any:
        self._asyncio_future_blocking = True
        yield self
        return None


class Opaque:
    def __await__(self) -> Any:
        yield "something"


async def awaits_trio_sleep(ctx: WorkflowContext, _: None) -> None:
    await ctx.execute_activity("fine")
    await trio.sleep(1)


def _illegal(wf: Callable[..., Any]) -> str:
    sim = Sim(wf)
    started = time.perf_counter()
    with pytest.raises(IllegalAwait) as caught:
        for _ in range(3):
            sim.step()
            sim.release_all()
    assert time.perf_counter() - started < 2
    return str(caught.value)


async def test_awaiting_trio_sleep_inside_trio_is_an_illegal_await() -> None:
    with trio.fail_after(5):
        message = _illegal(awaits_trio_sleep)
        # Trio's run was hidden from the workflow: this Trio task still works normally.
        with trio.move_on_after(0.01) as scope:
            await trio.sleep(1)
        assert scope.cancelled_caught
    # Said as outside Trio (below): the replay hides the caller's run from workflow code.
    assert "called trio.sleep() in awaits_trio_sleep at " in message
    assert "ctx.sleep(seconds)" in message
    assert "checkout" in message


def test_awaiting_trio_sleep_outside_trio_is_an_illegal_await() -> None:
    message = _illegal(awaits_trio_sleep)
    assert "called trio.sleep() in awaits_trio_sleep at " in message
    assert "ctx.sleep(seconds)" in message


async def test_trio_events_and_checkpoints_are_illegal_too() -> None:
    async def waits_event(ctx: WorkflowContext, _: None) -> None:
        await trio.Event().wait()

    async def checkpoints(ctx: WorkflowContext, _: None) -> None:
        await trio.lowlevel.checkpoint()

    message = _illegal(waits_event)
    assert "awaited trio.Event.wait()" in message and "ctx.execute_activity" in message
    assert "awaited trio.checkpoint()" in _illegal(checkpoints)


def test_awaiting_an_asyncio_future_is_an_illegal_await() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> None:
        await FakeAsyncioFuture()

    message = _illegal(wf)
    assert "an asyncio future (FakeAsyncioFuture)" in message
    assert "ctx.execute_activity(...)" in message


def test_asyncio_sleep_without_loop_is_an_illegal_await() -> None:
    import asyncio

    async def wf(ctx: WorkflowContext, _: None) -> None:
        await asyncio.sleep(1)

    message = _illegal(wf)
    assert "asyncio.sleep()" in message and "ctx.sleep(seconds)" in message


def test_awaiting_an_unknown_object_names_its_type() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> None:
        async def helper() -> None:
            await Opaque()

        await ctx.gather(helper())

    message = _illegal(wf)
    assert "an object of type builtins.str" in message
    assert "helper" in message


def test_illegal_await_is_not_catchable_by_workflow_code() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> str:
        try:
            await FakeAsyncioFuture()
        except Exception:
            return "swallowed"
        return "passed"

    _illegal(wf)


# --------------------------------------------------------------- where the replay runs
# The worker replays short histories (and decisions made ahead) on its Trio task and long ones
# in a thread; workflow code must meet the same thing either way, and never the calling task.


def _started(*events: dict[str, Any]) -> list[HistoryEvent]:
    data = [h.workflow_started(INFO.workflow_type, INFO.workflow_id, INFO.run_id, None), *events]
    return [HistoryEvent.of(i, e, time=T0) for i, e in enumerate(data, start=1)]


def _outcome(wf: Callable[..., Any], history: list[HistoryEvent]) -> ReplayResult | Exception:
    """What a worker's replay of ``history`` answers: a result, or the error it raised."""
    replayer = Replayer(wf, info=INFO)
    try:
        return replayer.replay(history, now=T0)
    except Exception as exc:
        return exc
    finally:
        replayer.close()


async def uses_a_trio_cancel_scope(ctx: WorkflowContext, _: None) -> Any:
    with trio.move_on_after(3600):
        return await ctx.execute_activity("charge")
    return "timed out"


async def test_a_trio_cancel_scope_in_workflow_code_is_refused_and_the_calling_task_untouched() -> (
    None
):
    """Inline, the workflow's ``trio.move_on_after`` used to be entered on the calling task and
    stay open while the replay was kept for the run's next task; in a thread it was refused."""
    history = _started()
    threaded = await trio.to_thread.run_sync(_outcome, uses_a_trio_cancel_scope, history)
    assert isinstance(threaded, IllegalAwait)

    before = trio.current_effective_deadline()
    replayer = Replayer(uses_a_trio_cancel_scope, info=INFO)
    try:
        try:
            inline: ReplayResult | Exception = replayer.replay(history, now=T0)
        except Exception as exc:
            inline = exc
        deadline_after = trio.current_effective_deadline()
    finally:
        replayer.close()
    assert deadline_after == before
    assert isinstance(inline, IllegalAwait), f"inline replay answered {inline!r}"
    assert str(inline) == str(threaded)
    assert "called trio.CancelScope.__enter__() in uses_a_trio_cancel_scope at " in str(inline)


async def catches_what_trio_raises(ctx: WorkflowContext, _: None) -> str:
    try:
        await trio.sleep(1)
    except Exception:
        return "fallback"
    return "slept"


async def catches_everything_trio_raises(ctx: WorkflowContext, _: None) -> str:
    try:
        with trio.move_on_after(1):
            await ctx.sleep(1)
    except BaseException:
        return "fallback"
    return "slept"


@pytest.mark.parametrize(
    ("wf", "call"),
    [
        (catches_what_trio_raises, "trio.sleep()"),
        (catches_everything_trio_raises, "trio.CancelScope.__enter__()"),
    ],
)
async def test_a_trio_call_caught_by_workflow_code_is_still_an_illegal_await_inline_and_in_a_thread(
    wf: Callable[..., Any], call: str
) -> None:
    """In a thread, ``except Exception`` around ``trio.sleep`` used to let the workflow go on
    ("fallback"), where inline the same code was an IllegalAwait."""
    history = _started()
    inline = _outcome(wf, history)
    threaded = await trio.to_thread.run_sync(_outcome, wf, history)
    assert isinstance(inline, IllegalAwait), f"inline replay answered {inline!r}"
    assert isinstance(threaded, IllegalAwait), f"threaded replay answered {threaded!r}"
    assert str(inline) == str(threaded)
    assert f"called {call} in {wf.__name__} at " in str(inline)


async def interrupted_midway(ctx: WorkflowContext, _: None) -> Any:
    signal.raise_signal(signal.SIGINT)  # as if Ctrl-C came while this code ran
    return await ctx.execute_activity("after")


def test_ctrl_c_during_an_inline_replay_reaches_the_trio_run_at_its_next_checkpoint() -> None:
    """Trio's SIGINT handler reads the current task, which the replay hides: it must defer the
    interrupt to the run, not raise it (or a refusal) in the middle of workflow code."""
    answers: list[Any] = []

    async def main() -> None:
        answers.append(_outcome(interrupted_midway, _started()))
        await trio.sleep(1)
        answers.append("slept")

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    assert len(answers) == 1 and isinstance(answers[0], ReplayResult), answers
    assert [c.describe() for c in answers[0].commands] == ["ScheduleActivity(id=1, type=after)"]


class CustomExit(BaseException):
    """A BaseException of the workflow's own."""


@pytest.mark.parametrize(
    ("raised", "type_name"),
    [
        (SystemExit(3), "SystemExit"),
        (GeneratorExit(), "GeneratorExit"),
        (CustomExit("bye"), f"{__name__}.CustomExit"),
    ],
)
def test_a_base_exception_from_workflow_code_fails_the_workflow(
    raised: BaseException, type_name: str
) -> None:
    """It used to escape replay() (the driver caught Exception only) and, in the worker, the
    task nursery: every worker that claimed the task went down. Only Ctrl-C goes on."""

    async def exits(ctx: WorkflowContext, _: None) -> None:
        await ctx.sleep(1)
        raise raised

    history = _started(
        h.workflow_task_completed("w", T0), h.timer_started("1", 1), h.timer_fired("1")
    )
    result = replay(exits, history, info=INFO, now=T0)
    assert result.completed
    (failed,) = result.commands
    assert isinstance(failed, FailWorkflow)
    assert failed.error["type"] == type_name
    assert "in exits" in failed.error["traceback"]

    async def interrupted(ctx: WorkflowContext, _: None) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replay(interrupted, _started(), info=INFO, now=T0)


@pytest.mark.parametrize(
    "cancelled",
    [asyncio.CancelledError, trio.Cancelled._create],
    ids=["asyncio.CancelledError", "trio.Cancelled"],
)
def test_an_event_loops_cancellation_raised_in_workflow_code_is_an_illegal_await(
    cancelled: Callable[[], BaseException],
) -> None:
    """Workflow code is never run by a loop, so a loop's cancellation raised in it comes from
    loop use (it used to escape the replay like any BaseException)."""

    async def raises(ctx: WorkflowContext, _: None) -> None:
        await ctx.sleep(1)
        raise cancelled()

    history = _started(
        h.workflow_task_completed("w", T0), h.timer_started("1", 1), h.timer_fired("1")
    )
    with pytest.raises(IllegalAwait, match="Cancel"):
        replay(raises, history, info=INFO, now=T0)


def test_a_base_exception_while_the_workflow_is_discarded_does_not_escape_close() -> None:
    """Closing the replay (a kept one, in the worker's cache) used to let it escape."""

    async def exits_on_close(ctx: WorkflowContext, _: None) -> None:
        try:
            await ctx.wait_signal("never")
        finally:
            raise SystemExit("from a finally block")

    result = replay(exits_on_close, _started(), info=INFO, now=T0)
    assert result.commands == [] and not result.completed


# ---------------------------------------------------------------------- determinism of ctx


def test_random_uuid_and_now_are_stable_across_replays() -> None:
    seen: list[tuple[Any, ...]] = []

    async def wf(ctx: WorkflowContext, _: None) -> list[Any]:
        values = []
        for _round in range(3):
            values.append([ctx.random(), str(ctx.uuid4()), ctx.now().isoformat()])
            seen.append((ctx.is_replaying, *values[-1]))
            await ctx.execute_activity("tick", values[-1][1])
        return values

    sim = Sim(wf)
    final = sim.run()
    values = final["result"]
    assert len({v[1] for v in values}) == 3
    assert all(0 <= v[0] < 1 for v in values)
    assert [v[2] for v in values] == [
        (T0 + timedelta(seconds=10 * i)).isoformat() for i in range(3)
    ]
    # Every later replay re-saw exactly the values of the first time, flagged as replaying.
    for recorded in (tuple(v) for v in values):
        matches = [s for s in seen if s[1:] == recorded]
        assert matches[0][0] is False
        assert all(m[0] is True for m in matches[1:])
    other = Sim(wf, info=WorkflowInfo("order-42", "run-2", "checkout"))
    assert other.run()["result"][0][0] != values[0][0]


def test_is_replaying_only_for_recorded_batches() -> None:
    flags: list[bool] = []

    async def wf(ctx: WorkflowContext, _: None) -> None:
        flags.append(ctx.is_replaying)
        await ctx.sleep(1)
        flags.append(ctx.is_replaying)

    sim = Sim(wf)
    sim.step()
    sim.release_all()
    flags.clear()
    sim.step()
    assert flags == [True, False]


# ------------------------------------------------------------------ leftover coroutines


def test_blocked_coroutines_are_closed_without_warnings_or_commands() -> None:
    async def wf(ctx: WorkflowContext, _: None) -> None:
        try:
            await ctx.wait_signal("never")
        finally:
            await ctx.execute_activity("cleanup")  # must not become a command on close

    sim = Sim(wf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sim.step() == []
        gc.collect()
    assert sim.replay().commands == []


# ------------------------------------------------------------------------ activity options


def test_activity_options_come_from_registration_and_call() -> None:
    registry = Registry()

    @activity(registry=registry, start_to_close_timeout=30, priority=3, breaker_key="payments")
    async def charge(_ctx: Any, _x: Any) -> None: ...

    async def wf(ctx: WorkflowContext, _: None) -> None:
        ctx.start_activity(charge, retry=RetryPolicy(max_attempts=2), priority=7)
        ctx.start_activity("charge", heartbeat_timeout=5)
        ctx.start_activity("unregistered")
        await ctx.wait_signal("never")

    sim = Sim(wf, registry=registry)
    first, second, third = sim.step()
    assert isinstance(first, ScheduleActivity)
    assert first.options == ActivityOptions(
        retry=RetryPolicy(max_attempts=2),
        start_to_close_timeout=30,
        priority=7,
        breaker_key="payments",
    )
    assert isinstance(second, ScheduleActivity)
    assert second.options == ActivityOptions(
        start_to_close_timeout=30, heartbeat_timeout=5, priority=3, breaker_key="payments"
    )
    assert isinstance(third, ScheduleActivity)
    assert third.options == ActivityOptions()


# -------------------------------------------------------------------------------- commands


ALL_COMMANDS: list[Command] = [
    ScheduleActivity(
        "1",
        "charge",
        {"n": 10**30, "f": 0.1},
        ActivityOptions(
            retry=RetryPolicy(max_attempts=3, non_retryable_error_types=("ValueError",)),
            schedule_to_start_timeout=60,
            start_to_close_timeout=1.5,
            heartbeat_timeout=2,
            priority=-4,
            breaker_key="k",
        ),
    ),
    ScheduleActivity("2", "plain", None),
    StartTimer("3", 2.5),
    CancelTimer("3"),
    StartChildWorkflow("4", "ship", None, [1, 2]),
    StartChildWorkflow("5", "ship", "given", None),
    CompleteWorkflow({"ok": True}),
    FailWorkflow(h.error_info("ValueError", "bad", traceback="tb", non_retryable=True)),
    CancelWorkflow(),
]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.describe())
def test_commands_round_trip_through_the_wire(command: Command) -> None:
    wire = json.loads(json.dumps(command.to_dict()))
    assert command_from_dict(wire) == command
    event = command.to_event()
    assert event["type"] in h.COMMAND_EVENT_TYPES
    assert HistoryEvent.of(1, event, time=T0).type == event["type"]
    assert is_terminal(command) == (event["type"] in h.TERMINAL_EVENT_TYPES)


def test_command_events_have_the_documented_fields() -> None:
    fields = {
        h.ACTIVITY_SCHEDULED: {"activity_id", "activity_type", "input", "options"},
        h.TIMER_STARTED: {"timer_id", "seconds"},
        h.TIMER_CANCELLED: {"timer_id"},
        h.CHILD_WORKFLOW_STARTED: {"child_id", "workflow_type", "workflow_id", "input"},
        h.WORKFLOW_COMPLETED: {"result"},
        h.WORKFLOW_FAILED: {"error"},
        h.WORKFLOW_CANCELLED: set(),
    }
    for command in ALL_COMMANDS:
        event = command.to_event()
        assert set(event) - {"type"} == fields[event["type"]]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ActivityOptions(start_to_close_timeout=0), "start_to_close_timeout"),
        (lambda: ActivityOptions(heartbeat_timeout=-1), "heartbeat_timeout"),
        (lambda: ActivityOptions(schedule_to_start_timeout=float("inf")), "schedule_to_start"),
        (lambda: ActivityOptions(priority=True), "priority"),
        (lambda: ActivityOptions(breaker_key=""), "breaker_key"),
        (lambda: ActivityOptions(retry={"max_attempts": 1}), "retry"),  # type: ignore[arg-type]
        (lambda: StartTimer("1", 0), "seconds"),
        (lambda: StartTimer("1", float("nan")), "seconds"),
        (lambda: ScheduleActivity("", "x", None), "activity_id"),
        (lambda: FailWorkflow({"type": "X"}), "message"),
        (lambda: command_from_dict({"type": "launch_rocket"}), "launch_rocket"),
        (lambda: command_from_dict({"type": "start_timer", "timer_id": "1"}), "seconds"),
        (lambda: command_from_dict({"type": "cancel_timer", "timer_id": "1", "x": 1}), "'x'|x"),
        (lambda: command_from_dict([]), "JSON object"),  # type: ignore[arg-type]
        (lambda: ActivityOptions.from_dict({"priorty": 1}), "priorty"),
        # What PostgreSQL cannot store: a NUL in a name, an int4 overflow.
        (lambda: ScheduleActivity("1", "wo\x00rk", None), "activity_type"),
        (lambda: ScheduleActivity("1\x00", "work", None), "activity_id"),
        (lambda: ActivityOptions(breaker_key="k\x00"), "breaker_key"),
        (lambda: StartTimer("\x00", 1), "timer_id"),
        (lambda: CancelTimer("\x00"), "timer_id"),
        (lambda: StartChildWorkflow("\x00", "kid", None, None), "child_id"),
        (lambda: StartChildWorkflow("1", "kid\x00", None, None), "workflow_type"),
        (lambda: StartChildWorkflow("1", "kid", "id\x00", None), "workflow_id"),
        (lambda: StartChildWorkflow("1", "kid", " ", None), "workflow_id"),
        (lambda: StartChildWorkflow("1", "kid", "x" * 513, None), "workflow_id"),
        (lambda: command_from_dict({"type": "cancel_timer", "timer_id": 7}), "timer_id"),
        (
            lambda: ActivityOptions.from_dict({"retry": {"max_attempts": 2**31}}),
            "max_attempts",
        ),
    ],
)
def test_malformed_commands_are_invalid_arguments(build: Callable[[], Any], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field) as info:
        build()
    assert "\n" not in str(info.value)


def _scheduled(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "schedule_activity",
        "activity_id": "1",
        "activity_type": "a",
        "options": options,
    }


# Every duration a command carries, as the control plane receives it: the wire form of a
# command with that duration set to ``s``.
WIRE_DURATIONS: dict[str, Callable[[float], dict[str, Any]]] = {
    "seconds": lambda s: {"type": "start_timer", "timer_id": "1", "seconds": s},
    "schedule_to_start_timeout": lambda s: _scheduled({"schedule_to_start_timeout": s}),
    "start_to_close_timeout": lambda s: _scheduled({"start_to_close_timeout": s}),
    "heartbeat_timeout": lambda s: _scheduled({"heartbeat_timeout": s}),
    "initial_interval": lambda s: _scheduled(
        {"retry": {"initial_interval": s, "maximum_interval": s}}
    ),
    "maximum_interval": lambda s: _scheduled(
        {"retry": {"initial_interval": 1e-3, "maximum_interval": s}}
    ),
}


@given(
    st.sampled_from(sorted(WIRE_DURATIONS)),
    st.one_of(
        st.floats(min_value=1e-3, max_value=MAX_SECONDS),
        st.floats(min_value=MAX_SECONDS),  # infinity included
        st.floats(max_value=0.0),
        st.just(math.nan),
    ),
)
def test_a_duration_is_accepted_from_0_to_100_years_and_else_refused_by_name(
    field: str, seconds: float
) -> None:
    """Up to 100 years (`MAX_SECONDS`), a timer, timeout or retry interval fits PostgreSQL's
    intervals; past it the insert would fail as INTERNAL, which workers retry without end."""
    wire = WIRE_DURATIONS[field](seconds)
    if 0 < seconds <= MAX_SECONDS:
        command = command_from_dict(wire)
        assert command_from_dict(json.loads(json.dumps(command.to_dict()))) == command
    else:
        with pytest.raises(InvalidArgument, match=field) as info:
            command_from_dict(wire)
        assert "\n" not in str(info.value)


def test_history_event_validation_and_description() -> None:
    with pytest.raises(InvalidArgument, match="says type"):
        HistoryEvent(1, h.TIMER_FIRED, {"type": h.TIMER_STARTED}, T0)
    with pytest.raises(InvalidArgument, match="sequence_num"):
        HistoryEvent.of(0, h.timer_fired("1"), time=T0)
    with pytest.raises(InvalidArgument, match="string 'type'"):
        HistoryEvent.of(1, {"timer_id": "1"}, time=T0)
    assert HistoryEvent.of(4, h.timer_started("2", 3), time=T0).describe() == (
        "timer_started(id=2, seconds=3.0)"
    )
    assert h.parse_time(h.format_time(T0)) == T0
    assert h.parse_time("2024-05-01T12:00:00") == T0
    with pytest.raises(InvalidArgument):
        h.format_time(datetime(2024, 1, 1))
    assert re.fullmatch(r"\d{4}-.*\+00:00", h.workflow_task_completed("w", T0)["time"])


def test_a_ctx_kept_from_an_earlier_replay_is_refused() -> None:
    kept: list[WorkflowContext] = []
    handles: list[ActivityHandle] = []

    async def keeps(ctx: WorkflowContext, _: None) -> None:
        kept.append(ctx)
        handles.append(ctx.start_activity("a"))
        await ctx.wait_signal("never")

    Sim(keeps).step()
    stale = kept[0]

    async def awaits_stale_handle(ctx: WorkflowContext, _: None) -> None:
        await handles[0]

    assert "an operation of another workflow's ctx" in _illegal(awaits_stale_handle)

    async def uses_stale_wait(ctx: WorkflowContext, _: None) -> None:
        await stale.wait_signal("x")

    async def uses_stale_command(ctx: WorkflowContext, _: None) -> None:
        stale.start_activity("a")

    assert "after its replay ended" in _illegal(uses_stale_wait)
    assert "after its replay ended" in _illegal(uses_stale_command)
