"""Apply ``migrations/NNN_name.sql`` in order, once each, recorded with a checksum.

Each migration runs in its own transaction, under a PostgreSQL advisory lock so that several
control planes starting together apply it exactly once. An applied migration whose file has
changed since stops everything with a clear error: the database no longer matches the code.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import attrs
import trio

from everruns._aio.pg import Connection
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


_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS everruns_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def apply_migrations(
    conn: Connection, migrations: list[Migration] | None = None
) -> list[str]:
    """Apply every migration not yet recorded; return the names applied (in order).

    Raises:
        MigrationError: an applied migration was edited, or a migration failed (its transaction
            is rolled back and the ones before it stay applied).
    """
    todo = load_migrations() if migrations is None else migrations
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_LEDGER)
        rows = await conn.fetch("SELECT version, name, checksum FROM everruns_schema_migrations")
        done = {row["version"]: row for row in rows}
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
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO everruns_schema_migrations (version, name, checksum) "
                        "VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
            except MigrationError:
                raise
            except Exception as exc:
                raise MigrationError(f"migration {label} failed: {exc}") from exc
            applied.append(label)
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied
