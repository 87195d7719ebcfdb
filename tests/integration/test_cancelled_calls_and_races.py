"""Cancel and crash races in the control plane's completion paths, wake-ups and lock order.
Each test states the behaviour the design promises; its docstring says what went wrong before.

Interleavings are forced, not hoped for: a second PostgreSQL connection holds the row lock that
makes the control plane wait at the point of interest, and the test acts while it waits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.server.notifier import TaskInterest
from tests.integration.test_engine import Plane, one_step, plane

pytestmark = pytest.mark.db


@asynccontextmanager
async def row_locked(database_url: str, query: str, *args: Any) -> AsyncIterator[pg.Connection]:
    """Hold the row locks ``query`` (a SELECT ... FOR UPDATE) takes, in a transaction of a
    connection of our own, for the block; rolled back (nothing changed, no NOTIFY) at its end."""
    async with pg.connect(database_url) as conn:
        await conn.execute("BEGIN")
        try:
            rows = await conn.fetch(query, *args)
            assert rows, f"nothing to lock: {query}"
            yield conn
        finally:
            with trio.move_on_after(5, shield=True):
                await conn.execute("ROLLBACK")


async def until(pool: pg.Pool, query: str, *args: Any, what: str) -> None:
    """Wait (bounded by the test's deadline) until ``query`` returns true."""
    while not await pool.fetchval(query, *args):  # noqa: ASYNC110 (a database state: no event)
        await trio.sleep(0.02)


async def waiting_on_lock(pool: pg.Pool) -> None:
    """Wait until some session of the database waits for a row lock."""
    await until(
        pool,
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock')",
        what="a session waiting for a lock",
    )


async def cancelled_call(p: Plane, method: Callable[..., Any], request: Any, ready: Any) -> None:
    """Send ``request`` and cancel the call (as a worker whose call timed out does) once
    ``ready()`` returns: the control plane gets the cancel notice on the call stream."""
    async with trio.open_nursery() as nursery:
        outcome: list[Any] = []

        async def call() -> None:
            outcome.append(await p.channel.unary(method, request))

        nursery.start_soon(call)
        await ready()
        assert not outcome, "the call was answered before it could be cancelled"
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# 1. Tasks claimed for a worker inside a completion call that is then cancelled stay claimed.


async def test_eager_activities_of_a_cancelled_complete_workflow_tasks_call_are_released(
    database_url: str, pool: pg.Pool
) -> None:
    """CompleteWorkflowTasks: the fast-path statement commits and claims the new activity for
    the worker (eager), then the call waits for another completion's run lock on the general
    path. The worker's call is cancelled (its RPC budget ran out) before the reply. The worker
    never hears of the eager activity: it must go back to the queue (as a poll's claim or an
    eager start's task does), not stay claimed until the 30 s stale rule."""
    with trio.fail_after(40):
        async with plane(database_url) as p:
            _, requests = await p.first_decisions(one_step, "step", ["a", "nap"], "x")
            nap_run = await pool.fetchval(
                "SELECT id FROM durable_workflow_instances WHERE workflow_id = 'x-1'"
            )
            async with row_locked(
                database_url,
                "SELECT id FROM durable_workflow_instances WHERE id = $1 FOR UPDATE",
                nap_run,
            ):

                async def fast_path_committed() -> None:
                    await until(
                        pool,
                        "SELECT EXISTS (SELECT 1 FROM durable_task_queue WHERE workflow_id = 'x-0'"
                        " AND kind = 'activity' AND status = 'claimed')",
                        what="x-0's eager activity claimed",
                    )
                    await waiting_on_lock(pool)  # the general path waits for x-1's run

                await cancelled_call(
                    p,
                    p.workers.complete_workflow_tasks,
                    pb.CompleteWorkflowTasksRequest(completions=requests),
                    fast_path_committed,
                )
            # The worker never got x-0's activity. Anyone polling should get it promptly.
            got = await p.poll(act=["work"], wait=3)
            row = await pool.fetchrow(
                "SELECT status, claimed_by FROM durable_task_queue"
                " WHERE workflow_id = 'x-0' AND kind = 'activity'"
            )
            assert [t.workflow_id for t in got] == ["x-0"], (
                f"x-0's activity, claimed for a reply that was never delivered, is stranded: "
                f"{dict(row)} (poll got {[t.workflow_id for t in got]})"
            )


async def test_follow_up_workflow_task_of_a_cancelled_complete_activity_tasks_call_is_released(
    database_url: str, pool: pg.Pool
) -> None:
    """CompleteActivityTasks: the results' statement commits and claims the run's next workflow
    task for the worker (eager), then the call records a success on the activity's breaker
    (not closed), whose row another transaction holds. The worker's call is cancelled before
    the reply: the workflow task it never received must go back to the queue, not stay
    claimed for 30 s with the run stalled."""
    with trio.fail_after(40):
        async with plane(database_url) as p:
            _, (activity,) = await p.first_steps(one_step, "step", ["a"], "y")
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, opened_at)"
                " VALUES ('work', 'half_open', now() - interval '1 hour')"  # the task: its probe
            )
            async with row_locked(
                database_url,
                "SELECT key FROM durable_circuit_breaker_state WHERE key = 'work' FOR UPDATE",
            ):

                async def results_committed() -> None:
                    await until(
                        pool,
                        "SELECT EXISTS (SELECT 1 FROM durable_task_queue WHERE workflow_id = 'y-0'"
                        " AND kind = 'workflow' AND status = 'claimed')",
                        what="y-0's follow-up workflow task claimed",
                    )
                    await waiting_on_lock(pool)  # the breaker's success waits for its row

                await cancelled_call(
                    p,
                    p.workers.complete_activity_tasks,
                    pb.CompleteActivityTasksRequest(
                        worker_id="w1",
                        results=[
                            pb.ActivityResult(
                                task_id=activity.task_id,
                                lease_token=activity.lease_token,
                                result=b"1",
                            )
                        ],
                        max_new_tasks=1,
                    ),
                    results_committed,
                )
            got = await p.poll(wf=["step"], wait=3)
            row = await pool.fetchrow(
                "SELECT status, claimed_by, attempt FROM durable_task_queue"
                " WHERE workflow_id = 'y-0' AND kind = 'workflow' AND status <> 'completed'"
            )
            assert [t.workflow_id for t in got] == ["y-0"], (
                f"y-0's next workflow task, claimed for a reply that was never delivered, is "
                f"stranded: {dict(row) if row else None} (poll got {[t.workflow_id for t in got]})"
            )


# ------------------------------------------------------------------------------------------
# 2. A lost wake-up waits for the due-scanner, which may sleep the whole reclaim interval.


async def test_a_lost_wake_up_costs_about_one_second_not_a_reclaim_interval(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pending activity's row is locked by another transaction (another control plane's
    claim, which looks at one row past its limit) when a long poll claims: SKIP LOCKED skips
    it, the poll finds nothing and waits. The lock ends with no change and so no NOTIFY. The
    design's safety net re-announces tasks left waiting over 1 s, so the poll should get the
    task about a second later; the due-scanner only looks for stragglers when it wakes for
    something else, at most every reclaim interval (10 s)."""
    waiting = trio.Event()
    original_wait = TaskInterest.wait

    async def noting_wait(self: TaskInterest) -> None:
        if any(k == "activity:work" for k in self.keys):
            waiting.set()
        await original_wait(self)

    monkeypatch.setattr(TaskInterest, "wait", noting_wait)
    with trio.fail_after(40):
        async with plane(database_url) as p:
            await p.register(workflow_types=["step"], activity_types=["work"])
            await p.start("step", "a", wid="z")
            await p.drive(one_step, "step")  # schedules "work", no claimer waiting for it
            task_id = await pool.fetchval(
                "SELECT id FROM durable_task_queue WHERE kind = 'activity' AND status = 'pending'"
            )
            assert task_id is not None
            got: list[pb.Task] = []
            async with trio.open_nursery() as nursery:
                async with row_locked(
                    database_url,
                    "SELECT id FROM durable_task_queue WHERE id = $1 FOR UPDATE",
                    task_id,
                ):

                    async def poll() -> None:
                        got.extend(await p.poll(act=["work"], wait=25))

                    nursery.start_soon(poll)
                    await waiting.wait()  # the poll's claim skipped the row and it now waits
                    await trio.sleep(1.1)  # the task has waited over the 1 s safety margin
                released_at = trio.current_time()
            took = trio.current_time() - released_at
            assert [t.task_id for t in got] == [str(task_id)]
            assert took < 3.0, (
                f"the task waited {took:.1f} s after its row was free: the straggler safety net "
                "runs only when the due-scanner wakes (up to reclaim_interval = 10 s)"
            )


# ------------------------------------------------------------------------------------------
# 3. Lock order: a failing activity locks task then run, a cancel locks run then tasks.


async def locks_awaited(pool: pg.Pool, count: int) -> None:
    await until(
        pool,
        "SELECT count(*) >= $1 FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'",
        count,
        what=f"{count} sessions waiting for locks",
    )


async def test_cancel_racing_an_activity_failure_is_not_refused_as_unavailable(
    database_url: str, pool: pg.Pool
) -> None:
    """FailActivityTask locks the task row, then the breaker row, then the run; CancelWorkflow
    locks the run, then the run's task rows. A cancel that arrives while the failure report
    holds the task (here: waiting a moment for its breaker row, which a claim or another
    report holds) waits for the task while holding the run; the failure then asks for the run:
    a deadlock, and PostgreSQL aborts the cancel (it waited first). The user's
    `WorkflowHandle.cancel()` raises ServerUnavailable ("... to be retried") and is not
    retried, though the control plane was up the whole time and the cancel is idempotent."""
    from everruns.client import Client

    with trio.fail_after(40):
        async with plane(database_url) as p:
            _, (activity,) = await p.first_steps(one_step, "step", ["a"], "c")
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state) VALUES ('work', 'closed')"
            )
            cancel_error: list[BaseException] = []
            async with (
                Client.connect(f"127.0.0.1:{p.port}") as client,
                trio.open_nursery() as nursery,
                row_locked(
                    database_url,
                    "SELECT key FROM durable_circuit_breaker_state WHERE key = 'work' FOR UPDATE",
                ),
            ):
                nursery.start_soon(p.fail, activity)  # holds the task, waits for the breaker
                await locks_awaited(pool, 1)

                async def cancel() -> None:
                    try:
                        await client.get_handle("c-0").cancel("user asked")
                    except Exception as exc:
                        cancel_error.append(exc)

                nursery.start_soon(cancel)  # holds the run, waits for the task
                await locks_awaited(pool, 2)
                # The breaker row is free: the failure report goes on and asks for the run.
            status = await pool.fetchval(
                "SELECT cancel_requested_at IS NOT NULL FROM durable_workflow_instances"
                " WHERE workflow_id = 'c-0'"
            )
            assert not cancel_error, (
                f"the user's cancel failed with {type(cancel_error[0]).__name__}: "
                f"{cancel_error[0]} (cancel recorded: {status})"
            )
            assert status
