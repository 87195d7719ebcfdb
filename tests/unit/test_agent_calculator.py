"""The calculator tool's arithmetic: precedence, exactness, refusals, and that nothing but
arithmetic is ever evaluated."""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns.agent.calculator import (
    MAX_EXPRESSION_CHARS,
    MAX_RESULT_BITS,
    evaluate,
    to_json_number,
)
from everruns.agent.tools import calculator
from everruns.domain import payload
from everruns.errors import InvalidArgument, NonRetryableError
from everruns.worker.activity import ActivityContext, ActivityInfo


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),  # left-associative
        ("2 * 3 + 4 * 5", 26),
        ("100 / 10 / 5", 2),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("2 ** 3 ** 2", 512),  # right-associative
        ("2 ^ 10", 1024),
        ("-2 ** 2", -4),  # the power binds tighter than the unary minus on its left
        ("2 ** -1", 0.5),
        ("(-2) ** 2", 4),
        ("--3", 3),
        ("+-+3", -3),
        ("0.1 + 0.2", 0.3),  # exact
        (".5 * 4", 2),
        ("1e3 + 1", 1001),
        ("2.5E-1 * 4", 1),
        ("4 ** 0.5", 2),
        ("((((1))))", 1),
        ("  6*7  ", 42),
        ("1 / 3", 1 / 3),
        ("12345678901234567890 * 10", 123456789012345678900),
    ],
)
def test_evaluates_with_the_usual_precedence(expression: str, expected: Any) -> None:
    assert to_json_number(evaluate(expression)) == expected


def test_results_are_exact_until_a_fractional_power() -> None:
    assert evaluate("0.1 + 0.2") == Fraction(3, 10)
    assert evaluate("1 / 3 * 3") == 1
    assert isinstance(evaluate("2 ** 0.5"), float)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1 +", "ends where a number was expected"),
        ("(1 + 2", "not closed"),
        ("1 + 2)", "unexpected ')'"),
        ("1 2", "unexpected '2'"),
        ("* 3", "expected a number"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "modulo by zero"),
        ("0 ** -1", "negative power"),
        ("(-8) ** 0.5", "not real"),
        ("9 ** 9 ** 9", "too large"),
        ("10.0 ** 400.5", "too large"),
        ("abs(-1)", "names are not allowed"),
        ("x + 1", "names are not allowed"),
        ("__import__('os').system('true')", "names are not allowed"),
        ("(1).__class__", "unexpected character '.'"),
        ("1; 2", "unexpected character ';'"),
        ("'1' + '2'", "unexpected character"),
        ("[1, 2]", "unexpected character '['"),
        ("1 & 2", "unexpected character '&'"),
        ("1 == 1", "unexpected character '='"),
    ],
)
def test_refuses_what_is_not_arithmetic(expression: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        evaluate(expression)
    assert message in str(caught.value)


def test_refuses_oversized_and_deeply_nested_expressions() -> None:
    with pytest.raises(InvalidArgument, match="longer than"):
        evaluate("1+" * (MAX_EXPRESSION_CHARS // 2) + "1")
    with pytest.raises(InvalidArgument, match="nests deeper"):
        evaluate("(" * 150 + "1" + ")" * 150)
    with pytest.raises(InvalidArgument, match="nests deeper"):
        evaluate("-" * 150 + "1")
    with pytest.raises(InvalidArgument, match="must be a string"):
        evaluate(42)  # type: ignore[arg-type]


def test_json_numbers() -> None:
    assert to_json_number(Fraction(6)) == 6 and isinstance(to_json_number(Fraction(6)), int)
    assert to_json_number(Fraction(1, 4)) == 0.25
    assert to_json_number(2.0) == 2 and isinstance(to_json_number(2.0), int)
    assert to_json_number(2.5) == 2.5


# A random expression tree, rendered fully parenthesised, must evaluate to the value the tree
# itself computes — the parser agrees with arithmetic, whatever the shape.
_leaf = st.integers(min_value=-50, max_value=50).map(lambda n: (str(n), Fraction(n)))


def _combine(
    children: st.SearchStrategy[tuple[str, Fraction]],
) -> st.SearchStrategy[tuple[str, Fraction]]:
    def build(
        op: str, left: tuple[str, Fraction], right: tuple[str, Fraction]
    ) -> tuple[str, Fraction]:
        a, b = left[1], right[1]
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return (f"({left[0]}) {op} ({right[0]})", value)

    return st.builds(build, st.sampled_from(["+", "-", "*"]), children, children)


@given(st.recursive(_leaf, _combine, max_leaves=12))
def test_random_expression_trees_evaluate_to_their_value(tree: tuple[str, Fraction]) -> None:
    text, value = tree
    assert evaluate(text) == value


@given(st.text(max_size=60))
def test_any_text_either_evaluates_or_is_refused_cleanly(text: str) -> None:
    try:
        evaluate(text)
    except InvalidArgument:
        pass


def _ctx() -> ActivityContext:
    info = ActivityInfo("wf", "run", "agent_turn", "3", "act.calculator", 1, 3)
    return ActivityContext(info)


async def test_the_calculator_tool_answers_and_refuses_without_retries() -> None:
    assert await calculator(_ctx(), {"expression": " 6 * 7 "}) == {
        "expression": "6 * 7",
        "result": 42,
    }
    with pytest.raises(NonRetryableError, match="division by zero"):
        await calculator(_ctx(), {"expression": "1/0"})
    with pytest.raises(NonRetryableError, match="'expression'"):
        await calculator(_ctx(), {"expr": "1"})
    with pytest.raises(NonRetryableError, match="JSON object"):
        await calculator(_ctx(), ["1+1"])


@pytest.mark.parametrize("literal", ["1e5000", "1e-5000", "1e1234", "123e1232", "7e-1300"])
def test_number_literals_beyond_the_result_bound_are_refused(literal: str) -> None:
    """A literal is held to MAX_RESULT_BITS like any result: 10**5000 has ~16,600 bits."""
    with pytest.raises(InvalidArgument, match="too large"):
        evaluate(literal)


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("1e1233", Fraction(10**1233)),  # 4,096 bits: just within the bound
        ("0e99999999", Fraction(0)),
        ("0.000e-99999999", Fraction(0)),
        ("1000e-1236", Fraction(1, 10**1233)),  # trailing zeros count toward the exponent
        ("12.50e-1", Fraction(5, 4)),
        ("5.", Fraction(5)),
    ],
)
def test_number_literals_within_the_bound_are_exact(literal: str, expected: Fraction) -> None:
    assert evaluate(literal) == expected


async def test_literals_with_huge_exponents_are_refused_at_once() -> None:
    """``1e99999999`` is 11 characters, yet building it exactly would take minutes of CPU on
    the worker's Trio thread: its exponent is bounded before the number is built. It runs in a
    child process so that, were the bound missing, the test fails instead of hanging."""
    code = (
        "from everruns.agent.calculator import evaluate\n"
        "from everruns.errors import InvalidArgument\n"
        "for literal in ('1e99999999', '1e-99999999', '9' * 900 + 'e+99999999'):\n"
        "    try:\n"
        "        evaluate(literal)\n"
        "    except InvalidArgument:\n"
        "        print('refused')\n"
        "    else:\n"
        "        print('computed')\n"
    )
    finished: Any = None
    with trio.move_on_after(15):
        finished = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, check=False
        )
    assert finished is not None, "evaluating the literals ran for more than 15 s"
    assert finished.stdout.decode().split() == ["refused"] * 3


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1e5000", "too large"),  # a 5,001-digit integer JSON (and the worker) cannot carry
        ("0 ** -0.5", "negative power"),  # was ZeroDivisionError
        ("2 ** 0.5 + 10 ** 400", "too large"),  # was OverflowError (float + huge fraction)
        ("(2**0.5)*10**308 + (2**0.5)*10**308", "too large"),  # a sum was never checked: inf
        ("(2**0.5)*10**308 - -(2**0.5)*10**308", "too large"),
        ("2**4095 + 2**4095", "too large"),  # exact sums are held to the bound too
        ("2 ** 0.5 * 10 ** 400", "too large"),
        ("2 ** 0.5 % 10 ** 400", "too large"),
    ],
)
async def test_arithmetic_that_cannot_be_done_is_a_non_retryable_tool_error(
    expression: str, message: str
) -> None:
    """The tool's contract: wrong arguments raise NonRetryableError (the model is told), never
    an exception the retry policy would repeat, nor a result the worker cannot record."""
    with pytest.raises(InvalidArgument, match=message):
        evaluate(expression)
    with pytest.raises(NonRetryableError, match=message):
        await calculator(_ctx(), {"expression": expression})


# Arithmetic over numbers of every size, including literals far beyond the bound and float
# steps: whatever the tree, evaluation ends quickly with a value the worker can record —
# a fraction within MAX_RESULT_BITS or a finite float — or refuses it as InvalidArgument.
# (Exponents stay within ±6000 so that a regression fails here instead of hanging; the
# huge-exponent literals have their own test above.)
_number = st.builds(
    lambda digits, fraction, exponent: digits + fraction + exponent,
    st.sampled_from(["0", "1", "2", "7", "10", "12345678901234567890", "9" * 300]),
    st.sampled_from(["", ".5", ".000001", "."]),
    st.one_of(
        st.just(""),
        st.integers(-30, 30).map(lambda e: f"e{e}"),
        st.integers(-6000, 6000).map(lambda e: f"e{e}"),
    ),
)
_operand = st.one_of(_number, _number.map(lambda n: f"{n} ** 0.5"))


def _any_operation(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    ops = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "^"])
    binary = st.builds(lambda a, op, b: f"({a}) {op} ({b})", children, ops, children)
    return st.one_of(binary, children.map(lambda a: f"-({a})"))


@settings(max_examples=300, deadline=2000)
@given(st.recursive(_operand, _any_operation, max_leaves=10))
def test_any_arithmetic_ends_with_a_recordable_value_or_a_clean_refusal(text: str) -> None:
    try:
        value = evaluate(text)
    except InvalidArgument:
        return
    if isinstance(value, Fraction):
        assert max(value.numerator.bit_length(), value.denominator.bit_length()) <= MAX_RESULT_BITS
    else:
        assert math.isfinite(value)
    try:
        number = to_json_number(value)
    except InvalidArgument:
        return
    payload.encode({"expression": text, "result": number}, what="result")
