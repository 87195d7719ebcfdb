"""Schedules across real processes: control planes killed, restarted and doubled up.

A schedule ``@every 1s`` (overlap ``allow``) starts `workflows.three_steps` once a second; each
firing's run has the workflow id ``<schedule id>@<UTC due time>``, so the rows of
``durable_workflow_instances`` tell which times fired, and how often. The tests judge the
firings by their structure, never by how many fit in a stretch of wall-clock time (that depends
on the machine): no time fires twice, consecutive times are one second apart, times missed
while no control plane ran collapse into one firing (the first missed time), and the
schedule's ``fired_count`` is the number of runs it started. Every run is completed by a real
worker process. Each test has an absolute deadline, and `open_cluster` stops every process it
started, however the test ends.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from everruns._aio.pg import Pool
from tests.conftest import fail_after

from . import workflows
from .harness import Cluster, open_cluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.db]

SECOND = timedelta(seconds=1)
DUE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


# ---------------------------------------------------------------------------------- helpers


def due_time(workflow_id: str) -> datetime:
    """The time a firing was due, read from its run's workflow id ``<id>@<UTC time>``."""
    _, at, stamp = workflow_id.rpartition("@")
    assert at, f"{workflow_id!r} is not a schedule's run"
    return datetime.strptime(stamp, DUE_FORMAT).replace(tzinfo=UTC)


async def runs_of(pool: Pool, schedule_id: str) -> list[Any]:
    """Every run the schedule started (rows of durable_workflow_instances), by workflow id."""
    return list(
        await pool.fetch(
            "SELECT id, workflow_id, status, created_at FROM durable_workflow_instances"
            " WHERE starts_with(workflow_id, $1) ORDER BY workflow_id, created_at",
            f"{schedule_id}@",
        )
    )


async def completed_runs(pool: Pool, schedule_id: str) -> int:
    return sum(r["status"] == "completed" for r in await runs_of(pool, schedule_id))


async def schedule_row(pool: Pool, schedule_id: str) -> Any:
    return await pool.fetchrow("SELECT * FROM durable_schedules WHERE id = $1", schedule_id)


def assert_once_each(runs: list[Any]) -> list[datetime]:
    """Assert that no due time has two runs; return the due times in order."""
    ids = [r["workflow_id"] for r in runs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    assert not repeated, f"due times fired more than once: {repeated}"
    return sorted(due_time(i) for i in ids)


def assert_consecutive(times: list[datetime], what: str) -> None:
    """Assert that ``times`` (sorted) are each one second after the one before."""
    gaps = [(a, b) for a, b in itertools.pairwise(times) if b - a != SECOND]
    assert not gaps, f"{what}: firings not one second apart: {gaps} in {times}"


async def stop_and_settle(cluster: Cluster, pool: Pool, schedule_id: str) -> list[Any]:
    """Pause the schedule, wait until every run it started has completed (on a worker), and
    return those runs: with nothing firing any more, its row can be compared with them."""
    async with cluster.client() as client:
        paused = await client.pause_schedule(schedule_id)
    assert paused.paused

    async def all_completed() -> bool:
        return all(r["status"] == "completed" for r in await runs_of(pool, schedule_id))

    await wait_until(all_completed, timeout=20, what=f"every run of {schedule_id} completed")
    return await runs_of(pool, schedule_id)


def assert_ran_on_workers(cluster: Cluster, runs: list[Any]) -> None:
    """Every run's three activities ran, each exactly once, on a worker process."""
    for run in runs:
        starts = cluster.log.records("start", workflow_id=run["workflow_id"])
        assert sorted(r.activity for r in starts) == ["add_one", "describe_number", "double"], (
            run["workflow_id"],
            starts,
        )
        assert all(r.worker.startswith("worker-") for r in starts)


# -------------------------------------------------------------------------------------- tests


@fail_after(75)
async def test_a_killed_control_plane_restarted_later_fires_the_missed_time_once(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """A control plane fires ``@every 1s``; it is killed with SIGKILL, none runs for 3 s, then
    a new one starts on the same database and address. The seconds missed while none ran fire
    once, for the first of them (the catch-up), and then the schedule keeps its spec's times
    from the restart on; no time fires twice; every run completes on the worker (which rode
    out the outage); ``fired_count`` counts exactly the runs."""
    schedule_id = "tick"
    async with open_cluster(database_url, tmp_path / "run") as cluster:
        server = await cluster.start_server()
        await cluster.start_worker("worker-a")
        async with cluster.client() as client:
            schedule, created = await client.create_schedule(
                schedule_id, workflows.three_steps, 1, spec="@every 1s", overlap="allow"
            )
        assert created
        first_due = schedule.next_fire_at
        # The spec's first time after the create (its row's creation, in one transaction).
        created_at = (await schedule_row(pool, schedule_id))["created_at"]
        assert first_due == created_at.replace(microsecond=0) + SECOND

        async def two_completed() -> bool:
            return await completed_runs(pool, schedule_id) >= 2

        await wait_until(two_completed, timeout=15, what="two scheduled runs completed")

        assert await server.kill_and_wait() == -9
        killed_at = await pool.fetchval("SELECT now()")
        # What committed before the kill is all the dead control plane ever fired.
        before = assert_once_each(await runs_of(pool, schedule_id))
        await trio.sleep(3)
        assert len(await runs_of(pool, schedule_id)) == len(before), (
            "a run was started while no control plane ran"
        )
        restarted_at = await pool.fetchval("SELECT now()")
        await cluster.start_server(address=server.address, env_extra=server.env_extra)

        def after_restart(runs: list[Any]) -> list[Any]:
            return [r for r in runs if due_time(r["workflow_id"]) not in before]

        async def caught_up_and_went_on() -> bool:
            done = after_restart(await runs_of(pool, schedule_id))
            completed: int = sum(r["status"] == "completed" for r in done)
            return completed >= 3

        await wait_until(
            caught_up_and_went_on,
            timeout=20,
            what="the catch-up and two later runs completed after the restart",
        )
        runs = await stop_and_settle(cluster, pool, schedule_id)
        row = await schedule_row(pool, schedule_id)

    assert_once_each(runs)
    # Before the kill: from the schedule's first time on, every second once.
    assert before[0] == first_due
    assert_consecutive(before, "before the kill")
    assert before[-1] <= killed_at

    later = sorted(due_time(r["workflow_id"]) for r in after_restart(runs))
    catch_up, resumed = later[0], later[1:]
    # The first time missed: the one after the last that fired before the kill.
    assert catch_up == before[-1] + SECOND
    missed = (restarted_at - catch_up) // SECOND + 1
    assert missed >= 2, f"the outage missed {missed} time(s) only; the test proves nothing"
    # Only the catch-up fired for the outage: every other time missed is left out...
    assert [t for t in later if t <= restarted_at] == [catch_up], later
    # ...and the schedule goes on from the time it caught up: the spec's next time after the
    # moment of the catch-up's firing (its run's creation, in the same transaction), then
    # every second.
    catch_up_run = next(r for r in runs if due_time(r["workflow_id"]) == catch_up)
    fired_at = catch_up_run["created_at"]
    assert resumed[0] == fired_at.replace(microsecond=0) + SECOND, (fired_at, later)
    assert resumed[0] - catch_up >= 2 * SECOND
    assert_consecutive(resumed, "after the restart")

    assert {r["status"] for r in runs} == {"completed"}
    assert_ran_on_workers(cluster, runs)
    assert row["fired_count"] == len(runs)
    assert row["skipped_count"] == 0
    assert row["last_workflow_id"] == max(r["workflow_id"] for r in runs)
    assert cluster.servers[0].proc.returncode == -9


@fail_after(60)
async def test_two_control_planes_on_one_database_fire_each_time_once(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """Two control planes share one database, each with a worker; both due-scanners wake at
    each second of ``@every 1s``. Each time fires exactly once (one run per due time), with no
    time left out between the first and the last, and ``fired_count`` is the number of runs.
    (Two firings of one time race to one run, as a start of an open workflow id finds that run;
    but each counts in ``fired_count``, so a double firing shows there.)"""
    schedule_id = "shared-tick"
    async with open_cluster(database_url, tmp_path / "run") as cluster:
        one = await cluster.start_server()
        two = await cluster.start_server()
        await cluster.start_worker("worker-1", address=one.address)
        await cluster.start_worker("worker-2", address=two.address)
        async with cluster.client(one.address) as client:
            schedule, created = await client.create_schedule(
                schedule_id, workflows.three_steps, 2, spec="@every 1s", overlap="allow"
            )
        assert created

        async def four_fired() -> bool:
            return len(await runs_of(pool, schedule_id)) >= 4

        await wait_until(four_fired, timeout=15, what="four firings")
        await trio.sleep(1.5)
        runs = await stop_and_settle(cluster, pool, schedule_id)
        row = await schedule_row(pool, schedule_id)
        # Both control planes are still up: neither crashed on the contended rows.
        assert one.proc.returncode is None and two.proc.returncode is None

    times = assert_once_each(runs)
    assert len(times) >= 5
    assert times[0] == schedule.next_fire_at
    assert_consecutive(times, "two control planes")
    assert {r["status"] for r in runs} == {"completed"}
    assert_ran_on_workers(cluster, runs)
    assert row["fired_count"] == len(runs)
    assert row["skipped_count"] == 0
    assert row["last_workflow_id"] == max(r["workflow_id"] for r in runs)


@fail_after(60)
async def test_schedule_created_and_shown_through_the_cli(
    database_url: str, tmp_path: Path, pool: Pool
) -> None:
    """``everruns schedule create`` against a control plane process, then ``schedule show``:
    both exit 0, show the definition, and the schedule's runs complete on a worker."""
    async with open_cluster(database_url, tmp_path / "run") as cluster:
        await cluster.start_server()
        await cluster.start_worker("worker-a")
        create = (
            *("schedule", "create", "cli-tick", "three_steps", "--spec", "@every 1s"),
            *("--input", "3", "--overlap", "allow"),
        )
        created = await cluster.cli("--json", *create)
        assert created.code == 0, created.describe()
        document = created.json()
        assert document["created"] is True
        assert document["schedule"]["spec"] == "@every 1s"

        async def one_completed() -> bool:
            return await completed_runs(pool, "cli-tick") >= 1

        await wait_until(one_completed, timeout=15, what="a run of the CLI's schedule completed")
        shown = await cluster.cli("schedule", "show", "cli-tick")
        assert shown.code == 0, shown.describe()
        assert "three_steps" in shown.stdout and "@every 1s" in shown.stdout
        described = (await cluster.cli("--json", "schedule", "show", "cli-tick")).json()
        assert described["schedule"]["fired_count"] >= 1
        again = await cluster.cli(*create)
        assert again.code == 0, again.describe()
        assert "unchanged" in again.stdout
        runs = await stop_and_settle(cluster, pool, "cli-tick")
        row = await schedule_row(pool, "cli-tick")

    assert_consecutive(assert_once_each(runs), "CLI schedule")
    assert row["fired_count"] == len(runs)
