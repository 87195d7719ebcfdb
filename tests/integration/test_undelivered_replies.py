"""Replies their callers never take: what they handed out is taken back at once.

A worker gives up on a call (its budget ran out, it is stopping) while the control plane makes
the reply: the reply's claimed tasks must not stay with a worker that never heard of them until
the 30 s stale rule. The bridge tells the server (`Undelivered`) of every such reply it can
see: a cancel notice on the call stream that crossed a reply already made, a Trio method that
returned in spite of its cancellation, a reply that could not be sent, and (at the caller) a
reply that came as its caller gave up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpclib.const
import pytest
import trio

from everruns._aio import grpc
from everruns._aio.grpc import RpcChannel, open_channel
from everruns._aio.loop import run_aio
from everruns._proto.everruns import v1 as pb
from everruns.errors import ServerUnavailable
from tests.conftest import fail_after
from tests.integration import test_call_stream as call_stream_tests
from tests.integration.test_call_stream import serving
from tests.integration.test_cancelled_calls_and_races import until
from tests.integration.test_engine import plane

DESCRIBE = "/everruns.v1.WorkflowService/DescribeWorkflow"


class Service(call_stream_tests.Service):
    """A WorkflowService whose DescribeWorkflow answers at once, or for ``held-*`` ids once
    the test releases it, finishing in spite of its caller's cancellation (as a claim that has
    begun does)."""

    async def describe_workflow(self, request: Any) -> Any:
        if request.workflow_id.startswith("held"):
            self.entered.set()
            with trio.CancelScope(shield=True):
                await self.release.wait()
        return pb.DescribeWorkflowResponse(
            workflow=pb.WorkflowDescription(workflow_id=request.workflow_id)
        )


class Taken:
    """An `Undelivered` that records what it is given back: a reply hands out its workflow id."""

    def __init__(self) -> None:
        self.given_back: list[str] = []
        self._changed = trio.Event()

    def handed(self, reply: Any) -> Sequence[Any]:
        if isinstance(reply, pb.DescribeWorkflowResponse):
            return [reply.workflow.workflow_id]
        return []

    async def give_back(self, handed: Sequence[Any]) -> None:
        self.given_back.extend(handed)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, workflow_id: str) -> None:
        while workflow_id not in self.given_back:
            await self._changed.wait()


@asynccontextmanager
async def calls_stream(channel: Any) -> AsyncIterator[Any]:
    """A raw `CallService.Calls` stream, opened (on the asyncio loop)."""
    async with channel.request(
        grpc.CALLS_ROUTE, grpclib.const.Cardinality.STREAM_STREAM, pb.Call, pb.CallReply
    ) as stream:
        await stream.send_request()
        await stream.recv_initial_metadata()
        yield stream


async def describe(channel: RpcChannel, workflow_id: str) -> str:
    stub = pb.WorkflowServiceStub(channel.raw)
    reply = await channel.unary(
        stub.describe_workflow, pb.DescribeWorkflowRequest(workflow_id=workflow_id)
    )
    return str(reply.workflow.workflow_id)


def call(call_id: int, workflow_id: str) -> Any:
    request = bytes(pb.DescribeWorkflowRequest(workflow_id=workflow_id))
    return pb.Call(id=call_id, route=DESCRIBE, request=request)


@fail_after(20)
async def test_a_cancel_notice_that_crosses_a_reply_gives_back_what_it_handed_out() -> None:
    """The caller gave up on call 2 as its reply was on the way (its notice came after the
    reply was sent): that reply's items are given back. Call 1, answered and not given up on,
    keeps its items, and a notice for a call never made gives nothing back."""
    taken = Taken()

    async def exchange(channel: Any) -> None:  # on the asyncio loop: a raw call stream
        async with calls_stream(channel) as stream:
            for call_id, workflow_id in ((1, "kept"), (2, "dropped")):
                await stream.send_message(call(call_id, workflow_id))
                reply = await stream.recv_message()
                assert (reply.id, reply.status) == (call_id, "")
            await stream.send_message(pb.Call(id=2, cancel=True))
            await stream.send_message(pb.Call(id=99, cancel=True))
            await asyncio.sleep(0.2)  # the notices are read before the stream ends
            await stream.cancel()

    async with (
        serving(Service(), undelivered=taken) as port,
        open_channel("127.0.0.1", port) as channel,
    ):
        await run_aio(exchange, channel.raw)
        await taken.wait_for("dropped")
    assert taken.given_back == ["dropped"]


@pytest.mark.parametrize("call_stream", [True, False], ids=["call stream", "unary"])
@fail_after(20)
async def test_a_reply_made_after_its_caller_gave_up_is_given_back(call_stream: bool) -> None:
    """The method finishes in spite of the cancellation (a claim that has begun does), after
    its caller has given up: nobody takes its reply, so what it hands out is given back.
    Before, it was dropped, and claimed tasks stayed with the worker until the stale rule."""
    service, taken = Service(), Taken()
    async with (
        serving(service, undelivered=taken) as port,
        open_channel("127.0.0.1", port, call_stream=call_stream) as channel,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(describe, channel, "held-1")
            await service.entered.wait()
            nursery.cancel_scope.cancel()  # the caller gives up
        service.release.set()
        await taken.wait_for("held-1")
        assert await describe(channel, "after") == "after"  # delivered: nothing given back
    assert taken.given_back == ["held-1"]


@fail_after(20)
async def test_a_reply_that_comes_as_its_caller_gives_up_is_reported() -> None:
    """The reply arrives and its caller is cancelled before it takes it (the two in one turn
    of the loop): the caller drops the reply, so it sends the cancel notice all the same, and
    the control plane gives back what the reply handed out. Before, no notice went out (the
    call no longer looked pending) and the reply's tasks were stranded."""
    taken = Taken()

    async def race(calls: grpc.CallStream) -> None:  # on the asyncio loop
        loop = asyncio.get_running_loop()
        task: asyncio.Task[Any] | None = None

        class Pending(dict[int, Any]):
            def pop(self, key: int, *default: Any) -> Any:
                future = super().pop(key, *default)
                if future is not None and task is not None and not task.done():
                    # The reader sets the reply right after this: the cancellation lands
                    # between the reply's arrival and its caller's next step.
                    loop.call_soon(task.cancel)
                return future

        calls._pending = Pending(calls._pending)
        task = asyncio.ensure_future(
            calls.call(
                DESCRIBE,
                pb.DescribeWorkflowRequest(workflow_id="raced"),
                pb.DescribeWorkflowResponse,
                None,
            )
        )
        with pytest.raises(asyncio.CancelledError):
            await task

    async with (
        serving(Service(), undelivered=taken) as port,
        open_channel("127.0.0.1", port) as channel,
    ):
        assert await describe(channel, "warm") == "warm"  # the stream is open
        assert channel._calls is not None
        await run_aio(race, channel._calls)
        await taken.wait_for("raced")
    assert taken.given_back == ["raced"]


@pytest.mark.db
@fail_after(30)
async def test_a_poll_reply_whose_worker_gave_up_puts_its_task_back_at_once(
    database_url: str, pool: Any
) -> None:
    """A real control plane: a worker's PollTasks is answered with a claimed task, and the
    worker's cancel notice crosses the reply. The task is pending again at once, its attempt
    uncharged, and the next poll gets it; before, it stayed claimed by the worker until the
    30 s stale rule."""
    async with plane(database_url) as p:
        await p.register(workflow_types=["wf"])
        await p.start("wf", 1, "w-1")

        async def exchange(channel: Any) -> Any:  # on the asyncio loop: a raw call stream
            async with calls_stream(channel) as stream:
                poll = pb.PollTasksRequest(
                    worker_id="w1", max_tasks=1, workflow_types=["wf"], wait_s=5
                )
                route = "/everruns.v1.WorkerService/PollTasks"
                await stream.send_message(pb.Call(id=1, route=route, request=bytes(poll)))
                reply = await stream.recv_message()
                assert (reply.id, reply.status) == (1, "")
                await stream.send_message(pb.Call(id=1, cancel=True))  # too late: crossed
                await asyncio.sleep(0.2)
                await stream.cancel()
                return pb.PollTasksResponse().parse(reply.reply)

        (handed,) = (await run_aio(exchange, p.channel.raw)).tasks
        await until(
            pool,
            "SELECT status = 'pending' AND attempt = 0 AND claimed_by IS NULL"
            " FROM durable_task_queue WHERE id = $1::uuid",
            handed.task_id,
            what="the task given back",
        )
        (again,) = await p.poll(wf=["wf"])
        assert (again.task_id, again.attempt) == (handed.task_id, 1)
        assert again.lease_token != handed.lease_token


@fail_after(20)
async def test_a_cancel_notice_for_a_call_still_running_cancels_it_and_gives_nothing_twice() -> (
    None
):
    """A notice that reaches a call still running cancels it (as before); a method that then
    finishes anyway has its reply given back once, not once per path."""
    service, taken = Service(), Taken()
    async with (
        serving(service, undelivered=taken) as port,
        open_channel("127.0.0.1", port) as channel,
    ):
        with pytest.raises(ServerUnavailable):
            stub = pb.WorkflowServiceStub(channel.raw)
            await channel.unary(
                stub.describe_workflow,
                pb.DescribeWorkflowRequest(workflow_id="held-2"),
                timeout=0.3,
            )
        service.release.set()
        await taken.wait_for("held-2")
        assert await describe(channel, "after") == "after"
    assert taken.given_back == ["held-2"]
