"""The worker's cache of open replays: a run's next workflow task goes on from its last one.

A workflow task used to replay the run's whole history from the first event. The worker now
keeps each run's `Replayer` after its task (its workflow suspended where it waits), and the
run's next task hands it only the events that came since. A replay is taken out of the cache
while it is in use, so two tasks of one run never share one; the cache holds at most
``capacity`` runs, closing the least recently used. Replays may run in threads, hence the lock.
This module does no I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from everruns.domain.replay import Replayer

__all__ = ["ReplayCache"]


class ReplayCache:
    """Open replays by run id.

    Args:
        capacity: the most runs kept (at least 0; 0 keeps none).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be at least 0, got {capacity}")
        self._capacity = capacity
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[Callable[..., Any], Replayer]] = OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        return len(self._open)

    def take(self, run_id: str, fn: Callable[..., Any]) -> Replayer | None:
        """The run's replay, removed from the cache (None if none is kept, or it runs another
        workflow function than ``fn``: the worker's code was replaced)."""
        kept = self.take_current(run_id, lambda _workflow_type: fn)
        return None if kept is None else kept[1]

    def take_current(
        self, run_id: str, current: Callable[[str], Callable[..., Any] | None]
    ) -> tuple[Callable[..., Any], Replayer] | None:
        """The run's replay and the workflow function it runs, removed from the cache, if that
        is still the function ``current`` gives for the run's workflow type (None: none is
        kept, or it was closed because the worker's code was replaced)."""
        with self._lock:
            kept = self._open.pop(run_id, None)
        if kept is None:
            return None
        fn, replayer = kept
        try:
            still = current(replayer.info.workflow_type) is fn
        except BaseException:
            replayer.close()
            raise
        if not still:
            replayer.close()
            return None
        return kept

    def drop(self, run_id: str) -> None:
        """Close the run's replay, if one is kept."""
        with self._lock:
            kept = self._open.pop(run_id, None)
        if kept is not None:
            kept[1].close()

    def keep(self, run_id: str, fn: Callable[..., Any], replayer: Replayer) -> None:
        """Keep the run's replay for its next task (closing whatever it replaces, and the least
        recently used one beyond capacity)."""
        dropped = []
        with self._lock:
            old = self._open.pop(run_id, None)
            if old is not None:
                dropped.append(old[1])
            if self._capacity and not self._closed:
                self._open[run_id] = (fn, replayer)
            else:
                dropped.append(replayer)
            while len(self._open) > self._capacity:
                dropped.append(self._open.popitem(last=False)[1][1])
        for stale in dropped:
            stale.close()

    def close(self) -> None:
        """Close every kept replay, and those given to `keep` from now on (the worker is
        stopping)."""
        with self._lock:
            self._closed = True
            kept = list(self._open.values())
            self._open.clear()
        for _, replayer in kept:
            replayer.close()
