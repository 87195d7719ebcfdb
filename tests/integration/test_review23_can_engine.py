"""Review of 394bb3a/6c9379e (ctx.continue_as_new), against the control plane on PostgreSQL,
driven by a scripted worker: cancel requests and a chain of runs.

Each test fails on 6c9379e and passes once its defect is mended."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.errors import WorkflowCancelled
from everruns.server.engine import Engine
from tests.integration.test_engine import plane

pytestmark = pytest.mark.db


async def _open_runs(pool: pg.Pool, wid: str) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT id, status, cancel_requested_at FROM durable_workflow_instances"
            " WHERE workflow_id = $1 AND completed_at IS NULL",
            wid,
        )
    )


async def _history_of(p: Any, wid: str, run_id: str = "") -> list[str]:
    reply = await p.channel.unary(
        p.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid, run_id=run_id)
    )
    return [e.type for e in reply.events]


# ------------------------------------------------------------------------------------------
# 1. A cancel request in the batch whose decision continues as new is lost.


async def cont_after_work(ctx: Any, state: Any) -> Any:
    if state is None:
        await ctx.execute_activity("work", 1)
        ctx.continue_as_new({"n": 1})
    return await ctx.wait_signal("never")


async def test_a_cancel_request_seen_with_the_continuing_decision_reaches_the_new_run(
    database_url: str, pool: pg.Pool
) -> None:
    """The activity's result and a cancel request arrive before the next workflow task is
    claimed: one batch. Replay delivers the result, the code continues as new at once, and
    the cancel request is delivered to code that has ended. The decision saw the request
    (nothing unseen supersedes it), so the run ends continued_as_new and the new run starts
    with no cancel request: the workflow the client cancelled (CancelWorkflow answered OK)
    goes on for ever. Signals of that same batch are carried (`_take_commands`); the
    cancel request is not."""
    with trio.fail_after(60):
        async with plane(database_url) as p:
            await p.start("cont_after_work", None, wid="c")
            await p.drive(cont_after_work, "cont_after_work")  # schedules the activity
            (work,) = await p.poll(act=["work"])
            await p.complete(work, 1)
            await p.channel.unary(
                p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id="c")
            )
            await p.drive(cont_after_work, "cont_after_work")  # one batch: result + cancel
            statuses = [
                r["status"]
                for r in await pool.fetch(
                    "SELECT status FROM durable_workflow_instances WHERE workflow_id = 'c'"
                    " ORDER BY created_at"
                )
            ]
            assert statuses[0] == "continued_as_new", statuses
            # Give the new run its workflow task, if it has one.
            for task in await p.poll(wf=["cont_after_work"], wait=1):
                await p.run_workflow_task(task, cont_after_work)
            open_runs = await _open_runs(pool, "c")
            history = await _history_of(p, "c")
    assert not open_runs or all(r["cancel_requested_at"] is not None for r in open_runs), (
        "the workflow was cancelled, but the run it continued in has no cancel request and "
        f"runs on: {[dict(r) for r in open_runs]}, history {history}"
    )


# ------------------------------------------------------------------------------------------
# 2. A cancel of a chain's new run before a worker claims it skips the workflow's code.


async def cleans_up(ctx: Any, state: Any) -> Any:
    if state is None:
        ctx.continue_as_new({"n": 1})
    try:
        return await ctx.wait_signal("never")
    except WorkflowCancelled:
        await ctx.execute_activity("compensate", 1)
        raise


async def test_a_cancel_just_after_a_continuation_lets_the_code_clean_up(
    database_url: str,
) -> None:
    """`_request_cancel` ends a run at once when "no worker ever picked it up ... no code ran
    that could see the request" (started_at IS NULL). A run started by `_continue` has
    started_at NULL until its first workflow task is claimed, yet the workflow's code has
    been running for the whole chain: a cancel that lands in that window ends the workflow
    cancelled without its code seeing it (no compensation, the carried signals dropped),
    while a cancel a moment later would run the clean-up. DESIGN §3: the code "sees a
    cancellation exception at its current await, may run cleanup activities"."""
    with trio.fail_after(60):
        async with plane(database_url) as p:
            await p.start("cleans_up", None, wid="k")
            await p.drive(cleans_up, "cleans_up")  # continues as new
            await p.channel.unary(
                p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id="k")
            )
            status_after_cancel = (await p.describe("k")).status
            tasks = await p.poll(wf=["cleans_up"], wait=1)
            for task in tasks:
                await p.run_workflow_task(task, cleans_up)
            history = await _history_of(p, "k")
    assert tasks and "activity_scheduled" in history, (
        "the continued run was cancelled before its code ran (status "
        f"{status_after_cancel!r} at once): its clean-up never ran; history {history}"
    )


# ------------------------------------------------------------------------------------------
# 3. A child that continues as new while its parent ends escapes the parent's cancel.


async def parent_of_kid(ctx: Any, _: Any) -> Any:
    return await ctx.execute_child_workflow("kid", None, workflow_id="the-kid")


async def kid(ctx: Any, state: Any) -> Any:
    if state is None:
        await ctx.wait_signal("go")
        ctx.continue_as_new({"n": 1})
    return await ctx.wait_signal("never")


async def test_a_child_continuing_while_its_parent_ends_is_not_left_running(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's continuing decision holds the child's old run (lock_leased_with_run) while
    `_continue` creates the new run. The parent's cancel request and then its end
    (`_cancel_children`, lock_open_children ... SKIP LOCKED) skip the held old run and leave
    its follow-up, `cancel_if_orphaned(old run)`; the new run is not committed yet, so they
    cannot see it. Once the continuation commits, the follow-up finds the old run closed
    (`_orphaned_because`: not open -> nothing to do) and settles the record; the reclaim
    sweep (`cancel_orphaned_children`) reads only those records and children without a
    parent. The new child run, whose parent has ended cancelled, runs on with no cancel
    request, for ever. (Even followed to the new run, `_orphaned_because` would spare it
    under a parent still open: it was created after the parent's cancel request.)"""
    gate = trio.Event()
    entered = trio.Event()
    engines: list[Engine] = []
    original = Engine._continue

    async def held(self: Engine, conn: Any, run: Any, next: Any) -> None:
        engines.append(self)
        entered.set()
        await gate.wait()  # the continuation's transaction holds the old child run here
        await original(self, conn, run, next)

    monkeypatch.setattr(Engine, "_continue", held)
    with trio.fail_after(60):
        async with plane(database_url) as p:
            await p.start("parent_of_kid", None, wid="P")
            await p.drive(parent_of_kid, "parent_of_kid")  # starts the child
            await p.drive(kid, "kid")  # the child waits for "go"
            await p.channel.unary(
                p.workflows.signal_workflow,
                pb.SignalWorkflowRequest(workflow_id="the-kid", name="go", payload=b"null"),
            )
            (kid_task,) = await p.poll(wf=["kid"])
            decision = p.decide(kid_task, kid)
            assert json.loads(decision.commands)[-1]["type"] == "continue_as_new"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.channel.unary, p.workers.complete_workflow_task, decision)
                await entered.wait()
                # The parent is cancelled and ends while the child's continuation is under way.
                await p.channel.unary(
                    p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id="P")
                )
                await p.drive(parent_of_kid, "parent_of_kid")
                assert (await p.describe("P")).status == "cancelled"
                gate.set()
            # The follow-ups of the skips run once the continuation lets go of the old run.
            while await pool.fetchval(  # noqa: ASYNC110 (a database state)
                "SELECT count(*) FROM durable_skipped_cancels"
            ):
                await trio.sleep(0.05)
            await engines[0].cancel_orphaned_children()  # the reclaim round's sweep
            open_runs = await _open_runs(pool, "the-kid")
    assert len(open_runs) <= 1
    assert all(r["cancel_requested_at"] is not None for r in open_runs), (
        "the parent ended cancelled while its child continued as new; the child's new run "
        f"has no cancel request and runs on: {[dict(r) for r in open_runs]}"
    )


# ------------------------------------------------------------------------------------------
# 4. AwaitResult with wait_s=0 on a pinned earlier run of a chain that has ended.


async def once_more(ctx: Any, state: Any) -> Any:
    if state is None:
        ctx.continue_as_new(1)
    return {"done": state}


async def test_await_result_without_waiting_answers_a_finished_chain(database_url: str) -> None:
    """`handle.result(timeout=0)` "returns the result of a run that has already ended". For a
    handle pinned to a chain's first run, AwaitResult follows `continued_run_id` with a read
    (`store.get_run`) inside `move_on_after(wait_s)`: with wait_s=0 that read is cancelled at
    once, the loop leaves with the first run, and the reply says done=False for a chain whose
    last run completed long ago (the client raises TimeoutError). A short timeout hits the
    same race between reads."""
    with trio.fail_after(60):
        async with plane(database_url) as p:
            await p.start("once_more", None, wid="o")
            first = (await p.describe("o")).run_id
            await p.drive(once_more, "once_more")  # continues as new
            await p.drive(once_more, "once_more")  # the second run completes
            assert (await p.describe("o")).status == "completed"
            reply = await p.channel.unary(
                p.workflows.await_result,
                pb.AwaitResultRequest(workflow_id="o", run_id=first, wait_s=0),
            )
    assert reply.done, (
        "AwaitResult(wait_s=0) of the chain's first run answered done=False (run "
        f"{reply.workflow.run_id}, status {reply.workflow.status}) though the chain ended "
        "completed"
    )
    assert json.loads(reply.workflow.result) == {"done": 1}
