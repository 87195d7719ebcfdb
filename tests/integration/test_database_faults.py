"""Database faults in the middle of operations: connections terminated by PostgreSQL, commits
whose outcome is unknown (the statement committed, its answer lost), LISTEN lost at a bad
moment. From a review (session 17); each test failed on the code before its fix: a LISTEN
registration that died crashed the control plane; claims, a result's follow-up workflow task
and an eager start's first workflow task were left claimed for a worker that never heard of
them, until the 30 s stale rule charged their attempt."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import trio

from everruns._aio import pg
from everruns._aio.loop import run_aio
from everruns._proto.everruns import v1 as pb
from everruns.errors import ServerUnavailable
from everruns.store.queries import QUERIES as Q
from tests.integration.test_engine import plane

pytestmark = pytest.mark.db


# --------------------------------------------------------------------------- LISTEN


async def test_listen_connection_lost_while_it_registers_does_not_kill_the_control_plane(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LISTEN connection is lost; while the notifier reconnects, PostgreSQL ends the new
    connection between its connect and its LISTEN (a restart in progress, an operator's
    pg_terminate_backend). The notifier must retry, as it does for a failed connect; the
    control plane must keep serving."""
    real_add_listener = asyncpg.connection.Connection.add_listener
    armed = {"on": False, "hit": 0}

    async def add_listener(self: Any, channel: str, callback: Any) -> None:
        if armed["on"]:
            armed["on"] = False
            armed["hit"] += 1
            admin = await asyncpg.connect(database_url)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", self.get_server_pid())
            finally:
                await admin.close()
            for _ in range(100):
                if self.is_closed():
                    break
                await asyncio.sleep(0.01)
        await real_add_listener(self, channel, callback)

    monkeypatch.setattr(asyncpg.connection.Connection, "add_listener", add_listener)
    with trio.fail_after(25):
        async with plane(database_url) as a:
            await a.register(workflow_types=["x"])
            armed["on"] = True
            killed = await pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
            )
            assert killed >= 1
            for _ in range(200):
                if armed["hit"]:
                    break
                await trio.sleep(0.02)
            assert armed["hit"] == 1
            await trio.sleep(1.0)  # the notifier's retry (0.1 s → ...) has had its chance
            # The control plane still serves, and LISTEN is back: a poll is woken by a start.
            got: list[Any] = []

            async def poll() -> None:
                got.extend(await a.poll(wf=["x"], wait=8))

            async with trio.open_nursery() as n:
                n.start_soon(poll)
                await trio.sleep(0.3)
                await a.start("x", wid="after-listen-fault")
            assert [t.workflow_id for t in got] == ["after-listen-fault"]


# --------------------------------------------------------------------------- helpers


def kill_connection_before(monkeypatch: pytest.MonkeyPatch, query: str) -> dict[str, int]:
    """Arm a fault: the next time the control plane runs ``query`` (by its text), PostgreSQL
    ends that connection's backend just before the statement is sent (what a restart, a
    failover or an operator's pg_terminate_backend does between two statements). Returns a
    counter of the faults injected; set ``armed`` to the number of faults wanted."""
    state = {"armed": 1, "hit": 0}

    def wrap(name: str) -> None:
        real = getattr(pg.Connection, name)

        async def method(self: pg.Connection, q: str, *args: Any) -> Any:
            if q == query and state["armed"] > 0:
                state["armed"] -= 1
                state["hit"] += 1
                raw = self._raw
                try:
                    await run_aio(raw.execute, "SELECT pg_terminate_backend(pg_backend_pid())")
                except Exception:
                    pass  # the connection ended under its own statement, as meant
            return await real(self, q, *args)

        monkeypatch.setattr(pg.Connection, name, method)

    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        wrap(name)
    return state


def lose_reply_of(monkeypatch: pytest.MonkeyPatch, query: str) -> dict[str, int]:
    """Arm a fault: the next time the control plane runs ``query`` (a statement that is its
    own transaction), the statement runs and commits, and then the connection dies before its
    answer is read (a commit whose outcome the control plane cannot know)."""
    state = {"armed": 1, "hit": 0}

    def wrap(name: str) -> None:
        real = getattr(pg.Connection, name)

        async def method(self: pg.Connection, q: str, *args: Any) -> Any:
            if q != query or state["armed"] <= 0:
                return await real(self, q, *args)
            state["armed"] -= 1
            state["hit"] += 1
            assert not self._raw.is_in_transaction()  # autocommit: it has committed
            await real(self, q, *args)
            try:
                await run_aio(self._raw.execute, "SELECT pg_terminate_backend(pg_backend_pid())")
            except Exception:
                pass
            # What the caller sees of a reply lost with its connection.
            return await real(self, "SELECT 1")

        monkeypatch.setattr(pg.Connection, name, method)

    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        wrap(name)
    return state


async def one_act(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity("act", input)


# --------------------------------------------------------------------------- claims


async def test_a_claim_whose_hand_out_fails_gives_its_tasks_back(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a circuit breaker is open (any key), a poll claims with `claim_tasks` and then
    marks the runs running and reads their histories with `start_runs`, a second statement.
    If the database fails between the two, the poll fails UNAVAILABLE but its workflow task
    stays claimed for the worker, which never heard of it: the run is stuck until stale
    reclamation (30 s) and the attempt is charged. Tasks claimed for a call that fails must
    go back to the queue, as `complete_activities` and a cancelled poll do."""
    with trio.fail_after(25):
        async with plane(database_url) as a:
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, opened_at)"
                " VALUES ('elsewhere', 'open', now())"
            )
            await a.register(workflow_types=["x"], activity_types=["act"])
            await a.start("x", wid="wf")
            fault = kill_connection_before(monkeypatch, Q["start_runs"])
            with pytest.raises(ServerUnavailable):
                await a.poll(wf=["x"], act=["act"], wait=1)
            assert fault["hit"] == 1
            # The worker polls again, at once: the run's task must be there for it.
            got = await a.poll(wf=["x"], act=["act"], wait=3)
            row = await pool.fetchrow(
                "SELECT status, claimed_by, attempt FROM durable_task_queue"
                " WHERE workflow_id = 'wf' AND kind = 'workflow'"
            )
            assert [t.workflow_id for t in got] == ["wf"], dict(row or {})


# --------------------------------------------------------------------------- results


async def test_a_result_whose_reply_was_lost_does_not_strand_the_next_workflow_task(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CompleteActivityTasks records the result and, in the same statement, claims the run's
    next workflow task for the reporting worker (eager dispatch). The statement commits and
    the connection dies before its answer is read: the worker gets UNAVAILABLE and retries,
    as it must. The retry is refused as stale, and the workflow task claimed for the worker
    is in neither reply: the run waits for stale reclamation (30 s) with an attempt charged.
    `complete_workflow_tasks` hands a lost reply's claims to the retry
    (`_handed_out_before`); a result's retry must too, or the task must go back to the
    queue."""
    with trio.fail_after(25):
        async with plane(database_url) as a:
            task = await a.first_workflow_task("x", "act")
            reply = await a.channel.unary(
                a.workers.complete_workflow_task, a.decide(task, one_act, max_eager=1)
            )
            (activity,) = reply.eager_tasks
            request = pb.CompleteActivityTasksRequest(
                worker_id="w1",
                results=[
                    pb.ActivityResult(
                        task_id=activity.task_id, lease_token=activity.lease_token, result=b"7"
                    )
                ],
                max_new_tasks=1,
            )
            fault = lose_reply_of(monkeypatch, Q["complete_activities"])
            with pytest.raises(ServerUnavailable):
                await a.channel.unary(a.workers.complete_activity_tasks, request)
            assert fault["hit"] == 1
            again = await a.channel.unary(a.workers.complete_activity_tasks, request)
            handed = [t.workflow_id for t in again.new_tasks if t.kind == "workflow"]
            if not handed:  # not in the reply: then it must be in the queue for a poll
                handed = [t.workflow_id for t in await a.poll(wf=["x"], act=["act"], wait=3)]
            row = await pool.fetchrow(
                "SELECT status, claimed_by, attempt FROM durable_task_queue"
                " WHERE workflow_id = 'w' AND kind = 'workflow' AND status <> 'completed'"
            )
            assert handed == ["w"], (again.outcomes, dict(row or {}))


# --------------------------------------------------------------------------- starts


async def test_an_eager_start_whose_reply_was_lost_does_not_strand_the_first_workflow_task(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start while a worker's poll waits is the eager start: one statement starts the run
    with its workflow task claimed for that worker. It commits, the connection dies before
    the answer is read: the client gets UNAVAILABLE and retries with the same idempotency
    key, as `Client.start_workflow` does. The retry finds the run (created False), but its
    first workflow task stays claimed for a worker that was never told: the waiting poll and
    every later one get nothing until stale reclamation, with the attempt charged."""
    with trio.fail_after(25):
        async with plane(database_url) as a:
            await a.register(workflow_types=["x"])
            got: list[Any] = []

            async def poll() -> None:
                got.extend(await a.poll(wf=["x"], wait=5))

            request = pb.StartWorkflowRequest(
                workflow_type="x", input=b"1", workflow_id="w", request_id="key-1"
            )
            async with trio.open_nursery() as n:
                n.start_soon(poll)
                await trio.sleep(0.3)  # the poll waits: the start goes the eager way
                fault = lose_reply_of(monkeypatch, Q["start_workflow_for"])
                with pytest.raises(ServerUnavailable):
                    await a.channel.unary(a.workflows.start_workflow, request)
                assert fault["hit"] == 1
                again = await a.channel.unary(a.workflows.start_workflow, request)
                assert again.workflow_id == "w" and not again.created
            if not got:
                got.extend(await a.poll(wf=["x"], wait=3))
            row = await pool.fetchrow(
                "SELECT status, claimed_by, attempt FROM durable_task_queue"
                " WHERE workflow_id = 'w' AND kind = 'workflow'"
            )
            assert [t.workflow_id for t in got] == ["w"], dict(row or {})
