"""Retry policy and the arithmetic of retrying an activity: how long to wait, and whether to.

This module decides; it does not wait, schedule or read the clock. Randomness for jitter comes in
as a number in [0, 1) drawn by the caller, so every result is a pure function of its arguments
and the control plane can record exactly the delay it chose. Nothing here may perform I/O or
import trio, asyncio, SQL or protobuf code.

Attempts are numbered from 1: attempt 1 is the first execution, and ``max_attempts`` counts all
executions, not just the retries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from everruns.domain.limits import (
    MAX_INT4,
    MAX_SECONDS,
    MAX_SECONDS_TEXT,
    is_delay,
    is_finite_number,
)
from everruns.errors import InvalidArgument

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "RetryDecision",
    "RetryPolicy",
    "backoff_delay",
    "decide_retry",
    "is_non_retryable_type",
    "retry_after_of",
    "should_retry",
]


def _check_max_attempts(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    # Attempts are counted in a PostgreSQL integer column.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT4:
        raise InvalidArgument(
            f"retry policy max_attempts must be an integer from 1 to {MAX_INT4}, got {value!r}"
        )


def _check_positive(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    # The bound keeps `now() + delay` inside PostgreSQL's timestamps (NaN compares false).
    if not _is_number(value) or not 0 < value <= MAX_SECONDS:
        raise InvalidArgument(
            f"retry policy {attr.name} must be a number of seconds > 0 and at most "
            f"{MAX_SECONDS_TEXT}, got {value!r}"
        )


def _check_coefficient(_inst: object, _attr: attrs.Attribute[float], value: float) -> None:
    if not is_finite_number(value) or value < 1:
        raise InvalidArgument(
            f"retry policy backoff_coefficient must be a finite number >= 1, got {value!r}"
        )


def _check_jitter(_inst: object, _attr: attrs.Attribute[float], value: float) -> None:
    if not _is_number(value) or not (0 <= value < 1):
        raise InvalidArgument(f"retry policy jitter must be a number in [0, 1), got {value!r}")


def _check_error_types(
    _inst: object, _attr: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    for item in value:
        if not isinstance(item, str) or not item or item.strip() != item:
            raise InvalidArgument(
                "retry policy non_retryable_error_types must hold non-empty type names "
                f"without surrounding spaces, got {item!r}"
            )


def _is_number(value: object) -> bool:
    # bool is an int subclass; True as a coefficient is a caller bug, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    # A bare string is iterable too; tuple("ValueError") would silently list single letters.
    if isinstance(value, str):
        raise InvalidArgument(
            "retry policy non_retryable_error_types must be a sequence of type names, "
            f"not the single string {value!r}"
        )
    return tuple(value)


@attrs.frozen
class RetryPolicy:
    """How an activity is retried.

    Attributes:
        max_attempts: executions in total, the first included (from 1 to `MAX_INT4`).
        initial_interval: seconds before the first retry (> 0; like ``maximum_interval``, at
            most `MAX_SECONDS`, 100 years).
        backoff_coefficient: factor applied to the interval after each failure (>= 1).
        maximum_interval: upper bound of any delay, jitter included (>= initial_interval).
        jitter: relative spread applied to each delay, in [0, 1); 0.1 means ±10 %.
        non_retryable_error_types: error type names (bare like ``"ValueError"`` or qualified
            like ``"shop.errors.CardDeclined"``) that fail the activity at once.

    Raises:
        InvalidArgument: a field is out of range; the message names it.
    """

    max_attempts: int = attrs.field(default=5, validator=_check_max_attempts)
    initial_interval: float = attrs.field(default=1.0, validator=_check_positive)
    backoff_coefficient: float = attrs.field(default=2.0, validator=_check_coefficient)
    maximum_interval: float = attrs.field(default=60.0, validator=_check_positive)
    jitter: float = attrs.field(default=0.1, validator=_check_jitter)
    non_retryable_error_types: tuple[str, ...] = attrs.field(
        default=(), converter=_to_str_tuple, validator=_check_error_types
    )

    def __attrs_post_init__(self) -> None:
        if self.maximum_interval < self.initial_interval:
            raise InvalidArgument(
                f"retry policy maximum_interval ({self.maximum_interval!r}) must be >= "
                f"initial_interval ({self.initial_interval!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the policy as a JSON-safe dict (the shape stored in ``retry_policy``).

        Returns:
            A dict with every field; the error types as a list.
        """
        return {
            "max_attempts": self.max_attempts,
            "initial_interval": float(self.initial_interval),
            "backoff_coefficient": float(self.backoff_coefficient),
            "maximum_interval": float(self.maximum_interval),
            "jitter": float(self.jitter),
            "non_retryable_error_types": list(self.non_retryable_error_types),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetryPolicy:
        """Build a policy from a dict such as :meth:`to_dict` returns.

        Missing keys take their defaults, so ``{}`` (the column default) is the default policy.

        Args:
            d: the decoded JSON object.

        Returns:
            The policy.

        Raises:
            InvalidArgument: ``d`` is not a mapping, has an unknown key, a value of the wrong
                type, or a value out of range.
        """
        if not isinstance(d, Mapping):
            raise InvalidArgument(f"retry policy must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - _FIELD_NAMES)
        if unknown:
            raise InvalidArgument(
                f"retry policy has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(_FIELD_NAMES))}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "max_attempts":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise InvalidArgument(
                        f"retry policy max_attempts must be an integer, got {type(value).__name__}"
                    )
            elif key == "non_retryable_error_types":
                if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, str) for v in value
                ):
                    raise InvalidArgument(
                        "retry policy non_retryable_error_types must be a list of strings"
                    )
            elif not _is_number(value):
                raise InvalidArgument(
                    f"retry policy {key} must be a number, got {type(value).__name__}"
                )
            kwargs[key] = value
        return cls(**kwargs)


_FIELD_NAMES = frozenset(a.name for a in attrs.fields(RetryPolicy))

DEFAULT_RETRY_POLICY = RetryPolicy()
"""5 attempts, 1 s then doubling up to 60 s, ±10 % jitter: the defaults of the original engine."""


@attrs.frozen
class RetryDecision:
    """What to do after a failed attempt.

    Attributes:
        retry: whether another attempt is made.
        delay: seconds to wait before it (0.0 when ``retry`` is false).
    """

    retry: bool
    delay: float


def backoff_delay(policy: RetryPolicy, attempt: int, rng_value: float) -> float:
    """Return the seconds to wait before attempt ``attempt + 1``, after ``attempt`` failed.

    The base delay is ``initial_interval * backoff_coefficient ** (attempt - 1)``, capped at
    ``maximum_interval``. Jitter then scales it by ``1 + jitter * (2 * rng_value - 1)`` (so
    ``rng_value`` 0.5 means no change) and the result is capped at ``maximum_interval`` again:
    the cap is a promise to the operator, so it holds after jitter too. Once the cap is reached,
    jitter therefore only shortens delays. The result is never negative, and without jitter it is
    non-decreasing in ``attempt``.

    Args:
        policy: the retry policy.
        attempt: the number of the attempt that failed, from 1.
        rng_value: a uniform random number in [0, 1) drawn by the caller.

    Returns:
        The delay in seconds, in ``[0, policy.maximum_interval]``.

    Raises:
        InvalidArgument: ``attempt`` < 1 or ``rng_value`` outside [0, 1).
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise InvalidArgument(f"attempt must be an integer >= 1, got {attempt!r}")
    if not _is_number(rng_value) or not (0.0 <= rng_value < 1.0):
        raise InvalidArgument(f"rng_value must be a number in [0, 1), got {rng_value!r}")
    cap = policy.maximum_interval
    try:
        # A float product past the float range is inf, which the cap absorbs.
        base = min(cap, policy.initial_interval * policy.backoff_coefficient ** (attempt - 1))
    except OverflowError:
        # The power alone overflows (a huge attempt number); the product may still be below
        # the cap when the initial interval is tiny, so compare in log space.
        growth = (attempt - 1) * math.log(policy.backoff_coefficient)
        if growth >= math.log(cap) - math.log(policy.initial_interval):
            base = cap
        else:
            base = min(cap, math.exp(math.log(policy.initial_interval) + growth))
    delay = base * (1.0 + policy.jitter * (2.0 * rng_value - 1.0))
    return max(0.0, min(cap, delay))


def _bare(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def is_non_retryable_type(policy: RetryPolicy, error_type: str) -> bool:
    """Return whether ``error_type`` is listed in ``policy.non_retryable_error_types``.

    Names match when they are equal, or when either side is bare (has no dot) and the last
    dotted components are equal: listing ``"ValueError"`` covers ``"builtins.ValueError"``, and
    a bare reported ``"CardDeclined"`` is covered by ``"shop.errors.CardDeclined"``. Two
    qualified names in different modules never match.

    Args:
        policy: the retry policy.
        error_type: the failed attempt's error type name, bare or qualified.

    Returns:
        True when the type is listed.
    """
    bare = _bare(error_type)
    for listed in policy.non_retryable_error_types:
        if listed == error_type:
            return True
        if ("." not in listed or "." not in error_type) and _bare(listed) == bare:
            return True
    return False


def should_retry(policy: RetryPolicy, attempt: int, error_type: str, non_retryable: bool) -> bool:
    """Return whether another attempt follows the failure of attempt ``attempt``.

    Args:
        policy: the retry policy.
        attempt: the number of the attempt that failed, from 1.
        error_type: the error's type name, bare or qualified (see :func:`is_non_retryable_type`).
        non_retryable: the error was flagged non-retryable (e.g. ``NonRetryableError``).

    Returns:
        False when the attempts are exhausted (``attempt >= max_attempts``), when the error is
        flagged non-retryable, or when its type is listed as non-retryable; True otherwise.
    """
    if attempt >= policy.max_attempts or non_retryable:
        return False
    return not is_non_retryable_type(policy, error_type)


def retry_after_of(error: Mapping[str, Any]) -> float | None:
    """Return the least delay a failed attempt's error object asks for before the next one
    (its ``retry_after``, set by `everruns.RetryAfter`), or None when it asks for none.

    A value that is not a number of seconds from 0 to `MAX_SECONDS` (a hand-made error
    object's) asks for nothing: the error is recorded as it came, and the backoff applies.
    """
    value = error.get("retry_after")
    return float(value) if is_delay(value) else None


def decide_retry(
    policy: RetryPolicy,
    attempt: int,
    error_type: str,
    non_retryable: bool,
    rng_value: float,
    retry_after: float | None = None,
) -> RetryDecision:
    """Decide whether and when to retry after attempt ``attempt`` failed.

    Args:
        policy: the retry policy.
        attempt: the number of the attempt that failed, from 1.
        error_type: the error's type name, bare or qualified.
        non_retryable: the error was flagged non-retryable.
        rng_value: a uniform random number in [0, 1) drawn by the caller.
        retry_after: the least delay the error asked for (`retry_after_of`), if any. It
            never makes a retry that would not happen otherwise, and it may exceed the
            policy's ``maximum_interval``: a service that says when to come back is not
            asked earlier.

    Returns:
        ``RetryDecision(retry=True, delay=...)``, the delay being `backoff_delay`'s or
        ``retry_after`` when that is larger; or ``RetryDecision(False, 0.0)``.

    Raises:
        InvalidArgument: ``attempt`` < 1, ``rng_value`` outside [0, 1), or ``retry_after``
            not a number of seconds from 0 to `MAX_SECONDS`.
    """
    delay = backoff_delay(policy, attempt, rng_value)
    if retry_after is not None:
        if not is_delay(retry_after):
            raise InvalidArgument(
                f"retry_after must be a number of seconds from 0 to {MAX_SECONDS_TEXT}, "
                f"got {retry_after!r}"
            )
        delay = max(delay, float(retry_after))
    if not should_retry(policy, attempt, error_type, non_retryable):
        return RetryDecision(retry=False, delay=0.0)
    return RetryDecision(retry=True, delay=delay)
