"""The control plane in-process, driven over real gRPC by a scripted worker: what each RPC does
to the durable state — timeouts, dead letters, breakers, supersession, stuck runs, retention,
auth and bad input."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
import trio

from everruns._aio import pg
from everruns._aio.grpc import RpcChannel, open_channel
from everruns._proto.everruns import v1 as pb
from everruns.domain.context import WorkflowInfo
from everruns.domain.history import HistoryEvent
from everruns.domain.packing import pack_blobs, unpack_uuids
from everruns.domain.replay import Replayer, replay
from everruns.domain.retry import RetryPolicy
from everruns.errors import (
    EverrunsError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RpcError,
    ServerUnavailable,
)
from everruns.server import ServerConfig, serve
from everruns.store.store import Store
from tests.conftest import wrong_start_deadlines

pytestmark = pytest.mark.db


@attrs.define
class Plane:
    channel: RpcChannel
    workflows: pb.WorkflowServiceStub
    workers: pb.WorkerServiceStub
    port: int

    async def start(self, wtype: str, input: Any = None, wid: str | None = None) -> str:
        reply = await self.channel.unary(
            self.workflows.start_workflow,
            pb.StartWorkflowRequest(
                workflow_type=wtype, input=json.dumps(input).encode(), workflow_id=wid or ""
            ),
        )
        return reply.workflow_id

    async def register(self, *, max_concurrency: int = 10, **types: list[str]) -> None:
        """Register worker "w1" (what it serves decides its eager tasks)."""
        await self.channel.unary(
            self.workers.register_worker,
            pb.RegisterWorkerRequest(worker_id="w1", max_concurrency=max_concurrency, **types),
        )

    async def poll(
        self, *, wf: list[str] = (), act: list[str] = (), wait: float = 5
    ) -> list[pb.Task]:  # type: ignore[assignment]
        reply = await self.channel.unary(
            self.workers.poll_tasks,
            pb.PollTasksRequest(
                worker_id="w1",
                max_tasks=10,
                workflow_types=list(wf),
                activity_types=list(act),
                wait_s=wait,
            ),
        )
        return list(reply.tasks)

    async def listen_cancellations(self, seen: Callable[[pb.Cancellation], object]) -> None:
        """Stream worker "w1"'s cancellations, passing each one (not the keep-alives) to
        ``seen``, until cancelled."""
        async for c in self.channel.stream(
            self.workers.stream_cancellations, pb.StreamCancellationsRequest(worker_id="w1")
        ):
            if not c.keepalive:
                seen(c)

    async def run_workflow_task(
        self, task: pb.Task, fn: Callable[..., Any]
    ) -> pb.CompleteWorkflowTaskResponse:
        return await self.channel.unary(self.workers.complete_workflow_task, self.decide(task, fn))

    def decide(
        self, task: pb.Task, fn: Callable[..., Any], *, max_eager: int = 0
    ) -> pb.CompleteWorkflowTaskRequest:
        """Replay ``fn`` over the task's history: the completion a worker would send."""
        result = replay(
            fn,
            _events(task),
            info=WorkflowInfo(task.workflow_id, task.run_id, task.workflow_type),
            now=datetime.fromtimestamp(task.claimed_at, UTC),
        )
        return pb.CompleteWorkflowTaskRequest(
            task_id=task.task_id,
            lease_token=task.lease_token,
            worker_id="w1",
            seen_sequence=result.seen_sequence,
            commands=json.dumps([c.to_dict() for c in result.commands]).encode(),
            claim_time=task.claimed_at,
            max_eager_tasks=max_eager,
        )

    def decide_ahead(
        self, task: pb.Task, fn: Callable[..., Any], activity: pb.Task, result: Any, index: int
    ) -> pb.FollowUpDecision:
        """What a worker that decided ``task`` sends with ``activity``'s result (at ``index``
        of its call): the next workflow task's decision, made on that replay, ahead."""
        replayer = Replayer(
            fn, info=WorkflowInfo(task.workflow_id, task.run_id, task.workflow_type)
        )
        replayer.replay(_events(task), now=datetime.fromtimestamp(task.claimed_at, UTC))
        ahead = replayer.follow_up(
            activity.activity_id,
            activity.attempt,
            result,
            worker_id="w1",
            now=datetime.fromtimestamp(activity.claimed_at, UTC),
        )
        replayer.close()
        assert ahead is not None
        return pb.FollowUpDecision(
            result=index,
            run_id=task.run_id,
            activity_id=activity.activity_id,
            after_sequence=ahead.after_sequence,
            after_time=ahead.after_time.timestamp(),
            seen_sequence=ahead.result.seen_sequence,
            commands=json.dumps([c.to_dict() for c in ahead.result.commands]).encode(),
            decided_at=ahead.decided_at.timestamp(),
        )

    async def first_workflow_task(self, wtype: str, *activity_types: str) -> pb.Task:
        """Register worker "w1" for ``wtype`` and ``activity_types``, start a run of it
        (workflow id "w") and claim its first workflow task."""
        await self.register(workflow_types=[wtype], activity_types=list(activity_types))
        await self.start(wtype, wid="w")
        (task,) = await self.poll(wf=[wtype])
        return task

    async def first_decisions(
        self, fn: Callable[..., Any], wtype: str, inputs: list[Any], prefix: str
    ) -> tuple[list[pb.Task], list[pb.CompleteWorkflowTaskRequest]]:
        """Start one run per input (workflow ids ``prefix-0``, ``prefix-1``...), claim their
        first workflow tasks and decide each (eager budget 1), in workflow id order."""
        await self.register(workflow_types=[wtype], activity_types=["work"])
        for n, arg in enumerate(inputs):
            await self.start(wtype, arg, wid=f"{prefix}-{n}")
        tasks = sorted(await self.poll(wf=[wtype]), key=lambda t: t.workflow_id)
        assert [t.workflow_id for t in tasks] == [f"{prefix}-{n}" for n in range(len(inputs))]
        return tasks, [self.decide(task, fn, max_eager=1) for task in tasks]

    async def first_steps(
        self, fn: Callable[..., Any], wtype: str, inputs: list[Any], prefix: str
    ) -> tuple[list[pb.Task], list[pb.Task]]:
        """`first_decisions`, applied in one call: each run's first workflow task and the
        activity its decision handed straight back."""
        tasks, decisions = await self.first_decisions(fn, wtype, inputs, prefix)
        reply = await self.channel.unary(
            self.workers.complete_workflow_tasks,
            pb.CompleteWorkflowTasksRequest(completions=decisions),
        )
        activities = []
        for outcome in reply.outcomes:
            (activity,) = outcome.eager_tasks
            activities.append(activity)
        return tasks, activities

    async def drive(self, fn: Callable[..., Any], wtype: str, *, steps: int = 1) -> None:
        for _ in range(steps):
            (task,) = await self.poll(wf=[wtype])
            await self.run_workflow_task(task, fn)

    async def describe(self, wid: str) -> pb.WorkflowDescription:
        reply = await self.channel.unary(
            self.workflows.describe_workflow, pb.DescribeWorkflowRequest(workflow_id=wid)
        )
        return reply.workflow

    async def history_types(self, wid: str) -> list[str]:
        reply = await self.channel.unary(
            self.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid)
        )
        return [e.type for e in reply.events]

    async def complete(self, task: pb.Task, result: Any) -> None:
        await self.channel.unary(
            self.workers.complete_activity_task,
            pb.CompleteActivityTaskRequest(
                task_id=task.task_id,
                lease_token=task.lease_token,
                worker_id="w1",
                result=json.dumps(result).encode(),
            ),
        )

    async def fail(
        self, task: pb.Task, message: str = "boom", **kw: Any
    ) -> pb.FailActivityTaskResponse:
        return await self.channel.unary(
            self.workers.fail_activity_task,
            pb.FailActivityTaskRequest(
                task_id=task.task_id,
                lease_token=task.lease_token,
                worker_id="w1",
                error=json.dumps({"type": "IOError", "message": message}).encode(),
                **kw,
            ),
        )

    async def fail_workflow_task(
        self,
        task: pb.Task,
        error: dict[str, Any],
        *,
        non_determinism: bool = False,
        seen_sequence: int = 0,
    ) -> None:
        """What worker "w1" sends when its replay of ``task`` fails (``seen_sequence``: the
        last event it replayed; 0, unknown, as an older worker sends)."""
        await self.channel.unary(
            self.workers.fail_workflow_task,
            pb.FailWorkflowTaskRequest(
                task_id=task.task_id,
                lease_token=task.lease_token,
                worker_id="w1",
                error=json.dumps(error).encode(),
                non_determinism=non_determinism,
                seen_sequence=seen_sequence,
            ),
        )


def _events(task: pb.Task) -> list[HistoryEvent]:
    return history_events(task.history)


def history_events(events: Sequence[pb.HistoryEvent]) -> list[HistoryEvent]:
    """Events as the control plane sends them, as replay reads them."""
    return [
        HistoryEvent(
            sequence_num=e.sequence_num,
            type=e.type,
            data=json.loads(e.data),
            time=datetime.fromtimestamp(e.time, UTC),
        )
        for e in events
    ]


def _results_of_one(tasks: Sequence[pb.Task]) -> list[pb.ActivityResult]:
    """Each activity task's result: 1."""
    return [
        pb.ActivityResult(task_id=t.task_id, lease_token=t.lease_token, result=b"1") for t in tasks
    ]


def spy(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, note: Callable[[Any], Any]
) -> list[Any]:
    """Patch the async method ``owner.name`` to record ``note(first argument)`` of each call
    (in the returned list) and then run as before."""
    seen: list[Any] = []
    original = getattr(owner, name)

    async def recording(self: Any, first: Any, *args: Any, **kw: Any) -> Any:
        seen.append(note(first))
        return await original(self, first, *args, **kw)

    monkeypatch.setattr(owner, name, recording)
    return seen


@asynccontextmanager
async def plane(database_url: str, **overrides: Any) -> AsyncIterator[Plane]:
    config = ServerConfig(database_url=database_url, grpc_port=0, **overrides)
    token = overrides.get("auth_token")
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve, config)
        async with open_channel("127.0.0.1", info.port, auth_token=token) as channel:
            yield Plane(
                channel,
                pb.WorkflowServiceStub(channel.raw),
                pb.WorkerServiceStub(channel.raw),
                info.port,
            )
        nursery.cancel_scope.cancel()


async def one_activity(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity(
        "flaky",
        input,
        retry=RetryPolicy(max_attempts=2, initial_interval=0.05),
        start_to_close_timeout=0.3,
    )


async def caught_failure(ctx: Any, input: Any) -> Any:
    try:
        return await ctx.execute_activity("flaky", input, retry=RetryPolicy(max_attempts=1))
    except Exception as exc:  # the workflow sees the activity's failure
        return {"caught": type(exc).__name__, "message": str(exc)}


async def test_start_to_close_timeout_is_enforced_and_counts_as_an_attempt(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url, reclaim_interval=0.5) as p:
            wid = await p.start("one", 1)
            await p.drive(one_activity, "one")
            (first,) = await p.poll(act=["flaky"])
            # Never answer: the server times the attempt out after 0.3 s and retries it.
            (second,) = await p.poll(act=["flaky"], wait=10)
            assert second.attempt == 2 and second.lease_token != first.lease_token
            with pytest.raises(FailedPrecondition, match=r"stale|no longer valid|held by"):
                await p.complete(first, "late")  # the timed-out holder can never commit
            await p.complete(second, "ok")
            await p.drive(one_activity, "one")
            assert (await p.describe(wid)).status == "completed"
            types = await p.history_types(wid)
            assert "activity_timed_out" in types


async def test_dead_letter_tells_the_workflow_and_runbook_requeue_is_noticed(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("caught", {"n": 1})
            await p.drive(caught_failure, "caught")
            (task,) = await p.poll(act=["flaky"])
            reply = await p.fail(task, "disk full")
            assert not reply.will_retry
            letters = await p.channel.unary(
                p.workflows.list_dead_letters, pb.ListDeadLettersRequest()
            )
            (letter,) = letters.dead_letters
            assert json.loads(letter.input) == {"n": 1} and letter.attempts == 1
            await p.drive(caught_failure, "caught")
            final = await p.describe(wid)
            assert final.status == "completed"
            assert json.loads(final.result)["caught"] == "ActivityError"
            assert "disk full" in json.loads(final.result)["message"]
            # The operator guide's own statement: the control plane picks it up at once.
            await pool.execute(
                f"UPDATE durable_dead_letter_queue SET requeued_at = NOW() WHERE id = '{letter.id}';"
            )
            (again,) = await p.poll(act=["flaky"], wait=5)
            assert again.task_id == task.task_id and again.attempt == 1


async def test_requeue_by_rpc(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("caught", 2)
            await p.drive(caught_failure, "caught")
            (task,) = await p.poll(act=["flaky"])
            await p.fail(task, non_retryable=True)
            (letter,) = (
                await p.channel.unary(p.workflows.list_dead_letters, pb.ListDeadLettersRequest())
            ).dead_letters
            reply = await p.channel.unary(
                p.workflows.requeue_dead_letter, pb.RequeueDeadLetterRequest(id=letter.id)
            )
            assert reply.task_id == task.task_id
            with pytest.raises(FailedPrecondition, match="already requeued"):
                await p.channel.unary(
                    p.workflows.requeue_dead_letter, pb.RequeueDeadLetterRequest(id=letter.id)
                )
            (again,) = await p.poll(act=["flaky"])
            assert again.task_id == task.task_id


async def test_breaker_opens_after_five_failures_and_holds_tasks_without_charging(
    database_url: str, pool: pg.Pool
) -> None:
    async def many(ctx: Any, input: Any) -> Any:
        handles = [
            ctx.start_activity("dep", i, retry=RetryPolicy(max_attempts=5, initial_interval=0.01))
            for i in range(8)
        ]
        return await ctx.gather(*handles)

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("many")
            await p.drive(many, "many")
            tasks = await p.poll(act=["dep"])
            for task in tasks[:5]:
                assert (await p.fail(task)).will_retry
            breakers = await p.channel.unary(
                p.workflows.list_circuit_breakers, pb.ListCircuitBreakersRequest()
            )
            assert [(b.key, b.state) for b in breakers.breakers] == [("dep", "open")]
            await trio.sleep(0.1)  # the retried ones are visible again, but the breaker is open
            assert await p.poll(act=["dep"], wait=0.3) == []
            attempts = await pool.fetch(
                "SELECT attempt FROM durable_task_queue WHERE kind = 'activity' AND status = 'pending'"
            )
            assert sorted(r["attempt"] for r in attempts) == [1, 1, 1, 1, 1]
            await p.channel.unary(
                p.workflows.reset_circuit_breaker, pb.ResetCircuitBreakerRequest(key="dep")
            )
            assert len(await p.poll(act=["dep"], wait=1)) == 5


async def test_half_open_breaker_admits_one_probe(database_url: str, pool: pg.Pool) -> None:
    async def many(ctx: Any, input: Any) -> Any:
        return await ctx.gather(*[ctx.start_activity("dep", i) for i in range(3)])

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("many")
            await p.drive(many, "many")
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at) "
                "VALUES ('dep', 'open', 5, now() - interval '31 seconds')"
            )
            probes = await p.poll(act=["dep"], wait=1)
            assert len(probes) == 1
            assert await p.poll(act=["dep"], wait=0.2) == []
            state = await pool.fetchrow("SELECT * FROM durable_circuit_breaker_state")
            assert state is not None and state["state"] == "half_open"
            assert state["probes_in_flight"] == 1


async def ahead_fanout(ctx: Any, input: Any) -> Any:
    await ctx.gather(
        ctx.execute_activity("work", 1),
        ctx.execute_activity("other", 2),
        ctx.execute_activity("work", 3),
    )


async def ahead_with_timer(ctx: Any, input: Any) -> Any:
    ctx.start_activity("work", 1)
    await ctx.sleep(60)


def started_ahead(request: pb.CompleteWorkflowTaskRequest, *activity_ids: str) -> list[str]:
    """Name ``activity_ids`` in ``request.started`` under fresh task ids; returns the ids."""
    ids = [str(uuid.uuid4()) for _ in activity_ids]
    request.started = [
        pb.StartedActivity(activity_id=a, task_id=t) for a, t in zip(activity_ids, ids, strict=True)
    ]
    return ids


@pytest.mark.parametrize("path", ["one statement", "under the run's lock"])
async def test_activities_started_ahead_get_the_chosen_ids_and_come_back_first(
    database_url: str, pool: pg.Pool, path: str
) -> None:
    """A worker may start activities while its decision is on its way (the workflow task says
    so while every breaker is closed): their tasks get the ids it chose and are handed back
    claimed for it, before any other its free slots could take (here one slot: only the one
    started ahead, though another activity of a type it serves comes first in the commands);
    a type it does not serve stays queued. Both ways of applying a decision do this."""
    fn, wtype = (ahead_fanout, "fan") if path == "one statement" else (ahead_with_timer, "nap")
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task(wtype, "work")
            assert task.may_start_activities
            request = p.decide(task, fn, max_eager=1)
            last = "3" if fn is ahead_fanout else "1"
            (chosen,) = started_ahead(request, last)
            reply = await p.channel.unary(p.workers.complete_workflow_task, request)
            assert reply.accepted
            (handed,) = reply.eager_tasks
            assert (handed.task_id, handed.activity_id, handed.attempt) == (chosen, last, 1)
            assert handed.lease_token > 0
            rows = await pool.fetch(
                "SELECT id, activity_type, status, claimed_by, attempt FROM durable_task_queue"
                " WHERE kind = 'activity' ORDER BY activity_id"
            )
            assert [(str(r["id"]) == chosen, *tuple(r)[1:]) for r in rows] == (
                [
                    (False, "work", "pending", None, 0),
                    (False, "other", "pending", None, 0),
                    (True, "work", "claimed", "w1", 1),
                ]
                if last == "3"
                else [(True, "work", "claimed", "w1", 1)]
            )


async def test_activities_started_ahead_are_held_back_by_a_breaker_that_is_not_closed(
    database_url: str, pool: pg.Pool
) -> None:
    """While a breaker is open, workflow tasks say not to start activities ahead; one started
    anyway (or under a breaker that opened meanwhile) is created under its id but not handed
    back, and waits behind its breaker like any other."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["fan"], activity_types=["work"])
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at)"
                " VALUES ('work', 'open', 5, now())"
            )
            await trio.sleep(1.05)  # the control plane looks at breakers at most once a second
            await p.start("fan", wid="w")
            (task,) = await p.poll(wf=["fan"])
            assert not task.may_start_activities
            request = p.decide(task, ahead_fanout, max_eager=5)
            (chosen,) = started_ahead(request, "1")
            reply = await p.channel.unary(p.workers.complete_workflow_task, request)
            assert reply.accepted and not reply.eager_tasks
            row = await pool.fetchrow(
                "SELECT status, claimed_by FROM durable_task_queue WHERE id = $1",
                uuid.UUID(chosen),
            )
            assert row is not None and tuple(row) == ("pending", None)


@pytest.mark.parametrize(
    ("started", "message"),
    [
        ([("9", str(uuid.uuid4()))], "do not schedule: 9"),
        ([("1", "not-a-uuid")], "is not a UUID"),
        ([("1", "00000000-0000-0000-0000-000000000001")] * 2, "twice"),
        ([("", str(uuid.uuid4()))], "activity id is empty"),
    ],
)
async def test_activities_started_ahead_must_be_what_the_commands_schedule(
    database_url: str, started: list[tuple[str, str]], message: str
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("fan", "work")
            request = p.decide(task, ahead_fanout, max_eager=5)
            request.started = [pb.StartedActivity(activity_id=a, task_id=t) for a, t in started]
            with pytest.raises(InvalidArgument, match=message):
                await p.channel.unary(p.workers.complete_workflow_task, request)
            batch = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=[request]),
            )
            (outcome,) = batch.outcomes
            assert outcome.refused_status == "INVALID_ARGUMENT" and message in outcome.message


async def test_a_signal_that_came_while_a_decision_travelled_is_replayed_not_lost(
    database_url: str,
) -> None:
    async def waiter(ctx: Any, input: Any) -> Any:
        return await ctx.wait_signal("go")

    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("waiter")
            (task,) = await p.poll(wf=["waiter"])
            # A signal arrives while the workflow task is out: its decision (wait) is applied
            # and the signal held past it (tests/integration/test_held_input.py).
            await p.channel.unary(
                p.workflows.signal_workflow,
                pb.SignalWorkflowRequest(workflow_id=wid, name="go", payload=b'"yes"'),
            )
            reply = await p.run_workflow_task(task, waiter)
            assert reply.accepted and not reply.superseded
            await p.drive(waiter, "waiter")
            final = await p.describe(wid)
            assert final.status == "completed" and json.loads(final.result) == "yes"


async def test_two_workflow_tasks_out_at_once_never_apply_commands_twice(
    database_url: str,
) -> None:
    async def child_per_signal(ctx: Any, input: Any) -> Any:
        await ctx.wait_signal("go")
        return await ctx.execute_activity("work", 1)

    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("dup")
            (first,) = await p.poll(wf=["dup"])  # sees only workflow_started
            await p.channel.unary(
                p.workflows.signal_workflow,
                pb.SignalWorkflowRequest(workflow_id=wid, name="go"),
            )  # the first task is out, so the signal makes a second, pending one
            (second,) = await p.poll(wf=["dup"])  # sees the signal
            current = await p.channel.unary(
                p.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid)
            )
            # The first task, replayed over the full current history, is accepted...
            first.history = current.events
            assert (await p.run_workflow_task(first, child_per_signal)).accepted
            # ...and the second, decided on the same view, must not schedule the activity again.
            reply = await p.run_workflow_task(second, child_per_signal)
            assert reply.superseded and not reply.accepted
            types = await p.history_types(wid)
            assert types.count("activity_scheduled") == 1, types


async def test_cancelling_a_parent_cancels_its_open_children(database_url: str) -> None:
    async def parent(ctx: Any, input: Any) -> Any:
        return await ctx.execute_child_workflow("kid", None, workflow_id="the-kid")

    async def kid(ctx: Any, input: Any) -> Any:
        return await ctx.wait_signal("never")

    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("parent")
            await p.drive(parent, "parent")
            await p.drive(kid, "kid")  # the child now waits
            await p.channel.unary(
                p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid)
            )
            assert "workflow_cancel_requested" in await p.history_types("the-kid")
            await p.drive(kid, "kid")  # the child's code lets the cancellation end it
            assert (await p.describe("the-kid")).status == "cancelled"
            await p.drive(parent, "parent")
            assert (await p.describe(wid)).status == "cancelled"


async def test_batch_start_is_idempotent_per_open_id_even_within_one_batch(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            first = await p.start("t", 1, wid="dup")
            reply = await p.channel.unary(
                p.workflows.start_workflows,
                pb.StartWorkflowsRequest(
                    requests=[
                        pb.StartWorkflowRequest(workflow_type="t", workflow_id="dup", input=b"2"),
                        pb.StartWorkflowRequest(workflow_type="t", workflow_id="new", input=b"3"),
                        pb.StartWorkflowRequest(workflow_type="t", workflow_id="new", input=b"4"),
                        pb.StartWorkflowRequest(workflow_type="t", input=b"12345678901234567890"),
                    ]
                ),
            )
            got = [(r.workflow_id, r.created) for r in reply.responses]
            assert got[:3] == [("dup", False), ("new", True), ("new", False)]
            assert reply.responses[1].run_id == reply.responses[2].run_id
            assert got[3][1] and uuid.UUID(got[3][0])
            assert first == "dup"
            described = await p.describe(got[3][0])
            assert described.input == b"12345678901234567890"
            assert await p.history_types(got[3][0]) == ["workflow_started"]


async def test_columnar_batch_start_matches_the_message_form(database_url: str) -> None:
    """StartWorkflows in columns: one type for all or one per start, missing inputs are null,
    missing or empty ids are generated, idempotent per open id; the columnar reply lines up
    with the starts; columns of the wrong length are refused whole."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("t", 1, wid="dup")
            reply = await p.channel.unary(
                p.workflows.start_workflows,
                pb.StartWorkflowsRequest(
                    workflow_types=["t"],
                    inputs=[b"2", b"3", b"4"],
                    workflow_ids=["dup", "", "c-1"],
                    columnar_reply=True,
                ),
            )
            assert reply.responses == []
            assert reply.workflow_ids[0] == "dup" and reply.workflow_ids[2] == "c-1"
            assert uuid.UUID(reply.workflow_ids[1])
            assert reply.created == [False, True, True]
            assert len(set(reply.run_ids)) == 3
            assert (await p.describe(reply.workflow_ids[1])).input == b"3"
            mixed = await p.channel.unary(
                p.workflows.start_workflows,
                pb.StartWorkflowsRequest(workflow_types=["t", "u"], inputs=[b"5"]),
            )
            assert [r.created for r in mixed.responses] == [True, True]
            second = await p.describe(mixed.responses[1].workflow_id)
            assert second.workflow_type == "u" and second.input == b"null"
            for bad in (
                pb.StartWorkflowsRequest(workflow_types=["t", "u"], inputs=[b"1", b"2", b"3"]),
                pb.StartWorkflowsRequest(workflow_types=["t", "u"], workflow_ids=["a"] * 3),
                pb.StartWorkflowsRequest(inputs=[b"1"]),
            ):
                with pytest.raises(InvalidArgument, match="workflow_types must name one type"):
                    await p.channel.unary(p.workflows.start_workflows, bad)


async def test_a_large_batch_starts_in_statements_side_by_side(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of 1,203 starts is written by three statements (about 400 each), and answers
    exactly as one statement would: in request order, an id open before the call returned
    unchanged, an id repeated across the batch started once (its repeats in one statement),
    unnamed starts given ids; each new run has one event and one workflow task."""
    sizes = spy(monkeypatch, Store, "start_workflows", len)
    ids = ["" if n % 4 == 3 else f"big-{n}" for n in range(1203)]
    ids[0] = "dup"
    ids[5] = ids[700] = ids[1200] = "again"
    with trio.fail_after(60):
        async with plane(database_url) as p:
            await p.start("t", 0, wid="dup")
            sizes.clear()
            reply = await p.channel.unary(
                p.workflows.start_workflows,
                pb.StartWorkflowsRequest(
                    workflow_types=["t"],
                    inputs=[str(n).encode() for n in range(len(ids))],
                    workflow_ids=ids,
                    columnar_reply=True,
                ),
            )
    assert sorted(sizes) == [401, 401, 401]
    assert [w for w, i in zip(reply.workflow_ids, ids, strict=True) if i and w != i] == []
    assert all(uuid.UUID(w) for w, i in zip(reply.workflow_ids, ids, strict=True) if not i)
    assert reply.created[0] is False and reply.created[5] is True
    assert reply.created[700] is False and reply.created[1200] is False
    assert reply.run_ids[5] == reply.run_ids[700] == reply.run_ids[1200]
    assert sum(reply.created) == 1203 - 3 and len(set(reply.run_ids)) == 1203 - 2
    rows = await pool.fetch(
        """SELECT r.workflow_id, r.input::text AS input,
                  (SELECT count(*) FROM durable_workflow_events e WHERE e.run_id = r.id) AS events,
                  (SELECT count(*) FROM durable_task_queue t WHERE t.run_id = r.id) AS tasks
           FROM durable_workflow_instances r WHERE r.workflow_id <> 'dup'"""
    )
    assert len(rows) == 1203 - 3
    assert {(r["events"], r["tasks"]) for r in rows} == {(1, 1)}
    inputs = {r["workflow_id"]: r["input"] for r in rows}
    assert inputs["again"] == "5" and inputs["big-1202"] == "1202"


async def test_a_failed_part_of_a_batch_stops_the_next_and_leaves_the_others_started(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts one at a time: the second part's statement fails, the call fails with its error
    (not wrapped in a group), the third never begins, and the first part's runs stand."""
    from everruns.server import engine

    monkeypatch.setattr(engine, "START_STATEMENTS_AT_ONCE", 1)
    calls: list[int] = []
    start_workflows = Store.start_workflows

    async def failing_second(self: Store, requests: Any) -> Any:
        calls.append(len(requests))
        if len(calls) == 2:
            raise InvalidArgument("the second part is refused")
        return await start_workflows(self, requests)

    monkeypatch.setattr(Store, "start_workflows", failing_second)
    with trio.fail_after(60):
        async with plane(database_url) as p:
            with pytest.raises(InvalidArgument, match="the second part is refused"):
                await p.channel.unary(
                    p.workflows.start_workflows,
                    pb.StartWorkflowsRequest(
                        workflow_types=["t"], workflow_ids=[f"f-{n}" for n in range(1500)]
                    ),
                )
    assert calls == [500, 500]
    assert await pool.fetchval("SELECT count(*) FROM durable_workflow_instances") == 500


async def test_packed_batch_start_answers_in_blobs_and_refuses_bad_offsets(
    database_url: str,
) -> None:
    """StartWorkflows packed: inputs cut at their end offsets, answered with 16-byte run ids,
    one created byte per start and the generated ids of the unnamed starts only; offsets that
    do not fit the blob are refused before anything starts."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("t", 1, wid="dup")
            inputs, ends = pack_blobs([b'"a"', b"", b"[1,2]"])
            reply = await p.channel.unary(
                p.workflows.start_workflows,
                pb.StartWorkflowsRequest(
                    packed_workflow_types=["t"],
                    packed_inputs=inputs,
                    input_ends=ends,
                    workflow_ids=["dup", "", "c-1"],
                    packed_reply=True,
                ),
            )
            assert reply.responses == [] and reply.run_ids == []
            run_ids = unpack_uuids(reply.packed_run_ids, "run ids")
            (generated,) = unpack_uuids(reply.packed_generated_ids, "generated ids")
            assert len(set(run_ids)) == 3 and reply.packed_created == b"\x00\x01\x01"
            described = await p.describe(generated)
            assert described.run_id == run_ids[1] and described.input == b"null"
            assert (await p.describe("c-1")).input == b"[1,2]"
            before = await p.channel.unary(
                p.workflows.list_workflows, pb.ListWorkflowsRequest(limit=100)
            )
            for blob, bad_ends, message in (
                (b"12", struct.pack("<2I", 1, 3), r"outside 1\.\.2"),
                (b"12", struct.pack("<1I", 1), "1 bytes after the last item"),
                (b"12", b"\x01\x00", "4 bytes each"),
            ):
                with pytest.raises(InvalidArgument, match=message):
                    await p.channel.unary(
                        p.workflows.start_workflows,
                        pb.StartWorkflowsRequest(
                            packed_workflow_types=["t"], packed_inputs=blob, input_ends=bad_ends
                        ),
                    )
            # What a control plane without the packed form sees of a packed request (the
            # columns only): it refuses the named starts and has no unnamed ones to start.
            with pytest.raises(InvalidArgument, match="workflow_types must name one type"):
                await p.channel.unary(
                    p.workflows.start_workflows, pb.StartWorkflowsRequest(workflow_ids=["x", "y"])
                )
            with contextlib.suppress(InvalidArgument):
                nothing = await p.channel.unary(
                    p.workflows.start_workflows, pb.StartWorkflowsRequest(columnar_reply=True)
                )
                assert nothing.run_ids == [] and nothing.responses == []
            after = await p.channel.unary(
                p.workflows.list_workflows, pb.ListWorkflowsRequest(limit=100)
            )
            assert len(after.workflows) == len(before.workflows)


async def test_non_determinism_marks_the_run_stuck(database_url: str) -> None:
    async def v1(ctx: Any, input: Any) -> Any:
        return await ctx.execute_activity("a", 1)

    async def v2(ctx: Any, input: Any) -> Any:
        return await ctx.execute_activity("b", 1)

    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("nd")
            await p.drive(v1, "nd")
            (act,) = await p.poll(act=["a"])
            await p.complete(act, 1)
            (task,) = await p.poll(wf=["nd"])
            with pytest.raises(Exception) as info:
                await p.run_workflow_task(task, v2)
            await p.fail_workflow_task(
                task,
                {"type": "NonDeterminismError", "message": str(info.value)},
                non_determinism=True,
            )
            described = await p.describe(wid)
            assert described.status == "running"
            assert "non-determinism" in described.stuck_reason
            assert await p.poll(wf=["nd"], wait=0.3) == []  # not retried in a loop


async def test_signal_or_cancel_of_an_ended_run_is_refused_with_its_status(
    database_url: str,
) -> None:
    async def quick(ctx: Any, input: Any) -> Any:
        return input

    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("quick", [1, None, 2.5])
            await p.drive(quick, "quick")
            with pytest.raises(FailedPrecondition, match="already ended completed"):
                await p.channel.unary(
                    p.workflows.signal_workflow,
                    pb.SignalWorkflowRequest(workflow_id=wid, name="x"),
                )
            with pytest.raises(FailedPrecondition, match="already ended completed"):
                await p.channel.unary(
                    p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid)
                )
            with pytest.raises(NotFound):
                await p.channel.unary(
                    p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id="nope")
                )
            assert json.loads((await p.describe(wid)).result) == [1, None, 2.5]


async def test_cancel_pushes_to_the_holder_and_cancels_pending(database_url: str) -> None:
    async def two(ctx: Any, input: Any) -> Any:
        return await ctx.gather(ctx.start_activity("slow", 1), ctx.start_activity("slow", 2))

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(activity_types=["slow"], max_concurrency=1)
            wid = await p.start("two")
            await p.drive(two, "two")
            received: list[pb.Cancellation] = []
            got_one = trio.Event()
            async with trio.open_nursery() as nursery:

                def seen(c: pb.Cancellation) -> None:
                    received.append(c)
                    got_one.set()

                nursery.start_soon(p.listen_cancellations, seen)
                await trio.sleep(0.2)
                reply = await p.channel.unary(
                    p.workers.poll_tasks,
                    pb.PollTasksRequest(
                        worker_id="w1", max_tasks=1, activity_types=["slow"], wait_s=1
                    ),
                )
                (held,) = reply.tasks
                started = trio.current_time()
                await p.channel.unary(
                    p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid)
                )
                await got_one.wait()
                assert trio.current_time() - started < 1.0
                assert received[0].task_id == held.task_id
                await p.fail(held, cancelled=True)  # report while still connected
                nursery.cancel_scope.cancel()
            types = await p.history_types(wid)
            assert "workflow_cancel_requested" in types
            assert types.count("activity_cancelled") == 2  # the pending one and the held one


async def test_scheduled_activities_wake_waiting_claimers_at_once(database_url: str) -> None:
    """Activities a workflow task schedules for other workers (no eager dispatch) wake the
    claimers already waiting for them by NOTIFY, one after another: each of three one-slot
    claimers gets one at once, not after the due-scanner's safety-net round (>= 1 s)."""

    async def three(ctx: Any, input: Any) -> Any:
        return await ctx.gather(*(ctx.start_activity("job", n) for n in range(3)))

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("three")
            got: list[tuple[str, float]] = []
            answers: list[tuple[int, int, float]] = []  # claimer, tasks, when (for a failure)
            async with trio.open_nursery() as nursery:

                async def claimer(n: int) -> None:
                    reply = await p.channel.unary(
                        p.workers.poll_tasks,
                        pb.PollTasksRequest(
                            worker_id=f"c{n}", max_tasks=1, activity_types=["job"], wait_s=10
                        ),
                    )
                    got.extend((t.task_id, trio.current_time()) for t in reply.tasks)
                    answers.append((n, len(reply.tasks), trio.current_time() - scheduled))

                for n in range(3):
                    nursery.start_soon(claimer, n)
                scheduled = trio.current_time() + 0.3
                await trio.sleep_until(scheduled)  # all three are waiting (one found nothing)
                await p.drive(three, "three")
            assert len({task_id for task_id, _ in got}) == 3, answers
            slowest = max(at for _, at in got) - scheduled
            # A lost wake-up would be repaired by the due-scanner's safety net, >= 1 s later.
            assert slowest < 0.9, f"the last claimer got its task {slowest:.2f} s later: {answers}"


async def test_a_batch_of_results_is_applied_together_and_refills_the_slots(
    database_url: str,
) -> None:
    """CompleteActivityTasks: results of several runs (two of one run) in one call; each is
    accepted or refused on its own (a stale lease, a result that is not JSON), each run gets
    its events in request order with consecutive numbers and one workflow task, and the reply
    hands the worker the follow-up workflow tasks it serves, then queued tasks, up to
    max_new_tasks."""

    async def pair(ctx: Any, input: Any) -> Any:
        return await ctx.gather(ctx.start_activity("job", 1), ctx.start_activity("job", 2))

    async def single(ctx: Any, input: Any) -> Any:
        return await ctx.execute_activity("job", 3)

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["pair", "single"], activity_types=["job"])
            a = await p.start("pair")
            b = await p.start("single")
            await p.drive(pair, "pair")
            (task_b,) = await p.poll(wf=["single"], wait=1)
            await p.run_workflow_task(task_b, single)
            c = await p.start("single")  # its workflow task stays queued
            jobs = await p.poll(act=["job"], wait=1)
            assert sorted(t.workflow_id for t in jobs) == sorted([a, a, b])
            by_input = {json.loads(t.input): t for t in jobs}
            second = by_input[2]
            results = [
                pb.ActivityResult(task_id=t.task_id, lease_token=t.lease_token, result=r)
                for t, r in ((by_input[1], b'"one"'), (by_input[3], b'"three"'), (second, b"x"))
            ]
            results.append(  # a lease that is not (or no longer) the task's
                pb.ActivityResult(
                    task_id=second.task_id, lease_token=second.lease_token + 1000, result=b"2"
                )
            )
            reply = await p.channel.unary(
                p.workers.complete_activity_tasks,
                pb.CompleteActivityTasksRequest(worker_id="w1", results=results, max_new_tasks=3),
            )
            assert [o.accepted for o in reply.outcomes] == [True, True, False, False]
            assert reply.outcomes[2].refused_status == "INVALID_ARGUMENT"
            assert reply.outcomes[3].refused_status == "FAILED_PRECONDITION"
            # a's and b's follow-up workflow tasks first (eager), then c's queued one.
            handed = sorted((t.kind, t.workflow_id) for t in reply.new_tasks)
            assert handed == sorted([("workflow", a), ("workflow", b), ("workflow", c)])
            assert all(t.history for t in reply.new_tasks)
            reply_events = await p.channel.unary(
                p.workflows.get_history, pb.GetHistoryRequest(workflow_id=a)
            )
            events = [(e.sequence_num, e.type) for e in reply_events.events]
            assert [n for n, _ in events] == list(range(1, len(events) + 1))
            assert [t for _, t in events][-2:] == ["activity_started", "activity_completed"]
            assert [t for _, t in events].count("activity_completed") == 1  # the bad one: no
            # The refused result can still be reported properly under its lease.
            await p.complete(second, 2)
            assert (await p.history_types(a)).count("activity_completed") == 2


async def two_steps_of_work(ctx: Any, input: Any) -> Any:
    first = await ctx.execute_activity("work", input)
    return [first, await ctx.execute_activity("work", first + 1)]


async def test_a_decision_made_ahead_is_applied_only_with_the_result_it_assumed(
    database_url: str,
) -> None:
    """Decisions sent ahead with activity results: applied when the recorded history is the
    one each assumed (the workflow task is completed at once; its activity comes back instead
    of it), refused (the task comes back to be replayed) when its result is not the one
    recorded (a stale lease's result sent beside the valid one for the same task). Malformed
    decisions are left out; their results still count."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            tasks, (first, second) = await p.first_steps(two_steps_of_work, "two", [1, 5], "ahead")
            stale = pb.ActivityResult(
                task_id=first.task_id, lease_token=first.lease_token + 1000, result=b"7"
            )
            results = [
                stale,
                pb.ActivityResult(
                    task_id=first.task_id, lease_token=first.lease_token, result=b"1"
                ),
                pb.ActivityResult(
                    task_id=second.task_id, lease_token=second.lease_token, result=b"5"
                ),
            ]
            ahead = [
                # Made on the stale lease's result (the worker ran the task twice): the valid
                # lease's result is the one recorded, so this decision must not count.
                p.decide_ahead(tasks[0], two_steps_of_work, first, 7, 0),
                p.decide_ahead(tasks[1], two_steps_of_work, second, 5, 2),  # right
                pb.FollowUpDecision(result=9, run_id=tasks[1].run_id),  # no such result
            ]
            for bad_time in (float("nan"), float("inf"), 1e300):
                broken = p.decide_ahead(tasks[1], two_steps_of_work, second, 5, 2)
                broken.decided_at = bad_time
                ahead.insert(0, broken)  # left out; the right one for that result still counts
            reply = await p.channel.unary(
                p.workers.complete_activity_tasks,
                pb.CompleteActivityTasksRequest(
                    worker_id="w1", results=results, max_new_tasks=3, decisions=ahead
                ),
            )
            # The stale lease is refused even though it comes first and names the same task.
            assert [o.accepted for o in reply.outcomes] == [False, True, True]
            assert reply.outcomes[0].refused_status == "FAILED_PRECONDITION"
            assert [o.decided for o in reply.outcomes] == [False, False, True]
            # ahead-0's workflow task comes back with its history; ahead-1's was decided: its
            # second activity comes back instead.
            handed = sorted((t.kind, t.workflow_id) for t in reply.new_tasks)
            assert handed == [("activity", "ahead-1"), ("workflow", "ahead-0")]
            assert (await p.history_types("ahead-1"))[-4:] == [
                "activity_started",
                "activity_completed",
                "workflow_task_completed",
                "activity_scheduled",
            ]
            # Both runs' histories replay: the decision applied is a full replay's.
            by_kind = {t.kind: t for t in reply.new_tasks}
            wft = by_kind["workflow"]
            done = await p.run_workflow_task(wft, two_steps_of_work)
            assert done.accepted
            (next_act,) = [t for t in await p.poll(act=["work"], wait=2)]
            for act, value in ((by_kind["activity"], 6), (next_act, 2)):
                await p.complete(act, value)
            for last in await p.poll(wf=["two"]):
                assert (await p.run_workflow_task(last, two_steps_of_work)).accepted
            for wid, want in (("ahead-0", [1, 2]), ("ahead-1", [5, 6])):
                assert json.loads((await p.describe(wid)).result) == want


async def test_a_decision_made_ahead_the_database_refuses_leaves_its_result_recorded(
    database_url: str,
) -> None:
    """A decision made ahead that breaks a rule the database enforces (it schedules an
    activity id the run already has) rolls back the statement that carried it: the result is
    recorded without it, and the workflow task goes out to be replayed."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            tasks, (act,) = await p.first_steps(two_steps_of_work, "two", [1], "dup")
            ahead = p.decide_ahead(tasks[0], two_steps_of_work, act, 1, 0)
            commands = json.loads(ahead.commands)
            commands[0]["activity_id"] = act.activity_id  # an id the run already has
            ahead.commands = json.dumps(commands).encode()
            result = pb.ActivityResult(
                task_id=act.task_id, lease_token=act.lease_token, result=b"1"
            )
            reply = await p.channel.unary(
                p.workers.complete_activity_tasks,
                pb.CompleteActivityTasksRequest(
                    worker_id="w1", results=[result], max_new_tasks=1, decisions=[ahead]
                ),
            )
            assert [(o.accepted, o.decided) for o in reply.outcomes] == [(True, False)]
            assert [t.kind for t in reply.new_tasks] == ["workflow"]
            assert (await p.history_types("dup-0"))[-2:] == [
                "activity_started",
                "activity_completed",
            ]


async def test_a_decision_with_a_claim_time_that_is_no_time_is_refused_alone(
    database_url: str,
) -> None:
    """A claim time that no clock can give (NaN, infinite, beyond the year 3000) refuses that
    completion, as other malformed commands are, and the others of the call still apply."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            _, decisions = await p.first_decisions(two_steps_of_work, "two", [1, 2, 3, 4], "clock")
            for decision, bad in zip(decisions, (float("nan"), float("inf"), 1e300), strict=False):
                decision.claim_time = bad
            reply = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=decisions),
            )
            assert [o.refused_status for o in reply.outcomes] == ["INVALID_ARGUMENT"] * 3 + [""]
            assert "claim_time" in reply.outcomes[0].message
            assert reply.outcomes[3].accepted
            with pytest.raises(InvalidArgument, match="claim_time inf is not a time"):
                await p.channel.unary(p.workers.complete_workflow_task, decisions[1])


async def test_a_result_sent_twice_under_one_lease_is_accepted_once_as_recorded(
    database_url: str,
) -> None:
    """The database applies one of two results naming the same task and lease; the one it
    applied is the one answered as accepted (and a decision made ahead on the other is not
    applied)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            tasks, (act,) = await p.first_steps(two_steps_of_work, "two", [1], "twice")
            results = [
                pb.ActivityResult(task_id=act.task_id, lease_token=act.lease_token, result=raw)
                for raw in (b"10", b"20")
            ]
            ahead = [
                p.decide_ahead(tasks[0], two_steps_of_work, act, v, n)
                for n, v in ((0, 10), (1, 20))
            ]
            reply = await p.channel.unary(
                p.workers.complete_activity_tasks,
                pb.CompleteActivityTasksRequest(
                    worker_id="w1", results=results, max_new_tasks=2, decisions=ahead
                ),
            )
            accepted = [o.accepted for o in reply.outcomes]
            assert sorted(accepted) == [False, True]
            history = await p.channel.unary(
                p.workflows.get_history, pb.GetHistoryRequest(workflow_id="twice-0")
            )
            (completed,) = [
                json.loads(e.data) for e in history.events if e.type == "activity_completed"
            ]
            assert completed["result"] == (10 if accepted[0] else 20)
            # Each decision was made on its own result; the recorded one's applies.
            assert [o.decided for o in reply.outcomes] == accepted


@asynccontextmanager
async def doomed_worker(p: Plane, **types: list[str]) -> AsyncIterator[Callable[..., Any]]:
    """A second worker, "doomed", on a connection of its own, registered for ``types`` and
    holding its cancellation stream open (so the control plane follows its connection).
    Yields its PollTasks (keyword arguments of `pb.PollTasksRequest`); leaving the block
    drops its connection, as a killed worker's."""
    async with open_channel("127.0.0.1", p.port) as other:
        stub = pb.WorkerServiceStub(other.raw)
        await other.unary(
            stub.register_worker,
            pb.RegisterWorkerRequest(worker_id="doomed", max_concurrency=4, **types),
        )

        async def hold_stream() -> None:
            request = pb.StreamCancellationsRequest(worker_id="doomed")
            async for _ in other.stream(stub.stream_cancellations, request):
                pass

        async def poll(**request: Any) -> list[pb.Task]:
            reply = await other.unary(
                stub.poll_tasks, pb.PollTasksRequest(worker_id="doomed", **request)
            )
            return list(reply.tasks)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_stream)
            await trio.sleep(0.2)  # the stream is open
            yield poll
            nursery.cancel_scope.cancel()


async def test_dropped_worker_connection_releases_its_tasks_at_once(database_url: str) -> None:
    async def single(ctx: Any, input: Any) -> Any:
        return await ctx.execute_activity("job", 1)

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("single")
            await p.drive(single, "single")
            async with doomed_worker(p, activity_types=["job"]) as doomed_poll:
                assert len(await doomed_poll(max_tasks=1, activity_types=["job"], wait_s=2)) == 1
            # The channel is closed: the control plane sees the stream drop and releases the task.
            t0 = trio.current_time()
            (task,) = await p.poll(act=["job"], wait=5)
            assert trio.current_time() - t0 < 2.0
            assert task.attempt == 2
            workers = await p.channel.unary(
                p.workflows.list_workers, pb.ListWorkersRequest(include_stopped=True)
            )
            assert {w.id: w.status for w in workers.workers}["doomed"] == "lost"


async def test_retention_deletes_old_ended_runs_with_their_rows(
    database_url: str, pool: pg.Pool
) -> None:
    async def quick(ctx: Any, input: Any) -> Any:
        return 1

    with trio.fail_after(30):
        async with plane(database_url, retention_seconds=3600.0, retention_interval=0.2) as p:
            old = await p.start("quick")
            await p.drive(quick, "quick")
            fresh = await p.start("quick")
            await pool.execute(
                "UPDATE durable_workflow_instances SET completed_at = now() - interval '2 hours' "
                "WHERE workflow_id = $1",
                old,
            )
            for _ in range(50):
                if (
                    await pool.fetchval(
                        "SELECT count(*) FROM durable_workflow_instances WHERE workflow_id = $1",
                        old,
                    )
                    == 0
                ):
                    break
                await trio.sleep(0.1)
            assert await pool.fetchval("SELECT count(*) FROM durable_workflow_events") == 1
            assert (await p.describe(fresh)).status == "pending"
            with pytest.raises(NotFound):
                await p.describe(old)


async def test_auth_token_is_required_when_set(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url, auth_token="s3cret") as p:
            await p.start("x")  # the right token works
            async with open_channel("127.0.0.1", p.port, auth_token="wrong") as bad:
                with pytest.raises(RpcError, match="bearer token") as info:
                    await bad.unary(
                        pb.WorkflowServiceStub(bad.raw).list_workflows, pb.ListWorkflowsRequest()
                    )
                assert info.value.status == "UNAUTHENTICATED"
            async with open_channel("127.0.0.1", p.port) as none:
                with pytest.raises(RpcError, match="bearer token"):
                    await none.unary(
                        pb.WorkflowServiceStub(none.raw).list_workflows, pb.ListWorkflowsRequest()
                    )


async def test_bad_fields_get_invalid_argument_or_resource_exhausted(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url, max_pending_tasks=3) as p:
            call = p.channel.unary
            with pytest.raises(InvalidArgument, match="workflow_type must not be empty"):
                await call(p.workflows.start_workflow, pb.StartWorkflowRequest(workflow_type=""))
            with pytest.raises(InvalidArgument, match="not valid JSON"):
                await call(
                    p.workflows.start_workflow,
                    pb.StartWorkflowRequest(workflow_type="t", input=b"{nope"),
                )
            with pytest.raises(ResourceExhausted, match="limit is 2097152"):
                await call(
                    p.workflows.start_workflow,
                    pb.StartWorkflowRequest(
                        workflow_type="t", input=b'"' + b"x" * 10_000_000 + b'"'
                    ),
                )
            # The limit is in bytes: 1.1 million characters of two bytes each exceed it.
            with pytest.raises(ResourceExhausted, match="2200002 bytes; the limit is 2097152"):
                await call(
                    p.workflows.start_workflow,
                    pb.StartWorkflowRequest(
                        workflow_type="t", input=('"' + "é" * 1_100_000 + '"').encode()
                    ),
                )
            with pytest.raises(InvalidArgument, match="not a UUID"):
                await call(
                    p.workflows.describe_workflow,
                    pb.DescribeWorkflowRequest(workflow_id="w", run_id="not-a-uuid"),
                )
            with pytest.raises(InvalidArgument, match="not a UUID"):
                await call(
                    p.workers.record_heartbeat,
                    pb.RecordHeartbeatRequest(task_id="zzz", lease_token=1),
                )
            with pytest.raises(InvalidArgument, match="must not be negative"):
                await call(p.workers.poll_tasks, pb.PollTasksRequest(worker_id="w", wait_s=-1))
            weird = "名前 'quoted'; DROP TABLE durable_task_queue; --"
            wid = await p.start(weird, {"s": weird}, wid=weird)
            assert wid == weird
            described = await p.describe(weird)
            assert described.workflow_type == weird and json.loads(described.input) == {"s": weird}
            await p.start("t2")
            await p.start("t3")
            with pytest.raises(ResourceExhausted, match="EVERRUNS_MAX_PENDING_TASKS"):
                await p.start("t4")


async def test_operator_calls_with_bad_numbers_are_invalid_argument(database_url: str) -> None:
    """A negative page size or a NaN wait is INVALID_ARGUMENT naming the field, not INTERNAL:
    ListDeadLetters checks its limit as ListWorkflows and GetHistory do, and AwaitResult and
    PollTasks refuse a NaN wait_s as they refuse a negative one."""

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("wf", 1, wid="x")
            failures = []
            for method, request, field in [
                (p.workflows.list_dead_letters, pb.ListDeadLettersRequest(limit=-1), "limit"),
                (p.workflows.list_workflows, pb.ListWorkflowsRequest(limit=-1), "limit"),
                (
                    p.workflows.get_history,
                    pb.GetHistoryRequest(workflow_id="x", limit=-1),
                    "limit",
                ),
                (
                    p.workflows.await_result,
                    pb.AwaitResultRequest(workflow_id="x", wait_s=math.nan),
                    "wait_s",
                ),
                (
                    p.workers.poll_tasks,
                    pb.PollTasksRequest(worker_id="w1", wait_s=math.nan),
                    "wait_s",
                ),
            ]:
                try:
                    await p.channel.unary(method, request)
                except InvalidArgument as exc:
                    if field not in str(exc):
                        failures.append(f"{type(request).__name__}: {exc} names no {field}")
                except RpcError as exc:
                    failures.append(f"{type(request).__name__}: {exc.status}: {exc}")
                else:
                    failures.append(f"{type(request).__name__} was accepted")
            assert failures == []


async def test_two_control_planes_share_one_database(database_url: str) -> None:
    async def single(ctx: Any, input: Any) -> Any:
        return await ctx.execute_activity("job", input)

    with trio.fail_after(30):
        async with plane(database_url) as a, plane(database_url) as b:
            for i in range(20):
                await a.start("single", i, wid=f"wf-{i}")
            claimed: list[str] = []
            for p in (a, b):
                for _ in range(2):
                    for task in await p.poll(wf=["single"], wait=0.5):
                        await p.run_workflow_task(task, single)
            async with trio.open_nursery() as nursery:
                for p in (a, b, a, b):

                    async def drain(p: Plane = p) -> None:
                        while tasks := await p.poll(act=["job"], wait=0.5):
                            for task in tasks:
                                claimed.append(task.task_id)
                                await p.complete(task, "ok")

                    nursery.start_soon(drain)
            assert len(claimed) == 20 and len(set(claimed)) == 20
            uuid.UUID(claimed[0])


async def test_ending_a_run_cancels_the_activities_it_no_longer_waits_for(
    database_url: str, pool: pg.Pool
) -> None:
    """The end of a run with an activity still out cannot take the one-statement path; the
    general path ends it and cancels that activity (pending: cancelled; claimed: asked to)."""

    async def first_wins(ctx: Any, input: Any) -> Any:
        fast = ctx.start_activity("fast", 1)
        ctx.start_activity("slow", 2)
        ctx.start_activity("never", 3)
        return await fast

    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("first_wins")
            await p.drive(first_wins, "first_wins")
            (fast,) = await p.poll(act=["fast"])
            await p.poll(act=["slow"])
            await p.complete(fast, "done")
            await p.drive(first_wins, "first_wins")
            final = await p.describe(wid)
            assert final.status == "completed" and json.loads(final.result) == "done"
            rows = await pool.fetch(
                "SELECT activity_type, status, cancel_requested_at IS NOT NULL AS asked"
                " FROM durable_task_queue WHERE workflow_id = $1 AND kind = 'activity'"
                " ORDER BY activity_type",
                wid,
            )
            assert [tuple(r) for r in rows] == [
                ("fast", "completed", False),
                ("never", "cancelled", False),
                ("slow", "claimed", True),
            ]  # the holder of "slow" learns of the cancel on its next heartbeat


async def test_a_stopping_control_plane_ends_the_calls_in_flight_at_once(
    database_url: str,
) -> None:
    """A long poll in flight when the control plane stops ends at once, as unreachable (its
    connection is closed): the worker does not wait out its own 30 s budget."""
    config = ServerConfig(database_url=database_url, grpc_port=0)
    server = trio.CancelScope()

    async def run_server(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with server:
            await serve(config, task_status=task_status)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_server)
            async with open_channel("127.0.0.1", info.port) as channel:
                workers = pb.WorkerServiceStub(channel.raw)
                await channel.unary(
                    workers.register_worker,
                    pb.RegisterWorkerRequest(
                        worker_id="w1", max_concurrency=1, activity_types=["x"]
                    ),
                )
                ended: list[tuple[float, BaseException | None]] = []

                async def long_poll() -> None:
                    error: BaseException | None = None
                    try:
                        await channel.unary(
                            workers.poll_tasks,
                            pb.PollTasksRequest(
                                worker_id="w1", max_tasks=1, activity_types=["x"], wait_s=30
                            ),
                            timeout=40,
                        )
                    except RpcError as exc:
                        error = exc
                    ended.append((trio.current_time(), error))

                async with trio.open_nursery() as polls:
                    polls.start_soon(long_poll)
                    await trio.sleep(0.5)  # the poll is waiting for a task
                    stopped = trio.current_time()
                    server.cancel()
                ((at, error),) = ended
                assert at - stopped < 3.0
                assert isinstance(error, ServerUnavailable)  # a worker retries it at once
                # The connection is gone too: the next call fails at once, it does not hang.
                with trio.fail_after(5), pytest.raises(RpcError):
                    await channel.unary(
                        workers.register_worker,
                        pb.RegisterWorkerRequest(worker_id="w1", max_concurrency=1),
                        timeout=10,
                    )


async def one_step(ctx: Any, input: Any) -> Any:
    """One activity ("work"); with input "nap", a timer first (so the general path)."""
    if input == "nap":
        await ctx.sleep(60)
    return await ctx.execute_activity("work", input)


async def test_several_workflow_tasks_complete_in_one_call_each_on_its_own(
    database_url: str,
) -> None:
    """CompleteWorkflowTasks applies each completion as CompleteWorkflowTask would (its own
    eager tasks) and refuses a stale one alone, in request order."""

    with trio.fail_after(30):
        async with plane(database_url) as p:
            tasks, requests = await p.first_decisions(one_step, "step", [0, 1, 2], "s")
            requests[1].lease_token += 1000  # not the lease it holds
            reply = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=requests),
            )
            first, stale, third = reply.outcomes
            assert first.accepted and third.accepted and not stale.accepted
            assert stale.refused_status == "FAILED_PRECONDITION" and "lease" in stale.message
            for outcome, task in ((first, tasks[0]), (third, tasks[2])):
                (eager,) = outcome.eager_tasks
                assert eager.kind == "activity" and eager.run_id == task.run_id
            assert await p.history_types(tasks[1].workflow_id) == ["workflow_started"]


async def test_one_call_mixes_the_one_statement_path_the_general_path_and_refusals(
    database_url: str,
) -> None:
    """In one CompleteWorkflowTasks call, completions that only schedule activities are
    applied together, a timer takes the general path under its run's lock, and a malformed
    completion is refused alone; each is answered in its place."""

    with trio.fail_after(30):
        async with plane(database_url) as p:
            _, requests = await p.first_decisions(one_step, "step", ["a", "nap", "b", "c"], "m")
            requests[3].commands = b"[{not json"
            reply = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=requests),
            )
            fast_a, nap, fast_b, bad = reply.outcomes
            assert fast_a.accepted and nap.accepted and fast_b.accepted and not bad.accepted
            assert bad.refused_status == "INVALID_ARGUMENT"
            assert [len(o.eager_tasks) for o in (fast_a, nap, fast_b)] == [1, 0, 1]
            assert await p.history_types("m-1") == [
                "workflow_started",
                "workflow_task_completed",
                "timer_started",
            ]
            for wid in ("m-0", "m-2"):
                assert await p.history_types(wid) == [
                    "workflow_started",
                    "workflow_task_completed",
                    "activity_scheduled",
                ]
            assert await p.history_types("m-3") == ["workflow_started"]


async def test_a_completion_the_database_refuses_is_refused_alone(database_url: str) -> None:
    """One completion of a call schedules the same activity id twice: the database's unique
    index refuses it, which rolls back the statement shared with the others. Those others are
    still applied, and only the guilty one is refused."""

    with trio.fail_after(30):
        async with plane(database_url) as p:
            _, requests = await p.first_decisions(one_step, "step", [0, 1, 2], "d")
            (command,) = json.loads(requests[1].commands)
            requests[1].commands = json.dumps([command, command]).encode()
            reply = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=requests),
            )
            first, twice, third = reply.outcomes
            assert first.accepted and third.accepted and not twice.accepted
            assert twice.refused_status == "ALREADY_EXISTS"
            assert [len(o.eager_tasks) for o in (first, third)] == [1, 1]
            assert await p.history_types("d-1") == ["workflow_started"]
            for wid in ("d-0", "d-2"):
                assert await p.history_types(wid) == [
                    "workflow_started",
                    "workflow_task_completed",
                    "activity_scheduled",
                ]


def _scheduled(**options: Any) -> dict[str, Any]:
    """A schedule_activity command in its wire form, with these options."""
    return {"type": "schedule_activity", "activity_id": "1", "activity_type": "work", **options}


# Commands every check of Python accepts (finite numbers, non-empty strings) but PostgreSQL
# cannot store: an interval past its range, an int4 overflow, NUL in text. Each with the field
# its refusal names. Built in the wire form: the command classes refuse them.
def _first_completion(task: pb.Task, command: dict[str, Any]) -> pb.CompleteWorkflowTaskRequest:
    """Worker w1 completes a run's first workflow task with one command."""
    return pb.CompleteWorkflowTaskRequest(
        task_id=task.task_id,
        lease_token=task.lease_token,
        worker_id="w1",
        seen_sequence=1,
        commands=json.dumps([command]).encode(),
        claim_time=task.claimed_at,
    )


_UNSTORABLE_COMMANDS: list[tuple[dict[str, Any], str]] = [
    ({"type": "start_timer", "timer_id": "1", "seconds": 1e13}, "seconds"),  # ~317,000 years
    (_scheduled(options={"schedule_to_start_timeout": 1e13}), "schedule_to_start_timeout"),
    (_scheduled(options={"start_to_close_timeout": 1e13}), "start_to_close_timeout"),
    (_scheduled(options={"heartbeat_timeout": 1e13}), "heartbeat_timeout"),
    (_scheduled(options={"retry": {"maximum_interval": 1e13}}), "maximum_interval"),
    (_scheduled(options={"retry": {"max_attempts": 2**31}}), "max_attempts"),
    (_scheduled(activity_type="wo\x00rk"), "activity_type"),
    # storable, but a type no worker can register (the registry refuses surrounding spaces)
    (_scheduled(activity_type=" work"), "activity_type"),
    ({"type": "start_child_workflow", "child_id": "1", "workflow_type": "kid "}, "workflow_type"),
    (_scheduled(options={"breaker_key": "k\x00"}), "breaker_key"),
    ({"type": "start_timer", "timer_id": "t\x00", "seconds": 1}, "timer_id"),
    (
        {"type": "start_child_workflow", "child_id": "1", "workflow_type": "kid\x00"},
        "workflow_type",
    ),
    (
        {
            "type": "start_child_workflow",
            "child_id": "1",
            "workflow_type": "kid",
            "workflow_id": "k\x00",
        },
        "workflow_id",
    ),
]


async def test_commands_postgres_cannot_store_are_refused_alone_as_invalid_argument(
    database_url: str,
) -> None:
    """A timer or timeout too long for PostgreSQL's intervals, max_attempts past int4, a NUL
    in a name: each completion carrying one is refused alone with INVALID_ARGUMENT naming the
    field (so its worker fails the workflow task and the run is marked stuck), and a good
    completion of the same call is applied. Not INTERNAL for the whole call, which workers
    retry without end, the good decision with it."""

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["wf"], activity_types=["work"])
            wids = ["good", *(f"bad-{n}" for n in range(len(_UNSTORABLE_COMMANDS)))]
            for wid in wids:
                await p.start("wf", 1, wid=wid)
            tasks: dict[str, pb.Task] = {}
            while len(tasks) < len(wids):
                tasks.update((t.workflow_id, t) for t in await p.poll(wf=["wf"]))

            def completion(wid: str, command: dict[str, Any]) -> pb.CompleteWorkflowTaskRequest:
                return _first_completion(tasks[wid], command)

            good = _scheduled(input=1)
            reply = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(
                    completions=[
                        completion("good", good),
                        *(
                            completion(f"bad-{n}", command)
                            for n, (command, _) in enumerate(_UNSTORABLE_COMMANDS)
                        ),
                    ]
                ),
            )
            first, *refused = reply.outcomes
            assert first.accepted
            verdicts = [
                (o.refused_status, field in o.message)
                for o, (_, field) in zip(refused, _UNSTORABLE_COMMANDS, strict=True)
            ]
            assert verdicts == [("INVALID_ARGUMENT", True)] * len(refused), [
                o.message for o in refused
            ]
            assert all("\n" not in o.message for o in refused)
            assert await p.history_types("good") == [
                "workflow_started",
                "workflow_task_completed",
                "activity_scheduled",
            ]


async def test_a_timer_postgres_cannot_store_is_invalid_argument_not_internal(
    database_url: str,
) -> None:
    """CompleteWorkflowTask with a timer 317,000 years away answers INVALID_ARGUMENT naming
    ``seconds``, not INTERNAL (which its worker would retry without end)."""

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("wf", 1, wid="t")
            (task,) = await p.poll(wf=["wf"])
            timer = {"type": "start_timer", "timer_id": "1", "seconds": 1e13}
            with pytest.raises(InvalidArgument, match=r"seconds must be .* at most"):
                await p.channel.unary(
                    p.workers.complete_workflow_task, _first_completion(task, timer)
                )


async def test_failure_reports_with_nul_characters_are_kept_with_the_nul_escaped(
    database_url: str,
) -> None:
    """PostgreSQL stores no NUL character, but a worker's failure report is never refused
    for its content: an activity's or a workflow task's error with NUL in it is recorded,
    each NUL written as the four characters \\x00."""

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("one", 1, wid="act")
            await p.drive(one_activity, "one")
            (activity,) = await p.poll(act=["flaky"])
            reply = await p.fail(activity, "bad\x00byte")
            assert reply.will_retry
            (info,) = (await p.describe("act")).pending_activities
            assert json.loads(info.last_error)["message"] == "bad\\x00byte"

            await p.start("wf", 1, wid="wft")
            (task,) = await p.poll(wf=["wf"])
            await p.fail_workflow_task(task, {"type": "E\x00", "message": "no\x00pe"})
            assert (await p.describe("wft")).stuck_reason == "workflow task failed: no\\x00pe"


async def test_long_polls_woken_together_claim_together_in_one_statement(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six one-slot workers wait; one workflow task schedules six activities: the long polls
    it wakes claim in one statement (not six), and each worker gets its own task, claimed in
    its name."""
    slots_per_claim = spy(monkeypatch, Store, "claim_tasks_for", len)

    async def fan(ctx: Any, input: Any) -> Any:
        return await ctx.gather(*(ctx.start_activity("job", n) for n in range(6)))

    with trio.fail_after(30):
        async with plane(database_url) as p:
            got: dict[str, list[pb.Task]] = {}

            async def worker(name: str) -> None:
                await p.channel.unary(
                    p.workers.register_worker,
                    pb.RegisterWorkerRequest(
                        worker_id=name, max_concurrency=1, activity_types=["job"]
                    ),
                )
                reply = await p.channel.unary(
                    p.workers.poll_tasks,
                    pb.PollTasksRequest(
                        worker_id=name, max_tasks=1, activity_types=["job"], wait_s=20
                    ),
                )
                got[name] = list(reply.tasks)

            wid = await p.start("fan")
            async with trio.open_nursery() as nursery:
                for k in range(6):
                    nursery.start_soon(worker, f"s{k}")
                await trio.sleep(0.5)  # all six are waiting
                slots_per_claim.clear()
                await p.drive(fan, "fan")
            tasks = {name: t.task_id for name, ts in got.items() for t in ts}
            assert sorted(tasks) == [f"s{k}" for k in range(6)]
            assert len(set(tasks.values())) == 6
            for name, task_id in tasks.items():
                row = await pool.fetchrow(
                    "SELECT claimed_by, workflow_id FROM durable_task_queue WHERE id = $1",
                    uuid.UUID(task_id),
                )
                assert row is not None and (row["claimed_by"], row["workflow_id"]) == (name, wid)
            assert max(slots_per_claim) >= 2 and len(slots_per_claim) < 6


async def test_an_activity_only_worker_gets_queued_tasks_claimed_beside_its_results(
    database_url: str,
) -> None:
    """A worker that serves no workflow gets no follow-up workflow task back, so the claim for
    its freed slots runs beside the statement that records its results: the reply still
    brings queued tasks, never more than offered, and the results are recorded."""

    async def fan(ctx: Any, input: Any) -> Any:
        return await ctx.gather(*(ctx.start_activity("job", n) for n in range(5)))

    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(activity_types=["job"])
            wid = await p.start("fan")
            await p.drive(fan, "fan")
            first = await p.channel.unary(
                p.workers.poll_tasks,
                pb.PollTasksRequest(worker_id="w1", max_tasks=2, activity_types=["job"], wait_s=1),
            )
            assert len(first.tasks) == 2
            reply = await p.channel.unary(
                p.workers.complete_activity_tasks,
                pb.CompleteActivityTasksRequest(
                    worker_id="w1",
                    results=_results_of_one(first.tasks),
                    max_new_tasks=2,
                ),
            )
            assert [o.accepted for o in reply.outcomes] == [True, True]
            assert len(reply.new_tasks) == 2
            assert all(t.kind == "activity" and t.workflow_id == wid for t in reply.new_tasks)
            done = {t.task_id for t in first.tasks}
            assert not done & {t.task_id for t in reply.new_tasks}
            assert (await p.history_types(wid)).count("activity_completed") == 2


class WaitingPolls:
    """Long polls of worker w1 for workflow type "t", started as tasks of a nursery and
    known to wait on the control plane (in this Trio run) for a wake-up, i.e. to be ones a
    start can hand its task to."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from everruns.server.notifier import TaskInterest

        self._waits = trio.Event()  # set at the next wait of any poll
        wait = TaskInterest.wait

        async def signalling(interest: TaskInterest) -> None:
            self._waits.set()
            await wait(interest)

        monkeypatch.setattr(TaskInterest, "wait", signalling)

    async def next_wait(self) -> None:
        """Return once a poll waits (at once if one began to since the last call)."""
        await self._waits.wait()
        self._waits = trio.Event()

    async def start(self, nursery: trio.Nursery, p: Plane, seconds: float) -> list[pb.Task]:
        """Start a poll of up to ``seconds``; once it waits, return the list its tasks will be
        added to."""
        polled: list[pb.Task] = []

        async def poll() -> None:
            polled.extend(await p.poll(wf=["t"], wait=seconds))

        self._waits = trio.Event()
        nursery.start_soon(poll)
        await self.next_wait()
        return polled


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> WaitingPolls:
    return WaitingPolls(monkeypatch)


async def start_in_sight(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[trio.Event, trio.Event, trio.Event]:
    """Hold eager starts at their statement: returns events set when one reaches it and when
    a poll reserved for one leaves unsettled, and the event that lets it go on."""
    from everruns.server.notifier import Notifier, TaskInterest

    reached, go, left = trio.Event(), trio.Event(), trio.Event()
    start_for, forget = Store.start_workflow_for, Notifier._forget

    async def held(self: Store, *args: Any) -> Any:
        reached.set()
        await go.wait()
        return await start_for(self, *args)

    def forgetting(self: Notifier, interest: TaskInterest) -> None:
        forget(self, interest)
        if interest.closed and interest.reserved:
            left.set()

    monkeypatch.setattr(Store, "start_workflow_for", held)
    monkeypatch.setattr(Notifier, "_forget", forgetting)
    return reached, go, left


async def times_six(ctx: Any, arg: int) -> int:
    return arg * 6


async def test_a_start_hands_its_workflow_task_to_a_waiting_poll(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch, polls: WaitingPolls
) -> None:
    """Eager start: a worker's long poll waiting for the type gets the new run's workflow
    task from the start itself (no claim statement), claimed for it with a lease, its run
    running; the task completes like any claimed one. A start of an id whose run is open
    creates nothing and the poll goes on waiting."""
    claims = spy(monkeypatch, Store, "claim_tasks_for", len)
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["t"])
            async with trio.open_nursery() as nursery:
                polled = await polls.start(nursery, p, 20)
                claims.clear()
                assert await p.start("t", 7, wid="eager-1") == "eager-1"
            assert claims == []
            (task,) = polled
            assert (task.kind, task.workflow_id, task.attempt) == ("workflow", "eager-1", 1)
            assert [e.type for e in task.history] == ["workflow_started"]
            assert json.loads(task.history[0].data)["input"] == 7
            row = await pool.fetchrow(
                "SELECT status, claimed_by, lease_token FROM durable_task_queue WHERE id = $1",
                uuid.UUID(task.task_id),
            )
            assert (row["status"], row["claimed_by"]) == ("claimed", "w1")
            assert row["lease_token"] == task.lease_token
            assert (await p.describe("eager-1")).status == "running"
            done = await p.run_workflow_task(task, times_six)
            assert done.accepted
            assert (await p.describe("eager-1")).status == "completed"

            await p.start("t", 1, wid="open")
            (first,) = await p.poll(wf=["t"])
            async with trio.open_nursery() as nursery:
                polled = await polls.start(nursery, p, 20)
                await p.start("t", 2, wid="open")  # its run is open: nothing new
                await polls.next_wait()  # the poll claimed again, found nothing, and waits
                nursery.cancel_scope.cancel()
            assert polled == [] and first.workflow_id == "open"


async def test_a_poll_whose_time_ends_during_the_start_still_gets_its_task(
    database_url: str, monkeypatch: pytest.MonkeyPatch, polls: WaitingPolls
) -> None:
    reached, go, _ = await start_in_sight(monkeypatch)
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["t"])
            async with trio.open_nursery() as nursery:
                polled = await polls.start(nursery, p, 0.3)
                nursery.start_soon(p.start, "t", 1, "late")
                await reached.wait()
                await trio.sleep(0.6)  # the poll's 0.3 s are over while the start is held
                go.set()
            assert [t.workflow_id for t in polled] == ["late"]


async def test_a_task_handed_to_a_poll_that_left_goes_back_to_the_queue(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch, polls: WaitingPolls
) -> None:
    """The poll reserved for a start is cancelled before the start's statement ends: the
    start still succeeds, its workflow task goes back to the queue with its attempt
    uncharged, and the next poll claims it."""
    reached, go, left = await start_in_sight(monkeypatch)
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["t"])
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as polling:
                    await polls.start(polling, p, 5)
                    nursery.start_soon(p.start, "t", 1, "orphan")
                    await reached.wait()
                    polling.cancel_scope.cancel()  # the poll's caller goes away
                await left.wait()  # the control plane has seen it go
                go.set()
            # the start gave the task back before it answered
            row = await pool.fetchrow("SELECT status, attempt, claimed_by FROM durable_task_queue")
            assert (row["status"], row["attempt"], row["claimed_by"]) == ("pending", 0, None)
            (task,) = await p.poll(wf=["t"])
            assert (task.workflow_id, task.attempt) == ("orphan", 1)


# ----------------------------------------------------------------------------- query plans

# Statements that read a partial index (or a table) whole by design: the duties' sweeps, for
# which every claimed task may have timed out or lost its holder (as many as the workers have
# slots; pending tasks are swept through the index of their deadlines), every requeue an
# operator wrote is due, every open child with no cancel request may have lost its parent,
# and every activity task a run's end or cancel skipped is still to settle (their records);
# the next due timer, a min() that reads one end of its index; a page of the operator's
# dead-letter listing; and the due schedules, a table of a row per schedule an operator made
# (read in due order under a limit where it is large enough for its index to pay; empty here).
_WHOLE_BY_DESIGN = {
    "lock_due_schedules",
    "find_stale_tasks",
    "find_timed_out_tasks",
    "next_timeout",
    "claim_operator_requeues",
    "find_orphaned_children",
    "find_abandoned_activities",
    "next_due",
    "list_dead_letters",
}


def _unbounded_scans(plan: dict[str, Any]) -> list[str]:
    """The scans in ``plan`` of an everruns table that nothing bounds: a sequential scan, or
    an index read whole (to find one row, every row the index holds). An index read in order
    under a LIMIT, with no filter, stops at the first rows: bounded."""
    found: list[str] = []

    def bounded(node: dict[str, Any]) -> bool:
        if node["Node Type"] == "Bitmap Index Scan":
            return "Index Cond" in node
        return all(bounded(child) for child in node.get("Plans", []))

    def walk(node: dict[str, Any], limited: bool) -> None:
        kind, table = node["Node Type"], node.get("Relation Name", "")
        whole_index = kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node
        # Circuit breakers: one row per breaker key, a handful.
        if (
            table.startswith("durable_")
            and table != "durable_circuit_breaker_state"
            and (
                kind == "Seq Scan"
                or (whole_index and not (limited and "Filter" not in node))
                or (kind == "Bitmap Heap Scan" and not bounded(node))
            )
        ):
            found.append(f"{kind} on {table} {node.get('Index Name', '')}".strip())
        for child in node.get("Plans", []):
            walk(child, kind == "Limit")

    walk(plan, False)
    return found


async def plan_steps(ctx: Any, input: Any) -> Any:
    await ctx.execute_activity("work", input, retry=RetryPolicy(initial_interval=0.05))
    await ctx.sleep(0.05)
    return input


async def plan_signal(ctx: Any, input: Any) -> Any:
    return await ctx.wait_signal("go", timeout=60)


async def plan_parent(ctx: Any, input: Any) -> Any:
    return await ctx.execute_child_workflow("kid", input, workflow_id="plan-kid")


async def plan_kid(ctx: Any, input: Any) -> Any:
    return input


async def test_statements_find_rows_by_key_whatever_the_statistics_say(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statistics taken when every run had ended, every task had completed, every timer had
    fired, every signal was processed and every worker had stopped make a partial index over
    the live rows look empty, and PostgreSQL then reads such an index whole to find one row
    in it: every claimed task for one heartbeat (the results statement of ten activities took
    14.8 ms instead of 2.0 ms with 5,000 tasks claimed). Every statement of a workflow's life
    must reach its rows through an index condition."""
    from everruns.store.queries import QUERIES

    with trio.fail_after(60):
        names = {sql: name for name, sql in QUERIES.items()}
        for sql in (
            "INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input,"
            " partition_key, status, result, started_at, completed_at)"
            " SELECT gen_random_uuid(), 'old-' || g, 'plan', '1', 'old-' || g, 'completed', '1',"
            " now(), now() FROM generate_series(1, 2000) g",
            "INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type,"
            " activity_id, partition_key, status, attempt, completed_at)"
            " SELECT gen_random_uuid(), id, workflow_id, 'activity', 'work', 'a', workflow_id,"
            " 'completed', 1, now() FROM durable_workflow_instances",
            "INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type,"
            " payload) SELECT id, workflow_id, n, 'e', '{}' FROM durable_workflow_instances,"
            " generate_series(1, 3) n",
            "INSERT INTO durable_dead_letter_queue (id, task_id, run_id, workflow_id, activity_type,"
            " input, attempts, last_error, requeued_at, requeue_applied_at, partition_key)"
            " SELECT gen_random_uuid(), id, run_id, workflow_id, 'work', '1', 1, 'x', now(), now(),"
            " workflow_id FROM durable_task_queue",
            "INSERT INTO durable_timers (run_id, workflow_id, timer_id, fire_at, status,"
            " partition_key) SELECT id, workflow_id, 't', now(), 'fired', workflow_id"
            " FROM durable_workflow_instances",
            "INSERT INTO durable_signals (run_id, workflow_id, signal_name, processed_at)"
            " SELECT id, workflow_id, 'go', now() FROM durable_workflow_instances",
            "INSERT INTO durable_workers (id, status, max_concurrency, stopped_at)"
            " SELECT 'old-' || g, 'stopped', 1, now() FROM generate_series(1, 2000) g",
            "ANALYZE",
        ):
            await pool.execute(sql)
        seen: dict[str, tuple[Any, ...]] = {}

        def recording(original: Any) -> Any:
            async def run(self: Any, query: str, *args: Any) -> Any:
                if query in names:
                    seen.setdefault(names[query], args)  # the first arguments it ran with
                return await original(self, query, *args)

            return run

        for method in ("execute", "fetch", "fetchrow", "fetchval"):
            monkeypatch.setattr(pg.Connection, method, recording(getattr(pg.Connection, method)))
        async with plane(database_url) as p:
            await p.register(
                workflow_types=["steps", "signal", "parent", "kid"], activity_types=["work"]
            )
            wid = await p.start("steps", 1)
            await p.drive(plan_steps, "steps")
            (work,) = await p.poll(act=["work"])
            await p.channel.unary(
                p.workers.record_heartbeat,
                pb.RecordHeartbeatRequest(task_id=work.task_id, lease_token=work.lease_token),
            )
            await p.fail(work)
            (work,) = await p.poll(act=["work"])
            await p.complete(work, 1)
            await p.drive(plan_steps, "steps", steps=2)
            assert (await p.describe(wid)).status == "completed"
            wid = await p.start("signal")
            await p.drive(plan_signal, "signal")
            await p.channel.unary(
                p.workflows.signal_workflow,
                pb.SignalWorkflowRequest(workflow_id=wid, name="go", payload=b"1"),
            )
            await p.drive(plan_signal, "signal")
            assert (await p.describe(wid)).status == "completed"
            wid = await p.start("parent", 3)
            await p.drive(plan_parent, "parent")
            await p.drive(plan_kid, "kid")
            await p.drive(plan_parent, "parent")
            assert (await p.describe(wid)).status == "completed"
            await p.start("steps", 4)
            await p.drive(plan_steps, "steps")
            (work,) = await p.poll(act=["work"])
            await p.fail(work, non_retryable=True)
            letters = await p.channel.unary(
                p.workflows.list_dead_letters, pb.ListDeadLettersRequest()
            )  # newest first: this one, then those made for the statistics
            assert letters.dead_letters[0].task_id == work.task_id
            await p.channel.unary(
                p.workflows.requeue_dead_letter,
                pb.RequeueDeadLetterRequest(id=letters.dead_letters[0].id),
            )
            await p.drive(plan_steps, "steps")  # the failure reaches the workflow, which fails
            (requeued,) = await p.poll(act=["work"])  # the requeue runs all the same
            assert requeued.task_id == work.task_id
            await p.complete(requeued, 4)
            wid = await p.start("steps", 2)
            await p.drive(plan_steps, "steps")
            (work,) = await p.poll(act=["work"])
            await p.channel.unary(
                p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid)
            )
            await p.channel.unary(
                p.workers.worker_heartbeat,
                pb.WorkerHeartbeatRequest(worker_id="w1", status="stopped"),
            )
        monkeypatch.undo()
        # Every live task's stored schedule-to-start deadline is its visibility's, whichever
        # statement wrote it (starts, decisions applied alone or with results, retries...).
        assert await wrong_start_deadlines(pool) == 0
        some = uuid.uuid4()
        # Statements that find rows by key which this life may not reach, with arguments of
        # their kind.
        for name, args in {
            "set_run_running": (some,),
            "end_run": (some, "completed", "1", None),
            "set_run_stuck": (some, "reason"),
            "unclaim_task": (some, 1),
            "lock_task_lease": (some, 1),
            "lock_timed_out_task": (some, 1, 1),
            "start_runs": ([some],),
        }.items():
            seen.setdefault(name, args)
        unbounded = {}
        async with pool.acquire() as conn:
            for name, args in sorted(seen.items()):
                (row,) = await conn.fetch("EXPLAIN (FORMAT JSON) " + QUERIES[name], *args)
                scans = _unbounded_scans(json.loads(row[0])[0]["Plan"])
                if scans and name not in _WHOLE_BY_DESIGN:
                    unbounded[name] = scans
        assert {"heartbeat_task", "complete_activities", "apply_workflow_tasks"} <= seen.keys()
        assert unbounded == {}


async def test_batches_reach_their_rows_by_key_before_any_statistics(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables never analyzed (a database in its first minute, or after a burst of starts
    autovacuum has not analyzed yet) make PostgreSQL guess that few runs are open. With 2,000
    open, applying ten decisions in one statement read every open run and looked its tasks up
    once per open run and decision: 20,000 probes, 54 ms instead of 3.3. Each statement of a
    ten-task step (starts, the claim, ten decisions in one call, ten results with the decisions
    made ahead of them in one call) must do work in proportion to its ten tasks: run as it ran,
    with its real arguments, under EXPLAIN ANALYZE (then rolled back), no scan of an everruns
    table may run more than ten times."""
    from everruns.store.queries import QUERIES

    with trio.fail_after(60):
        tables = await pool.fetch(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname LIKE 'durable_%'"
        )
        for row in tables:  # no statistics for the whole test
            await pool.execute(f"ALTER TABLE {row['relname']} SET (autovacuum_enabled = false)")
        for sql in (
            "INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input,"
            " partition_key, status, started_at, last_sequence_num)"
            " SELECT gen_random_uuid(), 'old-' || g, 'old', '1', 'old-' || g, 'running', now(),"
            " 3 FROM generate_series(1, 2000) g",
            "INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type,"
            " partition_key, status, attempt, claimed_by, claimed_at, heartbeat_at, lease_token)"
            " SELECT gen_random_uuid(), id, workflow_id, 'workflow', 'old', workflow_id,"
            " 'claimed', 1, 'old-worker', now(), now(), nextval('durable_lease_tokens')"
            " FROM durable_workflow_instances",
            "INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type,"
            " payload) SELECT id, workflow_id, n, 'e', '{}' FROM durable_workflow_instances,"
            " generate_series(1, 3) n",
        ):
            await pool.execute(sql)
        assert (
            await pool.fetchval("SELECT count(*) FROM pg_stats WHERE tablename LIKE 'durable_%'")
            == 0
        )

        # The step's statements (the control plane's duties run others meanwhile).
        step = (
            "start_workflows",
            "claim_tasks_fast",
            "apply_workflow_tasks",
            "complete_activities",
        )
        judged = {QUERIES[name]: name for name in step}
        most_loops: dict[str, int] = {}
        largest: dict[str, int] = {}  # the most rows each ran for (its first array)
        unexplained: list[str] = []
        execute, fetch = pg.Connection.execute, pg.Connection.fetch

        def explaining(original: Any) -> Any:
            async def run(self: pg.Connection, query: str, *args: Any) -> Any:
                name = judged.get(query)
                if name is not None:
                    own = not self._raw.is_in_transaction()
                    await execute(self, "BEGIN" if own else "SAVEPOINT plan_check")
                    try:
                        (row,) = await fetch(self, "EXPLAIN (ANALYZE, FORMAT JSON) " + query, *args)
                    except EverrunsError as exc:
                        unexplained.append(f"{name}: {exc}")
                    else:
                        loops = _scan_loops(json.loads(row[0])[0]["Plan"])
                        most_loops[name] = max(most_loops.get(name, 0), loops)
                        largest[name] = max(largest.get(name, 0), len(args[0]))
                    finally:
                        if own:
                            await execute(self, "ROLLBACK")
                        else:
                            await execute(self, "ROLLBACK TO SAVEPOINT plan_check")
                            await execute(self, "RELEASE SAVEPOINT plan_check")
                return await original(self, query, *args)

            return run

        for method in ("execute", "fetch", "fetchrow", "fetchval"):
            monkeypatch.setattr(pg.Connection, method, explaining(getattr(pg.Connection, method)))
        async with plane(database_url) as p:
            inputs = list(range(10))
            tasks, activities = await p.first_steps(two_steps_of_work, "two", inputs, "batch")
            by_run = {t.run_id: t for t in tasks}
            reply = await p.channel.unary(
                p.workers.complete_activity_tasks,
                pb.CompleteActivityTasksRequest(
                    worker_id="w1",
                    results=_results_of_one(activities),
                    max_new_tasks=10,
                    decisions=[
                        p.decide_ahead(by_run[a.run_id], two_steps_of_work, a, 1, n)
                        for n, a in enumerate(activities)
                    ],
                ),
            )
            assert [o.decided for o in reply.outcomes] == [True] * 10
        monkeypatch.undo()
        assert unexplained == []
        assert largest == {
            "start_workflows": 1,
            "claim_tasks_fast": 10,  # a slot's worker id each
            "apply_workflow_tasks": 10,
            "complete_activities": 10,
        }
        assert {name: n for name, n in most_loops.items() if n > 10} == {}


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of ``plan``, itself first."""
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


def _scan_loops(plan: dict[str, Any]) -> int:
    """The most times any scan of an everruns table ran in ``plan`` (EXPLAIN ANALYZE)."""
    return max(
        (
            int(n["Actual Loops"])
            for n in _nodes(plan)
            if n.get("Relation Name", "").startswith("durable_") and "Scan" in n["Node Type"]
        ),
        default=0,
    )


async def test_a_claim_updates_what_it_picked_by_key_in_its_generic_plan(pool: pg.Pool) -> None:
    """The control plane plans its statements generically (force_generic_plan), and a
    generic plan cannot know LIMIT $4 and guesses a tenth of what the claim index holds: with
    10,000 tasks waiting, 1,000 rows to update, for which PostgreSQL 15 joined a read of the
    whole queue (5 ms a claim). The rows picked are updated through their keys."""
    from everruns.store.queries import QUERIES

    with trio.fail_after(60):
        for sql in (
            "INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input,"
            " partition_key, status, started_at, last_sequence_num)"
            " SELECT gen_random_uuid(), 'w-' || g, 'fan', '1', 'w-' || g, 'running', now(), 3"
            " FROM generate_series(1, 10000) g",
            "INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type,"
            " activity_id, partition_key)"
            " SELECT gen_random_uuid(), id, workflow_id, 'activity', 'job', 'a', workflow_id"
            " FROM durable_workflow_instances",
            "INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type,"
            " payload) SELECT id, workflow_id, n, 'e', '{}' FROM durable_workflow_instances,"
            " generate_series(1, 3) n",
            "ANALYZE",
        ):
            await pool.execute(sql)
        async with pool.acquire() as conn:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            for name, types, args in (
                (
                    "claim_tasks",
                    "text, text[], text[], int, text[]",
                    "'w1', '{}', '{job}', 10, '{}'",
                ),
                ("claim_tasks_fast", "text[], text[], text[], int", "'{w1}', '{}', '{job}', 10"),
            ):
                await conn.execute(f"PREPARE plan_check({types}) AS {QUERIES[name]}")
                (row,) = await conn.fetch(f"EXPLAIN (FORMAT JSON) EXECUTE plan_check({args})")
                await conn.execute("DEALLOCATE plan_check")
                plan = json.loads(row[0])[0]["Plan"]
                if name == "claim_tasks":
                    # Its pick reads every pending row by design (the path taken while a
                    # breaker is not closed): only the scans of the rows it updates (t) count.
                    scans = [n for n in _nodes(plan) if n.get("Alias") == "t"]
                    found = [
                        s for n in scans if "Scan" in n["Node Type"] for s in _unbounded_scans(n)
                    ]
                    assert scans and (name, found) == (name, [])
                else:
                    assert (name, _unbounded_scans(plan)) == (name, [])
            await conn.execute("RESET plan_cache_mode")


async def test_a_type_no_worker_can_register_is_refused_where_it_comes_in(
    database_url: str,
) -> None:
    """The registry refuses a workflow or activity type with surrounding spaces, so no worker
    can ever serve one: starting a run of it, or registering a worker for it, is
    INVALID_ARGUMENT. Before, the run was started and waited for a worker forever."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            with pytest.raises(InvalidArgument, match="workflow_type ' wf' must not begin"):
                await p.start(" wf", 1)
            with pytest.raises(InvalidArgument, match="type name 'work ' must not begin"):
                await p.register(workflow_types=["wf"], activity_types=["work "])


async def _start_with_key(p: Plane, wid: str, key: str) -> pb.StartWorkflowResponse:
    return await p.channel.unary(
        p.workflows.start_workflow,
        pb.StartWorkflowRequest(workflow_type="wf", input=b"1", workflow_id=wid, request_id=key),
    )


async def _end(pool: Any, run_id: str) -> None:
    await pool.execute(
        "UPDATE durable_workflow_instances SET status = 'completed', result = '1',"
        " completed_at = now() WHERE id = $1",
        uuid.UUID(run_id),
    )


async def test_a_start_request_sent_again_returns_its_run_even_once_it_has_ended(
    database_url: str, pool: Any
) -> None:
    """A start's idempotency key (request_id) makes a request sent again (a client's retry
    after a reply was lost) return the run its first try started, even if that run has ended
    meanwhile, where the workflow id alone would start a second run; a new key with the same
    workflow id starts a new run as before. On each path: one start in a statement, one handed
    to a waiting poll (eager start), and a batch in the packed form."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            first = await _start_with_key(p, "pay-1", "key-1")
            await _end(pool, first.run_id)
            again = await _start_with_key(p, "pay-1", "key-1")
            assert (again.run_id, again.created) == (first.run_id, False)
            fresh = await _start_with_key(p, "pay-1", "key-2")
            assert fresh.created and fresh.run_id != first.run_id

            while await p.poll(wf=["wf"], wait=0.1):  # the workflow tasks of those runs
                pass
            async with trio.open_nursery() as nursery:  # eager: a poll waits for the type
                polled: list[pb.Task] = []

                async def poll() -> None:
                    polled.extend(await p.poll(wf=["wf"], wait=10))

                nursery.start_soon(poll)
                await trio.sleep(0.3)
                eager = await _start_with_key(p, "pay-2", "key-3")
            assert [t.run_id for t in polled] == [eager.run_id]
            await _end(pool, eager.run_id)
            again = await _start_with_key(p, "pay-2", "key-3")
            assert (again.run_id, again.created) == (eager.run_id, False)

            def batch(keys: list[str]) -> pb.StartWorkflowsRequest:
                inputs, ends = pack_blobs([b"1", b"2"])
                return pb.StartWorkflowsRequest(
                    packed_workflow_types=["wf"],
                    packed_inputs=inputs,
                    input_ends=ends,
                    workflow_ids=["b-1", "b-2"],
                    request_ids=keys,
                    packed_reply=True,
                )

            reply = await p.channel.unary(p.workflows.start_workflows, batch(["k-a", "k-b"]))
            runs = unpack_uuids(reply.packed_run_ids, "run ids")
            assert list(reply.packed_created) == [1, 1]
            for run in runs:
                await _end(pool, str(run))
            reply = await p.channel.unary(p.workflows.start_workflows, batch(["k-a", "k-b"]))
            assert unpack_uuids(reply.packed_run_ids, "run ids") == runs
            assert list(reply.packed_created) == [0, 0]
            total = await pool.fetchval("SELECT count(*) FROM durable_workflow_instances")
            assert total == 5  # pay-1 twice, pay-2, b-1, b-2
            with pytest.raises(InvalidArgument, match="request_ids must not name one request"):
                await p.channel.unary(p.workflows.start_workflows, batch(["k-c", "k-c"]))
