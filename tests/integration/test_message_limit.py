"""The control plane's message limit (EVERRUNS_MAX_MESSAGE_BYTES), against a real grpclib server:
a message whose declared length is over it is refused from its 5-byte prefix, before its body
is read (a peer that declares 1 GiB and sends a few bytes gets the error at once, and the server
buffers nothing), on a unary call and on the call stream; a caller on the call stream refuses
such a request itself, so the stream and its other calls live on."""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpclib.const
import grpclib.exceptions
import pytest
import trio
from grpclib.const import Status

from everruns._aio.grpc import (
    CALLS_ROUTE,
    MAX_MESSAGE_HEADER,
    RpcChannel,
    open_channel,
    serve_services,
)
from everruns._aio.loop import run_aio
from everruns._proto.everruns import v1 as pb
from everruns.errors import ResourceExhausted
from tests.conftest import fail_after
from tests.integration.test_call_stream import Service, describe, streamed

LIMIT = 1024 * 1024
GIB = 1024 * 1024 * 1024
DESCRIBE = "/everruns.v1.WorkflowService/DescribeWorkflow"


@asynccontextmanager
async def serving(service: Any, *, limit: int = LIMIT) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(
            functools.partial(
                serve_services,
                [(pb.WorkflowServiceBase(), service)],
                "127.0.0.1",
                0,
                max_message_bytes=limit,
            )
        )
        yield bound
        nursery.cancel_scope.cancel()


def _prefix(declared: int) -> bytes:
    return struct.pack(">?I", False, declared)


async def _declare_unary(channel: RpcChannel, declared: int, sent: int) -> BaseException:
    """A DescribeWorkflow whose message declares ``declared`` bytes and sends ``sent``; what
    receiving its reply raises."""
    stream = channel.raw.request(
        DESCRIBE,
        grpclib.const.Cardinality.UNARY_UNARY,
        pb.DescribeWorkflowRequest,
        pb.DescribeWorkflowResponse,
    )
    try:
        async with stream:  # its exit raises the status the trailers carry
            await stream.send_request()
            await stream._stream.send_data(_prefix(declared) + b"\x00" * sent)
            await stream.recv_message()
    except grpclib.exceptions.GRPCError as exc:
        return exc
    raise AssertionError("the server answered a message it should have refused")


@fail_after(20)
async def test_a_unary_request_declared_over_the_limit_is_refused_before_its_body() -> None:
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        # 1 GiB declared, 1 kB sent: grpclib alone would wait for (and buffer) the rest.
        with trio.fail_after(5):
            error = await run_aio(_declare_unary, channel, GIB, 1000)
        assert isinstance(error, grpclib.exceptions.GRPCError)
        assert error.status is Status.RESOURCE_EXHAUSTED
        assert error.message == (
            f"DescribeWorkflow request of {GIB} bytes is over the control plane's limit of "
            f"{LIMIT} bytes (EVERRUNS_MAX_MESSAGE_BYTES)"
        )
        assert service.calls == []  # the method never ran
        # One byte over is refused too; the limit itself is not.
        error = await run_aio(_declare_unary, channel, LIMIT + 1, 10)
        assert isinstance(error, grpclib.exceptions.GRPCError)
        assert error.status is Status.RESOURCE_EXHAUSTED
        # The connection serves on, a request near the limit included.
        assert await describe(channel, "after") == "after"
        assert await describe(channel, "x" * (LIMIT - 100)) == "x" * (LIMIT - 100)


@fail_after(20)
async def test_unary_calls_over_the_limit_fail_with_the_limit_named() -> None:
    async with (
        serving(Service()) as port,
        open_channel("127.0.0.1", port, call_stream=False) as channel,
    ):
        with pytest.raises(ResourceExhausted, match=r"over the control plane's limit of 1048576"):
            await describe(channel, "x" * (2 * LIMIT))
        assert await describe(channel, "after") == "after"


async def _open_calls(channel: RpcChannel) -> tuple[Any, Any, Any]:
    """A raw call stream, the limit its headers say, and the reply to a first call on it."""
    stream = channel.raw.request(
        CALLS_ROUTE, grpclib.const.Cardinality.STREAM_STREAM, pb.Call, pb.CallReply
    )
    await stream.__aenter__()
    await stream.send_request()
    await stream.recv_initial_metadata()
    said = dict(stream.initial_metadata or {}).get(MAX_MESSAGE_HEADER)
    request = bytes(pb.DescribeWorkflowRequest(workflow_id="a"))
    await stream.send_message(pb.Call(id=1, route=DESCRIBE, request=request))
    return stream, said, await stream.recv_message()


async def _declare_on(stream: Any, declared: int, sent: int) -> BaseException:
    """Send a message declaring ``declared`` bytes and ``sent`` of them on a raw call stream;
    what receiving after it raises."""
    await stream._stream.send_data(_prefix(declared) + b"\x00" * sent)
    try:
        await stream.recv_message()
    except grpclib.exceptions.StreamTerminatedError:  # reset after the trailers
        try:
            stream._maybe_raise()
        except grpclib.exceptions.GRPCError as exc:
            return exc
        raise
    except grpclib.exceptions.GRPCError as exc:
        return exc
    raise AssertionError("the call stream went on after a message over the limit")


@fail_after(20)
async def test_a_call_stream_message_declared_over_the_limit_ends_the_stream() -> None:
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        stream, said, first = await run_aio(_open_calls, channel)
        assert said == str(LIMIT)
        assert first.id == 1 and not first.status
        slow = bytes(pb.DescribeWorkflowRequest(workflow_id="slow"))
        await run_aio(stream.send_message, pb.Call(id=2, route=DESCRIBE, request=slow))
        await service.entered.wait()  # a call in flight on the stream
        with trio.fail_after(5):
            error = await run_aio(_declare_on, stream, GIB, 1000)
        ended = ConnectionError("the test is done with it")
        await run_aio(stream.__aexit__, ConnectionError, ended, None)
        assert isinstance(error, grpclib.exceptions.GRPCError)
        assert error.status is Status.RESOURCE_EXHAUSTED
        assert error.message == (
            f"call-stream message of {GIB} bytes is over the control plane's limit of {LIMIT} "
            "bytes (EVERRUNS_MAX_MESSAGE_BYTES)"
        )
        with trio.fail_after(5):
            await service.cancelled.wait()  # the call in flight on it was stopped
        assert await describe(channel, "after") == "after"


@fail_after(20)
async def test_a_caller_on_the_call_stream_refuses_a_request_over_the_limit_itself() -> None:
    service = Service()
    async with serving(service) as port, open_channel("127.0.0.1", port) as channel:
        assert await describe(channel, "a") == "a"
        calls = channel._calls
        assert calls is not None and streamed(channel)
        opened = calls._opened
        assert opened is not None and opened.limit == LIMIT
        with pytest.raises(
            ResourceExhausted,
            match=r"^DescribeWorkflow request of \d+ bytes is over the control plane's limit of "
            r"1048576 bytes \(EVERRUNS_MAX_MESSAGE_BYTES\)$",
        ):
            await describe(channel, "x" * LIMIT)
        assert calls._opened is opened  # never sent: the stream and its calls live on
        assert await describe(channel, "b") == "b"
        assert service.calls == ["a", "b"]
