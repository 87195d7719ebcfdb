"""Worker identity, registration and restart: a worker restarted with the same WORKER_ID (each
registration is an incarnation), workers seen by several control planes, a worker handed a
type it does not serve, and a worker killed while its claim is under way. Found by a review in
session 18; each test failed before its fix, for the defect its assertion message names. One
more (a second stream of the same incarnation) guards the rule those fixes keep."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._aio.grpc import RpcChannel, open_channel
from everruns._proto.everruns import v1 as pb
from everruns.domain.registry import Registry, activity, workflow
from everruns.errors import EverrunsError
from everruns.server.engine import Engine
from everruns.store.store import Store
from everruns.worker import ActivityContext, Worker
from tests.integration.test_cancelled_calls_and_races import until
from tests.integration.test_engine import Plane, plane

pytestmark = pytest.mark.db

WID = "w-restarted"


async def one_call(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity("act", input)


async def old_version(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity("charge_v1", input)


def _register(
    pid: int, *, wf: Sequence[str] = (), act: Sequence[str] = ()
) -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(
        worker_id=WID,
        max_concurrency=4,
        workflow_types=list(wf),
        activity_types=list(act),
        host="host-1",
        pid=pid,
        version="1",
    )


async def _poll(p: Plane, channel: RpcChannel, **types: list[str]) -> list[pb.Task]:
    reply = await channel.unary(
        p.workers.poll_tasks,
        pb.PollTasksRequest(worker_id=WID, max_tasks=4, wait_s=5, **types),
    )
    return list(reply.tasks)


async def _complete_workflow_task(
    p: Plane, channel: RpcChannel, task: pb.Task, fn: Any, *, max_eager: int = 0
) -> pb.CompleteWorkflowTaskResponse:
    request = p.decide(task, fn, max_eager=max_eager)
    request.worker_id = WID
    return await channel.unary(p.workers.complete_workflow_task, request)


@asynccontextmanager
async def incarnation_stream(
    p: Plane, port: int, worker_id: str = WID, token: str = ""
) -> AsyncIterator[None]:
    """A worker process's own connection to the control plane at ``port``, with its
    cancellation stream open (the control plane follows the connection once the first
    message arrived); the connection is dropped when the block ends, as when the process
    dies. The stream names incarnation ``token`` (as `Worker.run` does), or none, as a worker
    of an older release."""
    async with open_channel("127.0.0.1", port) as channel, trio.open_nursery() as nursery:
        opened = trio.Event()

        async def follow() -> None:
            async for _ in channel.stream(
                p.workers.stream_cancellations,
                pb.StreamCancellationsRequest(worker_id=worker_id, incarnation=token),
            ):
                opened.set()

        nursery.start_soon(follow)
        await opened.wait()
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def _task_row(pool: pg.Pool, task_id: str) -> Any:
    return await pool.fetchrow(
        "SELECT status, claimed_by, lease_token FROM durable_task_queue WHERE id = $1",
        uuid.UUID(task_id),
    )


# ------------------------------------------------------------------ restart, one plane


async def test_a_restarted_workers_old_connection_dropping_releases_what_it_held(
    database_url: str, pool: pg.Pool
) -> None:
    """A worker process holds a task; it hangs (or its host drops off the network), and its
    supervisor starts a new process with the same WORKER_ID, which registers and opens its
    cancellation stream before the old connection is seen to drop. When the old connection
    does drop, the task it held is released at once — as it is for a worker with no
    successor — rather than left claimed, unheartbeated, until the stale rule (30 s)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            async with trio.open_nursery() as outer:
                old_done = trio.Event()
                held: list[pb.Task] = []
                old_ready = trio.Event()

                async def old_incarnation() -> None:
                    async with (
                        open_channel("127.0.0.1", p.port) as old,
                        incarnation_stream(p, p.port),
                    ):
                        await old.unary(
                            p.workers.register_worker, _register(1111, wf=["one"], act=["act"])
                        )
                        await p.start("one", 1, wid="r")
                        (wft,) = await _poll(p, old, workflow_types=["one"])
                        await _complete_workflow_task(p, old, wft, one_call)
                        held.extend(await _poll(p, old, activity_types=["act"]))
                        old_ready.set()
                        await old_done.wait()  # hangs; its connection is still up

                outer.start_soon(old_incarnation)
                await old_ready.wait()
                (task,) = held
                # The new process registers and follows its connection.
                async with incarnation_stream(p, p.port):
                    await p.channel.unary(
                        p.workers.register_worker, _register(2222, wf=["one"], act=["act"])
                    )
                    old_done.set()  # the old connection drops now
                    await trio.sleep(2.0)  # a drop is acted on within milliseconds
                    row = await _task_row(pool, task.task_id)
                    outer.cancel_scope.cancel()
            assert row["status"] != "claimed" or row["lease_token"] != task.lease_token, (
                f"the old incarnation of worker {WID} is gone (its connection dropped 2 s ago) "
                f"but its task {task.task_id} is still {row['status']} by {row['claimed_by']!r} "
                "under the old lease: nothing will heartbeat it, so it waits for the 30 s stale "
                "rule. The drop was ignored because the new incarnation (same worker id) has a "
                "cancellation stream open, and its registration released nothing either"
            )


# ------------------------------------------------------------------ restart, two planes


async def test_a_late_drop_on_one_plane_does_not_release_the_new_incarnations_tasks(
    database_url: str, pool: pg.Pool
) -> None:
    """Two control planes behind a load balancer. The old process of worker W had its
    cancellation stream on plane A; the new process (same WORKER_ID) registers, follows its
    connection and claims a task on plane B. When the old connection on A is finally seen
    to drop, plane A (which sees no other stream of W among its own) marks W lost and
    releases every task claimed by W — the new, healthy process's tasks included: they run
    twice, and its result is refused."""
    with trio.fail_after(40):
        async with plane(database_url) as a, plane(database_url) as b:
            async with trio.open_nursery() as outer:
                old_gone = trio.Event()
                old_ready = trio.Event()

                async def old_incarnation() -> None:
                    async with open_channel("127.0.0.1", a.port) as old:
                        await old.unary(a.workers.register_worker, _register(1111, act=["act"]))
                        async with incarnation_stream(a, a.port):
                            old_ready.set()
                            await old_gone.wait()

                outer.start_soon(old_incarnation)
                await old_ready.wait()
                async with incarnation_stream(b, b.port):
                    await b.channel.unary(
                        b.workers.register_worker, _register(2222, wf=["one"], act=["act"])
                    )
                    await b.start("one", 5, wid="r2")
                    (wft,) = await _poll(b, b.channel, workflow_types=["one"])
                    await _complete_workflow_task(b, b.channel, wft, one_call)
                    (task,) = await _poll(b, b.channel, activity_types=["act"])
                    old_gone.set()  # plane A sees the old connection drop
                    await trio.sleep(2.0)
                    row = await _task_row(pool, task.task_id)
                    status = await pool.fetchval(
                        "SELECT status FROM durable_workers WHERE id = $1", WID
                    )
                    refused: EverrunsError | None = None
                    try:
                        await b.channel.unary(
                            b.workers.complete_activity_task,
                            pb.CompleteActivityTaskRequest(
                                task_id=task.task_id,
                                lease_token=task.lease_token,
                                worker_id=WID,
                                result=json.dumps(10).encode(),
                            ),
                        )
                    except EverrunsError as exc:
                        refused = exc
                    outer.cancel_scope.cancel()
            assert (row["status"], row["lease_token"], status, refused) == (
                "claimed",
                task.lease_token,
                "active",
                None,
            ), (
                f"the new incarnation of worker {WID} holds task {task.task_id} on plane B with "
                "its stream open, yet the late drop of the OLD incarnation's connection on "
                f"plane A left the task {row['status']} (lease {row['lease_token']}, was "
                f"{task.lease_token}), the worker {status}, and the live worker's result "
                f"refused: {refused!r}"
            )


async def test_a_second_stream_of_the_same_incarnation_keeps_its_tasks_when_one_drops(
    database_url: str, pool: pg.Pool
) -> None:
    """The rule the restart fixes keep: a live worker's stream that drops while another
    stream of the same registration is open on the plane (a reconnect) releases nothing;
    the last one's drop releases the task and marks the worker lost."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.channel.unary(
                p.workers.register_worker, _register(1111, wf=["one"], act=["act"])
            )
            async with incarnation_stream(p, p.port):
                async with incarnation_stream(p, p.port):
                    await p.start("one", 1, wid="r5")
                    (wft,) = await _poll(p, p.channel, workflow_types=["one"])
                    await _complete_workflow_task(p, p.channel, wft, one_call)
                    (task,) = await _poll(p, p.channel, activity_types=["act"])
                await trio.sleep(1.0)  # a drop is acted on within milliseconds
                kept = await _task_row(pool, task.task_id)
            with trio.fail_after(5):
                while (await _task_row(pool, task.task_id))["status"] == "claimed":  # noqa: ASYNC110 (a database state)
                    await trio.sleep(0.05)
            status = await pool.fetchval("SELECT status FROM durable_workers WHERE id = $1", WID)
    assert (kept["status"], kept["lease_token"], status) == ("claimed", task.lease_token, "lost")


async def test_a_plane_hands_a_re_registered_worker_only_the_types_it_serves_now(
    database_url: str,
) -> None:
    """Rolling deploy behind a load balancer: worker W registered on plane A serving
    activity charge_v1; restarted with new code (charge_v1 removed), it registers on plane B.
    Plane A remembers the first registration for good, so a workflow-task completion of W
    that lands on A gets charge_v1 handed straight back ("eager") — to a worker that fails it
    at once as non-retryable ("has no activity named 'charge_v1'") instead of leaving it to a
    worker that still serves it."""
    with trio.fail_after(30):
        async with plane(database_url) as a, plane(database_url) as b:
            await a.channel.unary(
                a.workers.register_worker, _register(1111, wf=["old_version"], act=["charge_v1"])
            )
            await b.channel.unary(
                b.workers.register_worker, _register(2222, wf=["old_version"], act=["charge_v2"])
            )
            await b.start("old_version", 1, wid="r3")
            (wft,) = await _poll(b, b.channel, workflow_types=["old_version"])
            reply = await _complete_workflow_task(a, a.channel, wft, old_version, max_eager=1)
            handed = [t.activity_type for t in reply.eager_tasks]
            assert not handed, (
                f"plane A handed worker {WID} {handed} eagerly, though its current registration "
                "(made on plane B) serves only charge_v2: plane A's cache of what a worker "
                "serves (Engine._served) is filled once and never refreshed from another "
                "plane's re-registration; the worker fails the task as non-retryable NotFound"
            )


def _remembering_more(
    monkeypatch: pytest.MonkeyPatch, worker_id: str, activities: set[str], workflows: set[str]
) -> None:
    """Make the control plane remember ``worker_id`` serving more than it does (as a plane
    that missed a re-registration would), so that it hands the worker a task unasked."""
    original = Engine._served_by

    async def served_by(self: Engine, wid: str) -> tuple[frozenset[str], frozenset[str]]:
        acts, wfs = await original(self, wid)
        if wid == worker_id:
            return acts | activities, wfs | workflows
        return acts, wfs

    monkeypatch.setattr(Engine, "_served_by", served_by)


async def test_an_activity_handed_to_a_worker_that_does_not_serve_it_goes_back_uncharged(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a control plane still hand a worker an activity it no longer serves (a stale
    registration), the worker gives it back to the queue, for a worker that serves it: not
    failed as non-retryable NotFound and dead-lettered, and its attempt not charged."""
    reg = Registry()

    @activity(registry=reg)
    async def charge_v2(ctx: ActivityContext, _: Any) -> int:
        return 2

    @workflow(registry=reg, name="old_version")
    async def old_version_wf(ctx: Any, input: Any) -> Any:
        return await ctx.execute_activity("charge_v1", input)

    _remembering_more(monkeypatch, "w-new", {"charge_v1"}, set())
    with trio.fail_after(30):
        async with plane(database_url) as p:
            worker = Worker(reg, address=f"127.0.0.1:{p.port}", worker_id="w-new")
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await p.start("old_version", 7, wid="r5")
                # charge_v1 goes to w-new eagerly and comes back, for "w1", which serves it.
                (task,) = await p.poll(act=["charge_v1"])
                await p.channel.unary(
                    p.workers.complete_activity_task,
                    pb.CompleteActivityTaskRequest(
                        task_id=task.task_id,
                        lease_token=task.lease_token,
                        worker_id="w1",
                        result=json.dumps(10).encode(),
                    ),
                )
                with trio.fail_after(5):
                    await until(
                        pool,
                        "SELECT status = 'completed' FROM durable_workflow_instances"
                        " WHERE workflow_id = 'r5'",
                        what="r5 completed",
                    )
                worker.shutdown()
            letters = await pool.fetchval("SELECT count(*) FROM durable_dead_letter_queue")
            row = await pool.fetchrow(
                "SELECT attempt, max_attempts FROM durable_task_queue WHERE id = $1",
                uuid.UUID(task.task_id),
            )
    assert letters == 0
    # The give-back was not charged: the attempt w1 ran still had the whole budget ahead.
    assert row["max_attempts"] - row["attempt"] == 5 - 1, dict(row)


async def test_a_workflow_task_handed_to_a_worker_that_does_not_serve_it_goes_back(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a workflow task (a follow-up claimed for a worker as its activity's
    result is recorded): the worker gives it back, and the run is not marked stuck."""
    reg = Registry()

    @activity(registry=reg, name="act")
    async def act_fn(ctx: ActivityContext, input: Any) -> Any:
        return input

    _remembering_more(monkeypatch, "w-new", set(), {"one"})
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.channel.unary(
                p.workers.register_worker,
                pb.RegisterWorkerRequest(
                    worker_id="wf-side", max_concurrency=4, workflow_types=["one"]
                ),
            )
            await p.start("one", 3, wid="r6")
            (wft,) = await _poll_as(p, "wf-side", ["one"])
            request = p.decide(wft, one_call)
            request.worker_id = "wf-side"
            await p.channel.unary(p.workers.complete_workflow_task, request)
            worker = Worker(reg, address=f"127.0.0.1:{p.port}", worker_id="w-new")
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                # w-new runs "act"; its result's follow-up workflow task is claimed for it,
                # and it gives that back: wf-side then gets it.
                with trio.fail_after(10):
                    while not (tasks := await _poll_as(p, "wf-side", ["one"])):
                        pass
                (follow_up,) = tasks
                status = await pool.fetchval(
                    "SELECT status FROM durable_workflow_instances WHERE workflow_id = 'r6'"
                )
                gave_back = await pool.fetchval(
                    "SELECT count(*) FROM durable_task_queue WHERE kind = 'workflow'"
                    " AND last_error->>'type' = 'everruns.NotServed'"
                )
                worker.shutdown()
    assert follow_up.workflow_id == "r6"
    assert status == "running", status
    assert gave_back == 1


# ------------------------------------------------------------------ a claim in flight at the drop


async def test_a_claim_in_flight_when_the_connection_drops_is_released_too(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker is killed (kill -9) while its long poll's claim is under way (the statement
    waits for a pooled connection, or simply runs: a busy worker claims all the time). The
    claim is shielded and commits; its reply goes nowhere. `release_worker`, run for the
    dropped connection, looks once, finds nothing yet, and stops; the task claimed a moment
    later stays claimed for the dead worker until the stale rule (30 s) charges its attempt.
    Its own docstring promises to look again until the in-flight calls of the worker are
    done."""
    claim_began = trio.Event()
    original = Store.claim_tasks_for

    async def slow_claim(self: Store, slots: Any, **kw: Any) -> Any:
        if WID in slots:
            claim_began.set()
            await trio.sleep(1.0)  # waits for a connection of the pool, say
        return await original(self, slots, **kw)

    monkeypatch.setattr(Store, "claim_tasks_for", slow_claim)
    with trio.fail_after(30):
        async with plane(database_url) as p:
            # The workflow side is another worker, so the activity goes to the queue.
            await p.channel.unary(
                p.workers.register_worker,
                pb.RegisterWorkerRequest(
                    worker_id="wf-side", max_concurrency=4, workflow_types=["one"]
                ),
            )
            async with trio.open_nursery() as outer:
                ready = trio.Event()
                dead = trio.Event()

                async def doomed_worker() -> None:
                    async with open_channel("127.0.0.1", p.port) as mine:
                        await mine.unary(p.workers.register_worker, _register(1111, act=["act"]))
                        async with trio.open_nursery() as inner:
                            opened = trio.Event()

                            async def follow() -> None:
                                async for _ in mine.stream(
                                    p.workers.stream_cancellations,
                                    pb.StreamCancellationsRequest(worker_id=WID),
                                ):
                                    opened.set()

                            async def long_poll() -> None:
                                await _poll(p, mine, activity_types=["act"])

                            inner.start_soon(follow)
                            await opened.wait()
                            inner.start_soon(long_poll)
                            ready.set()
                            await dead.wait()
                            inner.cancel_scope.cancel()
                    # the process is gone: its connection closed

                outer.start_soon(doomed_worker)
                await ready.wait()
                await trio.sleep(0.3)  # the long poll waits on the control plane
                await p.start("one", 1, wid="r4")
                (wft,) = await _poll_as(p, "wf-side", ["one"])
                request = p.decide(wft, one_call)
                request.worker_id = "wf-side"
                await p.channel.unary(p.workers.complete_workflow_task, request)
                await claim_began.wait()
                dead.set()  # kill -9: the connection drops while the claim is under way
                await trio.sleep(3.0)  # the claim commits 1 s after it began
                rows = await pool.fetch(
                    "SELECT status, claimed_by FROM durable_task_queue WHERE kind = 'activity'"
                )
                outer.cancel_scope.cancel()
            assert [(r["status"], r["claimed_by"]) for r in rows] != [("claimed", WID)], (
                f"worker {WID}'s connection dropped while its poll's claim was under way; the "
                "claim committed after release_worker had looked once (and found nothing) and "
                f"stopped, so the activity stays claimed by the dead worker {WID} until the "
                "stale rule releases it and charges its attempt"
            )


async def _poll_as(p: Plane, worker_id: str, workflow_types: list[str]) -> list[pb.Task]:
    reply = await p.channel.unary(
        p.workers.poll_tasks,
        pb.PollTasksRequest(
            worker_id=worker_id, max_tasks=1, workflow_types=workflow_types, wait_s=5
        ),
    )
    return list(reply.tasks)
