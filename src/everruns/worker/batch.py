"""Group commit on the worker side: reports that are ready together travel together.

A `Batcher` owns one sending task. Callers `submit` an item and wait for its own result; the
sender takes everything submitted so far (up to ``max_batch``) as one batch, sends it with one
call, and hands each caller its result. While the calls allowed are in flight the next batch
gathers, so a lone report goes out at once (no timer, no added latency) and a busy worker sends
one call per round trip instead of one per report. This module decides nothing about what is
sent; it performs no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import trio

__all__ = ["Batcher", "BatcherClosed"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatcherClosed(Exception):
    """The batcher is not running (not started yet, or stopped): send the item another way."""


class _Pending(Generic[Item, Result]):
    __slots__ = ("done", "error", "item", "result", "taken")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.done = trio.Event()
        self.taken = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class Batcher(Generic[Item, Result]):
    """Sends submitted items in batches through ``send``, at most ``max_in_flight`` batches at
    a time.

    Args:
        send: sends a batch, returns one result per item in order; an exception it raises is
            every item's result.
        max_batch: the most items one call carries.
        max_in_flight: the most calls out at once. With two, a worker whose slots finish
            together sends half its reports while the other half's call is answered, instead
            of every slot waiting for one call.
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int,
        max_in_flight: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._send = send
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[_Pending[Item, Result]] = []
        self._in_flight: list[list[_Pending[Item, Result]]] = []
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
        pending: _Pending[Item, Result] = _Pending(item)
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
        calls = trio.Semaphore(self._max_in_flight)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await self._ready.wait()
                    await calls.acquire()
                    batch = self._queue[: self._max_batch]
                    del self._queue[: self._max_batch]
                    if not self._queue:
                        self._ready = trio.Event()
                    if not batch:  # its callers withdrew while a call slot was awaited
                        calls.release()
                        continue
                    for pending in batch:
                        pending.taken = True
                    self._in_flight.append(batch)
                    nursery.start_soon(self._send_batch, batch, calls)
        finally:
            self._running = False
            _close([*(p for b in self._in_flight for p in b), *self._queue])
            self._in_flight.clear()
            self._queue.clear()

    async def _send_batch(self, batch: list[_Pending[Item, Result]], calls: trio.Semaphore) -> None:
        try:
            results = await self._send([p.item for p in batch])
        except Exception as exc:
            for pending in batch:
                pending.error = exc
                pending.done.set()
        except BaseException:  # the batcher is stopping: the call's outcome is unknown
            _close(batch)
            raise
        else:
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results back")
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()
        finally:
            self._in_flight.remove(batch)
            calls.release()


def _close(pendings: Sequence[_Pending[Any, Any]]) -> None:
    """Answer items the batcher can no longer answer: their callers send them another way."""
    closed = BatcherClosed("the batcher stopped before sending this item")
    for pending in pendings:
        if not pending.done.is_set():
            pending.error = closed
            pending.done.set()
