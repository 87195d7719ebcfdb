"""Reconnect backoff for the worker's calls to the control plane.

While the control plane is unreachable, every loop of the worker waits a little longer before
trying again (0.1 s doubling up to 5 s, with jitter so that a fleet of workers does not reconnect
in lockstep after a restart). This module only computes delays; the caller sleeps.
"""

from __future__ import annotations

import math
import random

import attrs

__all__ = ["INITIAL_DELAY", "MAX_DELAY", "Backoff", "backoff_delay"]

INITIAL_DELAY = 0.1
MAX_DELAY = 5.0


def backoff_delay(
    failures: int,
    rng_value: float,
    *,
    initial: float = INITIAL_DELAY,
    maximum: float = MAX_DELAY,
    multiplier: float = 2.0,
    jitter: float = 0.2,
) -> float:
    """Return how long to wait after ``failures`` consecutive failures.

    Args:
        failures: consecutive failures so far (1 for the first).
        rng_value: a uniform random number in [0, 1).
        initial: the delay after the first failure.
        maximum: the largest delay, jitter included.
        multiplier: growth factor per failure.
        jitter: relative spread, 0.2 meaning ±20 %.

    Returns:
        ``initial * multiplier**(failures-1)``, capped at ``maximum``, spread by the jitter,
        never below half of ``initial`` nor above ``maximum``.
    """
    exponent = max(0, failures - 1)
    # Work in logarithms so a long outage (thousands of failures) cannot overflow.
    log_base = math.log(initial) + exponent * math.log(multiplier)
    base = maximum if log_base >= math.log(maximum) else math.exp(log_base)
    delay = base * (1.0 + jitter * (2.0 * rng_value - 1.0))
    return max(initial / 2, min(maximum, delay))


@attrs.define
class Backoff:
    """Consecutive-failure counter of one loop; `reset` after any success."""

    rng: random.Random = attrs.field(factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        """Count one more failure and return the delay before the next try."""
        self.failures += 1
        return backoff_delay(self.failures, self.rng.random())

    def reset(self) -> None:
        """Forget the failures (the control plane answered)."""
        self.failures = 0
