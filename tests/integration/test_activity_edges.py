"""The activity side of the worker at its edges: progress recorded just before a failure, an
activity that calls ``sys.exit``. Found by a review (session 17); each test failed before."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, activity, workflow
from everruns.domain.retry import RetryPolicy
from everruns.errors import ActivityError, RetryAfter
from everruns.server import ServerConfig, serve
from everruns.worker import ActivityContext, Worker

pytestmark = pytest.mark.db


@asynccontextmanager
async def served(
    database_url: str, registry: Registry, **server: Any
) -> AsyncIterator[tuple[Client, Worker]]:
    """A control plane (with ``server`` settings), a worker serving ``registry`` and a client,
    all stopped at the end."""
    async with trio.open_nursery() as nursery:
        config = ServerConfig(database_url=database_url, grpc_port=0, **server)
        info = await nursery.start(serve, config)
        worker = Worker(registry, address=info.address, grace_period=0.5, poll_wait=1.0)
        await nursery.start(worker.run)
        async with Client.connect(info.address) as client:
            yield client, worker
        worker.shutdown()
        nursery.cancel_scope.cancel()


async def test_progress_recorded_just_before_a_failure_reaches_the_next_attempt(
    database_url: str,
) -> None:
    """Record progress with ``ctx.heartbeat(details)``, fail, and the next attempt resumes
    from ``ctx.heartbeat_details``. Before, details the heartbeat scheduler had not sent yet
    when the attempt failed (recorded just before, or within the minimum gap between beats)
    were dropped with the attempt: the next one saw None."""
    registry = Registry()
    seen: list[Any] = []

    @activity(registry=registry)
    async def resumable(ctx: ActivityContext, _: Any) -> Any:
        seen.append(ctx.heartbeat_details)
        if ctx.attempt == 1:
            ctx.heartbeat({"done": 5})
            raise ValueError("crashed after recording progress")
        return ctx.heartbeat_details

    @workflow(registry=registry)
    async def resume(ctx: Any, _: Any) -> Any:
        return await ctx.execute_activity(
            resumable, None, retry=RetryPolicy(max_attempts=2, initial_interval=0.1)
        )

    with trio.fail_after(20):
        async with served(database_url, registry) as (client, _):
            handle = await client.start_workflow(resume, None)
            result = await handle.result(timeout=10)
    assert seen == [None, {"done": 5}]
    assert result == {"done": 5}


async def test_an_activity_calling_sys_exit_fails_the_activity_not_the_worker(
    database_url: str,
) -> None:
    """A sync activity wrapping a script that calls ``sys.exit`` fails with SystemExit, and
    the worker goes on. Before, ``Worker.run`` raised SystemExit: the worker died, and the
    task it released would have crashed the next worker too."""
    registry = Registry()

    @activity(registry=registry)
    def exits(ctx: ActivityContext, _: Any) -> Any:
        sys.exit(3)

    @activity(registry=registry)
    async def exits_async(ctx: ActivityContext, _: Any) -> Any:
        sys.exit(4)

    @workflow(registry=registry)
    async def call_both(ctx: Any, _: Any) -> Any:
        caught = []
        for fn in (exits, exits_async):
            try:
                await ctx.execute_activity(fn, None, retry=RetryPolicy(max_attempts=1))
            except ActivityError as exc:
                caught.append(exc.error_type)
        return caught

    with trio.fail_after(20):
        async with served(database_url, registry) as (client, _):
            handle = await client.start_workflow(call_both, None)
            assert await handle.result(timeout=10) == ["builtins.SystemExit"] * 2
            # Still serving.
            again = await client.start_workflow(call_both, None)
            assert await again.result(timeout=10) == ["builtins.SystemExit"] * 2


async def test_retry_after_holds_the_next_attempt_back_past_the_backoff(
    database_url: str,
) -> None:
    """An activity that raises ``RetryAfter(1.5)`` is tried again no sooner than 1.5 s later,
    though its policy's backoff is 50 ms; the attempt counts, and the recorded error says how
    long it asked for. One with no attempt left fails as before: the delay adds no retry."""
    registry = Registry()
    started: list[float] = []

    @activity(registry=registry)
    async def rate_limited(ctx: ActivityContext, _: Any) -> Any:
        started.append(trio.current_time())
        if ctx.attempt == 1:
            raise RetryAfter(1.5, "slow down")
        return ctx.attempt

    @workflow(registry=registry)
    async def call(ctx: Any, attempts: int) -> Any:
        policy = RetryPolicy(max_attempts=attempts, initial_interval=0.05, jitter=0.0)
        try:
            return await ctx.execute_activity(rate_limited, None, retry=policy)
        except ActivityError as exc:
            return exc.error_type

    with trio.fail_after(30):
        async with served(database_url, registry) as (client, _):
            handle = await client.start_workflow(call, 3)
            assert await handle.result(timeout=20) == 2
            history = await handle.history()
            started_once, ended_once = len(started), trio.current_time()
            alone = await client.start_workflow(call, 1)
            assert await alone.result(timeout=20) == "everruns.errors.RetryAfter"
            assert trio.current_time() - ended_once < 1.5  # not held back: it failed at once
    assert started_once == 2 and len(started) == 3
    assert started[1] - started[0] >= 1.5
    failed = [e.data for e in history if e.type == "activity_failed"]
    assert len(failed) == 1
    assert failed[0]["error"]["retry_after"] == 1.5
    assert failed[0]["error"]["message"] == "slow down"


async def test_describe_says_when_a_held_back_retry_is_due(database_url: str) -> None:
    """While an activity waits out its ``RetryAfter(30)``, ``describe()`` (and so
    ``everruns workflow show``) gives the time its next attempt is due; before, an operator
    saw a pending activity and no reason it did not run."""
    registry = Registry()
    failed = trio.Event()

    @activity(registry=registry)
    async def rate_limited_long(ctx: ActivityContext, _: Any) -> Any:
        failed.set()
        raise RetryAfter(30.0, "come back in half a minute")

    @workflow(registry=registry)
    async def call_later(ctx: Any, _: Any) -> Any:
        policy = RetryPolicy(max_attempts=2, initial_interval=0.05)
        return await ctx.execute_activity(rate_limited_long, None, retry=policy)

    with trio.fail_after(30):
        async with served(database_url, registry) as (client, _):
            handle = await client.start_workflow(call_later, None)
            await failed.wait()
            raised = datetime.now(UTC)
            while True:  # the decision and the failure's report land a moment later
                tasks = (await handle.describe()).pending_activities
                if tasks and tasks[0].status == "pending" and tasks[0].attempt == 1:
                    (pending,) = tasks
                    break
                await trio.sleep(0.05)
            await handle.cancel()
    assert pending.attempt == 1 and pending.last_error is not None
    assert pending.next_attempt_at is not None
    wait = (pending.next_attempt_at - raised).total_seconds()
    assert 29.0 < wait < 32.0
