"""Circuit-breaker transitions: pure functions from (state, config, now) to the next state.

One breaker exists per key (the activity type by default). The control plane reads the row with
``SELECT ... FOR UPDATE``, calls one function here and writes the result back in the same
transaction, so these functions must be total: on every valid :class:`BreakerState` and every
``now`` they return a valid state and never raise — even when the clock stepped backwards, a
result arrives late, or the configuration changed since the row was written. Nothing here reads
the clock, performs I/O, or imports trio, asyncio, SQL or protobuf code. All datetimes given to
one breaker must be timezone-aware (the store's ``timestamptz``); mixing naive and aware ones is
the one caller bug these functions do not absorb.

The life of a breaker::

    closed --(failure_threshold failures within window)--> open
    open --(open_duration elapsed, on the next admit)--> half_open
    half_open --(success_threshold successes)--> closed
    half_open --(a probe fails)--> open (with a new opened_at)

Decisions that are easy to get wrong:

- The window *slides*: a breaker opens exactly when its last ``failure_threshold`` failures
  while closed fit in ``window`` seconds. The row keeps the times of the failures still in the
  window (``recent_failures``, at most ``failure_threshold - 1`` of them once written back);
  ``failure_count`` is how many there are, and an operator who sets it lower (or to 0) by SQL
  forgets the older ones.
- A success while closed does not reset the failure count: failures are counted per window, and
  a flaky dependency that fails four times in five within a minute should still trip it.
- open becomes half_open lazily, in :func:`admit`; no timer is needed. Results arriving while
  open (tasks handed out before it opened) are recorded as ``last_failure_at`` but move nothing.
- In half_open every task handed out is a probe; a probe's verdict (success or failure) frees
  its slot, and :func:`release_probe` frees the slot of a probe that ended without one (reclaimed,
  cancelled, timed out by the server). A task claimed before the breaker last opened is no probe
  (:func:`is_probe`): its failure while half-open moves nothing, as one while open does, so a
  call that hung through the outage and times out late cannot reopen the breaker over its probe.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Literal, get_args

import attrs

from everruns.domain.limits import is_finite_number
from everruns.errors import InvalidArgument

__all__ = [
    "BreakerConfig",
    "BreakerState",
    "BreakerStateName",
    "admit",
    "is_probe",
    "on_failure",
    "on_success",
    "probe_at",
    "release_probe",
    "reset",
]

BreakerStateName = Literal["closed", "open", "half_open"]
_STATE_NAMES: frozenset[str] = frozenset(get_args(BreakerStateName))


def _positive_int(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"breaker {attr.name} must be an integer >= 1, got {value!r}")


def _non_negative_int(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"breaker {attr.name} must be an integer >= 0, got {value!r}")


def _seconds(*, allow_zero: bool) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
        ok = is_finite_number(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            bound = ">= 0" if allow_zero else "> 0"
            raise InvalidArgument(
                f"breaker {attr.name} must be a finite number of seconds {bound}, got {value!r}"
            )

    return check


@attrs.frozen
class BreakerConfig:
    """Thresholds of a circuit breaker.

    Attributes:
        failure_threshold: failures within ``window`` that open the breaker (>= 1).
        window: seconds over which failures are counted (> 0).
        open_duration: seconds an open breaker refuses work before probing (>= 0).
        half_open_max_probes: probe tasks allowed out at once while half-open (>= 1).
        success_threshold: probe successes that close the breaker again (>= 1).

    Raises:
        InvalidArgument: a field is out of range; the message names it.
    """

    failure_threshold: int = attrs.field(default=5, validator=_positive_int)
    window: float = attrs.field(default=60.0, validator=_seconds(allow_zero=False))
    open_duration: float = attrs.field(default=30.0, validator=_seconds(allow_zero=True))
    half_open_max_probes: int = attrs.field(default=1, validator=_positive_int)
    success_threshold: int = attrs.field(default=2, validator=_positive_int)


def _check_state_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in _STATE_NAMES:
        raise InvalidArgument(
            f"breaker state must be one of closed, open, half_open, got {value!r}"
        )


@attrs.frozen
class BreakerState:
    """One breaker's row, as a value.

    Attributes:
        key: what the breaker guards (the activity type by default).
        state: ``closed``, ``open`` or ``half_open``.
        failure_count: failures in the window (while closed: ``len(recent_failures)``); while
            open or half-open, the failures that tripped it plus any recorded since
            (informational).
        success_count: probe successes since the breaker went half-open.
        probes_in_flight: probe tasks handed out and not yet finished (0 unless half-open).
        window_started_at: the oldest failure still in the window; None when there is none.
        opened_at: when the breaker last opened; set exactly when it is not closed.
        last_failure_at: the most recent failure, for operators.
        recent_failures: while closed, the times of the failures still in the window, in the
            order they were recorded (empty once it opens).

    Raises:
        InvalidArgument: a count is negative, the state is unknown, or ``opened_at`` disagrees
            with the state.
    """

    key: str
    state: BreakerStateName = attrs.field(default="closed", validator=_check_state_name)
    failure_count: int = attrs.field(default=0, validator=_non_negative_int)
    success_count: int = attrs.field(default=0, validator=_non_negative_int)
    probes_in_flight: int = attrs.field(default=0, validator=_non_negative_int)
    window_started_at: dt.datetime | None = None
    opened_at: dt.datetime | None = None
    last_failure_at: dt.datetime | None = None
    recent_failures: tuple[dt.datetime, ...] = ()

    def __attrs_post_init__(self) -> None:
        # Mirrors the table's CHECK ((state = 'closed') = (opened_at IS NULL)).
        if (self.state == "closed") != (self.opened_at is None):
            raise InvalidArgument(
                f"breaker {self.key!r}: opened_at must be set exactly when the state is not "
                f"closed (state={self.state!r}, opened_at={self.opened_at!r})"
            )


def _elapsed(since: dt.datetime, now: dt.datetime) -> float:
    return (now - since).total_seconds()


def _open(state: BreakerState, now: dt.datetime, failure_count: int) -> BreakerState:
    return attrs.evolve(
        state,
        state="open",
        failure_count=failure_count,
        success_count=0,
        probes_in_flight=0,
        opened_at=now,
        last_failure_at=now,
        recent_failures=(),
    )


def reset(key: str) -> BreakerState:
    """Return a fresh, closed breaker for ``key`` (also what an operator's reset writes).

    Args:
        key: the breaker key.

    Returns:
        A closed state with every count at zero and no timestamps.
    """
    return BreakerState(key=key)


def is_probe(state: BreakerState, claimed_at: dt.datetime | None) -> bool:
    """Whether a task claimed at ``claimed_at`` is a probe of this breaker: it is half-open and
    the task was handed out since the breaker last opened (the store's ``release_probe`` and
    ``complete_activities`` statements apply the same rule in SQL).

    Args:
        state: the current state.
        claimed_at: when the task was claimed; None for one never handed out.

    Returns:
        True only for a half-open breaker and a task claimed at or after its ``opened_at``.
        Never raises.
    """
    return (
        state.state == "half_open"
        and state.opened_at is not None
        and claimed_at is not None
        and state.opened_at <= claimed_at
    )


def on_failure(
    state: BreakerState, cfg: BreakerConfig, now: dt.datetime, *, claimed_at: dt.datetime | None
) -> BreakerState:
    """Record a failed task of this key.

    Closed: counts the failure with those of the last ``cfg.window`` seconds and opens the
    breaker when they reach ``cfg.failure_threshold``. Half-open, from a probe
    (:func:`is_probe`): the probe failed, so the breaker re-opens with ``opened_at = now``.
    Open, or half-open from a task claimed before the breaker opened: only ``failure_count``
    and ``last_failure_at`` change; a late failure neither extends the open period nor takes
    a probe's slot or verdict.

    Args:
        state: the current state.
        cfg: the breaker's configuration.
        now: the time of the failure.
        claimed_at: when the failed task was claimed (None: never handed out).

    Returns:
        The next state. Never raises.
    """
    if is_probe(state, claimed_at):
        return _open(state, now, state.failure_count + 1)
    if state.state != "closed":
        return attrs.evolve(state, failure_count=state.failure_count + 1, last_failure_at=now)
    # The failures still in the window: no more than failure_count says (an operator's SQL may
    # have lowered it), and one fewer than the threshold is all a decision needs. A clock that
    # stepped backwards (a failure "after" now) keeps it: it is recent.
    keep = min(state.failure_count, cfg.failure_threshold - 1)
    earlier = state.recent_failures[len(state.recent_failures) - keep :] if keep > 0 else ()
    recent = (*(t for t in earlier if _elapsed(t, now) <= cfg.window), now)
    start = min(recent)
    if len(recent) >= cfg.failure_threshold:
        return _open(attrs.evolve(state, window_started_at=start), now, len(recent))
    return attrs.evolve(
        state,
        failure_count=len(recent),
        window_started_at=start,
        last_failure_at=now,
        recent_failures=recent,
    )


def on_success(state: BreakerState, cfg: BreakerConfig, now: dt.datetime) -> BreakerState:
    """Record a successful task of this key.

    Half-open: frees the probe's slot and counts the success; ``cfg.success_threshold``
    successes close the breaker and clear its window. Closed or open: nothing changes (see the
    module docstring for why a success does not reset a closed breaker's count).

    Args:
        state: the current state.
        cfg: the breaker's configuration.
        now: the time of the success (unused today; kept so every transition has one shape).

    Returns:
        The next state. Never raises.
    """
    if state.state != "half_open":
        return state
    successes = state.success_count + 1
    if successes >= cfg.success_threshold:
        return attrs.evolve(
            state,
            state="closed",
            failure_count=0,
            success_count=0,
            probes_in_flight=0,
            window_started_at=None,
            opened_at=None,
            recent_failures=(),
        )
    return attrs.evolve(
        state, success_count=successes, probes_in_flight=max(0, state.probes_in_flight - 1)
    )


def admit(state: BreakerState, cfg: BreakerConfig, now: dt.datetime) -> tuple[bool, BreakerState]:
    """Decide whether a task of this key may be handed out now.

    Closed: always. Open: not until ``cfg.open_duration`` seconds after ``opened_at``; from then
    on the breaker is half-open. Half-open: while fewer than ``cfg.half_open_max_probes`` probes
    are in flight, and the admitted task counts as one more.

    Args:
        state: the current state.
        cfg: the breaker's configuration.
        now: the time of the hand-out.

    Returns:
        ``(admitted, next_state)``; write ``next_state`` back even when not admitted, since an
        open breaker may have become half-open. Never raises.
    """
    if state.state == "closed":
        return True, state
    if state.state == "open":
        # BreakerState guarantees opened_at here; the None test only narrows the type.
        if state.opened_at is not None and _elapsed(state.opened_at, now) < cfg.open_duration:
            return False, state
        state = attrs.evolve(state, state="half_open", success_count=0, probes_in_flight=0)
    if state.probes_in_flight >= cfg.half_open_max_probes:
        return False, state
    return True, attrs.evolve(state, probes_in_flight=state.probes_in_flight + 1)


def release_probe(state: BreakerState, cfg: BreakerConfig, now: dt.datetime) -> BreakerState:
    """Free the slot of a task that ended without a verdict (reclaimed, cancelled, timed out).

    Only a half-open breaker has slots; in any other state this returns ``state`` unchanged.

    Args:
        state: the current state.
        cfg: the breaker's configuration (unused; kept so every transition has one shape).
        now: the time of the release (unused; likewise).

    Returns:
        The next state. Never raises.
    """
    if state.state != "half_open":
        return state
    return attrs.evolve(state, probes_in_flight=max(0, state.probes_in_flight - 1))


def probe_at(state: BreakerState, cfg: BreakerConfig) -> dt.datetime | None:
    """Return when an open breaker will admit its first probe, for a claimer that must wait.

    Args:
        state: the current state.
        cfg: the breaker's configuration.

    Returns:
        ``opened_at + open_duration`` when open; None when closed or half-open (whether a
        half-open breaker admits depends on probes finishing, not on time). Never raises; a
        moment past ``datetime.max`` is reported as ``datetime.max`` in ``opened_at``'s zone.
    """
    if state.state != "open" or state.opened_at is None:
        return None
    try:
        return state.opened_at + dt.timedelta(seconds=cfg.open_duration)
    except OverflowError:
        return dt.datetime.max.replace(tzinfo=state.opened_at.tzinfo)


def probe_budget(state: BreakerState, cfg: BreakerConfig, now: dt.datetime) -> int | None:
    """How many tasks of this key may be handed out now, as `admit` would decide.

    Returns:
        None when the breaker is closed (no limit), 0 while it refuses work, else the number of
        probes a half-open (or due-to-half-open) breaker may still admit. Never raises.
    """
    if state.state == "closed":
        return None
    admitted, probe_state = admit(state, cfg, now)
    if not admitted:
        return 0
    return max(0, cfg.half_open_max_probes - probe_state.probes_in_flight + 1)
