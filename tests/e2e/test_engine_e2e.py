"""The engine end to end: real control-plane and worker processes, some killed on purpose.

Each test starts its own `python -m everruns.server` on a fresh database and its own
`python -m everruns.worker tests.e2e.workflows`, drives them through `everruns.client.Client`,
and judges the outcome from three independent sources: the workflow's result and history (the
engine's own account), the execution log the activities write (what really ran, where, which
attempt), and, where a test is about the queue, the task rows in PostgreSQL. Every test runs
under an absolute deadline and `open_cluster` proves no process outlives it.
"""

from __future__ import annotations

import uuid
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from everruns._aio.pg import Pool
from everruns.client import HistoryEvent, WorkflowHandle
from everruns.errors import WorkflowFailed

from . import workflows
from .harness import Execution, monotonic, open_cluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.db]


def completed_ids(events: list[HistoryEvent]) -> Counter[str]:
    """How many ``activity_completed`` events each activity id has."""
    return Counter(str(e.data["activity_id"]) for e in events if e.type == "activity_completed")


def types_of(events: list[HistoryEvent]) -> list[str]:
    return [e.type for e in events]


def only(records: list[Execution], what: str) -> Execution:
    assert len(records) == 1, f"expected exactly one {what}, got {records}"
    return records[0]


async def history_has(handle: WorkflowHandle, event_type: str) -> bool:
    return any(e.type == event_type for e in await handle.history())


# --------------------------------------------------------------------------- happy paths


async def test_three_step_workflow_completes_with_combined_result(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path) as cluster:
            server = await cluster.start_server()
            # Beside serving, the control plane opens its pool to its size (10) ahead, every
            # connection with every statement prepared.
            await server.proc.wait_for_line(
                r"connection pool warm: \d+ of 10 connections with every statement prepared",
                timeout=20,
            )
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.three_steps, 20, workflow_id="three-steps"
                )
                assert handle.created
                assert await handle.result(timeout=30) == {
                    "a": 21,
                    "b": 42,
                    "c": "the answer is 42",
                }
                description = await handle.describe()
                events = await handle.history()

            assert description.status == "completed"
            assert description.result == {"a": 21, "b": 42, "c": "the answer is 42"}
            starts = cluster.log.records("start", workflow_id="three-steps")
            assert [(r.activity, r.activity_id, r.attempt) for r in starts] == [
                ("add_one", "1", 1),
                ("double", "2", 1),
                ("describe_number", "3", 1),
            ]
            assert [r.data["input"] for r in starts] == [20, 21, 42]
            assert completed_ids(events) == {"1": 1, "2": 1, "3": 1}
            assert types_of(events)[0] == "workflow_started"
            assert types_of(events)[-1] == "workflow_completed"
            # Each activity is scheduled only after the previous one's result is recorded.
            order = [
                (e.type, e.data.get("activity_id"))
                for e in events
                if e.type in ("activity_scheduled", "activity_completed")
            ]
            assert order == [
                ("activity_scheduled", "1"),
                ("activity_completed", "1"),
                ("activity_scheduled", "2"),
                ("activity_completed", "2"),
                ("activity_scheduled", "3"),
                ("activity_completed", "3"),
            ]


async def test_fan_out_of_100_activities_runs_each_exactly_once(
    database_url: str, tmp_path: Path
) -> None:
    count = 100
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.fan_out, {"count": count}, workflow_id="fan-out"
                )
                assert await handle.result(timeout=75) == [i * i for i in range(count)]
                events = await handle.history()

            expected_ids = {str(n) for n in range(1, count + 1)}
            starts = cluster.log.count_by_key("start", workflow_id="fan-out")
            ends = cluster.log.count_by_key("end", workflow_id="fan-out")
            assert len(starts) == count
            assert {activity_id for _, activity_id in starts} == expected_ids
            assert set(starts.values()) == {1}, f"ran more than once: {starts.most_common(3)}"
            assert ends == starts
            assert completed_ids(events) == dict.fromkeys(expected_ids, 1)
            scheduled = [e for e in events if e.type == "activity_scheduled"]
            assert len(scheduled) == count


async def test_durable_sleep_survives_a_control_plane_kill(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    sleep_s = 3.0
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(workflows.nap, sleep_s, workflow_id="nap")
            assert handle.run_id is not None
            run_id = uuid.UUID(handle.run_id)

            async def timer_started() -> bool:
                found = await pool.fetchval(
                    "SELECT count(*) FROM durable_workflow_events "
                    "WHERE run_id = $1 AND event_type = 'timer_started'",
                    run_id,
                )
                return bool(found)

            await wait_until(timer_started, timeout=30, what="the workflow started its timer")
            old_server = cluster.server
            assert old_server is not None
            assert await old_server.kill_and_wait() == -9
            killed_at = monotonic()
            await cluster.start_server(address=old_server.address)
            before = only(cluster.log.records("end", activity="stamp"), "'before' stamp")
            # Otherwise the test proves nothing: the timer must have been pending at the kill.
            assert killed_at < before.t + sleep_s, "the control plane was killed too late"

            async with cluster.client() as client:
                result = await client.get_handle("nap", handle.run_id).result(timeout=45)
                events = await client.get_handle("nap", handle.run_id).history()

            assert result == ["before", "after"]
            after = only(
                [r for r in cluster.log.records("start", activity="stamp") if r.activity_id != "1"],
                "'after' stamp",
            )
            assert after.data["label"] == "after"
            assert after.t - before.t >= sleep_s, (
                f"the sleep was cut short: {after.t - before.t:.3f} s < {sleep_s} s"
            )
            assert types_of(events).count("timer_started") == 1
            assert types_of(events).count("timer_fired") == 1
            started_at, fired_at = (
                e.time for e in events if e.type in ("timer_started", "timer_fired")
            )
            assert (fired_at - started_at).total_seconds() >= sleep_s


async def test_signal_wakes_a_waiting_workflow_with_its_payload(
    database_url: str, tmp_path: Path
) -> None:
    payload: dict[str, Any] = {
        "by": 'zoë ✓ "quoted" \'; DROP TABLE x; --',
        "big": 2**70,
        "ratio": 0.1,
        "nothing": None,
        "list": [1, "two", 3.5, True, {"nested": []}],
    }
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.await_approval, {"order": 7}, workflow_id="approval"
                )
                # Wait until the workflow has run and is blocked on the signal.
                await wait_until(
                    lambda: history_has(handle, "workflow_task_completed"),
                    timeout=30,
                    what="the workflow's first task completed",
                )
                assert (await handle.describe()).status == "running"
                await handle.signal("approve", payload)
                result = await handle.result(timeout=30)

            assert result == {"request": {"order": 7}, "approval": payload}
            assert type(result["approval"]["big"]) is int
            assert type(result["approval"]["ratio"]) is float


async def test_cancel_reaches_the_running_activity_and_ends_the_workflow_cancelled(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.cancellable, "job-1", workflow_id="cancellable"
                )
                await wait_until(
                    lambda: bool(cluster.log.records("start", activity="run_until_cancelled")),
                    timeout=30,
                    what="the long activity started",
                )
                asked_at = monotonic()
                await handle.cancel("the test asked")
                await wait_until(
                    lambda: bool(cluster.log.records("finally", activity="run_until_cancelled")),
                    timeout=10,
                    what="the long activity's finally block ran",
                )
                with pytest.raises(WorkflowFailed) as failure:
                    await handle.result(timeout=30)
                description = await handle.describe()
                events = await handle.history()

            finally_ran = only(
                cluster.log.records("finally", activity="run_until_cancelled"), "finally"
            )
            assert finally_ran.t - asked_at < 1.0, (
                f"cancel took {finally_ran.t - asked_at:.3f} s to reach the activity"
            )
            # It was a Trio cancellation at the activity's await, not a normal return.
            only(cluster.log.records("cancelled", activity="run_until_cancelled"), "cancelled")
            assert not cluster.log.records("end", activity="run_until_cancelled")
            assert failure.value.status == "cancelled"
            assert description.status == "cancelled"
            # The workflow's cleanup ran after the cancel, exactly once.
            cleanup_start = only(cluster.log.records("start", activity="cleanup"), "cleanup")
            only(cluster.log.records("end", activity="cleanup"), "cleanup end")
            assert cleanup_start.t > asked_at
            kinds = types_of(events)
            assert "workflow_cancel_requested" in kinds
            assert kinds.count("workflow_cancelled") == 1
            assert completed_ids(events)[cleanup_start.activity_id] == 1
            assert kinds.index("workflow_cancel_requested") < kinds.index("workflow_cancelled")


async def test_kill_9_of_the_worker_mid_workflow_loses_nothing_and_repeats_nothing(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            worker_a = await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.three_slow_steps, {"value": 1, "seconds": 2.0}, workflow_id="kill-9"
                )
            assert handle.run_id is not None
            run_id = uuid.UUID(handle.run_id)
            await wait_until(
                lambda: bool(cluster.log.records("start", activity="slow_step")),
                timeout=30,
                what="the 2nd activity started",
            )
            assert await worker_a.kill_and_wait() == -9

            async def released() -> bool:
                row = await pool.fetchrow(
                    "SELECT status, claimed_by FROM durable_task_queue "
                    "WHERE run_id = $1 AND kind = 'activity' AND activity_id = '2'",
                    run_id,
                )
                return row is not None and row["status"] == "pending"

            # The control plane sees the connection drop and releases the task at once.
            await wait_until(released, timeout=2.0, what="the dead worker's task was released")
            await cluster.start_worker("worker-b")
            async with cluster.client() as client:
                result = await client.get_handle("kill-9", handle.run_id).result(timeout=45)
                events = await client.get_handle("kill-9", handle.run_id).history()

            assert result == [2, 20, 23]
            log = cluster.log
            # Activity 1 ran once, before the kill; its recorded result was reused.
            quick = log.records("start", activity="quick_step", workflow_id="kill-9")
            first = only([r for r in quick if r.activity_id == "1"], "run of the 1st activity")
            assert first.worker == "worker-a"
            # Activity 2 ran at most twice, the second time on the new worker, and finished once.
            slow_starts = log.records("start", activity="slow_step")
            assert 1 <= len(slow_starts) <= 2
            assert slow_starts[0].worker == "worker-a"
            assert slow_starts[-1].worker == "worker-b"
            assert len(slow_starts) == 2, "the killed attempt must have been re-run"
            assert slow_starts[1].attempt > slow_starts[0].attempt
            slow_end = only(log.records("end", activity="slow_step"), "slow_step end")
            assert slow_end.worker == "worker-b"
            third = only(
                [r for r in log.records("start", workflow_id="kill-9") if r.activity_id == "3"],
                "3rd activity",
            )
            assert third.worker == "worker-b"
            # No activity completed twice, by its own account or by the engine's.
            assert set(log.count_by_key("end", workflow_id="kill-9").values()) == {1}
            assert completed_ids(events) == {"1": 1, "2": 1, "3": 1}


async def test_kill_9_in_a_chain_of_runs_continues_it_on_another_worker(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """A workflow that continues as new, its worker killed in the chain's second run: the
    killed attempt runs again on another worker, the chain goes on from where it was (no run
    started twice, none lost), and the first run's handle returns the last run's result."""
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            worker_a = await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                first = await client.start_workflow(
                    workflows.slow_countdown,
                    {"left": 3, "total": 0, "seconds": 1.5},
                    workflow_id="chain",
                )

            def started(left: int) -> bool:
                return any(
                    r.data["input"]["value"] == left
                    for r in cluster.log.records("start", activity="slow_step")
                )

            await wait_until(lambda: started(2), timeout=30, what="the 2nd run's step started")
            assert await worker_a.kill_and_wait() == -9
            await cluster.start_worker("worker-b")
            async with cluster.client() as client:
                # the first run's handle: followed to the chain's last run
                result = await client.get_handle("chain", first.run_id).result(timeout=45)
            rows = await pool.fetch(
                "SELECT id, status, continued_run_id FROM durable_workflow_instances "
                "WHERE workflow_id = 'chain' ORDER BY created_at"
            )
    assert result == {"total": (3 + 2 + 1 + 0) * 10}
    assert [r["status"] for r in rows] == ["continued_as_new"] * 3 + ["completed"]
    # each run names the next: one chain, no run started twice
    assert [r["continued_run_id"] for r in rows[:-1]] == [r["id"] for r in rows[1:]]
    ends = Counter(r.data["result"] for r in cluster.log.records("end", activity="slow_step"))
    assert ends == {30: 1, 20: 1, 10: 1, 0: 1}
    starts = cluster.log.records("start", activity="slow_step")
    assert next(r.worker for r in starts if r.data["input"]["value"] == 2) == "worker-a"
    assert starts[-1].worker == "worker-b"


async def test_start_is_idempotent_for_a_running_workflow_id(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                first = await client.start_workflow(
                    workflows.await_approval, {"n": 1}, workflow_id="idempotent"
                )
                second = await client.start_workflow(
                    workflows.await_approval, {"n": 2}, workflow_id="idempotent"
                )
                assert first.created and not second.created
                assert second.run_id == first.run_id
                runs = await pool.fetchval(
                    "SELECT count(*) FROM durable_workflow_instances WHERE workflow_id = $1",
                    "idempotent",
                )
                assert runs == 1
                await first.signal("approve", "yes")
                # The first start's input won; the second start changed nothing.
                assert await second.result(timeout=30) == {"request": {"n": 1}, "approval": "yes"}
                # An id whose run has ended starts a new run.
                third = await client.start_workflow(
                    workflows.await_approval, {"n": 3}, workflow_id="idempotent"
                )
                assert third.created and third.run_id != first.run_id
                await third.cancel()


async def test_two_workers_never_run_the_same_attempt_at_once(
    database_url: str, tmp_path: Path
) -> None:
    capacity = 6
    per_workflow = 40
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            async with trio.open_nursery() as starting:
                for name in ("worker-a", "worker-b"):
                    starting.start_soon(
                        partial(cluster.start_worker, name, max_concurrent_tasks=capacity)
                    )
            async with cluster.client() as client:
                handles = [
                    await client.start_workflow(
                        workflows.fan_out,
                        {"count": per_workflow, "seconds": 0.1},
                        workflow_id=f"shared-{n}",
                    )
                    for n in range(3)
                ]
                for handle in handles:
                    assert await handle.result(timeout=60) == [i * i for i in range(per_workflow)]

            starts = cluster.log.records("start", activity="square")
            ends = cluster.log.records("end", activity="square")
            assert len({r.key for r in starts}) == 3 * per_workflow
            attempts = Counter((r.key, r.attempt) for r in starts)
            duplicated = [a for a, n in attempts.items() if n > 1]
            assert not duplicated, f"the same attempt ran more than once: {duplicated[:5]}"
            # With no fault injected, nothing needs a second attempt either.
            assert set(Counter(r.key for r in starts).values()) == {1}
            assert {r.worker for r in starts} == {"worker-a", "worker-b"}
            # Neither worker ran more activities at once than its slots allow.
            for worker in ("worker-a", "worker-b"):
                assert peak_concurrency(starts, ends, worker) <= capacity


def peak_concurrency(starts: list[Execution], ends: list[Execution], worker: str) -> int:
    """The most activity bodies ``worker`` had running at one moment."""
    marks = [(r.t, 1) for r in starts if r.worker == worker]
    marks += [(r.t, -1) for r in ends if r.worker == worker]
    running = peak = 0
    # At equal times count the end first: a slot freed and reused is not an overlap.
    for _, step in sorted(marks, key=lambda m: (m[0], m[1])):
        running += step
        peak = max(peak, running)
    return peak


# ------------------------------------------------------------------------------ bad input


async def test_a_workflow_type_no_worker_serves_is_accepted_and_waits(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    "nobody_serves_this", {"x": 1}, workflow_id="unserved"
                )
                assert handle.created
                description = await handle.describe()
                assert description.status == "pending"
                assert description.waiting_for_worker
                # A type that is served does not say so.
                served = await client.start_workflow(
                    workflows.await_approval, None, workflow_id="served"
                )
                await wait_until(
                    lambda: history_has(served, "workflow_task_completed"),
                    timeout=30,
                    what="the served workflow ran",
                )
                assert not (await served.describe()).waiting_for_worker
                await handle.cancel()
                await served.cancel()


async def test_an_activity_returning_a_non_json_value_fails_without_retries(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.bad_result, None, workflow_id="bad-result"
                )
                outcome = await handle.result(timeout=30)
                events = await handle.history()

            assert outcome["error_type"] is not None, "the activity's bad result was accepted"
            assert "set" in outcome["message"], outcome
            assert outcome["attempt"] == 1
            only(cluster.log.records("start", activity="returns_a_set"), "attempt")
            failed = [e.data for e in events if e.type == "activity_failed"]
            assert len(failed) == 1
            assert failed[0]["will_retry"] is False
            assert failed[0]["error"]["non_retryable"] is True
            assert "set" in failed[0]["error"]["message"]
