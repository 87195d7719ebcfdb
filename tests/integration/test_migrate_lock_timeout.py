"""A migration that cannot get its locks gives up in bounded time, naming who holds them.

Defect: `apply_migrations` ran each migration with no ``lock_timeout``. A migration whose
ALTER TABLE found an operator's transaction open on the table (a psql session left idle in
transaction) waited for ever, holding the advisory lock every other control plane waits on;
and its queued ACCESS EXCLUSIVE request blocked every later query on that table, so the
running control planes stalled too. Now each try waits at most ``lock_timeout``, is rolled
back and tried again after a pause, and the last failure names the migration and the blocking
session; nothing of it is recorded, and it applies once the blocker has gone.
"""

from __future__ import annotations

import os

import pytest
import trio

from everruns._aio import pg
from everruns.domain.limits import MAX_SECONDS
from everruns.errors import MigrationError
from everruns.store.migrate import (
    MIGRATION_LOCK_KEY,
    Migration,
    apply_migrations,
    load_migrations,
)
from tests.conftest import drop_database, with_database

pytestmark = pytest.mark.db

# 001-003 create and index the tables; 004 is the first to ALTER durable_task_queue.
_BEFORE = 3


async def _fresh_database(server_url: str, name: str) -> str:
    await drop_database(server_url, name)
    async with pg.connect(server_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


async def _versions(url: str) -> list[int]:
    async with pg.connect(url) as conn:
        rows = await conn.fetch("SELECT version FROM everruns_schema_migrations ORDER BY 1")
    return [row["version"] for row in rows]


async def test_a_migration_blocked_by_an_open_transaction_fails_naming_the_blocker(
    pg_server_url: str,
) -> None:
    name = f"migrate_lock_{os.getpid()}"
    migrations = load_migrations()
    blocked = migrations[_BEFORE]
    label = f"{blocked.version:03d}_{blocked.name}.sql"
    assert "ALTER TABLE durable_task_queue" in blocked.sql
    try:
        with trio.fail_after(60):
            url = await _fresh_database(pg_server_url, name)
            async with pg.connect(url) as conn:
                await apply_migrations(conn, migrations[:_BEFORE])
            retries: list[str] = []
            async with pg.connect(url) as operator, pg.connect(url) as conn:
                blocker = await operator.fetchval("SELECT pg_backend_pid()")
                async with operator.transaction():
                    # An operator's psql session that read the table and left its transaction
                    # open: ACCESS SHARE, which ALTER TABLE's ACCESS EXCLUSIVE waits behind.
                    await operator.execute("LOCK TABLE durable_task_queue IN ACCESS SHARE MODE")
                    began = trio.current_time()
                    with pytest.raises(MigrationError) as info:
                        await apply_migrations(
                            conn,
                            migrations,
                            lock_timeout=0.3,
                            lock_tries=3,
                            lock_pause=0.1,
                            log=retries.append,
                        )
                    elapsed = trio.current_time() - began
                    message = str(info.value)
                    # 3 tries of 0.3 s and pauses of 0.1 and 0.2 s; on the old code it waited
                    # until this test's fail_after.
                    assert elapsed < 5, f"took {elapsed:.1f} s: {message}"
                    assert "\n" not in message
                    assert message.startswith(
                        f"migration {label} could not lock its tables within 0.3 s (3 tries): "
                        f"blocked by pid {blocker} (idle in transaction for "
                    ), message
                    assert message.endswith("; end that session (pg_terminate_backend) or retry")
                    assert len(retries) == 2, retries
                    assert all(label in line and f"pid {blocker}" in line for line in retries)
                    # Given up, it queues no lock request: the table is usable at once, and
                    # the advisory lock is free for the next control plane.
                    async with pg.connect(url) as other:
                        with trio.fail_after(2):
                            await other.fetchval("SELECT count(*) FROM durable_task_queue")
                        assert await other.fetchval(
                            "SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY
                        )
                    # Nothing of it applied, nothing recorded.
                    assert await _versions(url) == [m.version for m in migrations[:_BEFORE]]
                    assert (
                        await conn.fetchval(
                            "SELECT count(*) FROM information_schema.columns"
                            " WHERE table_name = 'durable_task_queue'"
                            " AND column_name = 'start_deadline'"
                        )
                        == 0
                    )
                # The operator's transaction has ended: it applies, with the ones after it.
                applied = await apply_migrations(conn, migrations, lock_timeout=0.3)
            assert applied == [f"{m.version:03d}_{m.name}.sql" for m in migrations[_BEFORE:]]
            assert await _versions(url) == [m.version for m in migrations]
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)


async def test_cancelling_a_migration_waiting_to_retry_stops_it_at_once(
    pg_server_url: str,
) -> None:
    """The pause between tries is a Trio sleep: a signal (a cancellation) ends it at once,
    and the advisory lock is given back."""
    name = f"migrate_lock_cancel_{os.getpid()}"
    migrations = load_migrations()
    try:
        with trio.fail_after(60):
            url = await _fresh_database(pg_server_url, name)
            async with pg.connect(url) as conn:
                await apply_migrations(conn, migrations[:_BEFORE])
            async with (
                pg.connect(url) as operator,
                pg.connect(url) as conn,
                operator.transaction(),
            ):
                await operator.execute("LOCK TABLE durable_task_queue IN ACCESS SHARE MODE")
                began = trio.current_time()
                with trio.move_on_after(1) as scope:
                    await apply_migrations(
                        conn, migrations, lock_timeout=0.2, lock_tries=5, lock_pause=60
                    )
                assert scope.cancelled_caught
                assert trio.current_time() - began < 3
                assert await operator.fetchval(
                    "SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY
                )
            assert await _versions(url) == [m.version for m in migrations[:_BEFORE]]
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)


@pytest.mark.parametrize(
    ("lock_timeout", "setting"), [(None, "0"), (0.0001, "1ms"), (MAX_SECONDS, "2147483647ms")]
)
async def test_every_lock_timeout_the_configuration_accepts_is_one_postgresql_takes(
    pg_server_url: str, lock_timeout: float | None, setting: str
) -> None:
    """PostgreSQL's lock_timeout is an int of milliseconds, where 0 means no limit: the
    smallest timeout must not become 0, the largest (100 years) not overflow; None (the
    variable set to 0) waits as long as it takes, whatever the role's own setting."""
    name = f"migrate_lock_range_{os.getpid()}"
    # Divides by zero, failing the migration, unless the setting is the one expected.
    probe = Migration(
        1, "probe", f"SELECT 1 / (current_setting('lock_timeout') = '{setting}')::int"
    )
    try:
        with trio.fail_after(30):
            url = await _fresh_database(pg_server_url, name)
            async with pg.connect(url) as conn:
                await conn.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '1min'")
            async with pg.connect(url) as conn:
                applied = await apply_migrations(conn, [probe], lock_timeout=lock_timeout)
                assert applied == ["001_probe.sql"]
                # Local to the migration's transaction: the session keeps its own.
                assert await conn.fetchval("SHOW lock_timeout") == "1min"
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)
