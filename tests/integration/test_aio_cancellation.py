"""Cancellation across the asyncio adapter: a call cancelled or timed out on the call stream frees
its place at once on both ends, and a pooled query cancelled from Trio is cancelled at the
server too. Each test failed on the code before its fix (session 14)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import trio

from everruns._aio import grpc, pg
from everruns._aio.grpc import open_channel
from everruns._aio.loop import run_aio
from everruns._proto.everruns import v1 as pb
from everruns.errors import ServerUnavailable
from tests.conftest import fail_after
from tests.integration.test_call_stream import Service, serving

DESCRIBE = "/everruns.v1.WorkflowService/DescribeWorkflow"


def _request(workflow_id: str) -> Any:
    return pb.DescribeWorkflowRequest(workflow_id=workflow_id)


@fail_after(30)
async def test_a_caller_within_the_bound_is_not_refused_after_a_timed_out_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller keeps to the bound (its semaphore): one call holds a slot, one times out and
    frees its slot, the next takes it, sent right behind the cancel notice. The control plane
    no longer counts a call from its cancel notice on; it counted the timed-out call until its
    task ended a loop turn later, and refused a call the caller was entitled to send."""
    monkeypatch.setattr(grpc, "MAX_CALLS_IN_FLIGHT", 2)  # caller and control plane
    service = Service()

    async def scenario(calls: grpc.CallStream) -> Any:  # on the asyncio loop
        reply_type = pb.DescribeWorkflowResponse
        held = asyncio.ensure_future(calls.call(DESCRIBE, _request("slow"), reply_type, None))
        try:
            with pytest.raises(TimeoutError):
                await calls.call(DESCRIBE, _request("slow"), reply_type, 0.3)
            return await calls.call(DESCRIBE, _request("next"), reply_type, 5)
        finally:
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)

    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        calls = channel._calls
        assert calls is not None
        reply = await run_aio(scenario, calls)
        assert reply.workflow.workflow_id == "next"


@fail_after(30)
async def test_a_waiting_trio_caller_is_not_refused_when_a_call_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same through `RpcChannel.unary`: callers beyond the bound wait at the caller (as
    docs/internals.md says); when a call times out, the waiting one takes its slot and is
    sent right behind the cancel notice, and is answered."""
    monkeypatch.setattr(grpc, "MAX_CALLS_IN_FLIGHT", 2)
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        stub = pb.WorkflowServiceStub(channel.raw)
        got: list[str] = []

        async def timing_out() -> None:
            with pytest.raises(ServerUnavailable):
                await channel.unary(stub.describe_workflow, _request("slow"), timeout=0.5)

        async def waiting() -> None:
            reply = await channel.unary(stub.describe_workflow, _request("waiting"))
            got.append(reply.workflow.workflow_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.unary, stub.describe_workflow, _request("slow"))
            await service.wait_calls("slow", 1)
            nursery.start_soon(timing_out)
            await service.wait_calls("slow", 2)
            await waiting()  # waits at the caller until the timed-out call frees a slot
            nursery.cancel_scope.cancel()
        assert got == ["waiting"]


@pytest.mark.db
async def test_a_cancelled_pooled_query_does_not_go_on_running_at_the_server(
    database_url: str,
) -> None:
    """loop.py: "a cancelled query or call never outlives its caller". asyncpg answers a
    cancelled query by sending a CancelRequest from a task of its own; the pool drops the
    connection only once that request has gone out. Terminated at once, as before, the task
    was cancelled first, and PostgreSQL, which does not notice a closed socket while a
    statement runs, ran the statement (holding whatever locks it took) to its end."""
    with trio.fail_after(30):
        async with (
            pg.open_pool(database_url, min_size=1, max_size=2) as pool,
            pg.connect(database_url) as admin,
        ):
            pid = int(await pool.fetchval("SELECT pg_backend_pid()"))
            with trio.move_on_after(0.3):
                await pool.execute("SELECT pg_sleep(10) /* cancelled */")
            still_running = True
            with trio.move_on_after(3):
                while still_running:
                    still_running = bool(
                        await admin.fetchval(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE pid = $1 AND state = 'active'",
                            pid,
                        )
                    )
                    await trio.sleep(0.1)
            assert not still_running, "the cancelled statement still runs 3 s later"
