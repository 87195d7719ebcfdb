"""The control plane's background duties: stale-task reclamation, lost workers, the
dead-letter requeues operators write with the runbook's SQL, the cancellation of child runs
and activities their parent or run left open, and (in the due-scanner) timers, schedules and
timeouts.

Each duty is a loop in the server's nursery. Duties that must run once across several control
planes take a PostgreSQL advisory lock for each round (try-lock: a replica that does not get it
skips the round).
"""

from __future__ import annotations

import logging
from datetime import datetime

import trio

from everruns.errors import DatabaseError
from everruns.server.engine import Engine

__all__ = ["run_due_scanner", "run_duties", "run_follow_ups"]

log = logging.getLogger("everruns.server")

# Advisory lock keys, one per singleton duty.
RECLAIM_LOCK = 0x6576_0001
RETENTION_LOCK = 0x6576_0002

FOLLOW_UP_SECONDS = 30.0
"""How long the follow-up of one skipped child or activity task may wait for the transactions
that hold it and its parent or run (they are short); past that, the reclaim round's sweep takes
it over. (A task a duty skipped is found again by that duty's next round while it still
qualifies; a lost worker's, by the stale rule.)"""


async def reclaim_once(engine: Engine) -> int:
    """One round: release stale tasks, mark silent workers lost, apply operator requeues,
    request the cancellation of child runs their parent left open
    (`Engine.cancel_orphaned_children`), cancel activities their run left open
    (`Engine.cancel_abandoned_activities`).

    Returns:
        How many tasks were released or revived.
    """
    store = engine.store
    async with store.transaction() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RECLAIM_LOCK):
            return 0
        released = await engine.reclaim_stale(conn)
        revived = await store.apply_operator_requeues(conn)
    for task in revived:
        log.info("dead letter requeued by operator: task %s (%s)", task.task_id, task.type_name)
    missed = engine.config.worker_lost_after
    for worker_id in await store.mark_lost_workers(missed_after=missed):
        log.warning("worker %s lost (no heartbeat for %.0f s)", worker_id, missed)
        await engine.retry_stuck(worker_id, "lost")
    await engine.cancel_orphaned_children()
    await engine.cancel_abandoned_activities()
    return released + len(revived)


class _Outage:
    """Backoff for a duty whose round failed: the duty logs, waits and tries again. A
    PostgreSQL restart must not stop the control plane, and neither may one round that fails
    for any other reason (a row in a state no statement expected, say): the round is logged
    with its traceback and the duty goes on with the next."""

    def __init__(self, duty: str) -> None:
        self.duty = duty
        self.delay = 0.0

    async def failed(self, exc: Exception) -> None:
        self.delay = min(5.0, max(0.2, self.delay * 2))
        if isinstance(exc, DatabaseError):
            log.warning(
                "%s: database unavailable (%s); retrying in %.1f s", self.duty, exc, self.delay
            )
        else:
            log.error("%s: a round failed; retrying in %.1f s", self.duty, self.delay, exc_info=exc)
        await trio.sleep(self.delay)

    def recovered(self) -> None:
        if self.delay:
            log.info("%s: its rounds succeed again", self.duty)
        self.delay = 0.0


async def run_duties(
    engine: Engine, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the periodic duties until cancelled: reclamation every ``reclaim_interval``,
    retention every ``retention_interval`` (each round under its advisory lock)."""
    task_status.started()
    next_retention = trio.current_time()
    outage = _Outage("reclaimer")
    while True:
        try:
            await reclaim_once(engine)
            if trio.current_time() >= next_retention:
                # Each batch under the lock (held only by its own transaction): one control
                # plane deletes at a time.
                await engine.delete_expired(lock=RETENTION_LOCK)
                next_retention = trio.current_time() + engine.config.retention_interval
        except Exception as exc:
            await outage.failed(exc)
            continue
        outage.recovered()
        until_retention = next_retention - trio.current_time()
        await trio.sleep(max(0.0, min(engine.config.reclaim_interval, until_retention)))


async def run_follow_ups(
    engine: Engine, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Cancel the open children and activity tasks a run's end or cancellation skipped
    (another transaction held them) as soon as that transaction lets go, one at a time, each
    in a transaction that waits for it, then for its parent or run (`Engine.follow_up`); and
    release or time out the tasks a duty skipped (another transaction held their run) the
    same way, each in a transaction that waits for the task, then for its run. A follow-up
    that fails or takes too long is left to the reclaim round's sweep (a duty's task: to the
    duty's next round, or the stale rule)."""
    task_status.started()
    while True:
        for skipped in await engine.skipped():
            try:
                with trio.move_on_after(FOLLOW_UP_SECONDS):
                    await engine.follow_up(skipped)
            except Exception as exc:
                log.warning("%s (%s)", skipped.what, exc)


async def run_due_scanner(
    engine: Engine, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Fire timers and schedules when due and wake claimers when delayed tasks become visible.

    Sleeps until the next due moment (read from the tables), or until a new timer or retry is
    announced by NOTIFY, whichever comes first; never polls on a fixed interval.
    """
    task_status.started()
    since: datetime | None = None
    engine.notifier.poke_tasks()
    outage = _Outage("due-scanner")
    while True:
        try:
            since, wait = await _scan_once(engine, since)
        except Exception as exc:
            await outage.failed(exc)
            continue
        outage.recovered()
        # Past-due timers whose run another transaction holds (another control plane firing
        # them, say): look again shortly.
        await engine.notifier.wait_due(max(wait, 0.02))


async def _scan_once(engine: Engine, since: datetime | None) -> tuple[datetime, float]:
    """One round of the due-scanner; returns the new ``since`` and how long to sleep."""
    if since is None:
        since = await engine.store.now()
    await engine.fire_due_timers()
    try:
        await engine.fire_due_schedules()
    except Exception as exc:  # the round's other duties go on; the next round tries again
        log.warning("firing due schedules failed: %s", exc)
    await engine.enforce_timeouts()
    async with engine.store.transaction() as conn:
        await engine.store.apply_operator_requeues(conn)
    # Wake one claimer per key whose delayed tasks (retry backoff) became visible, and
    # everyone when an open breaker may now admit probes (its key need not be a type).
    open_duration = engine.breakers.open_duration
    if await engine.store.breakers_due_since(since, open_duration=open_duration):
        engine.notifier.poke_tasks()
    keys, since, straggler = await engine.store.newly_visible_keys(since)
    for key in keys:
        engine.notifier.poke_key(key)
    waits = [
        w
        for w in (
            await engine.store.seconds_until_due(
                breaker_open_duration=open_duration,
                schedules_fired_by=engine.schedules_fired_by,
            ),
            await engine.store.seconds_until_timeout(),
            # A task waiting now is claimed within a second unless its wake-up was lost (a
            # claim that skipped its locked row, say): look again when it would straggle,
            # and every second while one does.
            straggler,
        )
        if w is not None
    ]
    # Deadlines added by another control plane reach us by NOTIFY only for timers and
    # retries, so look at least once per reclaim interval.
    return since, min([*waits, engine.config.reclaim_interval])
