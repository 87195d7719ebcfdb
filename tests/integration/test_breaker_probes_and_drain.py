"""Half-open circuit breakers and their probes (DESIGN §5: "half-open after 30 s with a bounded
number of probes"): a probe that ends without a verdict frees its slot however it ends, and only
a probe's success counts; and a draining worker's release (DESIGN §2). Each docstring says what
went wrong before."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from tests.integration.test_cancelled_calls_and_races import until
from tests.integration.test_engine import Plane, doomed_worker, plane

pytestmark = pytest.mark.db


async def three_deps(ctx: Any, input: Any) -> Any:
    return await ctx.gather(*[ctx.start_activity("dep", i) for i in range(3)])


async def _breaker_due_to_probe(p: Plane, pool: pg.Pool) -> None:
    """Start a run with three "dep" activities and open the "dep" breaker 31 s ago: its next
    claim admits one probe (half_open_max_probes = 1)."""
    await p.start("three")
    await p.drive(three_deps, "three")
    await pool.execute(
        "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at) "
        "VALUES ('dep', 'open', 5, now() - interval '31 seconds')"
    )


async def _half_open_probe(p: Plane, pool: pg.Pool) -> pb.Task:
    """`_breaker_due_to_probe`, then claim the probe."""
    await _breaker_due_to_probe(p, pool)
    (probe,) = await p.poll(act=["dep"], wait=1)
    state = await pool.fetchrow("SELECT state, probes_in_flight FROM durable_circuit_breaker_state")
    assert state is not None and (state["state"], state["probes_in_flight"]) == ("half_open", 1)
    return probe


async def _breaker(pool: pg.Pool) -> tuple[str, int]:
    row = await pool.fetchrow("SELECT state, probes_in_flight FROM durable_circuit_breaker_state")
    assert row is not None
    return row["state"], row["probes_in_flight"]


async def test_a_cancelled_half_open_probe_frees_its_probe_slot(
    database_url: str, pool: pg.Pool
) -> None:
    """A probe that ends cancelled has no verdict; breaker.py says `release_probe` "frees the
    slot of a probe that ended without one (reclaimed, cancelled, ...)". The cancelled report
    (FailActivityTask cancelled=true) never frees it: the breaker stays half-open with its one
    slot taken for ever and no task of the key is handed out again."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            probe = await _half_open_probe(p, pool)
            await p.fail(probe, "cancelled by its workflow", cancelled=True)
            nxt = await p.poll(act=["dep"], wait=1)
            assert len(nxt) == 1, f"no next probe; breaker (state, probes) = {await _breaker(pool)}"


async def test_a_probe_released_by_a_draining_worker_frees_its_probe_slot(
    database_url: str, pool: pg.Pool
) -> None:
    """DESIGN §2: a draining worker releases its unfinished tasks "so another worker picks
    them up at once". A released probe kept its half-open slot, so no task of its key (the
    released one included) could ever be handed out again: the breaker was wedged. Now the
    slot is free and the next probe goes out (the released task is queued behind the others
    of its key)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            probe = await _half_open_probe(p, pool)
            await p.fail(probe, "worker stopped", release=True)
            assert await _breaker(pool) == ("half_open", 0)
            again = await p.poll(act=["dep"], wait=1)
            assert len(again) == 1, (
                f"no probe after a release; breaker (state, probes) = {await _breaker(pool)}"
            )


async def test_a_probe_of_a_lost_worker_frees_its_probe_slot(
    database_url: str, pool: pg.Pool
) -> None:
    """A worker whose connection drops has its tasks released at once (`release_worker`);
    a probe among them keeps its half-open slot for ever (only the 30 s stale reclaimer frees
    one, and a released task is no longer claimed, so it never will)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await _breaker_due_to_probe(p, pool)
            async with doomed_worker(p, activity_types=["dep"]) as doomed_poll:
                (probe,) = await doomed_poll(max_tasks=4, activity_types=["dep"], wait_s=2)
                assert await _breaker(pool) == ("half_open", 1)
            # The doomed worker's connection is gone: its probe is released.
            with trio.fail_after(3):
                await until(
                    pool,
                    "SELECT status <> 'claimed' FROM durable_task_queue WHERE id = $1::uuid",
                    probe.task_id,
                    what="the lost worker's probe released",
                )
            nxt = await p.poll(act=["dep"], wait=1)
            assert len(nxt) == 1, f"no probe after worker loss; breaker = {await _breaker(pool)}"


async def test_a_success_of_a_task_handed_out_before_the_breaker_opened_is_not_a_probe(
    database_url: str, pool: pg.Pool
) -> None:
    """DESIGN §5: "half-open after 30 s with a bounded number of probes". A task claimed while
    the breaker was closed that succeeds while it is half-open is counted as a probe's success
    and frees a probe slot it never held, so a second probe goes out while the first is still
    running: two probes at once with half_open_max_probes = 1 (and two such late successes
    would close the breaker with no probe at all)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("three")
            await p.drive(three_deps, "three")
            tasks = await p.poll(act=["dep"], wait=1)
            assert len(tasks) == 3
            early, rest = tasks[0], tasks[1:]
            for t in rest:  # two go back to the queue, retryable, for the probes
                await p.fail(t, "blip")
            # Meanwhile the breaker opened (failures elsewhere) and its 30 s passed: the early
            # task was claimed before it opened.
            await pool.execute(
                "UPDATE durable_circuit_breaker_state SET state = 'open', failure_count = 5, "
                "opened_at = now() - interval '31 seconds', window_started_at = now()"
            )
            await pool.execute(
                "UPDATE durable_task_queue SET claimed_at = now() - interval '40 seconds' "
                "WHERE id = $1::uuid",
                early.task_id,
            )
            await trio.sleep(1.3)  # the retries' backoff (1 s, ±10 %)
            (probe,) = await p.poll(act=["dep"], wait=2)
            assert await _breaker(pool) == ("half_open", 1)
            await p.complete(early, "ok")  # handed out while closed: not a probe
            state = await _breaker(pool)
            second = [t.task_id for t in await p.poll(act=["dep"], wait=0.5)]
            assert second == [], (
                f"second probe {second} out while {probe.task_id} still runs "
                f"(breaker after the non-probe success: {state})"
            )


async def once(ctx: Any, input: Any) -> Any:
    from everruns.domain.retry import RetryPolicy

    try:
        return await ctx.execute_activity("charge", input, retry=RetryPolicy(max_attempts=1))
    except Exception as exc:
        return {"caught": type(exc).__name__, "message": str(exc)}


async def test_a_task_released_by_a_draining_worker_goes_to_another_worker_not_to_the_dlq(
    database_url: str, pool: pg.Pool
) -> None:
    """DESIGN §2: "Worker shutdown = stop claiming, let running tasks finish within a grace
    period, then cancel them and report them as failed-retryable so another worker picks them
    up at once." An activity on its last attempt (here max_attempts = 1, e.g. a payment) that
    a draining worker releases is dead-lettered instead, and its workflow sees it fail with
    everruns.WorkerShutdown: a planned, graceful drain failed user work for good. Now the task
    gets one attempt more for the one the drain interrupted."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            wid = await p.start("once", 7)
            await p.drive(once, "once")
            (task,) = await p.poll(act=["charge"])
            await p.channel.unary(
                p.workers.fail_activity_task,
                pb.FailActivityTaskRequest(
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    worker_id="w1",
                    error=b'{"type": "everruns.WorkerShutdown", "message": "worker stopped"}',
                    release=True,
                ),
            )
            status = await pool.fetchval(
                "SELECT status FROM durable_task_queue WHERE id = $1::uuid", task.task_id
            )
            letters = await pool.fetchval("SELECT count(*) FROM durable_dead_letter_queue")
            assert (status, letters) == ("pending", 0), (
                f"released task is {status!r}, {letters} dead letter(s); "
                f"history {await p.history_types(wid)}"
            )
            again = await p.poll(act=["charge"], wait=1)
            assert [t.task_id for t in again] == [task.task_id]
            assert (again[0].attempt, again[0].max_attempts) == (2, 2), "the attempt was charged"
