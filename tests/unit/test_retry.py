"""Retry policy validation, serialisation, backoff arithmetic and retry decisions."""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.limits import MAX_INT4, MAX_SECONDS
from everruns.domain.retry import (
    DEFAULT_RETRY_POLICY,
    RetryDecision,
    RetryPolicy,
    backoff_delay,
    decide_retry,
    is_non_retryable_type,
    should_retry,
)
from everruns.errors import InvalidArgument

rng_values = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
attempts = st.integers(min_value=1, max_value=10_000)


@st.composite
def policies(draw: st.DrawFn, *, jitter: float | None = None) -> RetryPolicy:
    initial = draw(st.floats(min_value=1e-3, max_value=1e4))
    maximum = draw(st.floats(min_value=initial, max_value=1e6))
    return RetryPolicy(
        max_attempts=draw(st.integers(min_value=1, max_value=100)),
        initial_interval=initial,
        backoff_coefficient=draw(st.floats(min_value=1.0, max_value=100.0)),
        maximum_interval=maximum,
        jitter=(draw(st.floats(min_value=0.0, max_value=0.99)) if jitter is None else jitter),
        non_retryable_error_types=tuple(
            draw(st.lists(st.sampled_from(["ValueError", "a.B", "shop.errors.Declined"])))
        ),
    )


# --- policy validation -------------------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    p = DEFAULT_RETRY_POLICY
    assert (p.max_attempts, p.initial_interval, p.backoff_coefficient) == (5, 1.0, 2.0)
    assert (p.maximum_interval, p.jitter, p.non_retryable_error_types) == (60.0, 0.1, ())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -3}, "max_attempts"),
        ({"max_attempts": 2.0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_interval": 0}, "initial_interval"),
        ({"initial_interval": -1.0}, "initial_interval"),
        ({"initial_interval": math.nan}, "initial_interval"),
        ({"maximum_interval": math.inf}, "maximum_interval"),
        ({"maximum_interval": 0.0}, "maximum_interval"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient"),
        ({"backoff_coefficient": math.nan}, "backoff_coefficient"),
        ({"jitter": -0.01}, "jitter"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": math.nan}, "jitter"),
        ({"initial_interval": 10.0, "maximum_interval": 5.0}, "maximum_interval"),
        ({"non_retryable_error_types": ("",)}, "non_retryable_error_types"),
        ({"non_retryable_error_types": "ValueError"}, "non_retryable_error_types"),
        # Past what PostgreSQL stores: an int4 attempt counter, a delay past its intervals.
        ({"max_attempts": MAX_INT4 + 1}, "max_attempts"),
        ({"initial_interval": 1e13, "maximum_interval": 1e13}, "initial_interval"),
        ({"maximum_interval": 1e13}, "maximum_interval"),
        ({"maximum_interval": math.nextafter(MAX_SECONDS, math.inf)}, "maximum_interval"),
    ],
)
def test_invalid_fields_are_named(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field) as info:
        RetryPolicy(**kwargs)
    assert "\n" not in str(info.value)


def test_error_types_accept_a_list() -> None:
    p = RetryPolicy(non_retryable_error_types=["ValueError"])
    assert p.non_retryable_error_types == ("ValueError",)


def test_attempts_and_intervals_are_allowed_up_to_what_postgres_stores() -> None:
    """max_attempts up to int4's maximum, intervals up to 100 years (`MAX_SECONDS`): the
    delay goes to ``now() + make_interval(...)``, the attempts to an integer column."""
    p = RetryPolicy(
        max_attempts=MAX_INT4, initial_interval=MAX_SECONDS, maximum_interval=MAX_SECONDS
    )
    assert backoff_delay(p, MAX_INT4, 0.999) == MAX_SECONDS
    with pytest.raises(InvalidArgument, match="max_attempts"):
        attrs.evolve(p, max_attempts=MAX_INT4 + 1)
    with pytest.raises(InvalidArgument, match="maximum_interval"):
        attrs.evolve(p, maximum_interval=MAX_SECONDS * 2)


def test_maximum_equal_to_initial_is_allowed() -> None:
    p = RetryPolicy(initial_interval=3.0, maximum_interval=3.0)
    assert backoff_delay(p, 7, 0.999) <= 3.0


# --- to_dict / from_dict -----------------------------------------------------------------------


@given(policies())
def test_dict_round_trip_through_json(p: RetryPolicy) -> None:
    d = json.loads(json.dumps(p.to_dict()))
    assert RetryPolicy.from_dict(d) == p


def test_empty_dict_is_the_default_policy() -> None:
    assert RetryPolicy.from_dict({}) == DEFAULT_RETRY_POLICY


def test_from_dict_accepts_integers_for_intervals() -> None:
    p = RetryPolicy.from_dict({"initial_interval": 2, "maximum_interval": 10})
    assert (p.initial_interval, p.maximum_interval) == (2, 10)


@pytest.mark.parametrize(
    ("d", "needle"),
    [
        ({"max_attempt": 3}, "max_attempt"),
        ({"max_attempts": "3"}, "max_attempts"),
        ({"max_attempts": 3.0}, "max_attempts"),
        ({"max_attempts": False}, "max_attempts"),
        ({"jitter": "0.1"}, "jitter"),
        ({"initial_interval": None}, "initial_interval"),
        ({"backoff_coefficient": True}, "backoff_coefficient"),
        ({"non_retryable_error_types": "ValueError"}, "non_retryable_error_types"),
        ({"non_retryable_error_types": [1]}, "non_retryable_error_types"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_from_dict_rejects_bad_input(d: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        RetryPolicy.from_dict(d)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(InvalidArgument, match="JSON object"):
        RetryPolicy.from_dict([1, 2])  # type: ignore[arg-type]


# --- backoff_delay -----------------------------------------------------------------------------


def test_default_schedule_without_jitter() -> None:
    p = RetryPolicy(jitter=0.0)
    got = [backoff_delay(p, a, 0.0) for a in range(1, 10)]
    assert got == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_midpoint_rng_means_no_jitter() -> None:
    assert backoff_delay(DEFAULT_RETRY_POLICY, 3, 0.5) == 4.0


def test_jitter_extremes() -> None:
    assert backoff_delay(DEFAULT_RETRY_POLICY, 1, 0.0) == pytest.approx(0.9)
    assert backoff_delay(DEFAULT_RETRY_POLICY, 1, math.nextafter(1.0, 0.0)) == pytest.approx(1.1)
    # At the cap, jitter can only shorten the delay.
    assert backoff_delay(DEFAULT_RETRY_POLICY, 20, 0.0) == pytest.approx(54.0)
    assert backoff_delay(DEFAULT_RETRY_POLICY, 20, 0.99) == 60.0


@given(rng_values)
def test_first_retry_is_one_second_within_ten_percent(r: float) -> None:
    d = backoff_delay(DEFAULT_RETRY_POLICY, 1, r)
    assert 0.9 - 1e-12 <= d <= 1.1 + 1e-12


@given(policies(), attempts, rng_values)
def test_delay_is_never_negative_nor_above_the_cap(p: RetryPolicy, a: int, r: float) -> None:
    d = backoff_delay(p, a, r)
    assert 0.0 <= d <= p.maximum_interval
    assert math.isfinite(d)


@given(policies(), attempts, rng_values)
def test_delay_stays_within_jitter_of_the_base(p: RetryPolicy, a: int, r: float) -> None:
    base = backoff_delay(attrs_evolve_no_jitter(p), a, 0.5)
    d = backoff_delay(p, a, r)
    assert base * (1 - p.jitter) * (1 - 1e-9) <= d <= base * (1 + p.jitter) * (1 + 1e-9)


@given(policies(jitter=0.0), attempts, st.integers(min_value=0, max_value=50), rng_values)
def test_without_jitter_delay_is_non_decreasing(p: RetryPolicy, a: int, k: int, r: float) -> None:
    assert backoff_delay(p, a, r) <= backoff_delay(p, a + k, r)


@given(policies(jitter=0.0))
def test_without_jitter_first_delay_is_the_initial_interval(p: RetryPolicy) -> None:
    assert backoff_delay(p, 1, 0.3) == p.initial_interval


def test_huge_attempt_numbers_do_not_overflow() -> None:
    p = RetryPolicy(initial_interval=1e-300, maximum_interval=MAX_SECONDS, backoff_coefficient=2.0)
    # 2.0**1025 overflows, yet the delay (about 3.6e8 s) is below the cap.
    assert backoff_delay(p, 1026, 0.5) == pytest.approx(1e-300 * 2.0**500 * 2.0**525)
    assert backoff_delay(p, 10**9, 0.5) == MAX_SECONDS
    assert backoff_delay(DEFAULT_RETRY_POLICY, 10**18, 0.5) == 60.0


@pytest.mark.parametrize(
    ("attempt", "r"), [(0, 0.5), (-1, 0.5), (1, 1.0), (1, -0.1), (1, math.nan)]
)
def test_backoff_rejects_bad_arguments(attempt: int, r: float) -> None:
    with pytest.raises(InvalidArgument):
        backoff_delay(DEFAULT_RETRY_POLICY, attempt, r)


def attrs_evolve_no_jitter(p: RetryPolicy) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=p.max_attempts,
        initial_interval=p.initial_interval,
        backoff_coefficient=p.backoff_coefficient,
        maximum_interval=p.maximum_interval,
        jitter=0.0,
    )


# --- should_retry / decide_retry ---------------------------------------------------------------


@given(policies(), st.integers(min_value=1, max_value=500), st.text(), st.booleans())
def test_never_retries_past_max_attempts(p: RetryPolicy, a: int, et: str, flag: bool) -> None:
    if a >= p.max_attempts:
        assert not should_retry(p, a, et, flag)


@given(policies(), attempts, st.text())
def test_flagged_errors_never_retry(p: RetryPolicy, a: int, et: str) -> None:
    assert not should_retry(p, a, et, True)


def test_retries_until_the_last_attempt() -> None:
    p = DEFAULT_RETRY_POLICY
    assert [should_retry(p, a, "ValueError", False) for a in range(1, 7)] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_single_attempt_policy_never_retries() -> None:
    assert not should_retry(RetryPolicy(max_attempts=1), 1, "E", False)


@pytest.mark.parametrize(
    ("listed", "reported", "matches"),
    [
        ("ValueError", "ValueError", True),
        ("ValueError", "builtins.ValueError", True),
        ("shop.errors.Declined", "shop.errors.Declined", True),
        ("shop.errors.Declined", "Declined", True),
        ("shop.errors.Declined", "other.Declined", False),
        ("Declined", "shop.errors.Declined", True),
        ("ValueError", "KeyError", False),
        ("ValueError", "my.ValueErrorish", False),
        ("Error", "ValueError", False),
    ],
)
def test_error_type_matching(listed: str, reported: str, matches: bool) -> None:
    p = RetryPolicy(non_retryable_error_types=(listed,))
    assert is_non_retryable_type(p, reported) is matches
    assert should_retry(p, 1, reported, False) is (not matches)


@given(policies(), attempts, st.text(), st.booleans(), rng_values)
def test_decide_retry_agrees_with_parts(
    p: RetryPolicy, a: int, et: str, flag: bool, r: float
) -> None:
    d = decide_retry(p, a, et, flag, r)
    assert d.retry is should_retry(p, a, et, flag)
    if d.retry:
        assert d.delay == backoff_delay(p, a, r)
    else:
        assert d == RetryDecision(retry=False, delay=0.0)


def test_decide_retry_validates_even_when_not_retrying() -> None:
    with pytest.raises(InvalidArgument):
        decide_retry(DEFAULT_RETRY_POLICY, 0, "E", True, 0.5)
