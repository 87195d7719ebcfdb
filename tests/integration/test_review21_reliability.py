"""Review 21, reliability semantics: retries, timeouts, dead letters, circuit breakers and
backpressure, each test naming the contract it holds the engine to. Every test here failed on
the code it was written against."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.errors import ResourceExhausted
from tests.integration.test_cancelled_calls_and_races import until
from tests.integration.test_engine import plane

pytestmark = pytest.mark.db


async def three_deps(ctx: Any, input: Any) -> Any:
    return await ctx.gather(*[ctx.start_activity("dep", i) for i in range(3)])


async def _breaker(pool: pg.Pool) -> tuple[str, int]:
    row = await pool.fetchrow("SELECT state, probes_in_flight FROM durable_circuit_breaker_state")
    assert row is not None
    return row["state"], row["probes_in_flight"]


async def test_a_late_failure_of_a_task_handed_out_before_the_breaker_opened_does_not_reopen_it(
    database_url: str, pool: pg.Pool
) -> None:
    """Defect: a failure of a task claimed while the breaker was still closed (so not a probe)
    that arrives while the breaker is half-open re-opens it, wipes the real probe's slot and
    makes that probe's verdict worthless (its success no longer counts: it was claimed before
    the new `opened_at`). breaker.py: results of tasks handed out before the breaker opened
    "move nothing", "half_open --(any failure)--> open" is "the probe failed", and the
    success path already counts only a probe's verdict (queries.sql complete_activities: "A
    success counts for a half-open breaker only from its probe (claimed since it opened)").
    With every hung call of an outage timing out after the breaker went half-open, the
    breaker re-opens again and again without a single probe having failed.

    Expected: the breaker stays half-open with its one probe in flight."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("three")
            await p.drive(three_deps, "three")
            tasks = await p.poll(act=["dep"], wait=1)
            assert len(tasks) == 3
            early, rest = tasks[0], tasks[1:]
            for t in rest:  # back to the queue, retryable, for the probe
                await p.fail(t, "blip")
            # Meanwhile the breaker opened and its 30 s passed: `early` was claimed before.
            await pool.execute(
                "UPDATE durable_circuit_breaker_state SET state = 'open', failure_count = 5, "
                "success_count = 0, probes_in_flight = 0, recent_failures = '{}', "
                "opened_at = now() - interval '31 seconds', window_started_at = now()"
            )
            await pool.execute(
                "UPDATE durable_task_queue SET claimed_at = now() - interval '40 seconds' "
                "WHERE id = $1::uuid",
                early.task_id,
            )
            await trio.sleep(1.3)  # the retries' backoff (1 s, ±10 %)
            (_probe,) = await p.poll(act=["dep"], wait=2)
            assert await _breaker(pool) == ("half_open", 1)
            await p.fail(early, "late failure of a call made before the outage")  # not a probe
            assert await _breaker(pool) == ("half_open", 1), (
                f"a non-probe's failure moved the half-open breaker: {await _breaker(pool)}"
            )


async def test_backpressure_counts_one_new_run_for_a_workflow_id_started_twice_in_a_batch(
    database_url: str, pool: pg.Pool
) -> None:
    """Defect: EVERRUNS_MAX_PENDING_TASKS counts every start of a batch that names a new
    workflow id, even when the batch names that id twice (the second start returns the first's
    run: "idempotent per open id even within one batch"). A batch that adds ONE task is refused
    with RESOURCE_EXHAUSTED although one slot is free. engine.py `_within_capacity`: "Only the
    starts that would add a run count"; DESIGN §5: the server sheds load, it does not refuse
    work that fits.

    Expected: with a limit of 1 and an empty queue, the batch starts its one run."""
    with trio.fail_after(30):
        async with plane(database_url, max_pending_tasks=1) as p:
            reply = await p.channel.unary(
                p.workflows.start_workflows,
                pb.StartWorkflowsRequest(
                    requests=[
                        pb.StartWorkflowRequest(workflow_type="t", workflow_id="twice", input=b"1"),
                        pb.StartWorkflowRequest(workflow_type="t", workflow_id="twice", input=b"2"),
                    ]
                ),
            )
            got = [(r.workflow_id, r.created) for r in reply.responses]
            assert got == [("twice", True), ("twice", False)]
            assert await pool.fetchval("SELECT count(*) FROM durable_task_queue") == 1


async def charge_once(ctx: Any, input: Any) -> Any:
    from everruns.domain.retry import RetryPolicy

    return await ctx.execute_activity("charge", input, retry=RetryPolicy(max_attempts=1))


async def test_a_cancelled_activity_whose_holder_goes_silent_on_its_last_attempt_is_cancelled(
    database_url: str, pool: pg.Pool
) -> None:
    """Defect: the workflow asked to cancel a running activity (CancelWorkflow flags its task),
    then the holder went silent. On any attempt but the last, the stale rule closes the task
    `cancelled` and records `activity_cancelled` (queries.sql release_task: "a task whose
    cancellation was requested is cancelled"; engine.py `_attempt_end`: "so that the workflow
    sees ActivityCancelled"). On the LAST attempt (here max_attempts = 1) `Store.release_task`
    tests the attempt budget first and dead-letters it: a dead letter for work the workflow
    cancelled (a requeue then clears `cancel_requested_at` and runs it again), and the
    workflow sees `activity_timed_out` (ActivityError) instead of ActivityCancelled.

    Expected: the task ends `cancelled`, no dead letter, and the history records
    `activity_cancelled`."""
    with trio.fail_after(30):
        async with plane(database_url, stale_after=0.5, reclaim_interval=0.2) as p:
            wid = await p.start("once", 7)
            await p.drive(charge_once, "once")
            (task,) = await p.poll(act=["charge"])
            await p.channel.unary(
                p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid)
            )
            flagged = await pool.fetchval(
                "SELECT cancel_requested_at IS NOT NULL FROM durable_task_queue WHERE id = $1::uuid",
                task.task_id,
            )
            assert flagged
            # Never heartbeat: the stale rule (0.5 s) ends the attempt.
            with trio.fail_after(10):
                await until(
                    pool,
                    "SELECT status <> 'claimed' FROM durable_task_queue WHERE id = $1::uuid",
                    task.task_id,
                    what="the silent holder's attempt ended",
                )
            status = await pool.fetchval(
                "SELECT status FROM durable_task_queue WHERE id = $1::uuid", task.task_id
            )
            letters = await pool.fetchval("SELECT count(*) FROM durable_dead_letter_queue")
            history = await p.history_types(wid)
            assert (status, letters) == ("cancelled", 0), (
                f"cancelled activity ended {status!r} with {letters} dead letter(s); "
                f"history {history}"
            )
            assert "activity_cancelled" in history, history


async def quick(ctx: Any, input: Any) -> Any:
    return input


async def test_backpressure_is_not_bypassed_by_a_request_id_naming_an_ended_run_of_an_open_id(
    database_url: str, pool: pg.Pool
) -> None:
    """Defect: `count_new_runs` (queries.sql) subtracts a start twice when its workflow id has
    an open run AND its request id names an earlier, ended run of that id (a client's retry
    of an old start): once for the open id, once for the ended run. The other starts of the
    batch are then not counted, and EVERRUNS_MAX_PENDING_TASKS lets new runs in past the
    limit (here: nothing is counted, so the check is skipped). engine.py `_within_capacity`:
    "Refuse starts that would take the queue past EVERRUNS_MAX_PENDING_TASKS"; DESIGN §5: the
    server sheds load with RESOURCE_EXHAUSTED.

    Expected: with a limit of 1 and one task waiting, a batch that adds a new run is refused."""
    with trio.fail_after(30):
        async with plane(database_url, max_pending_tasks=1) as p:
            start = pb.StartWorkflowRequest(
                workflow_type="quick", workflow_id="w", input=b"1", request_id="req-old"
            )
            await p.channel.unary(p.workflows.start_workflow, start)
            await p.drive(quick, "quick")
            assert (await p.describe("w")).status == "completed"
            await p.channel.unary(
                p.workflows.start_workflow,
                pb.StartWorkflowRequest(
                    workflow_type="quick", workflow_id="w", input=b"2", request_id="req-new"
                ),
            )
            assert (
                await pool.fetchval(
                    "SELECT count(*) FROM durable_task_queue WHERE status = 'pending'"
                )
                == 1
            )
            refused = False
            try:
                await p.channel.unary(
                    p.workflows.start_workflows,
                    pb.StartWorkflowsRequest(
                        requests=[
                            start,  # the old start retried: returns the ended run, adds nothing
                            pb.StartWorkflowRequest(
                                workflow_type="quick",
                                workflow_id="x",
                                input=b"3",
                                request_id="req-x",
                            ),
                        ]
                    ),
                )
            except ResourceExhausted:
                refused = True
            pending = await pool.fetchval(
                "SELECT count(*) FROM durable_task_queue WHERE status = 'pending'"
            )
            assert refused, f"limit 1 bypassed: {pending} tasks pending"


async def test_a_requeued_dead_letter_gets_its_policys_attempts_not_a_drains_extra_one(
    database_url: str, pool: pg.Pool
) -> None:
    """Defect: a draining worker's release gives the task one attempt more
    (`max_attempts + 1`, queries.sql release_task) to make up for the interrupted one. When
    the task later dies and an operator requeues it, `revive_task` resets `attempt` to 0 but
    keeps the inflated `max_attempts`: the requeued activity, written with
    RetryPolicy(max_attempts=1) (a payment that must never run twice on its own), is retried
    automatically after its first failure. store.py `requeue_dead_letter`: "Put a dead
    letter's task back in the queue with fresh attempts" — the policy's budget, not the last
    life's make-up attempt; retry.py: ``max_attempts`` counts all executions.

    Expected: after the requeue, the task's budget is the policy's 1 attempt, and its first
    failure dead-letters it again (will_retry false)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("once", 7)
            await p.drive(charge_once, "once")
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
            (again,) = await p.poll(act=["charge"], wait=1)
            assert (again.attempt, again.max_attempts) == (2, 2)
            assert not (await p.fail(again, "card declined")).will_retry  # dead
            (letter,) = (
                await p.channel.unary(p.workflows.list_dead_letters, pb.ListDeadLettersRequest())
            ).dead_letters
            await p.channel.unary(
                p.workflows.requeue_dead_letter, pb.RequeueDeadLetterRequest(id=letter.id)
            )
            (requeued,) = await p.poll(act=["charge"], wait=1)
            reply = await p.fail(requeued, "card declined again")
            assert (requeued.attempt, requeued.max_attempts, reply.will_retry) == (1, 1, False), (
                f"requeued task: attempt {requeued.attempt} of {requeued.max_attempts}, "
                f"will_retry={reply.will_retry} (policy: max_attempts=1)"
            )
