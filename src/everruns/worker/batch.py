"""Group commit on the worker side: reports that are ready together travel together.

A `Batcher` owns one sending task. Callers `submit` an item and wait for its own result; the
sender takes everything submitted so far (up to ``max_batch`` items and ``max_bytes`` of their
sizes, one item always) as one batch, sends it with one call, and hands each caller its result.
While a batch is in flight the next one gathers, so a lone report goes out at once (no timer, no
added latency) and a busy worker sends one call per round trip instead of one per report. This
module decides nothing about what is sent; it performs no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from everruns.domain.budget import SEND_BUDGET, take

__all__ = ["Batcher", "BatcherClosed"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatcherClosed(Exception):
    """The batcher is not running (not started yet, or stopped): send the item another way."""


class _Pending(Generic[Item, Result]):
    __slots__ = ("done", "error", "item", "result", "size", "taken")

    def __init__(self, item: Item, size: int) -> None:
        self.item = item
        self.size = size
        self.done = trio.Event()
        self.taken = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class Batcher(Generic[Item, Result]):
    """Sends submitted items in batches through ``send``, one batch in flight at a time.

    Args:
        send: sends a batch, returns one result per item in order; an exception it raises is
            every item's result.
        max_batch: the most items one call carries.
        size: an item's size in bytes (at most what it adds to the call), read once as it is
            submitted; none: every item counts 0.

    Attributes:
        max_bytes: the most bytes (by ``size``) one call carries, but for an item alone;
            `SEND_BUDGET` unless set (a worker lowers it to what its control plane reads).
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int,
        size: Callable[[Item], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._send = send
        self._max_batch = max_batch
        self._size = size
        self.max_bytes = SEND_BUDGET
        self._queue: list[_Pending[Item, Result]] = []
        self._ready = trio.Event()
        self._running = False

    async def submit(self, item: Item) -> Result:
        """Send ``item`` with the next batch and return its result.

        Raises:
            BatcherClosed: the batcher is not running, or stopped before sending the item.
            Exception: whatever ``send`` raised for the batch that carried the item.

        Cancellation: an item not yet taken is withdrawn; one already sent may or may not
        have been applied (as with any call cancelled in flight).
        """
        if not self._running:
            raise BatcherClosed("the batcher is not running")
        pending: _Pending[Item, Result] = _Pending(
            item, 0 if self._size is None else self._size(item)
        )
        self._queue.append(pending)
        self._ready.set()
        try:
            await pending.done.wait()
        except BaseException:
            if not pending.taken:
                self._queue.remove(pending)
            raise
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]  # set with done

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches until cancelled; items still waiting then get `BatcherClosed`."""
        self._running = True
        task_status.started()
        batch: list[_Pending[Item, Result]] = []
        try:
            while True:
                await self._ready.wait()
                count = take(
                    (p.size for p in self._queue), budget=self.max_bytes, max_items=self._max_batch
                )
                batch = self._queue[:count]
                del self._queue[:count]
                if not self._queue:
                    self._ready = trio.Event()
                for pending in batch:
                    pending.taken = True
                try:
                    results = await self._send([p.item for p in batch])
                except Exception as exc:
                    for pending in batch:
                        pending.error = exc
                        pending.done.set()
                else:
                    if len(results) != len(batch):
                        raise RuntimeError(
                            f"a batch of {len(batch)} got {len(results)} results back"
                        )
                    for pending, result in zip(batch, results, strict=True):
                        pending.result = result
                        pending.done.set()
                batch = []
        finally:
            self._running = False
            closed = BatcherClosed("the batcher stopped before sending this item")
            for pending in [*batch, *self._queue]:
                if not pending.done.is_set():
                    pending.error = closed
                    pending.done.set()
            self._queue.clear()
