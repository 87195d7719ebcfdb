"""Which PostgreSQL the control plane uses, and getting it ready: embedded or DATABASE_URL,
reachable, migrated, with room for the control plane's connections.

The embedded server is started in a thread (its module blocks), or reused when it already
runs. Either way it is watched while the control plane runs, and started again when it stops:
its postmaster died, or another control plane on the same data directory, which started it,
stopped it on its way out. Whoever starts it owns it (`everruns-owner.pid`), and it is stopped
on the way out only by its owner (a control plane killed with kill -9 leaves it to the next
one, which takes it over). Nothing here serves requests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from everruns._aio import pg
from everruns.errors import ConfigError, EmbeddedPostgresError
from everruns.server.config import ServerConfig
from everruns.store import embedded
from everruns.store.capacity import ConnectionRoom, read_connection_room
from everruns.store.migrate import apply_migrations

__all__ = ["check_connection_room", "migrate_database", "open_database", "pool_room_verdict"]

log = logging.getLogger("everruns.server")


@asynccontextmanager
async def open_database(config: ServerConfig) -> AsyncIterator[str]:
    """Yield the URL of a reachable PostgreSQL for the block.

    With ``config.database_url`` unset, the embedded PostgreSQL is started (or reused) first,
    kept running during the block (started again if it stops, whoever started it), and
    stopped after it (shielded, bounded) if this process started it last.

    Raises:
        EmbeddedPostgresError: the embedded server could not be started.
        DatabaseUnavailable: the database did not answer within ``db_connect_timeout``.
        ExceptionGroup of EmbeddedPostgresError: the embedded server stopped during the block
            and could not be started again (the block is cancelled).
    """
    if config.database_url is not None:
        log.info("database: %s", embedded.mask_url(config.database_url))
        await pg.wait_until_ready(
            config.database_url, budget=config.db_connect_timeout, log=log.warning
        )
        yield config.database_url
        return
    data_dir = Path(config.data_dir) if config.data_dir else embedded.default_data_dir()
    handle = await trio.to_thread.run_sync(embedded.start, data_dir)
    how = "started" if handle.started_by_us else "reusing"
    log.info("database: embedded PostgreSQL (%s) in %s at %s", how, data_dir, handle.url)
    owned = _Owned(handle)
    try:
        await pg.wait_until_ready(handle.url, budget=config.db_connect_timeout, log=log.warning)
        async with trio.open_nursery() as nursery:
            await nursery.start(_keep_embedded_running, owned)
            yield handle.url
            nursery.cancel_scope.cancel()
    finally:
        if owned.handle.started_by_us:
            with trio.move_on_after(35, shield=True):
                await trio.to_thread.run_sync(embedded.stop, owned.handle)
                log.info("database: embedded PostgreSQL stopped")


WATCH_INTERVAL = 2.0
"""Seconds between two looks at whether the embedded postmaster still runs."""


@attrs.define
class _Owned:
    """The embedded server this control plane uses now; stopped on the way out if its
    ``started_by_us`` (this process started it last, or took it over)."""

    handle: embedded.EmbeddedHandle


async def _keep_embedded_running(
    owned: _Owned, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Start the embedded PostgreSQL again when it stops running: its postmaster died (the OOM
    killer, a kill -9), or the control plane that started it stopped it on its way out while
    this one still uses it (two control planes on one data directory). Without it the control
    plane could only ever answer UNAVAILABLE. It comes back on the same data directory and
    port, so the pool reconnects; this process then owns it, unless another one started it
    first (all starts take the data directory's lock), and goes on watching it either way.

    Raises:
        EmbeddedPostgresError: it could not be started again, or only on another port (the
            control plane then exits 1, for its supervisor to restart it).
    """
    task_status.started()
    while True:
        await trio.sleep(WATCH_INTERVAL)
        handle = owned.handle
        if await trio.to_thread.run_sync(embedded.running, handle):
            continue
        log.warning(
            "database: the embedded PostgreSQL in %s stopped running; starting it again",
            handle.data_dir,
        )
        again = await trio.to_thread.run_sync(embedded.start, handle.data_dir)
        # Stopped on the way out only if this process started it now: one that another
        # process started is its starter's to stop (whatever this process started before).
        owned.handle = again
        if again.port != handle.port:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL in {handle.data_dir} came back on port {again.port} "
                f"instead of {handle.port}, which the control plane's connections use; "
                "restart the control plane"
            )
        if again.started_by_us:
            log.info("database: embedded PostgreSQL started again, on port %d", again.port)
        else:
            log.warning("database: the embedded PostgreSQL was started again by another process")


async def migrate_database(
    url: str, *, lock_timeout: float | None, room_for: tuple[int, int] | None = None
) -> list[str]:
    """Apply pending migrations, each waiting at most ``lock_timeout`` seconds for a lock at
    a try (None: no limit); return the names applied. With ``room_for`` (a pool size and the
    control plane's other connections), first make sure the server can hold them
    (`check_connection_room`, on the same connection): a pool that cannot fit leaves the
    schema as it was.

    Raises:
        ConfigError: see `check_connection_room`.
        MigrationError: see `apply_migrations`.
    """
    async with pg.connect(url) as conn:
        if room_for is not None:
            await check_connection_room(conn, pool_size=room_for[0], others=room_for[1])
        applied = await apply_migrations(conn, lock_timeout=lock_timeout, log=log.warning)
    for name in applied:
        log.info("migration applied: %s", name)
    return applied


def pool_room_verdict(pool_size: int, others: int, room: ConnectionRoom) -> str | None:
    """What to say of a pool of ``pool_size`` connections, beside ``others`` more of the
    control plane's, on a server with ``room`` (counted by a connection of ours that closes
    before the pool opens): None if it fits in what is free now, else a warning line.

    Raises:
        ConfigError: the server can never hold that many connections (the line says which
            setting to change).
    """
    needed = pool_size + others
    if needed > room.allowed:
        raise ConfigError(
            f"EVERRUNS_DB_POOL_SIZE={pool_size} needs {needed} PostgreSQL connections but the "
            f"server allows {room.allowed} (max_connections {room.max_connections} minus "
            f"{room.reserved} reserved); lower EVERRUNS_DB_POOL_SIZE or raise max_connections"
        )
    held = max(0, room.open_now - 1)  # not the connection that counted
    free = room.allowed - held
    if needed > free:
        return (
            f"EVERRUNS_DB_POOL_SIZE={pool_size} needs {needed} PostgreSQL connections but only "
            f"{max(0, free)} of the server's {room.allowed} are free now ({held} held by other "
            "sessions); connections beyond those fail until others disconnect"
        )
    return None


async def check_connection_room(conn: pg.Connection, *, pool_size: int, others: int) -> None:
    """Make sure the server ``conn`` is connected to (a connection that closes before the
    pool opens) can hold a pool of ``pool_size`` connections and ``others`` more: refuse a
    pool it can never hold, and warn (in the log) of one it cannot hold now.

    Raises:
        ConfigError: the server's ``max_connections``, less its reserved connections, is below
            what the control plane needs.
        DatabaseError: the server could not be asked.
    """
    room = await read_connection_room(conn)
    warning = pool_room_verdict(pool_size, others, room)
    if warning is not None:
        log.warning("%s", warning)
