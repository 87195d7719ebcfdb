"""The worker's cache of open replays: taken out while in use, kept per run, least recently
used closed beyond capacity, and nothing left open when it closes."""

from __future__ import annotations

from typing import Any, cast

import pytest

from everruns.domain.replay import Replayer
from everruns.worker.replays import ReplayCache


class Fake:
    """Stands for a Replayer: the cache only ever closes what it holds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def wf(ctx: Any, input: Any) -> Any:
    return None


def other(ctx: Any, input: Any) -> Any:
    return None


def keep(cache: ReplayCache, run: str, replay: Fake, fn: Any = wf) -> None:
    cache.keep(run, fn, cast(Replayer, replay))


def test_a_replay_is_taken_out_while_in_use() -> None:
    cache = ReplayCache(10)
    a = Fake("a")
    keep(cache, "r1", a)
    assert cast(Any, cache.take("r1", wf)) is a
    assert cache.take("r1", wf) is None  # a second task of the run gets none
    assert len(cache) == 0 and a.closed == 0


def test_a_replay_of_another_workflow_function_is_closed_not_reused() -> None:
    cache = ReplayCache(10)
    a = Fake("a")
    keep(cache, "r1", a)
    assert cache.take("r1", other) is None
    assert a.closed == 1 and len(cache) == 0


def test_the_least_recently_used_is_closed_beyond_capacity() -> None:
    cache = ReplayCache(2)
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    keep(cache, "r1", a)
    keep(cache, "r2", b)
    assert cast(Any, cache.take("r1", wf)) is a
    keep(cache, "r1", a)  # r1 is now the most recently used
    keep(cache, "r3", c)
    assert (a.closed, b.closed, c.closed) == (0, 1, 0)
    assert cache.take("r2", wf) is None and len(cache) == 2


def test_keeping_replaces_drop_and_close_close() -> None:
    cache = ReplayCache(10)
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    keep(cache, "r1", a)
    keep(cache, "r1", b)  # two tasks of one run answered: the later replay wins
    assert a.closed == 1 and cast(Any, cache.take("r1", wf)) is b
    keep(cache, "r1", b)
    cache.drop("r1")
    cache.drop("unknown")
    assert b.closed == 1 and len(cache) == 0
    keep(cache, "r2", c)
    cache.close()
    assert c.closed == 1 and len(cache) == 0
    # A replay handed back after the worker closed its cache (a decision made ahead that
    # was answered during shutdown) is closed, not kept.
    d = Fake("d")
    keep(cache, "r3", d)
    assert d.closed == 1 and len(cache) == 0


def test_take_any_returns_the_function_with_the_replay() -> None:
    cache = ReplayCache(10)
    a = Fake("a")
    keep(cache, "r1", a)
    assert cache.take_any("unknown") is None
    assert cast(Any, cache.take_any("r1")) == (wf, a)
    assert len(cache) == 0 and a.closed == 0


def test_capacity_zero_keeps_nothing_and_a_negative_one_is_refused() -> None:
    cache = ReplayCache(0)
    a = Fake("a")
    keep(cache, "r1", a)
    assert a.closed == 1 and len(cache) == 0
    with pytest.raises(ValueError, match="at least 0"):
        ReplayCache(-1)
