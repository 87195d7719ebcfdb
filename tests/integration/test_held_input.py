"""Input that arrives while a workflow task's decision travels: held past the decision, or the
decision refused as stale (`everruns.domain.replay.superseded_by`), on the real control plane.

A decision that only goes on (schedules, starts, waits) is applied over signals and results it
did not see: its marker records what it saw and the next workflow task replays them after it.
A decision that ends the run, or one that a cancel request overtook, is refused as before. A
stream of signals faster than a decision's round trip therefore no longer stops a workflow.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from everruns._proto.everruns import v1 as pb
from everruns.domain import payload
from everruns.domain.registry import Registry, activity, workflow
from everruns.worker import ActivityContext, Worker
from tests.integration.test_engine import plane
from tests.integration.test_worker import _result, _start, client, control_plane

pytestmark = pytest.mark.db


async def _signal(p: Any, wid: str, name: str, value: Any = None) -> None:
    await p.channel.unary(
        p.workflows.signal_workflow,
        pb.SignalWorkflowRequest(workflow_id=wid, name=name, payload=json.dumps(value).encode()),
    )


async def _history(p: Any, wid: str) -> list[dict[str, Any]]:
    reply = await p.channel.unary(p.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid))
    return [json.loads(e.data) for e in reply.events]


async def work_then_wait(ctx: Any, input: Any) -> Any:
    done = await ctx.execute_activity("work", 1)
    return [done, await ctx.wait_signal("go")]


async def test_a_decision_is_applied_over_a_signal_it_did_not_see(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("wf", "work")
            await _signal(p, "w", "go", "early")  # arrives while the decision travels
            reply = await p.channel.unary(
                p.workers.complete_workflow_task, p.decide(task, work_then_wait, max_eager=1)
            )
            assert reply.accepted and not reply.superseded
            (activity_task,) = reply.eager_tasks  # its activity is handed back as usual
            events = await _history(p, "w")
            assert [e["type"] for e in events] == [
                "workflow_started",
                "signal_received",
                "workflow_task_completed",
                "activity_scheduled",
            ]
            assert events[2]["seen_sequence"] == 1  # the signal is held past the decision
            await p.complete(activity_task, "ok")
            await p.drive(work_then_wait, "wf")
            final = await p.describe("w")
            assert final.status == "completed" and json.loads(final.result) == ["ok", "early"]


async def test_held_input_gets_a_workflow_task_even_when_its_wake_up_was_the_one_deciding(
    database_url: str,
) -> None:
    """A workflow task pending when an activity's result comes absorbs that result's wake-up;
    claimed a moment later by a statement whose snapshot predates the result, it is decided
    without it. The result is held past that decision, and a workflow task must still come
    to replay it (found by the end-to-end cancel test, where the run then stayed open)."""

    async def two_steps(ctx: Any, input: Any) -> Any:
        first = await ctx.execute_activity("work", 1)
        return [first, await ctx.execute_activity("work", 2)]

    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("wf", "work")
            reply = await p.channel.unary(
                p.workers.complete_workflow_task, p.decide(task, two_steps, max_eager=1)
            )
            (first,) = reply.eager_tasks
            await p.complete(first, "a")
            (task,) = await p.poll(wf=["wf"])
            # Its history as a snapshot before the result saw it (the race, made exact).
            task.history = [e for e in task.history if e.type != "activity_completed"]
            reply = await p.run_workflow_task(task, two_steps)
            assert reply.accepted and not reply.superseded
            await p.drive(two_steps, "wf")  # a workflow task is there: it replays the result
            (second,) = await p.poll(act=["work"])
            await p.complete(second, "b")
            await p.drive(two_steps, "wf")
            final = await p.describe("w")
            assert final.status == "completed" and json.loads(final.result) == ["a", "b"]


async def test_a_decision_that_ends_the_run_is_refused_over_input_it_did_not_see(
    database_url: str,
) -> None:
    async def ends_at_once(ctx: Any, input: Any) -> Any:
        return "ended"

    async def reads_the_signal(ctx: Any, input: Any) -> Any:
        return await ctx.wait_signal("go")

    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("wf")
            await _signal(p, "w", "go", "late")
            reply = await p.run_workflow_task(task, ends_at_once)
            assert reply.superseded and not reply.accepted
            assert (await p.describe("w")).status == "running"
            # The next workflow task replays the whole history, the signal included: code
            # that reads it (here, other code than the refused decision's) gets it.
            await p.drive(reads_the_signal, "wf")
            final = await p.describe("w")
            assert final.status == "completed" and json.loads(final.result) == "late"


async def test_a_decision_overtaken_by_a_cancel_request_is_refused(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("wf", "work")
            await p.channel.unary(
                p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id="w", reason="x")
            )
            reply = await p.run_workflow_task(task, work_then_wait)
            assert reply.superseded and not reply.accepted
            await p.drive(work_then_wait, "wf")
            final = await p.describe("w")
            assert final.status == "cancelled"
            # The decision applied is the one made on the cancel request, not the stale one.
            events = await _history(p, "w")
            types = [e["type"] for e in events]
            assert types[:3] == [
                "workflow_started",
                "workflow_cancel_requested",
                "workflow_task_completed",
            ]
            assert "seen_sequence" not in events[2]


async def test_a_stream_of_signals_does_not_stop_a_workflow(database_url: str) -> None:
    """Two senders signal as fast as the control plane takes it. The workflow schedules an
    activity after its third signal; it runs while the stream goes on (before this session's
    change, every decision was superseded until the stream stopped), and no signal is lost
    or delivered twice."""
    reg = Registry()
    marked = trio.Event()

    @activity(registry=reg)
    async def mark(ctx: ActivityContext, n: int) -> int:
        marked.set()
        return n

    @workflow(registry=reg)
    async def counter(ctx: Any, input: Any) -> Any:
        got = [await ctx.wait_signal("s") for _ in range(3)]
        await ctx.execute_activity(mark, len(got))
        while (value := await ctx.wait_signal("s")) != "stop":
            got.append(value)
        return got

    cap = 1_500  # signals in all, if the activity never ran
    sent: list[int] = []
    with trio.fail_after(120):
        async with control_plane(database_url) as address, client(address) as (channel, stub):
            worker = Worker(reg, address=address, grace_period=2, max_concurrent_tasks=4)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                wid = await _start(channel, stub, "counter", None)

                async def send(first: int) -> None:
                    n = first
                    while not marked.is_set() and len(sent) < cap:
                        await channel.unary(
                            stub.signal_workflow,
                            pb.SignalWorkflowRequest(
                                workflow_id=wid, name="s", payload=payload.encode(n)
                            ),
                        )
                        sent.append(n)
                        n += 2

                async with trio.open_nursery() as senders:
                    senders.start_soon(send, 0)
                    senders.start_soon(send, 1)
                assert marked.is_set(), f"the activity did not run during {len(sent)} signals"
                await channel.unary(
                    stub.signal_workflow,
                    pb.SignalWorkflowRequest(
                        workflow_id=wid, name="s", payload=payload.encode("stop")
                    ),
                )
                done = await _result(channel, stub, wid)
                worker.shutdown()
    assert done.status == "completed"
    got = payload.decode(done.result)
    assert sorted(got) == sorted(sent)
    # Each sender's signals arrive in the order it sent them.
    for parity in (0, 1):
        mine = [n for n in got if n % 2 == parity]
        assert mine == sorted(mine)
