"""Unary calls carried over `CallService.Calls` (one HTTP/2 stream for many calls), against a
real grpclib server: replies matched to their calls out of order, errors and authentication as
the unary call would give them, cancellation reaching the server, the fallback to unary calls
where the control plane has no call stream, and a stream reopened after the server went away."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpclib.const
import pytest
import trio

from everruns._aio import grpc
from everruns._aio.grpc import RpcChannel, open_channel, serve_services
from everruns._aio.loop import run_aio
from everruns._proto.everruns import v1 as pb
from everruns.errors import NotFound, ResourceExhausted, RpcError, ServerUnavailable
from tests.conftest import fail_after


class Service:
    """A WorkflowService whose DescribeWorkflow waits for the test where asked to."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.entered = trio.Event()
        self.cancelled = trio.Event()
        self.calls: list[str] = []
        self._arrived = trio.Event()

    async def wait_calls(self, workflow_id: str, count: int) -> None:
        while self.calls.count(workflow_id) < count:
            await self._arrived.wait()

    async def describe_workflow(self, request: Any) -> Any:
        self.calls.append(request.workflow_id)
        self._arrived.set()
        self._arrived = trio.Event()
        if request.workflow_id == "missing":
            raise NotFound("workflow 'missing' not found")
        if request.workflow_id == "slow":
            self.entered.set()
            try:
                await self.release.wait()
            except trio.Cancelled:
                self.cancelled.set()
                raise
        return pb.DescribeWorkflowResponse(
            workflow=pb.WorkflowDescription(workflow_id=request.workflow_id)
        )

    def __getattr__(self, name: str) -> Any:
        async def unused(request: Any) -> Any:
            raise AssertionError(f"{name} is not used here")

        return unused


@asynccontextmanager
async def serving(
    service: Any,
    *,
    port: int = 0,
    calls: bool = True,
    token: str | None = None,
    undelivered: Any = None,
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(
            functools.partial(
                serve_services,
                [(pb.WorkflowServiceBase(), service)],
                "127.0.0.1",
                port,
                calls=calls,
                auth_token=token,
                undelivered=undelivered,
            )
        )
        yield bound
        nursery.cancel_scope.cancel()


async def describe(channel: RpcChannel, workflow_id: str) -> str:
    stub = pb.WorkflowServiceStub(channel.raw)
    reply = await channel.unary(
        stub.describe_workflow, pb.DescribeWorkflowRequest(workflow_id=workflow_id)
    )
    return str(reply.workflow.workflow_id)


def streamed(channel: RpcChannel) -> bool:
    """Whether the channel's calls went over an open call stream."""
    calls = channel._calls
    return calls is not None and calls._opened is not None and not calls.unsupported


@fail_after(20)
async def test_calls_go_over_one_stream_and_replies_find_their_calls() -> None:
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        assert await describe(channel, "a") == "a"
        assert streamed(channel)
        got: dict[str, str] = {}
        async with trio.open_nursery() as nursery:

            async def one(workflow_id: str) -> None:
                got[workflow_id] = await describe(channel, workflow_id)

            nursery.start_soon(one, "slow")
            await service.entered.wait()
            # Answered while the first call still runs: replies are matched by call id.
            for n in range(20):
                await one(f"quick-{n}")
            assert "slow" not in got
            service.release.set()
        assert got == {"slow": "slow", **{f"quick-{n}": f"quick-{n}" for n in range(20)}}


@fail_after(20)
async def test_errors_arrive_as_the_unary_call_would_raise_them() -> None:
    async with serving(Service()) as port, open_channel("127.0.0.1", port) as channel:
        with pytest.raises(NotFound, match="'missing' not found"):
            await describe(channel, "missing")
        assert streamed(channel)
        assert await describe(channel, "after") == "after"  # the stream lives on
        calls = channel._calls
        assert calls is not None
        with pytest.raises(Exception, match="cannot be called over Calls") as caught:
            await run_aio(calls.call, "/everruns.v1.Nowhere/Nothing", pb.Call(), pb.CallReply, None)
        assert "UNIMPLEMENTED" in repr(caught.value)
        assert not calls.unsupported  # one refused call does not give up the stream


@fail_after(20)
async def test_a_cancelled_call_is_cancelled_at_the_server() -> None:
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        with trio.move_on_after(10) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(describe, channel, "slow")
                await service.entered.wait()
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
        with trio.fail_after(5):
            await service.cancelled.wait()
        assert await describe(channel, "next") == "next"


@fail_after(20)
async def test_a_timed_out_call_is_cancelled_at_the_server() -> None:
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        stub = pb.WorkflowServiceStub(channel.raw)
        request = pb.DescribeWorkflowRequest(workflow_id="slow")
        with pytest.raises(ServerUnavailable):
            await channel.unary(stub.describe_workflow, request, timeout=0.3)
        with trio.fail_after(5):
            await service.cancelled.wait()


@fail_after(20)
async def test_without_a_call_stream_at_the_server_calls_are_unary() -> None:
    service = Service()
    async with serving(service, calls=False) as port, open_channel("127.0.0.1", port) as channel:
        assert await describe(channel, "a") == "a"  # refused by the stream, run once, unary
        assert channel._calls is not None and channel._calls.unsupported
        with pytest.raises(NotFound):
            await describe(channel, "missing")
        assert service.calls == ["a", "missing"]


@fail_after(20)
async def test_call_stream_off_sends_unary_calls() -> None:
    async with (
        serving(Service()) as port,
        open_channel("127.0.0.1", port, call_stream=False) as channel,
    ):
        assert await describe(channel, "a") == "a"
        assert channel._calls is None


@fail_after(30)
async def test_the_stream_breaks_with_the_server_and_reopens_with_the_next() -> None:
    service = Service()
    async with trio.open_nursery() as outer:
        first = trio.CancelScope()

        async def serve_first(task_status: trio.TaskStatus[int]) -> None:
            with first:
                async with serving(service) as bound:
                    task_status.started(bound)
                    await trio.sleep_forever()

        port: int = await outer.start(serve_first)
        async with open_channel("127.0.0.1", port) as channel:
            assert await describe(channel, "a") == "a"
            async with trio.open_nursery() as nursery:

                async def in_flight() -> None:
                    with pytest.raises(ServerUnavailable):
                        await describe(channel, "slow")

                nursery.start_soon(in_flight)
                await service.entered.wait()
                first.cancel()  # the control plane goes away with a call in flight
            with pytest.raises(ServerUnavailable):
                await describe(channel, "down")
            async with serving(Service(), port=port):
                assert await describe(channel, "b") == "b"
                assert streamed(channel)


@fail_after(20)
async def test_the_stream_is_authenticated_like_unary_calls() -> None:
    async with serving(Service(), token="s3cret") as port:
        async with open_channel("127.0.0.1", port, auth_token="wrong") as channel:
            with pytest.raises(RpcError, match="bearer token"):
                await describe(channel, "a")
        async with open_channel("127.0.0.1", port, auth_token="s3cret") as channel:
            assert await describe(channel, "a") == "a"
            assert streamed(channel)


@fail_after(20)
async def test_calls_in_flight_on_one_stream_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        monkeypatch.setattr(grpc, "MAX_CALLS_IN_FLIGHT", 2)  # at the server only
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(describe, channel, "slow")
            await service.wait_calls("slow", 2)
            with pytest.raises(ResourceExhausted, match="more than 2 calls in flight"):
                await describe(channel, "third")
            service.release.set()
        assert await describe(channel, "after") == "after"


@fail_after(20)
async def test_callers_beyond_the_bound_wait_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc, "MAX_CALLS_IN_FLIGHT", 2)
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        got: list[str] = []

        async def one(workflow_id: str) -> None:
            got.append(await describe(channel, workflow_id))

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(one, "slow")
            await service.wait_calls("slow", 2)
            nursery.start_soon(one, "third")
            await trio.sleep(0.2)
            assert "third" not in service.calls  # waiting at the caller, not refused
            service.release.set()
        assert sorted(got) == ["slow", "slow", "third"]


@fail_after(30)
async def test_calls_cancelled_at_once_leave_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    describe_route = "/everruns.v1.WorkflowService/DescribeWorkflow"

    def call(call_id: int, workflow_id: str) -> Any:
        request = bytes(pb.DescribeWorkflowRequest(workflow_id=workflow_id))
        return pb.Call(id=call_id, route=describe_route, request=request)

    async def exchange(channel: Any) -> Any:  # on the asyncio loop: a raw stream
        async with channel.request(
            grpc.CALLS_ROUTE,
            grpclib.const.Cardinality.STREAM_STREAM,
            pb.Call,
            pb.CallReply,
        ) as stream:
            await stream.send_request()
            await stream.recv_initial_metadata()
            # Each call with its cancel notice right behind it: the control plane reads both
            # before the call's task has taken a step.
            for call_id in range(1, 21):
                await stream.send_message(call(call_id, "slow"))
                await stream.send_message(pb.Call(id=call_id, cancel=True))
            await asyncio.sleep(0.2)  # the control plane's loop turns: cancelled tasks end
            await stream.send_message(call(100, "after"))
            # Calls 4-20 arrived while three were in flight: refused, answered first.
            while (reply := await stream.recv_message()).id != 100:
                assert reply.status == "RESOURCE_EXHAUSTED", reply
            await stream.cancel()
            return reply

    async with serving(Service()) as port, open_channel("127.0.0.1", port) as channel:
        monkeypatch.setattr(grpc, "MAX_CALLS_IN_FLIGHT", 3)  # at the server only
        reply = await run_aio(exchange, channel.raw)
    # Every cancelled call was forgotten: the bound of 3 still admits the last one.
    assert (reply.id, reply.status) == (100, "")


@fail_after(60)
async def test_large_replies_stay_whole_when_their_callers_give_up() -> None:
    service = Service()
    service.release.set()
    big = "x" * 6_000_000  # more than the stream's 4 MiB window: written in several steps

    async def describe_workflow(request: Any) -> Any:
        if request.workflow_id == "big":
            await trio.sleep(0.01)
            return pb.DescribeWorkflowResponse(
                workflow=pb.WorkflowDescription(workflow_id="big", input=big.encode())
            )
        return await Service.describe_workflow(service, request)

    service.describe_workflow = describe_workflow  # type: ignore[method-assign]
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        stub = pb.WorkflowServiceStub(channel.raw)
        request = pb.DescribeWorkflowRequest(workflow_id="big")
        for delay in (0.005, 0.01, 0.02, 0.04, 0.08):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(channel.unary, stub.describe_workflow, request)
                for n in range(3):
                    nursery.start_soon(describe, channel, f"small-{n}")
                await trio.sleep(delay)
                nursery.cancel_scope.cancel()  # some replies are on their way by now
            assert await describe(channel, "after") == "after"
        reply = await channel.unary(stub.describe_workflow, request)
        assert len(reply.workflow.input) == len(big)


@fail_after(20)
async def test_a_reply_that_cannot_be_encoded_fails_as_internal() -> None:
    service = Service()

    async def describe_workflow(request: Any) -> Any:
        return pb.GetHistoryResponse()  # not the method's reply type

    service.describe_workflow = describe_workflow  # type: ignore[method-assign]
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        with pytest.raises(RpcError, match="INTERNAL"):
            await describe(channel, "a")


@fail_after(20)
async def test_the_timeout_covers_a_server_that_never_answers() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # accepts the connection, never speaks HTTP/2

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        async with open_channel("127.0.0.1", port) as channel:
            stub = pb.WorkflowServiceStub(channel.raw)
            with trio.fail_after(5), pytest.raises(ServerUnavailable):
                await channel.unary(
                    stub.describe_workflow, pb.DescribeWorkflowRequest(workflow_id="a"), timeout=0.5
                )
        nursery.cancel_scope.cancel()
