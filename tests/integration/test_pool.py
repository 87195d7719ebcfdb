"""The Trio-side connection pool: connections come back only when open and idle; one the
server closed, one cancelled mid-query, or one left in a transaction is replaced, never handed
out again; one task may hold two connections at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import trio

from everruns._aio import pg
from everruns.errors import DatabaseError, DatabaseUnavailable

pytestmark = pytest.mark.db


async def _backend_pids(pool: pg.Pool, count: int) -> set[int]:
    pids: set[int] = set()
    for _ in range(count):
        pids.add(int(await pool.fetchval("SELECT pg_backend_pid()")))
    return pids


async def test_a_connection_the_server_closed_is_replaced(database_url: str) -> None:
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=2) as pool:
            (victim,) = await _backend_pids(pool, 3)  # one idle connection, reused
            async with pg.connect(database_url) as admin:
                await admin.execute("SELECT pg_terminate_backend($1)", victim)
            for _ in range(50):  # the client side notices the closed socket shortly
                await trio.sleep(0.02)
                try:
                    pids = await _backend_pids(pool, 1)
                except DatabaseUnavailable:
                    continue  # the connection died under this query: reported, then replaced
                if victim not in pids:
                    break
            assert victim not in await _backend_pids(pool, 3)


async def test_cancelled_mid_query_or_left_in_a_transaction_is_not_reused(
    database_url: str,
) -> None:
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=2) as pool:
            (first,) = await _backend_pids(pool, 1)
            with trio.move_on_after(0.2):
                await pool.execute("SELECT pg_sleep(5)")
            second = await _backend_pids(pool, 3)
            assert first not in second
            async with pool.acquire() as conn:
                stuck = int(await conn.fetchval("SELECT pg_backend_pid()"))
                await conn.execute("BEGIN")  # a raw BEGIN nobody will end
            assert stuck not in await _backend_pids(pool, 3)


async def test_a_connection_asyncpg_can_no_longer_drive_is_dropped(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a PostgreSQL restart left behind once (asyncpg's protocol stuck in a state it
    # cannot leave): the error is the database's, not a crash, and the connection goes.
    real = asyncpg.connection.Connection.fetch

    async def fetch(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == "SELECT 'stuck'":
            raise asyncpg.InternalClientError(
                "cannot switch to state 11; another operation (2) is in progress"
            )
        return await real(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", fetch)
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=1) as pool:
            (first,) = await _backend_pids(pool, 1)
            with pytest.raises(DatabaseUnavailable, match="left unusable"):
                async with pool.transaction() as tx:
                    await tx.fetch("SELECT 'stuck'")
            assert first not in await _backend_pids(pool, 3)


async def test_one_task_may_hold_two_connections(database_url: str) -> None:
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=2) as pool:
            async with pool.transaction() as tx:
                outer = int(await tx.fetchval("SELECT pg_backend_pid()"))
                inner = int(await pool.fetchval("SELECT pg_backend_pid()"))
            assert outer != inner


async def test_the_control_planes_settings_reach_every_connection_and_lists_plan_per_call(
    database_url: str,
) -> None:
    from everruns.server.app import POOL_SETTINGS
    from everruns.store.store import Store

    with trio.fail_after(20):
        async with pg.open_pool(
            database_url, min_size=1, max_size=2, settings=POOL_SETTINGS
        ) as pool:
            async with pool.acquire() as first, pool.acquire() as opened_later:
                for conn in (first, opened_later):
                    assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
            # An operator's list is planned for its values; the connection keeps its mode.
            rows = await Store(pool)._fetch_planned_for_values(
                "SELECT current_setting('plan_cache_mode') AS mode"
            )
            assert rows[0]["mode"] == "force_custom_plan"
            assert await pool.fetchval("SHOW plan_cache_mode") == "force_generic_plan"


_PREPARED = "SELECT statement FROM pg_prepared_statements"


async def test_warm_up_opens_the_pool_and_prepares_each_statement_on_each_connection(
    database_url: str,
) -> None:
    statements = ["SELECT $1::int + 1", "SELECT count(*) FROM pg_class WHERE relname = $1"]
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=3) as pool:
            assert await pool.warm_up(statements) == 3
            async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
                pids = set()
                for conn in (a, b, c):
                    pids.add(int(await conn.fetchval("SELECT pg_backend_pid()")))
                    prepared = {row["statement"] for row in await conn.fetch(_PREPARED)}
                    assert set(statements) <= prepared
                assert len(pids) == 3  # three connections, none opened twice
                # The prepared statements are the ones queries run: nothing new is prepared.
                before = sorted(row["statement"] for row in await a.fetch(_PREPARED))
                assert await a.fetchval(statements[0], 41) == 42
                assert sorted(row["statement"] for row in await a.fetch(_PREPARED)) == before
            assert await pool.warm_up(statements) == 0  # every connection is warm already


async def test_warm_up_leaves_borrowed_connections_and_never_opens_more_than_the_size(
    database_url: str,
) -> None:
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=2) as pool:
            async with pool.acquire() as held:
                busy = int(await held.fetchval("SELECT pg_backend_pid()"))
                assert await pool.warm_up(["SELECT 1"]) == 1
            async with pool.acquire() as a, pool.acquire() as b:
                pids = {int(await conn.fetchval("SELECT pg_backend_pid()")) for conn in (a, b)}
                assert busy in pids and len(pids) == 2


async def test_warm_up_names_a_statement_that_does_not_prepare_and_the_pool_goes_on(
    database_url: str,
) -> None:
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=2) as pool:
            with pytest.raises(DatabaseError, match="could not prepare 'SELEC nothing'"):
                await pool.warm_up(["SELECT 1", "SELEC nothing"])
            async with pool.acquire() as a, pool.acquire() as b:  # both slots came back
                assert await a.fetchval("SELECT 2") == 2 and await b.fetchval("SELECT 3") == 3


async def test_warm_up_turns_any_failure_into_a_database_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It relies on an asyncpg internal; whatever that raises must not escape as something
    # the control plane's nursery would die of, nor leave the connection in the pool.
    async def broken(self: Any, query: str, timeout: Any) -> None:
        raise AttributeError("no such internal")

    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=1, max_size=1) as pool:
            (first,) = await _backend_pids(pool, 1)
            monkeypatch.setattr(asyncpg.connection.Connection, "_get_statement", broken)
            with pytest.raises(
                DatabaseError, match="connection warm-up: AttributeError: no such internal"
            ):
                await pool.warm_up(["SELECT 1"])
            monkeypatch.undo()
            assert first not in await _backend_pids(pool, 1)


async def test_warm_up_counts_connections_callers_are_still_opening(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two connections borrowed, a third being opened (slowly) by a caller: when one of the
    # two comes back, warm-up warms it and stops; it must not open a fourth.
    real = asyncpg.connect
    opened = 0
    third = trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def connect(*args: Any, **kwargs: Any) -> Any:  # on the asyncio thread
        nonlocal opened
        opened += 1
        if opened == 3:
            token.run_sync_soon(third.set)
            await asyncio.sleep(1.0)
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncpg, "connect", connect)
    with trio.fail_after(20):
        async with pg.open_pool(database_url, min_size=0, max_size=3) as pool:
            first_back, done = trio.Event(), trio.Event()

            async def hold(until: trio.Event, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                async with pool.acquire():
                    task_status.started()
                    await until.wait()

            async with trio.open_nursery() as nursery:
                await nursery.start(hold, first_back)
                await nursery.start(hold, done)
                nursery.start_soon(hold, done)  # opens the third, slowly
                await third.wait()
                first_back.set()
                assert await pool.warm_up(["SELECT 1"]) == 1
                assert opened == 3
                done.set()
            async with pg.connect(database_url) as admin:
                count = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                )
            assert count - 1 == 3  # the admin connection aside


async def test_pool_connections_keep_their_prepared_statements(database_url: str) -> None:
    # asyncpg's default forgets each cached statement five minutes after preparing it.
    with trio.fail_after(20):
        async with (
            pg.open_pool(database_url, min_size=1, max_size=1) as pool,
            pool.acquire() as conn,
        ):
            assert conn._raw._stmt_cache.get_max_lifetime() == 0


async def test_warmed_idle_connections_hold_no_lock_a_migration_would_wait_for(
    database_url: str,
) -> None:
    # asyncpg ends a prepare with Flush, leaving the implicit transaction (and its lock on
    # each table the statement names) open until the connection's next statement.
    with trio.fail_after(20):
        async with _table_and_pool(database_url, "warmed", max_size=2) as (admin, pool):
            assert await pool.warm_up(["SELECT * FROM warmed WHERE id = $1"]) == 2
            await admin.execute("SET lock_timeout = '2s'")
            await admin.execute("ALTER TABLE warmed ADD COLUMN note text")
            assert await pool.fetchval("SELECT count(*) FROM warmed") == 0


async def test_a_column_added_under_a_prepared_statement_is_a_transient_error(
    database_url: str,
) -> None:
    # docs/operations.md adds columns while the control plane runs. Inside a transaction,
    # asyncpg cannot prepare the statement again for the new row type: the call fails once,
    # as retryable (UNAVAILABLE to workers and clients), and succeeds when made again.
    with trio.fail_after(20):
        async with _table_and_pool(database_url, "widened", max_size=1) as (admin, pool):
            await admin.execute("INSERT INTO widened VALUES (1)")
            async with pool.transaction() as tx:
                assert len(await tx.fetch("SELECT * FROM widened")) == 1
            await admin.execute("ALTER TABLE widened ADD COLUMN note text")
            with pytest.raises(DatabaseUnavailable, match="a table changed under"):
                async with pool.transaction() as tx:
                    await tx.fetch("SELECT * FROM widened")
            async with pool.transaction() as tx:
                (row,) = await tx.fetch("SELECT * FROM widened")
            assert dict(row) == {"id": 1, "note": None}


@asynccontextmanager
async def _table_and_pool(
    database_url: str, table: str, *, max_size: int
) -> AsyncIterator[tuple[pg.Connection, pg.Pool]]:
    """An admin connection, the table ``table (id int PRIMARY KEY)`` it made, and a pool of
    up to ``max_size`` connections (one opened), for the block."""
    async with pg.connect(database_url) as admin:
        await admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        async with pg.open_pool(database_url, min_size=1, max_size=max_size) as pool:
            yield admin, pool
