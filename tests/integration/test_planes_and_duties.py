"""The control plane under concurrency and its duties: several control planes on one
database, the notifier, backpressure, timers, retention, requeues, claim priority. From a
review (session 17): four tests failed on the code before (the queue limit under concurrent
starts and for an idempotent start, retention of a child whose parent is open, retention on
one control plane at a time); the others prove guarantees that held."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.domain.retry import RetryPolicy
from everruns.errors import NotFound, ResourceExhausted
from everruns.store.store import Store
from tests.e2e.harness import wait_until
from tests.integration.test_engine import Plane, plane

pytestmark = pytest.mark.db


@asynccontextmanager
async def three_planes(database_url: str) -> AsyncIterator[tuple[Plane, Plane, Plane]]:
    """Three control planes on one database."""
    async with plane(database_url) as a, plane(database_url) as b, plane(database_url) as c:
        yield a, b, c


async def sleeper(ctx: Any, input: Any) -> Any:
    await ctx.sleep(input)
    return "woke"


async def child_wf(ctx: Any, input: Any) -> Any:
    return {"child": input}


async def parent_wf(ctx: Any, input: Any) -> Any:
    got = await ctx.execute_child_workflow("childwf", 7, workflow_id="the-child")
    await ctx.sleep(3600)
    return got


# --------------------------------------------------------------------------- wake-ups


async def test_a_poll_on_plane_a_is_woken_by_a_start_on_plane_b(database_url: str) -> None:
    with trio.fail_after(20):
        async with plane(database_url) as a, plane(database_url) as b:
            await a.register(workflow_types=["x"])
            got: list[pb.Task] = []
            took = 0.0

            async def poll() -> None:
                nonlocal took
                began = trio.current_time()
                got.extend(await a.poll(wf=["x"], wait=8))
                took = trio.current_time() - began

            async with trio.open_nursery() as n:
                n.start_soon(poll)
                await trio.sleep(0.5)  # the poll waits on plane A
                await b.start("x", wid="from-b")
            assert [t.workflow_id for t in got] == ["from-b"]
            assert took < 1.5, took


async def test_lost_listen_connection_comes_back_and_wakes_polls(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(25):
        async with plane(database_url) as a, plane(database_url) as b:
            await a.register(workflow_types=["x"])
            for round_ in range(2):
                # Kill every LISTEN connection (both planes' listeners).
                killed = await pool.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
                )
                assert killed >= 1
                got: list[pb.Task] = []
                took = 0.0

                async def poll(got: list[pb.Task] = got) -> None:
                    nonlocal took
                    began = trio.current_time()
                    got.extend(await a.poll(wf=["x"], wait=8))
                    took = trio.current_time() - began

                async with trio.open_nursery() as n:
                    n.start_soon(poll)
                    await trio.sleep(0.3)
                    await b.start("x", wid=f"after-drop-{round_}")
                assert [t.workflow_id for t in got] == [f"after-drop-{round_}"]
                assert took < 2.5, took


# --------------------------------------------------------------------------- timers


async def test_timers_fire_exactly_once_and_on_time_across_three_planes(
    database_url: str, pool: pg.Pool
) -> None:
    n_runs = 30
    with trio.fail_after(30):
        async with three_planes(database_url) as (a, b, c):
            await a.register(workflow_types=["sleeper"])
            for i in range(n_runs):
                await (a, b, c)[i % 3].start("sleeper", 1.0, wid=f"s{i}")
            done = 0
            while done < n_runs:
                for task in await a.poll(wf=["sleeper"], wait=2):
                    await a.run_workflow_task(task, sleeper)
                    done += 1

            async def all_fired() -> bool:
                n = await pool.fetchval(
                    "SELECT count(*) FROM durable_workflow_events WHERE event_type = 'timer_fired'"
                )
                return bool(n >= n_runs)

            await wait_until(all_fired, timeout=5, what="every timer fired")
            await trio.sleep(1.0)  # any double firing would show by now
            rows = await pool.fetch(
                "SELECT run_id, count(*) AS n FROM durable_workflow_events"
                " WHERE event_type = 'timer_fired' GROUP BY run_id"
            )
            assert len(rows) == n_runs and all(r["n"] == 1 for r in rows)
            late = await pool.fetchval(
                "SELECT max(extract(epoch FROM e.created_at - t.fire_at)) FROM durable_timers t"
                " JOIN durable_workflow_events e ON e.run_id = t.run_id"
                " AND e.event_type = 'timer_fired'"
            )
            assert late < 0.5, late


# --------------------------------------------------------------------------- backpressure


async def test_max_pending_tasks_holds_under_concurrent_starts(
    database_url: str, pool: pg.Pool
) -> None:
    """EVERRUNS_MAX_PENDING_TASKS=5: starts beyond five waiting tasks get RESOURCE_EXHAUSTED.
    Twenty starts arriving together (over two control planes) must not leave twenty waiting."""
    with trio.fail_after(20):
        async with (
            plane(database_url, max_pending_tasks=5) as a,
            plane(database_url, max_pending_tasks=5) as b,
        ):
            refused = 0

            async def start(p: Plane, i: int) -> None:
                nonlocal refused
                try:
                    await p.start("bp", i, wid=f"bp-{i}")
                except ResourceExhausted:
                    refused += 1

            async with trio.open_nursery() as n:
                for i in range(20):
                    n.start_soon(start, (a, b)[i % 2], i)
            pending = await pool.fetchval(
                "SELECT count(*) FROM durable_task_queue WHERE status = 'pending'"
            )
            assert pending <= 5, f"{pending} tasks waiting with a limit of 5 ({refused} refused)"


# --------------------------------------------------------------------------- retention


async def test_retention_keeps_an_ended_child_while_its_parent_is_open(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(25):
        async with plane(database_url) as p:
            await p.register(workflow_types=["parentwf", "childwf"])
            await p.start("parentwf", wid="the-parent")
            await p.drive(parent_wf, "parentwf")  # starts the child
            await p.drive(child_wf, "childwf")  # the child completes
            await p.drive(parent_wf, "parentwf")  # the parent sleeps an hour
            assert (await p.describe("the-child")).status == "completed"
            assert (await p.describe("the-parent")).status == "running"
        # The child ended eight days ago; its parent is still open (sleeping).
        await pool.execute(
            "UPDATE durable_workflow_instances SET completed_at = now() - interval '8 days'"
            " WHERE workflow_id = 'the-child'"
        )
        async with plane(database_url, retention_interval=1.0) as p:
            await trio.sleep(1.5)  # retention's first round runs at start
            assert (await p.describe("the-parent")).status == "running"
            # the parent's history names its child; the child must still be there to inspect
            try:
                child = await p.describe("the-child")
            except NotFound:
                pytest.fail("retention deleted a child run whose parent is still open")
            assert child.status == "completed"


async def test_retention_runs_on_one_control_plane_at_a_time(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/operations.md: retention runs "in batches, by one control plane at a time" (its
    round takes an advisory lock). Two planes whose rounds overlap must not both delete.
    Before, the lock was taken by a transaction that committed at once, releasing it: every
    plane then deleted. Now each batch runs under the lock."""
    in_flight = 0
    most = 0
    original = Store.delete_expired_runs

    async def slow_batch(self: Store, conn: Any, *, older_than: float, limit: int) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await trio.sleep(1.0)  # a long batch: a big backlog of expired runs
            return await original(self, conn, older_than=older_than, limit=limit)
        finally:
            in_flight -= 1

    monkeypatch.setattr(Store, "delete_expired_runs", slow_batch)
    with trio.fail_after(20):
        async with (
            plane(database_url, retention_interval=1.0),
            plane(database_url, retention_interval=1.0),
        ):
            await trio.sleep(3.0)
    assert most == 1, f"{most} control planes ran retention at once"


# --------------------------------------------------------------------------- requeues


async def caught_failure(ctx: Any, input: Any) -> Any:
    try:
        return await ctx.execute_activity("flaky", input, retry=RetryPolicy(max_attempts=1))
    except Exception as exc:
        return {"caught": type(exc).__name__}


async def test_runbook_requeue_is_applied_once_across_three_planes(
    database_url: str, pool: pg.Pool
) -> None:
    with trio.fail_after(25):
        async with three_planes(database_url) as (a, b, c):
            for i in range(4):
                await a.start("caught", i, wid=f"c{i}")
            decided = 0
            while decided < 4:
                for t in await a.poll(wf=["caught"]):
                    await a.run_workflow_task(t, caught_failure)
                    decided += 1
            tasks: list[pb.Task] = []
            while len(tasks) < 4:
                tasks += await a.poll(act=["flaky"])
            for t in tasks:
                await a.fail(t, "disk full")
            await pool.execute("UPDATE durable_dead_letter_queue SET requeued_at = NOW()")

            async def all_back() -> bool:
                n = await pool.fetchval(
                    "SELECT count(*) FROM durable_task_queue"
                    " WHERE kind = 'activity' AND status = 'pending'"
                )
                return bool(n == 4)

            await wait_until(all_back, timeout=3, what="every requeued task is back")
            await trio.sleep(0.5)
            counts = await pool.fetch(
                "SELECT requeue_count FROM durable_task_queue WHERE kind = 'activity'"
            )
            assert [r["requeue_count"] for r in counts] == [1] * 4
            again = await b.poll(act=["flaky"], wait=2)
            assert len(again) == 4 and all(t.attempt == 1 for t in again)
            del c


# --------------------------------------------------------------------------- priority


async def prioritised(ctx: Any, input: Any) -> Any:
    handles = [ctx.start_activity("prio", p, priority=p) for p in (0, 5, 1, 10, 3)]
    return await ctx.gather(*handles)


async def _poll_as(
    p: Plane, worker: str, *, wf: list[str] = (), act: list[str] = (), n: int = 10, wait: float = 5
) -> list[pb.Task]:  # type: ignore[assignment]
    reply = await p.channel.unary(
        p.workers.poll_tasks,
        pb.PollTasksRequest(
            worker_id=worker,
            max_tasks=n,
            workflow_types=list(wf),
            activity_types=list(act),
            wait_s=wait,
        ),
    )
    return list(reply.tasks)


async def test_claims_follow_priority_on_both_claim_paths(database_url: str, pool: pg.Pool) -> None:
    with trio.fail_after(20):
        async with plane(database_url) as p:
            await p.start("prio-wf", wid="prio")
            await p.drive(prioritised, "prio-wf")
            got = [json.loads((await _poll_as(p, "w1", act=["prio"], n=1))[0].input)]
            got.append(json.loads((await _poll_as(p, "w1", act=["prio"], n=1))[0].input))
            # an unrelated open breaker: claims take the careful path
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at)"
                " VALUES ('elsewhere', 'open', 5, now())"
            )
            await trio.sleep(1.1)  # the plane's cached "no breaker open" lapses
            for _ in range(3):
                got.append(json.loads((await _poll_as(p, "w1", act=["prio"], n=1))[0].input))
            assert got == [10, 5, 3, 1, 0]


# --------------------------------------------------------------------------- many pollers


async def test_many_pollers_on_plane_a_all_get_a_batch_started_on_plane_b(
    database_url: str,
) -> None:
    n = 8
    with trio.fail_after(20):
        async with plane(database_url) as a, plane(database_url) as b:
            results: dict[str, tuple[int, float]] = {}

            async def poller(i: int) -> None:
                began = trio.current_time()
                tasks = await _poll_as(a, f"w{i}", wf=["fan"], n=1, wait=8)
                results[f"w{i}"] = (len(tasks), trio.current_time() - began)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(poller, i)
                await trio.sleep(0.5)
                began = trio.current_time()
                await b.channel.unary(
                    b.workflows.start_workflows,
                    pb.StartWorkflowsRequest(
                        requests=[
                            pb.StartWorkflowRequest(workflow_type="fan", input=b"1")
                            for _ in range(n)
                        ]
                    ),
                )
                started_after = trio.current_time() - began
            assert all(c == 1 for c, _ in results.values()), results
            slow = {w: t for w, (_, t) in results.items() if t > 0.5 + started_after + 1.0}
            assert not slow, results


async def test_single_starts_on_two_planes_reach_pollers_on_both(database_url: str) -> None:
    n = 6
    with trio.fail_after(20):
        async with plane(database_url) as a, plane(database_url) as b:
            got: Counter[str] = Counter()
            took: list[float] = []

            async def poller(p: Plane, i: int) -> None:
                began = trio.current_time()
                tasks = await _poll_as(p, f"w{i}", wf=["single"], n=1, wait=8)
                got[f"w{i}"] += len(tasks)
                took.append(trio.current_time() - began)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(poller, (a, b)[i % 2], i)
                await trio.sleep(0.5)
                async with trio.open_nursery() as starts:
                    for i in range(n):
                        starts.start_soon((b, a)[i % 2].start, "single", i, f"single-{i}")
            assert sum(got.values()) == n and all(v == 1 for v in got.values()), got
            assert max(took) < 2.0, took


# --------------------------------------------------------------------------- timeouts


async def unstarted(ctx: Any, input: Any) -> Any:
    try:
        return await ctx.execute_activity(
            "nobody",
            input,
            retry=RetryPolicy(max_attempts=3, initial_interval=0.05, maximum_interval=0.05),
            schedule_to_start_timeout=0.3,
        )
    except Exception as exc:
        return {"caught": type(exc).__name__}


async def test_schedule_to_start_timeouts_are_enforced_once_across_three_planes(
    database_url: str, pool: pg.Pool
) -> None:
    runs = 6
    with trio.fail_after(30):
        async with three_planes(database_url) as (a, b, c):
            for i in range(runs):
                await (a, b, c)[i % 3].start("unstarted", i, wid=f"u{i}")
            decided = 0
            while decided < runs:
                for t in await a.poll(wf=["unstarted"], wait=2):
                    await a.run_workflow_task(t, unstarted)
                    decided += 1

            async def all_dead() -> bool:
                n = await pool.fetchval(
                    "SELECT count(*) FROM durable_task_queue WHERE kind = 'activity'"
                    " AND status = 'dead'"
                )
                return bool(n == runs)

            await wait_until(all_dead, timeout=10, what="every task is dead")
            await trio.sleep(0.5)
            rows = await pool.fetch(
                "SELECT run_id, payload::jsonb->>'attempt' AS attempt, count(*) AS n"
                " FROM durable_workflow_events WHERE event_type = 'activity_timed_out'"
                " GROUP BY 1, 2"
            )
            assert len(rows) == runs * 3 and all(r["n"] == 1 for r in rows), rows
            assert await pool.fetchval("SELECT count(*) FROM durable_dead_letter_queue") == runs


async def test_an_idempotent_start_of_an_open_run_is_not_shed_when_the_queue_is_full(
    database_url: str,
) -> None:
    """Starting a workflow id whose run is open returns that run and adds nothing to the
    queue, so a full queue is no reason to refuse it (a client retrying a start whose reply it
    lost must learn its run, not be told to back off forever while the backlog lasts)."""
    with trio.fail_after(20):
        async with plane(database_url, max_pending_tasks=2) as p:
            await p.start("bp", 1, wid="order-1")
            await p.start("bp", 2, wid="order-2")
            with pytest.raises(ResourceExhausted):
                await p.start("bp", 3, wid="order-3")  # a new run: shed, as documented
            reply = await p.channel.unary(
                p.workflows.start_workflow,
                pb.StartWorkflowRequest(workflow_type="bp", input=b"1", workflow_id="order-1"),
            )
            assert reply.workflow_id == "order-1" and not reply.created
