"""The workflow programming model at its edges: a child whose workflow id is taken, a stuck run
that is cancelled, payload limits on what workflow code sends. Found by a review (session
17); each test failed on the code before its fix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from everruns.client import Client, WorkflowHandle
from everruns.domain.registry import Registry, activity, workflow
from everruns.errors import (
    ActivityError,
    ChildWorkflowError,
    NotFound,
    ResourceExhausted,
    WorkflowFailed,
)
from everruns.server import ServerConfig, ServerInfo, serve
from everruns.worker import ActivityContext, Worker
from tests.e2e.harness import wait_until
from tests.integration.test_activity_edges import served

pytestmark = pytest.mark.db


async def _types(handle: WorkflowHandle) -> list[str]:
    return [e.type for e in await handle.history()]


async def test_a_child_refused_because_its_id_is_taken_fails_in_its_parent(
    database_url: str,
) -> None:
    """A child whose workflow id an open run holds: the control plane records
    ``child_workflow_failed`` (AlreadyExists) with ``child_workflow_started``, and the
    parent's ``execute_child_workflow`` raises ChildWorkflowError. Before, no workflow task
    was made for that event: the parent was never replayed over it and waited for ever."""
    registry = Registry()

    @workflow(registry=registry)
    async def occupant(ctx: Any, _: Any) -> Any:
        return await ctx.wait_signal("go")

    @workflow(registry=registry)
    async def parent_of_taken(ctx: Any, _: Any) -> Any:
        try:
            await ctx.execute_child_workflow(occupant, None, workflow_id="taken-id")
        except ChildWorkflowError as exc:
            return ["child refused", exc.error_type]
        return "child ran"

    with trio.fail_after(20):
        async with served(database_url, registry) as (client, _):
            await client.start_workflow(occupant, None, workflow_id="taken-id")
            handle = await client.start_workflow(parent_of_taken, None)
            assert await handle.result(timeout=10) == ["child refused", "AlreadyExists"]


def evolving_code() -> tuple[Registry, Registry]:
    """Two versions of workflow ``evolving``: the old runs ``step_a`` then waits for signal
    ``go``; the new runs ``step_b`` instead, so it cannot replay the old one's history."""
    old_registry, new_registry = Registry(), Registry()

    @activity(registry=old_registry, name="step_a")
    @activity(registry=new_registry, name="step_a")
    async def step_a(ctx: ActivityContext, value: Any) -> Any:
        return value

    @activity(registry=new_registry, name="step_b")
    async def step_b(ctx: ActivityContext, value: Any) -> Any:
        return value

    @workflow(registry=old_registry, name="evolving")
    async def old_code(ctx: Any, _: Any) -> Any:
        await ctx.execute_activity("step_a", 1)
        return await ctx.wait_signal("go")

    @workflow(registry=new_registry, name="evolving")
    async def new_code(ctx: Any, _: Any) -> Any:
        await ctx.execute_activity("step_b", 1)  # changed under a running workflow
        return await ctx.wait_signal("go")

    return old_registry, new_registry


@asynccontextmanager
async def stuck_evolving_run(
    database_url: str,
) -> AsyncIterator[tuple[ServerInfo, WorkflowHandle, Worker, Registry]]:
    """A control plane with a run of ``evolving`` stuck on non-determinism: the old code ran
    ``step_a`` and waits for ``go``; the signal was sent, and the new code failed to replay.
    Yields the control plane, the run's handle, the worker with the new code (still running:
    shut it down to stop it) and the old code's registry."""
    old_registry, new_registry = evolving_code()

    async def waiting_for_the_signal() -> bool:
        types = await _types(handle)
        return "activity_completed" in types and types[-1] == "workflow_task_completed"

    async def stuck() -> bool:
        return bool((await handle.describe()).stuck_reason)

    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
        async with Client.connect(info.address) as client:
            old = Worker(old_registry, address=info.address, grace_period=0.5)
            async with trio.open_nursery() as inner:
                await inner.start(old.run)
                handle = await client.start_workflow("evolving", None, workflow_id="evolving")
                await wait_until(waiting_for_the_signal, timeout=10, what="old code waits")
                old.shutdown()
            new = Worker(new_registry, address=info.address, grace_period=0.5)
            async with trio.open_nursery() as inner:
                await inner.start(new.run)
                await handle.signal("go", 1)
                await wait_until(stuck, timeout=10, what="the run is stuck")
                yield info, handle, new, old_registry
        nursery.cancel_scope.cancel()


async def test_cancelling_a_run_stuck_on_non_determinism_ends_it(database_url: str) -> None:
    """The non-determinism message says "... or cancel it". Cancelling a stuck run ends it
    cancelled once a worker fails to replay it again. Before, the request was recorded, the
    replay failed again, and the run stayed running and stuck, holding its workflow id."""
    with trio.fail_after(30):
        async with stuck_evolving_run(database_url) as (_, handle, new, _):
            assert "or cancel it" in str((await handle.describe()).stuck_reason)
            await handle.cancel("the code changed; give up on this run")
            with pytest.raises(WorkflowFailed) as ended:
                await handle.result(timeout=10)
            assert ended.value.status == "cancelled"
            types = await _types(handle)
            assert types[-2:] == ["workflow_task_failed", "workflow_cancelled"]
            new.shutdown()


async def test_the_payload_limit_applies_to_what_workflow_code_sends(database_url: str) -> None:
    """EVERRUNS_MAX_PAYLOAD_BYTES is "the largest payload one request may carry": a client's
    start input over it is refused, and so is what workflow code sends over it. The one
    command fails, in a way the code sees: a child's input (ChildWorkflowError, the child not
    started), an activity's input (ActivityError, the activity not run), the run's result (the
    run fails). Before, those were stored and handed out as if there were no limit; and
    refusing the whole decision instead would leave the run stuck for good (replay makes the
    same decision again)."""
    registry = Registry()
    limit = 100_000
    too_large = "everruns.errors.ResourceExhausted"

    @activity(registry=registry)
    async def measure(ctx: ActivityContext, text: str) -> int:
        return len(text)

    @workflow(registry=registry)
    async def takes_big(ctx: Any, text: str) -> int:
        return len(text)

    @workflow(registry=registry)
    async def sends_big(ctx: Any, n: int) -> Any:
        try:
            return await ctx.execute_child_workflow(takes_big, "y" * n, workflow_id="big-child")
        except ChildWorkflowError as exc:
            return [exc.error_type, "too large" in str(exc)]

    @workflow(registry=registry)
    async def schedules_big(ctx: Any, n: int) -> Any:
        try:
            return await ctx.execute_activity(measure, "z" * n)
        except ActivityError as exc:
            return [exc.error_type, "too large" in str(exc)]

    @workflow(registry=registry)
    async def returns_big(ctx: Any, n: int) -> Any:
        return "x" * n

    with trio.fail_after(30):
        async with served(database_url, registry, max_payload_bytes=limit) as (client, _):
            with pytest.raises(ResourceExhausted):
                await client.start_workflow(takes_big, "y" * 2 * limit)
            handle = await client.start_workflow(sends_big, 2 * limit)
            assert await handle.result(timeout=10) == [too_large, True]
            with pytest.raises(NotFound):
                await client.get_handle("big-child").describe()
            handle = await client.start_workflow(schedules_big, 2 * limit)
            assert await handle.result(timeout=10) == [too_large, True]
            handle = await client.start_workflow(returns_big, 2 * limit)
            with pytest.raises(WorkflowFailed) as failed:
                await handle.result(timeout=10)
            assert failed.value.status == "failed"
            assert "workflow result is too large" in str(failed.value)
            # Under the limit, the same code runs.
            for fn in (sends_big, schedules_big):
                assert await (await client.start_workflow(fn, 10)).result(timeout=10) == 10
            assert await (await client.start_workflow(returns_big, 3)).result(timeout=10) == "xxx"
