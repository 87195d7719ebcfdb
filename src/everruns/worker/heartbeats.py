"""Activity heartbeats: one task schedules them for every running activity.

Each running activity gets a `Beat`: when its next heartbeat is due (its period after the last
one), whether ``ctx.heartbeat()`` asked for one sooner, and the call in flight, if any. One
`Heartbeats` task sleeps until the earliest beat is due and starts its call; a beat asked for by
the activity goes out at once, but never sooner than ``min_gap`` after the previous one, so a
tight loop of ``ctx.heartbeat()`` calls does not become a tight loop of calls. At most one call
per activity is in flight.

Why one task and not a loop per activity: almost every activity ends long before its first
heartbeat is due, and a task of its own (spawned, then cancelled) cost more than a no-op
activity's whole run (measured: 70 µs against 12 µs per activity). Adding and removing a beat
is a heap push and a flag.

This module decides when; the worker's ``send`` makes the call and says when the next one is
due (or that the activity must stop beating: its lease is gone or it was cancelled).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from everruns.worker.backoff import Backoff

__all__ = ["Beat", "Heartbeats"]

Subject = TypeVar("Subject")


def beat_gap(interval: float) -> float:
    """The shortest time between two heartbeats of one activity with this period."""
    return min(1.0, interval / 2)


class Beat(Generic[Subject]):
    """The heartbeat schedule of one running activity.

    Attributes:
        subject: what the beat is for (the worker's running task).
        interval: the regular period, in seconds.
        min_gap: the shortest time between two calls.
        due: when the next regular (or retried) call is due, on Trio's clock.
        last_sent: when the last call started.
        poked: the activity asked for a heartbeat not yet sent.
        backoff: consecutive failures of this activity's calls (the worker's ``send`` uses it).
    """

    __slots__ = (
        "_at",
        "_sending",
        "backoff",
        "due",
        "interval",
        "last_sent",
        "live",
        "min_gap",
        "poked",
        "subject",
    )

    def __init__(self, subject: Subject, interval: float, now: float) -> None:
        if not interval > 0:
            raise ValueError(f"a heartbeat interval must be positive, got {interval}")
        self.subject = subject
        self.interval = interval
        self.min_gap = beat_gap(interval)
        self.last_sent = now - self.min_gap
        self.due = now + interval
        self.poked = False
        self.live = True
        self.backoff: Backoff | None = None
        self._at = math.inf  # the time of this beat's current entry in the heap
        self._sending: trio.CancelScope | None = None

    def next_at(self) -> float:
        """When the next call should start: at once when poked (but ``min_gap`` after the
        last), else when due (never sooner than ``min_gap`` after the last either)."""
        earliest = self.last_sent + self.min_gap
        return earliest if self.poked else max(self.due, earliest)


class Heartbeats(Generic[Subject]):
    """Schedules the heartbeats of every running activity from one task (`run`).

    Args:
        send: makes one heartbeat call for a beat and returns when the next is due (Trio's
            clock), or None when the activity must stop beating. It is cancelled if the beat
            is removed while the call is in flight. An exception it raises stops that beat and
            is re-raised by `run` (a bug, not a failed call: ``send`` handles those).
    """

    def __init__(self, send: Callable[[Beat[Subject]], Awaitable[float | None]]) -> None:
        self._send_fn = send
        self._heap: list[tuple[float, int, Beat[Subject]]] = []
        self._count = 0
        self._live = 0
        self._wakeup = trio.Event()
        self._sleeping_until = math.inf

    def __len__(self) -> int:
        """Heap entries (live and not yet discarded); for tests."""
        return len(self._heap)

    def add(self, subject: Subject, interval: float) -> Beat[Subject]:
        """Start beating for ``subject`` every ``interval`` seconds; the first call is due one
        interval from now."""
        beat = Beat(subject, interval, trio.current_time())
        self._live += 1
        self._schedule(beat)
        return beat

    def remove(self, beat: Beat[Subject]) -> None:
        """Stop beating (the activity ended): no more calls, and one in flight is cancelled."""
        if beat.live:
            beat.live = False
            self._live -= 1
        if beat._sending is not None:
            beat._sending.cancel()
        heap = self._heap
        while heap and not _current(heap[0]):
            heapq.heappop(heap)
        if len(heap) > 2 * self._live + 64:
            # Entries of ended activities behind a long-running one's would stay (and keep
            # their tasks alive) until their own time: drop them all at once.
            heap[:] = [entry for entry in heap if _current(entry)]
            heapq.heapify(heap)

    def poke(self, beat: Beat[Subject]) -> None:
        """The activity called ``ctx.heartbeat()``: send as soon as ``min_gap`` allows."""
        if not beat.live:
            return
        beat.poked = True
        if beat._sending is None:
            self._schedule(beat)

    def _schedule(self, beat: Beat[Subject]) -> None:
        at = beat.next_at()
        if at == beat._at:
            return
        beat._at = at
        self._count += 1
        heapq.heappush(self._heap, (at, self._count, beat))
        if at < self._sleeping_until:
            self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the calls as they come due, until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            heap = self._heap
            while True:
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    entry = heapq.heappop(heap)
                    if _current(entry):
                        beat = entry[2]
                        beat._at = math.inf
                        # Marked in flight now, so that a poke before the call starts does
                        # not schedule a second one.
                        beat._sending = trio.CancelScope()
                        nursery.start_soon(self._send, beat, beat._sending)
                while heap and not _current(heap[0]):
                    heapq.heappop(heap)
                self._sleeping_until = heap[0][0] if heap else math.inf
                self._wakeup = trio.Event()
                with trio.move_on_at(self._sleeping_until):
                    await self._wakeup.wait()
                self._sleeping_until = -math.inf  # awake: no need to wake it

    async def _send(self, beat: Beat[Subject], scope: trio.CancelScope) -> None:
        due: float | None = None
        try:
            with scope:
                if not beat.live:
                    return
                beat.poked = False
                beat.last_sent = trio.current_time()
                due = await self._send_fn(beat)
        finally:
            beat._sending = None
        if scope.cancelled_caught or not beat.live:
            return
        if due is None:
            beat.live = False
            self._live -= 1
            return
        beat.due = due
        self._schedule(beat)


def _current(entry: tuple[float, int, Beat[Subject]]) -> bool:
    """A heap entry still stands for its beat's next call (not removed, not superseded)."""
    beat = entry[2]
    return beat.live and beat._sending is None and entry[0] == beat._at
