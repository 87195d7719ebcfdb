"""Review 21, wake-ups: how work reaches a waiting poll when the LISTEN connection cannot
deliver a task's NOTIFY. Both tests fail on the code reviewed: the due-scanner's safety net
for lost wake-ups (its look for stragglers, every ~1 s while a task waits) is armed only by
a NOTIFY that did arrive, so a wake-up that never arrives leaves the task waiting for the
scanner's idle round (`reclaim_interval`, 10 s), not for one ~1 s straggler look."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns.errors import DatabaseUnavailable
from everruns.store.store import Store
from tests.integration.test_engine import Plane, plane

pytestmark = pytest.mark.db

# A NOTIFY wakes a poll within milliseconds; a lost one should cost one straggler look
# (STRAGGLING_AFTER_S = 1 s plus a scanner round). Anything past this is a missed safety net.
SAFETY_NET_S = 2.5


async def _served_after(plane_: Plane, make_task: Any) -> tuple[int, float]:
    """Long-poll workflow type "x" on ``plane_``, run ``make_task`` while it waits; return
    how many tasks the poll got and how long after ``make_task`` returned."""
    got: list[Any] = []
    answered = 0.0

    async def poll() -> None:
        nonlocal answered
        got.extend(await plane_.poll(wf=["x"], wait=20))
        answered = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.5)  # the poll waits, its claim having found nothing
        await make_task()
        made = trio.current_time()
    return len(got), answered - made


async def test_a_task_wake_up_dropped_by_a_full_notification_buffer_waits_a_reclaim_interval(
    database_url: str, store: Store
) -> None:
    """Defect: `pg.listen` drops notifications when its 1024-entry buffer is full (a burst
    of NOTIFYs, from a busy database or other control planes, arriving in one read), and
    nothing notices: the dropped task NOTIFY neither wakes the poll nor arms the
    due-scanner's straggler look, so the new task waits for the scanner's idle round
    (~10 s; observed ~9.5 s). Expected: a listener that had to drop notifications treats
    it as it treats a reconnect (wake everyone), or at least arms the straggler look, so
    the task is served within ~1 s."""
    with trio.fail_after(40):
        async with plane(database_url) as a:
            await a.register(workflow_types=["x"])

            async def burst_then_task() -> None:
                async with store.transaction() as conn:
                    # 3000 run-changed notifications (nobody waits on those runs) ahead of
                    # the new task's own NOTIFY, all delivered at this commit.
                    await conn.execute(
                        "SELECT count(pg_notify('everruns_runs', 'run-' || i))"
                        " FROM generate_series(1, 3000) i"
                    )
                    run, _ = await store.create_workflow(
                        conn, workflow_id="w", workflow_type="x", input="1"
                    )
                    assert await store.ensure_workflow_task(conn, run)  # NOTIFY workflow:x

            got, took = await _served_after(a, burst_then_task)
            assert got == 1
            assert took < SAFETY_NET_S, f"the new task waited {took:.1f} s for the poll"


async def test_while_listen_cannot_reconnect_new_tasks_wait_a_whole_reclaim_interval(
    database_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: when the LISTEN connection is lost and cannot be re-established at once (the
    database refuses new connections, say, while the pool's existing ones work), the
    notifier only retries with backoff; it wakes everyone once LISTEN is back, but until
    then nothing makes the due-scanner look for stragglers, so a task started on another
    control plane waits for the scanner's idle round (~10 s; observed ~8.7 s) although
    the database is serving claims fine. Expected: while LISTEN is down, the due-scanner's
    straggler look runs every ~1 s (the documented "a lost wake-up costs one scanner
    round"), so the poll gets the task within ~1-2 s."""
    original = pg.listen
    refusing = False

    def listen(url: str, channels: Any, **options: Any) -> Any:
        if refusing:
            raise DatabaseUnavailable("sorry, too many clients already")
        return original(url, channels, **options)

    monkeypatch.setattr(pg, "listen", listen)
    with trio.fail_after(40):
        async with plane(database_url) as a, plane(database_url) as b:
            await a.register(workflow_types=["x"])
            await trio.sleep(0.3)
            refusing = True
            killed = await store.pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
            )
            assert killed >= 1
            await trio.sleep(0.5)  # plane A notices and keeps failing to LISTEN again

            async def start_on_b() -> None:
                await b.start("x", wid="w")

            got, took = await _served_after(a, start_on_b)
            assert got == 1
            assert took < SAFETY_NET_S, f"the new task waited {took:.1f} s for the poll"
