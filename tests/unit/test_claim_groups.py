"""ClaimGroups: claims that start in the same moment share one claim, each getting its own
slots' items; a lone claim is a group of one; errors, time limits and cancellations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

from everruns.errors import DatabaseError, DatabaseUnavailable
from everruns.server.claims import ClaimGroups


class Queue:
    """A fake claim: hands out numbered items in order, records each call's slots."""

    def __init__(self, items: int, delay: float = 0.0) -> None:
        self.next = 0
        self.items = items
        self.delay = delay
        self.calls: list[tuple[str, list[str]]] = []
        self.fail: Exception | None = None

    async def claim(self, key: str, slots: list[str]) -> tuple[Sequence[str], bool, str]:
        self.calls.append((key, list(slots)))
        await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        got = []
        for worker in slots:
            if self.next >= self.items:
                break
            got.append(f"{worker}:item{self.next}")
            self.next += 1
        return got, self.next < self.items, f"extra-{len(self.calls)}"


def run(fn: Any) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_claims_that_start_together_share_one_claim() -> None:
    queue = Queue(items=5)
    results: dict[str, Any] = {}

    async def main() -> None:
        groups: ClaimGroups[str, str, str] = ClaimGroups(queue.claim)

        async def claimer(worker: str, limit: int) -> None:
            results[worker] = await groups.claim("activity:a", worker, limit)

        async with trio.open_nursery() as nursery:
            for worker, limit in (("w1", 1), ("w2", 2), ("w3", 1), ("w4", 3)):
                nursery.start_soon(claimer, worker, limit)

    run(main)
    assert len(queue.calls) == 1
    ((key, slots),) = queue.calls
    assert key == "activity:a" and sorted(slots) == ["w1", "w2", "w2", "w3", "w4", "w4", "w4"]
    claimed = {w: list(r[0]) for w, r in results.items()}
    # Five items for seven slots: each item goes to its slot's worker, none twice.
    assert sorted(i for items in claimed.values() for i in items) == sorted(
        f"{w}:item{n}" for n, w in enumerate(slots[:5])
    )
    assert all(item.startswith(f"{w}:") for w, items in claimed.items() for item in items)
    assert all(len(claimed[w]) <= limit for w, limit in (("w1", 1), ("w2", 2), ("w3", 1)))
    assert {r[1] for r in results.values()} == {False}  # nothing left behind
    assert {r[2] for r in results.values()} == {"extra-1"}


def test_different_keys_and_later_claims_are_separate() -> None:
    queue = Queue(items=10, delay=0.5)

    async def main() -> None:
        groups: ClaimGroups[str, str, str] = ClaimGroups(queue.claim)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(groups.claim, "a", "w1", 1)
            nursery.start_soon(groups.claim, "b", "w2", 1)
            await trio.sleep(0.1)  # the first two are claiming: a third starts a new group
            nursery.start_soon(groups.claim, "a", "w3", 1)
        got = await groups.claim("a", "w4", 2)  # a lone claim is a group of one
        assert list(got[0]) == ["w4:item3", "w4:item4"] and got[1] is True

    run(main)
    assert sorted(queue.calls) == [("a", ["w1"]), ("a", ["w3"]), ("a", ["w4", "w4"]), ("b", ["w2"])]


def test_an_error_reaches_every_member() -> None:
    queue = Queue(items=3)
    queue.fail = DatabaseError("the database went away")
    errors: list[BaseException] = []

    async def main() -> None:
        groups: ClaimGroups[str, str, str] = ClaimGroups(queue.claim)

        async def claimer(worker: str) -> None:
            try:
                await groups.claim("a", worker, 1)
            except DatabaseError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for worker in ("w1", "w2", "w3"):
                nursery.start_soon(claimer, worker)

    run(main)
    assert len(queue.calls) == 1 and len(errors) == 3
    assert all(isinstance(e, DatabaseError) and "went away" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 3  # each its own exception object


def test_a_claim_that_takes_too_long_fails_the_group() -> None:
    queue = Queue(items=3, delay=60)

    async def main() -> None:
        groups: ClaimGroups[str, str, str] = ClaimGroups(queue.claim, limit_s=5)
        t0 = trio.current_time()
        with pytest.raises(DatabaseUnavailable, match="longer than 5 s"):
            await groups.claim("a", "w1", 1)
        assert trio.current_time() - t0 == pytest.approx(5)

    run(main)


def test_members_are_not_cancelled_out_of_a_claim_made_for_them() -> None:
    """A claimer whose own wait ends (its long poll timed out) while the group's claim runs
    still gets what was claimed for it: abandoning it would strand claimed tasks."""
    queue = Queue(items=3, delay=1.0)
    results: dict[str, Any] = {}

    async def main() -> None:
        groups: ClaimGroups[str, str, str] = ClaimGroups(queue.claim)

        async def claimer(worker: str, give_up_after: float) -> None:
            with trio.move_on_after(give_up_after):
                results[worker] = await groups.claim("a", worker, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claimer, "leader", 0.5)
            nursery.start_soon(claimer, "member", 0.5)

    run(main)
    claimed = {w: list(r[0]) for w, r in results.items()}
    assert sorted(claimed) == ["leader", "member"]
    assert sorted(i.split(":")[1] for items in claimed.values() for i in items) == [
        "item0",
        "item1",
    ]
    assert all(items[0].startswith(f"{w}:") for w, items in claimed.items())


def test_a_caller_cancelled_already_claims_nothing() -> None:
    """Joining shields a claimer until the claim is done, so one whose wait is over already
    must not join (or lead) at all: it would be handed tasks it can no longer deliver."""
    queue = Queue(items=3)

    async def main() -> None:
        groups: ClaimGroups[str, str, str] = ClaimGroups(queue.claim)
        with trio.CancelScope() as scope:
            scope.cancel()
            await groups.claim("a", "w1", 3)
        assert scope.cancelled_caught

    run(main)
    assert queue.calls == []
