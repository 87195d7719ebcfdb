"""`scripts/demo`: the control plane on the embedded PostgreSQL, narrated step by step.

It starts (or reuses) the embedded PostgreSQL, applies migrations, serves gRPC and says where,
then waits for Ctrl-C and stops everything it started.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from everruns.errors import EverrunsError
from everruns.server.__main__ import operator_error
from everruns.server.app import serve
from everruns.server.config import ServerConfig


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


async def _main(config: ServerConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            where = (config.database_url and "DATABASE_URL") or "the embedded PostgreSQL"
            _say(f"starting the control plane on {where} (migrations are applied at start)")
            info = await nursery.start(serve, config)
            _say(f"control plane ready: gRPC on {info.address}, database {info.database}")
            _say("press Ctrl-C to stop")
            async for _ in signals:
                _say("stopping")
                nursery.cancel_scope.cancel()
                break
    _say("stopped cleanly")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        trio.run(_main, ServerConfig.from_env())
    except (EverrunsError, BaseExceptionGroup) as exc:
        leaf = operator_error(exc)
        if leaf is None:
            raise
        print(f"demo: {leaf}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
