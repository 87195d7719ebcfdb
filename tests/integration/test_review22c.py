"""Review 22c: `apply_migrations`' ``lock_timeout`` (and so ``ServerConfig.migrate_lock_timeout``,
which ``serve`` and ``migrate`` hand to it) takes any float, but infinity and NaN reach
``math.ceil`` in ``_lock_timeout_ms`` inside the migration's transaction: the OverflowError /
ValueError is wrapped by ``_schema_change`` as "migration 001_probe.sql failed: cannot convert
float infinity to integer", blaming a sound migration for a bad argument (and only when a
migration is pending: with none, the bad value passes unnoticed). Infinity is the natural way
to say "no limit" from Python; it should mean that (as None does), or be refused in one line
naming ``lock_timeout``."""

from __future__ import annotations

import math
import os

import pytest
import trio

from everruns._aio import pg
from everruns.store.migrate import Migration, apply_migrations
from tests.conftest import drop_database, with_database

pytestmark = pytest.mark.db


@pytest.mark.parametrize("lock_timeout", [math.inf, math.nan], ids=["inf", "nan"])
async def test_a_lock_timeout_postgresql_cannot_take_is_not_blamed_on_the_migration(
    pg_server_url: str, lock_timeout: float
) -> None:
    name = f"rev22c_lock_{os.getpid()}"
    probe = Migration(1, "probe", "SELECT 1")
    try:
        with trio.fail_after(30):
            await drop_database(pg_server_url, name)
            async with pg.connect(pg_server_url) as admin:
                await admin.execute(f'CREATE DATABASE "{name}"')
            async with pg.connect(with_database(pg_server_url, name)) as conn:
                try:
                    applied = await apply_migrations(conn, [probe], lock_timeout=lock_timeout)
                except Exception as exc:
                    message = str(exc)
                    assert "lock_timeout" in message, message
                    assert "001_probe" not in message, message
                else:
                    # Infinity read as no limit is a fine answer too; NaN is not a duration.
                    assert math.isinf(lock_timeout), applied
                    assert applied == ["001_probe.sql"]
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)
