"""The worker's task slots: how many tasks it may hold, and when it should claim more.

A slot is taken (from a `trio.CapacityLimiter` of ``max_concurrent_tasks`` tokens) *before* the
worker asks the control plane for a task, and given back when the task is over, so a worker can
never hold more tasks than it has slots — whether they come from a poll or eagerly from a
completion reply. Claiming follows `everruns.domain.lease.should_claim`: stop above 90 % load,
resume below 70 %. Waiting for a slot is event-driven (no sleep loops). This module decides
and counts; it performs no I/O.

Threads for sync activities (``max_sync_threads``) are counted the same way, when the worker
runs sync activities: a slot offered for a claim that may bring one carries a `Thread` taken
before the claim, so the worker never holds a sync activity that has to wait for a thread
while its start-to-close clock runs. The activity's thread keeps it until the thread really
ends, even one abandoned by a stop: a thread that outlives its attempt is still counted.
"""

from __future__ import annotations

import trio

from everruns.domain.lease import should_claim

__all__ = ["Slot", "TaskSlots", "Thread"]


class Thread:
    """A sync activity's thread, taken before the claim that may bring the activity.

    Passed to ``trio.to_thread.run_sync`` as its ``limiter`` (Trio takes any object with these
    two methods): it is held already, so Trio's acquire returns at once (no checkpoint, so no
    cancellation between it and the thread's start), and Trio releases it when the thread has
    really ended, even a thread abandoned on cancellation.
    """

    __slots__ = ("_held", "_owner", "started")

    def __init__(self, owner: TaskSlots) -> None:
        self._owner = owner
        self._held = True
        self.started = False

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        """Called by Trio just before it starts the thread."""
        self.started = True

    def release_on_behalf_of(self, borrower: object) -> None:
        """Called by Trio once the thread has ended (or failed to start)."""
        self._release()

    def give_back(self) -> None:
        """Release it unless a thread was started with it (that thread's end releases it)."""
        if not self.started:
            self._release()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._owner._thread_released(self)


class Slot:
    """One task slot: reserved for a claim in flight, then running the task it brought. It may
    carry a `Thread` while it is offered for a claim (`TaskSlots.add_threads`)."""

    __slots__ = ("running", "thread")

    def __init__(self) -> None:
        self.running = False
        self.thread: Thread | None = None

    def __repr__(self) -> str:
        return f"<Slot {'running' if self.running else 'reserved'}>"


class TaskSlots:
    """Slots of one worker, with the claim/pause decision (hysteresis between low and high).

    Args:
        capacity: the worker's maximum number of concurrent tasks (>= 1).
        high: load ratio above which the worker stops claiming.
        low: load ratio below which a paused worker resumes.
        threads: threads for sync activities (default: ``capacity``).
    """

    def __init__(
        self, capacity: int, *, high: float = 0.9, low: float = 0.7, threads: int | None = None
    ) -> None:
        self._limiter = trio.CapacityLimiter(capacity)
        self._threads = trio.CapacityLimiter(threads or capacity)
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
    def free_threads(self) -> int:
        """Threads for sync activities neither running one nor taken for a claim."""
        return int(self._threads.available_tokens)

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

    async def wait_thread(self) -> None:
        """Wait until a thread for sync activities is free.

        Cancellation: safe at any point; nothing is held while waiting.
        """
        while not self.free_threads:
            await self._changed.wait()

    def new_thread(self) -> Thread | None:
        """Take a free thread for sync activities; None when every one is taken."""
        thread = Thread(self)
        try:
            self._threads.acquire_on_behalf_of_nowait(thread)
        except trio.WouldBlock:
            return None
        return thread

    def add_threads(self, slots: list[Slot]) -> int:
        """Give each slot of ``slots`` a thread, in order, while threads are free (one that
        has one keeps it); return how many have one."""
        count = 0
        for slot in slots:
            if slot.thread is None:
                slot.thread = self.new_thread()
                if slot.thread is None:
                    break
            count += 1
        return count

    def start(self, slot: Slot, *, needs_thread: bool = False) -> Thread | None:
        """Mark a reserved slot as running the task its claim brought.

        Returns:
            The slot's thread if the task ``needs_thread`` (the task owns it from now on: it
            goes with its thread, or `Thread.give_back` if it never starts one); otherwise
            the slot's thread, if any, is released and None returned.
        """
        if not slot.running:
            slot.running = True
            self._running += 1
        thread, slot.thread = slot.thread, None
        if needs_thread:
            return thread
        if thread is not None:
            thread.give_back()
        return None

    def release(self, slot: Slot) -> None:
        """Give a slot back (its claim brought nothing, or its task is over), with its thread."""
        if slot.running:
            slot.running = False
            self._running -= 1
        thread, slot.thread = slot.thread, None
        if thread is not None:
            thread.give_back()
        self._limiter.release_on_behalf_of(slot)
        self._notify()

    def _thread_released(self, thread: Thread) -> None:
        self._threads.release_on_behalf_of(thread)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
