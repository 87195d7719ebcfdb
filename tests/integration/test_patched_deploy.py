"""`ctx.patched` across a real deployment: a run begun under the old code finishes on the old
branch after workers with the new code replace the old ones, and a run begun under the new
code takes the new branch; both end, neither is stuck."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.context import WorkflowInfo
from everruns.domain.history import HistoryEvent
from everruns.domain.registry import Registry, activity, workflow
from everruns.domain.replay import replay
from everruns.server import ServerConfig, serve
from everruns.worker import ActivityContext, Worker

pytestmark = pytest.mark.db


def _registry(*, patched: bool) -> Registry:
    """The same workflow type, before (``patched`` False) and after the change."""
    registry = Registry()

    @activity(registry=registry)
    async def total_in_euros(ctx: ActivityContext, n: int) -> str:
        return f"{n} EUR"

    @activity(registry=registry)
    async def total_in_cents(ctx: ActivityContext, n: int) -> str:
        return f"{n * 100} cents"

    if patched:

        @workflow(registry=registry, name="checkout")
        async def checkout_v2(ctx: Any, n: int) -> Any:
            if ctx.patched("cents"):
                total = await ctx.execute_activity(total_in_cents, n)
            else:
                total = await ctx.execute_activity(total_in_euros, n)
            return [total, await ctx.wait_signal("go")]

    else:

        @workflow(registry=registry, name="checkout")
        async def checkout_v1(ctx: Any, n: int) -> Any:
            total = await ctx.execute_activity(total_in_euros, n)
            return [total, await ctx.wait_signal("go")]

    return registry


async def _until_waiting(client: Client, workflow_id: str) -> None:
    """Until the run has its total and waits for the signal (its activity completed)."""
    handle = client.get_handle(workflow_id)
    while True:
        completed = any(e.type == "activity_completed" for e in await handle.history())
        if completed and not (await handle.describe()).pending_activities:
            return
        await trio.sleep(0.05)


async def test_old_runs_keep_the_old_branch_after_a_deploy(database_url: str) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
            async with Client.connect(info.address) as client:
                old = Worker(_registry(patched=False), address=info.address, grace_period=0.5)
                await nursery.start(old.run)
                before = await client.start_workflow("checkout", 7, workflow_id="order-old")
                await _until_waiting(client, "order-old")
                old.shutdown()  # the deploy: the old workers stop, new ones start
                new = Worker(_registry(patched=True), address=info.address, grace_period=0.5)
                await nursery.start(new.run)
                after = await client.start_workflow("checkout", 8, workflow_id="order-new")
                await _until_waiting(client, "order-new")
                for handle in (before, after):
                    await handle.signal("go", "ok")
                old_result = await before.result(timeout=20)
                new_result = await after.result(timeout=20)
                old_history = [e.type for e in await before.history()]
                new_history = [e.type for e in await after.history()]
                new.shutdown()
            nursery.cancel_scope.cancel()
    assert old_result == ["7 EUR", "ok"]
    assert new_result == ["800 cents", "ok"]
    assert "patch_recorded" not in old_history
    assert new_history.count("patch_recorded") == 1


async def test_a_patch_asked_in_a_decision_made_ahead_is_recorded(database_url: str) -> None:
    """A decision the worker makes ahead, with the result that wakes it, may take a patch:
    the control plane records it with the decision, and a full replay agrees."""
    registry = Registry()

    @activity(registry=registry)
    async def step(ctx: ActivityContext, n: int) -> int:
        return n + 1

    @workflow(registry=registry)
    async def ahead(ctx: Any, n: int) -> Any:
        first = await ctx.execute_activity(step, n)
        branch = "new" if ctx.patched("after-first") else "old"
        second = await ctx.execute_activity(step, first)
        return [branch, second]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
            async with Client.connect(info.address) as client:
                worker = Worker(registry, address=info.address, grace_period=0.5)
                await nursery.start(worker.run)
                handle = await client.start_workflow(ahead, 1)
                result = await handle.result(timeout=20)
                events = await handle.history()
                decided_ahead = worker.decided_ahead
                worker.shutdown()
            nursery.cancel_scope.cancel()
    assert result == ["new", 3]
    assert [e.type for e in events].count("patch_recorded") == 1
    assert decided_ahead >= 1
    # A worker that replays the run in full (no cached state) agrees with what was recorded.
    info = WorkflowInfo(handle.workflow_id, handle.run_id, "ahead")
    history = [HistoryEvent.of(e.sequence_num, e.data, time=e.time) for e in events]
    again = replay(ahead, history, info=info, now=events[-1].time, registry=registry)
    assert again.commands == [] and again.completed
