"""A worker's incarnation is its run (`Worker.run` makes a token sent with every registration,
heartbeat and cancellation stream), not the time of its last registration. Real worker
processes (``python -m everruns.worker``) against an in-process control plane; the other
processes under the same WORKER_ID are connections of their own, as workers of an older
release that send no token. The first three tests failed before incarnation tokens, for the
defect their assertion messages name; the last one pins what a worker without a token keeps.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns._aio.grpc import open_channel
from everruns._proto.everruns import v1 as pb
from tests.e2e.harness import WorkerProcess, start_worker
from tests.integration.test_cancelled_calls_and_races import until
from tests.integration.test_engine import Plane, plane
from tests.integration.test_worker_identity import incarnation_stream

pytestmark = pytest.mark.db

WID = "w-incarnation"
WORKFLOW_SIDE = "wf-side"
REREGISTERED = re.compile(r"no longer knows worker .*; registering again")
"""The line a worker logs when its heartbeat finds it unknown and it registers again."""


async def hold(ctx: Any, input: Any) -> Any:
    """Runs ``sleepy`` (tests.e2e.workflows) for five minutes: its task stays claimed."""
    return await ctx.execute_activity("sleepy", {"seconds": 300})


@asynccontextmanager
async def control_plane(database_url: str) -> AsyncIterator[Plane]:
    """A control plane that asks workers for a heartbeat every second (a worker whose
    registration was stopped registers again within a second or so), and a worker of its
    own that decides the ``hold`` workflow, so that its activity goes to WID."""
    async with plane(database_url, worker_lost_after=3.0) as p:
        await p.channel.unary(
            p.workers.register_worker,
            pb.RegisterWorkerRequest(
                worker_id=WORKFLOW_SIDE, max_concurrency=4, workflow_types=["hold"]
            ),
        )
        yield p


async def worker_process(
    p: Plane, nursery: trio.Nursery, tmp_path: Path, module: str = "tests.e2e.workflows"
) -> WorkerProcess:
    """``python -m everruns.worker MODULE`` as WID, once it has registered."""
    return await start_worker(
        f"127.0.0.1:{p.port}",
        (module,),
        nursery=nursery,
        worker_id=WID,
        env_extra={"E2E_LOG": str(tmp_path / "executions.jsonl")},
        max_concurrent_tasks=4,
    )


async def schedule_hold(p: Plane, workflow_id: str) -> None:
    """Start a ``hold`` run and decide it: its activity waits in the queue for WID."""
    await p.start("hold", None, wid=workflow_id)
    reply = await p.channel.unary(
        p.workers.poll_tasks,
        pb.PollTasksRequest(
            worker_id=WORKFLOW_SIDE, max_tasks=1, workflow_types=["hold"], wait_s=5
        ),
    )
    (task,) = reply.tasks
    request = p.decide(task, hold)
    request.worker_id = WORKFLOW_SIDE
    await p.channel.unary(p.workers.complete_workflow_task, request)


async def held_by_wid(p: Plane, pool: pg.Pool, workflow_id: str) -> tuple[uuid.UUID, int]:
    """`schedule_hold`, then wait until WID's process claimed the activity; return the
    task's id and lease."""
    await schedule_hold(p, workflow_id)
    query = (
        "SELECT id, lease_token FROM durable_task_queue WHERE workflow_id = $1"
        " AND kind = 'activity' AND status = 'claimed' AND claimed_by = $2"
    )
    await until(pool, f"SELECT EXISTS ({query})", workflow_id, WID, what=f"{WID} holds it")
    row = await pool.fetchrow(query, workflow_id, WID)
    return row["id"], row["lease_token"]


async def registration(pool: pg.Pool) -> tuple[str, int | None, datetime]:
    """WID's registration: its status, pid and started_at."""
    row = await pool.fetchrow(
        "SELECT status, pid, started_at FROM durable_workers WHERE id = $1", WID
    )
    return row["status"], row["pid"], row["started_at"]


async def say_goodbye_without_token(channel: Any, p: Plane) -> None:
    """A clean exit's last call, as a worker of an older release sends it."""
    await channel.unary(
        p.workers.worker_heartbeat,
        pb.WorkerHeartbeatRequest(worker_id=WID, status="stopped"),
    )


async def released_within(pool: pg.Pool, seconds: float) -> bool:
    """Whether WID holds no task any more within ``seconds``."""
    with trio.move_on_after(seconds):
        await until(
            pool,
            "SELECT NOT EXISTS (SELECT 1 FROM durable_task_queue"
            " WHERE status = 'claimed' AND claimed_by = $1)",
            WID,
            what=f"{WID} holds nothing",
        )
        return True
    return False


async def test_a_worker_that_registered_again_has_all_its_tasks_released_when_it_dies(
    database_url: str, pool: pg.Pool, tmp_path: Path
) -> None:
    """The known limit of session 18. A worker process P holds a task; another process
    under the same WORKER_ID registers and exits cleanly (stopped before it opened its
    cancellation stream): its goodbye marks WID stopped, so P's next heartbeat finds itself
    unknown and P registers again, and claims another task. Then P is killed (kill -9).
    Both its tasks must be released at once: nothing will ever heartbeat them."""
    with trio.fail_after(60):
        async with control_plane(database_url) as p, trio.open_nursery() as nursery:
            worker = await worker_process(p, nursery, tmp_path)
            first = await held_by_wid(p, pool, "before")
            async with open_channel("127.0.0.1", p.port) as other:
                await other.unary(
                    p.workers.register_worker,
                    pb.RegisterWorkerRequest(
                        worker_id=WID, max_concurrency=1, activity_types=["sleepy"], pid=2222
                    ),
                )
                await say_goodbye_without_token(other, p)
            await until(
                pool,
                "SELECT status = 'active' AND pid = $2 FROM durable_workers WHERE id = $1",
                WID,
                worker.pid,
                what=f"{WID} registered again by its live process",
            )
            second = await held_by_wid(p, pool, "after")
            worker.kill()
            await worker.wait()
            released = await released_within(pool, 3.0)
            rows = await pool.fetch(
                "SELECT id, status, claimed_by, lease_token FROM durable_task_queue"
                " WHERE kind = 'activity' ORDER BY workflow_id"
            )
            nursery.cancel_scope.cancel()
        held = [(r["id"], r["lease_token"]) for r in rows if r["status"] == "claimed"]
        assert released, (
            f"worker {WID}'s process was killed 3 s ago and its connection dropped, yet it "
            f"still holds {held} (before its second registration: {first}, after: {second}). "
            "Its cancellation stream still named its first registration (the time it was "
            "made), so the drop counted as an old incarnation's and released only the tasks "
            "claimed before the second registration: the others wait for the 30 s stale rule"
        )


async def test_an_old_process_dropping_late_leaves_the_new_ones_tasks_after_it_re_registers(
    database_url: str, pool: pg.Pool, tmp_path: Path
) -> None:
    """Rolling upgrade: the old process of WID (an older release, no token) hangs with its
    connection open; the new process N starts under the same WORKER_ID and claims a task.
    The old process wakes, says goodbye (marking WID stopped, as an older worker's goodbye
    does) and exits; N's heartbeat finds itself unknown and N registers again, with the same
    incarnation. When the old connection's drop is then seen, it must release only what
    the old process claimed, not N's task: N's registering again does not make N's tasks
    an old incarnation's."""
    with trio.fail_after(60):
        async with control_plane(database_url) as p, trio.open_nursery() as nursery:
            async with open_channel("127.0.0.1", p.port) as old:
                await old.unary(
                    p.workers.register_worker,
                    pb.RegisterWorkerRequest(
                        worker_id=WID, max_concurrency=1, activity_types=["other"], pid=1111
                    ),
                )
                async with incarnation_stream(p, p.port, WID):
                    new = await worker_process(p, nursery, tmp_path)
                    task_id, lease = await held_by_wid(p, pool, "new-process")
                    await say_goodbye_without_token(old, p)
                    await until(
                        pool,
                        "SELECT status = 'active' FROM durable_workers WHERE id = $1",
                        WID,
                        what=f"{WID} registered again by the new process",
                    )
                # The old connection drops now.
            await trio.sleep(2.0)  # a drop is acted on within milliseconds
            row = await pool.fetchrow(
                "SELECT status, claimed_by, lease_token FROM durable_task_queue WHERE id = $1",
                task_id,
            )
            status, pid, _ = await registration(pool)
            nursery.cancel_scope.cancel()
        assert (row["status"], row["lease_token"], status, pid) == (
            "claimed",
            lease,
            "active",
            new.pid,
        ), (
            f"the new process of {WID} (pid {new.pid}) holds task {task_id} with its stream "
            f"open, yet the late drop of the old process's connection released it (now "
            f"{row['status']} under lease {row['lease_token']}, was {lease}; the worker "
            f"{status}, pid {pid}): "
            "the new process's second registration moved the worker's registration time "
            "past its own claim, so the drop took the task for an old incarnation's"
        )


async def test_an_old_process_saying_goodbye_leaves_the_new_one_registered(
    database_url: str, pool: pg.Pool, tmp_path: Path
) -> None:
    """Two processes of WID, both sending tokens: the old one (serving the agent's types)
    is still running when the new one (serving other types) registers and claims a task.
    The old one is stopped (SIGTERM): its goodbye names its own incarnation, which is no
    longer WID's registration, so the new process stays registered (it must not find
    itself unknown and register again), and the old connection's drop leaves its task."""
    with trio.fail_after(60):
        async with control_plane(database_url) as p, trio.open_nursery() as nursery:
            old = await worker_process(p, nursery, tmp_path, module="everruns.agent")
            new = await worker_process(p, nursery, tmp_path)
            _, _, registered = await registration(pool)
            task_id, lease = await held_by_wid(p, pool, "new-process")
            old.terminate()
            await old.wait()
            await trio.sleep(2.5)  # two heartbeats of the new process
            row = await pool.fetchrow(
                "SELECT status, lease_token FROM durable_task_queue WHERE id = $1", task_id
            )
            now = await registration(pool)
            registered_again = new.proc.output_matches(REREGISTERED)
            nursery.cancel_scope.cancel()
        assert not registered_again and now == ("active", new.pid, registered), (
            f"the old process of {WID} said goodbye and the worker's registration, the new "
            f"process's (pid {new.pid}, since {registered}), was marked stopped: the new "
            f"process found itself unknown and registered again ({registered_again}); now "
            f"{now}"
        )
        assert (row["status"], row["lease_token"]) == ("claimed", lease), dict(row)


async def test_a_worker_without_a_token_keeps_its_rules(database_url: str, pool: pg.Pool) -> None:
    """A worker of an older release sends no token: each registration is an incarnation of
    its own, named by its time, and its stream belongs to the registration current when it
    opened. Its drop releases everything while that registration is current (the worker
    marked lost); after a newer registration, only what was claimed before it (the worker
    left active). Passed before incarnation tokens too: it pins what they must not change."""
    with trio.fail_after(60):
        async with control_plane(database_url) as p:
            register = pb.RegisterWorkerRequest(
                worker_id=WID, max_concurrency=4, activity_types=["sleepy"], pid=1111
            )
            async with open_channel("127.0.0.1", p.port) as mine:
                await mine.unary(p.workers.register_worker, register)
                _, _, first_registration = await registration(pool)
                async with incarnation_stream(p, p.port, WID):
                    older = await _claim_as_wid(p, mine, "older")
                    await mine.unary(p.workers.register_worker, register)
                    _, _, second_registration = await registration(pool)
                    newer = await _claim_as_wid(p, mine, "newer")
                await trio.sleep(2.0)  # a drop is acted on within milliseconds
                after_first = await _claims(pool)
                status_after_first = (await registration(pool))[0]
                async with incarnation_stream(p, p.port, WID):
                    pass
                await trio.sleep(2.0)
                after_second = await _claims(pool)
                status_after_second = (await registration(pool))[0]
    assert second_registration > first_registration
    assert after_first == {newer}, (older, newer, after_first)
    assert status_after_first == "active"
    assert after_second == set()
    assert status_after_second == "lost"


async def _claim_as_wid(p: Plane, channel: Any, workflow_id: str) -> uuid.UUID:
    """Schedule a ``hold`` activity and claim it as WID on ``channel``; return its task id."""
    await schedule_hold(p, workflow_id)
    reply = await channel.unary(
        p.workers.poll_tasks,
        pb.PollTasksRequest(worker_id=WID, max_tasks=1, activity_types=["sleepy"], wait_s=5),
    )
    (task,) = reply.tasks
    return uuid.UUID(task.task_id)


async def _claims(pool: pg.Pool) -> set[uuid.UUID]:
    rows = await pool.fetch(
        "SELECT id FROM durable_task_queue WHERE status = 'claimed' AND claimed_by = $1", WID
    )
    return {r["id"] for r in rows}
