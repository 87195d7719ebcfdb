"""Sync activities and stopping a worker: KeyboardInterrupt from a sync activity's thread, sync
threads abandoned by a stop or a cancel, the last progress sent before a release, sync
activities claimed only with a free thread. Found by a review in session 18 (of the worker's
slots, backpressure and activities); each test failed before its fix, because of the defect
its docstring names."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain import payload
from everruns.domain.registry import Registry, activity, workflow
from everruns.domain.retry import RetryPolicy
from everruns.server import ServerConfig, serve
from everruns.worker import ActivityContext, Worker
from tests.integration.test_worker import (
    FakeControlPlane,
    activity_task,
    fake_control_plane,
    make_worker,
    running,
)


async def test_a_sync_activity_raising_keyboard_interrupt_fails_its_attempt_not_the_worker() -> (
    None
):
    """A KeyboardInterrupt raised in a sync activity's thread can only be the activity's own
    (Python delivers Ctrl-C to the main thread only), yet `_call_activity` treats it as the
    worker's (`_ours`): the task is *released* as at a shutdown (no attempt spent) and
    `Worker.run` dies. The next worker claims the task and dies the same way, forever."""
    reg = Registry()

    @activity(registry=reg)
    def interrupts(ctx: ActivityContext, _: Any) -> None:
        raise KeyboardInterrupt  # e.g. a library's "abort" path, or a wrapped CLI tool

    @activity(registry=reg)
    async def fine(ctx: ActivityContext, _: Any) -> str:
        return "fine"

    fake = FakeControlPlane()
    crashed: list[BaseException] = []
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            worker = make_worker(reg, port)
            try:
                async with running(worker):
                    bad = activity_task("interrupts")
                    fake.push(bad)
                    await fake.wait_for(lambda: bool(fake.failures_of(bad.task_id)))
                    after = activity_task("fine")
                    fake.push(after)
                    with trio.move_on_after(2):
                        await fake.wait_for(lambda: after.task_id in fake.completed)
            except BaseException as exc:  # KeyboardInterrupt, or a group holding it
                crashed.append(exc)
    (report,) = fake.failures_of(bad.task_id)
    assert not crashed and not report.release, (
        f"a sync activity raising KeyboardInterrupt in its thread ended Worker.run with "
        f"{crashed[0] if crashed else None!r}, and its attempt was reported with "
        f"release={report.release} (released uncharged, as at a shutdown): a poison task that "
        "kills every worker it reaches"
    )
    assert fake.completed.get(after.task_id) == "fine"


@pytest.mark.parametrize("how", ["shutdown", "cancel"])
async def test_a_sync_activity_ignoring_cancel_requested_does_not_hold_up_the_stop(
    how: str,
) -> None:
    """`Worker.shutdown` promises: running tasks get the grace period, then the rest are
    cancelled and released to another worker at once; cancelling `Worker.run` is "an
    immediate stop" (and the CLI's second signal "stops it at once"). A sync activity that
    does not poll ``ctx.cancel_requested`` (any blocking call: a slow HTTP request, a
    subprocess) keeps `trio.to_thread.run_sync` (not abandonable) waiting: the task is not
    released, its lease is kept alive by the worker's heartbeats, and `Worker.run` does not
    return until the thread does - the grace period (or the stop) means nothing."""
    reg = Registry()
    gate = threading.Event()
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    @activity(registry=reg)
    def blocking(ctx: ActivityContext, _: Any) -> str:
        token.run_sync_soon(started.set)
        gate.wait(20)  # a blocking call that knows nothing of ctx.cancel_requested
        return "late"

    fake = FakeControlPlane()
    released_in_time = stopped_in_time = False
    try:
        with trio.fail_after(30):
            async with fake_control_plane(fake) as port:
                worker = make_worker(reg, port, grace_period=0.3)
                done = trio.Event()

                stop = trio.CancelScope()

                async def run_worker(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    with stop:
                        await worker.run(task_status=task_status)
                    done.set()

                async with trio.open_nursery() as nursery:
                    await nursery.start(run_worker)
                    fake.push(activity_task("blocking"))
                    await started.wait()
                    if how == "shutdown":
                        worker.shutdown()
                    else:
                        stop.cancel()
                    with trio.move_on_after(3):
                        await fake.wait_for(lambda: bool(fake.failed))
                        released_in_time = True
                    with trio.move_on_after(0.5):
                        await done.wait()
                        stopped_in_time = True
                    gate.set()  # let the thread go, so that the worker can stop
    finally:
        gate.set()
    assert released_in_time and stopped_in_time, (
        f"3 s after {how} (grace period 0.3 s), a sync activity blocked in its "
        f"thread had {'' if released_in_time else 'not '}been released to another worker and "
        f"Worker.run had {'' if stopped_in_time else 'not '}returned: the drain waits for the "
        "thread however long it takes"
    )


async def test_progress_recorded_before_a_shutdown_reaches_the_attempt_it_is_released_to() -> None:
    """An activity records progress (``ctx.heartbeat(details)``) and is still running when the
    grace period ends: it is released to another worker, whose attempt should resume from
    that progress (``ctx.heartbeat_details``). The heartbeat scheduler sends details at most
    once per ``min_gap`` (1 s by default), so those recorded within the last gap are pending
    when the grace period ends, and `_final_activity_report` releases the task without them
    (the ordinary failure path, `_fail_activity`, sends them first: `_send_last_details`).
    The next attempt redoes work the released one had recorded as done."""
    reg = Registry()
    recorded = trio.Event()

    @activity(registry=reg)
    async def resumable(ctx: ActivityContext, _: Any) -> None:
        for step in range(1, 4):
            ctx.heartbeat({"step": step})  # the first goes out at once; the others wait
            await trio.sleep(0.05)
        recorded.set()
        await trio.sleep_forever()

    fake = FakeControlPlane(heartbeat_interval=10)
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            worker = make_worker(reg, port, grace_period=0.2)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                task = activity_task("resumable")
                fake.push(task)
                await recorded.wait()
                worker.shutdown()
    (release,) = fake.failures_of(task.task_id)
    assert release.release
    sent = [payload.decode(h.details) for h in fake.task_heartbeats if h.task_id == task.task_id]
    assert sent and sent[-1] == {"step": 3}, (
        f"the activity recorded {{'step': 3}} before the grace period ended, but the details "
        f"that reached the control plane before its release were {sent}: the attempt it is "
        "released to resumes from stale progress"
    )


@pytest.mark.db
async def test_sync_activities_waiting_for_a_thread_do_not_time_out_before_they_start(
    database_url: str,
) -> None:
    """``max_sync_threads`` below ``max_concurrent_tasks`` (a documented `Worker` option): the
    worker claims as many sync activities as it has slots, and those beyond its threads wait
    for one *after* the claim, under a lease the worker keeps alive, while the control
    plane's start-to-close clock (from the claim) runs. Two activities of 1.5 s each, with a
    start-to-close timeout of 2.5 s, on a worker with 2 slots and 1 thread: the second
    waits 1.5 s for the thread, runs 1.5 s, and times out having run less than its limit.
    The claim should not exceed what the worker can start (DESIGN section 8: waiting tasks
    held by a worker was a defect of the original)."""
    registry = Registry()
    runs: list[int] = []

    @activity(registry=registry)
    def slow_sync(ctx: ActivityContext, n: int) -> int:
        runs.append(n)
        time.sleep(1.5)
        return n

    @workflow(registry=registry)
    async def two_at_once(ctx: Any, _: Any) -> Any:
        return await ctx.gather(
            *(
                ctx.execute_activity(
                    slow_sync,
                    n,
                    start_to_close_timeout=2.5,
                    retry=RetryPolicy(max_attempts=1),
                )
                for n in range(2)
            )
        )

    outcome: Any = None
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
            worker = Worker(
                registry,
                address=info.address,
                max_concurrent_tasks=2,
                max_sync_threads=1,
                grace_period=5,
                poll_wait=1.0,
            )
            await nursery.start(worker.run)
            async with Client.connect(info.address) as client:
                handle = await client.start_workflow(two_at_once, None)
                try:
                    outcome = await handle.result(timeout=15)
                except Exception as exc:
                    outcome = exc
            worker.shutdown()
            nursery.cancel_scope.cancel()
    assert sorted(runs) == [0, 1]
    assert outcome == [0, 1], (
        f"two 1.5 s sync activities with a 2.5 s start-to-close timeout, on a worker with 2 "
        f"slots and 1 thread, ended {outcome!r}: the second was claimed, then waited for a "
        "thread while its start-to-close clock ran"
    )


async def test_an_abandoned_sync_thread_keeps_its_thread_and_its_heartbeats_are_ignored() -> None:
    """Added with the fix of the tests above: a cancelled sync activity that ignores
    ``ctx.cancel_requested`` is reported at once, while its thread runs on; the thread's later
    heartbeats reach nobody, and it keeps its place among ``max_sync_threads`` until it ends
    (the next sync activity is not claimed before)."""
    reg = Registry()
    gate = threading.Event()

    @activity(registry=reg)
    def stubborn(ctx: ActivityContext, _: Any) -> str:
        while not gate.wait(0.02):
            ctx.heartbeat({"still": "here"})  # never looks at ctx.cancel_requested
        return "late"

    @activity(registry=reg)
    def quick(ctx: ActivityContext, _: Any) -> str:
        return "quick"

    fake = FakeControlPlane()
    try:
        with trio.fail_after(10):
            async with fake_control_plane(fake) as port:
                worker = make_worker(reg, port, max_concurrent_tasks=2, max_sync_threads=1)
                async with running(worker):
                    first = activity_task("stubborn")
                    fake.cancel_on_heartbeat.add(first.task_id)
                    fake.push(first)
                    await fake.wait_for(lambda: bool(fake.failures_of(first.task_id)))
                    (report,) = fake.failures_of(first.task_id)
                    assert report.cancelled
                    beats = sum(h.task_id == first.task_id for h in fake.task_heartbeats)
                    second = activity_task("quick")
                    fake.push(second)
                    await trio.sleep(0.3)  # the abandoned thread heartbeats meanwhile
                    assert second.task_id not in fake.completed and fake.pending == [second]
                    assert sum(h.task_id == first.task_id for h in fake.task_heartbeats) == beats
                    assert worker.load == 0
                    gate.set()  # the thread ends: its place goes to the next sync activity
                    await fake.wait_for(lambda: second.task_id in fake.completed)
                    assert fake.completed[second.task_id] == "quick"
                    assert first.task_id not in fake.completed  # its result is dropped
    finally:
        gate.set()


@pytest.mark.db
async def test_a_thread_freed_by_a_failure_serves_a_sync_activity_before_the_long_poll_ends(
    database_url: str,
) -> None:
    """``max_sync_threads`` below ``max_concurrent_tasks``: while its only thread is busy, the
    worker's long poll leaves the sync types out. The thread's activity then fails (a retry
    is scheduled far ahead, so the failure wakes no workflow task, and the poll out gets
    nothing): the thread is free, no result call's claim refills it, and a sync activity
    already queued waited for the long poll to end (``poll_wait``, 10 s here) before a poll
    with the sync types claimed it. Found in session 19 ("Known limits")."""
    registry = Registry()
    gate = threading.Event()
    token = trio.lowlevel.current_trio_token()
    busy = trio.Event()
    failed_at: list[float] = []
    quick_at: list[float] = []
    quick_started = trio.Event()

    @activity(registry=registry)
    def fails_later(ctx: ActivityContext, _: Any) -> None:
        token.run_sync_soon(busy.set)
        gate.wait(20)
        failed_at.append(time.monotonic())
        raise ValueError("failed on purpose")

    @activity(registry=registry)
    def quick(ctx: ActivityContext, _: Any) -> str:
        quick_at.append(time.monotonic())
        token.run_sync_soon(quick_started.set)
        return "quick"

    @workflow(registry=registry)
    async def occupy(ctx: Any, _: Any) -> Any:
        later = RetryPolicy(max_attempts=2, initial_interval=60, maximum_interval=60)
        return await ctx.execute_activity(fails_later, None, retry=later)

    @workflow(registry=registry)
    async def queue_quick(ctx: Any, _: Any) -> Any:
        return await ctx.execute_activity(quick, None)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                info = await nursery.start(
                    serve, ServerConfig(database_url=database_url, grpc_port=0)
                )
                worker = Worker(
                    registry,
                    address=info.address,
                    max_concurrent_tasks=2,
                    max_sync_threads=1,
                    grace_period=1,
                    poll_wait=10.0,
                )
                await nursery.start(worker.run)
                async with Client.connect(info.address) as client:
                    await client.start_workflow(occupy, None)
                    await busy.wait()  # the only thread is taken
                    second = await client.start_workflow(queue_quick, None)
                    # Its workflow task schedules `quick`, in the control plane's state.
                    while not (await second.describe()).pending_activities:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    # The worker's next poll, without the sync types, goes out meanwhile.
                    await trio.sleep(0.5)
                    assert not quick_started.is_set()
                    gate.set()
                    with trio.move_on_after(5):
                        await quick_started.wait()
                worker.shutdown()
                nursery.cancel_scope.cancel()
    finally:
        gate.set()
    assert failed_at, "the first sync activity never failed"
    waited = quick_at[0] - failed_at[0] if quick_at else math.inf
    assert waited < 2.0, (
        f"a sync activity queued while the only thread was busy started {waited:.1f} s after "
        "that thread's activity failed (poll_wait 10 s): no poll with the sync types went out "
        "while the long poll sent without them was waiting"
    )
