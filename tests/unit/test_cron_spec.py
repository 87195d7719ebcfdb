"""Schedule specs: parsing, normalization, and the firing arithmetic of cron and ``@every``.

Generated cron specs carry the sets each field allows, computed here from the generated items and
not by the module, and a reference matcher written from Vixie cron's rule judges the module's
`matches` and `next_after`; the gap between a moment and its next firing is searched by brute
force with it.
"""

from __future__ import annotations

import calendar
import datetime as dt
import itertools
import random
import time

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns.domain.cron import MAX_SPEC_LENGTH, Spec, parse_spec
from everruns.errors import InvalidArgument

UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
MINUTE = dt.timedelta(minutes=1)
RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
MONTH_NAMES = dict(
    enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
)
DAY_NAMES = dict(enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"]))
NAMES = {3: MONTH_NAMES, 4: DAY_NAMES}
ZONES = [
    UTC,
    dt.timezone(dt.timedelta(hours=5, minutes=30)),
    dt.timezone(dt.timedelta(hours=-8)),
    dt.timezone(dt.timedelta(hours=14)),
]

DAY_1800 = dt.date(1800, 1, 1).toordinal()
DAY_2800 = dt.date(2800, 12, 31).toordinal()

properties = settings(max_examples=300, deadline=None)


def at(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    microsecond: int = 0,
    *,
    tz: dt.tzinfo = UTC,
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, microsecond, tzinfo=tz)


# --- the reference ------------------------------------------------------------------------------


@attrs.frozen
class Cron:
    """A generated cron spec: its text and, per field, the text and the values it allows."""

    text: str
    words: tuple[str, ...]
    sets: tuple[frozenset[int], ...]

    @property
    def weekdays(self) -> frozenset[int]:
        return frozenset(v % 7 for v in self.sets[4])  # 7 is Sunday, as 0 is

    @property
    def both_days(self) -> bool:
        # Vixie cron: a day field starting with '*' makes a day need both fields.
        return self.words[2].startswith("*") or self.words[4].startswith("*")

    def day_ok(self, day: dt.date) -> bool:
        by_month = day.day in self.sets[2]
        by_week = day.isoweekday() % 7 in self.weekdays
        ok = (by_month and by_week) if self.both_days else (by_month or by_week)
        return ok and day.month in self.sets[3]

    def matches(self, moment: dt.datetime) -> bool:
        u = moment.astimezone(UTC)
        return (
            u.second == 0
            and u.microsecond == 0
            and u.minute in self.sets[0]
            and u.hour in self.sets[1]
            and self.day_ok(u.date())
        )

    def fires(self) -> bool:
        # Every date falls on every weekday in some year, 29 February included (leap years cycle
        # through the weekdays), so only the day of the month and the month can rule a spec out,
        # and only when both day fields must agree.
        if not self.both_days:
            return True
        longest = {2: 29, 4: 30, 6: 30, 9: 30, 11: 30}
        return any(d <= longest.get(m, 31) for m in self.sets[3] for d in self.sets[2])

    def first_firing_after(self, moment: dt.datetime, until: dt.datetime) -> dt.datetime | None:
        """Brute force: every minute after ``moment`` and before ``until``, skipping whole days
        and hours the reference rules out."""
        t = moment.astimezone(UTC).replace(second=0, microsecond=0) + MINUTE
        while t < until:
            if not self.day_ok(t.date()):
                t = t.replace(hour=0, minute=0) + dt.timedelta(days=1)
            elif t.hour not in self.sets[1]:
                t = t.replace(minute=0) + dt.timedelta(hours=1)
            elif self.matches(t):
                return t
            else:
                t += MINUTE
        return None


def cron_field(index: int, seed: int) -> tuple[str, frozenset[int]]:
    """Field ``index`` built from ``seed``: one to three items of any form, with names or numbers
    for months and weekdays, and the values it allows, worked out from the items."""
    rng = random.Random(seed)
    low, high = RANGES[index]
    names = NAMES.get(index, {})

    def spell(value: int) -> str:
        if value in names and rng.random() < 0.5:
            return rng.choice([names[value], names[value].upper(), names[value].capitalize()])
        return str(value)

    items: list[str] = []
    values: set[int] = set()
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        form = rng.choice(["*", "*", "*/s", "n", "n", "a-b", "a-b/s", "n/s"])
        a = low if form.startswith("*") else rng.randint(low, high)
        b = rng.randint(a, high) if form.startswith("a-b") else a if form == "n" else high
        step = rng.randint(1, high + 1) if form.endswith("/s") else 1
        item = "*" if form.startswith("*") else spell(a)
        if form.startswith("a-b"):
            item += f"-{spell(b)}"
        if form.endswith("/s"):
            item += f"/{step}"
        items.append(item)
        values.update(range(a, b + 1, step))
    return ",".join(items), frozenset(values)


@st.composite
def crons(draw: st.DrawFn) -> Cron:
    # A seed per field keeps the draws few (a spec is generated hundreds of times per test);
    # the falsifying example still shows the spec's text.
    fields = [cron_field(i, draw(st.integers(0, 2**32))) for i in range(5)]
    words = tuple(word for word, _ in fields)
    return Cron(" ".join(words), words, tuple(values for _, values in fields))


@st.composite
def sparse_crons(draw: st.DrawFn) -> Cron:
    """Specs about the last days of short months: rare firings, and some that never fire."""
    days = draw(
        st.sets(st.integers(28, 31), min_size=1) | st.sets(st.sampled_from([30, 31]), min_size=1)
    )
    months = draw(st.sets(st.sampled_from([2, 4, 6, 9, 11]), min_size=1) | st.just({2}))
    weekday_word, weekday_values = draw(
        st.sampled_from([("*", range(7)), ("*/7", [0]), ("*/3", [0, 3, 6]), ("*/2", [0, 2, 4, 6])])
        | st.sets(st.integers(0, 7), min_size=1).map(lambda w: (",".join(map(str, w)), w))
    )
    words = (
        str(draw(st.integers(0, 59))),
        str(draw(st.integers(0, 23))),
        ",".join(map(str, sorted(days))),
        ",".join(MONTH_NAMES[m] for m in sorted(months)),
        weekday_word,
    )
    sets = (
        frozenset([int(words[0])]),
        frozenset([int(words[1])]),
        frozenset(days),
        frozenset(months),
        frozenset(weekday_values),
    )
    return Cron(" ".join(words), words, sets)


firing_crons = st.one_of(crons(), crons(), crons(), sparse_crons()).filter(Cron.fires)


@st.composite
def every_texts(draw: st.DrawFn) -> tuple[str, int]:
    seconds = draw(st.integers(1, 366 * 86400) | st.sampled_from([1, 59, 60, 90, 3600, 86400]))
    # Written with its largest units, or with fewer of them (5400 s as 90m or 1h1800s).
    parts: list[str] = []
    rest = seconds
    for unit, size in zip("dhms", (86400, 3600, 60, 1), strict=True):
        if size > 1 and draw(st.booleans()):
            continue
        count, rest = divmod(rest, size)
        if count or (unit == "s" and not parts):
            parts.append(f"{count}{unit}")
    return "@every " + "".join(parts), seconds


moments = st.builds(
    lambda microseconds, zone: (EPOCH + dt.timedelta(microseconds=microseconds)).astimezone(zone),
    st.integers(
        (dt.datetime(1900, 1, 1, tzinfo=UTC) - EPOCH) // dt.timedelta(microseconds=1),
        (dt.datetime(2500, 1, 1, tzinfo=UTC) - EPOCH) // dt.timedelta(microseconds=1),
    )
    | st.integers(-(10**12), 10**12),  # near the epoch
    st.sampled_from(ZONES),
)
aliases = st.sampled_from(
    ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"]
)
spec_texts = st.one_of(
    firing_crons.map(lambda c: c.text),
    every_texts().map(lambda e: e[0]),
    aliases,
)


# --- properties ---------------------------------------------------------------------------------


@properties
@given(spec_texts, moments)
def test_next_after_is_a_later_firing(text: str, moment: dt.datetime) -> None:
    spec = parse_spec(text)
    following = spec.next_after(moment)
    assert following > moment
    assert following.tzinfo is UTC
    assert spec.matches(following)
    assert spec.matches(following.astimezone(ZONES[1]))


@properties
@given(firing_crons, moments)
def test_cron_next_after_is_the_first_firing_the_reference_finds(
    cron: Cron, moment: dt.datetime
) -> None:
    spec = parse_spec(cron.text)
    following = spec.next_after(moment)
    assert (following.second, following.microsecond) == (0, 0)
    assert cron.matches(following)
    assert cron.first_firing_after(moment, until=following + MINUTE) == following


@properties
@given(every_texts(), moments)
def test_every_fires_at_the_multiples_of_its_interval_since_the_epoch(
    every: tuple[str, int], moment: dt.datetime
) -> None:
    text, seconds = every
    spec = parse_spec(text)
    interval = dt.timedelta(seconds=seconds)
    following = spec.next_after(moment)
    assert (following - EPOCH) % interval == dt.timedelta(0)
    assert following - interval <= moment < following
    assert spec.matches(following)
    assert not spec.matches(following - dt.timedelta(microseconds=1))
    assert spec.matches(moment) == ((moment - EPOCH) % interval == dt.timedelta(0))


@properties
@given(spec_texts, moments, moments)
def test_next_after_is_monotonic(text: str, a: dt.datetime, b: dt.datetime) -> None:
    spec = parse_spec(text)
    early, late = sorted([a, b])
    assert spec.next_after(early) <= spec.next_after(late)


@properties
@given(spec_texts, moments)
def test_chained_firings_increase_and_each_follows_the_last(text: str, moment: dt.datetime) -> None:
    spec = parse_spec(text)
    firings = [spec.next_after(moment)]
    for _ in range(5):
        firings.append(spec.next_after(firings[-1]))
    assert all(a < b for a, b in itertools.pairwise(firings))
    assert all(spec.matches(f) for f in firings)
    # A moment between two firings leads to the second.
    for a, b in itertools.pairwise(firings):
        assert spec.next_after(a + (b - a) / 2) == b


@properties
@given(firing_crons, st.data())
def test_matches_agrees_with_the_reference(cron: Cron, data: st.DataObject) -> None:
    spec = parse_spec(cron.text)
    # Minutes and hours drawn from the allowed ones, so the day rule is what is being tested.
    day = dt.date.fromordinal(data.draw(st.integers(DAY_1800, DAY_2800)))
    minute = data.draw(st.sampled_from(sorted(cron.sets[0])))
    hour = data.draw(st.sampled_from(sorted(cron.sets[1])))
    moment = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
    assert spec.matches(moment) == cron.matches(moment)
    anywhere = data.draw(moments.map(lambda m: m.replace(second=0, microsecond=0)))
    assert spec.matches(anywhere) == cron.matches(anywhere)
    assert not spec.matches(moment + dt.timedelta(seconds=data.draw(st.integers(1, 59))))


@properties
@given(crons() | sparse_crons())
def test_a_spec_is_refused_exactly_when_it_never_fires(cron: Cron) -> None:
    if cron.fires():
        parse_spec(cron.text)
    else:
        with pytest.raises(InvalidArgument, match="never fires"):
            parse_spec(cron.text)


@properties
@given(spec_texts, st.data())
def test_normalized_text_parses_to_the_same_spec(text: str, data: st.DataObject) -> None:
    spec = parse_spec(text)
    assert parse_spec(spec.text) == spec
    assert parse_spec(spec.text).text == spec.text
    assert spec.text == spec.text.lower().strip()
    assert "  " not in spec.text
    spaces = st.text(alphabet=" \t", min_size=1, max_size=3)
    messy = data.draw(spaces) + data.draw(spaces).join(spec.text.upper().split(" "))
    assert parse_spec(messy + data.draw(spaces)) == spec


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=MAX_SPEC_LENGTH + 20))
def test_any_text_parses_or_is_refused_in_one_line(text: str) -> None:
    check_parse_is_total(text)


near_miss_words = st.lists(
    st.sampled_from(
        [
            *("*", "*", "/", "-", ",", "0", "1", "5", "7", "12", "29", "31", "59", "60"),
            *("mon", "JAN", "sun", "x", "@every", "@daily", "1h", "30s", "0s", "m", "d"),
        ]
    ),
    min_size=1,
    max_size=4,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(near_miss_words, min_size=5, max_size=5) | st.lists(near_miss_words, max_size=7))
def test_near_miss_text_parses_or_is_refused_in_one_line(words: list[str]) -> None:
    check_parse_is_total(" ".join(words))


def check_parse_is_total(text: str) -> None:
    try:
        spec = parse_spec(text, what="job.schedule")
    except InvalidArgument as exc:
        message = str(exc)
        assert message.startswith("job.schedule")
        assert "\n" not in message and "\r" not in message
        assert len(message) < 400
        return
    assert parse_spec(spec.text, what="job.schedule") == spec
    assert spec.matches(spec.next_after(at(2025, 1, 1)))


# --- examples -----------------------------------------------------------------------------------


def firings(text: str, start: dt.datetime, count: int) -> list[dt.datetime]:
    spec = parse_spec(text)
    out = [spec.next_after(start)]
    while len(out) < count:
        out.append(spec.next_after(out[-1]))
    return out


def test_every_quarter_hour() -> None:
    assert firings("*/15 * * * *", at(2025, 5, 5, 10, 7, 30), 4) == [
        at(2025, 5, 5, 10, 15),
        at(2025, 5, 5, 10, 30),
        at(2025, 5, 5, 10, 45),
        at(2025, 5, 5, 11, 0),
    ]


def test_every_minute_is_strictly_after_and_whole() -> None:
    spec = parse_spec("* * * * *")
    assert spec.next_after(at(2025, 1, 1, 10, 0, 30)) == at(2025, 1, 1, 10, 1)
    assert spec.next_after(at(2025, 1, 1, 10, 0)) == at(2025, 1, 1, 10, 1)
    assert spec.next_after(at(2025, 1, 1, 9, 59, 59, 999_999)) == at(2025, 1, 1, 10, 0)
    assert spec.matches(at(2025, 1, 1, 10, 0))
    assert not spec.matches(at(2025, 1, 1, 10, 0, 30))


def test_weekdays_at_nine() -> None:
    # 2025-01-03 is a Friday.
    assert firings("0 9 * * mon-fri", at(2025, 1, 3, 9, 0), 3) == [
        at(2025, 1, 6, 9),
        at(2025, 1, 7, 9),
        at(2025, 1, 8, 9),
    ]
    assert parse_spec("0 9 * * MON-FRI") == parse_spec("0 9 * * mon-fri")
    assert firings("0 9 * * 1-5", at(2025, 1, 3, 9, 0), 3) == firings(
        "0 9 * * mon-fri", at(2025, 1, 3, 9, 0), 3
    )


def test_first_of_the_month_rolls_over_months_and_years() -> None:
    assert firings("0 0 1 * *", at(2025, 11, 15, 12), 3) == [
        at(2025, 12, 1),
        at(2026, 1, 1),
        at(2026, 2, 1),
    ]


def test_aliases() -> None:
    start = at(2025, 6, 15, 10, 0)  # a Sunday
    assert parse_spec("@hourly").next_after(start) == at(2025, 6, 15, 11)
    assert parse_spec("@daily").next_after(start) == at(2025, 6, 16)
    assert parse_spec("@midnight").next_after(start) == at(2025, 6, 16)
    assert parse_spec("@weekly").next_after(start) == at(2025, 6, 22)
    assert parse_spec("@monthly").next_after(start) == at(2025, 7, 1)
    assert parse_spec("@yearly").next_after(start) == at(2026, 1, 1)
    assert parse_spec("@ANNUALLY").text == "@annually"


def test_every_ninety_seconds_counts_from_the_epoch() -> None:
    spec = parse_spec("@every 90s")
    assert spec.next_after(EPOCH) == at(1970, 1, 1, 0, 1, 30)
    assert spec.next_after(at(1970, 1, 1, 0, 1, 29)) == at(1970, 1, 1, 0, 1, 30)
    assert spec.next_after(at(1969, 12, 31, 23, 58)) == at(1969, 12, 31, 23, 58, 30)
    assert spec.next_after(at(2025, 1, 1)) == at(2025, 1, 1, 0, 1, 30)
    assert parse_spec("@every 1m30s").next_after(at(2025, 1, 1)) == at(2025, 1, 1, 0, 1, 30)
    assert parse_spec("@every 1h30m").next_after(at(2025, 1, 1, 0, 10)) == at(2025, 1, 1, 1, 30)
    assert parse_spec("@every 1d").next_after(at(2025, 1, 1, 0, 0, 1)) == at(2025, 1, 2)
    assert spec.matches(at(2025, 1, 1, 0, 1, 30))
    assert not spec.matches(at(2025, 1, 1, 0, 1, 30, 1))


def test_29_february_waits_for_a_leap_year() -> None:
    spec = parse_spec("0 0 29 2 *")
    assert spec.next_after(at(2025, 3, 1)) == at(2028, 2, 29)
    assert spec.next_after(at(2028, 2, 29)) == at(2032, 2, 29)
    # 2100 is not a leap year.
    assert spec.next_after(at(2096, 3, 1)) == at(2104, 2, 29)
    # Both day fields: 29 February that is a Sunday, 40 years apart across 2100.
    sundays = parse_spec("0 0 29 2 */7")
    assert sundays.next_after(at(2088, 3, 1)) == at(2128, 2, 29)
    assert sundays.next_after(at(2004, 3, 1)) == at(2032, 2, 29)
    # Neither day field starts with '*': 29 February or any Monday of February.
    either = parse_spec("0 0 29 2 mon")
    assert firings("0 0 29 2 mon", at(2025, 1, 1), 5) == [
        at(2025, 2, 3),
        at(2025, 2, 10),
        at(2025, 2, 17),
        at(2025, 2, 24),
        at(2026, 2, 2),
    ]
    assert either.matches(at(2028, 2, 29))  # a Tuesday


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    spec = parse_spec("0 0 13 * fri")
    assert spec.matches(at(2025, 1, 13))  # a Monday, the 13th
    assert spec.matches(at(2025, 1, 3))  # a Friday
    assert spec.matches(at(2025, 6, 13))  # Friday the 13th
    assert not spec.matches(at(2025, 1, 14))
    assert firings("0 0 13 * fri", at(2025, 1, 1), 4) == [
        at(2025, 1, 3),
        at(2025, 1, 10),
        at(2025, 1, 13),
        at(2025, 1, 17),
    ]


def test_a_day_field_starting_with_a_star_makes_both_fields_decide() -> None:
    # The restricted field alone when the other is '*'.
    assert firings("0 0 * * fri", at(2025, 1, 1), 2) == [at(2025, 1, 3), at(2025, 1, 10)]
    assert firings("0 0 13 * *", at(2025, 1, 1), 2) == [at(2025, 1, 13), at(2025, 2, 13)]
    # Vixie cron: '*/2' starts with '*', so both: odd-numbered Mondays.
    assert firings("0 0 */2 * mon", at(2025, 1, 1), 3) == [
        at(2025, 1, 13),
        at(2025, 1, 27),
        at(2025, 2, 3),
    ]


def test_sunday_is_0_and_7() -> None:
    start = at(2025, 1, 1)
    expected = [at(2025, 1, 5), at(2025, 1, 12)]
    assert firings("0 0 * * 0", start, 2) == expected
    assert firings("0 0 * * 7", start, 2) == expected
    assert firings("0 0 * * sun", start, 2) == expected
    assert firings("0 0 * * 5-7", start, 3) == [at(2025, 1, 3), at(2025, 1, 4), at(2025, 1, 5)]
    assert firings("0 0 * * fri,sat,sun", start, 3) == firings("0 0 * * 5-7", start, 3)


def test_end_of_month_and_year_rollovers() -> None:
    every_minute = parse_spec("* * * * *")
    assert every_minute.next_after(at(2025, 12, 31, 23, 59)) == at(2026, 1, 1, 0, 0)
    assert every_minute.next_after(at(2024, 2, 28, 23, 59, 59)) == at(2024, 2, 29, 0, 0)
    assert every_minute.next_after(at(2025, 2, 28, 23, 59, 59)) == at(2025, 3, 1, 0, 0)
    assert parse_spec("59 23 31 12 *").next_after(at(2025, 12, 31, 23, 59)) == at(
        2026, 12, 31, 23, 59
    )
    # Months without a 31st are skipped.
    assert firings("0 0 31 * *", at(2025, 1, 31), 3) == [
        at(2025, 3, 31),
        at(2025, 5, 31),
        at(2025, 7, 31),
    ]
    assert firings("30 12 28-31 * *", at(2025, 2, 27), 3) == [
        at(2025, 2, 28, 12, 30),
        at(2025, 3, 28, 12, 30),
        at(2025, 3, 29, 12, 30),
    ]


def test_steps_from_a_value_and_in_a_range() -> None:
    assert firings("50/5 * * * *", at(2025, 1, 1, 10), 3) == [
        at(2025, 1, 1, 10, 50),
        at(2025, 1, 1, 10, 55),
        at(2025, 1, 1, 11, 50),
    ]
    assert firings("0 8-17/3 * * *", at(2025, 1, 1), 5) == [
        at(2025, 1, 1, 8),
        at(2025, 1, 1, 11),
        at(2025, 1, 1, 14),
        at(2025, 1, 1, 17),
        at(2025, 1, 2, 8),
    ]
    assert firings("0 0 1 jan,jul *", at(2025, 2, 1), 2) == [at(2025, 7, 1), at(2026, 1, 1)]


def test_moments_in_other_zones_are_read_in_utc() -> None:
    india = ZONES[1]
    spec = parse_spec("0 9 * * *")
    # 09:30 in India is 04:00 UTC.
    assert spec.next_after(at(2025, 1, 1, 9, 30, tz=india)) == at(2025, 1, 1, 9)
    assert spec.matches(at(2025, 1, 1, 14, 30, tz=india))
    assert not spec.matches(at(2025, 1, 1, 9, 0, tz=india))


def test_normalized_text() -> None:
    assert parse_spec("  0\t9  *  *   MON-Fri \n").text == "0 9 * * mon-fri"
    assert parse_spec("@Every 1H30M").text == "@every 1h30m"
    assert repr(parse_spec("@daily")) == "Spec(text='@daily')"
    assert parse_spec("0 0 * * 0") != parse_spec("0 0 * * 7")  # the texts differ
    assert hash(parse_spec("*/5 * * * *")) == hash(parse_spec("*/5  * * * *"))


def test_sparse_specs_take_few_steps() -> None:
    # Minute by minute, 40 years would be 21 million steps.
    specs = [parse_spec(t) for t in ("0 0 29 2 */7", "0 0 29 2 *", "59 23 31 12 */7")]
    started = time.perf_counter()
    for spec in specs:
        moment = at(2001, 1, 1)
        for _ in range(100):
            moment = spec.next_after(moment)
    assert time.perf_counter() - started < 2.0


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("75 * * * *", "sched: minute 75 is out of range 0-59 in '75 * * * *'"),
        ("", "sched is empty; expected five fields"),
        ("  \t ", "sched is empty"),
        ("x" * 201, "sched is 201 characters long; the limit is 200"),
        ("* * * *", "sched: expected five fields"),
        ("* * * * * *", "got 6 fields"),
        ("0 0 * * 5#3", "sched: character '#' at position 9 is not allowed"),
        ("0 0 ? * *", "character '?'"),
        ("0 0 L * *", "sched: day-of-month 'l' is not a number in"),
        ("0 0 * * é", "character 'é'"),
        ("0 0 * * \x00", "character '\\x00'"),
        ("* 24 * * *", "sched: hour 24 is out of range 0-23"),
        ("* * 0 * *", "day-of-month 0 is out of range 1-31"),
        ("* * 32 * *", "day-of-month 32 is out of range 1-31"),
        ("* * * 13 *", "month 13 is out of range 1-12"),
        ("* * * 0 *", "month 0 is out of range 1-12"),
        ("* * * * 8", "day-of-week 8 is out of range 0-7"),
        ("1" * 30 + " * * * *", "minute 11111111111111111111... is out of range 0-59"),
        ("5-3 * * * *", "minute range 5-3 goes backwards"),
        ("* * * dec-jan *", "month range dec-jan goes backwards"),
        ("* * * * sat-sun", "day-of-week range sat-sun goes backwards"),
        ("*/0 * * * *", "minute step 0 must be at least 1"),
        ("1-5/0 * * * *", "minute step 0 must be at least 1"),
        ("*/ * * * *", "minute step '' is not a number"),
        ("*/mon * * * *", "minute step 'mon' is not a number"),
        ("1/2/3 * * * *", "minute step '2/3' is not a number"),
        ("1-2-3 * * * *", "minute '2-3' is not a number"),
        ("-1 * * * *", "minute '' is not a number"),
        ("1, * * * *", "minute '1,' has an empty list item"),
        (",1 * * * *", "has an empty list item"),
        ("* * * foo *", "month 'foo' is not a number or a name jan-dec"),
        ("* * * january *", "month 'january' is not a number or a name jan-dec"),
        ("* * * * funday", "day-of-week 'funday' is not a number or a name sun-sat"),
        ("jan * * * *", "minute 'jan' is not a number"),
        ("* * mon * *", "day-of-month 'mon' is not a number"),
        ("* * * mon *", "month 'mon' is not a number or a name jan-dec"),
        ("* * * * jan", "day-of-week 'jan' is not a number or a name sun-sat"),
        ("@reboot", "sched: unknown alias '@reboot'; expected @yearly"),
        ("@", "unknown alias '@'"),
        ("@daily 5", "sched: @daily takes no fields"),
        ("@every", "sched: @every takes one duration"),
        ("@every 1h 30m", "@every takes one duration"),
        ("@every 0s", "sched: duration '0s' is shorter than 1 second"),
        ("@every 0d0h0m0s", "is shorter than 1 second"),
        ("@every 367d", "sched: duration '367d' is longer than 366 days"),
        ("@every 366d1s", "is longer than 366 days"),
        ("@every 5", "sched: duration '5' is not like 30s"),
        ("@every 1s1m", "duration '1s1m' is not like"),
        ("@every 1.5h", "character '.'"),
        ("@every 5w", "duration '5w' is not like"),
        ("@every -5s", "duration '-5s' is not like"),
        ("@every h", "duration 'h' is not like"),
        ("0 0 31 2 *", "sched: '0 0 31 2 *' never fires"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 31 4,6,9,11 *", "never fires"),
        ("0 0 30,31 feb */2", "never fires"),
    ],
)
def test_parse_errors_are_one_line_and_name_the_field(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_spec(text, what="sched")
    assert message in str(caught.value)
    assert str(caught.value).startswith("sched")
    assert "\n" not in str(caught.value)


def test_every_shape_of_month_occurs_in_the_calendar() -> None:
    # The never-fires check tries each allowed month with its 1st on each weekday, February with
    # 28 and with 29 days: 91 shapes, which must all occur (the calendar repeats every 400 years).
    shapes = {
        (month, calendar.monthrange(year, month)[1], dt.date(year, month, 1).isoweekday() % 7)
        for year in range(2000, 2400)
        for month in range(1, 13)
    }
    assert len(shapes) == 11 * 7 + 2 * 7


def test_what_defaults_to_cron() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_spec("75 * * * *")
    assert str(caught.value) == "cron: minute 75 is out of range 0-59 in '75 * * * *'"


def test_a_non_string_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cron must be a string, got int"):
        parse_spec(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text", ["0 0 29 2 *", "0 0 31 2 mon", "0 0 30 2 1", "0 0 */28 2 */7", "@every 366d"]
)
def test_specs_that_do_fire_are_accepted(text: str) -> None:
    spec = parse_spec(text)
    assert spec.matches(spec.next_after(at(2025, 1, 1)))


def test_a_spec_of_the_length_limit_is_accepted() -> None:
    text = "0 0 * * *".ljust(MAX_SPEC_LENGTH)
    assert parse_spec(text).text == "0 0 * * *"


# --- moments the arithmetic refuses -------------------------------------------------------------


@pytest.mark.parametrize("text", ["* * * * *", "@every 30s"])
def test_a_naive_moment_is_a_programming_error(text: str) -> None:
    spec = parse_spec(text)
    with pytest.raises(ValueError, match="timezone-aware"):
        spec.next_after(dt.datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        spec.matches(dt.datetime(2025, 1, 1))


@pytest.mark.parametrize("text", ["* * * * *", "@every 30s", "0 0 29 2 */7", "@every 366d"])
def test_no_firing_before_year_10000_is_a_value_error(text: str) -> None:
    spec = parse_spec(text)
    with pytest.raises(ValueError, match="before year 10000"):
        spec.next_after(at(9999, 12, 31, 23, 59, 59))
    # Moments that UTC cannot hold.
    with pytest.raises(ValueError, match="outside the datetimes UTC can hold"):
        spec.next_after(at(9999, 12, 31, 23, 0, tz=ZONES[2]))
    with pytest.raises(ValueError, match="outside the datetimes UTC can hold"):
        spec.matches(at(1, 1, 1, 0, 0, tz=ZONES[1]))


def test_the_last_firings_before_year_10000() -> None:
    assert parse_spec("* * * * *").next_after(at(9999, 12, 31, 23, 58)) == at(9999, 12, 31, 23, 59)
    assert parse_spec("0 0 29 2 *").next_after(at(9990, 1, 1)) == at(9992, 2, 29)
    with pytest.raises(ValueError, match="before year 10000"):
        parse_spec("0 0 29 2 *").next_after(at(9996, 3, 1))


def test_spec_is_a_value() -> None:
    spec: Spec = parse_spec("@hourly")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.text = "@daily"  # type: ignore[misc]
    assert {spec, parse_spec("@HOURLY")} == {spec}
