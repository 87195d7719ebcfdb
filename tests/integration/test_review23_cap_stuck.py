"""Review 23 (409a1f8 with 985732e): a workflow task whose decision is over the message limit
fails "once", but the failure's message counts the worker's id in its size, so the same stuck
run failing again on a worker whose id is of another length is not "the same failure again"
(985732e compares type and message): every such retry grows the stuck history again, which is
what 985732e set out to stop. Fails on main; passes once the message no longer depends on
who replayed (or the size is computed without the worker id)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, activity, workflow
from everruns.server import ServerConfig, serve
from everruns.worker import ActivityContext, Worker

pytestmark = pytest.mark.db

MIB = 1024 * 1024
LIMIT = 9 * MIB


async def test_review23_cap_an_over_the_limit_decision_is_recorded_once_whichever_worker(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry()

    @activity(registry=registry)
    async def echo(ctx: ActivityContext, text: str) -> int:
        return len(text)

    @workflow(registry=registry)
    async def fan_out(ctx: Any, n: int) -> Any:
        work = [ctx.execute_activity(echo, str(i) * (3 * MIB // 2)) for i in range(n)]
        return await ctx.gather(*work)

    def stuck_logs() -> int:
        return sum("is stuck" in r.getMessage() for r in caplog.records)

    caplog.set_level(logging.ERROR, logger="everruns.server")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            config = ServerConfig(database_url=database_url, grpc_port=0, max_message_bytes=LIMIT)
            info = await nursery.start(serve, config)
            async with Client.connect(info.address) as client:
                first = Worker(
                    registry,
                    address=info.address,
                    grace_period=0.5,
                    poll_wait=1.0,
                    worker_id="w-1",
                )
                async with trio.open_nursery() as workers:
                    await workers.start(first.run)
                    handle = await client.start_workflow(fan_out, 8)
                    while stuck_logs() < 1:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    first.shutdown()
                # The same code, on a worker named otherwise: the stuck run is tried again.
                second = Worker(
                    registry,
                    address=info.address,
                    grace_period=0.5,
                    poll_wait=1.0,
                    worker_id="w-2-with-a-longer-name",
                )
                async with trio.open_nursery() as workers:
                    await workers.start(second.run)
                    while stuck_logs() < 2:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    history = await handle.history()
                    second.shutdown()
                failed = [e for e in history if e.type == "workflow_task_failed"]
                messages = [r.getMessage() for r in caplog.records if "is stuck" in r.getMessage()]
                assert len(failed) == 1, (
                    f"the same over-the-limit decision was recorded {len(failed)} times: {messages}"
                )
            nursery.cancel_scope.cancel()
