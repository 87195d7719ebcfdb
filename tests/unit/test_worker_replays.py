"""The worker's cache of open replays: taken out while in use, kept per run, least recently
used closed beyond capacity, and nothing left open when it closes."""

from __future__ import annotations

from typing import Any, cast

import pytest

from everruns.domain.context import WorkflowInfo
from everruns.domain.replay import Replayer
from everruns.worker.replays import ReplayCache


class Fake:
    """Stands for a Replayer: the cache only ever closes what it holds."""

    def __init__(self, name: str, workflow_type: str = "wf") -> None:
        self.name = name
        self.closed = 0
        self.info = WorkflowInfo(workflow_id=name, run_id=name, workflow_type=workflow_type)

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


def test_take_current_asks_for_the_function_of_the_replays_workflow_type() -> None:
    """What a worker does when it does not know the workflow type of a run (an activity's):
    the replay is handed out with its function while that type still names the function."""
    cache = ReplayCache(10)
    a, b, c = Fake("a", "typed"), Fake("b", "typed"), Fake("c", "typed")
    registered = {"typed": wf}
    asked: list[str] = []

    def current(workflow_type: str) -> Any:
        asked.append(workflow_type)
        return registered.get(workflow_type)

    keep(cache, "r1", a)
    assert cache.take_current("unknown", current) is None and asked == []
    assert cast(Any, cache.take_current("r1", current)) == (wf, a)
    assert asked == ["typed"] and len(cache) == 0 and a.closed == 0
    # Code replaced (another function, or none any more): closed, not handed out.
    keep(cache, "r1", b)
    registered["typed"] = other
    assert cache.take_current("r1", current) is None and b.closed == 1
    keep(cache, "r1", c)
    registered.clear()
    assert cache.take_current("r1", current) is None and c.closed == 1

    def broken(workflow_type: str) -> Any:
        raise RuntimeError("registry broke")

    d = Fake("d", "typed")
    keep(cache, "r1", d)
    with pytest.raises(RuntimeError):
        cache.take_current("r1", broken)
    assert d.closed == 1 and len(cache) == 0


def test_capacity_zero_keeps_nothing_and_a_negative_one_is_refused() -> None:
    cache = ReplayCache(0)
    a = Fake("a")
    keep(cache, "r1", a)
    assert a.closed == 1 and len(cache) == 0
    with pytest.raises(ValueError, match="at least 0"):
        ReplayCache(-1)
