"""A run's cancel request or end and its activities' results: neither waits for the other's row
while holding its own.

The results statement holds an activity's task row and then waits for its run's row; a cancel
request (or a run's end, or a parent's end passing its cancel on) held the run's row and then
waited for each open activity's task row, to cancel or flag it. PostgreSQL aborted one of the
two after `deadlock_timeout` (1 s) and the call was retried as UNAVAILABLE (session 19's known
limit). Now the cancel skips a task another transaction holds; the control plane cancels it
once that transaction lets go, and the reclaim round finds any such task left open. Every test
failed before the fix: the cancel waited for the held task row.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.errors import WorkflowCancelled
from everruns.server import duties
from everruns.store.store import Store
from tests.integration.test_engine import Plane, plane
from tests.integration.test_parent_child_ends import _ENDED, _run_id
from tests.integration.test_review_orphans import two_works
from tests.integration.test_timer_lock_order import _engine, _holding_row

pytestmark = pytest.mark.db


async def _two_activities(
    p: Plane, pool: pg.Pool, wid: str, *, claim: bool
) -> tuple[str, str, list[pb.Task]]:
    """Start a `two_works` run and decide its first workflow task; with ``claim``, worker
    "w1" claims both activities. Returns the ids of the first and second activity tasks, and
    the claimed tasks."""
    await p.register(workflow_types=["two_works"], activity_types=["work"])
    await p.start("two_works", None, wid=wid)
    await p.drive(two_works, "two_works")
    work: list[pb.Task] = []
    while claim and len(work) < 2:
        work += await p.poll(act=["work"], wait=1)
    rows = await pool.fetch(
        "SELECT id FROM durable_task_queue WHERE run_id = $1 AND kind = 'activity'"
        " ORDER BY created_at, activity_id",
        await _run_id(p, wid),
    )
    first, second = (str(r["id"]) for r in rows)
    return first, second, work


def _holding_task(
    database_url: str, task_id: str, also: str | None = None
) -> AbstractAsyncContextManager[Callable[[], Any]]:
    """A transaction of our own holding ``task_id``'s row lock (a heartbeat, a result on its
    way...) until the yielded release()."""
    return _holding_row(database_url, "durable_task_queue", uuid.UUID(task_id), also=also)


async def _cancel_without_waiting(p: Plane, wid: str) -> None:
    with trio.move_on_after(0.9) as waited:
        await p.channel.unary(
            p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid)
        )
    assert not waited.cancelled_caught, (
        "the cancel request waited for an activity's task row while holding its run; the "
        "results statement holds a task row and then waits for its run: a deadlock"
    )


async def _task(pool: pg.Pool, task_id: str) -> Any:
    return await pool.fetchrow(
        "SELECT status, cancel_requested_at, requeue_count FROM durable_task_queue WHERE id = $1",
        uuid.UUID(task_id),
    )


async def _until(check: Callable[[], Any], seconds: float) -> bool:
    with trio.move_on_after(seconds):
        while not await check():  # noqa: ASYNC110 (a database state)
            await trio.sleep(0.05)
        return True
    return False


async def _activity_events(p: Plane, wid: str) -> list[tuple[str, str]]:
    reply = await p.channel.unary(p.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid))
    return [
        (e.type, json.loads(e.data).get("activity_id", ""))
        for e in reply.events
        if e.type.startswith("activity_cancel")
    ]


async def test_a_skipped_pending_task_is_cancelled_once_its_row_is_free(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            first, second, _ = await _two_activities(p, pool, "pending", claim=False)
            async with _holding_task(database_url, first) as release:
                await _cancel_without_waiting(p, "pending")
                assert (await _task(pool, second))["status"] == "cancelled"
                assert (await _task(pool, first))["status"] == "pending"
                await release()

            async def cancelled() -> bool:
                return bool((await _task(pool, first))["status"] == "cancelled")

            assert await _until(cancelled, 5), "the skipped pending task was not cancelled"
            await trio.sleep(0.3)
            events = await _activity_events(p, "pending")
            assert sorted(events) == [("activity_cancelled", "1"), ("activity_cancelled", "2")], (
                events
            )


async def test_a_skipped_claimed_task_gets_its_flag_and_its_worker_is_told(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            first, second, work = await _two_activities(p, pool, "claimed", claim=True)
            received: list[str] = []
            told = trio.Event()
            async with trio.open_nursery() as nursery:

                def seen(c: pb.Cancellation) -> None:
                    received.append(c.task_id)
                    if first in received:
                        told.set()

                nursery.start_soon(p.listen_cancellations, seen)
                await trio.sleep(0.2)
                async with _holding_task(database_url, first) as release:
                    await _cancel_without_waiting(p, "claimed")
                    assert (await _task(pool, second))["cancel_requested_at"] is not None
                    assert (await _task(pool, first))["cancel_requested_at"] is None
                    await release()
                with trio.move_on_after(5):
                    await told.wait()
                assert first in received, "the holder of the skipped task was not told"
                # Checked while the worker is connected: its stream's end releases its tasks.
                row = await _task(pool, first)
                assert row["status"] == "claimed" and row["cancel_requested_at"] is not None
                (held,) = [t for t in work if t.task_id == first]
                heartbeat = await p.channel.unary(
                    p.workers.record_heartbeat,
                    pb.RecordHeartbeatRequest(task_id=first, lease_token=held.lease_token),
                )
                assert heartbeat.cancel_requested
                events = await _activity_events(p, "claimed")
                assert sorted(events) == [
                    ("activity_cancel_requested", "1"),
                    ("activity_cancel_requested", "2"),
                ], events
                nursery.cancel_scope.cancel()


async def test_a_run_that_ended_meanwhile_records_nothing_more(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            first, _, _ = await _two_activities(p, pool, "ended", claim=False)
            run_id = await _run_id(p, "ended")
            async with _holding_task(database_url, first) as release:
                await _cancel_without_waiting(p, "ended")
                await pool.execute(_ENDED, run_id)  # its end, before the row is free
                before = await p.history_types("ended")
                await release()

            async def cancelled() -> bool:
                return bool((await _task(pool, first))["status"] == "cancelled")

            assert await _until(cancelled, 5), "the skipped task of the ended run stayed open"
            assert await p.history_types("ended") == before


async def test_a_task_an_operator_requeued_meanwhile_is_left_alone(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            first, second, _ = await _two_activities(p, pool, "requeued", claim=False)
            # The transaction holding the row is an operator's requeue (apply_operator_requeues).
            requeue = (
                "UPDATE durable_task_queue SET requeue_count = requeue_count + 1 WHERE id = $1"
            )
            async with _holding_task(database_url, first, also=requeue) as release:
                await _cancel_without_waiting(p, "requeued")
                await release()
            await trio.sleep(1.0)
            row = await _task(pool, first)
            assert row["status"] == "pending" and row["cancel_requested_at"] is None
            assert (await _task(pool, second))["status"] == "cancelled"
            assert await _activity_events(p, "requeued") == [("activity_cancelled", "2")]


async def test_the_reclaim_round_cancels_the_tasks_a_cancel_or_an_end_left_open(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A skipped task whose follow-up gave up (or whose control plane stopped before it)
    is cancelled by a later reclaim round, once its row is free: an open run's history gets
    its cancellation once, an ended run's nothing."""
    monkeypatch.setattr(duties, "FOLLOW_UP_SECONDS", 0.2)
    with trio.fail_after(30):
        async with plane(database_url, reclaim_interval=0.2) as p:
            first, _, _ = await _two_activities(p, pool, "sweep-cancel", claim=False)
            ended, _, _ = await _two_activities(p, pool, "sweep-end", claim=False)
            async with _holding_task(database_url, first) as release_first:
                async with _holding_task(database_url, ended) as release_ended:
                    await _cancel_without_waiting(p, "sweep-cancel")
                    await _cancel_without_waiting(p, "sweep-end")
                    await pool.execute(_ENDED, await _run_id(p, "sweep-end"))
                    before = await p.history_types("sweep-end")
                    await trio.sleep(0.6)  # the follow-ups give up; rounds skip the rows
                    await release_ended()
                await release_first()

            async def swept() -> bool:
                rows = [await _task(pool, t) for t in (first, ended)]
                return all(r["status"] == "cancelled" for r in rows)

            assert await _until(swept, 5), "no reclaim round cancelled the tasks left open"
            await trio.sleep(0.5)  # more rounds
            assert await p.history_types("sweep-end") == before
            events = await _activity_events(p, "sweep-cancel")
            assert sorted(events) == [("activity_cancelled", "1"), ("activity_cancelled", "2")], (
                events
            )


async def cleaning(ctx: Any, input: Any) -> Any:
    """Waits for "work"; once cancelled, runs a "cleanup" activity and ends with its result."""
    try:
        return await ctx.execute_activity("work", 1)
    except WorkflowCancelled:
        return await ctx.execute_activity("cleanup", 2)


async def test_a_clean_up_activity_scheduled_after_the_cancel_request_is_left_to_run(
    database_url: str, pool: pg.Pool, store: Store
) -> None:
    """The follow-up of a run's end that skipped a task and then rolled back finds the run
    open with its earlier cancel request: it must not cancel an activity the code scheduled
    after that request (its clean-up). It used to (it checked only that a request existed);
    it now acts only on a skip whose transaction committed (its record). A task the cancel
    request skipped is still the follow-up's to cancel."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["cleaning"], activity_types=["work", "cleanup"])
            await p.start("cleaning", None, wid="clean")
            await p.drive(cleaning, "cleaning")
            run_id = await _run_id(p, "clean")
            (work,) = await pool.fetch(
                "SELECT id FROM durable_task_queue WHERE run_id = $1 AND activity_type = 'work'",
                run_id,
            )
            async with _holding_task(database_url, str(work["id"])) as release:
                await _cancel_without_waiting(p, "clean")  # skips the held "work" task
                await p.drive(cleaning, "cleaning")  # the code answers with its clean-up
                await release()
            (cleanup,) = await pool.fetch(
                "SELECT id FROM durable_task_queue WHERE run_id = $1 AND activity_type = 'cleanup'",
                run_id,
            )
            engine = _engine(store, database_url)
            # The follow-up of the cancel itself: "work" was scheduled before the request.
            await engine.cancel_if_abandoned(work["id"], wait=True)
            assert (await _task(pool, str(work["id"])))["status"] == "cancelled"
            # The follow-up of an end that skipped the clean-up and rolled back.
            assert not await engine.cancel_if_abandoned(cleanup["id"], wait=True)
            row = await _task(pool, str(cleanup["id"]))
            assert row["status"] == "pending" and row["cancel_requested_at"] is None, (
                "the clean-up activity the code scheduled after the cancel request was cancelled"
            )
            # Every skip is settled: the sweep has nothing left to look at.
            assert await store.find_abandoned_activities(limit=100) == []
