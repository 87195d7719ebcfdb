"""EVERRUNS_DB_POOL_SIZE is checked against the server's max_connections at start.

Defect: the control plane opened its pool (two connections, then the rest while serving) with
no look at what the server allows. A pool larger than ``max_connections`` started "fine", its
warm-up stopped at "too many clients", every later call that needed another connection failed
with UNAVAILABLE, and the pool starved every other client of the server meanwhile. Now the
start refuses, in one line naming both numbers and what to change, before it migrates or opens
the pool; a pool that fits the server but not what other sessions leave free now is a warning.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns.errors import ConfigError
from everruns.server import app
from everruns.server.app import serve
from everruns.server.config import ServerConfig
from everruns.server.database import pool_room_verdict
from everruns.store.capacity import ConnectionRoom
from tests.conftest import drop_database, with_database
from tests.e2e.harness import free_port, server_env


async def _room(url: str) -> tuple[int, int]:
    """The server's max_connections and its reserved connections, read independently."""
    async with pg.connect(url) as conn:
        row = await conn.fetchrow(
            "SELECT current_setting('max_connections')::int AS m,"
            " current_setting('superuser_reserved_connections')::int"
            " + coalesce(current_setting('reserved_connections', true), '0')::int AS r"
        )
    assert row is not None
    return row["m"], row["r"]


def _expected(pool_size: int, max_connections: int, reserved: int) -> str:
    return (
        f"EVERRUNS_DB_POOL_SIZE={pool_size} needs {pool_size + 1} PostgreSQL connections but "
        f"the server allows {max_connections - reserved} (max_connections {max_connections} "
        f"minus {reserved} reserved); lower EVERRUNS_DB_POOL_SIZE or raise max_connections"
    )


@pytest.mark.db
async def test_a_pool_larger_than_max_connections_is_refused_before_anything_opens(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"pool_bound_{os.getpid()}"
    opened: list[int] = []
    real_open_pool = pg.open_pool

    def spy(url: str, **kwargs: Any) -> AbstractAsyncContextManager[pg.Pool]:
        opened.append(kwargs["max_size"])
        return real_open_pool(url, **kwargs)

    monkeypatch.setattr(pg, "open_pool", spy)
    try:
        with trio.fail_after(60):
            await drop_database(pg_server_url, name)
            async with pg.connect(pg_server_url) as admin:
                await admin.execute(f'CREATE DATABASE "{name}"')
            url = with_database(pg_server_url, name)
            max_connections, reserved = await _room(url)
            pool_size = max_connections + 10
            config = ServerConfig(database_url=url, grpc_port=0, pool_size=pool_size)
            async with trio.open_nursery() as nursery:
                with pytest.raises(ConfigError) as info:
                    await nursery.start(serve, config)
                    nursery.cancel_scope.cancel()  # the old code served: stop it
            assert str(info.value) == _expected(pool_size, max_connections, reserved)
            assert opened == [], "the pool was opened before the check"
            async with pg.connect(url) as conn:  # refused before it migrated anything
                assert (
                    await conn.fetchval("SELECT to_regclass('everruns_schema_migrations')") is None
                )
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)


@pytest.mark.db
async def test_the_server_program_exits_with_one_line_for_a_pool_that_cannot_fit(
    database_url: str,
) -> None:
    with trio.fail_after(60):
        max_connections, reserved = await _room(database_url)
        pool_size = 100000
        done = await trio.run_process(
            [sys.executable, "-m", "everruns.server"],
            env=server_env(
                {
                    "DATABASE_URL": database_url,
                    "GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
                    "EVERRUNS_DB_POOL_SIZE": str(pool_size),
                }
            ),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = done.stderr.decode()
    errors = [line for line in stderr.splitlines() if line.startswith("everruns.server:")]
    assert done.returncode == 2, (done.returncode, stderr)  # a ConfigError's exit status
    assert errors == [f"everruns.server: {_expected(pool_size, max_connections, reserved)}"]
    assert "Traceback" not in stderr


def test_a_pool_that_fits_what_is_free_passes_quietly() -> None:
    room = ConnectionRoom(max_connections=100, reserved=3, open_now=20)
    # 97 allowed, 19 held by others (20 less the connection that counted): 78 free.
    assert pool_room_verdict(77, 1, room) is None


def test_a_pool_that_fits_the_server_but_not_what_is_free_now_is_a_warning() -> None:
    room = ConnectionRoom(max_connections=100, reserved=3, open_now=20)
    assert pool_room_verdict(78, 1, room) == (
        "EVERRUNS_DB_POOL_SIZE=78 needs 79 PostgreSQL connections but only 78 of the server's "
        "97 are free now (19 held by other sessions); connections beyond those fail until "
        "others disconnect"
    )
    assert pool_room_verdict(96, 1, room) is not None  # 97: all the server allows


def test_a_pool_beyond_max_connections_less_reserved_is_refused() -> None:
    room = ConnectionRoom(max_connections=100, reserved=3, open_now=1)
    with pytest.raises(ConfigError) as info:
        pool_room_verdict(500, 1, room)
    assert str(info.value) == _expected(500, 100, 3)
    with pytest.raises(ConfigError):
        pool_room_verdict(97, 1, room)  # 98 needed, 97 allowed


@pytest.mark.db
async def test_the_control_plane_holds_its_pool_and_one_connection_more(
    database_url: str,
) -> None:
    """What the check counts beside the pool (`app.OTHER_CONNECTIONS`) is what a serving
    control plane holds: its LISTEN connection; those that checked and migrated are closed."""
    name = database_url.rpartition("/")[2]
    config = ServerConfig(database_url=database_url, grpc_port=0, pool_size=2)
    with trio.fail_after(30):
        async with pg.connect(database_url) as observer, trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            count = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
            # A closed connection's server process may take a moment to leave the view.
            for _ in range(100):
                held = await observer.fetchval(count, name)
                if held <= 2 + app.OTHER_CONNECTIONS:
                    break
                await trio.sleep(0.05)
            assert held == 2 + app.OTHER_CONNECTIONS
            nursery.cancel_scope.cancel()
