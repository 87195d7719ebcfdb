"""How activity exceptions become error objects, and how reconnect delays grow."""

from __future__ import annotations

import os
import random

from hypothesis import given
from hypothesis import strategies as st

from everruns.domain import payload
from everruns.errors import (
    FailedPrecondition,
    InvalidArgument,
    NonRetryableError,
    ResourceExhausted,
    RpcError,
    ServerUnavailable,
)
from everruns.worker.backoff import MAX_DELAY, Backoff, backoff_delay
from everruns.worker.failure import (
    MAX_MESSAGE_CHARS,
    MAX_TRACEBACK_CHARS,
    error_from_exception,
    type_name,
)
from everruns.worker.runtime import is_transient


class CardDeclined(Exception):
    pass


def _raise_deep(depth: int) -> None:
    if depth == 0:
        raise CardDeclined("card 4242 declined")
    _raise_deep(depth - 1)


def test_error_object_shape() -> None:
    try:
        _raise_deep(30)
    except CardDeclined as exc:
        error = error_from_exception(exc)
    assert error["type"] == f"{__name__}.CardDeclined"
    assert error["message"] == "card 4242 declined"
    assert error["non_retryable"] is False
    assert error["traceback"].rstrip().endswith("CardDeclined: card 4242 declined")
    # Only the last frames are kept.
    assert error["traceback"].count("_raise_deep") <= 10


def test_builtin_types_are_qualified() -> None:
    assert type_name(ValueError("x")) == "builtins.ValueError"


def test_non_retryable_error_is_flagged() -> None:
    class Fatal(NonRetryableError):
        pass

    assert error_from_exception(Fatal("no"))["non_retryable"] is True
    assert error_from_exception(ValueError("no"), non_retryable=True)["non_retryable"] is True


def test_huge_messages_and_broken_str_are_bounded() -> None:
    error = error_from_exception(ValueError("x" * 100_000))
    assert len(error["message"]) <= MAX_MESSAGE_CHARS
    assert len(error["traceback"]) <= MAX_TRACEBACK_CHARS

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("boom")

    error = error_from_exception(Broken())
    assert error["message"] == "<unprintable Broken: RuntimeError: boom>"

    class Exits(Exception):
        # Any exception __str__ raises, a BaseException too, fails the attempt, not the worker.
        def __str__(self) -> str:
            raise SystemExit(3)

    error = error_from_exception(Exits())
    assert error["message"] == "<unprintable Exits: SystemExit: 3>"
    assert error["type"].endswith("Exits")


@given(st.integers(min_value=1, max_value=100_000), st.floats(min_value=0, max_value=0.999))
def test_backoff_stays_within_bounds(failures: int, rng_value: float) -> None:
    delay = backoff_delay(failures, rng_value)
    assert 0.05 <= delay <= MAX_DELAY


def test_backoff_grows_then_caps_and_resets() -> None:
    backoff = Backoff(rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    assert delays[0] < 0.15
    assert delays[1] > delays[0]
    assert all(d <= MAX_DELAY for d in delays)
    assert delays[-1] > 3.5
    backoff.reset()
    assert backoff.next_delay() < 0.15


def test_which_refusals_are_retried() -> None:
    assert is_transient(ServerUnavailable("down"))
    assert is_transient(ResourceExhausted("too many pending tasks"))
    assert not is_transient(ResourceExhausted("payload too large: 10 MB > 2 MiB"))
    assert is_transient(RpcError("oops", status="INTERNAL"))
    assert not is_transient(RpcError("bad token", status="UNAUTHENTICATED"))
    assert not is_transient(FailedPrecondition("stale lease"))
    assert not is_transient(InvalidArgument("bad"))


@given(st.text(), st.text())
def test_an_activity_failure_can_always_be_reported(message: str, type_part: str) -> None:
    """Whatever text an activity's exception carries (a lone surrogate from os.fsdecode
    included), its error object encodes: the worker's FailActivityTask used to fail to encode
    it (PayloadError), and the attempt went unreported until a timeout."""
    error_type = type("E" + type_part.encode("utf-8", "replace").hex(), (Exception,), {})
    for exc in (ValueError(message), error_type(message)):
        error = error_from_exception(exc)
        assert payload.decode(payload.encode(error, what="error")) == error


def test_a_lone_surrogate_in_a_failure_message_is_written_as_its_escape() -> None:
    error = error_from_exception(ValueError(os.fsdecode(b"caf\xe9")))
    assert error["message"] == "caf\\udce9"
