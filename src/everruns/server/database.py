"""Which PostgreSQL the control plane uses, and getting it ready: embedded or DATABASE_URL,
reachable, migrated.

The embedded server is started in a thread (its module blocks) and stopped on the way out only
if this process started it. Nothing here serves requests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from everruns._aio import pg
from everruns.server.config import ServerConfig
from everruns.store import embedded
from everruns.store.migrate import apply_migrations

__all__ = ["migrate_database", "open_database"]

log = logging.getLogger("everruns.server")


@asynccontextmanager
async def open_database(config: ServerConfig) -> AsyncIterator[str]:
    """Yield the URL of a reachable PostgreSQL for the block.

    With ``config.database_url`` unset, the embedded PostgreSQL is started (or reused) first
    and, if this process started it, stopped after the block (shielded, bounded).

    Raises:
        EmbeddedPostgresError: the embedded server could not be started.
        DatabaseUnavailable: the database did not answer within ``db_connect_timeout``.
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
    try:
        await pg.wait_until_ready(handle.url, budget=config.db_connect_timeout, log=log.warning)
        yield handle.url
    finally:
        if handle.started_by_us:
            with trio.move_on_after(35, shield=True):
                await trio.to_thread.run_sync(embedded.stop, handle)
                log.info("database: embedded PostgreSQL stopped")


async def migrate_database(url: str) -> list[str]:
    """Apply pending migrations; return the names applied."""
    async with pg.connect(url) as conn:
        applied = await apply_migrations(conn)
    for name in applied:
        log.info("migration applied: %s", name)
    return applied
