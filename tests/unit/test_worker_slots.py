"""Task slots: never more than capacity, stop above 90 %, resume below 70 %, no polling."""

from __future__ import annotations

import threading

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


async def test_a_thread_is_held_until_an_abandoned_thread_really_ends() -> None:
    """A sync activity's thread (`Thread`, passed to Trio as its limiter) stays taken while a
    thread abandoned on cancellation runs on, and only its end gives it back."""
    slots = TaskSlots(2, threads=1)
    (slot,) = slots.reserve(1)
    assert slots.add_threads([slot]) == 1 and slots.free_threads == 0
    thread = slots.start(slot, needs_thread=True)
    assert thread is not None and slot.thread is None
    gate = threading.Event()
    with trio.move_on_after(0.05):
        await trio.to_thread.run_sync(gate.wait, limiter=thread, abandon_on_cancel=True)  # type: ignore[arg-type]
    thread.give_back()  # a thread was started with it: its end gives it back, not this
    slots.release(slot)
    assert slots.free_threads == 0 and slots.new_thread() is None
    gate.set()
    with trio.fail_after(5):
        await slots.wait_thread()
    assert slots.free_threads == 1


async def test_a_thread_never_started_goes_back_with_its_slot_or_its_task() -> None:
    slots = TaskSlots(3, threads=2)
    reserved = slots.reserve(3)
    assert slots.add_threads(reserved) == 2
    assert [s.thread is not None for s in reserved] == [True, True, False]
    assert slots.start(reserved[0]) is None  # not a sync activity: its thread goes back
    assert slots.free_threads == 1
    slots.release(reserved[1])
    assert slots.free_threads == 2
    (again,) = slots.reserve(1)
    slots.add_threads([again])
    thread = slots.start(again, needs_thread=True)
    assert thread is not None and slots.free_threads == 1
    thread.give_back()
    thread.give_back()  # once only
    assert slots.free_threads == 2
