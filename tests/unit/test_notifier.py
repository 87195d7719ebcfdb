"""Claim wake-ups: one new task wakes one waiting claimer of its key, not all of them, and a
wake-up that a claimer cannot use is passed on, never lost."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns.server.notifier import QUIET_FOR, Notifier


async def claim_once(notifier: Notifier, keys: list[str], woken: list[Any], name: Any) -> None:
    """A claimer that waits for one wake-up, records ``name`` and acts on it."""
    with notifier.claim_interest(keys) as interest:
        await interest.event.wait()
        woken.append(name)
        interest.rearm()  # it acts on the wake-up


async def test_a_notification_wakes_only_the_longest_waiting_claimer_of_its_key() -> None:
    notifier = Notifier()
    woken: list[int] = []

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(claim_once, notifier, ["activity:a"], woken, n)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(claim_once, notifier, ["activity:b"], woken, 99)
        await trio.testing.wait_all_tasks_blocked()
        notifier.poke_key("activity:a")
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [0]
        notifier.poke_key("activity:a")
        notifier.poke_key("activity:b")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(woken) == [0, 1, 99]
        notifier.poke_tasks()  # e.g. after a reconnect: everyone looks again
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(woken) == [0, 1, 2, 3, 4, 99]


async def test_a_wake_up_the_claimer_could_not_use_is_passed_on() -> None:
    notifier = Notifier()
    woken: list[str] = []

    async def leaves_without_claiming() -> None:
        with notifier.claim_interest(["workflow:w"]) as interest:
            await interest.event.wait()
            woken.append("first")  # e.g. its client went away: it claims nothing

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leaves_without_claiming)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(claim_once, notifier, ["workflow:w"], woken, "second")
        await trio.testing.wait_all_tasks_blocked()
        notifier.poke_key("workflow:w")
    assert woken == ["first", "second"]
    assert notifier._claimers == {}


# ------------------------------------------------------------------------------ claim hints


async def test_claimers_of_a_quiet_key_wait_instead_of_querying() -> None:
    notifier = Notifier()
    keys = ["activity:a", "workflow:w"]
    assert notifier.claim_needed(keys)
    stamps = notifier.claim_started(keys)
    # While that claim runs, another claimer of the same keys (or fewer) needs no query...
    assert not notifier.claim_needed(keys)
    assert not notifier.claim_needed(["activity:a"])
    # ...but one that also claims another key does.
    assert notifier.claim_needed(["activity:a", "activity:b"])
    notifier.claim_ended(stamps, drained=True)
    assert not notifier.claim_needed(keys)
    notifier.poke_key("workflow:w")  # a new task of one key: claimers of it query again
    assert notifier.claim_needed(keys)
    assert not notifier.claim_needed(["activity:a"])
    notifier.poke_tasks()  # everything may have changed
    assert notifier.claim_needed(["activity:a"])


async def test_a_poke_during_a_claim_is_not_hidden_by_its_empty_result() -> None:
    notifier = Notifier()
    stamps = notifier.claim_started(["activity:a"])
    notifier.poke_key("activity:a")  # committed after the claim's snapshot
    notifier.claim_ended(stamps, drained=True)
    assert notifier.claim_needed(["activity:a"])


async def test_the_quiet_hint_lapses() -> None:
    clock = trio.testing.MockClock()
    notifier = Notifier()

    async def main() -> None:
        notifier.claim_ended(notifier.claim_started(["activity:a"]), drained=True)
        assert not notifier.claim_needed(["activity:a"])
        clock.jump(QUIET_FOR + 0.01)
        assert notifier.claim_needed(["activity:a"])

    await trio.to_thread.run_sync(lambda: trio.run(main, clock=clock))


async def test_a_claim_that_filled_its_slots_or_failed_wakes_a_skipped_claimer() -> None:
    notifier = Notifier()
    woken: list[str] = []

    async def skipped() -> None:
        with notifier.claim_interest(["activity:a"]) as interest:
            assert not notifier.claim_needed(["activity:a"])  # it waits for a wake-up
            await interest.event.wait()
            woken.append("skipped")
            interest.rearm()  # it acts on the wake-up

    for round_ in range(2):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                stamps = notifier.claim_started(["activity:a"])
                nursery.start_soon(skipped)
                await trio.testing.wait_all_tasks_blocked()
                notifier.claim_ended(stamps, drained=False)
        assert woken == ["skipped"] * (round_ + 1)
        assert notifier.claim_needed(["activity:a"])


_KEYS = ["activity:a", "activity:b", "workflow:w"]
_key_sets = st.lists(st.sampled_from(_KEYS), min_size=1, max_size=3, unique=True)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("start"), _key_sets),
        st.tuples(st.just("end"), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("poke"), st.sampled_from(_KEYS)),
        st.tuples(st.just("poke_all")),
        st.tuples(st.just("check"), _key_sets),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations=_operations)
def test_a_key_is_quiet_only_if_a_claim_of_it_began_after_its_last_wake_up(
    operations: list[tuple[Any, ...]],
) -> None:
    """The safety property of the hints, against a model (time stands still here): a claimer
    skips its query only if, for every key it claims, a claim of that key began after the
    key's last wake-up and has not handed its keys back (filled its slots, failed)."""

    async def main() -> None:
        notifier = Notifier()
        last_poke = dict.fromkeys(_KEYS, -1)
        running: list[tuple[list[tuple[str, tuple[int, int]]], list[str], int]] = []
        covering: dict[str, set[int]] = {k: set() for k in _KEYS}  # claim start times
        for clock, op in enumerate(operations, start=1):
            if op[0] == "start":
                running.append((notifier.claim_started(op[1]), op[1], clock))
                for key in op[1]:
                    covering[key].add(clock)
            elif op[0] == "end" and running:
                stamps, keys, began = running.pop(op[1] % len(running))
                notifier.claim_ended(stamps, drained=op[2])
                if not op[2]:
                    for key in keys:
                        covering[key].discard(began)
                        if began > last_poke[key]:
                            last_poke[key] = clock  # it passes the wake-up on
            elif op[0] == "poke":
                notifier.poke_key(op[1])
                last_poke[op[1]] = clock
            elif op[0] == "poke_all":
                notifier.poke_tasks()
                last_poke = dict.fromkeys(_KEYS, clock)
            elif op[0] == "check" and not notifier.claim_needed(op[1]):
                for key in op[1]:
                    assert any(began > last_poke[key] for began in covering[key]), (key, op)

    trio.run(main)


async def test_a_full_claim_passes_the_wake_up_to_another_claimer_not_itself() -> None:
    notifier = Notifier()
    woken: list[str] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            with notifier.claim_interest(["activity:a"]) as mine:  # waiting longest
                nursery.start_soon(claim_once, notifier, ["activity:a"], woken, "other")
                await trio.testing.wait_all_tasks_blocked()
                stamps = notifier.claim_started(mine.keys)
                notifier.claim_ended(stamps, drained=False, claimer=mine)
                assert not mine.event.is_set()
    assert woken == ["other"]


async def test_n_new_tasks_wake_n_claimers_to_claim_side_by_side() -> None:
    notifier = Notifier()
    woken: list[int] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(claim_once, notifier, ["activity:a"], woken, n)
                await trio.testing.wait_all_tasks_blocked()
            notifier._dispatch("everruns_tasks", "activity:a\t3")  # as apply_workflow_task says
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(woken) == [0, 1, 2]
            notifier._dispatch("everruns_tasks", "activity:a")  # one task: one claimer
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(woken) == [0, 1, 2, 3]
            notifier._dispatch("everruns_tasks", "activity:a\t9")  # more tasks than claimers
    assert sorted(woken) == [0, 1, 2, 3, 4]


async def test_a_wake_up_that_came_during_a_successful_claim_is_passed_on() -> None:
    """A claimer whose claim (begun before a new task) finds an older task leaves with it; the
    wake-up for the new task that reached it meanwhile goes to the next claimer."""
    notifier = Notifier()
    woken: list[str] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            with notifier.claim_interest(["activity:a"]):  # claiming (its first claim)
                nursery.start_soon(claim_once, notifier, ["activity:a"], woken, "next")
                await trio.testing.wait_all_tasks_blocked()
                notifier.poke_key("activity:a")  # the new task: the longest waiter is this one
                await trio.testing.wait_all_tasks_blocked()
                assert woken == []
            # it leaves with the older task it found
    assert woken == ["next"]


async def test_a_deadline_made_during_a_scan_shortens_the_next_sleep_without_a_rescan() -> None:
    notifier = Notifier()
    with trio.fail_after(5):
        # The due-scanner is scanning (it has not gone to sleep yet): a deadline minutes away
        # must not make it scan again at once, one sooner than its own next look must end
        # its next sleep by then.
        notifier.deadline_added(300.0)
        notifier.deadline_added(0.2)
        began = trio.current_time()
        await notifier.wait_due(10.0)
        assert 0.15 <= trio.current_time() - began < 1.0
        notifier.deadline_added(300.0)  # scanning again
        with trio.move_on_after(0.3) as idle:
            await notifier.wait_due(10.0)
        assert idle.cancelled_caught


async def test_a_deadline_sooner_than_the_sleeping_scanners_next_look_wakes_it() -> None:
    notifier = Notifier()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            woke = trio.Event()

            async def scanner() -> None:
                await notifier.wait_due(10.0)
                woke.set()

            nursery.start_soon(scanner)
            await trio.sleep(0.05)
            notifier.deadline_added(300.0)  # after its next look: it sleeps on
            await trio.sleep(0.05)
            assert not woke.is_set()
            notifier.deadline_added(1.0)  # before it: it looks now
            await woke.wait()


async def test_a_start_hands_its_task_to_the_longest_waiting_poll_of_a_worker() -> None:
    """Only a claimer that names its worker and is waiting (not claiming) can be reserved;
    once reserved it gets no wake-up, and settling with tasks wakes it with them."""
    notifier = Notifier()
    got: list[Any] = []

    async def poll(worker: str | None) -> None:
        with notifier.claim_interest(["workflow:w"], worker) as interest:
            await interest.wait()
            got.append((worker, interest.take()))

    assert notifier.reserve_claimer("workflow:w") is None  # nobody waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll, None)  # a claimer with no worker cannot be handed tasks
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(poll, "w1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(poll, "w2")
        await trio.testing.wait_all_tasks_blocked()
        taker = notifier.reserve_claimer("workflow:w")
        assert taker is not None and taker.worker == "w1" and taker.reserved
        assert notifier.reserve_claimer("workflow:other") is None
        notifier.poke_key("workflow:w", count=5)  # wakes the others, not the reserved one
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(got, key=str) == [("w2", []), (None, [])]
        assert notifier.settle(taker, ["task"]) is True
    assert got[-1] == ("w1", ["task"])
    assert not taker.reserved


async def test_a_reservation_settled_empty_lets_the_poll_claim_again() -> None:
    """A start that created nothing for the poll wakes it to claim again (a wake-up it missed
    while reserved), and it can be woken as usual afterwards."""
    notifier = Notifier()
    wakes: list[list[Any]] = []

    async def poll() -> None:
        with notifier.claim_interest(["workflow:w"], "w1") as interest:
            for _ in range(2):
                await interest.wait()
                wakes.append(interest.take())
                interest.rearm()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.testing.wait_all_tasks_blocked()
        taker = notifier.reserve_claimer("workflow:w")
        assert taker is not None
        assert notifier.settle(taker, []) is True
        await trio.testing.wait_all_tasks_blocked()
        assert wakes == [[]] and not taker.reserved
        notifier.poke_key("workflow:w")
    assert wakes == [[], []]


async def test_settling_for_a_poll_that_left_leaves_the_tasks_with_the_starter() -> None:
    notifier = Notifier()
    async with trio.open_nursery() as nursery:

        async def poll(task_status: trio.TaskStatus[None]) -> None:
            with notifier.claim_interest(["workflow:w"], "w1") as interest:
                task_status.started()
                await interest.wait()

        await nursery.start(poll)
        await trio.testing.wait_all_tasks_blocked()
        taker = notifier.reserve_claimer("workflow:w")
        assert taker is not None
        nursery.cancel_scope.cancel()
    assert taker.closed
    assert notifier.settle(taker, ["task"]) is False
    assert taker.handed == []
