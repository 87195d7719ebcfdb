"""Rules of the operator surface: the `everruns` CLI verbs, the admin RPCs behind them, and
what the operator guide's runbook promises. An operator's requeue of a dead letter runs whatever
its run does (the run ending or being cancelled does not cancel it, retention does not delete it
before it runs); a forged page token is bad input, not an internal error; `breakers list`
reports when a breaker last changed; the duty that applies the runbook's requeues never
deadlocks with retention. Each test failed before its fix."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import pytest
import trio

from everruns import cli
from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.domain.retry import RetryPolicy
from everruns.store.store import Store
from tests.integration.test_engine import caught_failure, plane

pytestmark = pytest.mark.db


async def _dead_letter_of_a_run_that_ended(p: Any) -> tuple[pb.Task, pb.DeadLetter]:
    """A run of `caught` whose one activity died (max_attempts 1) and which then completed
    (its code caught the failure): the most common shape of a dead letter."""
    await p.start("caught", {"n": 1}, wid="ended-with-dlq")
    await p.drive(caught_failure, "caught")
    (task,) = await p.poll(act=["flaky"])
    reply = await p.fail(task, "disk full")
    assert not reply.will_retry
    await p.drive(caught_failure, "caught")
    assert (await p.describe("ended-with-dlq")).status == "completed"
    (letter,) = (
        await p.channel.unary(p.workflows.list_dead_letters, pb.ListDeadLettersRequest())
    ).dead_letters
    return task, letter


async def test_retention_deletes_a_requeued_dead_letters_task_before_it_runs(
    database_url: str, pool: pg.Pool
) -> None:
    """An operator requeues the dead letter of a run that ended a while ago (nearly the
    retention period; here 1 s). The requeue is accepted and the task is pending, but the next
    retention round deletes the ended run and, by cascade, the live task the operator just put
    back (and the dead letter): the requeue is silently lost, and a worker holding it would
    find its task gone."""
    with trio.fail_after(30):
        async with plane(database_url, retention_seconds=1.0, retention_interval=0.2) as p:
            task, letter = await _dead_letter_of_a_run_that_ended(p)
            reply = await p.channel.unary(
                p.workflows.requeue_dead_letter, pb.RequeueDeadLetterRequest(id=letter.id)
            )
            assert reply.task_id == task.task_id
            status = await pool.fetchval(
                "SELECT status FROM durable_task_queue WHERE id = $1", uuid.UUID(task.task_id)
            )
            assert status == "pending"
            await trio.sleep(2.0)  # more than the retention period, several retention rounds
            status = await pool.fetchval(
                "SELECT status FROM durable_task_queue WHERE id = $1", uuid.UUID(task.task_id)
            )
            again = await p.poll(act=["flaky"], wait=1)
            assert status == "pending" and [t.task_id for t in again] == [task.task_id], (
                f"the requeued task {task.task_id} was deleted by retention before any worker "
                f"ran it (its row now: {status!r}; a poll got {[t.task_id for t in again]}): "
                "retention deletes an ended run that still has a pending (requeued) task"
            )


async def test_a_forged_page_token_is_bad_input_not_an_internal_error(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--page-token` takes what the operator pastes. A token that decodes to a time PostgreSQL
    cannot represent is refused as INTERNAL (exit 1, an asyncpg DataError in the message)
    instead of as a token this server did not issue (exit 2), as every other bad token is."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            address = f"127.0.0.1:{p.port}"
            raw = f"0001-01-01T00:00:00+05:00|{uuid.UUID(int=0)}"
            token = base64.urlsafe_b64encode(raw.encode()).decode()
            for verb in (["workflow", "list"], ["dlq", "list"]):
                capsys.readouterr()
                code = await trio.to_thread.run_sync(
                    cli.main, ["--address", address, *verb, "--page-token", token]
                )
                err = capsys.readouterr().err
                assert code == cli.EXIT_USAGE and "INTERNAL" not in err, (
                    f"`everruns {' '.join(verb)} --page-token <forged>` exited {code} with "
                    f"{err.strip()!r}: the server's _page_cursor accepts a cursor time "
                    "PostgreSQL cannot store and the query fails as INTERNAL"
                )


async def _three_deps(ctx: Any, input: Any) -> Any:
    return await ctx.gather(*[ctx.start_activity("dep", i) for i in range(3)])


async def test_breakers_list_reports_when_a_breaker_last_changed(
    database_url: str, pool: pg.Pool
) -> None:
    """`everruns breakers list` has an UPDATED AT column (the client documents
    CircuitBreakerInfo.updated_at as "last state change"). A breaker that opened 31 s ago and
    has just closed again after its two probe successes is reported as updated when it last
    failed, 31 s ago, though the row's own updated_at column says now: the service fills the
    field from last_failure_at or opened_at."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.register(workflow_types=["deps"], activity_types=["dep"])
            await p.start("deps")
            await p.drive(_three_deps, "deps")
            # The breaker opened (5 failures) 31 s ago: its open duration (30 s) has passed.
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, "
                "opened_at, last_failure_at) VALUES ('dep', 'open', 5, "
                "now() - interval '31 seconds', now() - interval '31 seconds')"
            )
            before = time.time()
            for _ in range(2):  # two probes succeed, one at a time: the breaker closes
                (probe,) = await p.poll(act=["dep"], wait=2)
                await p.complete(probe, 1)
            row = await pool.fetchrow("SELECT state, updated_at FROM durable_circuit_breaker_state")
            assert row is not None and row["state"] == "closed"
            (breaker,) = (
                await p.channel.unary(
                    p.workflows.list_circuit_breakers, pb.ListCircuitBreakersRequest()
                )
            ).breakers
            assert breaker.state == "closed"
            assert breaker.updated_at >= before - 1, (
                f"breaker 'dep' closed just now (row updated_at {row['updated_at']}), but "
                f"ListCircuitBreakers reports updated_at {breaker.updated_at:.0f}, "
                f"{before - breaker.updated_at:.0f} s ago (its last failure): services.py "
                "sends last_failure_at or opened_at instead of the row's updated_at"
            )


async def _caught_then_waits(ctx: Any, input: Any) -> Any:
    try:
        await ctx.execute_activity("flaky", input, retry=RetryPolicy(max_attempts=1))
    except Exception:  # the workflow sees the dead letter's failure and moves on
        pass
    return await ctx.wait_signal("go")


async def test_a_requeued_dead_letter_is_cancelled_when_its_open_run_ends(
    database_url: str, pool: pg.Pool
) -> None:
    """The engine treats a requeued dead letter as detached from its workflow ("its result
    stays on its task row only: its workflow has moved on"), and a dead letter of a run that
    has ended runs when requeued. But when the run is still open at the requeue, the run's
    end cancels the requeued task before any worker ran it (Engine._after_end cancels every
    pending activity of the run): the operator's requeue is dropped silently, while
    `dlq list` shows it requeued."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("waits", 1, wid="open-with-dlq")
            await p.drive(_caught_then_waits, "waits")
            (task,) = await p.poll(act=["flaky"])
            assert not (await p.fail(task, "disk full")).will_retry
            await p.drive(_caught_then_waits, "waits")  # caught; now waits for "go"
            (letter,) = (
                await p.channel.unary(p.workflows.list_dead_letters, pb.ListDeadLettersRequest())
            ).dead_letters
            await p.channel.unary(
                p.workflows.requeue_dead_letter, pb.RequeueDeadLetterRequest(id=letter.id)
            )
            await p.channel.unary(
                p.workflows.signal_workflow,
                pb.SignalWorkflowRequest(workflow_id="open-with-dlq", name="go", payload=b"7"),
            )
            await p.drive(_caught_then_waits, "waits")
            assert (await p.describe("open-with-dlq")).status == "completed"
            status = await pool.fetchval(
                "SELECT status FROM durable_task_queue WHERE id = $1", uuid.UUID(task.task_id)
            )
            again = await p.poll(act=["flaky"], wait=1)
            assert [t.task_id for t in again] == [task.task_id], (
                f"the requeued task {task.task_id} is {status!r} and no worker can claim it: "
                "its run's end cancelled the operator's requeue (engine.py _after_end), though "
                "a requeue of a run already ended runs"
            )


async def test_a_requeued_dead_letter_runs_when_its_open_run_is_cancelled(
    database_url: str, pool: pg.Pool
) -> None:
    """The same rule when the open run is cancelled instead of ending by itself: the cancel
    request cancels the run's own activities, not the operator's requeue (nor does it record
    the requeue as cancelled in the run's history, whose code has already seen it fail)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("waits", 1, wid="cancelled-with-dlq")
            await p.drive(_caught_then_waits, "waits")
            (task,) = await p.poll(act=["flaky"])
            assert not (await p.fail(task, "disk full")).will_retry
            await p.drive(_caught_then_waits, "waits")
            (letter,) = (
                await p.channel.unary(p.workflows.list_dead_letters, pb.ListDeadLettersRequest())
            ).dead_letters
            await p.channel.unary(
                p.workflows.requeue_dead_letter, pb.RequeueDeadLetterRequest(id=letter.id)
            )
            await p.channel.unary(
                p.workflows.cancel_workflow,
                pb.CancelWorkflowRequest(workflow_id="cancelled-with-dlq", reason="stop"),
            )
            await p.drive(_caught_then_waits, "waits")
            assert (await p.describe("cancelled-with-dlq")).status == "cancelled"
            types = await pool.fetch(
                "SELECT event_type FROM durable_workflow_events WHERE event_type LIKE 'activity%'"
                " ORDER BY sequence_num"
            )
            assert "activity_cancelled" not in [r["event_type"] for r in types]
            again = await p.poll(act=["flaky"], wait=1)
            assert [t.task_id for t in again] == [task.task_id]


async def test_the_requeue_duty_skips_a_run_retention_holds_instead_of_deadlocking(
    database_url: str, pool: pg.Pool, store: Store
) -> None:
    """A requeue written with the runbook's SQL is applied by a duty. It locked the dead letter
    and then waited for its run, while retention, holding the run, deleted it and by cascade
    waited for the dead letter: a deadlock, one side aborted after a second. The duty now locks
    runs first and skips one another transaction holds."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task, letter = await _dead_letter_of_a_run_that_ended(p)
        run_id = await pool.fetchval(
            "SELECT run_id FROM durable_dead_letter_queue WHERE id = $1", letter.id
        )
        # The runbook's requeue, written while no control plane runs.
        await pool.execute(
            "UPDATE durable_dead_letter_queue SET requeued_at = now() WHERE id = $1", letter.id
        )
        async with pool.transaction() as holder:  # retention holds the run
            await holder.execute(
                "SELECT 1 FROM durable_workflow_instances WHERE id = $1 FOR UPDATE", run_id
            )
            with trio.fail_after(5):  # waiting for the run would hang here
                async with store.transaction() as conn:
                    assert await store.apply_operator_requeues(conn) == []
        async with store.transaction() as conn:  # released: the next round applies it
            (revived,) = await store.apply_operator_requeues(conn)
        assert str(revived.task_id) == task.task_id and revived.status == "pending"
