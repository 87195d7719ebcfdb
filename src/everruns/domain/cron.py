"""Recurring schedules: check a cron or ``@every`` spec, and say when it fires.

A spec is the text a user writes for a schedule: five cron fields (``minute hour day-of-month
month day-of-week``), an alias such as ``@daily``, or ``@every <duration>`` (``@every 1h30m``).
This module parses it once and computes firing times as pure functions of the spec and a
moment; it does not read the clock, sleep, store anything, or import trio, asyncio, SQL or
protobuf code. All arithmetic is in UTC: there are no time zones and no daylight saving time,
so ``0 9 * * *`` fires at 09:00 UTC every day whatever zone a moment is given in, and every
control plane computes the same times from the same spec. A cron spec fires at whole minutes;
``@every`` fires at the whole multiples of its interval counted from the Unix epoch
(1970-01-01T00:00:00Z), not from when the schedule was made. `Spec.matches` is true at exactly
those instants and `Spec.next_after` returns the first one strictly after a moment.

Days follow Vixie cron: when the day-of-month or the day-of-week field starts with ``*``, a day
must be allowed by both fields (so a plain ``*`` leaves the other field alone in charge, and
``*/2`` with ``mon`` means odd-numbered Mondays); when neither starts with ``*``, either field
allowing the day is enough (``0 0 13 * fri`` fires on every 13th and on every Friday).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from everruns.domain.limits import shown
from everruns.errors import InvalidArgument

__all__ = ["MAX_SPEC_LENGTH", "SCHEDULE_OVERLAPS", "Spec", "check_overlap", "parse_spec"]

MAX_SPEC_LENGTH: Final = 200
"""The longest spec accepted, in characters, surrounding spaces included."""

SCHEDULE_OVERLAPS: Final = ("skip", "allow")
"""What a schedule does when it fires while the run it started last is still open: skip the
firing (the default), or start another run beside it."""


def check_overlap(value: object) -> str:
    """Return ``value`` if it is one of `SCHEDULE_OVERLAPS`.

    Raises:
        InvalidArgument: it is not; the one-line message lists them.
    """
    if not isinstance(value, str) or value not in SCHEDULE_OVERLAPS:
        got = shown(value) if isinstance(value, str) else repr(value)
        raise InvalidArgument(f"overlap must be one of {', '.join(SCHEDULE_OVERLAPS)}, got {got}")
    return value


_MAX_EVERY_SECONDS: Final = 366 * 86400
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MINUTE: Final = dt.timedelta(minutes=1)

_SHAPES: Final = (
    "five fields (minute hour day-of-month month day-of-week), an alias such as @daily, "
    "or @every <duration>"
)
_ALIASES: Final[Mapping[str, str]] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_ALLOWED_CHARACTER: Final = re.compile(r"[0-9a-zA-Z*/,@\- \t\n\r\f\v]", re.ASCII)
_NUMBER: Final = re.compile(r"[0-9]+", re.ASCII)
_DURATION: Final = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", re.ASCII)
_DURATION_UNITS: Final = (86400, 3600, 60, 1)

# Bits 0, 7, 14, 21 and 28: a week's pattern of 7 bits times this repeats it over 35 days.
_WEEKLY: Final = sum(1 << (7 * week) for week in range(5))

_Error = Callable[[str], InvalidArgument]


@attrs.frozen
class _Field:
    """One of the five cron fields: its name in messages, its range and its names."""

    name: str
    low: int
    high: int
    names: Mapping[str, int] = attrs.field(factory=dict)

    def spelling(self) -> str:
        """How a value of this field may be written, for messages."""
        if not self.names:
            return "a number"
        first, *_, last = self.names
        return f"a number or a name {first}-{last}"


_MONTH_NAMES: Final = (
    *("jan", "feb", "mar", "apr", "may", "jun"),
    *("jul", "aug", "sep", "oct", "nov", "dec"),
)
_DAY_NAMES: Final = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

_FIELDS: Final = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, {n: i for i, n in enumerate(_MONTH_NAMES, start=1)}),
    # 7 is Sunday too, as 0 is: folded into bit 0 once the field is read.
    _Field("day-of-week", 0, 7, {n: i for i, n in enumerate(_DAY_NAMES)}),
)


def _next_bit(mask: int, at: int) -> int | None:
    """The lowest bit set in ``mask`` at or above bit ``at``, or None."""
    rest = mask >> at << at
    return (rest & -rest).bit_length() - 1 if rest else None


def _lowest_bit(mask: int) -> int:
    """The lowest bit set in ``mask``, which is not 0."""
    return (mask & -mask).bit_length() - 1


def _clipped(token: str) -> str:
    """A token of digits, letters and dashes as a message shows it: at most 20 characters."""
    return token if len(token) <= 20 else f"{token[:20]}..."


def _month_length(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


@attrs.frozen
class _Cron:
    """The five fields as bit sets: bit n of ``minutes`` set means minute n is allowed, and so on
    for hours (0-23), days of the month (1-31), months (1-12) and weekdays (0 Sunday to 6)."""

    minutes: int
    hours: int
    days: int
    months: int
    weekdays: int
    either_day: bool  # neither day field starts with '*': a day matching one of them will do

    def days_in(self, year: int, month: int) -> int:
        """The bit set of the days of ``month`` this spec allows (bit d for day d)."""
        # Day 1 of year 1 (ordinal 1) was a Monday, so ordinal % 7 is cron's weekday, 0 Sunday.
        first = dt.date(year, month, 1).toordinal() % 7
        return self.days_of_shape(first, _month_length(year, month))

    def days_of_shape(self, first: int, length: int) -> int:
        """The bit set of the days this spec allows in a month of ``length`` days whose 1st
        falls on weekday ``first`` (0 Sunday): all that decides it, the month's number aside."""
        # Rotated so that bit i says whether day i + 1 has an allowed weekday, then repeated.
        week = ((self.weekdays >> first) | (self.weekdays << (7 - first))) & 0x7F
        by_weekday = (week * _WEEKLY) << 1
        allowed = self.days | by_weekday if self.either_day else self.days & by_weekday
        return allowed & ((2 << length) - 2)

    def ever_fires(self) -> bool:
        """Whether any day of any year is allowed (a day allowed has a firing: the minute and
        hour sets are never empty).

        The Gregorian calendar repeats every 400 years, which are 146,097 days or exactly
        20,871 weeks, so searching those 400 years would be a bound that is provably enough. It
        takes 4,800 months, though, and the days a spec allows in a month depend only on the
        month, its length and the weekday of its 1st. Over the 400 years every month starts on
        every weekday, and February does so both in leap years and in common years (the test
        checks the 91 combinations occur), so the shapes tried here, at most 12 months x 7
        weekdays x 2 lengths for February, are exactly the months that occur. Firings can be far
        apart all the same: 29 February on a Sunday (``0 0 29 2 */7``) comes every 28 years
        within a century but 40 years apart across 2100, which is not a leap year.
        """
        for month in range(1, 13):
            if self.months >> month & 1:
                lengths = (28, 29) if month == 2 else (_month_length(1, month),)
                for length in lengths:
                    if any(self.days_of_shape(first, length) for first in range(7)):
                        return True
        return False

    def matches(self, moment: dt.datetime) -> bool:
        return (
            moment.second == 0
            and moment.microsecond == 0
            and self.minutes >> moment.minute & 1 == 1
            and self.hours >> moment.hour & 1 == 1
            and self.months >> moment.month & 1 == 1
            and self.days_in(moment.year, moment.month) >> moment.day & 1 == 1
        )

    def first_from(self, start: dt.datetime) -> dt.datetime | None:
        """The first firing at or after ``start`` (a UTC whole minute), or None if there is
        none before year 10000, where datetimes end."""
        year, month, day = start.year, start.month, start.day
        hour, minute = start.hour, start.minute
        # Each pass either returns or moves the candidate strictly forward to the start of the
        # next allowed month, day, hour or minute; values one past the end of their unit (day 32,
        # hour 24, month 13) are carried by the next pass. A year with no allowed day costs a pass
        # per allowed month, so even the sparsest spec takes a few dozen passes.
        while True:
            allowed_month = _next_bit(self.months, month)
            if allowed_month is None:
                year, month, day, hour, minute = year + 1, _lowest_bit(self.months), 1, 0, 0
            elif allowed_month != month:
                month, day, hour, minute = allowed_month, 1, 0, 0
            if year > dt.MAXYEAR:
                return None
            allowed_day = _next_bit(self.days_in(year, month), day)
            if allowed_day is None:
                month, day, hour, minute = month + 1, 1, 0, 0
                continue
            if allowed_day != day:
                day, hour, minute = allowed_day, 0, 0
            allowed_hour = _next_bit(self.hours, hour)
            if allowed_hour is None:
                day, hour, minute = day + 1, 0, 0
                continue
            if allowed_hour != hour:
                hour, minute = allowed_hour, 0
            allowed_minute = _next_bit(self.minutes, minute)
            if allowed_minute is None:
                hour, minute = hour + 1, 0
                continue
            return dt.datetime(year, month, day, hour, allowed_minute, tzinfo=dt.UTC)

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        try:
            start = moment.replace(second=0, microsecond=0) + _MINUTE
        except OverflowError:
            start = None
        found = None if start is None else self.first_from(start)
        if found is None:
            raise ValueError(f"the spec does not fire after {moment.isoformat()} before year 10000")
        return found


@attrs.frozen
class _Every:
    """``@every``: fires at the whole multiples of ``seconds`` since the Unix epoch."""

    seconds: int

    def matches(self, moment: dt.datetime) -> bool:
        return (moment - _EPOCH) % dt.timedelta(seconds=self.seconds) == dt.timedelta(0)

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        interval = dt.timedelta(seconds=self.seconds)
        # Floor division of timedeltas is exact (whole microseconds), before 1970 too.
        count = (moment - _EPOCH) // interval + 1
        try:
            return _EPOCH + count * interval
        except OverflowError:
            raise ValueError(
                f"the spec does not fire after {moment.isoformat()} before year 10000"
            ) from None


@attrs.frozen
class Spec:
    """A checked schedule spec; `parse_spec` makes one.

    Attributes:
        text: the spec as normalized: lower case, no surrounding spaces, fields separated by
            single spaces. `parse_spec` gives an equal spec back for it, so it is what to store.
    """

    text: str
    _rule: _Cron | _Every = attrs.field(repr=False)

    def matches(self, moment: dt.datetime) -> bool:
        """Whether the spec fires at exactly ``moment``.

        Args:
            moment: a timezone-aware datetime, in any zone.

        Returns:
            True at a firing: for cron, a whole minute (second and microsecond 0) that every
            field allows, in UTC; for ``@every``, a whole multiple of the interval since the
            Unix epoch.

        Raises:
            ValueError: ``moment`` is naive, or outside the datetimes UTC can hold.
        """
        return self._rule.matches(_in_utc(moment))

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """Return the first firing strictly after ``moment``.

        Cron specs step by allowed month, day, hour and minute, never minute by minute, so the
        sparsest spec (29 February on a given weekday, decades apart) takes a few dozen steps.

        Args:
            moment: a timezone-aware datetime, in any zone.

        Returns:
            An aware UTC datetime later than ``moment`` at which `matches` is true; for cron it
            has second and microsecond 0 (10:00:30 and 10:00:00 both give 10:01:00 for
            ``* * * * *``).

        Raises:
            ValueError: ``moment`` is naive or outside the datetimes UTC can hold, or the spec
                does not fire after it before year 10000, where datetimes end.
        """
        return self._rule.next_after(_in_utc(moment))


def _in_utc(moment: dt.datetime) -> dt.datetime:
    if not isinstance(moment, dt.datetime):
        raise TypeError(f"moment must be a datetime, got {type(moment).__name__}")
    if moment.utcoffset() is None:
        raise ValueError(f"moment must be timezone-aware, got the naive {moment.isoformat()}")
    try:
        return moment.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{moment.isoformat()} is outside the datetimes UTC can hold") from None


def parse_spec(text: str, what: str = "cron") -> Spec:
    """Check a schedule spec and return it parsed.

    Accepted: five cron fields ``minute hour day-of-month month day-of-week``, each ``*``,
    ``N``, ``A-B``, ``*/S``, ``A-B/S``, ``N/S`` (N to the field's last value, step S) or a
    comma list of these, with names ``jan``-``dec`` and ``sun``-``sat`` where numbers go in the
    month and day-of-week fields, and 0 or 7 for Sunday; the aliases ``@yearly``,
    ``@annually``, ``@monthly``, ``@weekly``, ``@daily``, ``@midnight`` and ``@hourly``; and
    ``@every <duration>`` with whole numbers of units ``d``, ``h``, ``m``, ``s``, largest
    first (``30s``, ``1h30m``), from 1 second to 366 days. Case does not matter.

    Args:
        text: the spec.
        what: the field it came from, named at the start of every message.

    Returns:
        The spec, its `Spec.text` normalized.

    Raises:
        InvalidArgument: ``text`` is empty, longer than `MAX_SPEC_LENGTH`, malformed, out of
            range, or never fires (``0 0 30 2 *``); one line naming ``what`` and the field.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > MAX_SPEC_LENGTH:
        raise InvalidArgument(
            f"{what} is {len(text)} characters long; the limit is {MAX_SPEC_LENGTH}"
        )
    quoted = shown(text)

    def error(detail: str) -> InvalidArgument:
        return InvalidArgument(f"{what}: {detail} in {quoted}")

    for position, character in enumerate(text):
        if not _ALLOWED_CHARACTER.fullmatch(character):
            raise error(f"character {character!r} at position {position} is not allowed")
    words = text.lower().split()
    if not words:
        raise InvalidArgument(f"{what} is empty; expected {_SHAPES}")
    rule: _Cron | _Every
    if words[0].startswith("@"):
        rule = _parse_at(words, error)
    elif len(words) != len(_FIELDS):
        raise error(f"expected {_SHAPES}, got {len(words)} fields")
    else:
        rule = _parse_cron(words, error)
    if isinstance(rule, _Cron) and not rule.ever_fires():
        raise InvalidArgument(
            f"{what}: {quoted} never fires: no month it allows has a day it allows"
        )
    return Spec(" ".join(words), rule)


def _parse_at(words: list[str], error: _Error) -> _Cron | _Every:
    name = words[0]
    if name == "@every":
        if len(words) != 2:
            raise error("@every takes one duration, such as @every 30s or @every 1h30m")
        return _Every(_parse_duration(words[1], error))
    if name not in _ALIASES:
        raise error(
            f"unknown alias {shown(name, 20)}; expected {', '.join(_ALIASES)} or @every <duration>"
        )
    if len(words) != 1:
        raise error(f"{name} takes no fields")
    return _parse_cron(_ALIASES[name].split(), error)


def _parse_duration(word: str, error: _Error) -> int:
    found = _DURATION.fullmatch(word)
    if found is None or not any(found.groups()):
        raise error(
            f"duration {shown(word, 20)} is not like 30s, 5m, 2h, 1d or 1h30m "
            "(whole numbers of units d, h, m, s, largest first)"
        )
    seconds = sum(
        int(n or 0) * unit for n, unit in zip(found.groups(), _DURATION_UNITS, strict=True)
    )
    if seconds < 1:
        raise error(f"duration {shown(word, 20)} is shorter than 1 second")
    if seconds > _MAX_EVERY_SECONDS:
        raise error(f"duration {shown(word, 20)} is longer than 366 days")
    return seconds


def _parse_cron(words: list[str], error: _Error) -> _Cron:
    minutes, hours, days, months, weekdays = (
        _parse_field(field, word, error) for field, word in zip(_FIELDS, words, strict=True)
    )
    return _Cron(
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=(weekdays | weekdays >> 7) & 0x7F,
        either_day=not words[2].startswith("*") and not words[4].startswith("*"),
    )


def _parse_field(field: _Field, word: str, error: _Error) -> int:
    """The bit set of the values ``word`` allows in ``field``."""

    def value(token: str) -> int:
        if _NUMBER.fullmatch(token):
            number = int(token)
        elif token in field.names:
            number = field.names[token]
        else:
            raise error(f"{field.name} {shown(token, 20)} is not {field.spelling()}")
        if not field.low <= number <= field.high:
            raise error(f"{field.name} {_clipped(token)} is out of range {field.low}-{field.high}")
        return number

    allowed = 0
    for item in word.split(","):
        if not item:
            raise error(f"{field.name} {shown(word, 20)} has an empty list item")
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not _NUMBER.fullmatch(step_text):
                raise error(f"{field.name} step {shown(step_text, 20)} is not a number")
            step = int(step_text)
            if step < 1:
                raise error(f"{field.name} step {step} must be at least 1")
        if body == "*":
            low, high = field.low, field.high
        else:
            first, dash, last = body.partition("-")
            low = value(first)
            high = value(last) if dash else field.high if slash else low
            if low > high:
                raise error(
                    f"{field.name} range {_clipped(body)} goes backwards; write the smaller first"
                )
        for number in range(low, high + 1, step):
            allowed |= 1 << number
    return allowed
