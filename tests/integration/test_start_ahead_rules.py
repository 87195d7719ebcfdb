"""The rules around activities started ahead of their decision's reply that the first version
of that change broke (a review found the first four; each test failed on c6c18fa): only a
run's first workflow task on its first attempt lets activities start ahead (not one that
replaces a lost one, not one reacting to events), task ids the worker chose that are taken
are bad input, each started activity holds a slot, and a failed breaker read must not strand
a hand-out."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.errors import DatabaseUnavailable, FailedPrecondition, InvalidArgument
from everruns.store.store import Store
from tests.integration.test_engine import (
    ahead_fanout,
    ahead_with_timer,
    doomed_worker,
    plane,
    started_ahead,
)

pytestmark = pytest.mark.db


async def test_a_workflow_task_that_replaces_a_lost_one_starts_nothing_ahead(
    database_url: str, pool: pg.Pool
) -> None:
    """A worker is handed a run's first workflow task (may_start_activities) and dies before
    its decision is applied (a poison activity started ahead kills it). A signal arrived
    meanwhile, so the run has a second workflow task pending, on its first attempt: it must
    not let activities start ahead either (its history is more than the start), or the same
    poison activity would start ahead again, uncounted, as often as input kept arriving
    during the crash window."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            async with doomed_worker(p, workflow_types=["nap"], activity_types=["work"]) as poll:
                await p.start("nap", wid="w")
                (first,) = await poll(max_tasks=1, workflow_types=["nap"], wait_s=2)
                assert first.attempt == 1 and first.may_start_activities
                # Input arrives while the doomed worker holds the task (its activity, started
                # ahead, is killing it right now).
                await p.channel.unary(
                    p.workflows.signal_workflow,
                    pb.SignalWorkflowRequest(workflow_id="w", name="poke", payload=b"1"),
                )
            # The doomed worker's connection is gone: its task is released (closed as
            # superseded by the pending one).
            await p.register(workflow_types=["nap"], activity_types=["work"])
            (again,) = await p.poll(wf=["nap"], wait=5)
            assert "activity_scheduled" not in await p.history_types("w")  # never applied
            # Handed out again after its worker was lost before the decision was applied:
            # nothing may start ahead this time.
            assert not again.may_start_activities, (
                f"workflow task handed out again (attempt {again.attempt}) after its worker "
                "was lost still lets activities start ahead"
            )


@pytest.mark.parametrize(
    "fn", [ahead_with_timer, ahead_fanout], ids=["under lock", "one statement"]
)
async def test_a_started_task_id_that_is_taken_is_invalid_argument(
    database_url: str, pool: pg.Pool, fn: Any
) -> None:
    """``started`` task ids are chosen by the worker: one that names an existing task (here
    the workflow task's own id) is bad input, and must be refused as INVALID_ARGUMENT naming
    the field, with nothing lost (the task can still be completed properly)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("nap", "work")
            request = p.decide(task, fn, max_eager=2)
            started_ahead(request, "1")
            request.started[0].task_id = task.task_id  # taken: the workflow task's own id
            with pytest.raises(InvalidArgument, match="started"):
                await p.channel.unary(p.workers.complete_workflow_task, request)
            batch = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=[request]),
            )
            (outcome,) = batch.outcomes
            assert outcome.refused_status == "INVALID_ARGUMENT", (
                outcome.refused_status,
                outcome.message,
            )


async def test_a_task_id_named_by_two_completions_of_one_call_is_invalid_argument(
    database_url: str,
) -> None:
    """Two completions of one CompleteWorkflowTasks call that name the same task id: the
    first is applied, the second refused as INVALID_ARGUMENT (not a constraint's message)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["nap"], activity_types=["work"])
            await p.start("nap", wid="a")
            await p.start("nap", wid="b")
            tasks = sorted(await p.poll(wf=["nap"]), key=lambda t: t.workflow_id)
            first, second = (p.decide(t, ahead_with_timer, max_eager=2) for t in tasks)
            (chosen,) = started_ahead(first, "1")
            second.started = [pb.StartedActivity(activity_id="1", task_id=chosen)]
            reply = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=[first, second]),
            )
            applied, refused = reply.outcomes
            assert applied.accepted and [t.task_id for t in applied.eager_tasks] == [chosen]
            assert refused.refused_status == "INVALID_ARGUMENT" and "twice" in refused.message


@pytest.mark.parametrize("path", ["poll", "eager start"])
async def test_a_failed_breaker_read_does_not_strand_a_claimed_workflow_task(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Handing out a workflow task reads the breakers (for `may_start_activities`). When
    that read fails (a database blip), the task must still reach the poll it was claimed
    for (without leave to start anything ahead): failing the call would leave it claimed by
    a worker that never heard of it until the stale rule (30 s) released it, charging an
    attempt."""
    calls = {"armed": False}
    original = Store.any_unclosed_breaker

    async def flaky(self: Store) -> bool:
        if calls["armed"]:
            calls["armed"] = False
            raise DatabaseUnavailable("PostgreSQL connection lost: a blip")
        return await original(self)

    monkeypatch.setattr(Store, "any_unclosed_breaker", flaky)
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["nap"], activity_types=["work"])
            got: list[pb.Task] = []
            if path == "poll":
                await p.start("nap", wid="w")
                calls["armed"] = True
                got.extend(await p.poll(wf=["nap"], wait=1))
            else:  # StartWorkflow hands the run's task to a waiting poll (`_start_handed`)
                first_poll: list[pb.Task] = []

                async def waiting_poll() -> None:
                    first_poll.extend(await p.poll(wf=["nap"], wait=3))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiting_poll)
                    await trio.sleep(0.5)  # the poll waits
                    calls["armed"] = True
                    await p.start("nap", wid="w")
                got.extend(first_poll)
            assert not calls["armed"]  # the read did fail
            rows = await pool.fetch(
                "SELECT status, claimed_by, attempt FROM durable_task_queue WHERE kind = 'workflow'"
            )
            assert len(got) == 1, f"the workflow task is stranded: {[tuple(r) for r in rows]}"
            assert not got[0].may_start_activities


async def test_an_activity_started_ahead_holds_its_slot_even_when_it_does_not_come_back(
    database_url: str,
) -> None:
    """A started activity the control plane will not hand back (its type is not one it knows
    this worker to serve: a stale registration, say) still holds one of the slots offered:
    handing another activity in its place would give the worker more tasks than it has
    free slots, the extra ones stranded until the stale rule releases them."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("fan", "work")
            request = p.decide(task, ahead_fanout, max_eager=1)  # "1" work, "2" other, "3" work
            started_ahead(request, "2")
            reply = await p.channel.unary(p.workers.complete_workflow_task, request)
            assert reply.accepted and not reply.eager_tasks


async def test_only_a_runs_first_workflow_task_lets_activities_start_ahead(
    database_url: str,
) -> None:
    """A later workflow task reacts to events (here its activities' results); more arriving
    while its decision is on its way would supersede it, and activities started ahead would
    run again for the next one: only the first workflow task of a run lets them start."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("fan", "work", "other")
            assert task.may_start_activities and task.attempt == 1
            reply = await p.channel.unary(
                p.workers.complete_workflow_task, p.decide(task, ahead_fanout, max_eager=3)
            )
            for activity in reply.eager_tasks:
                await p.complete(activity, 1)
            (later,) = await p.poll(wf=["fan"])
            assert later.attempt == 1 and not later.may_start_activities


async def test_a_task_locked_when_its_workers_connection_drops_is_released_all_the_same(
    database_url: str, pool: pg.Pool
) -> None:
    """A worker killed while its decision is being applied (an activity started ahead killed
    it right after the decision went out): the statement applying it holds the workflow task's
    row when the connection drops, then is cancelled and rolled back. The release that the
    dropped connection sets off must wait for that row instead of skipping it, or the task
    stays claimed by the dead worker until the stale rule, 30 s and more later (workload 6
    once measured 39 s)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            async with pool.transaction() as holder:
                async with doomed_worker(p, workflow_types=["nap"]) as poll:
                    await p.start("nap", wid="w")
                    (task,) = await poll(max_tasks=1, workflow_types=["nap"], wait_s=2)
                    # The decision's statement, as it were: it holds the task's row.
                    await holder.execute(
                        "SELECT 1 FROM durable_task_queue WHERE id = $1 FOR UPDATE",
                        uuid.UUID(task.task_id),
                    )
                # The connection is gone; the decision's statement rolls back a moment later.
                await trio.sleep(0.3)
            # (leaving the block committed the holder's transaction, which changed nothing)
            await p.register(workflow_types=["nap"])
            t0 = trio.current_time()
            (again,) = await p.poll(wf=["nap"], wait=5)
            assert again.task_id == task.task_id and again.attempt == 2
            assert trio.current_time() - t0 < 2.0


async def two_steps(ctx: Any, input: Any) -> Any:
    await ctx.execute_activity("work", 1)
    await ctx.execute_activity("work", 2)


async def test_started_is_honoured_only_for_a_decision_on_the_start_alone(
    database_url: str,
) -> None:
    """The control plane does not take a worker's word that a later workflow task may start
    activities ahead: ``started`` on a decision made on more history than the start is
    ignored (the activity is created under an id of the control plane's, and handed back as
    any eager task; the worker cancels what it started)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("two", "work")
            reply = await p.channel.unary(
                p.workers.complete_workflow_task, p.decide(task, two_steps, max_eager=1)
            )
            (first,) = reply.eager_tasks
            await p.complete(first, 1)
            (later,) = await p.poll(wf=["two"])
            request = p.decide(later, two_steps, max_eager=1)
            assert request.seen_sequence > 1
            (chosen,) = started_ahead(request, "2")
            reply = await p.channel.unary(p.workers.complete_workflow_task, request)
            (second,) = reply.eager_tasks
            assert second.activity_id == "2" and second.task_id != chosen


@pytest.mark.parametrize(
    "fn", [ahead_with_timer, ahead_fanout], ids=["under lock", "one statement"]
)
async def test_a_decision_retried_after_its_reply_was_lost_gets_that_reply(
    database_url: str, pool: pg.Pool, fn: Any
) -> None:
    """The control plane applies a decision and its reply is lost (it was stopped, the
    connection broke): the worker sends the same call again. The tasks the decision claimed
    for it (started ahead, or eager) are handed to it again under the same leases, instead of
    a stale verdict that leaves them claimed for a worker that does not know them until the
    30 s stale rule (meanwhile the worker cancelled what it had started ahead). Found by a
    CI run of the control-plane SIGTERM e2e test: a 30 s stall, and the activities run twice.
    A different worker, or a different lease, gets the stale verdict."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("nap" if fn is ahead_with_timer else "fan", "work")
            request = p.decide(task, fn, max_eager=5)
            last = "1" if fn is ahead_with_timer else "3"
            (chosen,) = started_ahead(request, last)
            first = await p.channel.unary(p.workers.complete_workflow_task, request)
            assert first.accepted and first.eager_tasks
            handed = sorted((t.task_id, t.lease_token) for t in first.eager_tasks)
            assert chosen in {task_id for task_id, _ in handed}

            again = await p.channel.unary(p.workers.complete_workflow_task, request)  # lost reply
            assert again.accepted
            assert sorted((t.task_id, t.lease_token) for t in again.eager_tasks) == handed
            batch = await p.channel.unary(
                p.workers.complete_workflow_tasks,
                pb.CompleteWorkflowTasksRequest(completions=[request]),
            )
            (outcome,) = batch.outcomes
            assert outcome.accepted and len(outcome.eager_tasks) == len(handed)

            request.worker_id = "someone-else"
            with pytest.raises(FailedPrecondition, match="no longer valid"):
                await p.channel.unary(p.workers.complete_workflow_task, request)
            request.worker_id = "w1"
            request.lease_token += 1
            with pytest.raises(FailedPrecondition, match="no longer valid"):
                await p.channel.unary(p.workers.complete_workflow_task, request)
            # Once the worker reports one of them, it is no longer handed out again.
            await p.complete(next(t for t in first.eager_tasks if t.task_id == chosen), "ok")
            request.lease_token -= 1
            rest = [h for h in handed if h[0] != chosen]
            if rest:
                third = await p.channel.unary(p.workers.complete_workflow_task, request)
                assert sorted((t.task_id, t.lease_token) for t in third.eager_tasks) == rest
            else:
                with pytest.raises(FailedPrecondition, match="no longer valid"):
                    await p.channel.unary(p.workers.complete_workflow_task, request)
