"""Claim wake-ups: one new task wakes one waiting claimer of its key, not all of them, and a
wake-up that a claimer cannot use is passed on, never lost."""

from __future__ import annotations

import trio
import trio.testing

from everruns.server.notifier import Notifier


async def test_a_notification_wakes_only_the_longest_waiting_claimer_of_its_key() -> None:
    notifier = Notifier()
    woken: list[int] = []

    async def claimer(n: int, keys: list[str]) -> None:
        with notifier.claim_interest(keys) as interest:
            await interest.event.wait()
            woken.append(n)
            interest.claimed = True

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(claimer, n, ["activity:a"])
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(claimer, 99, ["activity:b"])
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

    async def claims() -> None:
        with notifier.claim_interest(["workflow:w"]) as interest:
            await interest.event.wait()
            woken.append("second")
            interest.claimed = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leaves_without_claiming)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(claims)
        await trio.testing.wait_all_tasks_blocked()
        notifier.poke_key("workflow:w")
    assert woken == ["first", "second"]
    assert notifier._claimers == {}
