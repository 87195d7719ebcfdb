"""Review of the worker (session 20): registration, heartbeats, poll loop, tasks, batching,
cancellation, drain. Each test here fails on the code under review because of the defect its
docstring names.
Mended in the commit that adds this file (ActivityContext keeps the details in flight).
"""

from __future__ import annotations

from typing import Any

import trio

from everruns.domain import payload
from everruns.domain.registry import Registry, activity
from everruns.errors import DatabaseUnavailable
from everruns.worker import ActivityContext
from tests.integration.test_worker import (
    FakeControlPlane,
    activity_task,
    fake_control_plane,
    make_worker,
    running,
)


class _HeartbeatLostInFlight(FakeControlPlane):
    """The first heartbeat carrying details is slow and then fails (a database hiccup under
    it): it is still in flight when the activity fails, and never recorded."""

    def __init__(self) -> None:
        super().__init__(heartbeat_interval=10)
        self.slow_heartbeat = trio.Event()
        self.failure_seen = trio.Event()

    async def record_heartbeat(self, request: Any) -> Any:
        if request.details and not self.slow_heartbeat.is_set():
            self.slow_heartbeat.set()
            with trio.move_on_after(2):
                await self.failure_seen.wait()
            raise DatabaseUnavailable("the database is restarting")
        return await super().record_heartbeat(request)

    async def fail_activity_task(self, request: Any) -> Any:
        self.failure_seen.set()
        return await super().fail_activity_task(request)


async def test_progress_whose_heartbeat_is_in_flight_when_the_activity_fails_is_sent_again() -> (
    None
):
    """An activity records progress (``ctx.heartbeat({"step": 5})``), the heartbeat scheduler
    sends it at once, and the activity fails while that RecordHeartbeat is still in flight.
    `_run_activity` removes the beat, which cancels the call; `_send_heartbeat` then puts the
    details back (``except trio.Cancelled: ctx._requeue_details``, "its report sends what this
    one may not have"). But the report runs first: `_fail_activity` -> `_send_last_details`
    takes the details synchronously right after `Heartbeats.remove`, before the cancelled
    heartbeat task has run and put them back, finds none, and sends FailActivityTask without
    them. The requeued details are never sent by anyone. The next attempt resumes from older
    progress (``ctx.heartbeat_details``), redoing work the failed attempt had recorded as done
    -- the very case `_send_last_details` exists for, lost whenever the failure comes within
    one RecordHeartbeat round trip of the heartbeat."""
    reg = Registry()

    @activity(registry=reg)
    async def resumable(ctx: ActivityContext, _: Any) -> None:
        ctx.heartbeat({"step": 5})
        await fake.slow_heartbeat.wait()  # the heartbeat with the details is in flight
        raise ValueError("crashed after recording progress")

    fake = _HeartbeatLostInFlight()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            task = activity_task("resumable")
            fake.push(task)
            await fake.wait_for(lambda: bool(fake.failures_of(task.task_id)))
            await trio.sleep(0.5)  # anything sent late still lands
    (failure,) = fake.failures_of(task.task_id)
    assert not failure.release and not failure.cancelled
    recorded = [
        payload.decode(h.details) for h in fake.task_heartbeats if h.task_id == task.task_id
    ]
    assert {"step": 5} in recorded, (
        "the activity recorded {'step': 5} and failed while the heartbeat carrying it was in "
        f"flight; the details recorded by the control plane were {recorded}: the next attempt "
        "resumes from older progress"
    )


class _HeartbeatLostAtRelease(FakeControlPlane):
    """The first heartbeat carrying details is slow and then fails: it is still in flight
    when the worker's grace period ends and the task is released."""

    def __init__(self) -> None:
        super().__init__(heartbeat_interval=10)
        self.slow_heartbeat = trio.Event()
        self.release_seen = trio.Event()

    async def record_heartbeat(self, request: Any) -> Any:
        if request.details and not self.slow_heartbeat.is_set():
            self.slow_heartbeat.set()
            with trio.move_on_after(2):
                await self.release_seen.wait()
            raise DatabaseUnavailable("the database is restarting")
        return await super().record_heartbeat(request)

    async def fail_activity_task(self, request: Any) -> Any:
        self.release_seen.set()
        return await super().fail_activity_task(request)


async def test_progress_whose_heartbeat_is_in_flight_at_the_end_of_the_grace_period_is_kept() -> (
    None
):
    """The same race on the stop path: an activity records progress, its heartbeat is in
    flight when the grace period ends, and `_final_activity_report` releases the task to
    another worker. `Heartbeats.remove` cancels the heartbeat call, whose task puts the
    details back only after `_send_last_details` (called synchronously after the removal)
    has looked for them and found none: the release goes without them, and the attempt it
    is released to resumes from older progress (what
    `test_progress_recorded_before_a_shutdown_reaches_the_attempt_it_is_released_to` fixed
    for details not yet sent, still lost for details being sent)."""
    reg = Registry()

    @activity(registry=reg)
    async def resumable(ctx: ActivityContext, _: Any) -> None:
        ctx.heartbeat({"step": 3})
        await trio.sleep_forever()

    fake = _HeartbeatLostAtRelease()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            worker = make_worker(reg, port, grace_period=0.1)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                task = activity_task("resumable")
                fake.push(task)
                await fake.slow_heartbeat.wait()
                worker.shutdown()
            await trio.sleep(0.3)
    (release,) = fake.failures_of(task.task_id)
    assert release.release
    recorded = [
        payload.decode(h.details) for h in fake.task_heartbeats if h.task_id == task.task_id
    ]
    assert {"step": 3} in recorded, (
        "the activity recorded {'step': 3} and its heartbeat was in flight when the grace "
        f"period ended; the details recorded by the control plane were {recorded}: the "
        "attempt it is released to resumes from older progress"
    )
