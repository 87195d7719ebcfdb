"""Review 21 of 8e3962b ("a reply its worker never takes gives its tasks back at once"):
defects found, each shown by a test that fails on that commit.

The worker gives up on a call when its budget runs out (`_call`), sends the cancel notice,
and then sends the very same request again (`_call_until_answered`). A completion's retry
is answered with the tasks its first reply handed out, still claimed for the worker
(`Engine._handed_out_before`, test_start_ahead_rules): among them the activities the worker
started ahead of the reply, which are running on it. Giving those back when the first reply
is dropped takes a running activity away from its worker and hands it to another one.

Also: a reply cut off by a reset of the call stream is not given back (its send ends in
CancelledError, not the errors the change catches).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import trio

from everruns._aio.loop import run_aio
from everruns._proto.everruns import v1 as pb
from tests.integration.test_engine import ahead_with_timer, plane, started_ahead
from tests.integration.test_undelivered_replies import calls_stream

COMPLETE_WORKFLOW_TASK = "/everruns.v1.WorkerService/CompleteWorkflowTask"
COMPLETE_WORKFLOW_TASKS = "/everruns.v1.WorkerService/CompleteWorkflowTasks"


async def crossed(channel: Any, route: str, request: Any, reply_type: type[Any]) -> Any:
    """On the asyncio loop: send ``request`` over a raw call stream, take its reply, then send
    the cancel notice that crossed it (what `CallStream.call` writes when its caller's budget
    ran out as the reply came); returns the reply the worker dropped."""
    async with calls_stream(channel) as stream:
        await stream.send_message(pb.Call(id=1, route=route, request=bytes(request)))
        reply = await stream.recv_message()
        assert (reply.id, reply.status) == (1, ""), reply
        await stream.send_message(pb.Call(id=1, cancel=True))
        await asyncio.sleep(0.3)  # the notice is read, and acted on, before the stream ends
        await stream.cancel()
        return reply_type().parse(reply.reply)


@pytest.mark.db
@pytest.mark.parametrize("batch", [False, True], ids=["CompleteWorkflowTask", "batched"])
async def test_a_decision_retried_after_its_budget_ran_out_keeps_the_activity_started_ahead(
    database_url: str, batch: bool
) -> None:
    """Defect: the worker started activity "1" ahead of its decision (``started``), its
    CompleteWorkflowTask(s) budget ran out as the reply came, so it sent the cancel notice
    and retries the same request (`_call_until_answered`). The control plane gave the
    reply's tasks back, the started-ahead activity included: it is pending again, the retry
    gets a stale verdict instead of the reply it missed, the worker cancels its running
    activity, and another worker's poll claims it: the activity runs twice.

    Expected (as for a reply lost any other way, test_start_ahead_rules): the retry is
    answered with the same tasks under the same leases, and no other poll gets the activity."""
    with trio.fail_after(40):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("nap", "work")
            request = p.decide(task, ahead_with_timer, max_eager=2)
            (chosen,) = started_ahead(request, "1")
            if batch:
                first_reply = await run_aio(
                    crossed,
                    p.channel.raw,
                    COMPLETE_WORKFLOW_TASKS,
                    pb.CompleteWorkflowTasksRequest(completions=[request]),
                    pb.CompleteWorkflowTasksResponse,
                )
                (first,) = first_reply.outcomes
            else:
                first = await run_aio(
                    crossed,
                    p.channel.raw,
                    COMPLETE_WORKFLOW_TASK,
                    request,
                    pb.CompleteWorkflowTaskResponse,
                )
            assert first.accepted
            handed = sorted((t.task_id, t.lease_token) for t in first.eager_tasks)
            assert chosen in {task_id for task_id, _ in handed}

            await trio.sleep(0.5)  # the worker's backoff before it tries again
            # The worker's retry of the same request.
            if batch:
                again_reply = await p.channel.unary(
                    p.workers.complete_workflow_tasks,
                    pb.CompleteWorkflowTasksRequest(completions=[request]),
                )
                (again,) = again_reply.outcomes
                verdict = (again.refused_status, again.message)
            else:
                try:
                    again = await p.channel.unary(p.workers.complete_workflow_task, request)
                    verdict = ("", "")
                except Exception as exc:  # the stale verdict the worker drops its work on
                    again, verdict = None, (type(exc).__name__, str(exc))
            assert verdict == ("", ""), (
                "the retry of a decision whose reply the worker dropped was refused "
                f"{verdict}: the activity it started ahead was given back to the queue"
            )
            assert again is not None
            assert sorted((t.task_id, t.lease_token) for t in again.eager_tasks) == handed

            # Nobody else is handed the activity that runs on this worker.
            other = await p.channel.unary(
                p.workers.poll_tasks,
                pb.PollTasksRequest(
                    worker_id="w2", max_tasks=10, activity_types=["work"], wait_s=0.5
                ),
            )
            assert chosen not in {t.task_id for t in other.tasks}


@pytest.mark.db
async def test_an_activity_started_ahead_is_not_given_back_uncharged(
    database_url: str, pool: Any
) -> None:
    """Defect: the started-ahead activity of a decision whose reply the worker dropped (its
    cancel notice crossed the reply) is made pending again with its attempt uncharged. It
    ran on that worker already, and may be what killed it (a poison activity): the engine's
    own rule for a completion whose reply is lost (`Engine._complete_rest`'s give-back,
    engine.py ~960) leaves such tasks claimed, "to be released with their attempt counted",
    and test_start_ahead_rules guards against started-ahead work running uncounted.

    Expected: the started-ahead task stays claimed by the worker under the reply's lease,
    attempt 1 (the eager tasks it did not start may go back)."""
    with trio.fail_after(40):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("nap", "work")
            request = p.decide(task, ahead_with_timer, max_eager=2)
            (chosen,) = started_ahead(request, "1")
            first = await run_aio(
                crossed,
                p.channel.raw,
                COMPLETE_WORKFLOW_TASK,
                request,
                pb.CompleteWorkflowTaskResponse,
            )
            assert first.accepted and chosen in {t.task_id for t in first.eager_tasks}
            lease = next(t.lease_token for t in first.eager_tasks if t.task_id == chosen)
            await trio.sleep(0.5)  # a give-back, if any, has run
            row = await pool.fetchrow(
                "SELECT status, attempt, claimed_by, lease_token FROM durable_task_queue"
                " WHERE id = $1::uuid",
                chosen,
            )
            assert (row["status"], row["attempt"], row["claimed_by"], row["lease_token"]) == (
                "claimed",
                1,
                "w1",
                lease,
            ), f"the activity started ahead was given back: {dict(row)}"


@pytest.mark.db
async def test_a_poll_reply_cut_off_by_a_stream_reset_is_given_back(
    database_url: str, pool: Any
) -> None:
    """Defect: a reply that cannot be sent is to be given back (the change's third case),
    but only a send that raises StreamClosedError/StreamTerminatedError is. When the caller
    resets the call stream while a reply is still being sent (here: held by HTTP/2 flow
    control), grpclib cancels the `Calls` handler, whose ``finally`` cancels each ``answer``
    task: the send ends in CancelledError, which nothing catches, so the PollTasks reply's
    claimed task stays claimed for a worker that never got it, until the stale rule.

    Expected: the task is pending again at once, its attempt uncharged."""
    from grpclib.client import Channel
    from grpclib.config import Configuration

    with trio.fail_after(40):
        async with plane(database_url) as p:
            await p.register(workflow_types=["wf"])
            await p.start("wf", "x" * 300_000, "big")  # its task's reply is over 64 KiB

            async def exchange() -> None:  # on the asyncio loop
                small = Configuration(
                    http2_connection_window_size=65535, http2_stream_window_size=65535
                )
                channel = Channel("127.0.0.1", p.port, config=small)
                try:
                    async with calls_stream(channel) as stream:
                        poll = pb.PollTasksRequest(
                            worker_id="w1", max_tasks=1, workflow_types=["wf"], wait_s=5
                        )
                        route = "/everruns.v1.WorkerService/PollTasks"
                        await stream.send_message(pb.Call(id=1, route=route, request=bytes(poll)))
                        await asyncio.sleep(1.5)  # claimed; its reply waits for the window
                        await stream.cancel()  # the caller resets the stream
                finally:
                    channel.close()

            await run_aio(exchange)
            # The poll claimed it (a lease was drawn; a give-back keeps it, and may have run
            # already).
            row = await pool.fetchrow(
                "SELECT lease_token FROM durable_task_queue"
                " WHERE workflow_id = 'big' AND kind = 'workflow'"
            )
            assert row is not None and row["lease_token"] is not None, dict(row or {})
            await trio.sleep(1.0)  # a give-back, if any, has run
            row = await pool.fetchrow(
                "SELECT status, attempt, claimed_by FROM durable_task_queue"
                " WHERE workflow_id = 'big' AND kind = 'workflow'"
            )
            assert (row["status"], row["attempt"], row["claimed_by"]) == ("pending", 0, None), (
                f"the task of a reply the stream reset cut off was not given back: {dict(row)}"
            )
