"""Review of 78b28bc (due timers fired in batches) and e7b3653 (a worker incarnation token per
`Worker.run`). Each test failed on e7b3653 for the defect its assertion message names.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager

import pytest
import trio

from everruns._aio import pg
from everruns._aio.grpc import open_channel
from everruns._proto.everruns import v1 as pb
from everruns.store.store import CHANNEL_TASKS, Store
from tests.integration.test_cancelled_calls_and_races import until
from tests.integration.test_engine import Plane
from tests.integration.test_timer_batch import _sleeping
from tests.integration.test_timer_lock_order import _engine
from tests.integration.test_worker_identity import incarnation_stream
from tests.integration.test_worker_incarnation import (
    WID,
    _claim_as_wid,
    control_plane,
    registration,
    released_within,
)

pytestmark = pytest.mark.db


# ------------------------------------------------------------------ helpers


def token_stream(p: Plane, token: str, worker_id: str = WID) -> AbstractAsyncContextManager[None]:
    """A worker process's own connection with its cancellation stream open, naming incarnation
    ``token``; dropped when the block ends, as when the process dies."""
    return incarnation_stream(p, p.port, worker_id, token)


def _register(pid: int, token: str = "") -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(
        worker_id=WID, max_concurrency=4, activity_types=["sleepy"], pid=pid, incarnation=token
    )


async def _task(pool: pg.Pool, task_id: uuid.UUID) -> tuple[str, int]:
    row = await pool.fetchrow(
        "SELECT status, lease_token FROM durable_task_queue WHERE id = $1", task_id
    )
    assert row is not None
    return row["status"], row["lease_token"]


# ------------------------------------------------------------------ incarnation


async def test_a_tokenless_stream_opened_under_a_tokened_registration_leaves_its_tasks(
    database_url: str, pool: pg.Pool
) -> None:
    """Rolling upgrade, as test_worker_incarnation's second test, but the old process O (an
    older release: no token) (re)opens its cancellation stream after the new process N (a
    token) registered (its control plane restarted, say). A stream without a token can never
    be N's: N names its token on its stream. Yet `WorkerRegistration.names` matches a
    tokenless stream to any registration with the same started_at, token or not, so O's drop
    counts as N's incarnation's: N is marked lost and its task released while N runs."""
    new_token = str(uuid.uuid4())
    with trio.fail_after(60):
        async with (
            control_plane(database_url) as p,
            open_channel("127.0.0.1", p.port) as old,
            open_channel("127.0.0.1", p.port) as new,
        ):
            await old.unary(p.workers.register_worker, _register(1111))
            await new.unary(p.workers.register_worker, _register(2222, new_token))
            async with token_stream(p, new_token):
                task_id = await _claim_as_wid(p, new, "new-process")
                before = await _task(pool, task_id)
                async with incarnation_stream(p, p.port, WID):  # O's stream, reopened
                    pass  # ... and O dies: its connection drops
                await trio.sleep(2.0)  # a drop is acted on within milliseconds
                after = await _task(pool, task_id)
                status, pid, _ = await registration(pool)
    assert (after, status, pid) == (before, "active", 2222), (
        f"the new process of {WID} (token, pid 2222) holds task {task_id} {before} with its "
        f"stream open; the drop of the old tokenless process's stream, opened after the new "
        f"registration, released it (now {after}) and left the worker {status} (pid {pid}): "
        "a tokenless stream was taken for the tokened registration's incarnation"
    )


async def test_an_old_process_outliving_a_crashed_new_one_has_its_later_tasks_released(
    database_url: str, pool: pg.Pool
) -> None:
    """Two processes of WID, both with tokens (test_worker_incarnation's third test): the
    old one O runs when the new one N registers; N then crashes (no goodbye): its drop marks
    WID lost. O's next heartbeat revives the row (heartbeat_worker accepts 'lost' whatever the
    incarnation) instead of finding itself unknown and registering again, so the row keeps
    N's token and started_at. O then claims a task and is killed: its drop counts as an old
    incarnation's and releases only what was claimed before N registered: O's task waits for
    the 30 s stale rule (session 18's known limit, back by another door)."""
    old_token, new_token = str(uuid.uuid4()), str(uuid.uuid4())
    with trio.fail_after(60):
        async with (
            control_plane(database_url) as p,
            open_channel("127.0.0.1", p.port) as old,
            open_channel("127.0.0.1", p.port) as new,
        ):
            await old.unary(p.workers.register_worker, _register(1111, old_token))
            async with token_stream(p, old_token):
                await new.unary(p.workers.register_worker, _register(2222, new_token))
                async with token_stream(p, new_token):
                    pass  # N crashes: its connection drops
                await until(
                    pool,
                    "SELECT status = 'lost' FROM durable_workers WHERE id = $1",
                    WID,
                    what=f"{WID} marked lost",
                )
                # O's heartbeat, as Worker._heartbeats sends it (it registers again when
                # the control plane no longer knows it).
                reply = await old.unary(
                    p.workers.worker_heartbeat,
                    pb.WorkerHeartbeatRequest(
                        worker_id=WID, current_load=0, status="active", incarnation=old_token
                    ),
                )
                if not reply.known:
                    await old.unary(p.workers.register_worker, _register(1111, old_token))
                task_id = await _claim_as_wid(p, old, "old-process")
                status, pid, _ = await registration(pool)
            # O is killed: its connection drops.
            released = await released_within(pool, 3.0)
            after = await _task(pool, task_id)
    assert released, (
        f"the only live process of {WID} (pid 1111, its own token) claimed task {task_id} and "
        f"was killed 3 s ago, yet the task is still {after}: its heartbeat had revived the "
        f"lost row of the crashed process (the row said {status}, pid {pid}) without taking "
        "its incarnation, so its drop counted as an old incarnation's and released only what "
        "was claimed before the crashed process registered"
    )


# ------------------------------------------------------------------ timers


async def test_a_batch_that_held_a_pending_workflow_task_it_did_not_wake_announces_it(
    database_url: str, store: Store, pool: pg.Pool
) -> None:
    """Two control planes read the same due timer; the first fires it (its run gets a pending
    workflow task and one NOTIFY, which wakes a claimer). The second's batch then locks the
    run, finds the timer fired, and locks the run's pending workflow task (the `held` CTE) for
    the rest of its transaction: the woken claimer, polling now, skips that locked row. The
    statement's NOTIFY, there for exactly that ("a claim may have skipped a pending task while
    this held it"), covers only runs that fired a timer, so no wake-up follows its commit and
    the task waits for the due-scanner's straggler rule (a second or more)."""
    with trio.fail_after(30):
        engine = _engine(store, database_url)
        await _sleeping(engine, store, pool, "w", **{"1": 0.01})
        await trio.sleep(0.1)
        due = await store.due_timers(limit=10)  # both control planes read it
        assert len(due) == 1
        async with store.transaction() as conn:  # the first fires it
            assert await store.fire_timers(conn, due) == 1
        async with pg.listen(database_url, [CHANNEL_TASKS]) as notes:
            async with store.transaction() as conn:  # the second, with the same read
                assert await store.fire_timers(conn, due) == 0
                # The claimer the first NOTIFY woke polls while this transaction is open.
                skipped = await store.claim_tasks("w1", workflow_types=["nap"], limit=1)
            announced: list[str] = []
            with trio.move_on_after(1.0):
                while True:
                    _, payload = await notes.receive()
                    announced.append(payload)
                    if payload.startswith("workflow:nap"):
                        break
        pending = await pool.fetchval(
            "SELECT count(*) FROM durable_task_queue WHERE kind = 'workflow' AND status = 'pending'"
        )
    assert skipped == [] and pending == 1
    assert any(p.startswith("workflow:nap") for p in announced), (
        "a timer batch locked a pending workflow task (a claim skipped it meanwhile) and "
        f"committed without a NOTIFY for it (heard: {announced}): the claim's wake-up is lost "
        "until the straggler rule"
    )
