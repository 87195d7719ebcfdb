"""Task slots: never more than capacity, stop above 90 %, resume below 70 %, no polling."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from everruns.worker.slots import TaskSlots


async def test_reserve_never_exceeds_capacity() -> None:
    slots = TaskSlots(3)
    first = slots.reserve(2)
    second = slots.reserve(5)
    assert (len(first), len(second), slots.free) == (2, 1, 0)
    assert slots.reserve(1) == []
    for slot in first:
        slots.start(slot)
    assert slots.load == 2
    slots.release(second[0])
    assert (slots.free, slots.load) == (1, 2)


async def test_hysteresis_pauses_at_high_and_resumes_below_low() -> None:
    slots = TaskSlots(10)
    running = slots.reserve(10)
    for slot in running:
        slots.start(slot)
    claimed: list[int] = []

    async def claimer() -> None:
        claimed.append(await slots.wait_claimable())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claimer)
        await trio.testing.wait_all_tasks_blocked()
        assert claimed == [] and slots.paused
        # 9 and 8 and 7 running (70 %, 80 %, 90 %): still paused, not below 70 %.
        for _ in range(3):
            slots.release(running.pop())
            await trio.testing.wait_all_tasks_blocked()
            assert claimed == []
        slots.release(running.pop())  # 6 running: 60 % < 70 %
    assert claimed == [4]
    assert not slots.paused


async def test_claiming_worker_stops_only_above_high() -> None:
    slots = TaskSlots(10)
    for slot in slots.reserve(9):
        slots.start(slot)
    with trio.fail_after(1):
        assert await slots.wait_claimable() == 1  # 90 % is not above 90 %


async def test_eager_offer_respects_pause_without_changing_it() -> None:
    slots = TaskSlots(4)
    held = slots.reserve(4)
    for slot in held:
        slots.start(slot)
    with trio.move_on_after(0.01):
        await slots.wait_claimable()
    assert slots.paused
    slots.release(held.pop())  # 3 of 4 running: 75 %, not below 70 %
    assert slots.reserve_eager(5) == []
    assert slots.paused
    slots.release(held.pop())  # 50 %
    assert len(slots.reserve_eager(5)) == 2
    assert slots.paused  # only the poll loop's decision changes it


@pytest.mark.parametrize("capacity", [1, 2, 3, 7])
async def test_small_capacities_still_claim_when_idle(capacity: int) -> None:
    slots = TaskSlots(capacity)
    with trio.fail_after(1):
        assert await slots.wait_claimable() == capacity
