"""The control plane's root: database, migrations, gRPC and background duties in one nursery.

`serve` reports readiness through ``task_status`` only when the database is migrated, LISTEN is
registered and the gRPC port is bound, and everything it started unwinds when its scope is
cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from everruns._aio import open_aio_loop, pg
from everruns._aio.grpc import serve_services, server_tls
from everruns._proto.everruns import v1 as pb
from everruns.errors import EverrunsError
from everruns.server.config import ServerConfig
from everruns.server.database import migrate_database, open_database
from everruns.server.duties import run_due_scanner, run_duties, run_follow_ups
from everruns.server.engine import Engine
from everruns.server.notifier import Notifier
from everruns.server.services import UndeliveredTasks, WorkerService, WorkflowService
from everruns.store import embedded
from everruns.store.store import Store

__all__ = ["ServerInfo", "serve"]

log = logging.getLogger("everruns.server")


@attrs.frozen
class ServerInfo:
    """What a started control plane reports: where it listens and which database it uses."""

    address: str
    port: int
    database: str  # masked URL


POOL_SETTINGS = {"plan_cache_mode": "force_generic_plan"}
"""Settings of the control plane's connections.

Every statement the control plane runs is prepared once per connection and keyed by ids,
arrays of ids and lease tokens, where one plan serves every value. Left to choose, PostgreSQL
planned the statements that complete a workflow task and start runs again at every call (after
five calls it compares a generic plan with the custom ones and kept custom plans): 0.9-1.1 ms
of planning per workflow task, more than its execution (pg_stat_statements, bench --profile).
"""


async def serve(
    config: ServerConfig, *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the control plane until cancelled.

    Raises:
        ConfigError, DatabaseError: the database could not be reached, started or migrated.
        ServerUnavailable: the gRPC address cannot be bound.
    """
    started = False

    def report(info: ServerInfo) -> None:
        nonlocal started
        started = True
        task_status.started(info)

    try:
        await _serve(config, report)
    except BaseExceptionGroup as group:
        # Before it serves, what stops it is one error (the port taken, the database gone),
        # wrapped by the nurseries it passed through: the caller of `nursery.start(serve, ...)`
        # gets that error, as documented, to catch by its type.
        leaf = None if started else _sole_leaf(group)
        if not isinstance(leaf, EverrunsError):
            raise
    else:
        return
    raise leaf  # outside the handler: the error keeps its own context, not the group


def _sole_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a group holds, however deeply nested; None if it holds several."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


OTHER_CONNECTIONS = 1
"""PostgreSQL connections the control plane holds beside its pool while it serves: the
notifier's LISTEN connection (one at a time, also when it reconnects). The connections that
wait for the database, count its room and migrate it are closed before the pool opens."""


async def _serve(config: ServerConfig, report: Callable[[ServerInfo], None]) -> None:
    async with open_aio_loop(), open_database(config) as url:
        # The room for the pool is checked before migrating, on the migration's connection.
        await migrate_database(
            url,
            lock_timeout=config.migrate_lock_timeout,
            room_for=(config.pool_size, OTHER_CONNECTIONS),
        )
        async with pg.open_pool(
            url, min_size=2, max_size=config.pool_size, settings=POOL_SETTINGS
        ) as pool:
            store = Store(pool)
            notifier = Notifier()
            engine = Engine(store, config, notifier)
            closing = trio.Event()
            tls = (
                server_tls(config.tls_cert, config.tls_key)
                if config.tls_cert and config.tls_key
                else None
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(notifier.listen, url)
                await nursery.start(run_duties, engine)
                await nursery.start(run_due_scanner, engine)
                await nursery.start(run_follow_ups, engine)
                port = await nursery.start(
                    lambda task_status: serve_services(
                        [
                            (pb.WorkerServiceBase(), WorkerService(engine, closing)),
                            (pb.WorkflowServiceBase(), WorkflowService(engine)),
                        ],
                        config.grpc_host,
                        config.grpc_port,
                        auth_token=config.auth_token,
                        tls=tls,
                        closing=closing,
                        undelivered=UndeliveredTasks(engine),
                        max_message_bytes=config.max_message_bytes,
                        task_status=task_status,
                    )
                )
                info = ServerInfo(f"{config.grpc_host}:{port}", port, embedded.mask_url(url))
                log.info("serving gRPC on %s", info.address)
                nursery.start_soon(_warm_up, store, config.pool_size)
                report(info)


async def _warm_up(store: Store, size: int) -> None:
    """Open the rest of the pool and prepare the statements on each connection while the
    control plane serves, so that the first burst of calls after a start or a restart finds
    connections ready instead of opening them and preparing what it runs (w7's first claims:
    165 ms against 13 ms). The control plane works without it: if it stops, it says why."""
    began = trio.current_time()
    try:
        warmed = await store.warm_up()
    except EverrunsError as exc:
        log.warning("connection pool warm-up stopped: %s", exc)
    else:
        # A connection borrowed throughout is left cold; it is one of the two opened first.
        log.info(
            "connection pool warm: %d of %d connections with every statement prepared (%.2f s)",
            warmed,
            size,
            trio.current_time() - began,
        )
