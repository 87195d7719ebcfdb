"""Durable timers are locked after their run, like everything else: firing one does not
deadlock with a completion that withdraws it, a cancel or retention, and a run that ends
cancels its pending timers instead of leaving them to fire.

Found by a review in session 18 (durable timers racing cancellation, signals, completions,
retention and other planes); each test failed before its fix. Each test stages, with a
connection of its own that holds one row lock for a moment, an interleaving that happens on
its own in production (the lock only decides who queues first), and drives the control
plane's engine directly: the workflow-task completion, cancel and the due-scanner's timer
firing, each its own transaction as in the server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns.server import ServerConfig
from everruns.server.engine import Engine, StartRequest
from everruns.server.notifier import Notifier
from everruns.store.store import Store

pytestmark = pytest.mark.db


def _engine(store: Store, database_url: str, **overrides: Any) -> Engine:
    config = ServerConfig(database_url=database_url, grpc_port=0, **overrides)
    return Engine(store, config, Notifier())


async def _start(engine: Engine, wtype: str, wid: str, input: str = "null") -> uuid.UUID:
    ((started, created),) = await engine.start_workflows([StartRequest(wtype, input, wid)])
    assert created
    return uuid.UUID(str(started.run_id))


async def _claim(store: Store, wtype: str) -> Any:
    (task,) = await store.claim_tasks("w1", workflow_types=[wtype], limit=1)
    return task


async def _last_seq(pool: pg.Pool, run_id: uuid.UUID) -> int:
    value: int = await pool.fetchval(
        "SELECT last_sequence_num FROM durable_workflow_instances WHERE id = $1", run_id
    )
    return value


async def _complete(
    engine: Engine, pool: pg.Pool, task: Any, commands: list[dict[str, Any]]
) -> Any:
    return await engine.complete_workflow_task(
        task.task_id,
        task.lease_token,
        "w1",
        await _last_seq(pool, task.run_id),
        json.dumps(commands),
        task.claimed_at or datetime.now(UTC),
    )


async def _lock_waiters(pool: pg.Pool) -> int:
    value: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return value


async def _until_waiters(pool: pg.Pool, n: int, done: set[str] | None = None) -> None:
    """Until ``n`` sessions wait for a lock, or (with ``done``) one of the calls started ended
    instead of waiting (it found nothing to lock: the race cannot happen)."""
    while await _lock_waiters(pool) < n and not done:  # noqa: ASYNC110 (a database state)
        await trio.sleep(0.02)


@asynccontextmanager
async def _holding_run(database_url: str, run_id: uuid.UUID) -> AsyncIterator[Callable[[], Any]]:
    """A transaction of our own holding ``run_id``'s row lock until the yielded release()."""
    async with _holding_row(database_url, "durable_workflow_instances", run_id) as release:
        yield release


@asynccontextmanager
async def _holding_row(
    database_url: str, table: str, row_id: uuid.UUID, *, also: str | None = None
) -> AsyncIterator[Callable[[], Any]]:
    """A transaction of our own holding the lock of ``table``'s row ``row_id`` until the
    yielded release() ends it: rolled back, or with ``also`` (SQL on the row, $1: its own
    change, as an operator's requeue holding a task would make) committed."""
    async with pg.connect(database_url) as x:
        await x.execute("BEGIN")
        await x.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", row_id)
        if also is not None:
            await x.execute(also, row_id)
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await x.execute("ROLLBACK" if also is None else "COMMIT")

        try:
            yield release
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await release()


def _capture(
    errors: dict[str, BaseException],
    name: str,
    fn: Callable[[], Awaitable[Any]],
    done: set[str] | None = None,
) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        try:
            await fn()
        except Exception as exc:  # the verdict is the test's
            errors[name] = exc
        finally:
            if done is not None:
                done.add(name)

    return run


# ------------------------------------------------------------------------------------------
# 1. Completion that cancels a due timer vs. the due-scanner firing it.
#
# fire_due_timers locks the TIMER row (UPDATE ... FOR UPDATE SKIP LOCKED) and then the RUN row
# (lock_run); the general completion path locks the RUN row (lock_leased_with_run) and then
# the TIMER row (cancel_timer's UPDATE). Opposite orders: a deadlock whenever a signal or a
# cancel makes a workflow withdraw its timer at the moment that timer comes due.


@pytest.mark.parametrize("why", ["signal wins the wait_signal timeout", "cancel while sleeping"])
async def test_withdrawing_a_due_timer_while_it_fires_does_not_deadlock(
    database_url: str, store: Store, pool: pg.Pool, why: str
) -> None:
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        run_id = await _start(engine, "nap", "w")
        first = await _claim(store, "nap")
        # The workflow sleeps (or waits for a signal) on timer "1", due almost at once.
        await _complete(
            engine, pool, first, [{"type": "start_timer", "timer_id": "1", "seconds": 0.05}]
        )
        if why.startswith("signal"):
            await engine.signal("w", "", "go", "1")
            end = {"type": "complete_workflow", "result": 1}
        else:
            await engine.cancel("w", "", "stop")
            end = {"type": "cancel_workflow"}
        second = await _claim(store, "nap")
        await trio.sleep(0.2)  # timer "1" is due now
        # What the worker's replay sends: withdraw the timer, end the run.
        commands = [{"type": "cancel_timer", "timer_id": "1"}, end]
        errors: dict[str, BaseException] = {}
        async with (
            _holding_run(database_url, run_id) as release,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(
                _capture(errors, "complete", lambda: _complete(engine, pool, second, commands))
            )
            await _until_waiters(pool, 1)  # the completion waits for the run's lock
            done: set[str] = set()
            nursery.start_soon(_capture(errors, "fire", engine.fire_due_timers, done))
            await _until_waiters(pool, 2, done)  # the firing too, holding the timer row
            await release()
        assert not errors, (
            "completing a workflow task that cancels a due timer and the due-scanner firing "
            "that timer take the run and timer rows in opposite orders; PostgreSQL aborted "
            f"one of them: {errors!r}"
        )


# ------------------------------------------------------------------------------------------
# 2. One fire batch locks several runs in fire_at order, while paths that lock two runs
#    (cancelling a parent locks it, then its children) use another order.


async def test_firing_a_child_and_parent_timer_while_the_parent_is_cancelled_does_not_deadlock(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        await _start(engine, "parent", "p")
        task = await _claim(store, "parent")
        await _complete(
            engine,
            pool,
            task,
            [
                {
                    "type": "start_child_workflow",
                    "child_id": "1",
                    "workflow_type": "kid",
                    "workflow_id": "p/1",
                    "input": None,
                },
            ],
        )
        kid = await _claim(store, "kid")
        child_id = kid.run_id
        # The child's timer is due first, the parent's right after.
        await _complete(
            engine, pool, kid, [{"type": "start_timer", "timer_id": "1", "seconds": 0.01}]
        )
        await engine.signal("p", "", "tick", "1")  # the parent's next workflow task
        parent_task = await _claim(store, "parent")
        await _complete(
            engine, pool, parent_task, [{"type": "start_timer", "timer_id": "2", "seconds": 0.05}]
        )
        await trio.sleep(0.2)  # both timers are due: the batch locks the child, then the parent
        errors: dict[str, BaseException] = {}
        async with (
            _holding_run(database_url, child_id) as release,
            trio.open_nursery() as nursery,
        ):
            fired: set[str] = set()
            nursery.start_soon(_capture(errors, "fire", engine.fire_due_timers, fired))
            # Firing waits for the child (before the fix: holding both timers), or skips the
            # child's run, which another transaction holds, and ends.
            await _until_waiters(pool, 1, fired)
            done: set[str] = set()
            cancel = _capture(errors, "cancel", lambda: engine.cancel("p", "", "stop"), done)
            nursery.start_soon(cancel)
            # cancel: holds the parent, waits for the child (with firing, if it still waits)
            await _until_waiters(pool, 1 if fired else 2, done)
            await release()
        assert not errors, (
            "one fire_due_timers batch locks the runs of its timers in fire_at order (child, "
            "then parent) while cancelling a parent locks it, then its children; PostgreSQL "
            f"aborted one of them: {errors!r}"
        )


# ------------------------------------------------------------------------------------------
# 3. A run that ends leaves its pending timers pending; the due-scanner later marks them
#    'fired' although nothing fired into the run's history.


async def test_a_timer_of_an_ended_run_is_not_left_pending_nor_recorded_as_fired(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        run_id = await _start(engine, "bg", "w")
        task = await _claim(store, "bg")
        # A workflow that returns while a background ctx.sleep is still pending: the replay
        # driver closes its coroutines without a CancelTimer (context.py: `_closing`).
        await _complete(
            engine,
            pool,
            task,
            [
                {"type": "start_timer", "timer_id": "1", "seconds": 0.1},
                {"type": "complete_workflow", "result": 1},
            ],
        )
        status_after_end = await pool.fetchval(
            "SELECT status FROM durable_timers WHERE run_id = $1", run_id
        )
        await trio.sleep(0.3)
        await engine.fire_due_timers()
        status_after_scan = await pool.fetchval(
            "SELECT status FROM durable_timers WHERE run_id = $1", run_id
        )
        fired_events = await pool.fetchval(
            "SELECT count(*) FROM durable_workflow_events"
            " WHERE run_id = $1 AND event_type = 'timer_fired'",
            run_id,
        )
        assert (status_after_end, status_after_scan) == ("cancelled", "cancelled"), (
            "ending a run leaves its pending timer pending "
            f"(status right after the end: {status_after_end!r}); the due-scanner then marks "
            f"it {status_after_scan!r} although {fired_events} timer_fired events were recorded"
        )


async def test_a_run_ended_by_a_later_task_alone_cancels_its_pending_timer(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    """The end alone takes the fast path (one statement, no `_after_end`): it must leave a
    run with a pending timer to the general path, which cancels the timer."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        run_id = await _start(engine, "bg", "w")
        task = await _claim(store, "bg")
        await _complete(
            engine, pool, task, [{"type": "start_timer", "timer_id": "1", "seconds": 60}]
        )
        await engine.signal("w", "", "go", "1")
        second = await _claim(store, "bg")
        await _complete(engine, pool, second, [{"type": "complete_workflow", "result": 1}])
        status = await pool.fetchval(
            "SELECT status FROM durable_workflow_instances WHERE id = $1", run_id
        )
        timer = await pool.fetchval("SELECT status FROM durable_timers WHERE run_id = $1", run_id)
        assert (status, timer) == ("completed", "cancelled")


# ------------------------------------------------------------------------------------------
# 4. Retention deleting an expired run whose leftover timer comes due at the same moment.
#    Retention locks the run (FOR UPDATE OF c SKIP LOCKED), then its cascade deletes the
#    timer row; firing locks the timer row, then the run.


async def test_retention_and_firing_a_leftover_timer_of_the_same_run_do_not_deadlock(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        engine = _engine(store, database_url, retention_seconds=1.0)
        run_id = await _start(engine, "bg", "w")
        task = await _claim(store, "bg")
        await _complete(
            engine,
            pool,
            task,
            [
                {"type": "start_timer", "timer_id": "1", "seconds": 0.05},
                {"type": "complete_workflow", "result": 1},
            ],
        )
        # The run ended long ago (past retention); its timer is due.
        await pool.execute(
            "UPDATE durable_workflow_instances SET completed_at = now() - interval '1 hour'"
            " WHERE id = $1",
            run_id,
        )
        await trio.sleep(0.2)
        errors: dict[str, BaseException] = {}
        # Hold a task row of the run so retention's cascade stops there, holding the run.
        async with pg.connect(database_url) as x:
            await x.execute("BEGIN")
            await x.execute("SELECT 1 FROM durable_task_queue WHERE run_id = $1 FOR UPDATE", run_id)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_capture(errors, "retention", engine.delete_expired))
                    await _until_waiters(pool, 1)  # retention: holds the run, waits on the task
                    done: set[str] = set()
                    nursery.start_soon(_capture(errors, "fire", engine.fire_due_timers, done))
                    await _until_waiters(pool, 2, done)  # firing: holds the timer, waits on the run
                    await x.execute("ROLLBACK")
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await x.execute("ROLLBACK")
        assert not errors, (
            "retention deletes an expired run (its row, then by cascade its timers) while the "
            "due-scanner fires that run's leftover timer (its row, then the run's); PostgreSQL "
            f"aborted one of them: {errors!r}"
        )


# ------------------------------------------------------------------------------------------
# 5. Firing reads its timers in batches without locking them: a full batch whose runs are all
#    held by others ends the round instead of reading the same timers again.


async def test_firing_more_than_a_batch_skips_held_runs_and_ends(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        run_id = await _start(engine, "many", "w")
        task = await _claim(store, "many")
        timers = [{"type": "start_timer", "timer_id": str(n), "seconds": 0.01} for n in range(201)]
        await _complete(engine, pool, task, timers)
        await trio.sleep(0.1)  # all are due
        async with _holding_run(database_url, run_id) as release:
            assert await engine.fire_due_timers() == 0  # never waits for the run
            await release()
        assert await engine.fire_due_timers() == 201
        fired = await pool.fetchval(
            "SELECT count(*) FROM durable_workflow_events"
            " WHERE run_id = $1 AND event_type = 'timer_fired'",
            run_id,
        )
        assert fired == 201
        assert await engine.fire_due_timers() == 0
