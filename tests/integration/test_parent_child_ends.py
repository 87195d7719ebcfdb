"""A parent and its child ending at the same moment: neither waits for the other's run while
holding its own, and an ended (or cancelled) parent still leaves no child running.

A child's end holds the child's run and then waits for its parent's, to tell it; a parent's
end (or its cancellation) held the parent's run and then waited for each open child's, to
cancel it. PostgreSQL aborted one of the two after `deadlock_timeout` (1 s) and the call was
retried as UNAVAILABLE (session 18's known limit). Now the parent skips a child another
transaction holds; the control plane cancels it once that transaction lets go, and the
reclaim round finds any child left open by an ended parent. Every test failed before the fix
(the parent's end or cancel waited for the held child; nothing swept; the race deadlocked; a
results batch locked the parent first; retention waited for the held child).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.store.store import Store
from tests.integration.test_engine import Plane, plane
from tests.integration.test_store import _child, _run
from tests.integration.test_timer_lock_order import _engine, _holding_run, _until_waiters

pytestmark = pytest.mark.db

OPEN = ("pending", "running")


async def leaving_parent(ctx: Any, input: Any) -> Any:
    """Starts its child (workflow id ``input``) and ends on signal "go" without waiting for it."""
    ctx.start_child_workflow("kid", None, workflow_id=input)
    return await ctx.wait_signal("go")


async def waiting_parent(ctx: Any, input: Any) -> Any:
    return await ctx.execute_child_workflow("kid", None, workflow_id=input)


async def kid(ctx: Any, input: Any) -> Any:
    return await ctx.wait_signal("go")


async def working_parent(ctx: Any, input: Any) -> Any:
    child = ctx.start_child_workflow("working_kid", None, workflow_id=input)
    await ctx.execute_activity("work", 1)
    return await child


async def working_kid(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity("work", 2)


async def _family(p: Plane, parent: Any, kid_id: str, wid: str | None = None) -> str:
    """Start a ``parent`` run (workflow type: its name) whose child is ``kid_id``; drive both
    until the child waits for its signal. Returns the parent's workflow id."""
    wid = await p.start(parent.__name__, kid_id, wid=wid)
    await p.drive(parent, parent.__name__)
    await p.drive(kid, "kid")
    return wid


async def _run_id(p: Plane, wid: str) -> uuid.UUID:
    return uuid.UUID((await p.describe(wid)).run_id)


async def _signal(p: Plane, wid: str) -> None:
    await p.channel.unary(
        p.workflows.signal_workflow,
        pb.SignalWorkflowRequest(workflow_id=wid, name="go", payload=b"1"),
    )


async def _cancel_requested(p: Plane, wid: str) -> bool:
    return "workflow_cancel_requested" in await p.history_types(wid)


async def _until_cancel_requested(p: Plane, wid: str, seconds: float) -> bool:
    """Whether ``wid``'s cancellation is requested within ``seconds``."""
    with trio.move_on_after(seconds):
        while not await _cancel_requested(p, wid):  # noqa: ASYNC110 (a database state)
            await trio.sleep(0.05)
        return True
    return False


_ENDED = (
    "UPDATE durable_workflow_instances"
    " SET status = 'completed', result = '1', completed_at = now() WHERE id = $1"
)
_CANCEL_REQUESTED = (
    "UPDATE durable_workflow_instances SET cancel_requested_at = coalesce("
    " (SELECT created_at - interval '1 second' FROM durable_workflow_instances WHERE id = $2),"
    " clock_timestamp()) WHERE id = $1"
)
"""Run $1's cancellation requested now, or (with $2) a second before run $2 started."""
_SKIPPED = "INSERT INTO durable_skipped_cancels (row_id, kind, run_id) VALUES ($1, 'child', $2)"
"""The record of child $1's skip by its parent $2's end or cancel request (migration 010)."""


async def _open(p: Plane, *wids: str) -> bool:
    """Whether one of the runs is open."""
    return any([(await p.describe(wid)).status in OPEN for wid in wids])


async def _end_kids(p: Plane) -> None:
    """Run the pending workflow tasks of the "kid" runs, each once."""
    for task in await p.poll(wf=["kid"], wait=1):
        await p.run_workflow_task(task, kid)


async def _with_the_child_held(
    p: Plane, database_url: str, what: str, act: Callable[[], Awaitable[Any]]
) -> None:
    """Run ``act`` (``what``: a parent's end or cancellation) while another transaction holds
    the run of the parent's child "held-kid", as the child's own end would: it must not wait
    for it. Once the child's run is free, the child gets its cancel request and ends
    cancelled."""
    async with _holding_run(database_url, await _run_id(p, "held-kid")) as release:
        with trio.move_on_after(0.9) as waited:
            await act()
        assert not waited.cancelled_caught, (
            f"{what} waited for its child's run, which another transaction held; a child's "
            "end holds its run and then waits for its parent's: a deadlock PostgreSQL breaks "
            "after a second"
        )
        assert not await _cancel_requested(p, "held-kid")
        await release()
    assert await _until_cancel_requested(p, "held-kid", 5), (
        f"the child {what} skipped was not cancelled once its run was free"
    )
    await p.drive(kid, "kid")
    assert (await p.describe("held-kid")).status == "cancelled"


async def test_a_parent_that_ends_does_not_wait_for_a_child_another_transaction_holds(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await _family(p, leaving_parent, "held-kid")
            await _signal(p, wid)
            (task,) = await p.poll(wf=["leaving_parent"])
            await _with_the_child_held(
                p,
                database_url,
                "the parent's end",
                lambda: p.run_workflow_task(task, leaving_parent),
            )
            assert (await p.describe(wid)).status == "completed"


async def test_a_parent_cancelled_does_not_wait_for_a_child_another_transaction_holds(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await _family(p, waiting_parent, "held-kid")
            await _with_the_child_held(
                p,
                database_url,
                "the parent's cancellation",
                lambda: p.channel.unary(
                    p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid)
                ),
            )
            await p.drive(waiting_parent, "waiting_parent")
            assert (await p.describe(wid)).status == "cancelled"


async def test_the_reclaim_round_cancels_the_children_an_ended_parent_left_open(
    database_url: str, pool: pg.Pool
) -> None:
    """States a control plane that stopped between a parent's end and its follow-up leaves
    behind, written with SQL (with the record of the skip that the parent's end or cancel
    request writes, `_SKIPPED`): the reclaim round requests the cancellation of an open child
    whose parent ended, whose parent's row is gone, or whose parent's cancellation was
    requested after it started; it leaves alone a child whose cancellation was requested
    already, a child whose parent is open, and a child its parent started after its own
    cancellation was requested (clean-up), and settles every record."""
    with trio.fail_after(60):
        async with plane(database_url, reclaim_interval=0.2) as p:
            family = {
                name: await _family(p, waiting_parent, f"kid-{name}")
                for name in ("ended", "gone", "cancelled", "requested", "open", "clean-up")
            }
            ids = {name: await _run_id(p, wid) for name, wid in family.items()}
            kids = {name: await _run_id(p, f"kid-{name}") for name in family}
            await pool.execute(_ENDED, ids["ended"])
            await pool.execute("DELETE FROM durable_workflow_instances WHERE id = $1", ids["gone"])
            await pool.execute(_CANCEL_REQUESTED, ids["cancelled"], None)
            async with pool.transaction() as conn:  # in one step: no round sees half of it
                await conn.execute(_ENDED, ids["requested"])
                await conn.execute(_CANCEL_REQUESTED, kids["requested"], None)
            await pool.execute(_CANCEL_REQUESTED, ids["clean-up"], kids["clean-up"])
            for name in ("ended", "cancelled", "requested", "clean-up"):
                await pool.execute(_SKIPPED, kids[name], ids[name])
            for name in ("ended", "gone", "cancelled"):
                assert await _until_cancel_requested(p, f"kid-{name}", 5), (
                    f"no reclaim round requested the cancellation of the open child whose "
                    f"parent {name}"
                )
            await trio.sleep(1.0)  # five more rounds
            for name in ("requested", "open", "clean-up"):
                assert not await _cancel_requested(p, f"kid-{name}"), name
                assert (await p.describe(f"kid-{name}")).status == "running", name
            assert await pool.fetchval("SELECT count(*) FROM durable_skipped_cancels") == 0
            await _end_kids(p)
            for name in ("ended", "gone", "cancelled"):
                assert (await p.describe(f"kid-{name}")).status == "cancelled", name


async def test_a_parent_and_its_child_ending_together_neither_waits_nor_fails(
    database_url: str,
) -> None:
    """The real race, many times: the parent's decision (it ends, its child still open) and
    the child's (it ends, and tells its parent) applied at the same moment, by one call that
    runs both at once, each in its own transaction."""
    with trio.fail_after(120):
        async with plane(database_url) as p:
            for n in range(20):
                wid = await _family(p, leaving_parent, f"race-kid-{n}", wid=f"race-{n}")
                await _signal(p, wid)
                await _signal(p, f"race-kid-{n}")
                (parent_task,) = await p.poll(wf=["leaving_parent"])
                (kid_task,) = await p.poll(wf=["kid"])
                began = trio.current_time()
                reply = await p.channel.unary(
                    p.workers.complete_workflow_tasks,
                    pb.CompleteWorkflowTasksRequest(
                        completions=[
                            p.decide(parent_task, leaving_parent),
                            p.decide(kid_task, kid),
                        ]
                    ),
                )  # a deadlock failed the call: UNAVAILABLE
                took = trio.current_time() - began
                assert took < 0.9, f"round {n}: the two ends took {took:.2f} s (a lock wait)"
                assert [o.refused_status for o in reply.outcomes] == ["", ""], reply.outcomes
                # The parent's end got the child first (a cancel request, which supersedes
                # the child's decision), or the child's end came first (its result supersedes
                # the parent's decision to end): either way both end, in a few more tasks.
                while await _open(p, wid, f"race-kid-{n}"):
                    for task in await p.poll(wf=["leaving_parent", "kid"], wait=0.2):
                        fn = kid if task.workflow_type == "kid" else leaving_parent
                        await p.run_workflow_task(task, fn)
                assert (await p.describe(wid)).status == "completed"
                status = (await p.describe(f"race-kid-{n}")).status
                assert status in ("completed", "cancelled"), (n, status)


async def test_a_batch_of_results_locks_a_child_before_its_parent(
    database_url: str, pool: pg.Pool
) -> None:
    """A results call with an activity result of a parent and one of its child locks their
    runs child first, as a child's end does; in id order it could hold the parent while it
    waited for a child whose end waited for that parent."""
    with trio.fail_after(60):
        async with plane(database_url) as p:
            for n in range(40):  # a family whose parent's run id sorts first
                wid = await p.start("working_parent", f"worker-{n}", wid=f"boss-{n}")
                await p.drive(working_parent, "working_parent")
                await p.drive(working_kid, "working_kid")
                parent, child = await _run_id(p, wid), await _run_id(p, f"worker-{n}")
                if parent < child:
                    break
            else:
                pytest.fail("no parent's run id sorted before its child's")
            work: list[pb.Task] = []
            while len(work) < 2:  # this family's two activities (the others' are left)
                tasks = await p.poll(act=["work"], wait=1)
                work += [t for t in tasks if t.workflow_id in (wid, f"worker-{n}")]
            results = [
                pb.ActivityResult(task_id=t.task_id, lease_token=t.lease_token, result=b"0")
                for t in work
            ]
            async with (
                _holding_run(database_url, child) as release,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(
                    p.channel.unary,
                    p.workers.complete_activity_tasks,
                    pb.CompleteActivityTasksRequest(worker_id="w1", results=results),
                )
                await _until_waiters(pool, 1)  # the batch waits for the child's run
                async with pool.transaction() as conn:
                    free = await conn.fetchval(
                        "SELECT id FROM durable_workflow_instances WHERE id = $1"
                        " FOR UPDATE SKIP LOCKED",
                        parent,
                    )
                await release()
            assert free == parent, (
                "the results batch held the parent's run while it waited for its child's"
            )


async def test_retention_keeps_an_expired_parent_while_a_child_of_it_is_open(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    """Deleting a parent sets its children's parent_run_id to NULL by cascade: retention,
    holding the parent, waited for a child another transaction held, such as the child's end,
    which then waits for its parent. An expired parent is now kept while a child of it is
    open, and goes with it once it has ended."""
    aged = (
        "UPDATE durable_workflow_instances SET completed_at = now() - interval '1 hour'"
        " WHERE id = $1"
    )
    with trio.fail_after(30):
        engine = _engine(store, database_url, retention_seconds=60.0)
        parent = await _run(store, "old", "boss")
        child = await _child(store, parent)
        async with store.transaction() as conn:
            await store.end_run(conn, parent.run_id, "cancelled")
        await pool.execute(aged, parent.run_id)
        async with _holding_run(database_url, child.run_id):
            with trio.move_on_after(2) as waited:
                deleted = await engine.delete_expired()
            assert not waited.cancelled_caught, (
                "retention deleted an expired parent whose child is open, and waited for the "
                "child's run, which another transaction held"
            )
        assert deleted == 0
        async with store.transaction() as conn:
            await store.end_run(conn, child.run_id, "cancelled")
        await pool.execute(aged, child.run_id)
        assert await engine.delete_expired() == 2
