"""The calculator tool's arithmetic: precedence, exactness, refusals, and that nothing but
arithmetic is ever evaluated."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.agent.calculator import MAX_EXPRESSION_CHARS, evaluate, to_json_number
from everruns.agent.tools import calculator
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
