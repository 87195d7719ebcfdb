"""The worker over real gRPC: first against a scripted fake control plane (every protocol corner:
claims within capacity, heartbeats, cancellation, stale leases, outages, drain, release), then end
to end against the real control plane on a fresh database."""

from __future__ import annotations

import functools
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio.testing

from everruns._aio.grpc import open_channel, serve_services
from everruns._proto.everruns import v1 as pb
from everruns.domain import history, payload
from everruns.domain.registry import Registry, activity, workflow
from everruns.domain.retry import RetryPolicy
from everruns.errors import (
    NOT_SERVED_ERROR,
    DatabaseUnavailable,
    NonRetryableError,
    ResourceExhausted,
    StaleLease,
)
from everruns.server import ServerConfig, serve
from everruns.worker import ActivityContext, Worker
from everruns.worker.runtime import INLINE_REPLAY_EVENTS

# ------------------------------------------------------------------ scripted control plane


class FakeControlPlane:
    """A WorkerService that hands out the tasks a test pushes and records every report."""

    def __init__(self, *, heartbeat_interval: float = 0.2) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.pending: list[Any] = []
        self.eager: list[Any] = []
        self.registrations: list[Any] = []
        self.worker_heartbeats: list[Any] = []
        self.polls: list[int] = []
        self.task_heartbeats: list[Any] = []
        self.completed: dict[str, Any] = {}
        self.result_batches: list[int] = []  # results per CompleteActivityTasks call
        self.failed: list[Any] = []
        self.workflow_completions: list[Any] = []
        self.workflow_failures: list[Any] = []
        self.cancel_on_heartbeat: set[str] = set()
        self.stale: set[str] = set()
        self.unavailable_completions = 0
        self.cancel_send, self.cancel_recv = trio.open_memory_channel[Any](100)
        self._changed = trio.Event()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def push(self, *tasks: Any) -> None:
        self.pending.extend(tasks)
        self._poke()

    def failures_of(self, task_id: str) -> list[Any]:
        return [f for f in self.failed if f.task_id == task_id]

    # WorkerService, as Trio methods (see everruns._aio.grpc.serve_services)

    async def register_worker(self, request: Any) -> Any:
        self.registrations.append(request)
        self._poke()
        return pb.RegisterWorkerResponse(
            heartbeat_interval_s=self.heartbeat_interval, server_time=time.time()
        )

    async def worker_heartbeat(self, request: Any) -> Any:
        self.worker_heartbeats.append(request)
        self._poke()
        return pb.WorkerHeartbeatResponse(ok=True, known=True)

    async def poll_tasks(self, request: Any) -> Any:
        self.polls.append(request.max_tasks)
        with trio.move_on_after(request.wait_s):
            while not self.pending:
                await self._changed.wait()
        out, self.pending = self.pending[: request.max_tasks], self.pending[request.max_tasks :]
        for task in out:
            task.claimed_at = time.time()
        self._poke()
        return pb.PollTasksResponse(tasks=out)

    async def record_heartbeat(self, request: Any) -> Any:
        if request.task_id in self.stale:
            raise StaleLease(f"task {request.task_id} is held under another lease")
        self.task_heartbeats.append(request)
        self._poke()
        return pb.RecordHeartbeatResponse(
            cancel_requested=request.task_id in self.cancel_on_heartbeat
        )

    async def complete_activity_task(self, request: Any) -> Any:
        if self.unavailable_completions > 0:
            self.unavailable_completions -= 1
            raise DatabaseUnavailable("the database is restarting")
        if request.task_id in self.stale:
            raise StaleLease(f"task {request.task_id} is held under another lease")
        self.completed[request.task_id] = payload.decode(request.result)
        eager, self.eager = (
            self.eager[: request.max_eager_tasks],
            self.eager[request.max_eager_tasks :],
        )
        self._poke()
        return pb.CompleteActivityTaskResponse(accepted=True, eager_tasks=eager)

    async def complete_activity_tasks(self, request: Any) -> Any:
        if self.unavailable_completions > 0:
            self.unavailable_completions -= 1
            raise DatabaseUnavailable("the database is restarting")
        self.result_batches.append(len(request.results))
        outcomes = []
        for result in request.results:
            if result.task_id in self.stale:
                outcomes.append(
                    pb.ActivityResultOutcome(
                        refused_status="FAILED_PRECONDITION",
                        message=f"task {result.task_id} is held under another lease",
                    )
                )
            else:
                self.completed[result.task_id] = payload.decode(result.result)
                outcomes.append(pb.ActivityResultOutcome(accepted=True))
        handed, self.eager = (
            self.eager[: request.max_new_tasks],
            self.eager[request.max_new_tasks :],
        )
        self._poke()
        return pb.CompleteActivityTasksResponse(outcomes=outcomes, new_tasks=handed)

    async def fail_activity_task(self, request: Any) -> Any:
        self.failed.append(request)
        self._poke()
        return pb.FailActivityTaskResponse(will_retry=not request.non_retryable)

    async def complete_workflow_task(self, request: Any) -> Any:
        self.workflow_completions.append(request)
        self._poke()
        return pb.CompleteWorkflowTaskResponse(accepted=True)

    async def complete_workflow_tasks(self, request: Any) -> Any:
        self.workflow_completions.extend(request.completions)
        self._poke()
        return pb.CompleteWorkflowTasksResponse(
            outcomes=[pb.WorkflowTaskOutcome(accepted=True) for _ in request.completions]
        )

    async def fail_workflow_task(self, request: Any) -> Any:
        self.workflow_failures.append(request)
        self._poke()
        return pb.FailWorkflowTaskResponse()

    async def stream_cancellations(self, request: Any, send: Callable[[Any], Any]) -> None:
        await send(pb.Cancellation(keepalive=True))  # as the control plane does at once
        async for cancellation in self.cancel_recv:
            await send(cancellation)


@asynccontextmanager
async def fake_control_plane(fake: FakeControlPlane, port: int = 0) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            functools.partial(serve_services, [(pb.WorkerServiceBase(), fake)], "127.0.0.1", port)
        )
        yield bound
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[trio.CancelScope]:
    """Run ``worker`` for the block; the yielded scope stops it at once when cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        yield nursery.cancel_scope
        worker.shutdown()


_ids = iter(range(1, 1_000_000))


def activity_task(
    activity_type: str,
    value: Any = None,
    *,
    heartbeat_timeout: float = 0.0,
    attempt: int = 1,
    details: Any = None,
) -> Any:
    n = next(_ids)
    return pb.Task(
        task_id=f"task-{n}",
        kind="activity",
        lease_token=100 + n,
        workflow_id=f"wf-{n}",
        run_id=f"run-{n}",
        workflow_type="wf",
        activity_type=activity_type,
        activity_id="1",
        input=payload.encode(value),
        attempt=attempt,
        max_attempts=3,
        heartbeat_timeout_s=heartbeat_timeout,
        heartbeat_details=b"" if details is None else payload.encode(details),
    )


def workflow_task(workflow_type: str, events: list[dict[str, Any]]) -> Any:
    n = next(_ids)
    return pb.Task(
        task_id=f"task-{n}",
        kind="workflow",
        lease_token=100 + n,
        workflow_id="wf-1",
        run_id="run-1",
        workflow_type=workflow_type,
        attempt=1,
        max_attempts=1,
        history=[
            pb.HistoryEvent(
                sequence_num=i, type=e["type"], data=payload.encode(e), time=1_700_000_000.0 + i
            )
            for i, e in enumerate(events, start=1)
        ],
    )


def make_worker(registry: Registry, port: int, **kw: Any) -> Worker:
    kw.setdefault("grace_period", 5.0)
    kw.setdefault("poll_wait", 1.0)
    return Worker(registry, address=f"127.0.0.1:{port}", worker_id="test-worker", **kw)


# ------------------------------------------------------------------------------ activities


async def test_async_and_sync_activities_complete_with_exact_results() -> None:
    reg = Registry()
    threads: list[str] = []

    @activity(registry=reg)
    async def double(ctx: ActivityContext, n: int) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"n": n * 2, "attempt": ctx.attempt, "id": ctx.info.activity_id}

    @activity(registry=reg)
    def blocking(ctx: ActivityContext, text: str) -> list[Any]:
        threads.append(threading.current_thread().name)
        time.sleep(0.05)
        return [text, 2**70, 0.1, None]

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            a, b = activity_task("double", 21), activity_task("blocking", "héllo")
            fake.push(a, b)
            await fake.wait_for(lambda: len(fake.completed) == 2)
    assert fake.completed[a.task_id] == {"n": 42, "attempt": 1, "id": "1"}
    assert fake.completed[b.task_id] == ["héllo", 2**70, 0.1, None]
    assert threads and threads[0] != threading.main_thread().name
    registration = fake.registrations[0]
    assert sorted(registration.activity_types) == ["blocking", "double"]
    assert registration.worker_id == "test-worker" and registration.max_concurrency == 10


async def test_results_ready_together_are_reported_in_one_call_and_refill_the_slots() -> None:
    """Group commit: activities that finish while a report is in flight go out together in
    the next call; the tasks the reply hands back run in the slots the finished ones freed."""
    reg = Registry()
    release = trio.Event()

    @activity(registry=reg)
    async def gated(ctx: ActivityContext, n: int) -> int:
        if n > 0:
            await release.wait()
        return n

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            first, rest = activity_task("gated", 0), [activity_task("gated", n) for n in (1, 2, 3)]
            fake.push(*rest)
            await fake.wait_for(lambda: not fake.pending)
            await trio.sleep(0.1)  # the three are running, waiting for the release
            follow_up = [activity_task("gated", 0) for _ in range(2)]
            fake.eager = list(follow_up)
            release.set()
            fake.push(first)
            await fake.wait_for(lambda: len(fake.completed) == 6)
    assert sum(fake.result_batches) == 6
    assert len(fake.result_batches) < 6, fake.result_batches  # some shared a call
    assert max(fake.result_batches) >= 2
    assert {fake.completed[t.task_id] for t in rest} == {1, 2, 3}
    assert all(fake.completed[t.task_id] == 0 for t in follow_up)


async def test_failures_are_reported_with_type_traceback_and_retryability() -> None:
    reg = Registry()

    @activity(registry=reg)
    async def broken(ctx: ActivityContext, _: Any) -> None:
        raise ValueError("bad input 7")

    @activity(registry=reg)
    async def fatal(ctx: ActivityContext, _: Any) -> None:
        raise NonRetryableError("card declined")

    @activity(registry=reg)
    async def weird(ctx: ActivityContext, _: Any) -> Any:
        return {"ids": {1, 2}}

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            tasks = [activity_task(t) for t in ("broken", "fatal", "weird", "nobody")]
            fake.push(*tasks)
            await fake.wait_for(lambda: len(fake.failed) == 4)
    by_id = {f.task_id: f for f in fake.failed}
    errors = {t.activity_type: payload.decode(by_id[t.task_id].error) for t in tasks}
    flags = {t.activity_type: by_id[t.task_id].non_retryable for t in tasks}
    assert errors["broken"]["type"] == "builtins.ValueError"
    assert errors["broken"]["message"] == "bad input 7"
    assert "in broken" in errors["broken"]["traceback"]
    assert flags == {"broken": False, "fatal": True, "weird": True, "nobody": False}
    assert errors["fatal"]["non_retryable"] is True
    assert "set" in errors["weird"]["message"]
    # A type it does not serve is given back to the queue for another worker, not failed.
    assert "nobody" in errors["nobody"]["message"]
    assert errors["nobody"]["type"] == NOT_SERVED_ERROR
    assert [t.activity_type for t in tasks if by_id[t.task_id].release] == ["nobody"]
    assert not fake.completed


async def test_cancellation_pushed_on_the_stream_reaches_the_activity_within_a_second() -> None:
    reg = Registry()
    started = trio.Event()
    cleaned_up: list[float] = []

    @activity(registry=reg)
    async def wait_forever(ctx: ActivityContext, _: Any) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cleaned_up.append(trio.current_time())

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            task = activity_task("wait_forever")
            fake.push(task)
            await started.wait()
            # A cancellation for another lease of the same task is ignored.
            await fake.cancel_send.send(
                pb.Cancellation(task_id=task.task_id, lease_token=1, reason="old lease")
            )
            await fake.cancel_send.send(pb.Cancellation(keepalive=True))
            await trio.sleep(0.2)
            assert not cleaned_up
            sent = trio.current_time()
            await fake.cancel_send.send(
                pb.Cancellation(
                    task_id=task.task_id, lease_token=task.lease_token, reason="workflow cancelled"
                )
            )
            await fake.wait_for(lambda: bool(fake.failed))
            assert trio.current_time() - sent < 1.0
    assert cleaned_up and cleaned_up[0] - sent < 1.0
    (report,) = fake.failed
    assert report.cancelled and not report.release
    assert "workflow cancelled" in payload.decode(report.error)["message"]


async def test_heartbeats_carry_details_and_a_cancel_reply_stops_the_activity() -> None:
    reg = Registry()
    cleaned_up = trio.Event()

    @activity(registry=reg)
    async def crunch(ctx: ActivityContext, _: Any) -> None:
        ctx.heartbeat({"step": (ctx.heartbeat_details or {}).get("step", 0) + 1})
        try:
            await trio.sleep_forever()
        finally:
            cleaned_up.set()

    fake = FakeControlPlane()
    with trio.fail_after(10):
        worker = functools.partial(make_worker, reg, grace_period=0.1)
        async with fake_control_plane(fake) as port, running(worker(port)):
            # heartbeat_timeout 30 s: the regular beat is 10 s away, so the detail below can
            # only have come from ctx.heartbeat() sending at once.
            task = activity_task("crunch", heartbeat_timeout=30.0, details={"step": 4})
            fake.push(task)
            await fake.wait_for(lambda: bool(fake.task_heartbeats))
            assert payload.decode(fake.task_heartbeats[0].details) == {"step": 5}
            assert fake.task_heartbeats[0].lease_token == task.lease_token

            quick = activity_task("crunch", heartbeat_timeout=0.3)
            fake.cancel_on_heartbeat.add(quick.task_id)
            fake.push(quick)
            await fake.wait_for(lambda: bool(fake.failures_of(quick.task_id)))
    assert fake.failures_of(quick.task_id)[0].cancelled


async def test_stale_lease_on_heartbeat_cancels_the_body_and_drops_the_task() -> None:
    reg = Registry()
    cleaned_up = trio.Event()

    @activity(registry=reg)
    async def long_job(ctx: ActivityContext, _: Any) -> str:
        try:
            await trio.sleep_forever()
        finally:
            cleaned_up.set()
        return "never"

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)) as _:
            task = activity_task("long_job", heartbeat_timeout=0.3)
            fake.stale.add(task.task_id)
            fake.push(task)
            await cleaned_up.wait()
            await trio.sleep(0.2)
    assert not fake.completed and not fake.failed


class _SizeLimitedHeartbeats(FakeControlPlane):
    """Refuses heartbeats whose details are over a size limit, as the real control plane does
    (RESOURCE_EXHAUSTED "... is too large")."""

    LIMIT = 100

    async def record_heartbeat(self, request: Any) -> Any:
        if len(request.details) > self.LIMIT:
            raise ResourceExhausted(
                f"heartbeat details is too large: {len(request.details)} bytes; the limit is "
                f"{self.LIMIT} bytes (EVERRUNS_MAX_PAYLOAD_BYTES)"
            )
        return await super().record_heartbeat(request)


async def test_heartbeat_details_refused_for_good_are_dropped_and_the_lease_still_renewed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Details the control plane will never take (too large) are dropped with a warning, not
    sent again with every later heartbeat: those go without them and renew the lease (else
    it is never renewed and the running activity is reclaimed as stale, to run twice)."""
    reg = Registry()

    @activity(registry=reg)
    async def crunch(ctx: ActivityContext, _: Any) -> str:
        ctx.heartbeat({"blob": "x" * 500})  # once, too large
        await trio.sleep(1.0)  # meanwhile the regular heartbeats keep the lease
        return "done"

    fake = _SizeLimitedHeartbeats()
    caplog.set_level(logging.WARNING, logger="everruns.worker")
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            task = activity_task("crunch", heartbeat_timeout=0.3)  # a beat every 0.1 s
            fake.push(task)
            await fake.wait_for(lambda: task.task_id in fake.completed)
    assert fake.task_heartbeats, "no heartbeat renewed the lease during a 1 s activity"
    (dropped,) = [r for r in caplog.records if "dropping the heartbeat details" in r.getMessage()]
    assert "crunch" in dropped.getMessage() and "too large" in dropped.getMessage()


async def test_a_finished_result_is_retried_until_the_control_plane_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = Registry()

    @activity(registry=reg)
    async def quick(ctx: ActivityContext, n: int) -> int:
        return n + 1

    fake = FakeControlPlane()
    fake.unavailable_completions = 3
    caplog.set_level(logging.WARNING, logger="everruns.worker")
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            task = activity_task("quick", 1)
            fake.push(task)
            await fake.wait_for(lambda: task.task_id in fake.completed)
    assert fake.completed[task.task_id] == 2
    retries = [r for r in caplog.records if "unreachable, retrying in" in r.getMessage()]
    assert len(retries) == 3


async def test_unreachable_control_plane_at_start_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = Registry()

    @activity(registry=reg)
    async def echo(ctx: ActivityContext, value: Any) -> Any:
        return value

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="everruns.worker")
    fake = FakeControlPlane()
    worker = make_worker(reg, port)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            ready, stopped = trio.Event(), trio.Event()

            async def run_worker() -> None:
                async with trio.open_nursery() as inner:
                    await inner.start(worker.run)
                    ready.set()
                stopped.set()

            nursery.start_soon(run_worker)
            await trio.sleep(0.8)
            assert not ready.is_set()
            assert any(
                f"127.0.0.1:{port} unreachable, retrying in" in r.getMessage()
                for r in caplog.records
            )
            async with fake_control_plane(fake, port):
                await ready.wait()
                task = activity_task("echo", "late")
                fake.push(task)
                await fake.wait_for(lambda: task.task_id in fake.completed)
                worker.shutdown()
                await stopped.wait()


async def test_claims_never_exceed_free_slots() -> None:
    reg = Registry()
    active = 0
    peak = 0

    @activity(registry=reg)
    async def slow(ctx: ActivityContext, _: Any) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await trio.sleep(0.05)
        active -= 1

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with (
            fake_control_plane(fake) as port,
            running(make_worker(reg, port, max_concurrent_tasks=2)),
        ):
            tasks = [activity_task("slow") for _ in range(8)]
            fake.push(*tasks)
            await fake.wait_for(lambda: len(fake.completed) == 8)
    assert peak == 2
    assert all(1 <= m <= 2 for m in fake.polls)
    assert max(h.current_load for h in fake.worker_heartbeats) <= 2


async def test_eager_tasks_from_a_completion_reply_are_run() -> None:
    reg = Registry()

    @activity(registry=reg)
    async def step(ctx: ActivityContext, n: int) -> int:
        return n * 10

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with (
            fake_control_plane(fake) as port,
            running(make_worker(reg, port, max_concurrent_tasks=1)),
        ):
            first, second = activity_task("step", 1), activity_task("step", 2)
            second.claimed_at = time.time()
            fake.eager = [second]
            fake.push(first)
            await fake.wait_for(lambda: len(fake.completed) == 2)
    assert fake.completed == {first.task_id: 10, second.task_id: 20}
    assert not fake.eager


class _DecisionsHeldBack(FakeControlPlane):
    """Holds each decision until the test says how to answer it: ``hand_back`` decides which
    of the activities the worker started ahead come back bound to their task (lease 500+)."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[Any] = []
        self.answer = trio.Event()
        self.hand_back = True
        self.leases: dict[str, int] = {}

    async def complete_workflow_tasks(self, request: Any) -> Any:
        self.decisions.extend(request.completions)
        self._poke()
        await self.answer.wait()
        outcomes = []
        for completion in request.completions:
            bound = []
            for n, started in enumerate(completion.started if self.hand_back else []):
                bound.append(
                    pb.Task(
                        task_id=started.task_id,
                        kind="activity",
                        lease_token=500 + n,
                        workflow_id="wf-1",
                        run_id="run-1",
                        workflow_type="ahead",
                        activity_type="act",
                        activity_id=started.activity_id,
                        input=payload.encode(7),
                        attempt=1,
                        max_attempts=5,
                        claimed_at=time.time(),
                    )
                )
            outcomes.append(pb.WorkflowTaskOutcome(accepted=True, eager_tasks=bound))
        return pb.CompleteWorkflowTasksResponse(outcomes=outcomes)

    async def complete_activity_tasks(self, request: Any) -> Any:
        for result in request.results:
            self.leases[result.task_id] = result.lease_token
        return await super().complete_activity_tasks(request)


def _ahead_registry(body: Callable[..., Any]) -> Registry:
    reg = Registry()

    @workflow(registry=reg)
    async def ahead(ctx: Any, n: int) -> Any:
        return await ctx.execute_activity("act", n)

    activity(name="act", registry=reg)(body)
    return reg


@asynccontextmanager
async def _ahead_worker(
    fake: _DecisionsHeldBack, act: Callable[..., Any], **kw: Any
) -> AsyncIterator[Worker]:
    """A worker of `_ahead_registry` (``act`` as its activity) running against ``fake``."""
    async with fake_control_plane(fake) as port:
        worker = make_worker(_ahead_registry(act), port, **kw)
        async with running(worker):
            yield worker


def _ahead_task(*, may_start: bool = True) -> Any:
    task = workflow_task(
        "ahead",
        [history.workflow_started("ahead", "wf-1", "run-1", 7), history.workflow_task_scheduled()],
    )
    task.may_start_activities = may_start
    return task


async def _started_ahead(fake: _DecisionsHeldBack, began: trio.Event) -> Any:
    """Hand the worker `_ahead_task`; once its activity has begun and its decision has
    arrived (held, unanswered), return the decision's one ``started`` entry."""
    fake.push(_ahead_task())
    await began.wait()
    await fake.wait_for(lambda: bool(fake.decisions))
    assert not fake.answer.is_set()  # it began before the decision was answered
    (started,) = fake.decisions[0].started
    return started


async def test_an_activity_starts_before_its_decision_is_answered_and_reports_once_bound() -> None:
    """The worker starts the activity a decision schedules while the decision is on its way
    (under a task id it chose, named in ``started``); the reply hands the task back with its
    lease, and the result goes out under that lease."""
    began = trio.Event()
    seen: list[Any] = []

    async def act(ctx: ActivityContext, n: int) -> int:
        seen.append(ctx.info)
        began.set()
        return n * 3

    fake = _DecisionsHeldBack()
    with trio.fail_after(10):
        async with _ahead_worker(fake, act):
            started = await _started_ahead(fake, began)
            assert started.activity_id == "1"
            assert fake.decisions[0].max_eager_tasks >= 2  # its slot counts among those offered
            fake.answer.set()
            await fake.wait_for(lambda: started.task_id in fake.completed)
    (info,) = seen
    assert (info.task_id, info.activity_id, info.attempt) == (started.task_id, "1", 1)
    assert info.workflow_id == "wf-1" and info.max_attempts == 5
    assert fake.completed == {started.task_id: 21}
    assert fake.leases == {started.task_id: 500}
    assert not fake.failed


async def test_an_activity_started_ahead_but_not_handed_back_is_cancelled_unreported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reply that does not hand the activity back (the decision was superseded, or its
    circuit breaker opened meanwhile) cancels it; nothing is reported for it, and its slot
    is free again."""
    began, ended = trio.Event(), trio.Event()

    async def act(ctx: ActivityContext, n: int) -> int:
        began.set()
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    fake = _DecisionsHeldBack()
    fake.hand_back = False
    with trio.fail_after(10):
        async with _ahead_worker(fake, act, max_concurrent_tasks=2) as worker:
            fake.push(_ahead_task())
            await began.wait()
            fake.answer.set()
            await ended.wait()
            await fake.wait_for(lambda: worker.load == 0)
            await trio.sleep(0.2)  # a report would have gone out by now
    assert not fake.completed and not fake.failed and not fake.task_heartbeats
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_cancellation_that_comes_before_the_lease_is_applied_when_it_does() -> None:
    """The control plane may push the cancellation of an activity started ahead before the
    decision's reply arrives: the worker keeps it and cancels the activity once it is bound,
    then reports it cancelled under its lease."""
    began = trio.Event()

    async def act(ctx: ActivityContext, n: int) -> int:
        began.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    fake = _DecisionsHeldBack()
    with trio.fail_after(10):
        async with _ahead_worker(fake, act):
            started = await _started_ahead(fake, began)
            await fake.cancel_send.send(
                pb.Cancellation(task_id=started.task_id, lease_token=500, reason="go away")
            )
            await trio.sleep(0.2)  # it arrives while the activity waits for its lease
            fake.answer.set()
            await fake.wait_for(lambda: bool(fake.failures_of(started.task_id)))
    (report,) = fake.failures_of(started.task_id)
    assert report.cancelled and report.lease_token == 500
    assert "go away" in payload.decode(report.error)["message"]


@pytest.mark.parametrize("why", ["breakers", "switched off"])
async def test_no_activity_starts_ahead_unless_the_control_plane_allows_it(why: str) -> None:
    """A workflow task handed out while a circuit breaker was not closed (or a worker told
    not to) starts nothing before the decision's reply."""
    ran = trio.Event()

    async def act(ctx: ActivityContext, n: int) -> int:
        ran.set()
        return n

    fake = _DecisionsHeldBack()
    with trio.fail_after(10):
        async with _ahead_worker(fake, act, start_ahead=why != "switched off"):
            fake.push(_ahead_task(may_start=why != "breakers"))
            await fake.wait_for(lambda: bool(fake.decisions))
            await trio.sleep(0.2)
            assert not ran.is_set()
            fake.answer.set()
    assert not fake.decisions[0].started


async def test_a_task_handed_back_for_the_slot_of_a_refused_result_is_run() -> None:
    """CompleteActivityTasks offers the slot of every result it carries, and the control
    plane claims a task for each whatever its verdict: a task handed back for the slot of a
    refused (stale) result runs in that slot, rather than wait for stale reclamation (which
    burns one of its attempts)."""
    reg = Registry()

    @activity(registry=reg)
    async def quick(ctx: ActivityContext, n: int) -> int:
        return n

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with (
            fake_control_plane(fake) as port,
            running(make_worker(reg, port, max_concurrent_tasks=1)),
        ):
            stale, handed = activity_task("quick", 1), activity_task("quick", 2)
            handed.claimed_at = time.time()
            fake.stale.add(stale.task_id)
            fake.eager = [handed]
            fake.push(stale)
            await fake.wait_for(lambda: not fake.eager)  # handed to the worker
            with trio.move_on_after(3):
                await fake.wait_for(lambda: handed.task_id in fake.completed)
    assert fake.completed == {handed.task_id: 2}, "the task handed back was never run"


# -------------------------------------------------------------------------- workflow tasks


async def test_workflow_task_replays_and_returns_commands() -> None:
    reg = Registry()

    @workflow(registry=reg)
    async def greet(ctx: Any, who: dict[str, Any]) -> Any:
        return await ctx.execute_activity("hello", who)

    @workflow(registry=reg)
    async def sleepy(ctx: Any, _: Any) -> None:
        await trio.sleep(1)

    started = history.workflow_started("greet", "wf-1", "run-1", {"name": "Ada"})
    fine = workflow_task("greet", [started, history.workflow_task_scheduled()])
    marker = history.workflow_task_completed("w", datetime(2024, 1, 1, tzinfo=UTC))
    diverged = workflow_task(
        "greet",
        [
            started,
            history.workflow_task_scheduled(),
            marker,
            history.activity_scheduled("1", "goodbye", {"name": "Ada"}, {}),
        ],
    )
    illegal = workflow_task(
        "sleepy",
        [history.workflow_started("sleepy", "wf-1", "run-1", None)],
    )
    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            fake.push(fine, diverged, illegal)
            await fake.wait_for(
                lambda: len(fake.workflow_completions) + len(fake.workflow_failures) == 3
            )
    (done,) = fake.workflow_completions
    assert done.task_id == fine.task_id and done.seen_sequence == 2
    assert done.claim_time == fine.claimed_at
    (command,) = payload.decode(done.commands)
    assert command["type"] == "schedule_activity"
    assert (command["activity_id"], command["activity_type"]) == ("1", "hello")
    assert command["input"] == {"name": "Ada"}
    failures = {f.task_id: f for f in fake.workflow_failures}
    assert failures[diverged.task_id].non_determinism
    assert "goodbye" in payload.decode(failures[diverged.task_id].error)["message"]
    assert not failures[illegal.task_id].non_determinism
    assert "IllegalAwait" in payload.decode(failures[illegal.task_id].error)["type"]
    # Each failure says how much history it was replayed on (input after it gets a try).
    assert failures[diverged.task_id].seen_sequence == 4
    assert failures[illegal.task_id].seen_sequence == 1


async def test_short_histories_replay_inline_and_long_ones_in_a_thread() -> None:
    """A short history is replayed on the Trio thread (a thread hop would cost more than the
    replay); a long one in a replay thread, so it cannot stall the worker's heartbeats."""
    reg = Registry()
    threads: dict[int, str] = {}

    @workflow(registry=reg)
    async def where(ctx: Any, n: int) -> Any:
        threads[n] = threading.current_thread().name
        return await ctx.execute_activity("a", n)

    def with_signals(n: int, extra: int) -> Any:
        events = [history.workflow_started("where", "wf-1", "run-1", n)]
        events += [history.signal_received("s", i) for i in range(extra)]
        return workflow_task("where", [*events, history.workflow_task_scheduled()])

    short = with_signals(1, 3)
    long = with_signals(2, INLINE_REPLAY_EVENTS + 10)
    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            fake.push(short, long)
            await fake.wait_for(lambda: len(fake.workflow_completions) == 2)
    assert threads[1] == threading.main_thread().name
    assert threads[2] != threading.main_thread().name


async def test_a_workflow_raising_system_exit_fails_without_taking_the_worker_down() -> None:
    """SystemExit from workflow code used to escape the replay into the worker's task nursery,
    inline or from a replay thread, and stop the worker (every worker that claimed the task)."""
    reg = Registry()

    @workflow(registry=reg)
    async def quits(ctx: Any, _: Any) -> None:
        sys.exit(3)

    @workflow(registry=reg)
    async def greet(ctx: Any, who: Any) -> Any:
        return await ctx.execute_activity("hello", who)

    def task_of(workflow_type: str, signals: int) -> Any:
        events = [history.workflow_started(workflow_type, "wf-1", "run-1", None)]
        events += [history.signal_received("s", i) for i in range(signals)]
        return workflow_task(workflow_type, [*events, history.workflow_task_scheduled()])

    inline, threaded = task_of("quits", 0), task_of("quits", INLINE_REPLAY_EVENTS + 10)
    after = task_of("greet", 0)
    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            fake.push(inline, threaded)
            await fake.wait_for(lambda: len(fake.workflow_completions) == 2)
            fake.push(after)  # the worker is still there to take it
            await fake.wait_for(lambda: len(fake.workflow_completions) == 3)
    assert fake.workflow_failures == []
    done = {c.task_id: payload.decode(c.commands) for c in fake.workflow_completions}
    for task in (inline, threaded):
        (command,) = done[task.task_id]
        assert command["type"] == "fail_workflow"
        assert command["error"]["type"] == "SystemExit"
    assert [c["type"] for c in done[after.task_id]] == ["schedule_activity"]


# -------------------------------------------------------------------------------- shutdown


async def test_shutdown_drains_then_releases_what_is_left() -> None:
    reg = Registry()
    slow_cleaned = trio.Event()
    both_started = trio.Semaphore(0)

    @activity(registry=reg)
    async def quick(ctx: ActivityContext, _: Any) -> str:
        both_started.release()
        await trio.sleep(0.2)
        return "done"

    @activity(registry=reg)
    async def endless(ctx: ActivityContext, _: Any) -> None:
        both_started.release()
        try:
            await trio.sleep_forever()
        finally:
            slow_cleaned.set()

    fake = FakeControlPlane(heartbeat_interval=30)
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            worker = make_worker(reg, port, grace_period=0.6)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                q, e = activity_task("quick"), activity_task("endless")
                fake.push(q, e)
                await both_started.acquire()
                await both_started.acquire()
                begun = trio.current_time()
                worker.shutdown()
                await fake.wait_for(
                    lambda: any(h.status == "draining" for h in fake.worker_heartbeats)
                )
                assert trio.current_time() - begun < 0.3  # reported at once, not next beat
                # run() returns by itself once drained.
            elapsed = trio.current_time() - begun
            polls_after = len(fake.polls)
            fake.push(activity_task("quick"))
            await trio.sleep(0.1)
            assert len(fake.polls) == polls_after
    assert 0.5 <= elapsed < 2.0
    assert fake.completed == {q.task_id: "done"}
    assert slow_cleaned.is_set()
    (release,) = fake.failed
    assert release.task_id == e.task_id and release.release and not release.cancelled
    assert worker.draining


async def test_cancelling_run_stops_at_once_and_releases_running_tasks() -> None:
    reg = Registry()
    started = trio.Event()

    @activity(registry=reg)
    async def endless(ctx: ActivityContext, _: Any) -> None:
        started.set()
        await trio.sleep_forever()

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            with trio.CancelScope() as stop:
                async with trio.open_nursery() as nursery:
                    await nursery.start(make_worker(reg, port, grace_period=30).run)
                    task = activity_task("endless")
                    fake.push(task)
                    await started.wait()
                    stopped_at = trio.current_time()
                    stop.cancel()
            assert trio.current_time() - stopped_at < 1.0
    (release,) = fake.failed
    assert release.task_id == task.task_id and release.release


class _SlowBatches(FakeControlPlane):
    """Answers CompleteActivityTasks only after a while (a busy control plane)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sent = trio.Event()

    async def complete_activity_tasks(self, request: Any) -> Any:
        self.batch_sent.set()
        await trio.sleep(0.5)
        return await super().complete_activity_tasks(request)


async def test_grace_ending_while_a_result_is_in_a_batch_leaves_its_slot_released_once() -> None:
    """The grace period ends while a result's CompleteActivityTasks batch is in flight: the
    task reports alone and releases its slot. The task the batch reply hands back for that
    slot is left to the control plane, not started in the released slot (whose second
    release crashed Worker.run)."""
    reg = Registry()

    @activity(registry=reg)
    async def hold(ctx: ActivityContext, _: Any) -> str:
        # Keeps the task nursery open past the grace period. (A sync activity did, until its
        # thread was abandoned on cancellation.)
        with trio.CancelScope(shield=True):
            await trio.sleep(1.5)
        return "held"

    @activity(registry=reg)
    async def quick(ctx: ActivityContext, _: Any) -> str:
        return "quick"

    fake = _SlowBatches()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            worker = make_worker(reg, port, max_concurrent_tasks=2, grace_period=0)
            async with trio.open_nursery() as nursery:  # Worker.run raising fails the test
                await nursery.start(worker.run)
                follow = activity_task("quick")
                follow.claimed_at = time.time()
                fake.eager = [follow]
                fake.push(activity_task("hold"), activity_task("quick"))
                await fake.batch_sent.wait()
                worker.shutdown()
    assert not fake.eager and follow.task_id not in fake.completed


class _BatchAnsweredAtGoodbye(FakeControlPlane):
    """Answers CompleteActivityTasks only once the worker says goodbye, and the goodbye a
    moment later."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sent = trio.Event()
        self.goodbye = trio.Event()

    async def complete_activity_tasks(self, request: Any) -> Any:
        self.batch_sent.set()
        await self.goodbye.wait()
        return await super().complete_activity_tasks(request)

    async def worker_heartbeat(self, request: Any) -> Any:
        if request.status == "stopped":
            self.goodbye.set()
            await trio.sleep(0.5)  # time for the batch reply to reach the worker first
        return await super().worker_heartbeat(request)


async def test_a_task_handed_back_once_no_task_runs_any_more_is_left_to_the_control_plane(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch reply arriving after the worker's tasks have all ended (grace period over,
    saying goodbye) hands back a task for a slot offered earlier: it is logged and left for
    the control plane to reclaim, not started in the closed task nursery."""
    reg = Registry()

    @activity(registry=reg)
    async def quick(ctx: ActivityContext, _: Any) -> str:
        return "quick"

    fake = _BatchAnsweredAtGoodbye()
    caplog.set_level(logging.ERROR, logger="everruns.worker")
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            worker = make_worker(reg, port, max_concurrent_tasks=2, grace_period=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                follow = activity_task("quick")
                follow.claimed_at = time.time()
                fake.eager = [follow]
                fake.push(activity_task("quick"))
                await fake.batch_sent.wait()
                worker.shutdown()
    assert not fake.eager and follow.task_id not in fake.completed
    assert any(
        "CompleteActivityTasks handed out 1 task(s) and the worker can run 0" in r.getMessage()
        for r in caplog.records
    )


# ------------------------------------------------------------------ the real control plane


@asynccontextmanager
async def control_plane(database_url: str) -> AsyncIterator[str]:
    config = ServerConfig(database_url=database_url, grpc_port=0)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve, config)
        yield info.address
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(address: str) -> AsyncIterator[tuple[Any, Any]]:
    host, _, port = address.rpartition(":")
    async with open_channel(host, int(port)) as channel:
        yield channel, pb.WorkflowServiceStub(channel.raw)


async def _start(channel: Any, stub: Any, workflow_type: str, value: Any) -> str:
    reply = await channel.unary(
        stub.start_workflow,
        pb.StartWorkflowRequest(workflow_type=workflow_type, input=payload.encode(value)),
    )
    return str(reply.workflow_id)


async def _result(channel: Any, stub: Any, workflow_id: str) -> Any:
    while True:
        reply = await channel.unary(
            stub.await_result, pb.AwaitResultRequest(workflow_id=workflow_id, wait_s=5)
        )
        if reply.done:
            return reply.workflow


def _e2e_registry() -> tuple[Registry, dict[str, Any]]:
    reg = Registry()
    seen: dict[str, Any] = {
        "threads": [],
        "flaky": 0,
        "finally": [],
        "started": trio.Event(),
        "cleaned_up": trio.Event(),
    }

    @activity(registry=reg)
    async def add(ctx: ActivityContext, pair: list[int]) -> int:
        return pair[0] + pair[1]

    @activity(registry=reg)
    def shout(ctx: ActivityContext, text: str) -> str:
        seen["threads"].append(threading.current_thread().name)
        return text.upper()

    @activity(registry=reg)
    async def flaky(ctx: ActivityContext, _: Any) -> int:
        seen["flaky"] += 1
        if ctx.attempt < 3:
            raise ConnectionError(f"try again (attempt {ctx.attempt})")
        return ctx.attempt

    @activity(registry=reg)
    async def endless(ctx: ActivityContext, _: Any) -> None:
        seen["started"].set()
        try:
            await trio.sleep_forever()
        finally:
            seen["finally"].append(trio.current_time())
            seen["cleaned_up"].set()

    @workflow(registry=reg)
    async def two_steps(ctx: Any, n: int) -> dict[str, Any]:
        total = await ctx.execute_activity(add, [n, 1])
        text = await ctx.execute_activity(shout, f"total {total}")
        return {"total": total, "text": text}

    @workflow(registry=reg)
    async def retrying(ctx: Any, _: Any) -> int:
        return await ctx.execute_activity(
            flaky, None, retry=RetryPolicy(max_attempts=5, initial_interval=0.05)
        )

    @workflow(registry=reg)
    async def cancellable(ctx: Any, _: Any) -> None:
        await ctx.execute_activity(endless, None)

    return reg, seen


@pytest.mark.db
async def test_end_to_end_workflows_against_the_control_plane(database_url: str) -> None:
    reg, seen = _e2e_registry()
    with trio.fail_after(60):
        async with control_plane(database_url) as address, client(address) as (channel, stub):
            worker = Worker(reg, address=address, grace_period=2, max_concurrent_tasks=4)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)

                wf = await _start(channel, stub, "two_steps", 41)
                done = await _result(channel, stub, wf)
                assert done.status == "completed"
                assert payload.decode(done.result) == {"total": 42, "text": "TOTAL 42"}
                assert seen["threads"] and seen["threads"][0] != threading.main_thread().name

                wf = await _start(channel, stub, "retrying", None)
                done = await _result(channel, stub, wf)
                assert done.status == "completed" and payload.decode(done.result) == 3
                assert seen["flaky"] == 3

                wf = await _start(channel, stub, "cancellable", None)
                await seen["started"].wait()
                asked = trio.current_time()
                await channel.unary(
                    stub.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wf, reason="test")
                )
                with trio.fail_after(1):
                    await seen["cleaned_up"].wait()
                assert seen["finally"][0] - asked < 1.0
                done = await _result(channel, stub, wf)
                assert done.status == "cancelled"

                worker.shutdown()
            workers = await channel.unary(
                stub.list_workers, pb.ListWorkersRequest(include_stopped=True)
            )
            assert [w.status for w in workers.workers if w.id == worker.worker_id] == ["stopped"]


@pytest.mark.db
async def test_decisions_made_ahead_apply_only_where_the_history_is_what_they_assumed(
    database_url: str,
) -> None:
    """An activity's result carries the decision of the workflow task it wakes; the control
    plane applies it when nothing else reached the run meanwhile. Here one workflow runs
    three steps on such decisions alone; in another, the activity signals its own workflow
    before it returns, so the decision made without that signal (wait for it) is refused,
    and the workflow task is replayed as usual and sees it. Without that refusal the second
    workflow would wait forever."""
    reg = Registry()
    channels: list[tuple[Any, Any]] = []

    @activity(registry=reg)
    async def inc(ctx: ActivityContext, n: int) -> int:
        return n + 1

    @activity(registry=reg)
    async def poke_own_workflow(ctx: ActivityContext, text: str) -> str:
        channel, stub = channels[0]
        await channel.unary(
            stub.signal_workflow,
            pb.SignalWorkflowRequest(
                workflow_id=ctx.info.workflow_id, name="poke", payload=payload.encode(text)
            ),
        )
        return text.upper()

    @workflow(registry=reg)
    async def three_steps(ctx: Any, n: int) -> int:
        for _ in range(3):
            n = await ctx.execute_activity(inc, n)
        return n

    @workflow(registry=reg)
    async def poked(ctx: Any, text: str) -> list[Any]:
        shouted = await ctx.execute_activity(poke_own_workflow, text)
        return [shouted, await ctx.wait_signal("poke")]

    with trio.fail_after(60):
        async with control_plane(database_url) as address, client(address) as (channel, stub):
            channels.append((channel, stub))
            worker = Worker(reg, address=address, grace_period=2, max_concurrent_tasks=4)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                wf = await _start(channel, stub, "three_steps", 10)
                done = await _result(channel, stub, wf)
                assert done.status == "completed" and payload.decode(done.result) == 13
                # The second and third steps, and the end, were decided ahead.
                assert worker.decided_ahead == 3

                wf = await _start(channel, stub, "poked", "hi")
                done = await _result(channel, stub, wf)
                assert done.status == "completed"
                assert payload.decode(done.result) == ["HI", "hi"]
                assert worker.decided_ahead == 3
                history_reply = await channel.unary(
                    stub.get_history, pb.GetHistoryRequest(workflow_id=wf)
                )
                types = [e.type for e in history_reply.events]
                assert types.index("signal_received") < types.index("activity_completed")
                worker.shutdown()


@pytest.mark.db
async def test_shutdown_releases_a_running_activity_to_another_worker(database_url: str) -> None:
    reg = Registry()
    runs: list[str] = []
    first_started = trio.Event()

    @activity(registry=reg)
    async def sticky(ctx: ActivityContext, _: Any) -> str:
        runs.append(ctx.info.activity_id)
        if len(runs) == 1:
            first_started.set()
            await trio.sleep_forever()
        return f"attempt {ctx.attempt}"

    @workflow(registry=reg)
    async def handoff(ctx: Any, _: Any) -> str:
        return await ctx.execute_activity(sticky, None)

    with trio.fail_after(60):
        async with control_plane(database_url) as address, client(address) as (channel, stub):
            first = Worker(reg, address=address, worker_id="first", grace_period=0.3)
            async with trio.open_nursery() as nursery:
                await nursery.start(first.run)
                wf = await _start(channel, stub, "handoff", None)
                await first_started.wait()
                first.shutdown()
            second = Worker(reg, address=address, worker_id="second")
            async with trio.open_nursery() as nursery:
                await nursery.start(second.run)
                with trio.fail_after(5):  # released at once: no 30 s stale timeout
                    done = await _result(channel, stub, wf)
                second.shutdown()
    assert done.status == "completed"
    assert payload.decode(done.result) == "attempt 2"
    assert runs == ["1", "1"]


class _LateStream(FakeControlPlane):
    """Opens the cancellation stream (its first keepalive) only when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.open_stream = trio.Event()

    async def stream_cancellations(self, request: Any, send: Callable[[Any], Any]) -> None:
        await self.open_stream.wait()
        await super().stream_cancellations(request, send)


async def test_a_worker_claims_only_once_the_control_plane_follows_its_connection() -> None:
    """A worker asks for tasks only after its cancellation stream has delivered its first
    message: the control plane then follows its connection, and a worker that dies right
    after its first claim has its tasks released at once, not 30 s later by the
    stale-heartbeat rule (which happened when a poison activity killed a worker before its
    stream was open)."""
    reg = Registry()

    @activity(registry=reg)
    async def quick(ctx: ActivityContext, _: Any) -> str:
        return "quick"

    fake = _LateStream()
    with trio.fail_after(15):
        async with fake_control_plane(fake) as port, trio.open_nursery() as nursery:
            nursery.start_soon(make_worker(reg, port).run)
            await trio.sleep(0.5)
            assert fake.polls == [], "the worker claimed before its stream was open"
            fake.open_stream.set()
            await fake.wait_for(lambda: bool(fake.polls))
            nursery.cancel_scope.cancel()
