"""Apply ``migrations/NNN_name.sql`` in order, once each, recorded with a checksum.

Each migration runs in its own transaction, under a PostgreSQL advisory lock so that several
control planes starting together apply it exactly once. An applied migration whose file has
changed since, or one recorded that this code has no file for (a newer release migrated the
database), stops everything with a clear error: the database no longer matches the code. With
nothing to apply it only reads, so a role without CREATE on the schema can start.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from functools import partial
from importlib import resources

import attrs
import trio

from everruns._aio.pg import Connection, sqlstate_of
from everruns.errors import MigrationError

__all__ = ["Migration", "apply_migrations", "load_migrations"]

# Arbitrary but fixed: the advisory lock key every everruns control plane agrees on.
MIGRATION_LOCK_KEY = 0x65766572_72756E73 & 0x7FFFFFFFFFFFFFFF
_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """Return the packaged migrations in version order.

    Raises:
        MigrationError: a file is misnamed or two files share a version number.
    """
    found: dict[int, Migration] = {}
    for entry in resources.files("everruns.store").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE.match(entry.name)
        if not match:
            raise MigrationError(f"migration file {entry.name!r} is not named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files have version {version:03d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


_LEDGER = "everruns_schema_migrations"
_CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {_LEDGER} (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

# PostgreSQL's insufficient_privilege: the role may not create or alter what a migration does.
_INSUFFICIENT_PRIVILEGE = "42501"


async def apply_migrations(
    conn: Connection, migrations: list[Migration] | None = None
) -> list[str]:
    """Apply every migration not yet recorded; return the names applied (in order).

    With nothing to apply, only reads: a role that may use the tables but not create any (the
    schema's owner having migrated) gets through.

    Raises:
        MigrationError: the database records a migration this code has no file for (a newer
            release migrated it), an applied migration was edited, a pending one needs a
            privilege the role lacks, or a migration failed (its transaction is rolled back
            and the ones before it stay applied).
    """
    todo = load_migrations() if migrations is None else migrations
    applied: list[str] = []
    # The lock comes before the look at the ledger: two control planes starting on an empty
    # database must not both find it missing and both create it.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        # Looked up rather than CREATE TABLE IF NOT EXISTS, which PostgreSQL refuses to a role
        # without CREATE on the schema even when the table exists.
        if await conn.fetchval("SELECT to_regclass($1)::text", _LEDGER) is None:
            await _schema_change(
                partial(conn.execute, _CREATE_LEDGER), f"creating the table {_LEDGER}"
            )
        rows = await conn.fetch(f"SELECT version, name, checksum FROM {_LEDGER}")
        done = {row["version"]: row for row in rows}
        known = {migration.version for migration in todo}
        unknown = [f"{v:03d}_{done[v]['name']}" for v in sorted(done) if v not in known]
        if unknown:
            raise MigrationError(
                f"this database has migration(s) {', '.join(unknown)} applied, which this "
                "everruns does not know: it was migrated by a newer release; run that release "
                "or newer"
            )
        for migration in todo:
            row = done.get(migration.version)
            label = f"{migration.version:03d}_{migration.name}.sql"
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {label} was changed after it was applied to this database; "
                        "restore the original file and add a new migration for the change"
                    )
                continue

            async def apply(migration: Migration = migration) -> None:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        f"INSERT INTO {_LEDGER} (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )

            await _schema_change(apply, f"migration {label}")
            applied.append(label)
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


async def _schema_change(change: Callable[[], Awaitable[object]], what: str) -> None:
    """Make a schema change; its failure becomes a `MigrationError` naming ``what``, which for
    a missing privilege says who can make it."""
    try:
        await change()
    except MigrationError:
        raise
    except Exception as exc:
        cause = str(exc)
        if sqlstate_of(exc) == _INSUFFICIENT_PRIVILEGE:
            raise MigrationError(
                f"{what} needs a privilege this database role lacks ({cause}); run "
                "`python -m everruns.server migrate` as the schema's owner, then start again"
            ) from exc
        raise MigrationError(f"{what} failed: {cause}") from exc
