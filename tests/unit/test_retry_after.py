"""`RetryAfter`: an activity's failure that says when to try again. The error object it
becomes, the least delay the control plane reads back from it, the retry decision that honours
it, and the LLM provider's reading of a ``Retry-After`` header."""

from __future__ import annotations

import email.utils
import json
import math
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import everruns
from everruns.agent import _http
from everruns.agent.providers import (
    MAX_RETRY_AFTER,
    OpenAIProvider,
    ReasonRequest,
    retry_after_seconds,
)
from everruns.domain.limits import MAX_SECONDS
from everruns.domain.retry import (
    RetryPolicy,
    backoff_delay,
    decide_retry,
    retry_after_of,
)
from everruns.errors import EverrunsError, InvalidArgument, RetryAfter
from everruns.worker.failure import error_from_exception

rng_values = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
delays = st.floats(min_value=0.0, max_value=MAX_SECONDS)


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    initial = draw(st.floats(min_value=1e-3, max_value=1e4))
    return RetryPolicy(
        max_attempts=draw(st.integers(min_value=1, max_value=20)),
        initial_interval=initial,
        backoff_coefficient=draw(st.floats(min_value=1.0, max_value=10.0)),
        maximum_interval=draw(st.floats(min_value=initial, max_value=1e6)),
        jitter=draw(st.floats(min_value=0.0, max_value=0.99)),
        non_retryable_error_types=draw(st.sampled_from([(), ("Declined",)])),
    )


# --- the exception ----------------------------------------------------------------------------


def test_it_is_exported_and_an_everruns_error() -> None:
    assert everruns.RetryAfter is RetryAfter
    exc = RetryAfter(2.5, "rate limited")
    assert isinstance(exc, EverrunsError)
    assert (exc.seconds, str(exc)) == (2.5, "rate limited")
    assert str(RetryAfter(3)) == "retry after 3 s" and RetryAfter(3).seconds == 3.0


@pytest.mark.parametrize("seconds", [0, 0.0, 1, 7.5, MAX_SECONDS])
def test_any_delay_from_zero_to_the_bound_is_accepted(seconds: float) -> None:
    assert RetryAfter(seconds).seconds == float(seconds)


@pytest.mark.parametrize(
    "seconds",
    [-1, -0.001, math.nan, math.inf, -math.inf, True, "5", None, 10**400, MAX_SECONDS * 2],
)
def test_a_delay_that_is_not_a_number_of_seconds_is_refused(seconds: Any) -> None:
    with pytest.raises(InvalidArgument, match="RetryAfter seconds must be a finite number"):
        RetryAfter(seconds)


# --- the error object the worker sends ----------------------------------------------------------


def test_the_error_object_carries_the_delay() -> None:
    try:
        raise RetryAfter(4.0, "busy")
    except RetryAfter as exc:
        error = error_from_exception(exc)
    assert error["retry_after"] == 4.0
    assert error["type"] == "everruns.errors.RetryAfter" and error["message"] == "busy"
    assert error["non_retryable"] is False
    json.dumps(error, allow_nan=False)  # it travels as JSON


def test_other_errors_carry_no_delay() -> None:
    assert "retry_after" not in error_from_exception(ValueError("x"))
    assert "retry_after" not in error_from_exception(everruns.NonRetryableError("x"))


def test_a_delay_changed_after_construction_to_nonsense_is_left_out() -> None:
    exc = RetryAfter(1.0)
    exc.seconds = math.nan
    error = error_from_exception(exc)
    assert "retry_after" not in error
    json.dumps(error, allow_nan=False)


# --- what the control plane reads back --------------------------------------------------------


@given(delays)
def test_a_valid_delay_is_read_back(seconds: float) -> None:
    assert retry_after_of({"type": "X", "retry_after": seconds}) == seconds


@pytest.mark.parametrize(
    "value", [None, -1, math.nan, math.inf, True, False, "3", [3], {"s": 3}, 10**400]
)
def test_a_hand_made_error_object_with_nonsense_asks_for_nothing(value: Any) -> None:
    assert retry_after_of({"type": "X", "retry_after": value}) is None
    assert retry_after_of({"type": "X"}) is None


# --- the decision -------------------------------------------------------------------------------


@given(policies(), st.integers(min_value=1, max_value=30), rng_values, delays, st.booleans())
def test_the_delay_is_the_larger_of_the_backoff_and_the_asked_delay(
    policy: RetryPolicy, attempt: int, rng: float, seconds: float, declined: bool
) -> None:
    kind = "Declined" if declined else "Timeout"
    plain = decide_retry(policy, attempt, kind, False, rng)
    asked = decide_retry(policy, attempt, kind, False, rng, seconds)
    # It never makes a retry, nor prevents one.
    assert asked.retry == plain.retry
    if asked.retry:
        assert asked.delay == max(backoff_delay(policy, attempt, rng), seconds)
        assert asked.delay >= seconds and asked.delay >= plain.delay
        assert asked.delay <= MAX_SECONDS
    else:
        assert asked.delay == 0.0


@given(policies(), rng_values)
def test_it_may_exceed_the_maximum_interval(policy: RetryPolicy, rng: float) -> None:
    if policy.max_attempts < 2:
        return
    wanted = policy.maximum_interval * 3
    decision = decide_retry(policy, 1, "Timeout", False, rng, wanted)
    assert decision.retry and decision.delay == wanted


def test_exhausted_attempts_and_non_retryable_errors_still_end() -> None:
    policy = RetryPolicy(max_attempts=2)
    assert not decide_retry(policy, 2, "Timeout", False, 0.5, 10.0).retry
    assert not decide_retry(policy, 1, "Timeout", True, 0.5, 10.0).retry


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_the_decision_refuses_a_nonsense_delay(seconds: float) -> None:
    with pytest.raises(InvalidArgument, match="retry_after must be a number of seconds"):
        decide_retry(RetryPolicy(), 1, "Timeout", False, 0.5, seconds)


# --- the LLM provider's Retry-After ---------------------------------------------------------------

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("9" * 5000, MAX_SECONDS),  # more digits than int() reads
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 3600, usegmt=True), 0.0),  # already past
        (email.utils.formatdate(NOW + 90), 90.0),  # "-0000": UTC
    ],
)
def test_retry_after_headers_are_read(header: str, expected: float) -> None:
    assert retry_after_seconds(header, NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "header", [None, "", "soon", "-5", "5 s", "1e3", "٣", "Wed, 99 Foo 2015 07:28:00 GMT"]
)
def test_malformed_retry_after_headers_ask_for_nothing(header: str | None) -> None:
    assert retry_after_seconds(header, NOW) is None


@given(st.text(max_size=60))
def test_any_header_text_gives_none_or_a_valid_delay(header: str) -> None:
    got = retry_after_seconds(header, NOW)
    assert got is None or 0.0 <= got <= MAX_SECONDS


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [
        (429, "12", 12.0),
        (503, "99999", MAX_RETRY_AFTER),  # a reset hours away: asked again after ten minutes
        (429, None, None),  # no header: the policy's backoff
        (500, "soon", None),
        (302, "5", None),  # not busy: a redirect's Retry-After is no rate limit
    ],
)
async def test_the_openai_provider_raises_retry_after_bounded_for_a_turn(
    monkeypatch: pytest.MonkeyPatch, status: int, header: str | None, expected: float | None
) -> None:
    headers = (("content-type", "application/json"),)
    if header is not None:
        headers += (("retry-after", header),)

    async def answer(*_: Any, **__: Any) -> _http.HttpResponse:
        return _http.HttpResponse(status, "X", headers, b'{"error": {"message": "busy"}}')

    monkeypatch.setattr(_http, "request", answer)
    provider = OpenAIProvider("sk-test", "https://llm.example/v1", "m")
    request = ReasonRequest(messages=({"role": "user", "content": "hi"},), tools=(), model=None)
    with trio.fail_after(5), pytest.raises(EverrunsError) as raised:
        await provider.complete(request)
    if expected is None:
        assert not isinstance(raised.value, RetryAfter)
    else:
        assert isinstance(raised.value, RetryAfter) and raised.value.seconds == expected
    assert f"HTTP {status}: busy" in str(raised.value)
