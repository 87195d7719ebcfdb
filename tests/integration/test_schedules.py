"""Schedules: a workflow started at the times a cron expression or `@every` names, fired by the
control plane's due-scanner exactly once per time, whichever replica fires it.

Engine-level tests move a schedule's next firing into the past by hand and fire it with
`Engine.fire_due_schedules`; the end-to-end ones let a real control plane's due-scanner do it,
through `everruns.Client` and the `everruns` command."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
import trio

from everruns import cli
from everruns._aio import pg
from everruns.client import Client
from everruns.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from everruns.server import ServerConfig
from everruns.server.engine import Engine, StartRequest, schedule_workflow_id
from everruns.server.notifier import Notifier
from everruns.store.queries import QUERIES
from everruns.store.store import Store
from tests.conftest import fail_after
from tests.integration.test_client_cli import address, run_cli

__all__ = ["address"]  # the fixture

pytestmark = pytest.mark.db


def _engine(store: Store, database_url: str, **overrides: Any) -> Engine:
    return Engine(
        store, ServerConfig(database_url=database_url, grpc_port=0, **overrides), Notifier()
    )


async def _create(engine: Engine, schedule_id: str = "tick", **fields: Any) -> Any:
    fields.setdefault("spec", "@every 1h")
    fields.setdefault("workflow_type", "report")
    fields.setdefault("input", '{"n": 1}')
    schedule, _ = await engine.create_schedule(schedule_id, **fields)
    return schedule


async def _make_due(pool: pg.Pool, schedule_id: str, ago: float = 1.0) -> datetime:
    """Move the schedule's next firing ``ago`` seconds into the past; return it."""
    value: datetime = await pool.fetchval(
        "UPDATE durable_schedules SET next_fire_at = date_trunc('second', now())"
        " - make_interval(secs => $2) WHERE id = $1 RETURNING next_fire_at",
        schedule_id,
        ago,
    )
    return value


async def _runs_of(pool: pg.Pool, schedule_id: str) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT workflow_id, workflow_type, input::text AS input, status"
            " FROM durable_workflow_instances WHERE workflow_id LIKE $1 ORDER BY created_at",
            f"{schedule_id}@%",
        )
    )


async def _end_runs(pool: pg.Pool, schedule_id: str) -> None:
    await pool.execute(
        "UPDATE durable_workflow_instances SET status = 'completed', result = 'null',"
        " started_at = now(), completed_at = now()"
        " WHERE workflow_id LIKE $1 AND completed_at IS NULL",
        f"{schedule_id}@%",
    )


@fail_after(30)
async def test_a_due_schedule_starts_one_run_named_for_its_time_and_moves_on(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    created = await _create(engine)
    assert created.next_fire_at > datetime.now(UTC) and created.fired_count == 0
    assert await engine.fire_due_schedules() == 0  # not due yet: nothing
    due = await _make_due(pool, "tick")
    assert await engine.fire_due_schedules() == 1
    (run,) = await _runs_of(pool, "tick")
    assert run["workflow_id"] == schedule_workflow_id("tick", due)
    assert run["workflow_id"] == f"tick@{due.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    assert (run["workflow_type"], json.loads(run["input"]), run["status"]) == (
        "report",
        {"n": 1},
        "pending",
    )
    # The run waits for a worker like any start: its workflow task is queued.
    assert await pool.fetchval(
        "SELECT count(*) FROM durable_task_queue t JOIN durable_workflow_instances r"
        " ON r.id = t.run_id WHERE r.workflow_id = $1 AND t.kind = 'workflow'"
        " AND t.status = 'pending'",
        run["workflow_id"],
    )
    after = await engine.get_schedule("tick")
    assert after.fired_count == 1 and after.skipped_count == 0
    assert after.last_workflow_id == run["workflow_id"] and after.last_fired_at == due
    assert after.next_fire_at > datetime.now(UTC)
    assert await engine.fire_due_schedules() == 0  # fired once, not again


@fail_after(30)
async def test_missed_times_fire_once_then_the_schedule_keeps_its_times(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine, spec="@every 10s")
    due = await _make_due(pool, "tick", ago=3600)  # down for an hour: 360 times missed
    assert await engine.fire_due_schedules() == 1
    assert [r["workflow_id"] for r in await _runs_of(pool, "tick")] == [
        schedule_workflow_id("tick", due)
    ]
    after = await engine.get_schedule("tick")
    now = await store.now()
    assert now < after.next_fire_at <= now + timedelta(seconds=10)
    assert after.next_fire_at.timestamp() % 10 == 0  # on the spec's own times
    assert await engine.fire_due_schedules() == 0


@fail_after(30)
async def test_overlap_skip_starts_nothing_while_the_last_run_is_open(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine)
    await _make_due(pool, "tick", ago=20)
    assert await engine.fire_due_schedules() == 1
    await _make_due(pool, "tick", ago=10)
    assert await engine.fire_due_schedules() == 0  # the first run is still open
    skipped = await engine.get_schedule("tick")
    assert (skipped.fired_count, skipped.skipped_count) == (1, 1)
    assert skipped.next_fire_at > datetime.now(UTC)
    await _end_runs(pool, "tick")
    await _make_due(pool, "tick")
    assert await engine.fire_due_schedules() == 1
    assert len(await _runs_of(pool, "tick")) == 2


@fail_after(30)
async def test_overlap_allow_starts_beside_the_open_run(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine, overlap="allow")
    for ago in (20, 10):
        await _make_due(pool, "tick", ago=ago)
        assert await engine.fire_due_schedules() == 1
    runs = await _runs_of(pool, "tick")
    assert [r["status"] for r in runs] == ["pending", "pending"]
    assert len({r["workflow_id"] for r in runs}) == 2


@fail_after(60)
async def test_two_control_planes_fire_each_due_schedule_once(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engines = [_engine(store, database_url), _engine(Store(pool), database_url)]
    ids = [f"s{n:03d}" for n in range(150)]  # more than one batch of 100
    for schedule_id in ids:
        await _create(engines[0], schedule_id, overlap="allow")
    await pool.execute("UPDATE durable_schedules SET next_fire_at = now() - interval '5 s'")
    started = [0, 0]

    async def fire(n: int) -> None:
        started[n] = await engines[n].fire_due_schedules()

    async with trio.open_nursery() as nursery:
        for n in range(2):
            nursery.start_soon(fire, n)
    # A batch a replica skipped (held by the other) it did not fire; what the other did not
    # get to (its second batch) is due still: the next round fires it.
    for engine in engines:
        started.append(await engine.fire_due_schedules())
    assert sum(started) == len(ids)
    count = await pool.fetchval(
        "SELECT count(*) FROM durable_workflow_instances WHERE workflow_id LIKE 's%@%'"
    )
    assert count == len(ids)
    assert not await pool.fetchval(
        "SELECT count(*) FROM durable_schedules WHERE fired_count <> 1 OR next_fire_at <= now()"
    )


@fail_after(30)
async def test_create_is_idempotent_and_refuses_another_definition_unless_replaced(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    first, created = await engine.create_schedule(
        "tick", spec="*/5  *  * * *", workflow_type="report", input='{"n": 1}'
    )
    assert created and first.spec == "*/5 * * * *"
    again, created = await engine.create_schedule(
        "tick", spec="*/5 * * * *", workflow_type="report", input='{"n": 1}'
    )
    assert not created and again == first
    with pytest.raises(AlreadyExists, match="another definition"):
        await engine.create_schedule(
            "tick", spec="*/5 * * * *", workflow_type="report", input='{"n": 2}'
        )
    await _make_due(pool, "tick")
    assert await engine.fire_due_schedules() == 1
    fired = await engine.get_schedule("tick")
    # Replaced with the same spec: what it fired and its next time are kept.
    replaced, created = await engine.create_schedule(
        "tick", spec="*/5 * * * *", workflow_type="report", input='{"n": 2}', replace=True
    )
    assert not created and replaced.input == '{"n": 2}'
    assert (replaced.fired_count, replaced.next_fire_at) == (1, fired.next_fire_at)
    # Another spec: the next time is the new spec's.
    hourly, _ = await engine.create_schedule(
        "tick", spec="@hourly", workflow_type="report", input='{"n": 2}', replace=True
    )
    assert hourly.next_fire_at.minute == 0 and hourly.fired_count == 1


@fail_after(30)
async def test_a_paused_schedule_does_not_fire_and_resumes_without_making_up(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine, spec="@every 1h")
    paused = await engine.pause_schedule("tick", paused=True)
    assert paused.paused
    assert await engine.pause_schedule("tick", paused=True) == paused  # idempotent
    await _make_due(pool, "tick", ago=7200)
    assert await engine.fire_due_schedules() == 0
    resumed = await engine.pause_schedule("tick", paused=False)
    assert not resumed.paused and resumed.next_fire_at > datetime.now(UTC)
    assert await engine.fire_due_schedules() == 0
    assert await _runs_of(pool, "tick") == []
    with pytest.raises(NotFound, match="no schedule 'nope'"):
        await engine.pause_schedule("nope", paused=True)


@fail_after(30)
async def test_delete_leaves_the_runs_and_a_second_delete_is_not_found(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine)
    await _make_due(pool, "tick")
    assert await engine.fire_due_schedules() == 1
    await engine.delete_schedule("tick")
    with pytest.raises(NotFound):
        await engine.delete_schedule("tick")
    with pytest.raises(NotFound):
        await engine.get_schedule("tick")
    assert len(await _runs_of(pool, "tick")) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"spec": "75 * * * *"}, "minute"),
        ({"spec": "0 0 30 2 *"}, "never"),
        ({"spec": ""}, "spec"),
        ({"overlap": "queue"}, "overlap must be one of skip, allow"),
        ({"input": "{oops"}, "input is not valid JSON"),
        ({"workflow_type": " report"}, "workflow_type"),
        ({"schedule_id": "x" * 492}, "schedule_id is 492 characters long; the limit is 491"),
        ({"schedule_id": ""}, "schedule_id must not be empty"),
    ],
)
@fail_after(30)
async def test_bad_fields_are_refused_with_one_line_and_nothing_written(
    store: Store, pool: pg.Pool, database_url: str, fields: dict[str, Any], message: str
) -> None:
    engine = _engine(store, database_url)
    schedule_id = fields.pop("schedule_id", "tick")
    with pytest.raises(InvalidArgument, match=message) as raised:
        await _create(engine, schedule_id, **fields)
    assert "\n" not in str(raised.value)
    assert not await pool.fetchval("SELECT count(*) FROM durable_schedules")


@fail_after(30)
async def test_a_spec_broken_by_hand_pauses_its_schedule_instead_of_failing_the_scanner(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine, "broken")
    await _create(engine, "fine")
    await pool.execute("UPDATE durable_schedules SET spec = 'every tuesday' WHERE id = 'broken'")
    await pool.execute("UPDATE durable_schedules SET next_fire_at = now() - interval '1 s'")
    assert await engine.fire_due_schedules() == 1  # "fine" fired all the same
    broken = await engine.get_schedule("broken")
    assert broken.paused and broken.paused_reason is not None
    assert "InvalidArgument: spec:" in broken.paused_reason
    with pytest.raises(FailedPrecondition, match="cannot resume: its spec:"):
        await engine.pause_schedule("broken", paused=False)
    # Resumed (after the operator mends it), the reason is gone.
    await pool.execute("UPDATE durable_schedules SET spec = '@hourly' WHERE id = 'broken'")
    resumed = await engine.pause_schedule("broken", paused=False)
    assert not resumed.paused and resumed.paused_reason is None
    assert [r["workflow_id"][:5] for r in await _runs_of(pool, "fine")] == ["fine@"]


@fail_after(30)
async def test_a_full_queue_skips_the_firing(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url, max_pending_tasks=1)
    await engine.start_workflows([StartRequest("report", "null", "filler")])  # 1 task waits
    await _create(engine)
    await _make_due(pool, "tick")
    assert await engine.fire_due_schedules() == 0
    skipped = await engine.get_schedule("tick")
    assert (skipped.fired_count, skipped.skipped_count) == (0, 1)
    assert skipped.next_fire_at > datetime.now(UTC)


@fail_after(60)
async def test_a_control_plane_fires_a_schedule_at_its_times(address: str, pool: pg.Pool) -> None:
    async with Client.connect(address) as client:
        schedule, created = await client.create_schedule(
            "every-second", "report", {"n": 7}, spec="@every 1s", overlap="allow"
        )
        assert created and schedule.spec == "@every 1s" and schedule.overlap == "allow"
        # The due-scanner sleeps up to the reclaim interval (10 s): the create wakes it.
        while len(await _runs_of(pool, "every-second")) < 3:  # noqa: ASYNC110 (a database state)
            await trio.sleep(0.1)
        runs = await _runs_of(pool, "every-second")
        assert {json.loads(r["input"])["n"] for r in runs} == {7}
        times = sorted(
            datetime.strptime(r["workflow_id"].split("@")[1], "%Y-%m-%dT%H:%M:%SZ") for r in runs
        )
        assert all(b - a >= timedelta(seconds=1) for a, b in pairwise(times))
        described = await client.describe_schedule("every-second")
        assert described.fired_count >= 3 and described.last_workflow_id is not None
        assert described.input == {"n": 7}
        paused = await client.pause_schedule("every-second")
        assert paused.paused
        settled = len(await _runs_of(pool, "every-second"))
        await trio.sleep(1.5)
        assert len(await _runs_of(pool, "every-second")) == settled
        listed, token = await client.list_schedules()
        assert [s.schedule_id for s in listed] == ["every-second"] and token is None
        await client.delete_schedule("every-second")
        with pytest.raises(NotFound):
            await client.describe_schedule("every-second")


@fail_after(60)
async def test_list_pages_by_id(address: str) -> None:
    async with Client.connect(address) as client:
        for n in range(5):
            await client.create_schedule(f"s{n}", "report", spec="@daily")
        first, token = await client.list_schedules(limit=2)
        assert [s.schedule_id for s in first] == ["s0", "s1"] and token is not None
        second, token = await client.list_schedules(limit=2, page_token=token)
        assert [s.schedule_id for s in second] == ["s2", "s3"]
        third, token = await client.list_schedules(limit=2, page_token=token)
        assert [s.schedule_id for s in third] == ["s4"] and token is None
        with pytest.raises(InvalidArgument, match="page_token"):
            await client.list_schedules(page_token="%%%")


async def _cli(
    capsys: pytest.CaptureFixture[str], address: str, *argv: str
) -> tuple[int, str, str]:
    return await run_cli(capsys, "--address", address, *argv)


@fail_after(60)
async def test_the_schedule_commands(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    create = (
        "schedule",
        "create",
        "nightly",
        "report",
        "--spec",
        "0 3 * * *",
        "--input",
        '{"n": 1}',
    )
    code, out, _ = await _cli(capsys, address, *create)
    assert code == cli.EXIT_OK and "schedule nightly created" in out and "03:00:00Z" in out
    code, out, _ = await _cli(capsys, address, *create)
    assert code == cli.EXIT_OK and "unchanged" in out
    code, _, err = await _cli(
        capsys, address, "schedule", "create", "nightly", "report", "--spec", "0 4 * * *"
    )
    assert code == cli.EXIT_PRECONDITION and "another definition" in err
    assert err.count("\n") == 1
    code, _, err = await _cli(
        capsys, address, "schedule", "create", "bad", "report", "--spec", "0 25 * * *"
    )
    assert code == cli.EXIT_USAGE and "hour" in err and err.count("\n") == 1
    code, out, _ = await _cli(capsys, address, "--json", "schedule", "list")
    (listed,) = json.loads(out)["schedules"]
    assert listed["schedule_id"] == "nightly" and listed["spec"] == "0 3 * * *"
    code, out, _ = await _cli(capsys, address, "schedule", "show", "nightly")
    assert code == cli.EXIT_OK and "0 3 * * * (UTC)" in out
    code, out, _ = await _cli(capsys, address, "schedule", "pause", "nightly")
    assert code == cli.EXIT_OK and "paused" in out
    code, out, _ = await _cli(capsys, address, "schedule", "list")
    assert "paused" in out
    code, out, _ = await _cli(capsys, address, "schedule", "resume", "nightly")
    assert code == cli.EXIT_OK and "resumed; next firing" in out
    code, out, _ = await _cli(capsys, address, "schedule", "delete", "nightly")
    assert code == cli.EXIT_OK
    code, _, err = await _cli(capsys, address, "schedule", "delete", "nightly")
    assert code == cli.EXIT_NOT_FOUND and "no schedule 'nightly'" in err


@fail_after(60)
async def test_the_due_scan_reads_the_due_index_among_many_schedules(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    await pool.execute(
        "INSERT INTO durable_schedules (id, spec, workflow_type, input, next_fire_at)"
        " SELECT 'many-' || g, '@every 1h', 'report', 'null', now() + make_interval(secs => g)"
        " FROM generate_series(1, 5000) g"
    )
    await pool.execute("ANALYZE durable_schedules")
    (row,) = await pool.fetch(
        "EXPLAIN (FORMAT JSON) " + QUERIES["lock_due_schedules"], 100, datetime.now(UTC)
    )
    plan = json.dumps(json.loads(row[0]))
    assert "durable_schedules_due" in plan and "Seq Scan" not in plan
    await pool.execute(
        "UPDATE durable_schedules SET next_fire_at = now() - interval '1 s'"
        " WHERE id IN ('many-1', 'many-2', 'many-3')"
    )
    assert await _engine(store, database_url).fire_due_schedules() == 3


@fail_after(30)
async def test_trigger_starts_a_run_now_whatever_the_pause_and_overlap(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    created = await _create(engine, paused=True)
    schedule, run, started = await engine.trigger_schedule("tick")
    assert started and run.workflow_id.startswith("tick@") and run.is_open
    assert (schedule.fired_count, schedule.last_workflow_id) == (1, run.workflow_id)
    assert schedule.paused and schedule.next_fire_at == created.next_fire_at
    # Overlap skip does not hold back an explicit trigger; within the same second it is the
    # same firing, so the open run is answered.
    _, second, started_again = await engine.trigger_schedule("tick")
    if second.workflow_id == run.workflow_id:
        assert not started_again and second.run_id == run.run_id
    else:
        assert started_again and second.run_id != run.run_id
    assert (await engine.get_schedule("tick")).fired_count == 1 + started_again
    with pytest.raises(NotFound, match="no schedule 'nope'"):
        await engine.trigger_schedule("nope")


@fail_after(30)
async def test_trigger_is_refused_while_the_queue_is_full(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url, max_pending_tasks=1)
    await engine.start_workflows([StartRequest("report", "null", "filler")])
    await _create(engine)
    with pytest.raises(ResourceExhausted, match="EVERRUNS_MAX_PENDING_TASKS"):
        await engine.trigger_schedule("tick")
    assert (await engine.get_schedule("tick")).fired_count == 0
    assert await _runs_of(pool, "tick") == []


@fail_after(60)
async def test_trigger_through_the_client_and_the_command(
    address: str, pool: pg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Client.connect(address) as client:
        await client.create_schedule("nightly", "report", {"n": 2}, spec="0 3 * * *")
        handle = await client.trigger_schedule("nightly")
        assert handle.created and handle.workflow_id.startswith("nightly@")
        assert (await handle.describe()).input == {"n": 2}
    code, out, _ = await _cli(capsys, address, "--json", "schedule", "trigger", "nightly")
    assert code == cli.EXIT_OK and json.loads(out)["workflow_id"].startswith("nightly@")
    code, _, err = await _cli(capsys, address, "schedule", "trigger", "nope")
    assert code == cli.EXIT_NOT_FOUND and "no schedule 'nope'" in err


@fail_after(30)
async def test_a_firing_whose_workflow_id_is_open_already_takes_that_run(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine)
    due = await _make_due(pool, "tick")
    ((mine, created),) = await engine.start_workflows(
        [StartRequest("report", "null", schedule_workflow_id("tick", due))]
    )
    assert created
    assert await engine.fire_due_schedules() == 0  # nothing started
    after = await engine.get_schedule("tick")
    assert (after.fired_count, after.last_run_id) == (0, mine.run_id)
    assert len(await _runs_of(pool, "tick")) == 1


@fail_after(30)
async def test_replace_keeps_a_paused_schedule_paused(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    engine = _engine(store, database_url)
    await _create(engine)
    await engine.pause_schedule("tick", paused=True)
    replaced, _ = await engine.create_schedule(
        "tick", spec="@every 2h", workflow_type="report", input="2", replace=True
    )
    assert replaced.paused and (replaced.spec, replaced.input) == ("@every 2h", "2")
    # Created paused: applies to a new schedule only.
    fresh = await _create(engine, "fresh", paused=True)
    assert fresh.paused
    again, created = await engine.create_schedule(
        "fresh", spec="@every 1h", workflow_type="report", input='{"n": 1}', paused=False
    )
    assert not created and again.paused
