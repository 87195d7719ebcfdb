"""Fault injection: real control planes, workers and PostgreSQL, broken on purpose.

Each test runs a workload whose activities record every execution in the execution log (a file
that survives any process or database fault), injects one fault — a failing or hanging activity,
a missing worker, a poison task, SIGSTOP/SIGTERM/SIGKILL of a worker or a control plane, a
PostgreSQL restart, a second control plane — and then judges the outcome from three sources:
the workflows' final state and history (the engine's account), the execution log (what really
ran, where, which attempt) and the rows in PostgreSQL. Each test says which guarantee it asserts
for an activity's side effect: exactly once where leases guarantee it, at least once where the
design accepts a repeat (a worker that hung past its lease). Timeouts come from the environment
and are small, every test has an absolute deadline, and `open_cluster` proves that no process
outlives its test. This file must not start anything outside `tests.e2e.harness`, nor touch the
session's database server beyond the per-test database it is given.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._aio.pg import Pool
from everruns.client import Client, HistoryEvent, WorkflowHandle
from everruns.errors import ResourceExhausted

from . import workflows
from .harness import (
    Cluster,
    Execution,
    monotonic,
    open_cluster,
    peak_concurrency,
    private_postgres,
    start_private_postgres,
    stop_private_postgres,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.db]

FAST_RECLAIM = {"EVERRUNS_STALE_AFTER": "3", "EVERRUNS_RECLAIM_INTERVAL": "0.5"}
"""Server settings of the tests about hung holders: stale after 3 s, looked for twice a second."""


# ---------------------------------------------------------------------------------- helpers


def of_type(
    events: list[HistoryEvent], event_type: str, activity_id: str | None = None
) -> list[HistoryEvent]:
    """The events of one type (of one activity), in history order."""
    return [
        e
        for e in events
        if e.type == event_type
        and (activity_id is None or str(e.data.get("activity_id")) == activity_id)
    ]


def completed_ids(events: list[HistoryEvent]) -> Counter[str]:
    """How many ``activity_completed`` events each activity id has."""
    return Counter(str(e.data["activity_id"]) for e in events if e.type == "activity_completed")


def step(activity: str, input: Any = None, **extra: Any) -> dict[str, Any]:
    """One step of the `run_steps` workflow."""
    return {"activity": activity, "input": input, **extra}


def retry(max_attempts: int, initial: float = 0.1, **extra: Any) -> dict[str, Any]:
    """A retry policy as `RetryPolicy.from_dict` reads it."""
    return {"max_attempts": max_attempts, "initial_interval": initial, **extra}


def only(items: list[Any], what: str) -> Any:
    """The one item of ``items`` (asserting there is exactly one)."""
    assert len(items) == 1, f"expected exactly one {what}, got {items}"
    return items[0]


def starts_by_key(records: list[Execution]) -> Counter[tuple[str, str]]:
    """How many times each activity (run id, activity id) started, over all attempts."""
    return Counter(r.key for r in records if r.event == "start")


def run_id_of(handle: WorkflowHandle) -> uuid.UUID:
    assert handle.run_id is not None
    return uuid.UUID(handle.run_id)


async def task_row(pool: Pool, handle: WorkflowHandle, activity_id: str) -> Any:
    """The queue row of one activity of the handle's run (None before it is scheduled)."""
    return await pool.fetchrow(
        "SELECT * FROM durable_task_queue WHERE run_id = $1 AND activity_id = $2",
        run_id_of(handle),
        activity_id,
    )


async def dead_letters(pool: Pool) -> list[Any]:
    """Every dead-letter row, oldest first."""
    return list(await pool.fetch("SELECT * FROM durable_dead_letter_queue ORDER BY dead_at, id"))


def logged(cluster: Cluster, event: str, **filters: Any) -> list[Execution]:
    """The execution-log records of one event (``start``, ``end``, ...), filtered."""
    return cluster.log.records(event, **filters)


async def open_breaker(cluster: Cluster, client: Client, key: str = "fails") -> None:
    """Fail five one-attempt activities of type `fails` so that its breaker opens."""
    failing = [
        await client.start_workflow(
            workflows.run_steps,
            {"steps": [step("fails", {"n": n}, retry=retry(1))]},
            workflow_id=f"trip-{n}",
        )
        for n in range(5)
    ]
    for handle in failing:
        assert (await handle.result(timeout=20))[0]["ok"] is False
    states = (await cluster.cli("--json", "breakers", "list")).json()["breakers"]
    assert [b["state"] for b in states if b["key"] == key] == ["open"], states


# ------------------------------------------------------------------------- retries and errors


async def test_retries_back_off_exponentially_and_keep_every_error(
    database_url: str, tmp_path: Path
) -> None:
    """An activity that fails twice, then succeeds: exactly three executions, spaced by the
    policy's backoff (initial * 2^k, ±10 % jitter), and every failed attempt's error (type,
    message, traceback) visible in describe while it retries, in the history and in
    `everruns workflow show`."""
    initial = 0.8
    release = tmp_path / "release-3rd-attempt"
    spec = {"failures": 2, "release": str(release)}
    policy = retry(3, initial, backoff_coefficient=2.0, jitter=0.1)
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.run_steps,
                    {"steps": [step("flaky", spec, retry=policy)]},
                    workflow_id="retries",
                )
                # The third attempt is held running, so its predecessors' errors can be read.
                await wait_until(
                    lambda: len(logged(cluster, "start", activity="flaky")) == 3,
                    timeout=20,
                    what="the third attempt started",
                )
                pending = only(list((await handle.describe()).pending_activities), "activity")
                shown = await cluster.cli("workflow", "show", "retries")
                await trio.Path(release).touch()
                outcome = await handle.result(timeout=20)
                events = await handle.history()

            assert outcome == [{"ok": True, "result": {"attempt": 3}}]
            starts = logged(cluster, "start", activity="flaky")
            fails = logged(cluster, "failed", activity="flaky")
            assert [r.attempt for r in starts] == [1, 2, 3]
            assert [r.attempt for r in fails] == [1, 2]
            only(logged(cluster, "end", activity="flaky"), "successful attempt")
            # Backoff: attempt k+1 starts initial * 2^(k-1) (±10 %) after attempt k failed; the
            # delay is counted from the failure's commit, which follows the record, so the lower
            # bound is strict; the upper bound allows for claim latency.
            for k, (failed, nxt) in enumerate(zip(fails, starts[1:], strict=True), start=1):
                base = initial * 2 ** (k - 1)
                gap = nxt.t - failed.t
                assert base * 0.9 <= gap <= base * 1.1 + 1.0, (
                    f"retry {k} came {gap:.3f} s after the failure; expected {base:g} s ±10 %"
                )

            # describe() while retrying: both failed attempts' errors, with tracebacks.
            assert pending.status == "claimed" and pending.attempt == 3
            assert pending.max_attempts == 3
            assert [e["attempt"] for e in pending.error_history] == [1, 2]
            for n, error in enumerate(pending.error_history, start=1):
                assert error["type"] == "tests.e2e.workflows.FlakyError"
                assert error["message"] == f"attempt {n} of flaky failed on purpose"
                assert "raise FlakyError" in error["traceback"]
                assert "in flaky" in error["traceback"]
                assert error["non_retryable"] is False
            assert pending.last_error is not None
            assert pending.last_error["message"] == "attempt 2 of flaky failed on purpose"

            # The CLI shows the same history of errors.
            assert shown.code == 0, shown.describe()
            for n in (1, 2):
                line = f"attempt {n}: tests.e2e.workflows.FlakyError: attempt {n} of flaky failed"
                assert line in shown.stdout, shown.describe()

            # The history: two failures that will be retried, then one completion.
            failed_events = of_type(events, "activity_failed", "1")
            assert [(e.data["attempt"], e.data["will_retry"]) for e in failed_events] == [
                (1, True),
                (2, True),
            ]
            for n, event in enumerate(failed_events, start=1):
                assert event.data["error"]["type"] == "tests.e2e.workflows.FlakyError"
                assert event.data["error"]["message"] == f"attempt {n} of flaky failed on purpose"
                assert "raise FlakyError" in event.data["error"]["traceback"]
            done = only(of_type(events, "activity_completed", "1"), "completion")
            assert done.data["attempt"] == 3
            assert completed_ids(events) == {"1": 1}


async def test_non_retryable_errors_fail_at_once_into_the_dead_letter_queue(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """An error whose type the policy lists, and an `everruns.NonRetryableError`, each fail
    their activity after one attempt (of five allowed) with a dead letter, and the workflow
    catches the `ActivityError`; the same error type, unlisted, is retried."""
    five = retry(5, 0.1)
    steps = [
        step(
            "fails", {"error": "value"}, retry={**five, "non_retryable_error_types": ["ValueError"]}
        ),
        step("fails", {"error": "non_retryable"}, retry=five),
        step("fails", {"error": "value"}, retry=retry(2, 0.1)),
    ]
    with trio.fail_after(45):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.run_steps, {"steps": steps}, workflow_id="non-retryable"
                )
                listed, flagged, unlisted = await handle.result(timeout=30)
                events = await handle.history()

            assert listed["ok"] is False and flagged["ok"] is False and unlisted["ok"] is False
            assert (listed["error_type"], listed["attempt"]) == ("builtins.ValueError", 1)
            assert (flagged["error_type"], flagged["attempt"]) == (
                "everruns.errors.NonRetryableError",
                1,
            )
            assert flagged["details"]["non_retryable"] is True
            assert "attempt 1 of fails raised non_retryable" in flagged["message"]
            # The control: unlisted, the same error is retried until the attempts run out.
            assert (unlisted["error_type"], unlisted["attempt"]) == ("builtins.ValueError", 2)

            starts = logged(cluster, "start", activity="fails")
            assert Counter(r.activity_id for r in starts) == {"1": 1, "2": 1, "3": 2}
            for activity_id, attempts in (("1", [1]), ("2", [1]), ("3", [1, 2])):
                failed = of_type(events, "activity_failed", activity_id)
                assert [e.data["attempt"] for e in failed] == attempts
                assert [e.data["will_retry"] for e in failed] == [True] * (len(attempts) - 1) + [
                    False
                ]
            letters = await dead_letters(pool)
            assert len(letters) == 3
            by_task = {row["task_id"]: row for row in letters}
            for activity_id, tries in (("1", 1), ("2", 1), ("3", 2)):
                task = await task_row(pool, handle, activity_id)
                assert task["status"] == "dead"
                letter = by_task[task["id"]]
                assert letter["attempts"] == tries
                assert len(json.loads(letter["error_history"])) == tries
            assert not completed_ids(events)


# ---------------------------------------------------------------------------------- timeouts


async def test_server_enforces_heartbeat_start_to_close_and_schedule_to_start_timeouts(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """Each timeout kind is enforced by the control plane within seconds of its 1 s limit
    (not after the global 30 s), recorded as an ``activity_timed_out`` event with its kind, and
    counts as an attempt: heartbeat (a worker whose event loop hangs), start-to-close (an
    activity that never ends) and schedule-to-start (an activity type no worker serves)."""
    two = retry(2, 0.2)
    heartbeat_case = [
        step(
            "block_event_loop",
            {"seconds": 8},
            retry=two,
            options={"heartbeat_timeout": 1.0},
        )
    ]
    close_case = [
        step("run_until_cancelled", "s2c", retry=two, options={"start_to_close_timeout": 1.0})
    ]
    start_case = [
        step("nobody_serves_this", None, retry=two, options={"schedule_to_start_timeout": 1.0})
    ]
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server()
            # The hanging attempt must land on a worker of its own: its loop stops entirely.
            hung = await cluster.start_worker("worker-hung", max_concurrent_tasks=1)
            async with cluster.client() as client:
                heartbeat = await client.start_workflow(
                    workflows.run_steps, {"steps": heartbeat_case}, workflow_id="heartbeat"
                )
                await wait_until(
                    lambda: bool(logged(cluster, "start", activity="block_event_loop")),
                    timeout=20,
                    what="the hanging attempt started",
                )
                await cluster.start_worker("worker-b")
                close = await client.start_workflow(
                    workflows.run_steps, {"steps": close_case}, workflow_id="start-to-close"
                )
                start = await client.start_workflow(
                    workflows.run_steps, {"steps": start_case}, workflow_id="schedule-to-start"
                )
                hb_outcome = await heartbeat.result(timeout=30)
                observed_hb = monotonic()
                close_outcome = await close.result(timeout=30)
                start_outcome = await start.result(timeout=30)
                hb_events = await heartbeat.history()
                close_events = await close.history()
                start_events = await start.history()

            # Heartbeat: the hung attempt 1 timed out long before its 8 s block ended; attempt
            # 2 ran on the healthy worker. The hung worker's late result was refused.
            hung_start = logged(cluster, "start", activity="block_event_loop")[0]
            assert hung_start.worker == "worker-hung" and hung_start.attempt == 1
            assert observed_hb - hung_start.t < 6.0, "the heartbeat timeout was not enforced"
            assert hb_outcome == [{"ok": True, "result": 2}]
            timed_out = only(of_type(hb_events, "activity_timed_out", "1"), "heartbeat timeout")
            assert (timed_out.data["kind"], timed_out.data["attempt"]) == ("heartbeat", 1)
            assert timed_out.data["will_retry"] is True
            scheduled = only(of_type(hb_events, "activity_scheduled", "1"), "scheduled")
            waited = (timed_out.time - scheduled.time).total_seconds()
            assert waited < 4.0, f"heartbeat timeout of 1 s enforced after {waited:.1f} s"
            done = only(of_type(hb_events, "activity_completed", "1"), "completion")
            assert done.data["attempt"] == 2
            await wait_until(
                lambda: bool(hung.proc.output_matches("dropping the outcome")),
                timeout=15,
                what="the hung worker woke up and had its late result refused",
            )

            # Start-to-close: both attempts cancelled on the worker after 1 s, then dead.
            assert close_outcome[0]["ok"] is False
            assert close_outcome[0]["error_type"] == "ActivityTimeout"
            assert close_outcome[0]["details"] == {"kind": "start_to_close"}
            assert close_outcome[0]["attempt"] == 2
            close_timeouts = of_type(close_events, "activity_timed_out", "1")
            assert [
                (e.data["kind"], e.data["attempt"], e.data["will_retry"]) for e in close_timeouts
            ] == [
                ("start_to_close", 1, True),
                ("start_to_close", 2, False),
            ]
            runs = logged(cluster, "start", workflow_id="start-to-close")
            cancels = logged(cluster, "cancelled", workflow_id="start-to-close")
            assert [r.attempt for r in runs] == [1, 2]
            assert [r.attempt for r in cancels] == [1, 2], "the worker kept running it"
            for run, cancel in zip(runs, cancels, strict=True):
                assert 0.9 <= cancel.t - run.t < 3.0, f"cancelled {cancel.t - run.t:.2f} s in"

            # Schedule-to-start: no worker serves the type; each wait charged an attempt.
            assert start_outcome[0]["ok"] is False
            assert start_outcome[0]["details"] == {"kind": "schedule_to_start"}
            assert start_outcome[0]["attempt"] == 2
            start_timeouts = of_type(start_events, "activity_timed_out", "1")
            assert [
                (e.data["kind"], e.data["attempt"], e.data["will_retry"]) for e in start_timeouts
            ] == [
                ("schedule_to_start", 1, True),
                ("schedule_to_start", 2, False),
            ]
            assert not logged(cluster, "start", workflow_id="schedule-to-start")
            # Exhausted by timeouts, both tasks are dead letters.
            for handle in (close, start):
                task = await task_row(pool, handle, "1")
                assert (task["status"], task["attempt"]) == ("dead", 2)
            assert len(await dead_letters(pool)) == 2


# ------------------------------------------------------------------------------ dead letters


async def test_exhausted_tasks_are_dead_lettered_and_requeue_three_ways(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """Three activities exhaust their two attempts: each gets a dead letter (input, attempts,
    last error, error history), `everruns dlq list` shows them and the workflows receive the
    failure. Once the cause is fixed, each is requeued a different way — `everruns dlq requeue`,
    the client's RPC and the runbook's SQL UPDATE — and runs again, to completion, once."""
    fixed = tmp_path / "cause-fixed"
    specs = [{"error": "flaky", "fixed_flag": str(fixed), "n": n} for n in range(3)]
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server()
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handles = [
                    await client.start_workflow(
                        workflows.run_steps,
                        # Own breaker keys: six failures of one type would open its breaker.
                        {
                            "steps": [
                                step(
                                    "fails",
                                    spec,
                                    retry=retry(2),
                                    options={"breaker_key": f"dlq-{n}"},
                                )
                            ]
                        },
                        workflow_id=f"dlq-{n}",
                    )
                    for n, spec in enumerate(specs)
                ]
                outcomes = [await h.result(timeout=30) for h in handles]
                listed = await cluster.cli("--json", "dlq", "list")

                for outcome in outcomes:
                    (only_step,) = outcome
                    assert only_step["ok"] is False
                    assert only_step["error_type"] == "tests.e2e.workflows.FlakyError"
                    assert only_step["attempt"] == 2
                letters = await dead_letters(pool)
                assert len(letters) == 3
                by_workflow = {row["workflow_id"]: row for row in letters}
                for n, spec in enumerate(specs):
                    letter = by_workflow[f"dlq-{n}"]
                    task = await task_row(pool, handles[n], "1")
                    assert letter["task_id"] == task["id"] and task["status"] == "dead"
                    assert json.loads(letter["input"]) == spec
                    assert letter["attempts"] == 2
                    assert letter["activity_type"] == "fails"
                    assert "attempt 2 of fails raised flaky" in letter["last_error"]
                    history = json.loads(letter["error_history"])
                    assert [e["attempt"] for e in history] == [1, 2]
                    assert all(e["type"] == "tests.e2e.workflows.FlakyError" for e in history)
                    assert all("raise FlakyError" in e["traceback"] for e in history)
                    assert letter["requeued_at"] is None

                shown = listed.json()["dead_letters"]
                assert {d["id"] for d in shown} == {str(row["id"]) for row in letters}
                for entry in shown:
                    assert entry["attempts"] == 2
                    assert entry["last_error"]["type"] == "tests.e2e.workflows.FlakyError"
                    assert len(entry["error_history"]) == 2
                plain = await cluster.cli("dlq", "list")
                assert plain.code == 0 and all(str(r["id"]) in plain.stdout for r in letters)

                await trio.Path(fixed).touch()
                ids = [str(by_workflow[f"dlq-{n}"]["id"]) for n in range(3)]
                requeued = await cluster.cli("dlq", "requeue", ids[0])
                assert requeued.code == 0, requeued.describe()
                await client.requeue_dead_letter(ids[1])
                await pool.execute(
                    "UPDATE durable_dead_letter_queue SET requeued_at = NOW() WHERE id = $1",
                    uuid.UUID(ids[2]),
                )

                async def all_ran_again() -> bool:
                    rows = [await task_row(pool, h, "1") for h in handles]
                    return all(r["status"] == "completed" for r in rows)

                await wait_until(all_ran_again, timeout=15, what="the three requeued tasks ran")
                again = await cluster.cli("dlq", "requeue", ids[0])

            for n, handle in enumerate(handles):
                runs = logged(cluster, "start", workflow_id=f"dlq-{n}")
                # Two failed attempts, then one run after the requeue, with fresh attempts.
                assert [r.attempt for r in runs] == [1, 2, 1]
                end = only(logged(cluster, "end", workflow_id=f"dlq-{n}"), "run after requeue")
                assert end.data == {"attempt": 1, "fixed": True}
                task = await task_row(pool, handle, "1")
                assert json.loads(task["result"]) == {"attempt": 1, "fixed": True}
                assert task["requeue_count"] == 1
            rows = {str(r["id"]): r for r in await dead_letters(pool)}
            assert len(rows) == 3, "a requeued task that succeeded must not be dead-lettered again"
            assert all(rows[i]["requeued_at"] is not None for i in ids)
            # A dead letter is requeued once; asking again says so (exit 5: precondition).
            assert again.code == 5, again.describe()
            assert "already requeued" in again.stderr


# -------------------------------------------------------------------------- circuit breakers


async def test_open_breaker_holds_tasks_uncharged_until_reset(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """Five failures open the activity type's breaker (`everruns breakers list` says so); a
    task of that type then waits in the queue — not handed out, no attempt charged — until
    `everruns breakers reset` closes it, and then runs once. (How soon after the reset is
    `test_breaker_reset_wakes_waiting_claims_at_once`'s concern; here it only must run.)"""
    once = retry(1)
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server(env_extra={"EVERRUNS_RECLAIM_INTERVAL": "1"})
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                await open_breaker(cluster, client)
                listed = (await cluster.cli("--json", "breakers", "list")).json()["breakers"]
                breaker = only([b for b in listed if b["key"] == "fails"], "breaker")
                assert breaker["failure_count"] >= 5
                assert len(logged(cluster, "start", activity="fails")) == 5

                waiting = await client.start_workflow(
                    workflows.run_steps,
                    {"steps": [step("fails", {"failures": 0}, retry=once)]},
                    workflow_id="held",
                )

                async def scheduled() -> bool:
                    return await task_row(pool, waiting, "1") is not None

                await wait_until(scheduled, timeout=10, what="the held activity was scheduled")
                await trio.sleep(2.0)  # ample time for a claim, were one allowed
                held = await task_row(pool, waiting, "1")
                assert (held["status"], held["attempt"]) == ("pending", 0)
                assert not logged(cluster, "start", workflow_id="held")
                assert (await waiting.describe()).status == "running"

                asked_at = monotonic()
                reset = await cluster.cli("breakers", "reset", "fails")
                assert reset.code == 0, reset.describe()
                outcome = await waiting.result(timeout=30)
                states = (await cluster.cli("--json", "breakers", "list")).json()["breakers"]

            assert outcome == [{"ok": True, "result": {"attempt": 1, "fixed": False}}]
            run = only(logged(cluster, "start", workflow_id="held"), "run of the held task")
            assert run.attempt == 1, "waiting behind an open breaker was charged an attempt"
            assert run.t > asked_at
            assert all(b["state"] == "closed" for b in states if b["key"] == "fails"), states


async def test_breaker_reset_wakes_waiting_claims_at_once(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """After `everruns breakers reset`, a task held by the breaker starts within seconds, as
    every other change to the queue does (LISTEN/NOTIFY), not at the next periodic scan."""
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            # A long scan interval makes the wake-up's absence visible, not a matter of luck.
            await cluster.start_server(env_extra={"EVERRUNS_RECLAIM_INTERVAL": "60"})
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                await open_breaker(cluster, client)
                waiting = await client.start_workflow(
                    workflows.run_steps,
                    {"steps": [step("fails", {"failures": 0}, retry=retry(1))]},
                    workflow_id="held",
                )

                async def scheduled() -> bool:
                    return await task_row(pool, waiting, "1") is not None

                await wait_until(scheduled, timeout=10, what="the held activity was scheduled")
                await trio.sleep(1.0)
                assert (await task_row(pool, waiting, "1"))["status"] == "pending"
                assert (await cluster.cli("breakers", "reset", "fails")).code == 0
                with trio.move_on_after(4.0):
                    await waiting.result()
            assert logged(cluster, "end", workflow_id="held"), "not run within 4 s of the reset"


async def test_half_open_breaker_lets_one_probe_out_at_a_time_then_closes(
    database_url: str, tmp_path: Path
) -> None:
    """Without a reset, an open breaker turns half-open after its 30 s and a probe goes out
    promptly; it admits one probe task at a time, closes after two successful probes, and
    then lets the rest through. The held tasks share the breaker through an explicit
    ``breaker_key``; none is charged an attempt while it waits. Exactly once."""
    held = [
        step("sleepy", {"seconds": 0.5, "i": n}, options={"breaker_key": "fails"}) for n in range(3)
    ]
    with trio.fail_after(75):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server(env_extra={"EVERRUNS_RECLAIM_INTERVAL": "1"})
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                await open_breaker(cluster, client)
                opened = logged(cluster, "failed", activity="fails")[-1].t
                handles = [
                    await client.start_workflow(
                        workflows.run_steps, {"steps": [s]}, workflow_id=f"probe-{n}"
                    )
                    for n, s in enumerate(held)
                ]
                await wait_until(
                    lambda: bool(logged(cluster, "start", activity="sleepy")),
                    timeout=max(1.0, opened + 30.0 + 4.0 - monotonic()),
                    what="a probe went out within 4 s of the end of the open period",
                )
                outcomes = [await h.result(timeout=10) for h in handles]
                states = (await cluster.cli("--json", "breakers", "list")).json()["breakers"]

            assert outcomes == [[{"ok": True, "result": n}] for n in range(3)]
            runs = logged(cluster, "start", activity="sleepy")
            assert [r.attempt for r in runs] == [1, 1, 1]
            first = min(r.t for r in runs)
            assert first - opened >= 29.0, f"a held task ran {first - opened:.1f} s after opening"
            assert peak_concurrency(cluster.log.records(activity="sleepy")) == 1
            assert [b["state"] for b in states if b["key"] == "fails"] == ["closed"], states


# ------------------------------------------------------------------------------ backpressure


async def test_backpressure_bounds_each_worker_and_sheds_new_starts_without_dropping(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """A worker with 3 slots never runs more than 3 activities at once and reports that load in
    ``durable_workers.current_load``; while 4 tasks wait (EVERRUNS_MAX_PENDING_TASKS=4) the
    control plane refuses new starts with RESOURCE_EXHAUSTED and records nothing of them; every
    task accepted before runs exactly once, and starts are accepted again once the queue
    drains."""
    capacity, count = 3, 7
    release = tmp_path / "release"
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server(env_extra={"EVERRUNS_MAX_PENDING_TASKS": "4"})
            await cluster.start_worker("worker-a", max_concurrent_tasks=capacity)
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.fan_out_sleepy,
                    {"count": count, "release": str(release)},
                    workflow_id="fan-out",
                )
                await wait_until(
                    lambda: len(logged(cluster, "start")) == capacity,
                    timeout=20,
                    what="the worker filled its slots",
                )

                async def load() -> int:
                    value = await pool.fetchval(
                        "SELECT current_load FROM durable_workers WHERE id = 'worker-a'"
                    )
                    return int(value)

                # Heartbeats carry the load every 10 s; meanwhile it must never exceed capacity.
                loads: list[int] = []

                async def full() -> bool:
                    loads.append(await load())
                    return loads[-1] == capacity

                await wait_until(full, timeout=15, what="current_load showed the running tasks")
                pending = await pool.fetchval(
                    "SELECT count(*) FROM durable_task_queue WHERE status = 'pending'"
                )
                assert pending == count - capacity
                with pytest.raises(ResourceExhausted, match="EVERRUNS_MAX_PENDING_TASKS"):
                    await client.start_workflow(
                        workflows.fan_out_sleepy, {"count": 1}, workflow_id="shed"
                    )
                shed = await pool.fetchval(
                    "SELECT count(*) FROM durable_workflow_instances WHERE workflow_id = 'shed'"
                )
                assert shed == 0, "a refused start left a run behind"
                assert len(logged(cluster, "start")) == capacity, "ran more than its slots"

                await trio.Path(release).touch()
                assert await handle.result(timeout=30) == list(range(count))
                later = await client.start_workflow(
                    workflows.fan_out_sleepy, {"count": 2}, workflow_id="after"
                )
                assert await later.result(timeout=20) == [0, 1]
                events = await handle.history()

            assert max(loads) <= capacity
            records = cluster.log.records()
            assert peak_concurrency(records, "worker-a") == capacity
            starts = starts_by_key(logged(cluster, "start", workflow_id="fan-out"))
            assert len(starts) == count and set(starts.values()) == {1}
            assert len(logged(cluster, "end", workflow_id="fan-out")) == count
            assert completed_ids(events) == {str(n): 1 for n in range(1, count + 1)}


# ------------------------------------------------------------------------- crash and liveness


async def test_a_hung_worker_loses_its_task_and_its_late_result_is_refused(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """SIGSTOP a worker mid-activity (its connection stays open, so no drop is seen): with
    EVERRUNS_STALE_AFTER=3 the task is released by the stale-heartbeat rule and completed by
    another worker. SIGCONT the hung worker: its late completion is refused (stale lease). The
    side effect ran twice — at-least-once, as the design says for a holder that hung past its
    lease — but the history records exactly one completion, the new holder's."""
    spec = {"steps": [step("sleepy", {"seconds": 1.5, "i": 1})]}
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server(env_extra=FAST_RECLAIM)
            # One slot: while hung it has no claim in flight that could grab the released task.
            hung = await cluster.start_worker("worker-hung", max_concurrent_tasks=1)
            async with cluster.client() as client:
                handle = await client.start_workflow(workflows.run_steps, spec, workflow_id="hang")
                await wait_until(
                    lambda: bool(logged(cluster, "start", activity="sleepy")),
                    timeout=20,
                    what="the activity started on the worker that will hang",
                )
                hung.pause()
                paused_at = monotonic()
                await cluster.start_worker("worker-b")
                outcome = await handle.result(timeout=20)
                released_after = (
                    only([r for r in logged(cluster, "start") if r.worker == "worker-b"], "rerun").t
                    - paused_at
                )
                mark = len(hung.proc.lines)
                hung.resume()
                await wait_until(
                    lambda: bool(hung.proc.output_matches("dropping the outcome", since=mark)),
                    timeout=10,
                    what="the resumed worker reported and was refused",
                )
                events = await handle.history()

            assert outcome == [{"ok": True, "result": 1}]
            assert released_after < 8.0, f"released {released_after:.1f} s after the hang"
            runs = logged(cluster, "start", activity="sleepy")
            assert [(r.worker, r.attempt) for r in runs] == [("worker-hung", 1), ("worker-b", 2)]
            # At least once: both bodies ran. After SIGCONT the hung one finished (or was
            # stopped, had its lost lease been noticed first) — and was refused either way.
            assert [r.worker for r in logged(cluster, "end")].count("worker-b") == 1
            assert any(
                r.worker == "worker-hung" and r.event in ("end", "cancelled")
                for r in cluster.log.records()
            )
            timed_out = only(of_type(events, "activity_timed_out", "1"), "stale release")
            assert (timed_out.data["kind"], timed_out.data["attempt"]) == ("heartbeat", 1)
            done = only(of_type(events, "activity_completed", "1"), "completion")
            assert done.data["attempt"] == 2
            started = [
                e for e in of_type(events, "activity_started", "1") if e.data["attempt"] == 2
            ]
            assert only(started, "start event of attempt 2").data["worker_id"] == "worker-b"
            task = await task_row(pool, handle, "1")
            assert (task["status"], task["attempt"]) == ("completed", 2)
            assert json.loads(task["result"]) == 1


async def test_a_healthy_long_activity_survives_a_short_stale_limit(
    database_url: str, tmp_path: Path
) -> None:
    """With EVERRUNS_STALE_AFTER=3, an activity that runs 5 s on a healthy worker is not
    reclaimed: the worker heartbeats often enough for the limit the control plane enforces.
    Exactly once (no fault is injected)."""
    spec = {"steps": [step("sleepy", {"seconds": 4.5, "i": 7}, retry=retry(1))]}
    with trio.fail_after(40):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server(env_extra=FAST_RECLAIM)
            await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handle = await client.start_workflow(workflows.run_steps, spec, workflow_id="long")
                outcome = await handle.result(timeout=30)
                events = await handle.history()
            assert not of_type(events, "activity_timed_out"), "a healthy holder was reclaimed"
            assert [r.attempt for r in logged(cluster, "start")] == [1]
            assert outcome == [{"ok": True, "result": 7}]


async def test_a_task_that_kills_its_workers_ends_in_the_dead_letter_queue(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """A poison activity ``kill -9``s every worker that runs it. Each death is seen as a
    dropped connection, releases the task and counts the attempt; after max_attempts=3 it is a
    dead letter instead of a loop, the workflow catches the failure, and the killed workers are
    ``lost`` in ``durable_workers``.

    The first worker starts the activity ahead of its decision (the run's first workflow
    task). Killed before the decision is applied, that run counts no attempt, and the
    workflow task, handed out again, starts nothing ahead: four workers die. Killed after
    (the decision was on its way and got applied), the run is attempt 1: three die."""
    spec = {"steps": [step("kill_own_worker", "poison", retry=retry(3, 0.1))]}
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server()
            victim = await cluster.start_worker("victim-1")
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.run_steps, spec, workflow_id="poison"
                )
                deaths = 0
                while True:
                    assert await victim.wait() == -9, victim.tail()
                    deaths += 1
                    name = f"victim-{deaths}"

                    async def lost(name: str = name) -> bool:
                        status = await pool.fetchval(
                            "SELECT status FROM durable_workers WHERE id = $1", name
                        )
                        return bool(status == "lost")

                    # Marked lost once its tasks are released (or dead-lettered).
                    await wait_until(lost, timeout=10, what=f"{name} was marked lost")
                    row = await task_row(pool, handle, "1")
                    if row is not None and row["status"] == "dead":
                        break
                    assert deaths < 4, f"still {row and row['status']} after {deaths} deaths"
                    victim = await cluster.start_worker(f"victim-{deaths + 1}")
                # Only now a worker that survives: nothing is left for it to be killed by.
                await cluster.start_worker("survivor")
                (outcome,) = await handle.result(timeout=20)
                events = await handle.history()
                workers = {w.id: w.status for w in await client.list_workers(include_stopped=True)}

            assert outcome["ok"] is False
            assert (outcome["error_type"], outcome["attempt"]) == ("WorkerLost", 3)
            runs = logged(cluster, "start", activity="kill_own_worker")
            counted = [("victim-2", 1), ("victim-3", 2), ("victim-4", 3)]
            if deaths == 3:  # the run started ahead was recorded: it is attempt 1
                counted = [("victim-1", 1), ("victim-2", 2), ("victim-3", 3)]
            else:  # started ahead, never recorded, then three counted attempts
                counted = [("victim-1", 1), *counted]
            assert deaths in (3, 4)
            assert [(r.worker, r.attempt) for r in runs] == counted
            failed = of_type(events, "activity_failed", "1")
            assert [(e.data["attempt"], e.data["will_retry"]) for e in failed] == [
                (1, True),
                (2, True),
                (3, False),
            ]
            assert all(e.data["error"]["type"] == "WorkerLost" for e in failed)
            letter = only(await dead_letters(pool), "dead letter")
            assert letter["attempts"] == 3
            assert [e["attempt"] for e in json.loads(letter["error_history"])] == [1, 2, 3]
            victims = [f"victim-{n}" for n in range(1, deaths + 1)]
            for name in victims:
                assert workers[name] == "lost", workers
            assert workers["survivor"] == "active"
            rows = await pool.fetch(
                "SELECT id, status FROM durable_workers WHERE id LIKE 'victim-%' ORDER BY id"
            )
            assert [(r["id"], r["status"]) for r in rows] == [(name, "lost") for name in victims]


async def test_sigterm_drains_a_worker_within_its_grace_period(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """SIGTERM to a worker running two activities with a 2.5 s grace period: it is listed as
    ``draining``; the 1 s activity finishes and is reported by that worker; the 30 s one is cancelled when the grace ends and
    released, and another worker starts it at once (not after 30 s). The drained worker exits
    cleanly, holds no claim, and is ``stopped``. Exactly once for the short activity; the long
    one's first attempt was cut short, so it started twice and ended once."""
    grace = 2.5
    steps = [
        step("sleepy", {"seconds": 1.0, "i": "short"}),
        step("sleepy", {"seconds": 30.0, "retry_seconds": 0.5, "i": "long"}),
    ]
    with trio.fail_after(60):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server()
            draining = await cluster.start_worker(
                "worker-a", env_extra={"EVERRUNS_WORKER_GRACE_PERIOD": str(grace)}
            )
            async with cluster.client() as client:
                handle = await client.start_workflow(
                    workflows.run_steps, {"steps": steps, "parallel": True}, workflow_id="drain"
                )
                await wait_until(
                    lambda: len(logged(cluster, "start")) == 2,
                    timeout=20,
                    what="both activities started",
                )
                await cluster.start_worker("worker-b")
                draining.terminate()
                signalled = monotonic()

                async def reported_draining() -> bool:
                    status = await pool.fetchval(
                        "SELECT status FROM durable_workers WHERE id = 'worker-a'"
                    )
                    return bool(status == "draining")

                # While its grace period runs, the worker is listed as draining.
                await wait_until(reported_draining, timeout=grace, what="worker-a was draining")
                code = await draining.wait()
                exited = monotonic()
                outcome = await handle.result(timeout=20)
                events = await handle.history()
                workers = {w.id: w.status for w in await client.list_workers(include_stopped=True)}
                held = await pool.fetchval(
                    "SELECT count(*) FROM durable_task_queue WHERE claimed_by = 'worker-a'"
                )

            assert code == 0, draining.tail()
            assert grace - 0.2 <= exited - signalled < grace + 5.0
            assert outcome == [{"ok": True, "result": "short"}, {"ok": True, "result": "long"}]
            short_runs = [r for r in logged(cluster, "start") if r.data["input"]["i"] == "short"]
            long_runs = [r for r in logged(cluster, "start") if r.data["input"]["i"] == "long"]
            # The short one: one run, finished inside the grace period, reported by worker-a.
            (short,) = short_runs
            assert short.worker == "worker-a"
            short_end = only(
                [r for r in logged(cluster, "end") if r.key == short.key], "short activity's end"
            )
            assert short_end.t - signalled < grace
            started = of_type(events, "activity_started", short.activity_id)
            assert [e.data["worker_id"] for e in started] == ["worker-a"]
            # The long one: cancelled at the end of the grace period, restarted elsewhere at once.
            assert [(r.worker, r.attempt) for r in long_runs] == [("worker-a", 1), ("worker-b", 2)]
            cancelled = only(
                [r for r in logged(cluster, "cancelled") if r.key == long_runs[0].key], "cancel"
            )
            assert grace - 0.2 <= cancelled.t - signalled < grace + 1.5
            pickup = long_runs[1].t - cancelled.t
            assert pickup < 3.0, f"the released task waited {pickup:.1f} s for another worker"
            released = of_type(events, "activity_failed", long_runs[0].activity_id)
            assert [(e.data["attempt"], e.data["will_retry"]) for e in released] == [(1, True)]
            assert completed_ids(events) == {short.activity_id: 1, long_runs[0].activity_id: 1}
            assert held == 0
            assert workers["worker-a"] == "stopped"
            assert draining.proc.output_matches("drained and stopped")


# --------------------------------------------------------------------- control plane and db


async def test_workers_ride_out_control_plane_sigterm_and_kill_9(
    database_url: str, tmp_path: Path
) -> None:
    """The control plane is stopped twice while activities run — SIGTERM, then ``kill -9`` —
    and brought back on the same address. Workers keep running their activities, retry their
    calls with backoff until a control plane answers, then report their results; every workflow
    completes. Exactly once: no outage outlasts the 30 s stale limit, so the leases
    hold and no activity runs or completes twice."""
    count = 4
    with trio.fail_after(75):
        async with open_cluster(database_url, tmp_path / "run") as cluster:
            await cluster.start_server()
            worker = await cluster.start_worker("worker-a")
            async with cluster.client() as client:
                handles = []
                for n, kill in enumerate((False, True)):
                    handle = await client.start_workflow(
                        workflows.fan_out_sleepy,
                        {"count": count, "seconds": 2.5},
                        workflow_id=f"outage-{n}",
                    )
                    handles.append(handle)
                    workflow_id = f"outage-{n}"

                    def all_started(workflow_id: str = workflow_id) -> bool:
                        return len(logged(cluster, "start", workflow_id=workflow_id)) == count

                    await wait_until(
                        all_started,
                        timeout=20,
                        what=f"workflow {n}'s activities all started",
                    )
                    mark = len(worker.proc.lines)
                    await cluster.restart_server(kill=kill)
                    assert not logged(cluster, "end", workflow_id=f"outage-{n}"), (
                        "the activities ended before the outage; the test proves nothing"
                    )
                    assert await handle.result(timeout=30) == list(range(count))
                    # It backed off while no control plane answered (then reported its results).
                    assert worker.proc.output_matches("unreachable, retrying in", since=mark)
                histories = [await h.history() for h in handles]

            assert worker.proc.returncode is None
            first, second = cluster.servers[:2]
            assert first.proc.returncode is not None and second.proc.returncode == -9
            for n, events in enumerate(histories):
                starts = starts_by_key(logged(cluster, "start", workflow_id=f"outage-{n}"))
                ends = Counter(r.key for r in logged(cluster, "end", workflow_id=f"outage-{n}"))
                assert len(starts) == count and set(starts.values()) == {1}
                assert ends == starts
                assert completed_ids(events) == {str(i): 1 for i in range(1, count + 1)}
                assert not of_type(events, "activity_failed")
                assert not of_type(events, "activity_timed_out")


async def test_everything_completes_across_a_postgresql_restart(tmp_path: Path) -> None:
    """PostgreSQL (a private one: the session's database is left alone) is stopped and started
    again while activities run. The control plane survives the outage and reconnects; workers
    retry; every workflow completes. Exactly once: the outage is far shorter than the stale
    limit, so nothing runs twice, and nothing accepted is lost. (Duties run every 0.5 s here so
    that the outage certainly meets one, as a real restart of several seconds would.)"""
    count = 4
    async with private_postgres(tmp_path / "pg") as handle:
        with trio.fail_after(90):
            async with open_cluster(handle.url, tmp_path / "run") as cluster:
                server = await cluster.start_server(env_extra={"EVERRUNS_RECLAIM_INTERVAL": "0.5"})
                await cluster.start_worker("worker-a")
                async with cluster.client() as client:
                    runs = [
                        await client.start_workflow(
                            workflows.fan_out_sleepy,
                            {"count": count, "seconds": 4.0},
                            workflow_id=f"pg-{n}",
                        )
                        for n in range(2)
                    ]
                    await wait_until(
                        lambda: len(logged(cluster, "start")) == 2 * count,
                        timeout=20,
                        what="every activity started",
                    )
                    await stop_private_postgres(handle)
                    assert not logged(cluster, "end"), "nothing ran across the outage"
                    await trio.sleep(1.5)
                    again = await start_private_postgres(tmp_path / "pg")
                    assert again.url == handle.url, "PostgreSQL came back on another port"
                    async with trio.open_nursery() as watching:

                        async def fail_if_server_exits() -> None:
                            code = await server.wait()
                            raise AssertionError(
                                f"the control plane exited ({code}) across the PostgreSQL "
                                f"restart\n{server.tail()}"
                            )

                        watching.start_soon(fail_if_server_exits)
                        results = [await r.result(timeout=45) for r in runs]
                        histories = [await r.history() for r in runs]
                        watching.cancel_scope.cancel()
                assert server.proc.returncode is None, server.tail()
                async with pg.connect(handle.url) as conn:
                    statuses = await conn.fetch(
                        "SELECT kind, status, count(*) AS n FROM durable_task_queue "
                        "GROUP BY kind, status"
                    )

    assert results == [list(range(count))] * 2
    starts = starts_by_key(cluster.log.records("start"))
    assert len(starts) == 2 * count and set(starts.values()) == {1}
    for events in histories:
        assert completed_ids(events) == {str(i): 1 for i in range(1, count + 1)}
    # Every activity completed; a workflow task made pending by an event that the final
    # replay had already seen is dropped ("cancelled") when the run ends; nothing is left
    # pending or claimed.
    assert {r["status"] for r in statuses if r["kind"] == "activity"} == {"completed"}
    assert {r["status"] for r in statuses} <= {"completed", "cancelled"}


async def test_two_control_planes_share_one_database(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """Two control planes on one database, each with its own worker: all workflows complete,
    no activity attempt runs twice and no activity runs on two workers at once (exactly once).
    Then the first control plane is killed while its worker holds tasks: the second keeps the
    background duties going — it reclaims the stranded tasks for a worker of its own and fires
    the durable timer. The stranded activities run again: at-least-once, as the design says of
    a holder cut off from every control plane past its lease."""
    with trio.fail_after(75):
        async with open_cluster(database_url, tmp_path / "run", server_env=FAST_RECLAIM) as cluster:
            one = await cluster.start_server()
            two = await cluster.start_server()
            await cluster.start_worker("worker-1", address=one.address)
            second = await cluster.start_worker("worker-2", address=two.address)
            async with cluster.client(one.address) as c1, cluster.client(two.address) as c2:
                shared = [
                    await (c1, c2)[n % 2].start_workflow(
                        workflows.fan_out_sleepy,
                        {"count": 25, "seconds": 0.05},
                        workflow_id=f"shared-{n}",
                    )
                    for n in range(4)
                ]
                for handle in shared:
                    assert await handle.result(timeout=30) == list(range(25))
                shared_events = [await h.history() for h in shared]

                # Leave worker-1, on the control plane about to die, as the only worker.
                second.terminate()
                assert await second.wait() == 0
                nap = await c1.start_workflow(workflows.nap, 3.0, workflow_id="nap")
                await c1.start_workflow(
                    workflows.fan_out_sleepy,
                    {"count": 3, "seconds": 1.5},
                    workflow_id="stranded",
                )

                async def timer_started() -> bool:
                    return bool(of_type(await nap.history(), "timer_started"))

                await wait_until(timer_started, timeout=15, what="the nap timer started")
                await wait_until(
                    lambda: len(logged(cluster, "start", workflow_id="stranded")) == 3,
                    timeout=15,
                    what="worker-1 holds the stranded activities",
                )
                assert await one.kill_and_wait() == -9
                killed_at = await pool.fetchval("SELECT now()")
                await cluster.start_worker("worker-3", address=two.address)
                assert await c2.get_handle("stranded").result(timeout=30) == [0, 1, 2]
                assert await c2.get_handle("nap").result(timeout=20) == ["before", "after"]
                stranded_events = await c2.get_handle("stranded").history()
                nap_events = await c2.get_handle("nap").history()

            records = cluster.log.records()
            starts = [r for r in records if r.event == "start"]
            attempts = Counter((r.key, r.attempt) for r in starts)
            assert [a for a, n in attempts.items() if n > 1] == []
            # Per activity, one body at a time: a rerun starts only after the earlier one ended.
            for key in {r.key for r in starts}:
                runs = sorted((r for r in starts if r.key == key), key=lambda r: r.t)
                for earlier, later in itertools.pairwise(runs):
                    ended = [
                        r.t
                        for r in records
                        if r.key == key and r.pid == earlier.pid and r.event in ("end", "cancelled")
                    ]
                    assert ended and ended[0] <= later.t, f"{key} ran twice at once: {runs}"

            shared_starts = [r for r in starts if r.workflow_id.startswith("shared-")]
            assert {r.worker for r in shared_starts} == {"worker-1", "worker-2"}
            assert set(starts_by_key(shared_starts).values()) == {1}
            for events in shared_events:
                assert completed_ids(events) == {str(i): 1 for i in range(1, 26)}

            stranded_runs = logged(cluster, "start", workflow_id="stranded")
            for activity_id in ("1", "2", "3"):
                runs = [r for r in stranded_runs if r.activity_id == activity_id]
                assert [(r.worker, r.attempt) for r in runs] == [("worker-1", 1), ("worker-3", 2)]
                released = only(of_type(stranded_events, "activity_timed_out", activity_id), "")
                assert (released.data["kind"], released.data["attempt"]) == ("heartbeat", 1)
                done = only(of_type(stranded_events, "activity_completed", activity_id), "")
                assert done.data["attempt"] == 2
            fired = only(of_type(nap_events, "timer_fired"), "fired timer")
            assert fired.time > killed_at, (
                "the timer fired before the kill; the test proves nothing"
            )
            after = only(
                [r for r in logged(cluster, "start", workflow_id="nap") if r.activity_id != "1"],
                "'after' stamp",
            )
            assert after.worker == "worker-3"
            left = await pool.fetchval(
                "SELECT count(*) FROM durable_task_queue WHERE status = 'claimed'"
            )
            assert left == 0
