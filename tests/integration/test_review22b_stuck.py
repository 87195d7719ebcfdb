"""Review of session 22's retry of stuck runs (commit 40060be): a worker that registers (or
stops cleanly) gives the stuck runs of its workflow types another try, up to 1,000 at a time.
Each test here failed on that commit."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import trio

from everruns._proto.everruns import v1 as pb
from everruns.server.config import ServerConfig
from everruns.server.engine import Engine
from everruns.server.notifier import Notifier
from everruns.server.services import WorkerService
from everruns.store.store import STUCK_RETRIES_AT_ONCE, Store

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parents[2]


async def _stuck_runs(store: Store, wtype: str, count: int) -> list[uuid.UUID]:
    """``count`` open runs of ``wtype`` marked stuck, no workflow task out (their failed task
    closed), one second apart: returned newest first."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(
            "INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input, "
            "partition_key, last_sequence_num, status, started_at, created_at, stuck_reason) "
            "SELECT gen_random_uuid(), 'stuck-' || n, $1, 'null'::json, 'stuck-' || n, 1, "
            "'running', now(), now() - make_interval(secs => n), 'non-determinism: test' "
            "FROM generate_series(1, $2::int) n RETURNING id, created_at",
            wtype,
            count,
        )
    return [r["id"] for r in sorted(rows, key=lambda r: r["created_at"], reverse=True)]


async def _with_task_out(store: Store, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT DISTINCT run_id FROM durable_task_queue WHERE run_id = ANY($1::uuid[]) "
            "AND kind = 'workflow' AND status IN ('pending', 'claimed')",
            run_ids,
        )
    return {r["run_id"] for r in rows}


def _register(worker_id: str, wtype: str) -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(
        worker_id=worker_id,
        workflow_types=[wtype],
        max_concurrency=4,
        host="h",
        version="test",
        incarnation=f"{worker_id}-1",
    )


async def test_the_stuck_runs_past_the_limit_get_their_try_at_the_next_registration(
    store: Store,
) -> None:
    """``STUCK_RETRIES_AT_ONCE``: "Stuck runs one worker's registration gives another try at
    most (the rest at the next)". Compatible code is deployed to a fleet: its workers
    register one after another, while the tasks the first registration made are still
    queued (1,000 replays take a while). The LIMIT is taken before the "no task out" filter:
    every later registration locks the same newest 1,000 stuck runs, finds each has a task
    out, and gives none of the rest a try. Once the fleet is up nothing registers again, so
    the runs past the first 1,000 stay stuck though the code that can run them is
    deployed."""
    with trio.fail_after(60):
        runs = await _stuck_runs(store, "evolving", STUCK_RETRIES_AT_ONCE + 1)
        service = WorkerService(Engine(store, ServerConfig(), Notifier()), trio.Event())
        await service.register_worker(_register("fixed-1", "evolving"))
        assert await _with_task_out(store, runs) == set(runs[:STUCK_RETRIES_AT_ONCE])
        # The next worker of the fleet registers; the first 1,000 tasks are not done yet.
        await service.register_worker(_register("fixed-2", "evolving"))
        oldest = runs[-1]
        assert oldest in await _with_task_out(store, runs), (
            "two registrations of workers serving the type, and the oldest stuck run (the "
            f"{STUCK_RETRIES_AT_ONCE + 1}st) got no workflow task: the second registration "
            "spent its limit on the newest runs, which had their task out already"
        )


def test_the_upgrade_guide_describes_migration_011() -> None:
    """docs/operations.md "Upgrading" describes every migration: what it does to which table
    and, for an index built on a large table, how to build it first without blocking writes
    (002, 005, 009: "while CREATE INDEX builds one, writes to its table wait"). Migration
    011 builds ``durable_workflow_instances_stuck`` on ``durable_workflow_instances``, the
    table every run's every step writes, with a plain CREATE INDEX, and the guide does not
    name it: an operator upgrading a large database gets a write stall on the runs table at
    the control plane's start with no warning and no CONCURRENTLY recipe."""
    guide = (ROOT / "docs" / "operations.md").read_text()
    upgrading = guide.split("## Upgrading", 1)[1].split("\n## ", 1)[0]
    migrations = sorted(
        p.name for p in (ROOT / "src" / "everruns" / "store" / "migrations").glob("0*.sql")
    )
    described = set(re.findall(r"`(\d{3}_[a-z0-9_]+\.sql)`", upgrading))
    missing = [m for m in migrations if m != "001_durable_tables.sql" and m not in described]
    assert missing == [], f"the Upgrading section does not describe {missing}"
    assert "durable_workflow_instances_stuck" in upgrading


async def test_a_rolling_deploys_stuck_run_gets_its_try_when_the_old_worker_is_lost(
    store: Store,
) -> None:
    """README and docs/operations.md: an old worker that replays a run that took the new
    branch marks it stuck, "until it gets another try as the old workers stop". Only a clean
    goodbye (status "stopped") gives that try. An old worker that leaves otherwise (killed at
    the end of its pod's grace period, a goodbye that does not get through: the control plane
    marks it lost when its connection drops) gives none, and the new workers registered
    before it made the run stuck: the run stays stuck with only compatible code serving its
    type, until some worker happens to register again."""
    with trio.fail_after(30):
        engine = Engine(store, ServerConfig(), Notifier())
        service = WorkerService(engine, trio.Event())
        await service.register_worker(_register("old-1", "evolving"))
        await service.register_worker(_register("new-1", "evolving"))
        # The old worker replays a run that took the new branch: the run is stuck now.
        (run,) = await _stuck_runs(store, "evolving", 1)
        # Its process is killed; the control plane sees the connection drop.
        await engine.release_worker("old-1", "the worker's connection dropped")
        assert (await store.get_worker("old-1")).status == "lost"  # type: ignore[union-attr]
        assert await _with_task_out(store, [run]) == {run}, (
            "the last old worker left (lost, not a clean goodbye): the run it made stuck got "
            "no other try though only compatible workers serve its type"
        )
