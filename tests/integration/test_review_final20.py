"""Final review of session 20 (b284677..7b04801): defects the session's tests do not catch.

Each test stages, with the real engine and store, an interleaving that happens on its own in
production, and fails on the commits under review because of the defect its docstring names.

Mended in the commit that adds this file: the probe admission takes breakers in key order.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns.store.store import Store
from tests.integration.test_store import _activity, _run
from tests.integration.test_timer_lock_order import _capture, _engine, _until_waiters

pytestmark = pytest.mark.db

# The task of breaker "zz" sorts first by id; breaker "aa" sorts first by key.
_FIRST = uuid.UUID("00000000-0000-4000-8000-000000000001")
_SECOND = uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff")


@asynccontextmanager
async def _holding_breaker(database_url: str, key: str) -> AsyncIterator[Callable[[], Any]]:
    """A transaction of our own holding breaker ``key``'s row lock until release() (rolled
    back)."""
    async with pg.connect(database_url) as x:
        await x.execute("BEGIN")
        await x.execute(
            "SELECT 1 FROM durable_circuit_breaker_state WHERE key = $1 FOR UPDATE", key
        )
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await x.execute("ROLLBACK")

        try:
            yield release
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await release()


@pytest.mark.parametrize("other", ["another poll's admit_breakers", "enforce_timeouts"])
async def test_probe_admission_and_a_key_ordered_breaker_lock_do_not_deadlock(
    database_url: str, store: Store, pool: pg.Pool, other: str
) -> None:
    """`Engine._admit_probes` (beb2a40's mend) locks the tasks it gates in id order, then
    their breakers in that same task-id order (`admit_probe`, task by task): with probes of
    two half-open breakers in one claim, it holds the breaker of the lower-id task while it
    waits for the other. Every other transaction that locks several breakers takes them in
    key order: another poll's `Store.admit_breakers` (`lock_unclosed_breakers ... ORDER BY
    key FOR UPDATE`, which runs on every claim while a breaker may be unclosed), and this
    session's `Store.lock_breakers` (`enforce_timeouts`, `reclaim_stale`, `release_worker`,
    sorted keys). So when the lower-id probe's key sorts last, the two wait for each other
    and PostgreSQL aborts one after `deadlock_timeout`: a poll fails (its claimed tasks given
    back, the worker backs off) or a duty's round does, exactly when a failing dependency
    has half-opened several breakers and every worker polls for probes. Mend: admit in key
    order (sort `held` by `effective_breaker_key`, then id).

    Staged: a transaction holds breaker "aa" so that the other locker queues on it first;
    the admission then holds "zz" (its task sorts first) and queues on "aa"."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        run = await _run(store, "wf-probes", "probes")
        await _activity(store, run, "1", "zz", task_id=_FIRST)
        await _activity(store, run, "2", "aa", task_id=_SECOND)
        tasks = await store.claim_tasks("w1", activity_types=["aa", "zz"], limit=10)
        assert sorted(t.task_id for t in tasks) == [_FIRST, _SECOND]
        if other == "enforce_timeouts":
            # Two other attempts, one of each breaker, claimed and past start-to-close.
            for n, key in (("3", "aa"), ("4", "zz")):
                await _activity(store, run, n, key, start_to_close_s=0.05)
            assert len(await store.claim_tasks("w2", activity_types=["aa", "zz"], limit=10)) == 2
            await trio.sleep(0.1)
        # Both breakers opened 31 s ago: due to go half-open, probe slots free.
        await pool.execute(
            "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at)"
            " VALUES ('aa', 'open', 5, now() - interval '31 seconds'),"
            "        ('zz', 'open', 5, now() - interval '31 seconds')"
        )
        errors: dict[str, BaseException] = {}
        done: set[str] = set()

        async def admit() -> Any:
            return await engine._admit_probes(list(tasks), {"aa": 1, "zz": 1})

        async def lock_in_key_order() -> Any:
            if other == "enforce_timeouts":
                return await engine.enforce_timeouts()
            async with store.transaction() as conn:
                return await store.admit_breakers(conn, engine.breakers)

        async with (
            _holding_breaker(database_url, "aa") as release,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_capture(errors, other, lock_in_key_order, done))
            await _until_waiters(pool, 1, done)  # it queues on "aa" first
            nursery.start_soon(_capture(errors, "probe admission", admit, done))
            await _until_waiters(pool, 2, done)  # the admission holds "zz", queues on "aa"
            await release()  # the other gets "aa" and waits for "zz"
        assert not errors, (
            "the probe admission held breaker 'zz' (its task sorts first by id) while it "
            f"waited for 'aa', which {other} (key order) held while it waited for 'zz'; "
            f"PostgreSQL aborted one of them: {errors!r}"
        )
