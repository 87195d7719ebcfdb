"""The duties that lock several runs, one per task they handle, never wait for a run while they
hold another: releasing a lost worker's tasks, reclaiming stale tasks, enforcing activity
timeouts.

Each used to lock its tasks, then, task by task, each task's run, waiting: it could hold a
parent's run while it waited for its child's, which the child's end held while it waited for
its parent (to tell it), and PostgreSQL aborted one of the two after `deadlock_timeout` (1 s;
session 19's known limit). Now a duty locks the runs of its tasks at once, skipping a run
another transaction holds, and the follow-ups handle such a task as soon as that transaction
lets go (`Engine.finish_skipped`). Every test failed before the fix: the duty's round waited
for the held run (and, in the race, PostgreSQL aborted the duty or the child's end).
"""

from __future__ import annotations

import uuid

import pytest
import trio

from everruns._aio import pg
from everruns.server.duties import reclaim_once, run_follow_ups
from everruns.server.engine import Engine
from everruns.store.models import WorkflowRun
from everruns.store.store import Store
from tests.integration.test_store import _activity, _child, _run
from tests.integration.test_timer_lock_order import _capture, _engine, _holding_run, _until_waiters

pytestmark = pytest.mark.db

DUTIES = ["lost worker", "stale", "timeout"]

# The parent's task sorts first wherever a duty orders its tasks (by id, by heartbeat, or as
# inserted): before the fix, the duty held the parent's run when it came to the child's.
_FIRST = uuid.UUID("00000000-0000-4000-8000-000000000001")
_SECOND = uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff")

_RECORDED = {
    "lost worker": "activity_failed",
    "stale": "activity_timed_out",
    "timeout": "activity_timed_out",
}


async def _family(
    store: Store, pool: pg.Pool, duty: str
) -> tuple[WorkflowRun, WorkflowRun, uuid.UUID, uuid.UUID]:
    """A parent and its child, each with an activity task claimed by worker "w1" that
    ``duty`` handles now: the worker is gone, or the task went stale, or timed out."""
    parent = await _run(store, "p", "parent")
    child = await _child(store, parent)
    timeout = {"start_to_close_s": 0.05} if duty == "timeout" else {}
    first = await _activity(store, parent, "1", "work", task_id=_FIRST, **timeout)
    second = await _activity(store, child, "1", "work", task_id=_SECOND, **timeout)
    assert len(await store.claim_tasks("w1", activity_types=["work"], limit=10)) == 2
    if duty != "lost worker":  # the parent's heartbeat is the older (by heartbeat, or as written)
        for task_id, seconds in ((first, 120), (second, 60)):
            await pool.execute(
                "UPDATE durable_task_queue"
                " SET heartbeat_at = heartbeat_at - make_interval(secs => $2) WHERE id = $1",
                task_id,
                seconds,
            )
    if duty == "timeout":
        await trio.sleep(0.1)  # both start-to-close timeouts expire
    return parent, child, first, second


async def _round(engine: Engine, duty: str) -> int:
    """One round of ``duty``; returns how many tasks it handled itself."""
    if duty == "lost worker":
        return await engine.release_worker("w1", "connection of worker w1 dropped")
    if duty == "stale":
        return await reclaim_once(engine)
    return await engine.enforce_timeouts()


async def _handled(pool: pg.Pool, task_id: uuid.UUID, duty: str) -> bool:
    """Whether ``duty`` handled the task: no longer claimed, its attempt's end recorded."""
    row = await pool.fetchrow(
        "SELECT t.status, (SELECT count(*) FROM durable_workflow_events e"
        "  WHERE e.run_id = t.run_id AND e.event_type = $2) AS recorded"
        " FROM durable_task_queue t WHERE t.id = $1",
        task_id,
        _RECORDED[duty],
    )
    return bool(row["status"] != "claimed" and row["recorded"] == 1)


async def _until_handled(pool: pg.Pool, task_id: uuid.UUID, duty: str, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        while not await _handled(pool, task_id, duty):  # noqa: ASYNC110 (a database state)
            await trio.sleep(0.02)
        return True
    return False


@pytest.mark.parametrize("duty", DUTIES)
async def test_a_duty_does_not_wait_for_a_run_another_transaction_holds(
    database_url: str, store: Store, pool: pg.Pool, duty: str
) -> None:
    """A child's run held as the child's end holds it: the duty's round handles the parent's
    task and ends without waiting for it; the child's task is handled once it is free."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        parent, child, first, second = await _family(store, pool, duty)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_follow_ups, engine)
            async with _holding_run(database_url, child.run_id) as release:
                with trio.move_on_after(0.9) as waited:
                    done = await _round(engine, duty)
                assert not waited.cancelled_caught, (
                    f"the {duty} duty's round waited for a run another transaction held (a "
                    "child's end holds its run, then waits for its parent's, which the duty "
                    "held: a deadlock PostgreSQL breaks after a second)"
                )
                assert done == 1
                assert await _handled(pool, first, duty)
                assert not await _handled(pool, second, duty)
                await release()
            assert await _until_handled(pool, second, duty, 5), (
                f"the task the {duty} duty skipped was not handled once its run was free"
            )
            nursery.cancel_scope.cancel()
        for run, task_id in ((parent, first), (child, second)):
            row = await pool.fetchrow(
                "SELECT status, claimed_by FROM durable_task_queue WHERE id = $1", task_id
            )
            assert (row["status"], row["claimed_by"]) == ("pending", None), (run.workflow_id, row)
        # Handled once: a later round finds nothing (the follow-up did not leave it half done).
        assert await _round(engine, duty) == 0


@pytest.mark.parametrize("duty", DUTIES)
async def test_a_duty_and_a_child_ending_at_the_same_moment_do_not_deadlock(
    database_url: str, store: Store, pool: pg.Pool, duty: str
) -> None:
    """The race itself: the child's end holds the child's run while the duty's round starts
    (before the fix it then held the parent's run, handling the parent's task first, and
    waited for the child's), then locks the parent's run to tell it. Neither may fail."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        parent, child, first, second = await _family(store, pool, duty)
        errors: dict[str, BaseException] = {}
        results: list[int] = []

        async def duty_round() -> None:
            results.append(await _round(engine, duty))

        async with trio.open_nursery() as follow_ups:
            await follow_ups.start(run_follow_ups, engine)
            async with pg.connect(database_url) as end:  # the child's end
                await end.execute("BEGIN")
                await end.execute(
                    "SELECT 1 FROM durable_workflow_instances WHERE id = $1 FOR UPDATE",
                    child.run_id,
                )
                try:
                    async with trio.open_nursery() as nursery:
                        done: set[str] = set()
                        nursery.start_soon(_capture(errors, "duty", duty_round, done))
                        await _until_waiters(pool, 1, done)  # the duty waits, or has ended

                        async def tell_parent() -> None:
                            await end.execute(
                                "SELECT 1 FROM durable_workflow_instances WHERE id = $1 FOR UPDATE",
                                parent.run_id,
                            )
                            await end.execute("COMMIT")

                        nursery.start_soon(_capture(errors, "child's end", tell_parent))
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await end.execute("ROLLBACK")
            assert not errors, (
                f"the {duty} duty held the parent's run while it waited for its child's, "
                f"which the child's end held while it waited for the parent's; PostgreSQL "
                f"aborted one of them: {errors!r}"
            )
            assert results == [1]
            assert await _handled(pool, first, duty)
            assert await _until_handled(pool, second, duty, 5)
            follow_ups.cancel_scope.cancel()


async def test_a_skipped_task_that_changed_meanwhile_is_left_alone(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    """The follow-up handles a skipped task only while it is still the claim the duty judged:
    a stale task that heartbeated meanwhile, or a timed-out one whose result came first, is
    left as it is."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        _, child, _, second = await _family(store, pool, "stale")
        async with _holding_run(database_url, child.run_id) as release:
            assert await reclaim_once(engine) == 1
            (skipped,) = await engine.skipped()
            assert skipped.duty is not None and skipped.row_id == second
            lease = await pool.fetchval(
                "SELECT lease_token FROM durable_task_queue WHERE id = $1", second
            )
            assert await store.heartbeat(second, lease, None) is False  # alive after all
            await release()
        assert await engine.follow_up(skipped) is False
        row = await pool.fetchrow(
            "SELECT status, lease_token FROM durable_task_queue WHERE id = $1", second
        )
        assert (row["status"], row["lease_token"]) == ("claimed", lease)
