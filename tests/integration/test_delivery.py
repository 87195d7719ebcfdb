"""Delivery is pushed, not polled: an idle worker starts a newly enqueued activity within
milliseconds (LISTEN/NOTIFY wakes the long-poll), far below any polling interval. The figures
themselves belong to the benchmark suite; this test only proves there is no interval."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, activity, workflow
from everruns.server import ServerConfig, serve
from everruns.worker import ActivityContext, Worker

pytestmark = pytest.mark.db

registry = Registry()
started_at: dict[str, float] = {}


@activity(registry=registry)
async def mark(ctx: ActivityContext, key: str) -> str:
    started_at[key] = trio.current_time()
    return key


@workflow(registry=registry)
async def one_step(ctx: Any, key: str) -> str:
    result: str = await ctx.execute_activity("mark", key)
    return result


async def test_idle_worker_starts_new_work_without_a_polling_interval(database_url: str) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
            worker = Worker(registry, address=info.address, max_concurrent_tasks=4)
            await nursery.start(worker.run)
            delays = []
            async with Client.connect(info.address) as client:
                for i in range(20):
                    await trio.sleep(0.05)  # let the worker go idle in its long-poll
                    handle = await client.start_workflow("one_step", f"k{i}")
                    returned = trio.current_time()
                    assert await handle.result(timeout=10) == f"k{i}"
                    delays.append(started_at[f"k{i}"] - returned)
            nursery.cancel_scope.cancel()
        # Two hops (workflow task, then activity task), each woken by NOTIFY: a polling
        # interval of even 0.5 s would put the median far above this bound.
        print(f"start -> activity body: median {statistics.median(delays) * 1000:.1f} ms")
        assert statistics.median(delays) < 0.15, delays
