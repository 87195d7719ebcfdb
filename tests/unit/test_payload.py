"""Exact JSON payloads: `encode_text` accepts exactly what its explicit walk (`_check`) accepts,
with the same message for what it refuses, whichever of its two walks judges the value."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain import payload
from everruns.errors import PayloadError


class _Str(str):
    pass


class _Int(int):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities included: refused
    st.text(max_size=5),
    st.builds(_Str, st.text(max_size=3)),
    st.builds(_Int, st.integers()),
    st.sampled_from([b"x", {1, 2}, object(), 1j]),
)
_keys = st.one_of(st.text(max_size=4), st.integers(), st.booleans(), st.none(), st.floats())
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(_keys, inner, max_size=4),
        st.builds(_Dict, st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    ),
    max_leaves=12,
)


def _reference(value: Any) -> str:
    payload._check(value, "payload")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@given(_values)
def test_encode_text_matches_the_explicit_walk(value: Any) -> None:
    try:
        expected = _reference(value)
    except PayloadError as exc:
        with pytest.raises(PayloadError) as raised:
            payload.encode_text(value)
        assert str(raised.value) == str(exc)
    else:
        assert payload.encode_text(value) == expected


@given(_values)
def test_what_the_fast_walk_passes_the_explicit_walk_passes(value: Any) -> None:
    if payload._plain(value):
        payload._check(value, "payload")  # must not raise


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": [1, math.nan]}, "payload['a'][1] is nan, which JSON cannot carry"),
        ({1: "x"}, "payload has a key of type int; JSON object keys must be str"),
        ([{"b": {1, 2}}], "payload[0]['b'] is of type builtins.set"),
    ],
)
def test_refusals_name_where_the_value_sits(value: Any, message: str) -> None:
    with pytest.raises(PayloadError, match=None) as raised:
        payload.encode_text(value)
    assert str(raised.value).startswith(message)


def test_subclasses_of_the_json_types_are_accepted() -> None:
    assert payload.encode_text(_Dict(a=_Int(1), b=[_Str("s")])) == '{"a":1,"b":["s"]}'


_json_texts = st.one_of(
    st.text(max_size=12),
    # Numbers beyond a double's range, alone and inside a value.
    st.builds(
        lambda number, before, after: before + number + after,
        st.sampled_from(["1e400", "-1E+999", "9" * 320 + ".5", "1e-400", "1.7976931348623157e308"]),
        st.sampled_from(["", " ", "[", '{"a":', "[1,"]),
        st.sampled_from(["", " ", "]", "}", ",2]"]),
    ),
    st.builds(
        lambda value, before, after: before + json.dumps(value) + after,
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
            max_leaves=6,
        ),
        st.sampled_from(["", " ", "\n\t", "x", "[", "1"]),
        st.sampled_from(["", " ", "\r\n", "x", "]", ",1", "}"]),
    ),
)


@given(_json_texts)
def test_json_error_judges_text_as_json_loads_does(text: str) -> None:
    """As `json.loads` does once told to refuse what it would read as NaN or an infinity."""
    try:
        json.loads(text, parse_float=payload._finite, parse_constant=payload._no_constant)
    except ValueError as exc:
        assert payload.json_error(text) == str(exc)
    else:
        assert payload.json_error(text) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"amount": 1e400}', "the number 1e400 is beyond a double's range"),
        (" [1, -1E+999] ", "the number -1E+999 is beyond a double's range"),
        ("9" * 400 + ".0", "the number 9999999999...99999999.0 is beyond a double's range"),
        ('{"a": NaN}', "NaN is not a JSON value; use null or a string"),
        ("[Infinity]", "Infinity is not a JSON value"),
        (" -Infinity", "-Infinity is not a JSON value"),
    ],
)
def test_json_error_refuses_what_would_read_as_nan_or_infinity(text: str, message: str) -> None:
    """`json.loads` reads ``1e400`` as ``inf`` and accepts NaN and Infinity: values that cannot
    be written back as JSON, so the control plane refuses them at the door."""
    error = payload.json_error(text)
    assert error is not None and error.startswith(message), error
    assert "\n" not in error


@pytest.mark.parametrize("text", ["1e308", "-1.7976931348623157e308", "1e-400", "[0.1, 2.5e-3]"])
def test_json_error_accepts_every_number_a_double_can_hold(text: str) -> None:
    assert payload.json_error(text) is None


@pytest.mark.parametrize("nested", [False, True], ids=["alone", "nested"])
def test_an_integer_python_cannot_write_as_text_is_a_payload_error(nested: bool) -> None:
    """Python refuses to turn an integer of more than 4,300 digits into text: encoding one
    raises PayloadError naming the payload (a worker then fails the activity's attempt for
    good) instead of a bare ValueError (which the worker treated as its own internal error,
    and the task was released and run again until it was dead-lettered)."""
    big = 10**5000
    value: Any = [1, {"n": -big}] if nested else big
    with pytest.raises(PayloadError, match="result of activity 'big' cannot be written as JSON"):
        payload.encode(value, what="result of activity 'big'")
