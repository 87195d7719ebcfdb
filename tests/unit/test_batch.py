"""The worker's group commit: reports ready together go out in one call, a lone report goes out
at once, each caller gets its own result, and nothing is left waiting when the sender stops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from everruns.worker.batch import Batcher, BatcherClosed


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate: trio.Event | None = None
        self.fail: Exception | None = None

    async def send(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]


def _submitter(batcher: Batcher[int, int], got: dict[int, int]) -> Callable[[int], Awaitable[None]]:
    """A caller that submits an item and records its result in ``got``."""

    async def submit(n: int) -> None:
        got[n] = await batcher.submit(n)

    return submit


async def test_a_lone_item_goes_out_at_once_and_items_ready_together_share_a_call() -> None:
    rec = Recorder()
    batcher = Batcher(rec.send, max_batch=3)
    got: dict[int, int] = {}
    submit = _submitter(batcher, got)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            assert await batcher.submit(1) == 10
            assert rec.calls == [[1]]
            rec.gate = trio.Event()  # hold the next call in flight
            nursery.start_soon(submit, 2)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(3, 8):  # gather while 2 is in flight
                nursery.start_soon(submit, n)
            await trio.testing.wait_all_tasks_blocked()
            rec.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert [len(c) for c in rec.calls] == [1, 1, 3, 2]  # at most max_batch per call
    assert sorted(n for c in rec.calls[2:] for n in c) == [3, 4, 5, 6, 7]
    assert got == {n: n * 10 for n in range(2, 8)}


async def test_a_failed_call_is_every_item_s_error_and_the_batcher_goes_on() -> None:
    rec = Recorder()
    batcher = Batcher(rec.send, max_batch=10)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            rec.fail = ValueError("refused")
            with pytest.raises(ValueError, match="refused"):
                await batcher.submit(1)
            rec.fail = None
            assert await batcher.submit(2) == 20
            nursery.cancel_scope.cancel()


async def test_a_cancelled_caller_withdraws_its_item_and_stopping_releases_the_rest() -> None:
    rec = Recorder()
    batcher = Batcher(rec.send, max_batch=10)
    with pytest.raises(BatcherClosed):
        await batcher.submit(0)  # not running yet: the caller sends it another way
    outcomes: list[str] = []

    async def submit(n: int) -> None:
        try:
            await batcher.submit(n)
        except BatcherClosed:
            outcomes.append(f"closed {n}")

    with trio.fail_after(5):
        async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            rec.gate = trio.Event()
            outer.start_soon(submit, 1)  # in flight when the batcher stops
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(submit, 2)  # queued when the batcher stops
            with trio.move_on_after(0.01):
                await batcher.submit(3)  # withdrawn by its own cancellation
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert rec.calls == [[1]]
    assert sorted(outcomes) == ["closed 1", "closed 2"]
    with pytest.raises(BatcherClosed):
        await batcher.submit(4)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(Recorder().send, max_batch=0)
