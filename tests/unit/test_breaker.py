"""Circuit-breaker transitions: scripted scenarios and random operation sequences."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns.domain.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStateName,
    admit,
    is_probe,
    on_failure,
    on_success,
    probe_at,
    release_probe,
    reset,
)
from everruns.errors import InvalidArgument

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
CFG = BreakerConfig()


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def fail_n(state: BreakerState, times: list[float], cfg: BreakerConfig = CFG) -> BreakerState:
    for t in times:
        state = on_failure(state, cfg, at(t), claimed_at=at(t))
    return state


def check_invariants(s: BreakerState, cfg: BreakerConfig) -> None:
    assert s.failure_count >= 0
    assert s.success_count >= 0
    assert 0 <= s.probes_in_flight <= cfg.half_open_max_probes
    assert (s.opened_at is None) == (s.state == "closed")
    if s.state != "half_open":
        assert s.probes_in_flight == 0
    if s.state == "half_open":
        assert s.success_count < cfg.success_threshold


# --- values ------------------------------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    assert attrs.astuple(CFG) == (5, 60.0, 30.0, 1, 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"success_threshold": -1}, "success_threshold"),
        ({"half_open_max_probes": 0}, "half_open_max_probes"),
        ({"half_open_max_probes": True}, "half_open_max_probes"),
        ({"window": 0.0}, "window"),
        ({"window": float("nan")}, "window"),
        ({"open_duration": -1.0}, "open_duration"),
        ({"open_duration": float("inf")}, "open_duration"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        BreakerConfig(**kwargs)


def test_zero_open_duration_is_allowed() -> None:
    assert BreakerConfig(open_duration=0).open_duration == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"state": "open"},
        {"state": "half_open"},
        {"state": "closed", "opened_at": T0},
        {"state": "broken", "opened_at": T0},
        {"failure_count": -1},
        {"success_count": -1},
        {"probes_in_flight": -1},
    ],
)
def test_state_rejects_what_the_table_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        BreakerState(key="k", **kwargs)


def test_reset_is_fresh_and_closed() -> None:
    s = reset("charge")
    assert s == BreakerState(key="charge")
    assert (s.state, s.failure_count, s.opened_at, s.window_started_at) == ("closed", 0, None, None)


# --- scripted scenarios ------------------------------------------------------------------------


def test_five_failures_open_the_breaker() -> None:
    s = fail_n(reset("k"), [0, 1, 2, 3])
    assert s.state == "closed"
    assert s.failure_count == 4
    s = on_failure(s, CFG, at(4), claimed_at=at(4))
    assert s.state == "open"
    assert s.opened_at == at(4)
    assert s.last_failure_at == at(4)
    assert s.failure_count == 5


def test_window_boundary_is_inclusive() -> None:
    s = fail_n(reset("k"), [0, 10, 20, 30, 60])
    assert s.state == "open"
    s = fail_n(reset("k"), [0, 10, 20, 30, 60.000001])
    assert s.state == "closed"
    assert s.failure_count == 4  # the failure at 0 left the window
    assert s.window_started_at == at(10)
    assert s.recent_failures == (at(10), at(20), at(30), at(60.000001))


def test_the_window_slides() -> None:
    # DESIGN §5: five failures in a 60 s window open it, whenever the window begins: a stray
    # failure at 0 must not make the burst at 57..62 s straddle two windows.
    s = fail_n(reset("k"), [0, 57, 58, 59, 61])
    assert (s.state, s.failure_count) == ("closed", 4)
    assert on_failure(s, CFG, at(62), claimed_at=at(62)).state == "open"


def test_an_operator_lowering_the_count_forgets_the_older_failures() -> None:
    # `UPDATE durable_circuit_breaker_state SET failure_count = 0`: the times it kept go too.
    s = attrs.evolve(fail_n(reset("k"), [0, 1, 2, 3]), failure_count=0)
    s = on_failure(s, CFG, at(4), claimed_at=at(4))
    assert (s.state, s.failure_count, s.recent_failures) == ("closed", 1, (at(4),))


def test_success_while_closed_does_not_reset_the_count() -> None:
    s = fail_n(reset("k"), [0, 1, 2, 3])
    s = on_success(s, CFG, at(3.5))
    assert s.failure_count == 4
    assert on_failure(s, CFG, at(4), claimed_at=at(4)).state == "open"


def test_open_refuses_until_open_duration_then_probes() -> None:
    s = fail_n(reset("k"), [0, 1, 2, 3, 4])
    ok, s2 = admit(s, CFG, at(4 + 29.999))
    assert not ok
    assert s2 == s
    ok, s3 = admit(s, CFG, at(4 + 30))
    assert ok
    assert s3.state == "half_open"
    assert s3.probes_in_flight == 1
    assert s3.opened_at == at(4)


def test_half_open_limits_probes_and_release_frees_a_slot() -> None:
    cfg = BreakerConfig(half_open_max_probes=2)
    s = fail_n(reset("k"), [0, 1, 2, 3, 4], cfg)
    ok1, s = admit(s, cfg, at(40))
    ok2, s = admit(s, cfg, at(40))
    ok3, s = admit(s, cfg, at(40))
    assert (ok1, ok2, ok3) == (True, True, False)
    assert s.probes_in_flight == 2
    s = release_probe(s, cfg, at(41))
    assert s.probes_in_flight == 1
    ok4, s = admit(s, cfg, at(41))
    assert ok4
    assert s.probes_in_flight == 2


def test_success_threshold_closes_and_clears() -> None:
    s = fail_n(reset("k"), [0, 1, 2, 3, 4])
    ok, s = admit(s, CFG, at(40))
    assert ok
    s = on_success(s, CFG, at(41))
    assert (s.state, s.success_count, s.probes_in_flight) == ("half_open", 1, 0)
    ok, s = admit(s, CFG, at(42))
    assert ok
    s = on_success(s, CFG, at(43))
    assert s.state == "closed"
    assert (s.failure_count, s.success_count, s.probes_in_flight) == (0, 0, 0)
    assert (s.opened_at, s.window_started_at) == (None, None)
    assert s.last_failure_at == at(4)
    assert admit(s, CFG, at(43)) == (True, s)


def test_probe_failure_reopens_with_a_new_opened_at() -> None:
    s = fail_n(reset("k"), [0, 1, 2, 3, 4])
    _, s = admit(s, CFG, at(40))
    s = on_success(s, CFG, at(41))
    _, s = admit(s, CFG, at(42))
    s = on_failure(s, CFG, at(43), claimed_at=at(42))
    assert s.state == "open"
    assert s.opened_at == at(43)
    assert (s.success_count, s.probes_in_flight) == (0, 0)
    assert not admit(s, CFG, at(43 + 29))[0]
    assert admit(s, CFG, at(43 + 30))[0]


def test_a_late_failure_of_a_task_claimed_before_it_opened_leaves_half_open_alone() -> None:
    # A call that hung through the outage (claimed at 3, before the breaker opened at 4) fails
    # while the probe is out: not the probe's verdict, so the probe keeps its slot and its say.
    s = fail_n(reset("k"), [0, 1, 2, 3, 4])
    _, s = admit(s, CFG, at(40))
    late = on_failure(s, CFG, at(41), claimed_at=at(3))
    assert late == attrs.evolve(s, failure_count=6, last_failure_at=at(41))
    assert (late.state, late.probes_in_flight, late.opened_at) == ("half_open", 1, at(4))
    assert not admit(late, CFG, at(41))[0]  # the probe's slot is still taken
    assert on_success(late, CFG, at(42)).success_count == 1
    assert on_failure(late, CFG, at(42), claimed_at=None) == attrs.evolve(
        late, failure_count=7, last_failure_at=at(42)
    )


def test_late_results_while_open_do_not_extend_it() -> None:
    s = fail_n(reset("k"), [0, 1, 2, 3, 4])
    s = on_failure(s, CFG, at(20), claimed_at=at(3))
    s = on_success(s, CFG, at(21))
    assert s.state == "open"
    assert s.opened_at == at(4)
    assert s.last_failure_at == at(20)
    assert admit(s, CFG, at(34))[0]


def test_release_outside_half_open_changes_nothing() -> None:
    closed = reset("k")
    opened = fail_n(closed, [0, 1, 2, 3, 4])
    assert release_probe(closed, CFG, at(5)) == closed
    assert release_probe(opened, CFG, at(5)) == opened


def test_probe_at() -> None:
    s = fail_n(reset("k"), [0, 1, 2, 3, 4])
    assert probe_at(s, CFG) == at(34)
    assert probe_at(reset("k"), CFG) is None
    _, half = admit(s, CFG, at(40))
    assert probe_at(half, CFG) is None


def test_clock_stepping_backwards_is_absorbed() -> None:
    s = fail_n(reset("k"), [100, 101])
    s = on_failure(s, CFG, at(50), claimed_at=at(50))
    assert (s.state, s.failure_count) == ("closed", 3)
    s = fail_n(s, [102, 103])
    assert s.state == "open"
    assert admit(s, CFG, at(0)) == (False, s)


# --- properties --------------------------------------------------------------------------------

Op = Literal["failure", "success", "admit", "release"]

configs = st.builds(
    BreakerConfig,
    failure_threshold=st.integers(1, 6),
    window=st.sampled_from([1.0, 10.0, 60.0]),
    open_duration=st.sampled_from([0.0, 5.0, 30.0]),
    half_open_max_probes=st.integers(1, 3),
    success_threshold=st.integers(1, 3),
)
advances = st.one_of(
    st.sampled_from([0.0, 1.0, 5.0, 10.0, 30.0, 60.0]),
    st.floats(min_value=0.0, max_value=90.0),
)
ops = st.lists(
    st.tuples(st.sampled_from(["failure", "success", "admit", "release"]), advances),
    max_size=80,
)


@given(configs, ops)
def test_random_sequences_stay_valid(cfg: BreakerConfig, script: list[tuple[Op, float]]) -> None:
    s = reset("k")
    t = 0.0
    closed_failures: list[float] = []  # failures seen while closed since it last closed
    for op, advance in script:
        t += advance
        now = at(t)
        before = s
        if op == "failure":
            if before.state == "closed":
                closed_failures.append(t)
            s = on_failure(s, cfg, now, claimed_at=now)
            if before.state == "closed":
                # Opens exactly when the last failure_threshold failures fit in the window.
                recent = closed_failures[-cfg.failure_threshold :]
                fits = len(recent) == cfg.failure_threshold and all(
                    (at(recent[-1]) - at(x)).total_seconds() <= cfg.window for x in recent
                )
                assert (s.state == "open") == fits
            if before.state == "half_open":
                assert s.state == "open"
                assert s.opened_at == now
        elif op == "success":
            s = on_success(s, cfg, now)
            if before.state != "half_open":
                assert s == before
        elif op == "admit":
            ok, s = admit(s, cfg, now)
            if before.state == "closed":
                assert ok
            if before.state == "open":
                assert before.opened_at is not None
                elapsed = (now - before.opened_at).total_seconds()
                if elapsed < cfg.open_duration:
                    assert not ok
                    assert s == before
                else:
                    assert s.state == "half_open"
            if ok and s.state == "half_open":
                assert s.probes_in_flight >= 1
        else:
            s = release_probe(s, cfg, now)
        if s.state == "closed" and before.state != "closed":
            closed_failures = []
        check_invariants(s, cfg)
        assert s.key == "k"


End = Literal["failure", "success", "release"]


@settings(max_examples=300)
@given(
    # Quick to open and to probe: late results of the tasks out when it opens are the point.
    st.builds(
        BreakerConfig,
        failure_threshold=st.integers(1, 3),
        window=st.just(60.0),
        open_duration=st.sampled_from([0.0, 5.0]),
        half_open_max_probes=st.integers(1, 3),
        success_threshold=st.integers(1, 3),
    ),
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.0, 5.0]),
            st.integers(0, 2),
            st.one_of(st.none(), st.sampled_from(["failure", "success", "release"])),
            st.integers(0, 3),
        ),
        max_size=60,
    ),
)
def test_only_probes_move_an_unclosed_breaker(
    cfg: BreakerConfig, script: list[tuple[float, int, End | None, int]]
) -> None:
    # Each step hands out up to `claims` tasks, then one task out ends (the one out the longest
    # for pick 0, else another), in any order, late ones included. As the store does, a success
    # or a release writes the breaker only for a probe (`is_probe`), a failure always. While
    # half-open, the slots taken are exactly the probes out, and a failure of a task claimed
    # before the breaker last opened moves nothing but the informational counts.
    s = reset("k")
    t = 0.0
    out: list[dt.datetime] = []  # claim times of the tasks handed out and not ended
    for advance, claims, end, pick in script:
        t += advance + 0.001
        for _ in range(claims):
            ok, s = admit(s, cfg, at(t))
            if ok:
                out.append(at(t))
                assert s.state == "closed" or is_probe(s, at(t))
        # Strictly after the claims: a claim and an opening are never simultaneous.
        now = at(t + 0.0005)
        before = s
        if end is not None and out:
            claimed = out.pop(pick % len(out) if pick else 0)
            probe = is_probe(before, claimed)
            if end == "failure":
                s = on_failure(before, cfg, now, claimed_at=claimed)
                if probe:
                    assert (s.state, s.opened_at, s.probes_in_flight) == ("open", now, 0)
                elif before.state != "closed":
                    assert s == attrs.evolve(
                        before, failure_count=before.failure_count + 1, last_failure_at=now
                    )
            elif probe:
                s = (on_success if end == "success" else release_probe)(before, cfg, now)
        if s.state == "half_open":
            assert s.probes_in_flight == sum(is_probe(s, c) for c in out)
        check_invariants(s, cfg)


@given(st.lists(st.floats(min_value=0.0, max_value=60.0), min_size=5, max_size=5))
def test_five_failures_within_the_window_always_open(times: list[float]) -> None:
    times.sort()
    s = fail_n(reset("k"), times[:4])
    assert s.state == "closed"
    assert on_failure(s, CFG, at(times[4]), claimed_at=at(times[4])).state == "open"


@given(
    st.lists(st.floats(min_value=0.0, max_value=60.0), min_size=5, max_size=5),
    st.lists(st.floats(min_value=0.0, max_value=60.0), max_size=10),
)
def test_successes_interleaved_do_not_prevent_opening(
    failures: list[float], successes: list[float]
) -> None:
    events = sorted([(t, "f") for t in failures] + [(t, "s") for t in successes])
    s = reset("k")
    for t, kind in events:
        s = (
            on_failure(s, CFG, at(t), claimed_at=at(t))
            if kind == "f"
            else on_success(s, CFG, at(t))
        )
    assert s.state == "open"


@given(st.lists(st.floats(min_value=15.001, max_value=100.0), min_size=1, max_size=40))
def test_failures_spread_over_more_than_the_window_never_open(gaps: list[float]) -> None:
    # Any four gaps of more than 15 s put every five consecutive failures > 60 s apart.
    s = reset("k")
    t = 0.0
    for gap in gaps:
        s = on_failure(s, CFG, at(t), claimed_at=at(t))
        assert s.state == "closed"
        t += gap


@given(configs, st.floats(min_value=0.0, max_value=100.0), st.integers(0, 5))
def test_open_never_admits_before_open_duration(
    cfg: BreakerConfig, since: float, probes: int
) -> None:
    s = BreakerState(key="k", state="open", failure_count=probes, opened_at=T0)
    ok, s2 = admit(s, cfg, at(since))
    assert ok is (since >= cfg.open_duration)
    assert (s2.state == "half_open") is (since >= cfg.open_duration)


optional_times = st.one_of(
    st.none(),
    st.datetimes(
        min_value=dt.datetime(2000, 1, 1),
        max_value=dt.datetime(2100, 1, 1),
        timezones=st.just(dt.UTC),
    ),
)


@st.composite
def any_valid_state(draw: st.DrawFn) -> BreakerState:
    names: list[BreakerStateName] = ["closed", "open", "half_open"]
    name = draw(st.sampled_from(names))
    opened = None if name == "closed" else draw(optional_times.filter(lambda x: x is not None))
    return BreakerState(
        key=draw(st.text(min_size=1, max_size=5)),
        state=name,
        failure_count=draw(st.integers(0, 10**9)),
        success_count=draw(st.integers(0, 10)),
        probes_in_flight=draw(st.integers(0, 10)),
        window_started_at=draw(optional_times),
        opened_at=opened,
        last_failure_at=draw(optional_times),
        recent_failures=tuple(
            draw(st.lists(optional_times.filter(lambda x: x is not None), max_size=8))
        ),
    )


@given(
    any_valid_state(),
    configs,
    st.datetimes(
        min_value=dt.datetime(1990, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.just(dt.UTC),
    ),
    optional_times,
)
def test_every_transition_is_total(
    s: BreakerState, cfg: BreakerConfig, now: dt.datetime, claimed_at: dt.datetime | None
) -> None:
    # Rows written under another config or clock must never make the store's transaction fail.
    results = [
        on_failure(s, cfg, now, claimed_at=claimed_at),
        on_success(s, cfg, now),
        admit(s, cfg, now)[1],
        release_probe(s, cfg, now),
    ]
    for r in results:
        assert isinstance(r, BreakerState)
        assert r.key == s.key
        assert (r.opened_at is None) == (r.state == "closed")
        assert r.probes_in_flight <= max(s.probes_in_flight, cfg.half_open_max_probes)
    probe_at(s, cfg)


@given(
    any_valid_state(),
    configs,
    st.datetimes(
        min_value=dt.datetime(2000, 1, 1),
        max_value=dt.datetime(2100, 1, 1),
        timezones=st.just(dt.UTC),
    ),
    optional_times,
)
def test_a_failure_reopens_an_unclosed_breaker_only_from_a_probe(
    s: BreakerState, cfg: BreakerConfig, now: dt.datetime, claimed_at: dt.datetime | None
) -> None:
    # A probe: a half-open breaker's task claimed since it opened (as the store's SQL says).
    probe = (
        s.state == "half_open"
        and claimed_at is not None
        and s.opened_at is not None
        and claimed_at >= s.opened_at
    )
    assert is_probe(s, claimed_at) is probe
    r = on_failure(s, cfg, now, claimed_at=claimed_at)
    if probe:
        assert (r.state, r.opened_at, r.probes_in_flight, r.success_count) == ("open", now, 0, 0)
    elif s.state != "closed":
        assert r == attrs.evolve(s, failure_count=s.failure_count + 1, last_failure_at=now)


def test_probe_at_far_future_does_not_overflow() -> None:
    s = BreakerState(key="k", state="open", opened_at=dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    cfg = BreakerConfig(open_duration=1e6)
    assert probe_at(s, cfg) == dt.datetime.max.replace(tzinfo=dt.UTC)
