"""The worker's task slots: how many tasks it may hold, and when it should claim more.

A slot is taken (from a `trio.CapacityLimiter` of ``max_concurrent_tasks`` tokens) *before* the
worker asks the control plane for a task, and given back when the task is over, so a worker can
never hold more tasks than it has slots — whether they come from a poll or eagerly from a
completion reply. Claiming follows `everruns.domain.lease.should_claim`: stop above 90 % load,
resume below 70 %. Waiting for a slot is event-driven (no sleep loops). This module decides
and counts; it performs no I/O.
"""

from __future__ import annotations

import trio

from everruns.domain.lease import should_claim

__all__ = ["Slot", "TaskSlots"]


class Slot:
    """One task slot: reserved for a claim in flight, then running the task it brought."""

    __slots__ = ("running",)

    def __init__(self) -> None:
        self.running = False

    def __repr__(self) -> str:
        return f"<Slot {'running' if self.running else 'reserved'}>"


class TaskSlots:
    """Slots of one worker, with the claim/pause decision (hysteresis between low and high).

    Args:
        capacity: the worker's maximum number of concurrent tasks (>= 1).
        high: load ratio above which the worker stops claiming.
        low: load ratio below which a paused worker resumes.
    """

    def __init__(self, capacity: int, *, high: float = 0.9, low: float = 0.7) -> None:
        self._limiter = trio.CapacityLimiter(capacity)
        self.capacity = capacity
        self._high = high
        self._low = low
        self._running = 0
        self._paused = False
        self._changed = trio.Event()

    @property
    def load(self) -> int:
        """Tasks running now (what heartbeats report)."""
        return self._running

    @property
    def free(self) -> int:
        """Slots neither running a task nor reserved for a claim in flight."""
        return int(self._limiter.available_tokens)

    @property
    def paused(self) -> bool:
        """Whether the last claim decision stopped claiming (load went above ``high``)."""
        return self._paused

    def _claimable(self, *, update: bool) -> bool:
        ok = should_claim(self._running, self.capacity, self._paused, self._high, self._low)
        if update:
            self._paused = not ok
        return ok and self.free > 0

    async def wait_claimable(self) -> int:
        """Wait until the worker should claim and has a free slot.

        Returns:
            How many slots are free (reserve them with `reserve` before claiming).

        Cancellation: safe at any point; nothing is held while waiting.
        """
        while not self._claimable(update=True):
            await self._changed.wait()
        return self.free

    def reserve(self, count: int) -> list[Slot]:
        """Take up to ``count`` free slots for a claim about to be made.

        Returns:
            The slots taken (possibly fewer than asked, possibly none).
        """
        taken: list[Slot] = []
        while len(taken) < count:
            slot = Slot()
            try:
                self._limiter.acquire_on_behalf_of_nowait(slot)
            except trio.WouldBlock:
                break
            taken.append(slot)
        return taken

    def reserve_eager(self, count: int) -> list[Slot]:
        """Take up to ``count`` free slots to offer for eager tasks, if claiming is allowed now.

        Unlike `wait_claimable` this does not change the paused flag: the poll loop owns it.

        Returns:
            The slots taken; none while the load is too high.
        """
        if count <= 0 or not self._claimable(update=False):
            return []
        return self.reserve(count)

    def start(self, slot: Slot) -> None:
        """Mark a reserved slot as running the task its claim brought."""
        if not slot.running:
            slot.running = True
            self._running += 1

    def release(self, slot: Slot) -> None:
        """Give a slot back (its claim brought nothing, or its task is over)."""
        if slot.running:
            slot.running = False
            self._running -= 1
        self._limiter.release_on_behalf_of(slot)
        self._changed.set()
        self._changed = trio.Event()
