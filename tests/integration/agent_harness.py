"""A control plane, one worker and a client for agent tests (no tools or providers of its own:
importing it registers nothing, so any test module may share it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from everruns.client import Client
from everruns.domain.registry import Registry
from everruns.server import ServerConfig, serve
from everruns.worker import Worker


@asynccontextmanager
async def serve_agent(
    database_url: str, registry: Registry, **config: Any
) -> AsyncIterator[Client]:
    """The control plane (``config``: more of its settings), one worker serving ``registry``
    (the agent and the test's tools), and a client."""
    async with trio.open_nursery() as nursery:
        info = await nursery.start(
            serve, ServerConfig(database_url=database_url, grpc_port=0, **config)
        )
        # The worker stops (drains and reports) before the control plane does.
        async with trio.open_nursery() as workers:
            worker = Worker(registry, address=info.address, grace_period=1, max_concurrent_tasks=8)
            await workers.start(worker.run)
            async with Client.connect(info.address) as client:
                yield client
            worker.shutdown()
        nursery.cancel_scope.cancel()
