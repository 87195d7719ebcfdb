"""Review of 394bb3a/6c9379e (ctx.continue_as_new) with a real worker: the worker's side of
a decision that continues as new.

Each test fails on 6c9379e and passes once its defect is mended."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, activity, workflow
from everruns.worker import ActivityContext
from tests.integration.agent_harness import serve_agent

pytestmark = pytest.mark.db

REGISTRY = Registry()
RAN: list[str] = []


@activity(registry=REGISTRY)
async def side_effect(ctx: ActivityContext, who: str) -> str:
    RAN.append(who)  # an e-mail sent, a card charged...
    return who


@workflow(registry=REGISTRY)
async def fire_and_return(ctx: Any, _: Any) -> str:
    ctx.start_activity(side_effect, "return")  # scheduled by the decision that ends the run
    return "done"


@workflow(registry=REGISTRY)
async def fire_and_continue(ctx: Any, state: Any) -> str:
    if state is None:
        ctx.start_activity(side_effect, "continue")  # the same, but the run continues as new
        ctx.continue_as_new(1)
    return "done"


def system(database_url: str) -> AbstractAsyncContextManager[Client]:
    """The control plane, one worker serving this module's workflows, a client."""
    return serve_agent(database_url, REGISTRY)


async def test_activities_of_a_decision_that_continues_as_new_are_not_started_ahead(
    database_url: str,
) -> None:
    """A decision that ends the run never has its activities run: the control plane cancels
    them ("Activities scheduled by the task that ends the run are cancelled, never handed
    out") and the worker does not start them ahead (`_RUN_ENDS` in worker/runtime.py). But
    `_RUN_ENDS` is (CompleteWorkflow, FailWorkflow, CancelWorkflow): a first workflow task
    that schedules an activity and continues as new has that activity started ahead on the
    worker, which runs its side effect before the control plane cancels it."""
    RAN.clear()
    with trio.fail_after(60):
        async with system(database_url) as client:
            returned = await client.start_workflow(fire_and_return, None, workflow_id="r")
            assert await returned.result() == "done"
            continued = await client.start_workflow(fire_and_continue, None, workflow_id="c")
            assert await continued.result() == "done"
            await trio.sleep(0.5)  # an activity started ahead has had time to run
    assert "return" not in RAN  # the control: an ending decision's activity never runs
    assert RAN == [], f"the activity of a decision that continues as new ran on the worker: {RAN}"


@workflow(registry=REGISTRY)
async def hoarder(ctx: Any, state: Any) -> int:
    """Lets "blob" signals pile up, continues as new at "go"; the next run counts them."""
    if state is None:
        await ctx.wait_signal("go")
        ctx.continue_as_new(1)
    taken = 0
    while True:
        try:
            await ctx.wait_signal("blob", timeout=0)
        except TimeoutError:
            return taken
        taken += 1


PAYLOAD = 64 * 1024


async def test_a_run_holding_many_signals_can_continue_as_new(database_url: str) -> None:
    """The signals a continuing run carries travel back from the worker inside its
    ContinueAsNewWorkflow command, though the control plane has them in the run's history
    already. Signals that each fit EVERRUNS_MAX_PAYLOAD_BYTES, and that the run's history
    holds and its worker replays without trouble, add up in that one decision: past
    EVERRUNS_MAX_MESSAGE_BYTES (only 4 x the payload limit + 64 KiB) the worker fails the
    workflow task and the run is stuck for good. The workflow code can do nothing about it
    (it cannot continue, and every retry carries the same signals): the one way a
    long-lived workflow keeps its history bounded is closed to it."""
    result: Any = None
    stuck: str | None = None
    with trio.fail_after(60):
        async with serve_agent(
            database_url,
            REGISTRY,
            max_payload_bytes=PAYLOAD,
            max_message_bytes=4 * PAYLOAD + 64 * 1024,
        ) as client:
            handle = await client.start_workflow(hoarder, None, workflow_id="h")
            for n in range(6):
                await handle.signal("blob", f"{n}" + "x" * (PAYLOAD - 1024))
            await handle.signal("go")
            with trio.move_on_after(10):
                result = await client.get_handle("h").result()
            if result is None:
                stuck = (await client.get_handle("h").describe()).stuck_reason
    assert result == 6, f"the run could not continue as new with its signals; stuck: {stuck}"
