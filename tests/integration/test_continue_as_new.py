"""`ctx.continue_as_new` end to end: a real control plane on PostgreSQL, a real worker, the
client. A workflow goes on in a chain of runs of one workflow id, each with a fresh history;
the result of any run of the chain is the last run's; signals are never lost across a
continuation; a child's parent hears once, from the chain's last run; a cancel reaches the
run that is open."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, activity, workflow
from everruns.errors import ContinueAsNew, WorkflowFailed
from everruns.worker import ActivityContext
from tests.integration.agent_harness import serve_agent

pytestmark = pytest.mark.db

REGISTRY = Registry()


@activity(registry=REGISTRY)
async def double(ctx: ActivityContext, n: int) -> int:
    return n * 2


@workflow(registry=REGISTRY)
async def counter(ctx: Any, state: dict[str, int]) -> dict[str, int]:
    total = state["total"] + await ctx.execute_activity(double, state["n"])
    if state["n"] >= 3:
        return {"total": total, "runs": state["n"] + 1}
    try:
        ctx.continue_as_new({"n": state["n"] + 1, "total": total})
    except Exception:  # an `except Exception` in workflow code does not stop it
        raise AssertionError("ContinueAsNew was caught as an Exception") from None


@workflow(registry=REGISTRY)
async def adder(ctx: Any, state: dict[str, int]) -> dict[str, int]:
    """Adds the ``add`` signals; continues as new after every second one; ends at ``stop``."""
    total, taken = state["total"], state["taken"]
    while True:
        value = await ctx.wait_signal("add")
        if value is None:
            return {"total": total, "taken": taken}
        total, taken = total + value, taken + 1
        if taken % 2 == 0:
            ctx.continue_as_new({"total": total, "taken": taken})


@workflow(registry=REGISTRY)
async def parent(ctx: Any, _: Any) -> Any:
    return await ctx.execute_child_workflow(counter, {"n": 1, "total": 0})


@workflow(registry=REGISTRY)
async def sleeper(ctx: Any, state: dict[str, int]) -> None:
    if state["n"] < 2:
        ctx.continue_as_new({"n": state["n"] + 1})
    await ctx.sleep(3600)


@workflow(registry=REGISTRY)
async def by_hand(ctx: Any, _: Any) -> None:
    raise ContinueAsNew({"not": {1, 2}})  # not JSON: the run fails saying so


def system(database_url: str) -> AbstractAsyncContextManager[Client]:
    """The control plane, one worker serving this module's workflows, a client."""
    return serve_agent(database_url, REGISTRY)


async def _runs(client: Client, workflow_type: str, workflow_id: str) -> list[Any]:
    listed, _ = await client.list_workflows(workflow_type, limit=100)
    return [r for r in listed if r.workflow_id == workflow_id]


async def test_a_chain_of_runs_ends_with_the_last_runs_result(database_url: str) -> None:
    with trio.fail_after(60):
        async with system(database_url) as client:
            first = await client.start_workflow(counter, {"n": 0, "total": 0}, workflow_id="c1")
            result = await first.result()  # pinned to the first run: followed to the last
            runs = await _runs(client, "counter", "c1")
            described = await first.describe()
            last = client.get_handle("c1", runs[0].run_id)
            history = await last.history()
    assert result == {"total": 0 + 2 + 4 + 6, "runs": 4}
    assert [r.status for r in runs] == ["completed"] + ["continued_as_new"] * 3
    assert described.status == "continued_as_new" and described.continued_run_id == runs[2].run_id
    assert described.completed_at is not None
    # the last run's history starts afresh, naming the run it continues
    assert history[0].type == "workflow_started"
    assert history[0].data["continued_from"] == runs[1].run_id
    assert history[0].data["input"] == {"n": 3, "total": 6}
    assert len(history) < 10


async def test_signals_are_never_lost_across_continuations(database_url: str) -> None:
    """Signals sent as fast as the client can, while the runs continue every second one: each
    arrives once, in a run that takes it (those a run had not taken go on with it), also
    those sent through a handle pinned to the chain's first run."""
    values = list(range(1, 12))
    with trio.fail_after(60):
        async with system(database_url) as client:
            handle = await client.start_workflow(adder, {"total": 0, "taken": 0}, workflow_id="a1")
            for value in values:
                # a handle pinned to the first run reaches the chain's open run, as the
                # handle of the workflow id does
                target = handle if value % 2 else client.get_handle("a1")
                await target.signal("add", value)
            await handle.signal("add", None)
            result = await handle.result()
            runs = await _runs(client, "adder", "a1")
    assert result == {"total": sum(values), "taken": len(values)}
    assert len(runs) == len(values) // 2 + 1


async def test_a_childs_parent_hears_once_from_the_last_run(database_url: str) -> None:
    with trio.fail_after(60):
        async with system(database_url) as client:
            handle = await client.start_workflow(parent, None, workflow_id="p1")
            result = await handle.result()
            history = await handle.history()
            listed, _ = await client.list_workflows("counter", limit=100)
            children = [r for r in listed if r.workflow_id.endswith("/1")]  # the child's id
    assert result == {"total": 2 + 4 + 6, "runs": 4}
    assert [e.type for e in history].count("child_workflow_completed") == 1
    assert [r.status for r in children] == ["completed", "continued_as_new", "continued_as_new"]


async def test_a_cancel_reaches_the_open_run_of_the_chain(database_url: str) -> None:
    with trio.fail_after(60):
        async with system(database_url) as client:
            first = await client.start_workflow(sleeper, {"n": 0}, workflow_id="s1")
            while True:  # the third run, asleep
                if (await client.get_handle("s1").describe()).pending_timers:
                    break
                await trio.sleep(0.02)
            assert len(await _runs(client, "sleeper", "s1")) == 3
            await client.get_handle("s1").cancel()
            with pytest.raises(WorkflowFailed) as failed:
                await first.result()
    assert failed.value.status == "cancelled"


async def test_an_input_that_is_not_json_fails_the_run(database_url: str) -> None:
    with trio.fail_after(60):
        async with system(database_url) as client:
            handle = await client.start_workflow(by_hand, None, workflow_id="h1")
            with pytest.raises(WorkflowFailed) as failed:
                await handle.result()
    assert failed.value.status == "failed"
    assert "continue_as_new" in str(failed.value)
