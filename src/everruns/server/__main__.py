"""`python -m everruns.server [migrate]`: run the control plane, or apply migrations and exit.

Operator mistakes (bad variable, unreachable database) print one line and exit 2 or 1, never a
traceback; SIGINT, SIGTERM and SIGHUP stop it cleanly (exit 0), at any point of its start, and a
second one stops it at once. `migrate` stopped by a signal stops as cleanly (the migration in
progress rolls back, the embedded PostgreSQL it started stops) but exits 1: what runs after it
must not take the schema for up to date.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from everruns._aio import open_aio_loop
from everruns._program import quiet_transport_logs, run_program
from everruns.errors import ConfigError, EverrunsError
from everruns.server.app import ServerInfo, serve
from everruns.server.config import ServerConfig
from everruns.server.database import migrate_database, open_database

USAGE = """usage: python -m everruns.server [migrate]

Runs the everruns control plane (no argument) or applies database migrations and exits
(`migrate`). Configuration comes from the environment:
  DATABASE_URL   PostgreSQL URL (default: the embedded PostgreSQL in EVERRUNS_DATA_DIR)
  GRPC_ADDRESS   where to listen (default 127.0.0.1:9001)
  RUNNER_MODE    only 'durable' is supported
See docs/operations.md for the rest.
"""

log = logging.getLogger("everruns.server")


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _watch_signals(
    serving: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Stop the control plane on SIGINT, SIGTERM or SIGHUP (a closed terminal), whatever it is
    doing, including waiting for its database at start; a second signal ends the process at
    once, its shutdown (stopping the embedded PostgreSQL, up to 35 s) left unfinished."""
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not serving.cancel_called:
                log.info("received %s, shutting down; send it again to stop now", name)
                serving.cancel()
                continue
            log.warning("received %s again: stopping now", name)
            # The signal's own default action ends the process as the operator asked (status
            # -signum, 128+signum in a shell); the shutdown in progress is shielded from any
            # cancellation, so nothing short of this interrupts it.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


async def _until_signal(body: Callable[[], Awaitable[None]]) -> bool:
    """Run ``body`` until it returns or a stop signal cancels it (then its own cleanup, such
    as stopping the embedded PostgreSQL it started, runs, and this returns: a clean stop).
    Returns whether ``body`` finished."""
    async with trio.open_nursery() as nursery:
        stopping = trio.CancelScope()
        await nursery.start(_watch_signals, stopping)
        with stopping:
            await body()
        nursery.cancel_scope.cancel()
    return not stopping.cancelled_caught


async def _run(config: ServerConfig) -> None:
    async def serving() -> None:
        print("Using Durable execution engine runner (PostgreSQL-backed)", flush=True)
        async with trio.open_nursery() as server:
            info: ServerInfo = await server.start(serve, config)
            print(f"everruns control plane listening on {info.address}", flush=True)
        # Only a signal ends serve() without an error.

    await _until_signal(serving)


async def _migrate(config: ServerConfig) -> None:
    async def migrating() -> None:
        async with open_aio_loop(), open_database(config) as url:
            applied = await migrate_database(url, lock_timeout=config.migrate_lock_timeout)
        names = f" ({', '.join(applied)})" if applied else ""
        print(f"migrations applied: {len(applied)}{names}", flush=True)

    if not await _until_signal(migrating):
        raise EverrunsError(
            "stopped by a signal before the migrations were all applied; run it again"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(args) > 1 or (args and args[0] != "migrate"):
        print(f"everruns.server: unknown arguments {' '.join(args)!r}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_transport_logs()
    try:
        config = ServerConfig.from_env()
    except ConfigError as exc:
        print(f"everruns.server: {exc}", file=sys.stderr)
        return 2
    return run_program("everruns.server", _migrate if args else _run, config)


if __name__ == "__main__":
    sys.exit(main())
