"""Senders stay under the control plane's message limit (EVERRUNS_MAX_MESSAGE_BYTES), with a
control plane, a worker and a client against PostgreSQL: a batch of starts larger than the limit
goes in several calls, each under it; a workflow task whose decision would be over it fails with
why (the run is stuck, as after a replay error) instead of being sent and refused at every try;
the control plane tells a registering worker its limit."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns.domain.registry import Registry, activity, workflow
from everruns.worker import ActivityContext
from tests.integration.test_activity_edges import served

pytestmark = pytest.mark.db

MIB = 1024 * 1024
LIMIT = 9 * MIB  # the least the default payload limit (2 MiB) allows is 8 MiB and 64 KiB


async def test_a_batch_of_starts_over_the_limit_goes_in_several_calls_under_it(
    database_url: str,
) -> None:
    registry = Registry()

    @workflow(registry=registry)
    async def measure(ctx: Any, text: str) -> int:
        return len(text)

    sent: list[int] = []
    with trio.fail_after(60):
        async with served(database_url, registry, max_message_bytes=LIMIT) as (client, _):
            channel = client._channel
            unary = channel.unary

            async def spy(method: Any, request: Any, **options: Any) -> Any:
                if getattr(method, "__name__", "") == "start_workflows":
                    sent.append(len(bytes(request)))
                return await unary(method, request, **options)

            channel.unary = spy  # type: ignore[method-assign]
            # 20 starts of 1 MiB each: 20 MiB in all, over the limit and the send budget.
            starts = [(measure, chr(ord("a") + n) * MIB, f"big-{n}") for n in range(20)]
            handles = await client.start_workflows(starts)
            assert [h.workflow_id for h in handles] == [f"big-{n}" for n in range(20)]
            assert all(h.created for h in handles)
            for handle in handles[:3] + handles[-2:]:
                assert await handle.result(timeout=20) == MIB
    assert len(sent) >= 3
    assert max(sent) < LIMIT


async def test_a_decision_over_the_limit_fails_its_workflow_task_with_why(
    database_url: str,
) -> None:
    registry = Registry()

    @activity(registry=registry)
    async def echo(ctx: ActivityContext, text: str) -> int:
        return len(text)

    @workflow(registry=registry)
    async def fan_out(ctx: Any, n: int) -> Any:
        # Each input is under the payload limit; six together are over the message limit.
        work = [ctx.execute_activity(echo, str(i) * (3 * MIB // 2)) for i in range(n)]
        return await ctx.gather(*work)

    with trio.fail_after(60):
        async with served(database_url, registry, max_message_bytes=LIMIT) as (client, worker):
            assert worker._max_message_bytes == LIMIT  # told at registration
            handle = await client.start_workflow(fan_out, 8)
            with trio.fail_after(20):
                # The control plane's state, read as a client reads it.
                while (description := await handle.describe()).stuck_reason is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            reason = description.stuck_reason
            assert reason.startswith("workflow task failed: the 8 commands of this workflow ")
            assert f"under the control plane's limit of {LIMIT} bytes" in reason
            assert "(EVERRUNS_MAX_MESSAGE_BYTES)" in reason
            assert description.status == "running"
            history = await handle.history()
            failed = [e for e in history if e.type == "workflow_task_failed"]
            assert len(failed) == 1  # once: the run does not loop on a refused message
            assert not [e for e in history if e.type == "activity_scheduled"]
            # Under the limit, the same code runs.
            small = await client.start_workflow(fan_out, 2)
            assert await small.result(timeout=20) == [3 * MIB // 2] * 2


async def test_registration_tells_the_message_limit(database_url: str) -> None:
    with trio.fail_after(30):
        async with served(database_url, Registry(), max_message_bytes=LIMIT) as (_, worker):
            assert worker._max_message_bytes == LIMIT
            assert worker._results.max_bytes == worker._decisions.max_bytes
            assert worker._results.max_bytes <= LIMIT - 1024
