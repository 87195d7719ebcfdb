"""`Store.retry_stuck_runs`: a worker's registration gives the stuck runs of its workflow types
another try (session 22). Exactly the open stuck runs of those types with no workflow task out
get one; a run another transaction holds is skipped, never waited for."""

from __future__ import annotations

import pytest
import trio

from everruns.store.models import WorkflowRun
from everruns.store.queries import QUERIES
from everruns.store.store import Store

pytestmark = pytest.mark.db


async def _stuck_run(store: Store, workflow_id: str, wtype: str, *, stuck: bool) -> WorkflowRun:
    """An open run whose workflow task failed (closed), marked stuck when ``stuck``."""
    async with store.transaction() as conn:
        run, _ = await store.create_workflow(
            conn, workflow_id=workflow_id, workflow_type=wtype, input="null"
        )
        await conn.execute(
            "UPDATE durable_task_queue SET status = 'completed', completed_at = now() "
            "WHERE run_id = $1 AND kind = 'workflow'",
            run.run_id,
        )
        if stuck:
            await store.set_stuck(conn, run.run_id, "non-determinism: test")
    return run


async def _workflow_tasks(store: Store, run: WorkflowRun) -> int:
    async with store.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM durable_task_queue WHERE run_id = $1 AND kind = 'workflow' "
            "AND status IN ('pending', 'claimed')",
            run.run_id,
        )
    return count


async def test_only_open_stuck_runs_of_the_types_with_no_task_out_get_one(store: Store) -> None:
    with trio.fail_after(30):
        lone = await _stuck_run(store, "lone", "t", stuck=True)
        queued = await _stuck_run(store, "queued", "t", stuck=True)
        async with store.transaction() as conn:  # one already has a workflow task out
            await store.ensure_workflow_task(conn, await store.lock_run(conn, queued.run_id))
        held = await _stuck_run(store, "held", "t", stuck=True)
        other_type = await _stuck_run(store, "other", "u", stuck=True)
        fine = await _stuck_run(store, "fine", "t", stuck=False)
        ended = await _stuck_run(store, "ended", "t", stuck=True)
        async with store.transaction() as conn:
            await store.end_run(conn, ended.run_id, "cancelled")
        async with store.transaction() as conn:  # another transaction holds this run
            await store.lock_run(conn, held.run_id)
            with trio.fail_after(5):  # skipped, not waited for
                retried = await store.retry_stuck_runs(["t"])
        assert retried == [lone.run_id]
        assert await _workflow_tasks(store, lone) == 1
        assert await _workflow_tasks(store, queued) == 1  # not a second one
        for run in (held, other_type, fine, ended):
            assert await _workflow_tasks(store, run) == 0
        # Once released, the held run gets its try; the others are not tried twice.
        assert await store.retry_stuck_runs(["t"]) == [held.run_id]
        assert await store.retry_stuck_runs(["t"]) == []
        assert await store.retry_stuck_runs([]) == []


async def test_the_look_reads_the_stuck_index_only(store: Store) -> None:
    """Every registration of a worker serving workflows runs it: with many runs and none
    stuck, it reads no run."""
    with trio.fail_after(60):
        for n in range(300):
            await _stuck_run(store, f"ok-{n}", "t", stuck=False)
        async with store.pool.acquire() as conn:
            # The statement itself (not run: EXPLAIN alone plans it, writing nothing).
            plan = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) " + QUERIES["retry_stuck_runs"], ["t"], 1000
            )
    text = str(plan)
    assert "durable_workflow_instances_stuck" in text, text
