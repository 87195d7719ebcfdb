"""The store against a real PostgreSQL: every scenario of the original's PostgreSQL suite, plus
the cases it lacked (stale leases refused, reclaim past max_attempts, breaker races)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._aio.pg import Pool
from everruns.domain.breaker import BreakerConfig
from everruns.domain.retry import RetryPolicy
from everruns.errors import AlreadyExists, ConcurrencyConflict, NotFound, StaleLease
from everruns.store.models import WorkflowRun
from everruns.store.queries import QUERIES
from everruns.store.store import Decision, DecisionAhead, NewEvent, NewTask, RunEnd, Store
from tests.conftest import wrong_start_deadlines

pytestmark = pytest.mark.db


async def _run(store: Store, workflow_id: str = "wf-1", wtype: str = "checkout") -> WorkflowRun:
    async with store.transaction() as conn:
        run, created = await store.create_workflow(
            conn, workflow_id=workflow_id, workflow_type=wtype, input='{"order": 1}'
        )
    assert created
    return run


async def _child(store: Store, parent: WorkflowRun, child_id: str = "1") -> WorkflowRun:
    """A child run of ``parent`` (child id ``child_id``), as its start command makes one."""
    async with store.transaction() as conn:
        run, created = await store.create_workflow(
            conn,
            workflow_id=f"{parent.workflow_id}/{child_id}",
            workflow_type="kid",
            input="null",
            parent_run_id=parent.run_id,
            parent_child_id=child_id,
        )
    assert created
    return run


async def _activity(
    store: Store, run: WorkflowRun, activity_id: str = "1", atype: str = "charge", **kw: object
) -> uuid.UUID:
    async with store.transaction() as conn:
        task = await store.enqueue_activity(
            conn,
            run,
            NewTask(
                activity_type=atype,
                activity_id=activity_id,
                input='{"n": 1}',
                **kw,  # type: ignore[arg-type]
            ),
        )
    return task.task_id


async def _claim(store: Store, worker: str, atype: str = "charge", limit: int = 10) -> list:
    return await store.claim_tasks(worker, activity_types=[atype], limit=limit)


async def _age_heartbeats(pool: Pool, seconds: float) -> None:
    await pool.execute(
        "UPDATE durable_task_queue SET heartbeat_at = heartbeat_at - make_interval(secs => $1) "
        "WHERE status = 'claimed'",
        seconds,
    )


async def test_every_statement_prepares_on_every_connection_at_warm_up(store: Store) -> None:
    # Each statement of queries.sql is parsed and described against the migrated schema (a
    # column renamed by a migration fails here, not at the first call that runs it), and all
    # of them fit asyncpg's statement cache (LRU) or warming up would evict its own.
    assert len(QUERIES) < pg.STATEMENT_CACHE_SIZE - 10
    with trio.fail_after(30):
        assert await store.warm_up() == 10  # the pool fixture's size
        async with store.pool.acquire() as conn:
            prepared = [
                row["statement"]
                for row in await conn.fetch("SELECT statement FROM pg_prepared_statements")
            ]
        assert sorted(set(prepared) & set(QUERIES.values())) == sorted(set(QUERIES.values()))


async def test_create_and_get_workflow(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        got = await store.get_workflow("wf-1")
        assert got.run_id == run.run_id
        assert got.status == "pending"
        assert got.input == '{"order": 1}'
        assert (await store.get_workflow("wf-1", run.run_id)).workflow_type == "checkout"


async def test_idempotent_start_returns_open_run_and_restart_after_end(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        async with store.transaction() as conn:
            again, created = await store.create_workflow(
                conn, workflow_id="wf-1", workflow_type="checkout", input="1"
            )
        assert not created and again.run_id == run.run_id
        async with store.transaction() as conn:
            await store.end_run(conn, run.run_id, "completed", result="2")
            fresh, created = await store.create_workflow(
                conn, workflow_id="wf-1", workflow_type="checkout", input="3"
            )
        assert created and fresh.run_id != run.run_id


async def test_a_batch_start_sends_its_columns_short_where_it_can(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One type for every start is sent once and no workflow ids when none is named; either
    column in full when the batch differs, as a mix of them in one statement."""
    sent: list[tuple[int, ...]] = []
    fetch = store.pool.fetch

    async def spy(query: str, *args: Any) -> Any:
        if query == QUERIES["start_workflows"]:
            sent.append(tuple(len(column) for column in args))
        return await fetch(query, *args)

    monkeypatch.setattr(store.pool, "fetch", spy)
    with trio.fail_after(10):
        same = await store.start_workflows([("", "a", str(n), None) for n in range(3)])
        mixed = await store.start_workflows(
            [("", "a", "10", None), ("named", "b", "11", None), ("", "c", '{"x": [1]}', None)]
        )
        assert sent == [(0, 1, 3, 0), (3, 3, 3, 0)]
        assert all(created for _, _, created in same + mixed)
        assert [wid for wid, _, _ in mixed][1] == "named"
        stored = await store.pool.fetch(
            "SELECT workflow_id, workflow_type, input::text FROM durable_workflow_instances"
            " WHERE id = ANY($1::uuid[])",
            [run for _, run, _ in same + mixed],
        )
        by_id = {r["workflow_id"]: (r["workflow_type"], r["input"]) for r in stored}
        assert [by_id[wid] for wid, _, _ in same] == [("a", "0"), ("a", "1"), ("a", "2")]
        assert [by_id[wid] for wid, _, _ in mixed] == [
            ("a", "10"),
            ("b", "11"),
            ("c", '{"x": [1]}'),
        ]
        generated = [wid for wid, _, _ in same + mixed if wid != "named"]
        assert len({str(uuid.UUID(w)) for w in generated}) == 5


async def test_status_transitions_pending_running_completed_with_result(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        async with store.transaction() as conn:
            await store.set_running(conn, run.run_id)
        assert (await store.get_run(run.run_id)).status == "running"
        async with store.transaction() as conn:
            await store.end_run(conn, run.run_id, "completed", result='{"ok": [1, 2.5, null]}')
        done = await store.get_run(run.run_id)
        assert done.status == "completed"
        assert done.result == '{"ok": [1, 2.5, null]}'
        assert done.completed_at is not None


async def test_failure_is_stored(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        async with store.transaction() as conn:
            await store.end_run(conn, run.run_id, "failed", error={"type": "X", "message": "boom"})
        failed = await store.get_run(run.run_id)
        assert failed.status == "failed"
        assert failed.error == {"type": "X", "message": "boom"}
        assert failed.result is None


async def test_not_found(store: Store) -> None:
    with trio.fail_after(10):
        with pytest.raises(NotFound, match="nope"):
            await store.get_workflow("nope")
        with pytest.raises(NotFound):
            await store.get_run(uuid.uuid4())
        with pytest.raises(NotFound):
            await store.get_task(uuid.uuid4())


async def test_events_append_and_load_in_order(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        async with store.transaction() as conn:
            last = await store.append_events(
                conn,
                run,
                [
                    NewEvent("workflow_started", {"input": 12345678901234567890}),
                    NewEvent("activity_scheduled", {"activity_id": "1"}),
                ],
                expected_last=0,
            )
            assert last == 2
            run = await store.lock_run(conn, run.run_id)
            assert await store.append_events(conn, run, [NewEvent("timer_started", {})]) == 3
        events = await store.load_events(run.run_id)
        assert [e.sequence_num for e in events] == [1, 2, 3]
        assert [e.type for e in events] == [
            "workflow_started",
            "activity_scheduled",
            "timer_started",
        ]
        assert events[0].data["input"] == 12345678901234567890
        assert [e.sequence_num for e in await store.load_events(run.run_id, after=1)] == [2, 3]


async def test_optimistic_concurrency_conflict(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        async with store.transaction() as conn:
            await store.append_events(
                conn, run, [NewEvent("workflow_started", {})], expected_last=0
            )
        with pytest.raises(ConcurrencyConflict):
            async with store.transaction() as conn:
                await store.append_events(conn, run, [NewEvent("x", {})], expected_last=0)
        assert len(await store.load_events(run.run_id)) == 1


async def test_duplicate_sequence_number_is_refused_by_the_schema(store: Store, pool: Pool) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        insert = (
            "INSERT INTO durable_workflow_events (run_id, workflow_id, sequence_num, event_type, "
            "payload) VALUES ($1, 'wf-1', 1, 'x', '{}')"
        )
        await pool.execute(insert, run.run_id)
        with pytest.raises(AlreadyExists):
            await pool.execute(insert, run.run_id)


async def test_enqueue_and_claim_second_worker_gets_nothing(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        task_id = await _activity(store, run)
        first = await _claim(store, "w1")
        assert [t.task_id for t in first] == [task_id]
        assert first[0].attempt == 1 and first[0].claimed_by == "w1"
        assert first[0].lease_token is not None
        assert await _claim(store, "w2") == []


async def test_claim_filtered_by_type(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, "1", "charge")
        await _activity(store, run, "2", "ship")
        got = await _claim(store, "w1", "ship")
        assert [t.type_name for t in got] == ["ship"]
        assert await _claim(store, "w1", "email") == []


async def test_claim_orders_by_priority_then_visibility(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, "1", priority=0)
        await _activity(store, run, "2", priority=5)
        await _activity(store, run, "3", priority=0)
        got = await _claim(store, "w1", limit=3)
        assert [t.activity_id for t in got] == ["2", "1", "3"]


async def test_completed_task_is_not_claimable_again(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run)
        (task,) = await _claim(store, "w1")
        done, _, _, _ = await store.complete_activities(
            [(task.task_id, task.lease_token, '"ok"')], "w1"
        )
        assert list(done) == [0]
        done = await store.get_task(task.task_id)
        assert done.status == "completed" and done.result == '"ok"'
        assert await _claim(store, "w2") == []


async def test_failure_with_retry_is_claimable_only_after_delay_with_attempt_2(
    store: Store, pool: Pool
) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, retry=RetryPolicy(initial_interval=30, maximum_interval=60))
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            outcome = await store.fail_task(
                conn, task.task_id, task.lease_token, {"type": "IOError", "message": "flaky"}
            )
        assert outcome.will_retry and 27 <= outcome.delay <= 33
        assert await _claim(store, "w2") == []  # not visible yet
        await pool.execute(
            "UPDATE durable_task_queue SET visible_at = now() WHERE id = $1", task.task_id
        )
        (again,) = await _claim(store, "w2")
        assert again.attempt == 2
        assert again.last_error is not None and again.last_error["message"] == "flaky"
        assert again.lease_token != task.lease_token


async def test_exhausting_retries_dead_letters_the_task(store: Store, pool: Pool) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, retry=RetryPolicy(max_attempts=2))
        for attempt in (1, 2):
            await pool.execute("UPDATE durable_task_queue SET visible_at = now()")
            (task,) = await _claim(store, "w1")
            assert task.attempt == attempt
            async with store.transaction() as conn:
                outcome = await store.fail_task(
                    conn, task.task_id, task.lease_token, {"type": "E", "message": f"try {attempt}"}
                )
        assert not outcome.will_retry
        assert outcome.task.status == "dead"
        letter = outcome.dead_letter
        assert letter is not None and letter.attempts == 2
        assert letter.last_error == "E: try 2"
        assert [e["message"] for e in letter.error_history] == ["try 1", "try 2"]
        assert [d.id for d in await store.list_dead_letters()] == [letter.id]


async def test_non_retryable_error_dead_letters_at_once(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, retry=RetryPolicy(non_retryable_error_types=("ValueError",)))
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            outcome = await store.fail_task(
                conn,
                task.task_id,
                task.lease_token,
                {"type": "builtins.ValueError", "message": "bad"},
            )
        assert not outcome.will_retry and outcome.dead_letter is not None


async def test_heartbeat_accepted_for_holder_refused_for_others(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run)
        (task,) = await _claim(store, "w1")
        assert await store.heartbeat(task.task_id, task.lease_token, '{"progress": 1}') is False
        with pytest.raises(StaleLease, match="stale"):
            await store.heartbeat(task.task_id, task.lease_token + 1)
        assert (await store.get_task(task.task_id)).heartbeat_details == '{"progress": 1}'


async def test_stale_lease_refused_on_complete_and_fail(store: Store, pool: Pool) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run)
        (old,) = await _claim(store, "w1")
        await _age_heartbeats(pool, 60)
        async with store.transaction() as conn:
            assert len(await store.reclaim_stale(conn, stale_after=30)) == 1
        (new,) = await _claim(store, "w2")
        assert new.task_id == old.task_id and new.attempt == 2
        done, _, _, _ = await store.complete_activities(
            [(old.task_id, old.lease_token, '"late"')], "w1"
        )
        assert done == {}
        assert "held by w2" in str(await store.stale_reason(old.task_id, old.lease_token))
        with pytest.raises(StaleLease):
            async with store.transaction() as conn:
                await store.fail_task(conn, old.task_id, old.lease_token, {"type": "E"})
        await store.complete_activities([(new.task_id, new.lease_token, '"on time"')], "w2")
        assert (await store.get_task(new.task_id)).result == '"on time"'


async def test_stale_reclaim_makes_task_claimable(store: Store, pool: Pool) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run)
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            assert await store.reclaim_stale(conn, stale_after=30) == []  # fresh heartbeat
        await _age_heartbeats(pool, 31)
        async with store.transaction() as conn:
            (outcome,) = await store.reclaim_stale(conn, stale_after=30)
        assert outcome.will_retry and outcome.task.status == "pending"
        assert outcome.task.error_history[-1]["type"] == "HeartbeatTimeout"
        assert [t.task_id for t in await _claim(store, "w2")] == [task.task_id]


async def test_reclaim_leaves_an_activity_heartbeat_timeout_to_the_timeout_duty(
    store: Store, pool: Pool
) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, heartbeat_timeout_s=5.0)
        await _claim(store, "w1")
        await _age_heartbeats(pool, 6)
        async with store.transaction() as conn:
            assert await store.reclaim_stale(conn, stale_after=30) == []
            assert len(await store.timed_out_tasks(conn)) == 1
        await _age_heartbeats(pool, 30)  # the global rule still holds for it
        async with store.transaction() as conn:
            assert len(await store.reclaim_stale(conn, stale_after=30)) == 1


async def test_reclaim_past_max_attempts_dead_letters_instead_of_looping(
    store: Store, pool: Pool
) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, retry=RetryPolicy(max_attempts=3))
        outcomes = []
        for _ in range(3):
            await _claim(store, "w1")
            await _age_heartbeats(pool, 60)
            async with store.transaction() as conn:
                outcomes.extend(await store.reclaim_stale(conn, stale_after=30))
        assert [o.will_retry for o in outcomes] == [True, True, False]
        assert outcomes[-1].task.status == "dead" and outcomes[-1].dead_letter is not None
        assert await _claim(store, "w1") == []


async def test_signals_in_order_and_mark_processed(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        async with store.transaction() as conn:
            for i in range(5):
                await store.add_signal(conn, run, f"s{i}", f'{{"i": {i}}}')
        signals = await store.list_signals(run.run_id)
        assert [s.name for s in signals] == ["s0", "s1", "s2", "s3", "s4"]
        async with store.transaction() as conn:
            await store.mark_signals_processed(conn, [s.id for s in signals[:2]])
        left = await store.list_signals(run.run_id, unprocessed_only=True)
        assert [s.name for s in left] == ["s2", "s3", "s4"]


async def test_worker_registration_lifecycle(store: Store, pool: Pool) -> None:
    with trio.fail_after(10):
        w = await store.register_worker(
            "w1",
            activity_types=["charge"],
            workflow_types=["checkout"],
            max_concurrency=10,
            host="h",
            pid=42,
            version="0.1.0",
        )
        assert w.status == "active" and w.current_load == 0
        beat = await store.worker_heartbeat("w1", current_load=7, status="draining")
        assert beat is not None and beat.current_load == 7 and beat.status == "draining"
        assert [x.id for x in await store.list_workers()] == ["w1"]
        stopped = await store.stop_worker("w1")
        assert stopped is not None and stopped.status == "stopped"
        assert await store.list_workers() == []
        assert [x.status for x in await store.list_workers(include_stopped=True)] == ["stopped"]
        assert await store.worker_heartbeat("w1", current_load=0) is None  # must re-register
        await store.register_worker("w2", activity_types=[], workflow_types=[], max_concurrency=1)
        await pool.execute(
            "UPDATE durable_workers SET last_heartbeat_at = now() - interval '1 hour'"
        )
        assert await store.mark_lost_workers(missed_after=30) == ["w2"]
        again = await store.register_worker(
            "w1", activity_types=[], workflow_types=[], max_concurrency=2
        )
        assert again.status == "active" and again.stopped_at is None


async def test_dlq_requeue_makes_task_claimable_with_fresh_attempts(store: Store) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, retry=RetryPolicy(max_attempts=1))
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            outcome = await store.fail_task(conn, task.task_id, task.lease_token, {"type": "E"})
        assert outcome.dead_letter is not None
        async with store.transaction() as conn:
            revived = await store.requeue_dead_letter(conn, outcome.dead_letter.id)
        assert revived.status == "pending" and revived.attempt == 0
        (again,) = await _claim(store, "w2")
        assert again.attempt == 1
        (letter,) = await store.list_dead_letters()
        assert letter.requeued_at is not None


async def test_operator_requeue_by_runbook_sql(store: Store, pool: Pool) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, retry=RetryPolicy(max_attempts=1))
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            outcome = await store.fail_task(conn, task.task_id, task.lease_token, {"type": "E"})
        assert outcome.dead_letter is not None
        # The reference guide's own statement, unmodified but for the id.
        await pool.execute(
            f"UPDATE durable_dead_letter_queue SET requeued_at = NOW() "
            f"WHERE id = '{outcome.dead_letter.id}';"
        )
        async with store.transaction() as conn:
            (revived,) = await store.apply_operator_requeues(conn)
            assert await store.apply_operator_requeues(conn) == []
        assert revived.task_id == task.task_id
        assert [t.task_id for t in await _claim(store, "w2")] == [task.task_id]


async def test_ten_tasks_three_concurrent_claimers_each_claimed_once(store: Store) -> None:
    with trio.fail_after(20):
        run = await _run(store)
        for i in range(10):
            await _activity(store, run, str(i))
        claimed: list[uuid.UUID] = []

        async def claimer(name: str) -> None:
            while True:
                got = await _claim(store, name, limit=1)
                if not got:
                    return
                claimed.extend(t.task_id for t in got)

        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c"):
                nursery.start_soon(claimer, name)
        assert len(claimed) == 10 and len(set(claimed)) == 10


async def test_concurrent_breaker_updates_lose_no_count(store: Store) -> None:
    with trio.fail_after(20):
        config = BreakerConfig(failure_threshold=1000, window=60.0)

        async def fail_once() -> None:
            async with store.transaction() as conn:
                await store.record_breaker_outcome(
                    conn, "charge", success=False, config=config, claimed_at=None
                )

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(fail_once)
        assert (await store.get_breaker("charge")).failure_count == 40


async def test_breaker_opens_after_five_failures_and_blocks_claims(store: Store) -> None:
    with trio.fail_after(10):
        config = BreakerConfig()
        run = await _run(store)
        await _activity(store, run)
        for _ in range(5):
            async with store.transaction() as conn:
                state = await store.record_breaker_outcome(
                    conn, "charge", success=False, config=config, claimed_at=None
                )
        assert state.state == "open"
        async with store.transaction() as conn:
            blocked, probes = await store.admit_breakers(conn, config)
        assert blocked == ["charge"] and probes == {}
        got = await store.claim_tasks(
            "w1", activity_types=["charge"], limit=5, blocked_keys=blocked
        )
        assert got == []
        assert (await store.get_task(await _first_task(store))).attempt == 0  # no attempt charged
        await store.reset_breaker("charge")
        assert (await store.get_breaker("charge")).state == "closed"


async def _first_task(store: Store) -> uuid.UUID:
    value = await store.pool.fetchval("SELECT id FROM durable_task_queue LIMIT 1")
    assert isinstance(value, uuid.UUID)
    return value


async def test_fast_claim_orders_across_types_and_leaves_unclosed_breakers_alone(
    store: Store, pool: Pool
) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, "1", "charge", priority=0)
        await _activity(store, run, "2", "ship", priority=5)
        await _activity(store, run, "3", "charge", priority=9)
        await _activity(store, run, "4", "email", priority=7)
        await pool.execute(
            "INSERT INTO durable_circuit_breaker_state (key, state, opened_at) "
            "VALUES ('email', 'open', now())"
        )
        got, more, _ = await store.claim_tasks_fast(
            "w1", activity_types=["charge", "ship", "email"], limit=2
        )
        assert [t.activity_id for t in got] == ["3", "2"]
        assert more  # "1" is left
        rest, more, _ = await store.claim_tasks_fast(
            "w2", activity_types=["charge", "ship", "email"], limit=1
        )
        assert [t.activity_id for t in rest] == ["1"]  # email's breaker is open
        assert not more  # exactly what was left: nothing claimable remains
        assert await store.claim_tasks_fast("w3", activity_types=["charge"], limit=1) == (
            [],
            False,
            {},
        )


async def test_one_claim_for_several_workers_gives_each_slot_its_task_in_claim_order(
    store: Store,
) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        for n, priority in enumerate([1, 9, 5, 7, 3]):
            await _activity(store, run, f"a{n}", "charge", priority=priority)
        slots = ["w1", "w2", "w2", "w3"]
        got, more, _ = await store.claim_tasks_for(slots, activity_types=["charge"])
        # Claim order is by priority: a1 (9), a3 (7), a2 (5), a4 (3); slot n gets the n-th.
        assert [(t.activity_id, t.claimed_by) for t in got] == [
            ("a1", "w1"),
            ("a3", "w2"),
            ("a2", "w2"),
            ("a4", "w3"),
        ]
        assert more  # a0 is left
        assert len({t.lease_token for t in got}) == 4
        rest, more, _ = await store.claim_tasks_for(["w4", "w5"], activity_types=["charge"])
        assert [(t.activity_id, t.claimed_by) for t in rest] == [("a0", "w4")] and not more
        assert await store.claim_tasks_for([], activity_types=["charge"]) == ([], False, {})


async def test_a_claimed_workflow_task_comes_with_its_history_and_starts_its_run(
    store: Store,
) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        ended = await _run(store, "wf-2")
        async with store.transaction() as conn:
            for r in (run, ended):
                await store.append_events(
                    conn, r, [NewEvent("workflow_started", {"n": 1}), NewEvent("x", {"n": 2})]
                )
                await store.ensure_workflow_task(conn, r)
        await store.pool.execute(
            "UPDATE durable_workflow_instances SET status = 'cancelled', completed_at = now() "
            "WHERE id = $1",
            ended.run_id,
        )
        tasks, more, histories = await store.claim_tasks_fast(
            "w1", workflow_types=["checkout"], limit=5
        )
        assert sorted(t.run_id for t in tasks) == sorted([run.run_id, ended.run_id])
        assert not more
        assert list(histories) == [run.run_id]  # the ended run's task comes without one
        assert [(e.sequence_num, e.type) for e in histories[run.run_id]] == [
            (1, "workflow_started"),
            (2, "x"),
        ]
        assert histories[run.run_id][1].data == {"type": "x", "n": 2}
        assert (await store.get_workflow("wf-1")).status == "running"


async def test_a_claim_never_waits_for_a_run_row_another_transaction_holds(store: Store) -> None:
    """A signal holds its run's row and may then wait for the pending workflow task the claim
    is taking: the claim must not wait for that run row in turn (a deadlock). It skips marking
    the run running; completing the workflow task does that instead."""
    with trio.fail_after(20):
        run = await _run(store)
        async with store.transaction() as conn:
            await store.append_events(conn, run, [NewEvent("workflow_started", {})])
            await store.ensure_workflow_task(conn, run)
        claimed: list[Any] = []
        async with store.transaction() as conn:
            locked = await store.lock_run(conn, run.run_id)  # as a signal does
            with trio.fail_after(5):  # the claim returns while the run row is still held
                claimed.append(
                    await store.claim_tasks_fast("w1", workflow_types=["checkout"], limit=1)
                )
            await store.ensure_workflow_task(conn, locked)  # the signal goes on
        ((task,), _, histories) = claimed[0]
        assert task.run_id == run.run_id and list(histories) == [run.run_id]
        assert (await store.get_workflow("wf-1")).status == "pending"  # left for the completion


async def _claimed_workflow_task(store: Store, run: WorkflowRun) -> Any:
    """Give ``run`` its workflow_started event and claim its workflow task."""
    async with store.transaction() as conn:
        await store.append_events(conn, run, [NewEvent("workflow_started", {})])
        await store.ensure_workflow_task(conn, run)
    (task,), _, _ = await store.claim_tasks_fast("w1", workflow_types=[run.workflow_type], limit=1)
    return task


async def _footprint(pool: Pool, run: WorkflowRun) -> tuple[Any, ...]:
    """Everything a workflow task's outcome could write for ``run``."""
    row = await pool.fetchrow(
        "SELECT r.status, r.last_sequence_num, r.result::text AS result,"
        " (SELECT count(*) FROM durable_workflow_events e WHERE e.run_id = r.id) AS events,"
        " (SELECT array_agg(t.status ORDER BY t.created_at, t.kind) FROM durable_task_queue t"
        "  WHERE t.run_id = r.id) AS tasks"
        " FROM durable_workflow_instances r WHERE r.id = $1",
        run.run_id,
    )
    assert row is not None
    return tuple(row)


async def test_a_workflow_task_outcome_is_one_statement_fenced_by_lease_and_history(
    store: Store, pool: Pool
) -> None:
    with trio.fail_after(10):
        run = await _run(store)
        task = await _claimed_workflow_task(store, run)
        await _activity(store, run, "other")  # so that ending is not "simple"
        events = [NewEvent("workflow_task_completed", {}), NewEvent("activity_scheduled", {})]
        acts = [NewTask(activity_type="charge", activity_id="a1"), NewTask("charge", "a2")]
        before = await _footprint(pool, run)
        # Every failed condition writes nothing: a stale lease, a history that grew...
        for lease, seen in ((task.lease_token + 1, 1), (task.lease_token, 0)):
            applied, claimed = await store.apply_workflow_task(task.task_id, lease, seen, events)
            assert (applied, claimed) == (False, [])
        # ...an end of a run that still has an open activity, asked for as a simple end.
        done = store.apply_workflow_task(
            task.task_id, task.lease_token, 1, events, end=RunEnd("completed", result="1")
        )
        assert await done == (False, [])
        assert await _footprint(pool, run) == before
        # Applied: activities enqueued (the first eagerly claimed), events numbered after the
        # history, the task closed, the run running.
        applied, claimed = await store.apply_workflow_task(
            task.task_id, task.lease_token, 1, events, acts, eager_for="w2", eager=[True]
        )
        assert applied and [(t.activity_id, t.claimed_by) for t in claimed] == [("a1", "w2")]
        status, last, _, n_events, tasks = await _footprint(pool, run)
        assert (status, last, n_events) == ("running", 3, 3)
        assert sorted(tasks) == ["claimed", "completed", "pending", "pending"]
        loaded = await store.load_events(run.run_id)
        assert [(e.sequence_num, e.type) for e in loaded][1:] == [
            (2, "workflow_task_completed"),
            (3, "activity_scheduled"),
        ]
        # The same task cannot be applied twice.
        again = await store.apply_workflow_task(task.task_id, task.lease_token, 3, events)
        assert again == (False, [])


async def test_a_workflow_task_ends_its_run_in_the_same_statement(store: Store, pool: Pool) -> None:
    with trio.fail_after(10):
        lone = await _run(store)
        task = await _claimed_workflow_task(store, lone)
        events = [NewEvent("workflow_task_completed", {}), NewEvent("workflow_completed", {})]
        end = RunEnd("completed", result='{"ok": true}')
        assert await store.apply_workflow_task(task.task_id, task.lease_token, 1, events, end=end)
        assert await _footprint(pool, lone) == ("completed", 3, '{"ok": true}', 3, ["completed"])
        # With simple_end_only off (the caller holds the run lock and ends the rest itself),
        # a run with an open activity is ended too.
        busy = await _run(store, "wf-2")
        task = await _claimed_workflow_task(store, busy)
        await _activity(store, busy, "left")
        async with store.transaction() as conn:
            failed = RunEnd("failed", error={"type": "X", "message": "boom"})
            applied, _ = await store.apply_workflow_task(
                task.task_id,
                task.lease_token,
                1,
                events,
                end=failed,
                simple_end_only=False,
                conn=conn,
            )
        assert applied
        ended = await store.get_run(busy.run_id)
        assert ended.status == "failed" and ended.error == {"type": "X", "message": "boom"}


async def test_several_workflow_task_outcomes_in_one_statement_each_fenced_on_its_own(
    store: Store, pool: Pool
) -> None:
    with trio.fail_after(15):
        runs = [await _run(store, f"wf-{k}") for k in range(5)]
        tasks = [await _claimed_workflow_task(store, run) for run in runs]
        await _activity(store, runs[3], "other")  # so that ending run 3 is not "simple"
        before = [await _footprint(pool, run) for run in runs]
        scheduled = [NewEvent("workflow_task_completed", {}), NewEvent("activity_scheduled", {})]
        ended = [NewEvent("workflow_task_completed", {}), NewEvent("workflow_completed", {})]
        t = tasks
        decisions = [
            # applied: two activities, the first claimed at once for w2
            Decision(
                t[0].task_id,
                t[0].lease_token,
                1,
                scheduled,
                [NewTask("charge", "a1"), NewTask("charge", "a2")],
                eager=[True],
            ),
            Decision(t[1].task_id, t[1].lease_token + 1, 1, scheduled),  # stale lease
            Decision(t[2].task_id, t[2].lease_token, 1, ended, end=RunEnd("completed", "7")),
            Decision(t[3].task_id, t[3].lease_token, 1, ended, end=RunEnd("completed", "8")),
            Decision(t[4].task_id, t[4].lease_token, 0, scheduled),  # history grew
            Decision(t[0].task_id, t[0].lease_token, 1, scheduled),  # a second for run 0
        ]
        results = await store.apply_workflow_tasks(decisions, eager_for="w2")
        assert [applied for applied, _ in results] == [True, False, True, False, False, False]
        assert [(c.activity_id, c.claimed_by, c.run_id) for c in results[0][1]] == [
            ("a1", "w2", runs[0].run_id)
        ]
        assert all(claimed == [] for _, claimed in results[1:])
        # Not applied: nothing written.
        for k in (1, 3, 4):
            assert await _footprint(pool, runs[k]) == before[k]
        # Applied: as apply_workflow_task writes it.
        status, last, _, n_events, states = await _footprint(pool, runs[0])
        assert (status, last, n_events) == ("running", 3, 3)
        assert sorted(states) == ["claimed", "completed", "pending"]
        assert [(e.sequence_num, e.type) for e in await store.load_events(runs[0].run_id)] == [
            (1, "workflow_started"),
            (2, "workflow_task_completed"),
            (3, "activity_scheduled"),
        ]
        assert await _footprint(pool, runs[2]) == ("completed", 3, "7", 3, ["completed"])
        # Applied once only.
        again = await store.apply_workflow_tasks(decisions[:1], eager_for="w2")
        assert again == [(False, [])]
        assert await store.apply_workflow_tasks([]) == []


async def test_workflow_task_batches_sharing_runs_apply_each_task_once(store: Store) -> None:
    """Batches that share runs, in opposite request order, never wait for each other's locks:
    each task is applied by exactly one of them."""
    with trio.fail_after(20):
        runs = [await _run(store, f"wf-{k}") for k in range(6)]
        tasks = [await _claimed_workflow_task(store, run) for run in runs]
        events = [NewEvent("workflow_task_completed", {})]
        decisions = [Decision(t.task_id, t.lease_token, 1, events) for t in tasks]
        applied = [0] * 6

        async def apply(positions: list[int]) -> None:
            results = await store.apply_workflow_tasks([decisions[k] for k in positions])
            for k, (ok, _) in zip(positions, results, strict=True):
                applied[k] += ok

        async with trio.open_nursery() as nursery:
            nursery.start_soon(apply, list(range(6)))
            nursery.start_soon(apply, list(range(6))[::-1])
        assert applied == [1] * 6
        again = await store.apply_workflow_tasks(decisions)
        assert [ok for ok, _ in again] == [False] * 6


async def test_a_batch_skips_a_run_another_transaction_holds(store: Store, pool: Pool) -> None:
    """A task whose run another transaction holds locked is not applied, at once (the caller
    takes it through the general path): a batch never waits holding other runs' locks."""
    with trio.fail_after(20):
        free, held = await _run(store, "wf-free"), await _run(store, "wf-held")
        tasks = [await _claimed_workflow_task(store, run) for run in (free, held)]
        events = [NewEvent("workflow_task_completed", {})]
        decisions = [Decision(t.task_id, t.lease_token, 1, events) for t in tasks]
        async with store.transaction() as conn:
            await conn.execute(
                "SELECT 1 FROM durable_workflow_instances WHERE id = $1 FOR UPDATE", held.run_id
            )
            with trio.fail_after(5):
                results = await store.apply_workflow_tasks(decisions)
        assert [applied for applied, _ in results] == [True, False]
        (again,) = await store.apply_workflow_tasks(decisions[1:])
        assert again == (True, [])


async def _run_with_claimed_activity(store: Store) -> tuple[WorkflowRun, Any]:
    """A run whose first workflow task scheduled activity a1, which w1 has claimed."""
    run = await _run(store)
    wft = await _claimed_workflow_task(store, run)
    applied, _ = await store.apply_workflow_task(
        wft.task_id,
        wft.lease_token,
        1,
        [NewEvent("workflow_task_completed", {}), NewEvent("activity_scheduled", {})],
        [NewTask("charge", "a1")],
    )
    assert applied
    (task,) = await _claim(store, "w1")
    return run, task


async def test_a_follow_up_workflow_task_comes_with_the_history_its_completion_appended(
    store: Store,
) -> None:
    with trio.fail_after(10):
        run, task = await _run_with_claimed_activity(store)
        done, handed, histories, _ = await store.complete_activities(
            [(task.task_id, task.lease_token, '{"paid": 1}')],
            "w1",
            eager_types=["checkout"],
            max_eager=1,
        )
        assert list(done) == [0]
        assert [(t.kind, t.claimed_by, t.run_id) for t in handed] == [
            ("workflow", "w1", run.run_id)
        ]
        history = histories[run.run_id]
        assert [(e.sequence_num, e.type) for e in history] == [
            (1, "workflow_started"),
            (2, "workflow_task_completed"),
            (3, "activity_scheduled"),
            (4, "activity_started"),
            (5, "activity_completed"),
        ]
        assert history[-1].data["result"] == {"paid": 1}
        assert history == await store.load_events(run.run_id)  # what a later read gives


async def test_no_follow_up_task_is_handed_out_with_a_gap_in_its_history(store: Store) -> None:
    """A completion whose snapshot predates events another transaction committed to the run
    (it waited for the run's lock meanwhile) must not hand the follow-up workflow task out
    with the history of its snapshot: those events would be missing from it."""
    with trio.fail_after(20):
        run, task = await _run_with_claimed_activity(store)
        outcome: list[Any] = []
        holding, proceed = trio.Event(), trio.Event()

        async def complete() -> None:
            outcome.append(
                await store.complete_activities(
                    [(task.task_id, task.lease_token, "1")],
                    "w1",
                    eager_types=["checkout"],
                    max_eager=1,
                )
            )

        async def other_writer() -> None:
            async with store.transaction() as conn:
                locked = await store.lock_run(conn, run.run_id)
                holding.set()
                await proceed.wait()
                await store.append_events(conn, locked, [NewEvent("signal_received", {})])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_writer)
            await holding.wait()
            nursery.start_soon(complete)
            await trio.sleep(0.5)
            assert outcome == []  # it has its snapshot and waits for the run's lock
            proceed.set()
        done, handed, _, _ = outcome[0]
        assert list(done) == [0]
        assert handed == []  # left pending: a claim reads the whole history
        (follow_up,), _, histories = await store.claim_tasks_fast(
            "w1", workflow_types=["checkout"], limit=1
        )
        assert follow_up.run_id == run.run_id
        assert [e.sequence_num for e in histories[run.run_id]] == [1, 2, 3, 4, 5, 6]


_DECIDED_AT = "2026-11-26T10:00:00+00:00"


async def _run_decided_by(store: Store, worker: str, **options: Any) -> tuple[WorkflowRun, Any]:
    """A run whose first workflow task, decided by ``worker`` at _DECIDED_AT, scheduled
    activity a1 (and a0, already pending, with ``other_task=True``), which w1 has claimed."""
    run = await _run(store)
    wft = await _claimed_workflow_task(store, run)
    marker = NewEvent("workflow_task_completed", {"worker_id": worker, "time": _DECIDED_AT})
    applied, _ = await store.apply_workflow_task(
        wft.task_id,
        wft.lease_token,
        1,
        [marker, NewEvent("activity_scheduled", {})],
        [NewTask("charge", "a1")],
    )
    assert applied
    (task,) = await _claim(store, "w1")
    if options.get("other_task"):
        await _activity(store, run, "a0", atype="refund")
    return run, task


def _next_decision(run: WorkflowRun, *, end: bool = False) -> DecisionAhead:
    """What w1 decides ahead after a1's result: schedule a2 (or complete the run)."""
    marker = NewEvent(
        "workflow_task_completed", {"worker_id": "w1", "time": "2026-11-26T10:00:01+00:00"}
    )
    if end:
        events = [marker, NewEvent("workflow_completed", {"result": 2})]
        return DecisionAhead(
            0, run.run_id, "a1", 1, _DECIDED_AT, 5, events, end=RunEnd("completed", result="2")
        )
    return DecisionAhead(
        0,
        run.run_id,
        "a1",
        1,
        _DECIDED_AT,
        5,
        [marker, NewEvent("activity_scheduled", {})],
        [NewTask("charge", "a2")],
        [True],
    )


async def _complete_with(store: Store, task: Any, decision: DecisionAhead) -> Any:
    """w1 reports a1's result (1) with ``decision``, offering one slot."""
    return await store.complete_activities(
        [(task.task_id, task.lease_token, "1")],
        "w1",
        eager_types=["checkout"],
        max_eager=1,
        decisions=[decision],
    )


async def test_a_decision_made_ahead_is_applied_by_the_results_statement(store: Store) -> None:
    with trio.fail_after(10):
        run, task = await _run_decided_by(store, "w1")
        done, handed, _, decided = await _complete_with(store, task, _next_decision(run))
        assert list(done) == [0] and handed == []
        ((a2,),) = decided.values()
        assert (a2.activity_id, a2.status, a2.claimed_by) == ("a2", "claimed", "w1")
        history = await store.load_events(run.run_id)
        assert [e.type for e in history] == [
            "workflow_started",
            "workflow_task_completed",
            "activity_scheduled",
            "activity_started",
            "activity_completed",
            "workflow_task_completed",
            "activity_scheduled",
        ]
        assert (await store.get_run(run.run_id)).last_sequence_num == 7
        workflow_tasks = await store.pool.fetch(
            "SELECT status FROM durable_task_queue WHERE run_id = $1 AND kind = 'workflow'",
            run.run_id,
        )
        assert [r["status"] for r in workflow_tasks] == ["completed", "completed"]


async def test_a_decision_made_ahead_that_ends_the_run_ends_it(store: Store) -> None:
    with trio.fail_after(10):
        run, task = await _run_decided_by(store, "w1")
        _, _, _, decided = await _complete_with(store, task, _next_decision(run, end=True))
        assert decided == {0: []}
        ended = await store.get_run(run.run_id)
        assert (ended.status, ended.result, ended.last_sequence_num) == ("completed", "2", 7)


@pytest.mark.parametrize("case", ["history moved", "another worker's decision", "end, task open"])
async def test_a_decision_made_ahead_on_another_history_writes_nothing(
    store: Store, case: str
) -> None:
    """Where the history is not what the decision assumed, or it would end a run that still
    has an open task, the results are recorded and the workflow task goes out as usual."""
    with trio.fail_after(10):
        run, task = await _run_decided_by(
            store,
            "w2" if case == "another worker's decision" else "w1",
            other_task=case == "end, task open",
        )
        if case == "history moved":
            async with store.transaction() as conn:
                locked = await store.lock_run(conn, run.run_id)
                await store.append_events(conn, locked, [NewEvent("signal_received", {})])
        done, handed, _, decided = await _complete_with(
            store, task, _next_decision(run, end=case == "end, task open")
        )
        assert list(done) == [0] and decided == {}
        types = [e.type for e in await store.load_events(run.run_id)]
        assert types[-2:] == ["activity_started", "activity_completed"]
        assert [t.kind for t in handed] in (["workflow"], [])  # claimed, or left pending
        assert (await store.get_run(run.run_id)).status == "running"
        pending = await store.pool.fetchval(
            "SELECT count(*) FROM durable_task_queue WHERE run_id = $1 AND kind = 'workflow' "
            "AND status IN ('pending', 'claimed')",
            run.run_id,
        )
        assert pending == 1


async def test_a_task_s_schedule_to_start_deadline_moves_with_its_visibility(
    store: Store, pool: Pool
) -> None:
    """The stored deadline is visible_at + schedule_to_start_s through every way a task goes
    back to pending: a retry after backoff, a release, a give-back, a requeued dead letter."""
    with trio.fail_after(10):
        run = await _run(store)
        await _activity(store, run, schedule_to_start_s=60, retry=RetryPolicy(max_attempts=3))
        assert await wrong_start_deadlines(pool) == 0
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            outcome = await store.fail_task(conn, task.task_id, task.lease_token, {"message": "x"})
        assert outcome.will_retry and await wrong_start_deadlines(pool) == 0
        # The backoff, skipped (deadline and all).
        await pool.execute(
            "UPDATE durable_task_queue SET visible_at = now(),"
            " start_deadline = now() + interval '60 s'"
        )
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            await store.release_task(conn, task, {"message": "holder lost"})
        assert await wrong_start_deadlines(pool) == 0
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            await store.unclaim(conn, task)
        assert await wrong_start_deadlines(pool) == 0
        (task,) = await _claim(store, "w1")
        async with store.transaction() as conn:
            await store.fail_task(
                conn, task.task_id, task.lease_token, {"message": "x"}, non_retryable=True
            )
        (letter,) = await store.list_dead_letters()
        async with store.transaction() as conn:
            await store.requeue_dead_letter(conn, letter.id)
        assert await wrong_start_deadlines(pool) == 0
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM durable_task_queue WHERE status = 'pending'"
                " AND start_deadline > now() + interval '59 s'"
            )
            == 1
        )


async def test_the_timeout_sweep_reads_only_the_tasks_that_are_due(
    store: Store, pool: Pool
) -> None:
    """Every activity has a schedule-to-start deadline (60 s by default), so a sweep that
    computed it would read every pending task each round; it reads the index of deadlines."""
    with trio.fail_after(20):
        run = await _run(store)
        await pool.execute(
            "INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type,"
            " activity_id, partition_key, schedule_to_start_s, start_deadline)"
            " SELECT gen_random_uuid(), $1, 'wf-1', 'activity', 'charge', 'a' || g, 'wf-1', 60,"
            " now() + interval '60 s' FROM generate_series(1, 3000) g",
            run.run_id,
        )
        await _activity(store, run, "due", schedule_to_start_s=0.05)
        await pool.execute("ANALYZE durable_task_queue")
        await trio.sleep(0.1)
        async with store.transaction() as conn:
            due = await store.timed_out_tasks(conn)
            (row,) = await conn.fetch(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["find_timed_out_tasks"], 500
            )
        assert [t.activity_id for t in due] == ["due"]
        plan = json.dumps(json.loads(row[0]))
        assert "durable_task_queue_start_deadline" in plan
        assert (await store.seconds_until_timeout() or 0) < 0  # "due" is overdue


def _rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows the scans of ``table`` in an EXPLAIN ANALYZE plan returned, all loops together."""
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Relation Name") == table else 0
    return own + sum(_rows_read(child, table) for child in plan.get("Plans", []))


async def test_the_wake_up_sweep_names_new_and_straggling_keys_from_a_few_rows_per_key(
    store: Store, pool: Pool
) -> None:
    """The due scanner pokes the claimers of task types whose tasks became visible since its
    last round, later than they were written (retries after their backoff), or whose next
    task has waited visible too long (a wake-up lost). A task visible when written was
    announced then. A backlog of 3,000 tasks is one type's worth of index probes, not 3,000."""
    with trio.fail_after(20):
        run = await _run(store)
        await pool.execute(
            "INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type,"
            " activity_id, partition_key, visible_at)"
            " SELECT gen_random_uuid(), $1, 'wf-1', 'activity', 'charge', 'a' || g, 'wf-1',"
            " now() - interval '1 hour' FROM generate_series(1, 3000) g",
            run.run_id,
        )
        await _activity(store, run, "later", atype="ship", visible_at=None)
        await pool.execute(
            "UPDATE durable_task_queue SET visible_at = now() + interval '1 hour'"
            " WHERE activity_type = 'ship'"
        )
        await _activity(store, run, "backoff", atype="refund")  # a retry, 0.3 s from now
        await pool.execute(
            "UPDATE durable_task_queue SET visible_at = now() + interval '0.3 s'"
            " WHERE activity_type = 'refund'"
        )
        await pool.execute("ANALYZE durable_task_queue")
        since = await store.now()
        await _activity(store, run, "new", atype="mail")  # announced as it is written
        await trio.sleep(0.4)
        keys, _, _ = await store.newly_visible_keys(since, straggling_after=60)
        assert sorted(keys) == ["activity:charge", "activity:refund"]
        keys, _, _ = await store.newly_visible_keys(await store.now(), straggling_after=7200)
        assert keys == []  # nothing new since, nothing waited two hours
        (row,) = await pool.fetch(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["newly_visible_keys"], since, 60.0
        )
        assert _rows_read(json.loads(row[0])[0]["Plan"], "durable_task_queue") < 20
