"""`python -m everruns.server` as an operator meets it: bad configuration, an unreachable
database, `migrate`, and a clean stop on SIGINT/SIGTERM — one line and an exit code, never a
traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

from everruns._aio import pg
from everruns.store.migrate import load_migrations

from .harness import free_port, run_server_command, server_env

pytestmark = pytest.mark.db


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"RUNNER_MODE": "temporal"}, "RUNNER_MODE='temporal' is not supported"),
        ({"DATABASE_URL": "mysql://root@localhost/x"}, "DATABASE_URL is invalid"),
        ({"DATABASE_URL": "postgresql://h:99999/x"}, "DATABASE_URL is invalid"),
        ({"GRPC_ADDRESS": "nowhere"}, "GRPC_ADDRESS='nowhere' is not host:port"),
        ({"EVERRUNS_STALE_AFTER": "soon"}, "EVERRUNS_STALE_AFTER='soon' is not a number"),
    ],
)
async def test_bad_configuration_is_one_line_and_exit_2(extra: dict[str, str], needle: str) -> None:
    code, output = await run_server_command([], extra)
    assert code == 2, output
    assert needle in output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output


async def test_unreachable_database_is_retried_then_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    code, output = await run_server_command(
        [],
        {
            "DATABASE_URL": f"postgresql://postgres:secret@127.0.0.1:{port}/x",
            "EVERRUNS_DB_CONNECT_TIMEOUT": "1.5",
        },
    )
    assert code == 1, output
    assert "did not accept a connection within 1.5 s" in output
    assert "retrying" in output  # it did back off and retry
    assert "secret" not in output  # the password is masked in every line
    assert "Traceback" not in output


async def test_unknown_arguments_exit_2() -> None:
    code, output = await run_server_command(["serve-forever"], {})
    assert code == 2 and "unknown arguments" in output


async def test_migrate_applies_and_exits(pg_server_url: str) -> None:
    from tests.conftest import drop_database, with_database

    name = f"everruns_migrate_{os.getpid()}"
    await drop_database(pg_server_url, name)
    async with pg.connect(pg_server_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = with_database(pg_server_url, name)
        code, output = await run_server_command(["migrate"], {"DATABASE_URL": url})
        assert code == 0, output
        shipped = [f"{m.version:03d}_{m.name}.sql" for m in load_migrations()]
        assert shipped[:2] == ["001_durable_tables.sql", "002_foreign_key_indexes.sql"]
        assert f"migrations applied: {len(shipped)} ({', '.join(shipped)})" in output
        code, output = await run_server_command(["migrate"], {"DATABASE_URL": url})
        assert code == 0 and "migrations applied: 0" in output
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_server_announces_itself_and_stops_cleanly(database_url: str, signum: int) -> None:
    address = f"127.0.0.1:{free_port()}"
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "everruns.server"],
            env=server_env({"DATABASE_URL": database_url, "GRPC_ADDRESS": address}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert process.stdout is not None
            seen = b""
            while f"listening on {address}".encode() not in seen:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, seen.decode()
                seen += chunk
            assert seen.decode().splitlines()[0] == (
                "Using Durable execution engine runner (PostgreSQL-backed)"
            )
            process.send_signal(signum)
            code = await process.wait()
            async for chunk in process.stdout:
                seen += chunk
            assert code == 0, seen.decode()
            assert "Traceback" not in seen.decode()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(5, shield=True):
                    await process.wait()
