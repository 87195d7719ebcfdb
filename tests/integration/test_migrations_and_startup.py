"""Schema migrations and control-plane start-up against a real PostgreSQL.

Found by a review in session 18 (tests/integration/test_review_migrations.py then); each of its
first four tests failed before its fix:

- a database migrated by a newer release (a migration recorded that this code does not know)
  was accepted silently, and the old control plane served on a schema it does not understand;
- a control plane whose role may use the tables but not create them could not start on a fully
  migrated database (the ledger's CREATE TABLE IF NOT EXISTS needs CREATE on the schema);
- a role refused CONNECT on the database was retried for the whole connection budget and then
  reported as an unreachable server;
- a libpq URL parameter (``connect_timeout``, valid for ``psql "$DATABASE_URL"``) was sent to
  the server as a setting, refused, retried for the whole budget and reported as unreachable.

The last test pins what the second fix says when a migration really is pending and the role
may not apply it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

import pytest
import trio

from everruns._aio import pg
from everruns.store.migrate import Migration, apply_migrations, load_migrations
from tests.conftest import drop_database, with_database
from tests.e2e.harness import free_port, run_server_command, server_env

pytestmark = pytest.mark.db


async def _run(args: list[str], extra: Mapping[str, str], timeout: float) -> tuple[int, str, float]:
    began = trio.current_time()
    code, output = await run_server_command(args, extra, timeout)
    return code, output, trio.current_time() - began


def _with_user(url: str, user: str) -> str:
    scheme, _, rest = url.partition("://")
    hostpart = rest.rpartition("@")[2]
    return f"{scheme}://{user}@{hostpart}"


async def _fresh_database(server_url: str, name: str) -> str:
    await drop_database(server_url, name)
    async with pg.connect(server_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


async def _drop_role(server_url: str, role: str) -> None:
    async with pg.connect(server_url) as admin:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')


async def test_a_database_migrated_by_a_newer_release_is_refused_at_start(
    pg_server_url: str,
) -> None:
    """A release that adds a migration (the number after this code's last) has run on this
    database (then the operator rolled the control plane back, or an old replica restarted).
    This code does not know it: it must refuse to serve, in one line that names it, rather
    than run on a schema it does not understand (here: a NOT NULL column its INSERTs do not
    fill, so every start would fail later with a constraint error)."""
    name = f"rev_migrate_newer_{os.getpid()}"
    try:
        with trio.fail_after(60):
            url = await _fresh_database(pg_server_url, name)
            known = load_migrations()
            unknown = f"{known[-1].version + 1:03d}"
            newer = [
                *known,
                Migration(
                    known[-1].version + 1,
                    "tenants",
                    "ALTER TABLE durable_task_queue ADD COLUMN tenant text NOT NULL DEFAULT 't';"
                    "ALTER TABLE durable_task_queue ALTER COLUMN tenant DROP DEFAULT;",
                ),
            ]
            async with pg.connect(url) as conn:
                await apply_migrations(conn, newer)
            code, output, _ = await _run(["migrate"], {"DATABASE_URL": url}, timeout=45)
            errors = [line for line in output.splitlines() if line.startswith("everruns.server:")]
            assert code == 1 and len(errors) == 1 and unknown in errors[0], (
                f"a database whose schema is newer than the code (migration {unknown}_tenants "
                "recorded, unknown to this release) was accepted: apply_migrations ignores recorded "
                "versions it has no file for, so the control plane starts and fails later on "
                f"the schema it does not know; exit {code}, output:\n{output}"
            )
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)


async def test_a_role_that_cannot_create_tables_starts_on_a_migrated_database(
    pg_server_url: str,
) -> None:
    """The usual least-privilege setup: the owner applies the migrations
    (`python -m everruns.server migrate`), the control plane runs as a role that may read and
    write the tables but not create any. With nothing left to migrate it must start."""
    name = f"rev_migrate_dml_{os.getpid()}"
    role = f"rev_migrate_dml_{os.getpid()}"
    process = None
    try:
        with trio.fail_after(60):
            url = await _fresh_database(pg_server_url, name)
            async with pg.connect(url) as conn:
                await apply_migrations(conn)
                await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
                await conn.execute(f'CREATE ROLE "{role}" LOGIN')
                await conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
                await conn.execute(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                    f'TO "{role}"'
                )
                await conn.execute(
                    f'GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'
                )
            address = f"127.0.0.1:{free_port()}"
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "everruns.server"],
                env=server_env({"DATABASE_URL": _with_user(url, role), "GRPC_ADDRESS": address}),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert process.stdout is not None
            seen = b""
            while f"listening on {address}".encode() not in seen:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    break
                seen += chunk
            assert f"listening on {address}".encode() in seen, (
                "a control plane whose role has every privilege on the migrated tables but "
                "not CREATE on the schema does not start on a fully migrated database: "
                "apply_migrations runs CREATE TABLE IF NOT EXISTS everruns_schema_migrations "
                "unconditionally, which needs CREATE on the schema even when the table "
                f"exists. Output:\n{seen.decode()}"
            )
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()
        with trio.move_on_after(15, shield=True):
            await drop_database(pg_server_url, name)
            await _drop_role(pg_server_url, role)


async def test_a_role_refused_connect_fails_at_once_naming_the_refusal(
    pg_server_url: str,
) -> None:
    """PostgreSQL answers "permission denied for database" at every attempt: retrying cannot
    help (as for a wrong password or a missing database, which fail at once). The control
    plane must say so at once, not wait out EVERRUNS_DB_CONNECT_TIMEOUT (30 s by default) and
    then tell the operator to check that PostgreSQL is running."""
    name = f"rev_migrate_noconnect_{os.getpid()}"
    role = f"rev_migrate_noconnect_{os.getpid()}"
    try:
        with trio.fail_after(60):
            url = await _fresh_database(pg_server_url, name)
            async with pg.connect(pg_server_url) as admin:
                await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
                await admin.execute(f'CREATE ROLE "{role}" LOGIN')
                await admin.execute(f'REVOKE CONNECT ON DATABASE "{name}" FROM PUBLIC')
            code, output, elapsed = await _run(
                ["migrate"],
                {"DATABASE_URL": _with_user(url, role), "EVERRUNS_DB_CONNECT_TIMEOUT": "8"},
                timeout=45,
            )
            assert (
                code == 1
                and elapsed < 5
                and "permission denied for database" in output
                and "did not accept a connection" not in output
            ), (
                "a connection refused for lack of the CONNECT privilege is retried for the whole "
                "connection budget as if PostgreSQL were unreachable, then reported as "
                f"'did not accept a connection ... check that it is running' "
                f"(exit {code} after {elapsed:.1f} s); output:\n{output}"
            )
    finally:
        with trio.move_on_after(15, shield=True):
            await drop_database(pg_server_url, name)
            await _drop_role(pg_server_url, role)


async def test_a_libpq_connect_timeout_in_database_url_is_not_taken_for_an_outage(
    database_url: str,
) -> None:
    """`connect_timeout` is a libpq URL parameter (the URL works with `psql "$DATABASE_URL"`,
    which docs/operations.md uses for the runbook). The control plane must either use it or
    refuse it at once in one line naming it, not send it to PostgreSQL as a server setting,
    retry the refusal for the whole budget and report an unreachable server."""
    with trio.fail_after(45):
        url = f"{database_url}?connect_timeout=10"
        code, output, elapsed = await _run(
            ["migrate"], {"DATABASE_URL": url, "EVERRUNS_DB_CONNECT_TIMEOUT": "5"}, timeout=40
        )
        ok = code == 0 or (code == 2 and "connect_timeout" in output and elapsed < 4)
        assert ok, (
            "DATABASE_URL=...?connect_timeout=10 (valid for libpq/psql) is passed by asyncpg "
            "to the server as a setting ('unrecognized configuration parameter'), retried for "
            f"the whole EVERRUNS_DB_CONNECT_TIMEOUT as if PostgreSQL were down (exit {code} "
            f"after {elapsed:.1f} s); output:\n{output}"
        )


async def test_a_pending_migration_the_role_cannot_apply_names_the_owner_command(
    pg_server_url: str,
) -> None:
    """The owner migrated up to 006; the least-privilege role starts a release that brings
    007 (an ALTER TABLE only the table's owner may run). It must stop in one line naming the
    migration and how to apply it, not with a bare privilege error."""
    name = f"rev_migrate_pending_{os.getpid()}"
    role = f"rev_migrate_pending_{os.getpid()}"
    try:
        with trio.fail_after(60):
            url = await _fresh_database(pg_server_url, name)
            migrations = load_migrations()
            async with pg.connect(url) as conn:
                await apply_migrations(conn, migrations[:-1])
                await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
                await conn.execute(f'CREATE ROLE "{role}" LOGIN')
                await conn.execute(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                    f'TO "{role}"'
                )
            code, output, _ = await _run(
                ["migrate"], {"DATABASE_URL": _with_user(url, role)}, timeout=45
            )
            errors = [line for line in output.splitlines() if line.startswith("everruns.server:")]
            last = migrations[-1]
            assert code == 1 and len(errors) == 1, f"exit {code}, output:\n{output}"
            assert f"{last.version:03d}_{last.name}.sql" in errors[0]
            assert "python -m everruns.server migrate" in errors[0]
            async with pg.connect(url) as conn:  # nothing recorded that did not happen
                versions = await conn.fetch("SELECT version FROM everruns_schema_migrations")
            assert sorted(r["version"] for r in versions) == [m.version for m in migrations[:-1]]
    finally:
        with trio.move_on_after(15, shield=True):
            await drop_database(pg_server_url, name)
            await _drop_role(pg_server_url, role)
