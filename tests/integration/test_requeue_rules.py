"""When a task goes back to the queue, and when it must not: a claimed task whose holder is
gone, whose attempt failed or timed out, of a run that ended or whose cancellation was asked
for, or held by a breaker; and the rows retention leaves behind. Found by a review of the
control plane and the store (session 14); each test failed on the code before its fix."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.domain.limits import MAX_SECONDS
from everruns.domain.retry import RetryPolicy
from everruns.errors import DatabaseUnavailable, EverrunsError, InvalidArgument
from everruns.server.config import ServerConfig
from everruns.server.duties import reclaim_once, run_duties
from everruns.server.engine import Engine, StartRequest
from everruns.server.notifier import Notifier
from everruns.store.models import WorkflowRun
from everruns.store.store import NewEvent, Store
from tests.integration.test_cancelled_calls_and_races import waiting_on_lock
from tests.integration.test_engine import one_activity, plane
from tests.integration.test_store import (
    _activity,
    _age_heartbeats,
    _child,
    _claim,
    _claimed_workflow_task,
    _run,
)

pytestmark = pytest.mark.db


async def _engine_with_stale_workflow_task(pool: Any, stale_after: float) -> tuple[Engine, Store]:
    """A run whose workflow task T1 is claimed by worker w1 (and goes stale) while a signal
    made a second workflow task T2 pending: the normal "two tasks out at once" state."""
    store = Store(pool, rng=random.Random(7))
    engine = Engine(store, ServerConfig(stale_after=stale_after), Notifier())
    await engine.start_workflows([StartRequest("wf", "1", "wf-1")])
    (t1,) = await engine.poll("w1", workflow_types=["wf"], activity_types=[], max_tasks=1, wait_s=2)
    assert t1.task.kind == "workflow"
    await engine.signal("wf-1", "", "go", "1")  # T2: pending beside the claimed T1
    await trio.sleep(stale_after + 0.3)  # w1 died: T1's heartbeat goes stale
    return engine, store


async def test_reclaiming_a_stale_workflow_task_beside_a_pending_one_does_not_fail(
    pool: Any,
) -> None:
    with trio.fail_after(30):
        engine, _ = await _engine_with_stale_workflow_task(pool, 0.2)
        # T1 is closed, not made pending beside T2 (which replays the same history): the
        # unique index of pending workflow tasks would refuse the whole round.
        await reclaim_once(engine)
        pending = await pool.fetchval(
            "SELECT count(*) FROM durable_task_queue WHERE kind = 'workflow' AND status = 'pending'"
        )
        claimed = await pool.fetchval(
            "SELECT count(*) FROM durable_task_queue WHERE kind = 'workflow' AND status = 'claimed'"
        )
        assert (pending, claimed) == (1, 0)


async def test_a_duty_round_that_fails_for_any_reason_does_not_stop_the_duty(
    pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A round that raises something other than a database outage (a row in a state no
    statement expected, say) is logged with its traceback; the next round runs. Before, only
    DatabaseError was caught, and anything else left the server's nursery: the control plane
    stopped, and started again into the same round."""
    store = Store(pool, rng=random.Random(7))
    engine = Engine(store, ServerConfig(reclaim_interval=0.05), Notifier())
    rounds = 0
    third_round = trio.Event()
    reclaim = engine.reclaim_stale

    async def failing_once(conn: Any) -> int:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            third_round.set()
        if rounds == 1:
            raise RuntimeError("a row no statement expected")
        return await reclaim(conn)

    engine.reclaim_stale = failing_once  # type: ignore[method-assign]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_duties, engine)
            await third_round.wait()
            nursery.cancel_scope.cancel()
    assert "reclaimer: a round failed" in caplog.text
    assert "a row no statement expected" in caplog.text


async def test_releasing_a_dropped_workers_workflow_task_beside_a_pending_one(pool: Any) -> None:
    with trio.fail_after(30):
        engine, _ = await _engine_with_stale_workflow_task(pool, 0.2)
        # The path a dropped cancellation stream takes: T1 is closed, the worker released.
        assert await engine.release_worker("w1", "connection of worker w1 dropped") == 1


async def test_a_dropped_worker_is_marked_lost_in_the_same_transaction_as_its_release(
    pool: Any,
) -> None:
    """Who sees the worker ``lost`` sees its tasks released, and the reverse. Before, the
    mark committed first, so a reader between the two statements saw the worker lost and its
    task still ``claimed`` by it (found by the dead-letter e2e test, which read the task row
    as soon as its killed worker showed ``lost``)."""
    store = Store(pool, rng=random.Random(7))
    engine = Engine(store, ServerConfig(), Notifier())
    await store.register_worker("w1", activity_types=[], workflow_types=["wf"], max_concurrency=1)
    await engine.start_workflows([StartRequest("wf", "1", "wf-lost")])
    with trio.fail_after(30):
        (held,) = await engine.poll(
            "w1", workflow_types=["wf"], activity_types=[], max_tasks=1, wait_s=2
        )
        seen: list[tuple[str, str]] = []
        release_task = store.release_task

        async def looking(conn: Any, task: Any, error: Any, **kw: Any) -> Any:
            # Another session, mid-release: the worker's row and the task's, as committed.
            status = await pool.fetchval("SELECT status FROM durable_workers WHERE id = 'w1'")
            row = await pool.fetchval(
                "SELECT status FROM durable_task_queue WHERE id = $1", held.task.task_id
            )
            seen.append((status, row))
            return await release_task(conn, task, error, **kw)

        store.release_task = looking  # type: ignore[method-assign]
        assert await engine.release_worker("w1", "connection of worker w1 dropped") == 1
        assert seen == [("active", "claimed")]
        status = await pool.fetchval("SELECT status FROM durable_workers WHERE id = 'w1'")
        row = await pool.fetchval(
            "SELECT status FROM durable_task_queue WHERE id = $1", held.task.task_id
        )
        assert (status, row) == ("lost", "pending")


async def test_a_task_claimed_for_a_dropped_worker_by_a_commit_its_release_waited_for(
    database_url: str, pool: Any
) -> None:
    """A dropped worker's decision is being applied when its release begins: the decision's
    transaction holds the workflow task's row, and commits it completed with an activity
    claimed for the worker (eager dispatch). The release waits for that row, and its first look
    then finds nothing: the row it waited for no longer matches, and the activity, committed
    after the look's snapshot, is not in it. Before, an empty first look ended the release, and
    the activity stayed with the dead worker until the 30 s stale rule (bench w6: one trial
    recovered in 39 s instead of 0.02)."""
    store = Store(pool, rng=random.Random(7))
    engine = Engine(store, ServerConfig(), Notifier())
    await store.register_worker("w1", activity_types=[], workflow_types=[], max_concurrency=2)
    run = await _run(store)
    workflow_task = await _claimed_workflow_task(store, run)
    activity = await _activity(store, run)
    with trio.fail_after(30):
        async with pg.connect(database_url) as decision:
            await decision.execute("BEGIN")
            try:
                # What the decision's statement does: its workflow task completed, and the
                # activity it scheduled claimed for its worker, in one transaction.
                await decision.execute(
                    "UPDATE durable_task_queue SET status = 'completed', claimed_by = NULL,"
                    " completed_at = now() WHERE id = $1",
                    workflow_task.task_id,
                )
                await decision.execute(
                    "UPDATE durable_task_queue SET status = 'claimed', claimed_by = 'w1',"
                    " claimed_at = now(), heartbeat_at = now(), attempt = 1, lease_token = 7"
                    " WHERE id = $1",
                    activity,
                )
                async with trio.open_nursery() as nursery:
                    released: list[int] = []

                    async def release() -> None:
                        released.append(
                            await engine.release_worker("w1", "connection of w1 dropped")
                        )

                    nursery.start_soon(release)
                    await waiting_on_lock(pool)
                    await decision.execute("COMMIT")
            except BaseException:
                with trio.move_on_after(5, shield=True):
                    await decision.execute("ROLLBACK")
                raise
        status = await pool.fetchval(
            "SELECT status FROM durable_task_queue WHERE id = $1", activity
        )
    assert (released, status) == ([1], "pending"), (
        f"the activity the decision claimed for the dropped worker is {status!r} after its"
        f" release ({released} released): it waits for the stale rule"
    )


async def test_an_attempt_the_control_plane_ends_is_started_on_its_holder_in_the_history(
    database_url: str, pool: Any
) -> None:
    """An attempt that times out, or whose worker is lost, has its ``activity_started`` (on the
    worker that held it) before how it ended, as one its worker reports has. Before, such an
    attempt's history had ``activity_timed_out`` or ``activity_failed`` alone: nothing said
    that it had started, or where."""
    with trio.fail_after(30):
        async with plane(database_url, reclaim_interval=0.2) as p:
            wid = await p.start("one", 1)
            await p.drive(one_activity, "one")
            await p.poll(act=["flaky"])  # never answered: start-to-close (0.3 s) ends it
            (second,) = await p.poll(act=["flaky"], wait=10)
            engine_release = Engine(Store(pool), ServerConfig(), Notifier())
            assert await engine_release.release_worker("w1", "connection of w1 dropped") == 1
            rows = await pool.fetch(
                "SELECT payload FROM durable_workflow_events WHERE workflow_id = $1"
                " ORDER BY sequence_num",
                wid,
            )
    events = [json.loads(r["payload"]) for r in rows]
    attempts = [
        (e["type"], e.get("attempt"), e.get("worker_id"))
        for e in events
        if e["type"] in ("activity_started", "activity_timed_out", "activity_failed")
    ]
    assert attempts == [
        ("activity_started", 1, "w1"),
        ("activity_timed_out", 1, None),
        ("activity_started", 2, "w1"),
        ("activity_failed", 2, None),
    ]
    assert second.attempt == 2


async def test_an_activity_heartbeat_timeout_has_one_outcome_whichever_duty_looks_first(
    pool: Any,
) -> None:
    """An activity whose own heartbeat timeout (1 s) expired is a timed-out attempt: retried
    after its policy's backoff. Before, the reclaimer (every 10 s, the 30 s rule or the task's
    own heartbeat timeout) caught it too when it looked first, and released it instead: back
    in the queue at once, no backoff, no breaker failure, its holder not told to stop."""
    store = Store(pool, rng=random.Random(7))
    engine = Engine(store, ServerConfig(), Notifier())
    with trio.fail_after(30):
        run = await _run(store)
        policy = RetryPolicy(max_attempts=3, initial_interval=60, jitter=0)
        task_id = await _activity(store, run, heartbeat_timeout_s=1.0, retry=policy)
        await _claim(store, "w1")
        await _age_heartbeats(pool, 2)
        assert await reclaim_once(engine) == 0  # the reclaimer looks first: not its task
        assert await engine.enforce_timeouts() == 1
        row = await pool.fetchrow(
            "SELECT status, attempt, visible_at - now() AS wait FROM durable_task_queue"
            " WHERE id = $1",
            task_id,
        )
        assert (row["status"], row["attempt"]) == ("pending", 1)
        assert row["wait"].total_seconds() > 50  # the policy's backoff, not "at once"


async def test_the_retry_of_a_timed_out_attempt_is_not_told_to_cancel(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url, reclaim_interval=0.5) as p:
            await p.start("one", 1)
            await p.drive(one_activity, "one")  # start-to-close 0.3 s, 2 attempts
            await p.poll(act=["flaky"])
            (second,) = await p.poll(act=["flaky"], wait=10)  # attempt 1 timed out
            assert second.attempt == 2
            reply = await p.channel.unary(
                p.workers.record_heartbeat,
                pb.RecordHeartbeatRequest(task_id=second.task_id, lease_token=second.lease_token),
            )
            # Nobody cancelled the workflow or this attempt: the cancel request the timeout
            # sent to the first holder must not carry over to the retry.
            assert reply.cancel_requested is False


async def slow_one(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity(
        "slow",
        input,
        retry=RetryPolicy(max_attempts=3, initial_interval=0.05),
        start_to_close_timeout=1.0,
    )


async def _cancel_while_its_activity_runs(p: Any) -> str:
    """Start a run of `slow_one`, claim its activity (whose holder then never answers) and ask
    for the run's cancellation; returns the workflow id."""
    wid: str = await p.start("slowwf", 1)
    await p.drive(slow_one, "slowwf")
    await p.poll(act=["slow"])
    await p.channel.unary(
        p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id=wid, reason="stop")
    )
    return wid


async def test_an_activity_of_a_cancelled_run_is_not_retried_after_its_timeout(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url, reclaim_interval=0.5) as p:
            wid = await _cancel_while_its_activity_runs(p)
            await p.drive(slow_one, "slowwf")  # the code sees the cancel and ends
            assert (await p.describe(wid)).status == "cancelled"
            # The holder never answers (it hangs); its start-to-close timeout expires 1 s
            # after the claim. The attempt is not retried: the run has ended and the task's
            # cancellation was requested, so no worker runs the side effect again.
            again = await p.poll(act=["slow"], wait=3)
            assert [(t.activity_id, t.attempt) for t in again] == []


async def test_retention_deletes_a_parent_whose_child_run_ended_later(
    store: Store, pool: pg.Pool
) -> None:
    """A parent that ended (cancelled, say) before its child is deleted first (oldest
    completed_at first); the foreign key's ON DELETE SET NULL leaves the child with its child
    id and no parent, which migration 006 allows (the CHECK of migration 001 refused it, and
    with it every round of retention)."""
    with trio.fail_after(20):
        parent = await _run(store, "parent", "p")
        child = await _child(store, parent, "c1")
        async with store.transaction() as conn:
            await store.end_run(conn, parent.run_id, "cancelled")
            await store.end_run(conn, child.run_id, "cancelled")
        await pool.execute(
            "UPDATE durable_workflow_instances SET completed_at = now() - interval '8 days'"
            " WHERE id = $1",
            parent.run_id,
        )
        async with store.transaction() as conn:
            deleted = await store.delete_expired_runs(conn, older_than=7 * 86400, limit=500)
        assert deleted == 1


async def test_reclaiming_a_stale_workflow_task_while_its_run_has_a_pending_one(
    store: Store,
) -> None:
    """A signal (any new event) gives a run a second, pending workflow task while the first is
    claimed; when the first's holder goes silent, the first is closed rather than released
    (released, it collided with the unique index of pending workflow tasks and failed the
    reclaimer's whole round)."""
    with trio.fail_after(20):
        run = await _run(store)
        task = await _claimed_workflow_task(store, run)
        async with store.transaction() as conn:  # a signal arrives meanwhile
            locked = await store.lock_run(conn, run.run_id)
            await store.append_events(conn, locked, [NewEvent("signal_received", {})])
            assert await store.ensure_workflow_task(conn, locked)
        await _age_heartbeats(store.pool, 60)
        async with store.transaction() as conn:
            outcomes = await store.reclaim_stale(conn, stale_after=30)
        assert [(o.task.task_id, o.task.status, o.will_retry) for o in outcomes] == [
            (task.task_id, "completed", False)
        ]


async def test_a_task_of_an_ended_run_is_not_claimable_again(store: Store) -> None:
    """A run ends while its activity is out (its holder is asked to cancel). When the holder
    then dies (stale reclaim) or reports a retryable failure, the task is cancelled, not put
    back for another worker to run for a run that has ended."""
    with trio.fail_after(20):
        runs: list[WorkflowRun] = []
        for wid in ("wf-reclaimed", "wf-failed"):
            run = await _run(store, wid)
            await _activity(store, run, "a1", retry=RetryPolicy(initial_interval=0.01))
            runs.append(run)
        claimed = {t.run_id: t for t in await _claim(store, "w1")}
        for run in runs:  # what ending a run does (Engine._after_end)
            async with store.transaction() as conn:
                await store.end_run(conn, run.run_id, "cancelled")
                await store.request_task_cancel(conn, claimed[run.run_id])
        failed = claimed[runs[1].run_id]
        async with store.transaction() as conn:
            await store.fail_task(
                conn, failed.task_id, failed.lease_token, {"type": "IOError", "message": "x"}
            )
        await store.pool.execute(
            "UPDATE durable_task_queue SET heartbeat_at = now() - interval '60 s' WHERE id = $1",
            claimed[runs[0].run_id].task_id,
        )
        async with store.transaction() as conn:
            await store.reclaim_stale(conn, stale_after=30)
        await trio.sleep(0.1)  # past the failed one's retry delay
        again = await _claim(store, "w2")
        assert [(t.workflow_id, t.attempt) for t in again] == []


async def held(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity(
        "dep",
        input,
        retry=RetryPolicy(max_attempts=5, initial_interval=0.01),
        schedule_to_start_timeout=0.3,
    )


async def test_tasks_held_by_an_open_breaker_burn_no_attempts(
    database_url: str, pool: pg.Pool
) -> None:
    """DESIGN 5 and docs/operations.md: while a breaker is open its tasks wait and do not burn
    attempts. Their schedule-to-start deadline is renewed while the breaker holds them (it
    timed them out, an attempt each, into the dead-letter queue)."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await pool.execute(
                "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at)"
                " VALUES ('dep', 'open', 5, now())"
            )
            await p.start("held", 1)
            await p.drive(held, "held")
            await trio.sleep(2.5)  # the breaker stays open for 30 s
            row = await pool.fetchrow(
                "SELECT status, attempt FROM durable_task_queue WHERE kind = 'activity'"
            )
            dead = await pool.fetchval("SELECT count(*) FROM durable_dead_letter_queue")
            assert row is not None
            assert (row["status"], row["attempt"], dead) == ("pending", 0, 0)


async def test_a_completion_and_a_cancel_that_deadlock_are_retryable(store: Store) -> None:
    """Cancelling a run locks the run, then flags its claimed activity; recording the
    activity's result updates the activity, then locks its run. At the same moment, PostgreSQL
    aborts one of them ('deadlock detected'). The aborted side gets DatabaseUnavailable
    (UNAVAILABLE on the wire, which workers and clients retry), not a DatabaseError (INTERNAL),
    and made again it succeeds."""
    with trio.fail_after(20):
        run = await _run(store)
        await _activity(store, run, "a1")
        (task,) = await _claim(store, "w1")
        errors: list[tuple[str, EverrunsError]] = []

        async def complete() -> None:
            try:
                await store.complete_activities(
                    [(task.task_id, task.lease_token, json.dumps("ok"))], "w1"
                )
            except EverrunsError as exc:
                errors.append(("complete", exc))

        async with trio.open_nursery() as nursery:
            try:
                async with store.transaction() as conn:
                    await store.lock_run(conn, run.run_id)  # as Engine.cancel does
                    nursery.start_soon(complete)
                    await trio.sleep(0.3)  # the completion holds the task, waits for the run
                    await store.request_task_cancel(conn, task)
            except EverrunsError as exc:
                errors.append(("cancel", exc))
        assert len(errors) == 1
        side, error = errors[0]
        assert isinstance(error, DatabaseUnavailable), error
        assert "deadlock detected" in str(error)
        if side == "complete":
            done, *_ = await store.complete_activities(
                [(task.task_id, task.lease_token, json.dumps("ok"))], "w1"
            )
            assert list(done) == [0]
        else:
            async with store.transaction() as conn:
                await store.lock_run(conn, run.run_id)
                await store.request_task_cancel(conn, task)


async def test_a_failure_reported_for_a_workflow_task_is_an_invalid_argument(pool: Any) -> None:
    """FailActivityTask names an activity task; given a workflow task's id and lease, the
    control plane says so (INVALID_ARGUMENT) and changes nothing. It failed an internal
    assertion before (INTERNAL, which workers retry)."""
    store = Store(pool, rng=random.Random(7))
    engine = Engine(store, ServerConfig(), Notifier())
    with trio.fail_after(20):
        await engine.start_workflows([StartRequest("wf", "1", "wf-1")])
        (claimed,) = await engine.poll(
            "w1", workflow_types=["wf"], activity_types=[], max_tasks=1, wait_s=2
        )
        task = claimed.task
        assert task.lease_token is not None
        with pytest.raises(InvalidArgument, match="is a workflow task"):
            await engine.fail_activity(
                task.task_id, task.lease_token, "w1", json.dumps({"type": "E", "message": "x"})
            )
        status = await pool.fetchval(
            "SELECT status FROM durable_task_queue WHERE id = $1", task.task_id
        )
        assert status == "claimed"


async def test_a_claim_under_way_when_a_poll_times_out_still_hands_its_tasks_out(
    pool: Any,
) -> None:
    """A long poll whose wait ends while its claim statement runs (here the claim taken when
    some breaker is not closed, made slow) gets the tasks that claim took. Cancelled midway
    before, the claim could commit and hand nothing out: its tasks stayed claimed by a worker
    that never heard of them until stale reclamation, 30 s later, charged an attempt."""
    store = Store(pool, rng=random.Random(7))
    engine = Engine(store, ServerConfig(), Notifier())
    claim_tasks = store.claim_tasks

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        claimed = await claim_tasks(*args, **kwargs)
        await trio.sleep(0.5)  # committed; the poll's wait ends meanwhile
        return claimed

    store.claim_tasks = slow_claim  # type: ignore[method-assign]
    with trio.fail_after(20):
        await pool.execute(
            "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at)"
            " VALUES ('elsewhere', 'open', 5, now())"
        )
        await engine.start_workflows([StartRequest("wf", "1", "wf-1")])
        handed = await engine.poll(
            "w1", workflow_types=["wf"], activity_types=["a"], max_tasks=1, wait_s=0.1
        )
        claimed = await pool.fetch(
            "SELECT id FROM durable_task_queue WHERE status = 'claimed' AND claimed_by = 'w1'"
        )
        assert [c.task.task_id for c in handed] == [r["id"] for r in claimed]
        assert len(handed) == 1


async def test_a_failure_is_recorded_whatever_retry_policy_its_task_was_written_with(
    store: Store,
) -> None:
    """Retry intervals are bounded to 100 years where policies come in; a task written before
    may hold longer ones. Its failed attempt is still recorded and retried, after at most 100
    years (the bound), instead of the failure report being refused for the stored policy."""
    with trio.fail_after(20):
        run = await _run(store)
        await _activity(store, run, "a1")
        await store.pool.execute(
            "UPDATE durable_task_queue SET retry_policy ="
            ' \'{"initial_interval": 1e11, "maximum_interval": 1e12}\'::json'
        )
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            outcome = await store.fail_task(
                conn, task.task_id, task.lease_token, {"type": "IOError", "message": "x"}
            )
        assert outcome.will_retry
        assert 0 < outcome.delay <= MAX_SECONDS


async def test_an_activity_whose_cancellation_was_requested_ends_as_cancelled_in_history(
    database_url: str,
) -> None:
    """The run is cancelled (still open: its code has not seen the request yet) while its
    activity runs; the attempt then times out. The task is cancelled, not retried, and the
    history says so (activity_cancelled: the workflow code sees ActivityCancelled), not that
    the activity failed for good (activity_timed_out without a retry: ActivityError)."""
    with trio.fail_after(30):
        async with plane(database_url, reclaim_interval=0.5) as p:
            wid = await _cancel_while_its_activity_runs(p)
            ends: list[tuple[str, Any]] = []
            while not ends:  # start-to-close (1 s) expires; the due scanner acts
                await trio.sleep(0.1)
                reply = await p.channel.unary(
                    p.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid)
                )
                ends = [
                    (e.type, json.loads(e.data or b"{}").get("will_retry"))
                    for e in reply.events
                    if e.type.startswith("activity_")
                    and e.type
                    not in ("activity_scheduled", "activity_started", "activity_cancel_requested")
                ]
            assert ends == [("activity_cancelled", None)], ends


async def test_reclaiming_a_workflow_task_while_a_signal_makes_another_pending(
    store: Store,
) -> None:
    """A signal's transaction has made a second workflow task of the run pending and not
    committed yet when the first one's release looks: the release, which cannot see it,
    waits on the unique index of pending workflow tasks and meets a unique violation when the
    signal commits. It runs in a savepoint and then closes the task as superseded, instead of
    failing the whole reclaimer round (or release_worker)."""

    with trio.fail_after(20):
        run = await _run(store)
        task = await _claimed_workflow_task(store, run)
        await _age_heartbeats(store.pool, 60)
        signal_pending = trio.Event()
        commit_signal = trio.Event()
        failure: list[BaseException] = []

        async def signal() -> None:
            async with store.transaction() as conn:
                locked = await store.lock_run(conn, run.run_id)
                await store.append_events(conn, locked, [NewEvent("signal_received", {})])
                assert await store.ensure_workflow_task(conn, locked)
                signal_pending.set()
                await commit_signal.wait()

        async def reclaim() -> None:
            await signal_pending.wait()
            try:
                async with store.transaction() as conn:
                    await store.reclaim_stale(conn, stale_after=30)
            except Exception as exc:
                failure.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(signal)
            nursery.start_soon(reclaim)
            await signal_pending.wait()
            await trio.sleep(0.5)  # the release now waits on the signal's index entry
            commit_signal.set()
        assert failure == [], failure
        status = await store.pool.fetchval(
            "SELECT status FROM durable_task_queue WHERE id = $1", task.task_id
        )
        assert status == "completed"
