"""Claims that start together go to the database together.

A NOTIFY that announces ten new tasks wakes ten waiting long-polls at once, and each used to
run its own claim statement: ten statements, ten round trips through the pool, one after
another on the control plane's thread. `ClaimGroups` lets the first of them (the leader)
yield once, so that the others woken in the same moment join it, and then claims for all of
them in one statement: each member names its worker and how many slots it fills, and the
statement gives the n-th task it claims to the n-th slot.

A member cannot be cancelled once it has joined, and the leader's claim cannot be cancelled
either: the statement claims for everyone in the group, so abandoning it would leave tasks
claimed for a worker that never hears of them. Both waits are bounded by ``limit_s``; a claim
that takes longer fails for the whole group, as a statement of its own would have.

This module knows nothing of SQL; the caller's ``claim`` does the claiming.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

import trio

from everruns.errors import DatabaseUnavailable

__all__ = ["CLAIM_LIMIT_SECONDS", "ClaimGroups", "claim_overran"]

CLAIM_LIMIT_SECONDS = 10.0
"""The longest a claim, shielded once it has begun, may take."""


def claim_overran(limit_s: float) -> DatabaseUnavailable:
    """The error of a claim that took longer than ``limit_s`` and was cut off."""
    return DatabaseUnavailable(f"a claim took longer than {limit_s:g} s; nothing was handed out")


Key = TypeVar("Key", bound=Hashable)
Claimed = TypeVar("Claimed")
Extra = TypeVar("Extra")

Claim = Callable[[Key, list[str]], Awaitable[tuple[Sequence[Claimed], bool, Extra]]]


class _Member(Generic[Claimed]):
    __slots__ = ("claimed", "limit", "worker_id")

    def __init__(self, worker_id: str, limit: int) -> None:
        self.worker_id = worker_id
        self.limit = limit
        self.claimed: Sequence[Claimed] = ()


class _Group(Generic[Claimed, Extra]):
    __slots__ = ("done", "error", "extra", "members", "more")

    def __init__(self) -> None:
        self.members: list[_Member[Claimed]] = []
        self.done = trio.Event()
        self.more = False
        self.extra: Extra | None = None
        self.error: Exception | None = None


class ClaimGroups(Generic[Key, Claimed, Extra]):
    """Combines claims of the same key that start in the same moment into one.

    Args:
        claim: claims for ``slots`` (a worker id per slot) of ``key``; returns the claimed
            items in slot order (fewer when fewer were claimable), whether claimable items were
            left behind, and one extra value shared by the group (the histories read).
        limit_s: the longest a claim may take once the group is formed.
    """

    def __init__(
        self, claim: Claim[Key, Claimed, Extra], *, limit_s: float = CLAIM_LIMIT_SECONDS
    ) -> None:
        self._claim = claim
        self._limit_s = limit_s
        self._forming: dict[Key, _Group[Claimed, Extra]] = {}

    async def claim(
        self, key: Key, worker_id: str, limit: int
    ) -> tuple[Sequence[Claimed], bool, Extra | None]:
        """Claim up to ``limit`` items of ``key`` for ``worker_id``, with whoever else claims
        the same key in this moment.

        Returns:
            What was claimed for this caller, whether claimable items were left behind, and the
            group's extra value (None if the claim found nothing to claim for anyone).

        Raises:
            Exception: whatever the group's claim raised (every member gets it);
                DatabaseUnavailable if it took longer than ``limit_s``.
        """
        # A caller cancelled already must not join: once in, it is shielded until the claim
        # is done, and would be handed tasks it can no longer deliver.
        await trio.lowlevel.checkpoint_if_cancelled()
        member: _Member[Claimed] = _Member(worker_id, limit)
        group = self._forming.get(key)
        if group is not None:
            group.members.append(member)
            with trio.CancelScope(shield=True):  # the leader claims for us: wait for it
                await group.done.wait()
        else:
            group = _Group()
            group.members.append(member)
            self._forming[key] = group
            try:
                # One scheduling round for the claimers woken with this one to join.
                await trio.lowlevel.cancel_shielded_checkpoint()
            finally:
                del self._forming[key]
            await self._claim_for(key, group)
        if group.error is not None:
            if member is group.members[0]:
                raise group.error
            raise copy.copy(group.error) from group.error  # a traceback of its own
        return member.claimed, group.more, group.extra

    async def _claim_for(self, key: Key, group: _Group[Claimed, Extra]) -> None:
        slots = [m.worker_id for m in group.members for _ in range(m.limit)]
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._limit_s
                claimed, group.more, group.extra = await self._claim(key, slots)
                start = 0
                for m in group.members:
                    m.claimed = claimed[start : start + m.limit]
                    start += m.limit
            if scope.cancelled_caught:
                group.error = claim_overran(self._limit_s)
        except Exception as exc:
            group.error = exc
        finally:
            group.done.set()
