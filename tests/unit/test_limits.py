"""The bounds of what PostgreSQL stores: names, and failure reports with NUL characters."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.limits import (
    MAX_NAME_LENGTH,
    check_name,
    check_type_name,
    escape_nul_in_json,
)
from everruns.errors import InvalidArgument


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """JSON values whose strings (keys too) are drawn from ``text``."""
    finite = st.floats(allow_nan=False, allow_infinity=False)
    return st.recursive(
        st.none() | st.booleans() | st.integers() | finite | text,
        lambda inner: st.lists(inner) | st.dictionaries(text, inner),
        max_leaves=20,
    )


def nul_escaped(value: Any) -> Any:
    """``value`` with every NUL of its strings written as the four characters \\x00."""
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, list):
        return [nul_escaped(v) for v in value]
    if isinstance(value, dict):
        return {nul_escaped(k): nul_escaped(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "must not be empty"),
        ("  ", "must not be empty"),
        ("x" * (MAX_NAME_LENGTH + 1), "the limit is 512"),
        ("a\x00b", "NUL"),
        (7, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_a_name_postgres_cannot_store_is_refused_by_field(value: Any, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^activity_type .*{problem}") as info:
        check_name(value, "activity_type")
    assert "\n" not in str(info.value)


def test_names_are_returned_unchanged() -> None:
    for name in ("a", " spaced ", "名前", "x" * MAX_NAME_LENGTH):
        assert check_name(name, "workflow_type") is name


@given(json_values(st.text(st.characters(blacklist_characters="\x00"))))
def test_json_without_nul_is_returned_unchanged(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert escape_nul_in_json(text) == text


@given(json_values(st.text(st.sampled_from("a\x00\\é"))))
def test_json_keeps_its_value_with_every_nul_escaped(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert json.loads(escape_nul_in_json(text)) == nul_escaped(value)


def test_an_error_with_nul_keeps_its_fields_and_text_that_is_not_json_is_kept() -> None:
    error = json.dumps({"type": "E\x00", "message": "a\x00b", "non_retryable": True})
    assert json.loads(escape_nul_in_json(error)) == {
        "type": "E\\x00",
        "message": "a\\x00b",
        "non_retryable": True,
    }
    assert escape_nul_in_json("not json \x00") == "not json \\x00"
    assert escape_nul_in_json('{"m": "a\\u0000"') == '{"m": "a\\u0000"'  # no NUL character


@pytest.mark.parametrize("value", [" wf", "wf ", "\twf", "wf\n"])
def test_a_type_name_with_surrounding_spaces_is_refused(value: str) -> None:
    """A type the registry cannot register (surrounding spaces) is refused by field."""
    with pytest.raises(InvalidArgument, match=r"activity_type .* must not begin or end"):
        check_type_name(value, "activity_type")


@given(st.text(min_size=1, max_size=MAX_NAME_LENGTH).filter(lambda t: "\x00" not in t))
def test_a_type_name_is_a_name_without_surrounding_spaces(value: str) -> None:
    """check_type_name takes exactly the names check_name takes that strip to themselves."""
    try:
        check_name(value, "name")
    except InvalidArgument:
        name_ok = False
    else:
        name_ok = True
    try:
        check_type_name(value, "name")
    except InvalidArgument:
        type_ok = False
    else:
        type_ok = True
    assert type_ok == (name_ok and value.strip() == value)


def test_an_int_past_a_floats_range_is_refused_as_not_finite_everywhere() -> None:
    """`math.isfinite(10**400)` raises OverflowError: durations and coefficients checked with
    it escaped as that instead of InvalidArgument."""
    from everruns.domain.breaker import BreakerConfig
    from everruns.domain.limits import is_finite_number
    from everruns.domain.retry import RetryPolicy

    assert is_finite_number(1e308) and is_finite_number(10**300)
    assert not any(map(is_finite_number, (10**400, -(10**400), math.inf, math.nan, True, "1")))
    with pytest.raises(InvalidArgument):
        RetryPolicy(backoff_coefficient=10**400)
    with pytest.raises(InvalidArgument):
        BreakerConfig(open_duration=10**400)
