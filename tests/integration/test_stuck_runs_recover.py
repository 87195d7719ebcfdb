"""A run marked stuck (non-determinism) that recovers, once compatible code is deployed and a new
event gives it another try, is no longer reported stuck: ``stuck_reason`` was never cleared, so
``describe()``, ``everruns workflow show`` and the runbook's query went on listing it after it
completed. From a review (session 18); the test failed before its fix."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns.client import Client, WorkflowHandle
from everruns.domain.registry import Registry, activity, workflow
from everruns.server import ServerConfig, serve
from everruns.worker import ActivityContext, Worker
from tests.e2e.harness import wait_until

pytestmark = pytest.mark.db


async def _types(handle: WorkflowHandle) -> list[str]:
    return [e.type for e in await handle.history()]


async def test_a_stuck_run_that_recovers_is_no_longer_reported_stuck(database_url: str) -> None:
    """The runbook's way out of non-determinism: "Deploy code compatible with the recorded
    history"; the control plane says "a new event gives it another try". With compatible code
    back, a new signal makes the run replay cleanly and complete. But ``stuck_reason`` is set
    by ``set_run_stuck`` and cleared by nothing: the completed run still reports
    "stuck: non-determinism ..." in ``describe()`` / ``everruns workflow show`` and in the
    runbook's ``WHERE stuck_reason IS NOT NULL`` query, sending operators after a run that is
    fine (or finished long ago)."""
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

    async def waiting_for_the_signal() -> bool:
        types = await _types(handle)
        return "activity_completed" in types and types[-1] == "workflow_task_completed"

    async def stuck() -> bool:
        return bool((await handle.describe()).stuck_reason)

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
            async with Client.connect(info.address) as client:
                old = Worker(old_registry, address=info.address, grace_period=0.5)
                async with trio.open_nursery() as inner:
                    await inner.start(old.run)
                    handle = await client.start_workflow("evolving", None, workflow_id="evolving")
                    await wait_until(waiting_for_the_signal, timeout=10, what="old code waits")
                    old.shutdown()
                bad = Worker(new_registry, address=info.address, grace_period=0.5)
                async with trio.open_nursery() as inner:
                    await inner.start(bad.run)
                    await handle.signal("go", 1)
                    await wait_until(stuck, timeout=10, what="the run is stuck")
                    bad.shutdown()
                # Compatible code is deployed again, and a new event gives the run another try.
                fixed = Worker(old_registry, address=info.address, grace_period=0.5)
                async with trio.open_nursery() as inner:
                    await inner.start(fixed.run)
                    await handle.signal("poke", None)
                    assert await handle.result(timeout=10) == 1
                    described = await handle.describe()
                    fixed.shutdown()
            nursery.cancel_scope.cancel()
    assert described.status == "completed", described
    assert described.stuck_reason is None, (
        f"the run recovered and completed, yet describe() still reports it stuck: "
        f"{described.stuck_reason!r} (stuck_reason is never cleared once set)"
    )
