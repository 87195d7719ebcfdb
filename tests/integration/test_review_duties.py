"""Review of 8024c84 ("The duties that lock several runs no longer wait for a run while holding
another"): defects that remain in the duties' new lock order and follow-ups.

Each test stages, with the real engine and store, an interleaving that happens on its own in
production, and fails against 8024c84.

Both are mended in the commit that adds this file: the probe admission locks the tasks it gates
before their breaker; the timeout follow-up leaves a pending task a breaker holds back.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns.store.models import Task
from everruns.store.store import Store
from tests.integration.test_store import _activity, _run
from tests.integration.test_timer_lock_order import _capture, _engine, _holding_run, _until_waiters

pytestmark = pytest.mark.db


async def test_a_lost_workers_release_and_a_claims_probe_admission_do_not_deadlock(
    database_url: str, store: Store, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`release_worker` now locks every breaker of its claimed tasks that is not closed
    (`Store.lock_breakers(create=False)`, `lock_unclosed_breaker`: open or half-open) while it
    holds the worker's tasks, waiting. The claim path's probe admission (`Engine._admit_probes`,
    run right after a claim commits when a breaker may be unclosed) locks the breaker first
    (`admit_probe`) and then gives back, task by task, the claimed tasks it has no probe slot
    for (`unclaim`): breaker, then task. A worker whose connection drops while its poll is
    being admitted (the poll/drop race test_worker_identity covers) deadlocks the two:
    release_worker holds the tasks and waits for the breaker, the admission holds the breaker
    and waits for a task. PostgreSQL aborts one after `deadlock_timeout`: the release fails
    (its tasks, the admitted probe among them, stay with the lost worker, and the probe slot
    taken, until the 30 s stale rule) or the poll does.

    Before 8024c84 the release wrote a breaker only through `release_probe`, whose UPDATE
    matches a half-open breaker with a probe in flight: a breaker that is open, due to go
    half-open (the admission's uncommitted write), was never waited for, and this passed."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        run = await _run(store, "wf-probe", "probe")
        for n in ("1", "2"):
            await _activity(store, run, n, "work")
        tasks = await store.claim_tasks("w1", activity_types=["work"], limit=10)
        assert len(tasks) == 2
        # The "work" breaker opened 31 s ago: due to go half-open, one probe slot.
        await pool.execute(
            "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at)"
            " VALUES ('work', 'open', 5, now() - interval '31 seconds')"
        )
        errors: dict[str, BaseException] = {}
        done: set[str] = set()
        holding_breaker = trio.Event()
        original_unclaim = store.unclaim
        paused = False

        async def unclaim(conn: pg.Connection, task: Task) -> None:
            # The admission holds the breaker (admit_probe of the first task) and comes to
            # the task it has no slot for: the worker's connection drops now.
            nonlocal paused
            if not paused:
                paused = True
                holding_breaker.set()
                await _until_waiters(pool, 1, done)
            await original_unclaim(conn, task)

        monkeypatch.setattr(store, "unclaim", unclaim)

        async def admit() -> Any:
            return await engine._admit_probes(list(tasks), {"work": 1})

        async def release() -> Any:
            return await engine.release_worker("w1", "connection of worker w1 dropped")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_capture(errors, "probe admission", admit, done))
            await holding_breaker.wait()
            nursery.start_soon(_capture(errors, "release_worker", release, done))
        assert not errors, (
            "release_worker held the lost worker's tasks while it waited for their breaker, "
            "which the claim's probe admission held while it waited for one of those tasks; "
            f"PostgreSQL aborted one of them: {errors!r}"
        )


async def test_a_skipped_schedule_to_start_timeout_spares_a_task_its_breaker_now_holds(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    """A pending activity whose schedule-to-start deadline passes while a circuit breaker that
    is not closed holds it is not timed out: each timeout round first gives such tasks a new
    deadline (`renew_held_start_deadlines`, "they wait behind the breaker without burning
    attempts"), then looks for timed-out tasks. The follow-up of a timed-out task the round
    skipped (`finish_skipped`, `lock_timed_out_task`) re-checks only "still past a timeout":
    a breaker that opened meanwhile (a failing dependency opens breakers exactly while runs
    are busy) is not looked at, so the follow-up charges the attempt the breaker was holding
    back (on a last attempt: a dead letter), which a round at the same moment spares (a
    round with the breaker open and the run free leaves the task pending at attempt 0)."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        run = await _run(store, "wf-held", "held")
        task_id = await _activity(store, run, "1", "work", schedule_to_start_s=0.05)
        await trio.sleep(0.1)  # its schedule-to-start deadline passes, every breaker closed
        async with _holding_run(database_url, run.run_id) as release:
            assert await engine.enforce_timeouts() == 0  # its run is held: skipped
            (skipped,) = await engine.skipped()
            assert skipped.duty is not None and skipped.row_id == task_id
            # The "work" breaker opens (failures elsewhere): the task now waits behind it.
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at)"
                " VALUES ('work', 'open', 5, now())"
            )
            await release()
        handled = await engine.follow_up(skipped)
        row = await pool.fetchrow(
            "SELECT status, attempt, last_error FROM durable_task_queue WHERE id = $1", task_id
        )
        assert row is not None
        assert (handled, row["status"], row["attempt"]) == (False, "pending", 0), (
            "the follow-up timed out a pending task its open breaker holds back (a timeout "
            f"round would have renewed its deadline): handled={handled}, task={dict(row)}"
        )
