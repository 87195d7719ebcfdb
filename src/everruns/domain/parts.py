"""How a large batch is cut into parts that run side by side (pure core, no I/O).

A batch of starts is written by one statement per part, each in its own transaction, so that
PostgreSQL spreads the work over its cores. Requests for the same workflow id must stay in one
part: two statements inserting the same id at once would wait on each other's unique-index
entry (and could deadlock), and the one that waited would not see the other's run.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["split_keeping_keys"]


def split_keeping_keys(keys: Sequence[str], size: int) -> list[list[int]]:
    """Cut the positions of ``keys`` into ``ceil(len(keys) / size)`` parts at most, keeping
    every position of one non-empty key in the same part (an empty key is nobody's: each
    such position goes wherever there is room). Parts are filled least-loaded first in order
    of first appearance, so with distinct keys no part holds more than ``size``; a key
    repeated ``k`` times can push its part to ``size + k - 1``. Each part lists its positions
    in ascending order; no part is empty.

    Raises:
        ValueError: ``size`` is below 1.
    """
    if size < 1:
        raise ValueError(f"part size must be at least 1, got {size}")
    if len(keys) <= size:
        return [list(range(len(keys)))] if keys else []
    groups: list[list[int]] = []
    by_key: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        group = by_key.get(key) if key else None
        if group is None:
            group = []
            groups.append(group)
            if key:
                by_key[key] = group
        group.append(position)
    count = -(-len(keys) // size)
    parts: list[list[int]] = [[] for _ in range(count)]
    loads = [(0, n) for n in range(count)]  # (positions held, part): a heap, least first
    for group in groups:
        load, n = heapq.heappop(loads)
        parts[n].extend(group)
        heapq.heappush(loads, (load + len(group), n))
    return [sorted(part) for part in parts if part]
