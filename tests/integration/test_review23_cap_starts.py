"""Review 23 (message cap, 409a1f8): `Client.start_workflows` cutting a batch into calls.

Each test fails on main at the commit under review and passes once fixed."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, workflow
from everruns.server import ServerConfig, serve
from tests.integration.test_activity_edges import served

pytestmark = pytest.mark.db

MIB = 1024 * 1024
LIMIT = 9 * MIB  # the least the default payload limit (2 MiB) allows is 8 MiB and 64 KiB


async def test_review23_cap_a_batch_of_starts_fits_a_lower_limit_without_the_call_stream(
    database_url: str,
) -> None:
    """With the call stream off (``EVERRUNS_CALL_STREAM=0``, a supported setting), the client
    never learns the control plane's limit and cuts at `SEND_BUDGET` (16 MiB): a batch of 20
    starts of 1 MiB each, every one well within the limits, is refused by a control plane
    reading 9 MiB (EVERRUNS_MAX_MESSAGE_BYTES, a valid setting) after nothing was started."""
    registry = Registry()

    @workflow(registry=registry)
    async def measure(ctx: Any, text: str) -> int:
        return len(text)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            config = ServerConfig(database_url=database_url, grpc_port=0, max_message_bytes=LIMIT)
            info = await nursery.start(serve, config)
            async with Client.connect(info.address, call_stream=False) as client:
                starts = [(measure, chr(ord("a") + n) * MIB, f"big-{n}") for n in range(20)]
                # On main: ResourceExhausted "StartWorkflows request of ... bytes is over the
                # control plane's limit of 9437184 bytes (EVERRUNS_MAX_MESSAGE_BYTES)".
                handles = await client.start_workflows(starts)
                assert [h.workflow_id for h in handles] == [f"big-{n}" for n in range(20)]
                assert all(h.created for h in handles)
            nursery.cancel_scope.cancel()


async def test_review23_cap_starts_of_one_workflow_id_split_across_calls_start_it_once(
    database_url: str,
) -> None:
    """In one call, two starts of one workflow id share one transaction: the second returns
    the first's run (created False). Cut into two calls, a run that ends between them (a
    short workflow, a large batch) is started a second time: the batch now starts ``dup``
    twice, and its second handle names another run."""
    registry = Registry()

    @workflow(registry=registry)
    async def measure(ctx: Any, text: str) -> int:
        return len(text)

    with trio.fail_after(90):
        async with served(database_url, registry, max_message_bytes=LIMIT) as (client, _):
            # One call carries both starts: the same run, started once.
            together = await client.start_workflows([(measure, "x", "one"), (measure, "y", "one")])
            assert together[0].run_id == together[1].run_id
            assert [h.created for h in together] == [True, False]

            channel = client._channel
            unary = channel.unary
            calls = 0

            async def spy(method: Any, request: Any, **options: Any) -> Any:
                nonlocal calls
                reply = await unary(method, request, **options)
                if getattr(method, "__name__", "") == "start_workflows":
                    calls += 1
                    if calls == 1:  # the first call's `dup` ends before the next call
                        assert await client.get_handle("dup").result(timeout=20) == 1
                return reply

            channel.unary = spy  # type: ignore[method-assign]
            filler = 3 * MIB // 2  # six of them are over the limit: the batch takes two calls
            starts = [
                (measure, "d", "dup"),
                *[(measure, chr(ord("a") + n) * filler, f"fill-{n}") for n in range(6)],
                (measure, "e", "dup"),
            ]
            handles = await client.start_workflows(starts)
            assert calls >= 2  # the batch was cut
            first, last = handles[0], handles[-1]
            assert (last.run_id, last.created) == (first.run_id, False), (
                "the second start of 'dup' in the same batch started another run"
            )
