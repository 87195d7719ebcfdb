"""Review of 3ab0d8b (a parent and its child ending at the same moment) and 6cd3a6c
(FailWorkflowTaskRequest.seen_sequence): each test fails on 3ab0d8b and passes once its
defect is mended."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from tests.integration.test_engine import plane
from tests.integration.test_parent_child_ends import _run_id
from tests.integration.test_timer_lock_order import _capture, _until_waiters

pytestmark = pytest.mark.db


async def two_works(ctx: Any, input: Any) -> Any:
    return await ctx.gather(ctx.start_activity("work", 1), ctx.start_activity("work", 2))


async def test_a_cancel_and_a_result_of_the_same_run_do_not_deadlock(
    database_url: str, pool: pg.Pool
) -> None:
    """The results statement locks the activity's TASK row (its UPDATE) and then the RUN row;
    a cancel request (or a run's end, or a parent's end passing its cancel on to a child)
    holds the RUN row and then writes each of its claimed activities' TASK rows
    (`_cancel_activities`: request_task_cancel). Opposite orders: a result of a run's second
    activity arriving while its cancel is on the way to that row deadlocks, and PostgreSQL
    aborts one of the two after a second (UNAVAILABLE). The same holds for a parent's end
    that cancels a child whose activity reports (3ab0d8b changed only the run-row order)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("two_works", None, wid="two")
            await p.drive(two_works, "two_works")
            work: list[pb.Task] = []
            while len(work) < 2:
                work += await p.poll(act=["work"], wait=1)
            run_id = await _run_id(p, wid)
            rows = await pool.fetch(
                "SELECT id FROM durable_task_queue WHERE run_id = $1 AND kind = 'activity'"
                " ORDER BY created_at, activity_id",
                run_id,
            )
            first, second = (str(r["id"]) for r in rows)
            (late,) = [t for t in work if t.task_id == second]
            errors: dict[str, BaseException] = {}
            done: set[str] = set()
            result_done: set[str] = set()
            async with pg.connect(database_url) as x:
                await x.execute("BEGIN")
                # Something else holds the first activity's task row for a moment (a
                # heartbeat, the stale rule...): the cancel waits there, holding the run.
                await x.execute(
                    "SELECT 1 FROM durable_task_queue WHERE id = $1 FOR UPDATE", uuid.UUID(first)
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        _capture(
                            errors,
                            "cancel",
                            lambda: p.channel.unary(
                                p.workflows.cancel_workflow,
                                pb.CancelWorkflowRequest(workflow_id=wid),
                            ),
                            done,
                        )
                    )
                    # Before the fix the cancel waits there; once mended it skips the row
                    # and ends (the row's follow-up waits for it instead).
                    await _until_waiters(pool, 1, done)
                    nursery.start_soon(
                        _capture(
                            errors,
                            "result",
                            lambda: p.channel.unary(
                                p.workers.complete_activity_tasks,
                                pb.CompleteActivityTasksRequest(
                                    worker_id="w1",
                                    results=[
                                        pb.ActivityResult(
                                            task_id=late.task_id,
                                            lease_token=late.lease_token,
                                            result=b"2",
                                        )
                                    ],
                                ),
                            ),
                            result_done,
                        )
                    )
                    # Before the fix the result holds its task and waits for the run; once
                    # mended, nothing holds the run and it ends.
                    await _until_waiters(pool, 2, result_done)
                    await x.execute("ROLLBACK")
            assert not errors, (
                f"a cancel request and an activity result of the same run deadlocked: {errors}"
            )
