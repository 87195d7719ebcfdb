"""The control plane's background duties: stale-task reclamation, lost workers and the
dead-letter requeues operators write with the runbook's SQL.

Each duty is a loop in the server's nursery. Duties that must run once across several control
planes take a PostgreSQL advisory lock for each round (try-lock: a replica that does not get it
skips the round).
"""

from __future__ import annotations

import logging

import trio

from everruns.server.config import ServerConfig
from everruns.server.engine import Engine
from everruns.store.store import Store

__all__ = ["run_duties"]

log = logging.getLogger("everruns.server")

# Advisory lock keys, one per singleton duty.
RECLAIM_LOCK = 0x6576_0001


async def reclaim_once(store: Store, config: ServerConfig) -> int:
    """One round: release stale tasks, mark silent workers lost, apply operator requeues.

    Returns:
        How many tasks were released or revived.
    """
    async with store.transaction() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RECLAIM_LOCK):
            return 0
        released = await store.reclaim_stale(conn, stale_after=config.stale_after)
        revived = await store.apply_operator_requeues(conn)
    for outcome in released:
        task = outcome.task
        verdict = "dead-lettered" if outcome.dead_letter else "released"
        log.warning("stale task %s (%s) %s", task.task_id, task.type_name, verdict)
    for task in revived:
        log.info("dead letter requeued by operator: task %s (%s)", task.task_id, task.type_name)
    lost = await store.mark_lost_workers(missed_after=config.worker_lost_after)
    for worker_id in lost:
        log.warning("worker %s lost (no heartbeat for %.0f s)", worker_id, config.worker_lost_after)
    return len(released) + len(revived)


async def run_duties(
    store: Store,
    config: ServerConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the periodic duties until cancelled."""
    task_status.started()
    while True:
        await reclaim_once(store, config)
        await trio.sleep(config.reclaim_interval)


async def run_due_scanner(
    engine: Engine, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Fire timers when due and wake claimers when delayed tasks become visible.

    Sleeps until the next due moment (read from the tables), or until a new timer or retry is
    announced by NOTIFY, whichever comes first; never polls on a fixed interval.
    """
    task_status.started()
    while True:
        await engine.fire_due_timers()
        engine.notifier.poke_tasks()
        wait = await engine.store.seconds_until_due()
        # Past-due timers another control plane is firing right now: look again shortly.
        await engine.notifier.wait_due(None if wait is None else max(wait, 0.02))
