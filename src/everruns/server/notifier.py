"""Wake-ups for the control plane: PostgreSQL NOTIFY fanned out to waiting Trio tasks.

One LISTEN connection per control plane. Long-polling claims wait for "tasks changed", result
long-polls wait for "this run changed", cancellation streams wait for "cancel this task of your
worker", the due-scanner waits for "a timer or delayed task was added", and the engine's cache
of what each worker serves forgets a worker that (re-)registered anywhere. Notifications are
hints: every waiter re-reads the tables after waking, so a lost notification can only delay,
never lose, work; when the LISTEN connection is lost and re-established, everyone is woken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from everruns._aio import pg
from everruns.errors import DatabaseError
from everruns.store.models import Incarnation
from everruns.store.store import (
    CHANNEL_CANCEL,
    CHANNEL_RUNS,
    CHANNEL_TASKS,
    CHANNEL_TIMERS,
    CHANNEL_WORKERS,
    STRAGGLING_AFTER_S,
)

__all__ = ["CancelNotice", "Notifier"]

log = logging.getLogger("everruns.server")

CancelNotice = tuple[str, int]  # (task_id, lease_token)

QUIET_FOR = 1.0
"""Seconds a claim that found nothing (for keys nobody has poked since) spares later claimers
of the same keys their own query: they wait for a wake-up instead."""

_STRAGGLER_MARGIN_S = 0.05
"""How long after a task would count as straggling the due-scanner looks for it."""


class TaskInterest:
    """One waiting claimer: the keys it claims and the event that wakes it.

    A claimer that names its worker can also be handed a task directly (eager start): a
    starter reserves it while it waits (`Notifier.reserve_claimer`), which takes it out of
    the wake-ups, and settles the reservation with the tasks it claimed for that worker, or
    none (`Notifier.settle`). The event then wakes the claimer, which takes them (`take`);
    tasks handed to a claimer that has left are the starter's to give back.
    """

    __slots__ = ("closed", "event", "handed", "keys", "reserved", "waiting", "woken_by", "worker")

    def __init__(self, keys: tuple[str, ...], worker: str | None = None) -> None:
        self.keys = keys
        self.worker = worker
        self.event = trio.Event()
        self.woken_by: str | None = None  # set by a wake-up, cleared when acted on (rearm)
        self.waiting = False  # in `wait`: not claiming, so it can be reserved
        self.reserved = False  # a starter will hand it tasks (or settle with none)
        self.handed: list[Any] = []  # what the settled reservation handed over
        self.closed = False  # the claimer has left

    def rearm(self) -> None:
        """Take the wake-up (before claiming) and wait again."""
        self.event = trio.Event()
        self.woken_by = None

    async def wait(self) -> None:
        """Wait for a wake-up or a settled reservation."""
        self.waiting = True
        try:
            await self.event.wait()
        finally:
            self.waiting = False

    def take(self) -> list[Any]:
        """The tasks a settled reservation handed over (now the claimer's), or [] if none."""
        handed, self.handed = self.handed, []
        self.reserved = False
        return handed


class Notifier:
    """Fan-out of database notifications to the tasks waiting on them."""

    def __init__(self) -> None:
        # Waiting claimers, by task key ("activity:TYPE" / "workflow:TYPE"), oldest first.
        self._claimers: dict[str, dict[TaskInterest, None]] = {}
        # Claim hints: every wake-up of a key bumps its generation (a wake-up of all keys
        # bumps the epoch); a key is quiet while a claim that began at its current
        # (epoch, generation) is running or found nothing, for at most QUIET_FOR seconds.
        self._generation: dict[str, int] = {}
        self._epoch = 0
        self._quiet: dict[str, tuple[int, int, float]] = {}
        self._runs: dict[str, list[Any]] = {}  # run id -> [event, waiters]
        # worker id -> its cancellation streams here -> the incarnation each belongs to
        self._cancels: dict[str, dict[trio.MemorySendChannel[CancelNotice], Incarnation]] = {}
        self._due = trio.Event()
        # When the due-scanner will next look by itself (None while it is scanning), and the
        # earliest deadline made while it scans: the scan may have read the tables before it
        # was made, so its next look must come no later.
        self._due_scope: trio.CancelScope | None = None  # the scanner's sleep, while it sleeps
        self._made_while_scanning = float("inf")
        # Whether LISTEN is up: while it is not, no wake-up arrives, and the due-scanner looks
        # for waiting tasks every STRAGGLING_AFTER_S instead. And whether notifications were
        # dropped (the listener fell more than its buffer behind) since it last caught up.
        self._listening = False
        self._dropped = False
        # Called with a worker id when that worker (re-)registers on any control plane, with
        # None when registrations may have been missed (the LISTEN connection was lost).
        self._registration_watchers: list[Callable[[str | None], None]] = []

    # ---------------------------------------------------------------- tasks
    #
    # A new task wakes ONE waiting claimer of its key (the one waiting longest), not all of
    # them: with a thousand idle workers, waking all would make a thousand claim queries for
    # one task. A claimer that filled all its slots passes the wake-up on (the queue may hold
    # more), and one that is woken but leaves without claiming passes it on too, so no
    # wake-up is lost. Notifications are hints: every claimer also re-claims when its long-poll
    # budget ends, and the due-scanner re-wakes keys whose delayed tasks become visible.

    @contextmanager
    def claim_interest(
        self, keys: Iterable[str], worker: str | None = None
    ) -> Iterator[TaskInterest]:
        """Register as a claimer of ``keys`` for the block (enter it BEFORE trying to claim);
        with ``worker``, it may be handed tasks claimed for that worker (`reserve_claimer`)."""
        interest = TaskInterest(tuple(keys), worker)
        self._listen(interest)
        try:
            yield interest
        finally:
            interest.closed = True
            self._forget(interest)
            if interest.woken_by is not None:
                # A wake-up this claimer will not act on (it leaves, or it was claiming when
                # the wake-up came and is leaving with what that claim found): pass it on.
                self.poke_key(interest.woken_by)

    def _listen(self, interest: TaskInterest) -> None:
        for key in interest.keys:
            self._claimers.setdefault(key, {})[interest] = None

    def reserve_claimer(self, key: str) -> TaskInterest | None:
        """Reserve the claimer of ``key`` that has waited longest, if one is waiting (not
        claiming) and names its worker: it gets no wake-up until `settle`."""
        for interest in self._claimers.get(key, {}):
            if interest.worker is not None and interest.waiting and not interest.event.is_set():
                interest.reserved = True
                self._forget(interest)
                return interest
        return None

    def settle(self, interest: TaskInterest, tasks: list[Any]) -> bool:
        """End a reservation: hand ``tasks`` (claimed for its worker) to the claimer and wake
        it, or with no tasks let it wait for wake-ups again. Returns False if the claimer has
        left (``tasks`` then stay with the caller, to give back)."""
        if interest.closed:
            interest.reserved = False
            return False
        if tasks:
            interest.handed = tasks
        else:  # it claims once more: it may have missed a wake-up while reserved
            interest.reserved = False
            self._listen(interest)
        interest.event.set()
        return True

    def _forget(self, interest: TaskInterest) -> None:
        for key in interest.keys:
            waiting = self._claimers.get(key)
            if waiting is not None:
                waiting.pop(interest, None)
                if not waiting:
                    del self._claimers[key]

    # A thousand idle workers long-polling the same type must not each run a claim query
    # that is bound to find nothing (they arrive together after a restart, and re-poll every
    # long-poll budget): once a claim for some keys is running or has found nothing, and
    # nothing has poked those keys since, another claimer of them waits for a wake-up
    # instead. A claim that fails or is cancelled passes the wake-up on, and the hint lapses
    # after QUIET_FOR seconds, so a hint can delay a claim, never lose one.

    def _stamp(self, key: str) -> tuple[int, int]:
        return self._epoch, self._generation.get(key, 0)

    def claim_needed(self, keys: Iterable[str]) -> bool:
        """Whether a claim for ``keys`` could find something no running or recent claim of
        them will find."""
        now = trio.current_time()
        for key in keys:
            quiet = self._quiet.get(key)
            if quiet is None or quiet[:2] != self._stamp(key) or now - quiet[2] > QUIET_FOR:
                return True
        return False

    def claim_started(self, keys: Iterable[str]) -> list[tuple[str, tuple[int, int]]]:
        """Mark ``keys`` quiet while a claim of them runs; returns what `claim_ended` needs."""
        now = trio.current_time()
        stamps = [(key, self._stamp(key)) for key in keys]
        for key, stamp in stamps:
            self._quiet[key] = (*stamp, now)
        return stamps

    def claim_ended(
        self,
        stamps: list[tuple[str, tuple[int, int]]],
        *,
        drained: bool,
        claimer: TaskInterest | None = None,
    ) -> None:
        """A claim marked with `claim_started` finished. One that took less than it asked for
        (``drained``) leaves its keys quiet (a poke meanwhile has already undone that); one
        that took all it asked for, failed or was cancelled wakes the next claimer of each
        key other than ``claimer`` itself, which claims in its place."""
        if drained:
            now = trio.current_time()
            for key, stamp in stamps:
                if self._stamp(key) == stamp:
                    self._quiet[key] = (*stamp, now)
            return
        for key, stamp in stamps:
            if self._stamp(key) == stamp:
                self.poke_key(key, skip=claimer)

    def poke_key(self, key: str, *, count: int = 1, skip: TaskInterest | None = None) -> None:
        """Wake the ``count`` claimers of ``key`` that have waited longest (other than
        ``skip``): as many as there are new tasks, so that they claim side by side."""
        self._generation[key] = self._generation.get(key, 0) + 1
        self._quiet.pop(key, None)
        for interest in self._claimers.get(key, {}):
            if count <= 0:
                return
            if interest is not skip and not interest.event.is_set():
                interest.woken_by = key
                interest.event.set()
                count -= 1

    def poke_tasks(self) -> None:
        """Wake every waiting claimer (after a reconnect: anything may have changed)."""
        self._epoch += 1
        self._quiet.clear()
        for waiting in list(self._claimers.values()):
            for interest in waiting:
                if not interest.event.is_set():
                    interest.event.set()

    # ---------------------------------------------------------------- runs

    @contextmanager
    def watch_run(self, run_id: str) -> Iterator[trio.Event]:
        """An event set when the run changes; enter it BEFORE reading the run's state."""
        entry = self._runs.get(run_id)
        if entry is None:
            entry = self._runs[run_id] = [trio.Event(), 0]
        entry[1] += 1
        try:
            yield entry[0]
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._runs.get(run_id) is entry:
                del self._runs[run_id]

    def run_changed(self, run_id: str) -> None:
        entry = self._runs.pop(run_id, None)
        if entry is not None:
            entry[0].set()

    # ---------------------------------------------------------------- cancellations

    @contextmanager
    def subscribe_cancellations(
        self, worker_id: str, incarnation: Incarnation
    ) -> Iterator[trio.MemoryReceiveChannel[CancelNotice]]:
        """Receive the cancellation requests for tasks held by ``worker_id``, on a stream of
        ``incarnation``."""
        send, receive = trio.open_memory_channel[CancelNotice](256)
        self._cancels.setdefault(worker_id, {})[send] = incarnation
        try:
            yield receive
        finally:
            subscribers = self._cancels.get(worker_id)
            if subscribers is not None:
                subscribers.pop(send, None)
                if not subscribers:
                    del self._cancels[worker_id]
            send.close()

    def has_cancel_stream(self, worker_id: str, incarnation: Incarnation) -> bool:
        """Whether a cancellation stream of this incarnation of the worker is open here (a
        stream of another incarnation does not count: its connection is another process's)."""
        return incarnation in self._cancels.get(worker_id, {}).values()

    def _cancel(self, worker_id: str, task_id: str, lease_token: int) -> None:
        for send in list(self._cancels.get(worker_id, ())):
            try:
                send.send_nowait((task_id, lease_token))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # A full or closed stream: the holder still learns from its heartbeat reply.
                pass

    # ---------------------------------------------------------------- due-scanner

    def poke_due(self) -> None:
        self._due.set()

    def deadline_added(self, seconds: float | None) -> None:
        """A deadline ``seconds`` from now was created: wake the due-scanner only if it would
        otherwise sleep past it (the common deadlines are minutes away; a scan per claim would
        cost more than the claims). While it scans, its next sleep is cut short instead: waking
        it would start another scan at once, and under a steady flow of claims it would scan
        without pause."""
        if seconds is not None:
            self._due_by(seconds, wake=True)

    def look_again_by(self, seconds: float) -> None:
        """Have the due-scanner's next round begin within ``seconds`` without waking it now:
        its sleep is cut to that (or, while it scans, its next one)."""
        self._due_by(seconds, wake=False)

    def _due_by(self, seconds: float, *, wake: bool) -> None:
        at = trio.current_time() + seconds
        scope = self._due_scope
        if scope is None:  # scanning: its next sleep ends by then
            self._made_while_scanning = min(self._made_while_scanning, at)
        elif at < scope.deadline:  # sleeping past it: wake it now, or end its sleep then
            if wake:
                self.poke_due()
            else:
                scope.deadline = at

    async def wait_due(self, timeout: float | None) -> None:
        """Wait until poked or ``timeout`` seconds pass (None: until poked), or until the
        earliest deadline made since the last wait."""
        now = trio.current_time()
        wait = float("inf") if timeout is None else max(0.0, timeout)
        if not self._listening:  # no wake-up comes by NOTIFY: look for waiting tasks often
            wait = min(wait, STRAGGLING_AFTER_S + _STRAGGLER_MARGIN_S)
        wait = max(0.0, min(wait, self._made_while_scanning - now))
        self._made_while_scanning = float("inf")
        with trio.move_on_after(wait) as scope:
            self._due_scope = scope
            try:
                await self._due.wait()
            finally:
                self._due_scope = None
        self._due = trio.Event()

    # ---------------------------------------------------------------- workers

    def watch_registrations(self, watcher: Callable[[str | None], None]) -> None:
        """Call ``watcher(worker_id)`` whenever a worker registers on any control plane, and
        ``watcher(None)`` when some may have been missed (the LISTEN connection was lost)."""
        self._registration_watchers.append(watcher)

    def worker_registered(self, worker_id: str | None) -> None:
        for watcher in self._registration_watchers:
            watcher(worker_id)

    # ---------------------------------------------------------------- the listener

    def _dispatch(self, channel: str, payload: str) -> None:
        if channel == CHANNEL_TASKS:
            if payload == "*":
                self.poke_tasks()
            else:
                # "kind:type", or "kind:type<TAB>n" when n tasks of it were added at once.
                key, _, count = payload.partition("\t")
                self.poke_key(key, count=int(count) if count.isdigit() else 1)
            # Should its wake-up be lost (a claim skipped the task's row while another
            # transaction held it, say), the due-scanner's look for stragglers finds it.
            self.look_again_by(STRAGGLING_AFTER_S + _STRAGGLER_MARGIN_S)
        elif channel == CHANNEL_RUNS:
            self.run_changed(payload)
        elif channel == CHANNEL_TIMERS:
            self.poke_due()
        elif channel == CHANNEL_CANCEL:
            worker_id, _, rest = payload.partition("\t")
            task_id, _, lease = rest.partition("\t")
            if lease.isdigit():
                self._cancel(worker_id, task_id, int(lease))
        elif channel == CHANNEL_WORKERS:
            self.worker_registered(payload)

    def _wake_everyone(self) -> None:
        self.poke_tasks()
        self.poke_due()
        self.worker_registered(None)
        for run_id in list(self._runs):
            self.run_changed(run_id)

    async def listen(
        self, url: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """LISTEN until cancelled, reconnecting with backoff; ready once LISTEN is registered."""
        channels = [CHANNEL_TASKS, CHANNEL_RUNS, CHANNEL_TIMERS, CHANNEL_CANCEL, CHANNEL_WORKERS]
        started = False
        delay = 0.1
        while True:
            try:
                async with pg.listen(url, channels, on_dropped=self._note_dropped) as notes:
                    if not started:
                        task_status.started()
                        started = True
                    else:
                        log.info("LISTEN connection re-established")
                    self._listening = True
                    self._wake_everyone()  # anything sent while we were away
                    delay = 0.1
                    async for channel, payload in notes:
                        self._dispatch(channel, payload)
                        # Some wake-ups were lost: as after a reconnect, once caught up (not
                        # once per drop while the buffer stays full, under the heaviest load).
                        if self._dropped and notes.statistics().current_buffer_used == 0:
                            self._dropped = False
                            log.warning("LISTEN fell behind and dropped notifications")
                            self._wake_everyone()
                log.warning("LISTEN connection lost; reconnecting")
            except DatabaseError as exc:
                if not started:
                    raise
                log.warning("LISTEN connection failed (%s); retrying in %.1f s", exc, delay)
            finally:
                self._listening = False
            self.look_again_by(0)  # the scanner looks often from now on (`wait_due`)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _note_dropped(self) -> None:
        self._dropped = True
