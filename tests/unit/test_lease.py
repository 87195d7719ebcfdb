"""Staleness, server-enforced timeouts, their deadlines, and claim backpressure."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.lease import (
    DEFAULT_SCHEDULE_TO_START,
    DEFAULT_STALE_AFTER,
    DEFAULT_START_TO_CLOSE,
    free_slots,
    is_stale,
    next_deadline,
    should_claim,
    timeout_kind,
)
from everruns.errors import InvalidArgument

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
US = dt.timedelta(microseconds=1)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


limits = st.one_of(st.none(), st.floats(min_value=0.001, max_value=1e5))
offsets = st.floats(min_value=0.0, max_value=1e5)


# --- is_stale ----------------------------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    assert (DEFAULT_STALE_AFTER, DEFAULT_SCHEDULE_TO_START, DEFAULT_START_TO_CLOSE) == (30, 60, 300)


def test_staleness_boundary_uses_the_global_limit() -> None:
    assert not is_stale(T0, at(30))
    assert is_stale(T0, at(30) + US)
    assert not is_stale(T0, at(10), stale_after=10)
    assert is_stale(T0, at(10) + US, stale_after=10)


def test_own_heartbeat_timeout_replaces_the_global_limit() -> None:
    assert not is_stale(T0, at(120), heartbeat_timeout=120.0)
    assert is_stale(T0, at(120) + US, heartbeat_timeout=120.0)
    assert is_stale(T0, at(5) + US, heartbeat_timeout=5.0)
    assert not is_stale(T0, at(5), heartbeat_timeout=5.0)


def test_future_heartbeat_is_not_stale() -> None:
    assert not is_stale(at(100), T0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"stale_after": 0.0}, "stale_after"),
        ({"stale_after": -1.0}, "stale_after"),
        ({"stale_after": float("nan")}, "stale_after"),
        ({"heartbeat_timeout": 0.0}, "heartbeat_timeout"),
    ],
)
def test_is_stale_rejects_bad_limits(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        is_stale(T0, T0, **kwargs)


@given(offsets, st.floats(min_value=0.001, max_value=1e4), limits)
def test_stale_iff_elapsed_exceeds_limit(
    elapsed: float, stale_after: float, own: float | None
) -> None:
    now = at(elapsed)
    limit = own if own is not None else stale_after
    got = is_stale(T0, now, stale_after=stale_after, heartbeat_timeout=own)
    assert got is (now > T0 + dt.timedelta(seconds=limit))
    # Away from microsecond rounding, that is the plain arithmetic.
    gap = (now - T0).total_seconds() - limit
    if abs(gap) > 1e-5:
        assert got is (gap > 0)


# --- timeout_kind ------------------------------------------------------------------------------


def kind_at(
    now: float,
    *,
    claimed: float | None = None,
    beat: float | None = None,
    s2s: float | None = 60.0,
    s2c: float | None = 300.0,
    hb: float | None = None,
) -> str | None:
    return timeout_kind(
        T0,
        None if claimed is None else at(claimed),
        None if beat is None else at(beat),
        at(now),
        schedule_to_start=s2s,
        start_to_close=s2c,
        heartbeat_timeout=hb,
    )


def test_pending_hits_only_schedule_to_start() -> None:
    assert kind_at(60) is None
    assert kind_at(60.000001) == "schedule_to_start"
    # Long past every other limit: a pending task has not started, so nothing else applies.
    assert kind_at(10_000, hb=1.0) == "schedule_to_start"
    assert kind_at(10_000, s2s=None, hb=1.0) is None


def test_claimed_never_hits_schedule_to_start() -> None:
    assert kind_at(299, claimed=50) is None
    assert kind_at(350, claimed=50) is None
    assert kind_at(350.000001, claimed=50) == "start_to_close"


def test_heartbeat_counts_from_the_last_beat_or_the_claim() -> None:
    assert kind_at(80, claimed=50, hb=30.0) is None
    assert kind_at(80.000001, claimed=50, hb=30.0) == "heartbeat"
    assert kind_at(100, claimed=50, beat=70, hb=30.0) is None
    assert kind_at(100.000001, claimed=50, beat=70, hb=30.0) == "heartbeat"


def test_heartbeat_off_by_default() -> None:
    assert kind_at(340, claimed=50, beat=50) is None


def test_earliest_passed_deadline_wins_and_ties_go_to_start_to_close() -> None:
    # start_to_close fell at 60, heartbeat at 80: report start_to_close.
    assert kind_at(500, claimed=0, beat=50, s2c=60.0, hb=30.0) == "start_to_close"
    # heartbeat fell at 30, start_to_close at 60.
    assert kind_at(500, claimed=0, s2c=60.0, hb=30.0) == "heartbeat"
    # both fell at 60.
    assert kind_at(500, claimed=0, beat=30, s2c=60.0, hb=30.0) == "start_to_close"


@given(offsets, st.one_of(st.none(), offsets), offsets, limits, limits, limits)
def test_timeout_kind_is_consistent_with_deadlines(
    claimed_after: float,
    beat_after: float | None,
    now_after: float,
    s2s: float | None,
    s2c: float | None,
    hb: float | None,
) -> None:
    # Build a claimed task (claimed after visible, beat after claim) and a pending one.
    for claimed in (None, at(claimed_after)):
        beat = (
            None
            if claimed is None or beat_after is None
            else claimed + dt.timedelta(seconds=beat_after)
        )
        now = at(now_after) if claimed is None else claimed + dt.timedelta(seconds=now_after)
        kind = timeout_kind(
            T0, claimed, beat, now, schedule_to_start=s2s, start_to_close=s2c, heartbeat_timeout=hb
        )
        deadline = next_deadline(
            T0, claimed, beat, schedule_to_start=s2s, start_to_close=s2c, heartbeat_timeout=hb
        )
        if claimed is None:
            assert kind in (None, "schedule_to_start")
        else:
            assert kind in (None, "start_to_close", "heartbeat")
        if deadline is None:
            assert kind is None
        elif now <= deadline:
            # Nothing can have passed before the earliest deadline.
            assert kind is None
        else:
            assert kind is not None


def test_timeout_kind_rejects_bad_limits() -> None:
    with pytest.raises(InvalidArgument, match="start_to_close"):
        timeout_kind(T0, T0, T0, T0, schedule_to_start=None, start_to_close=0, heartbeat_timeout=1)


# --- next_deadline -----------------------------------------------------------------------------


def test_next_deadline_pending_and_claimed() -> None:
    kw = {"schedule_to_start": 60.0, "start_to_close": 300.0, "heartbeat_timeout": None}
    assert next_deadline(T0, None, None, **kw) == at(60)
    assert next_deadline(T0, at(10), at(10), **kw) == at(310)
    assert next_deadline(T0, at(10), at(200), **kw | {"heartbeat_timeout": 20.0}) == at(220)
    assert next_deadline(T0, at(10), None, **kw | {"heartbeat_timeout": 20.0}) == at(30)
    nothing = {"schedule_to_start": None, "start_to_close": None, "heartbeat_timeout": None}
    assert next_deadline(T0, None, None, **nothing) is None
    assert next_deadline(T0, at(1), at(1), **nothing) is None


def test_next_deadline_beyond_the_calendar_is_never() -> None:
    far = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)
    got = next_deadline(
        far, None, None, schedule_to_start=1e9, start_to_close=None, heartbeat_timeout=None
    )
    assert got is None
    got = next_deadline(
        T0, None, None, schedule_to_start=float("inf"), start_to_close=None, heartbeat_timeout=None
    )
    assert got is None


# --- backpressure ------------------------------------------------------------------------------


def test_free_slots() -> None:
    assert free_slots(0, 10) == 10
    assert free_slots(7, 10) == 3
    assert free_slots(10, 10) == 0
    assert free_slots(12, 10) == 0


@pytest.mark.parametrize(("load", "capacity"), [(-1, 10), (0, 0), (1, -5), (True, 10)])
def test_bad_load_or_capacity(load: int, capacity: int) -> None:
    with pytest.raises(InvalidArgument):
        free_slots(load, capacity)
    with pytest.raises(InvalidArgument):
        should_claim(load, capacity, False)


@pytest.mark.parametrize(("high", "low"), [(0.5, 0.7), (1.1, 0.7), (0.9, 0.0)])
def test_bad_thresholds(high: float, low: float) -> None:
    with pytest.raises(InvalidArgument, match="low <= high"):
        should_claim(1, 10, False, high=high, low=low)


def test_hysteresis_on_a_hundred_slots() -> None:
    # Rising: claims up to 90 %, stops above it.
    assert should_claim(90, 100, currently_paused=False)
    assert not should_claim(91, 100, currently_paused=False)
    # Falling: stays paused down to 70 %, resumes below it.
    assert not should_claim(80, 100, currently_paused=True)
    assert not should_claim(70, 100, currently_paused=True)
    assert should_claim(69, 100, currently_paused=True)
    # In the band the previous decision holds.
    assert should_claim(80, 100, currently_paused=False)


def test_never_claims_without_a_free_slot() -> None:
    assert not should_claim(1, 1, False, high=1.0, low=1.0)
    assert should_claim(0, 1, True)


@given(
    st.integers(1, 500),
    st.lists(st.integers(-50, 50), max_size=60),
    st.floats(min_value=0.05, max_value=1.0),
    st.floats(min_value=0.05, max_value=1.0),
)
def test_hysteresis_properties(capacity: int, deltas: list[int], a: float, b: float) -> None:
    low, high = min(a, b), max(a, b)
    load, paused = 0, False
    for d in deltas:
        load = max(0, min(capacity + 5, load + d))
        claim = should_claim(load, capacity, paused, high=high, low=low)
        u = load / capacity
        if claim:
            assert free_slots(load, capacity) > 0
            assert u <= high
            if paused:
                assert u < low
        else:
            assert u > high or (paused and u >= low) or load >= capacity
        paused = not claim
