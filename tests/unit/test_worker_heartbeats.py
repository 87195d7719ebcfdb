"""The worker's heartbeat scheduler: one task beats for every running activity.

Run on Trio's mock clock (autojump), so timings are exact and nothing sleeps for real.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns.worker.heartbeats import Beat, Heartbeats, beat_gap


def run_mock(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


@asynccontextmanager
async def scheduling(
    send: Callable[[Beat[str]], Awaitable[float | None]],
) -> AsyncIterator[Heartbeats[str]]:
    """A running scheduler, stopped on the way out."""
    beats: Heartbeats[str] = Heartbeats(send)
    async with trio.open_nursery() as nursery:
        await nursery.start(beats.run)
        yield beats
        nursery.cancel_scope.cancel()


class Recorder:
    """A ``send`` that records each call's start and end (the time it was cancelled, for a
    call cut short); regular beats by default."""

    def __init__(self, duration: float = 0.0) -> None:
        self.calls: list[list[Any]] = []  # [subject, start, end, completed]
        self.duration = duration
        self.answer: Callable[[Beat[str]], float | None] = lambda b: b.last_sent + b.interval
        self.in_flight: set[str] = set()

    async def send(self, beat: Beat[str]) -> float | None:
        assert beat.subject not in self.in_flight, "two calls of one beat in flight"
        self.in_flight.add(beat.subject)
        call = [beat.subject, trio.current_time(), None, False]
        self.calls.append(call)
        try:
            await trio.sleep(self.duration)
            call[3] = True
        finally:
            call[2] = trio.current_time()
            self.in_flight.discard(beat.subject)
        return self.answer(beat)

    def starts(self, subject: str = "a") -> list[float]:
        return [round(c[1], 6) for c in self.calls if c[0] == subject]


def test_regular_beats_come_one_interval_apart() -> None:
    rec = Recorder()

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            beats.add("a", 10.0)
            await trio.sleep(35)

    run_mock(main)
    assert rec.starts() == [10.0, 20.0, 30.0]


def test_a_poke_beats_at_once_but_never_sooner_than_the_gap() -> None:
    rec = Recorder()

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            beat = beats.add("a", 10.0)
            await trio.sleep(2)
            beats.poke(beat)  # at 2: nothing sent yet, so at once
            await trio.sleep(0.1)
            beats.poke(beat)  # at 2.1: the gap is 1 s, so at 3
            beats.poke(beat)  # the same beat, not another
            await trio.sleep(5)

    run_mock(main)
    assert rec.starts() == [2.0, 3.0]


def test_a_poke_during_a_call_sends_once_more_after_it() -> None:
    rec = Recorder(duration=3.0)

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            beat = beats.add("a", 10.0)
            beats.poke(beat)  # call from 0 to 3
            await trio.sleep(1)
            beats.poke(beat)  # during the call: the next starts when it ends
            await trio.sleep(8)

    run_mock(main)
    assert rec.starts() == [0.0, 3.0]


def test_remove_cancels_the_call_in_flight_and_stops_beating() -> None:
    rec = Recorder(duration=5.0)
    cancelled = []

    async def send(beat: Beat[str]) -> float | None:
        try:
            return await rec.send(beat)
        except trio.Cancelled:
            cancelled.append(trio.current_time())
            raise

    async def main() -> None:
        async with scheduling(send) as beats:
            beat = beats.add("a", 2.0)
            await trio.sleep(3)  # the first call started at 2
            beats.remove(beat)
            await trio.sleep(20)
            assert len(beats) == 0

    run_mock(main)
    assert cancelled == [3.0]
    assert [(c[1], c[3]) for c in rec.calls] == [(2.0, False)]


def test_none_from_send_stops_the_beat_and_a_retry_time_is_kept() -> None:
    rec = Recorder()
    answers = iter([None])

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            rec.answer = lambda b: (
                next(answers) if b.subject == "stop" else trio.current_time() + 0.5
            )
            beats.add("stop", 4.0)
            beats.add("a", 4.0)  # its send asks for a retry half a second later, every time
            await trio.sleep(6.2)

    run_mock(main)
    assert rec.starts("stop") == [4.0]
    # Retries are bounded below by the gap (min(1, 4 / 2) = 1 s), not by the asked 0.5 s.
    assert rec.starts("a") == [4.0, 5.0, 6.0]


def test_short_activities_cost_no_calls_and_leave_the_heap_empty() -> None:
    rec = Recorder()

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            for i in range(5_000):
                beat = beats.add(f"t{i}", 10.0)
                if i % 100 == 0:
                    await trio.sleep(0.01)
                beats.remove(beat)
            assert len(beats) == 0
            await trio.sleep(30)

    run_mock(main)
    assert rec.calls == []


def test_a_long_activity_among_short_ones_still_beats() -> None:
    rec = Recorder()

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            beats.add("a", 10.0)
            for i in range(1_050):
                beats.remove(beats.add(f"t{i}", 5.0))
                await trio.sleep(0.02)  # 21 s of short activities

    run_mock(main)
    assert rec.starts() == [10.0, 20.0]
    assert {c[0] for c in rec.calls} == {"a"}


def test_an_interval_must_be_positive() -> None:
    async def main() -> None:
        beats: Heartbeats[str] = Heartbeats(Recorder().send)
        with pytest.raises(ValueError, match="must be positive"):
            beats.add("a", 0.0)

    run_mock(main)


@settings(max_examples=300, deadline=None)
@given(
    interval=st.floats(min_value=0.2, max_value=20.0),
    duration=st.floats(min_value=0.0, max_value=3.0),
    pokes=st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=12),
    life=st.floats(min_value=0.0, max_value=40.0),
)
def test_schedule_properties(
    interval: float, duration: float, pokes: list[float], life: float
) -> None:
    """Whatever the pokes and call durations: calls never overlap, starts are at least the
    gap apart, every poke is answered by a call that starts soon after it, and a beat without
    pokes is never silent longer than its interval after the last call ended."""
    rec = Recorder(duration=duration)
    gap = beat_gap(interval)
    pokes = sorted(pokes)

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            beat = beats.add("a", interval)
            with trio.move_on_after(life):
                for at in pokes:
                    await trio.sleep_until(at)
                    beats.poke(beat)
                await trio.sleep_forever()
            beats.remove(beat)
            await trio.sleep(interval + duration + 1)

    run_mock(main)
    calls = [(c[1], c[2]) for c in rec.calls]
    eps = 1e-6
    for (s1, e1), (s2, _) in itertools.pairwise(calls):
        assert s2 >= e1 - eps, "calls overlapped"
        assert s2 >= s1 + gap - eps, "calls closer than the gap"
        assert s2 <= max(s1 + interval, e1) + eps, "silent longer than the interval"
    if calls:
        assert calls[0][0] <= interval + eps
    for p in pokes:
        if p >= life:
            break
        after = [s for s, _ in calls if s >= p - eps]
        before = [(s, e) for s, e in calls if s < p - eps]
        latest = max([p, *(max(s + gap, e) for s, e in before[-1:])])
        if latest < life - eps:
            assert after and after[0] <= latest + eps, f"poke at {p} not answered"
    assert all(s < life + eps for s, _ in calls), "a call after the beat was removed"


def test_ended_activities_behind_a_long_one_are_not_kept() -> None:
    """A long-running activity's beat heads the heap; the thousands of short ones that start
    and end behind it must not stay in it (with their tasks) until their own beat time."""
    rec = Recorder()

    async def main() -> None:
        async with scheduling(rec.send) as beats:
            beats.add("long", 10.0)
            for i in range(5_000):
                beats.remove(beats.add(f"t{i}", 10.0))
                assert len(beats) <= 2 * 1 + 64 + 1
            assert len(beats) <= 66

    run_mock(main)
    assert rec.calls == []
