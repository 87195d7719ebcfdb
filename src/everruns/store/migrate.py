"""Apply ``migrations/NNN_name.sql`` in order, once each, recorded with a checksum.

Each migration runs in its own transaction, under a PostgreSQL advisory lock so that several
control planes starting together apply it exactly once. Its statements wait a bounded time for
their locks (``lock_timeout``), and it is tried again a few times when another session holds
them: waiting on, it would hold the advisory lock every other control plane waits for, and its
queued ACCESS EXCLUSIVE request would block every later query on the table it alters. An
applied migration whose file has changed since, or one recorded that this code has no file for
(a newer release migrated the database), stops everything with a clear error: the database no
longer matches the code. With nothing to apply it only reads, so a role without CREATE on the
schema can start.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Awaitable, Callable
from functools import partial
from importlib import resources

import attrs
import trio

from everruns._aio.pg import Connection, sqlstate_of
from everruns.errors import MigrationError

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "LOCK_PAUSE",
    "LOCK_TRIES",
    "Migration",
    "apply_migrations",
    "load_migrations",
]

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
# PostgreSQL's lock_not_available: lock_timeout ran out while a statement waited for a lock.
_LOCK_NOT_AVAILABLE = "55P03"

DEFAULT_LOCK_TIMEOUT = 5.0
"""Seconds a migration's statements wait for one lock before its transaction is rolled back."""

LOCK_TRIES = 5
"""How many times a migration that could not get its locks is tried in all."""

LOCK_PAUSE = 1.0
"""Seconds before the second try of a migration that could not get its locks, doubled before
each later one: with the defaults, 5 tries of 5 s and pauses of 1, 2, 4 and 8 s, 40 s in all."""

# lock_timeout is an int of milliseconds in PostgreSQL: anything longer is as good as forever.
_MAX_LOCK_TIMEOUT_MS = 2**31 - 1

# The sessions holding a lock on a table or index of the search path named in the migration's
# text ($1): whoever made it wait, and perhaps a few bystanders. The longest in their state first.
_LOCK_HOLDERS = """
SELECT a.pid, a.state, extract(epoch FROM now() - a.state_change)::float8 AS seconds
FROM pg_stat_activity a
WHERE a.pid IN (
    SELECT l.pid
    FROM pg_locks l
    JOIN pg_class c ON c.oid = l.relation
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND n.nspname = ANY (current_schemas(false))
      AND position(c.relname IN $1) > 0
)
ORDER BY a.state_change NULLS LAST, a.pid
LIMIT 5"""


async def apply_migrations(
    conn: Connection,
    migrations: list[Migration] | None = None,
    *,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    lock_tries: int = LOCK_TRIES,
    lock_pause: float = LOCK_PAUSE,
    log: Callable[[str], object] | None = None,
) -> list[str]:
    """Apply every migration not yet recorded; return the names applied (in order).

    With nothing to apply, only reads: a role that may use the tables but not create any (the
    schema's owner having migrated) gets through.

    Each migration's statements wait at most ``lock_timeout`` seconds for a lock (None or 0:
    as long as it takes, as PostgreSQL's own ``lock_timeout = 0``). When one runs out, the
    migration's transaction is rolled back and it is tried again after ``lock_pause`` seconds,
    doubled each time, ``lock_tries`` times in all; each such retry is reported to ``log``.
    Cancellation stops it at once, also in a pause (the migration in progress rolls back; the
    advisory lock is released, shielded).

    Raises:
        MigrationError: the database records a migration this code has no file for (a newer
            release migrated it), an applied migration was edited, a pending one needs a
            privilege the role lacks, could not get its locks in ``lock_tries`` tries (the
            message names the sessions holding them), or a migration failed (its transaction
            is rolled back and the ones before it stay applied).
    """
    if lock_tries < 1:
        raise ValueError(f"lock_tries must be at least 1, not {lock_tries}")
    if lock_timeout is not None and (
        isinstance(lock_timeout, bool)
        or not isinstance(lock_timeout, (int, float))
        or not lock_timeout >= 0  # also NaN
    ):
        raise ValueError(
            f"lock_timeout must be a number of seconds from 0, or None for no limit, not "
            f"{lock_timeout!r}"
        )
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
                    # Local to the transaction: the ledger's reads and the advisory lock keep
                    # the session's own setting.
                    await conn.execute(
                        "SELECT set_config('lock_timeout', $1, true)",
                        _lock_timeout_ms(lock_timeout),
                    )
                    await conn.execute(migration.sql)
                    await conn.execute(
                        f"INSERT INTO {_LEDGER} (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )

            pause = lock_pause
            for attempt in range(1, lock_tries + 1):
                try:
                    await _schema_change(apply, f"migration {label}")
                    break
                except MigrationError as exc:
                    if not lock_timeout or sqlstate_of(exc) != _LOCK_NOT_AVAILABLE:
                        raise
                    holders = await _lock_holders(conn, migration)
                    waited = f"could not lock its tables within {lock_timeout:g} s"
                    if attempt == lock_tries:
                        raise MigrationError(
                            f"migration {label} {waited} ({lock_tries} tries): "
                            + _holders_advice(holders)
                        ) from exc
                    if log is not None:
                        log(
                            f"migration {label} {waited}, {_holders_text(holders)}; trying "
                            f"again in {pause:g} s (try {attempt + 1} of {lock_tries})"
                        )
                await trio.sleep(pause)
                pause *= 2
            applied.append(label)
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


def _lock_timeout_ms(seconds: float | None) -> str:
    """``seconds`` as a value of PostgreSQL's ``lock_timeout`` (None or 0: ``0``, no limit)."""
    if not seconds:
        return "0"
    # Capped before rounding: an infinite wait is the longest PostgreSQL takes.
    return f"{max(1, math.ceil(min(seconds, _MAX_LOCK_TIMEOUT_MS / 1000) * 1000))}ms"


async def _lock_holders(conn: Connection, migration: Migration) -> list[str]:
    """The sessions holding locks on the tables ``migration`` names, each as ``pid 1234 (idle
    in transaction for 42 s)``; none if they cannot be read (the error at hand matters more)."""
    try:
        rows = await conn.fetch(_LOCK_HOLDERS, migration.sql)
    except Exception:
        return []
    holders = []
    for row in rows:
        # Another role's session shows no state without pg_read_all_stats.
        if row["state"] is None or row["seconds"] is None:
            holders.append(f"pid {row['pid']}")
        else:
            holders.append(f"pid {row['pid']} ({row['state']} for {row['seconds']:.0f} s)")
    return holders


def _holders_text(holders: list[str]) -> str:
    if not holders:
        return "no session holds its tables' locks any more"
    return f"blocked by {', '.join(holders)}"


def _holders_advice(holders: list[str]) -> str:
    """What an operator reads when a migration gave up waiting for its locks."""
    if not holders:
        return (
            "the sessions that held its tables' locks have ended since (see pg_locks and "
            "pg_stat_activity for long transactions); retry"
        )
    those = "that session" if len(holders) == 1 else "those sessions"
    return f"{_holders_text(holders)}; end {those} (pg_terminate_backend) or retry"


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
