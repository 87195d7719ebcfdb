"""A safe arithmetic evaluator for the ``calculator`` tool: numbers, + - * / // % ** ^, parentheses.

The expression comes from a language model, so it is parsed by a small recursive-descent parser
over exact fractions and never handed to ``eval``: names, attribute access, calls and anything
else that is not arithmetic are refused with a message that says what was found. Sizes are
bounded (expression length, nesting depth, each literal's exponent, and the size of every
literal and intermediate result) so a hostile expression cannot eat the worker's CPU or memory,
and every value it returns is finite and small enough to be written as JSON. Arithmetic that
cannot be done (division by zero, overflow) is refused as `InvalidArgument`, never raised as
anything else. Pure: no I/O, no clock, no global state.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from everruns.errors import InvalidArgument

__all__ = ["MAX_EXPRESSION_CHARS", "evaluate", "to_json_number"]

MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 100
MAX_RESULT_BITS = 4096
"""Exact results beyond this size (about 1,200 decimal digits) are refused, and so are number
literals beyond it (``1e5000``, ``1e-5000``)."""

Number = Fraction | float

_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<op>\*\*|//|[-+*/%^()])"
    r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<other>\S)"
    r")"
)


_LITERAL = re.compile(r"(?P<whole>\d*)(?:\.(?P<fraction>\d*))?(?:[eE](?P<exponent>[+-]?\d+))?")


def _literal(token: str) -> Fraction:
    """Return the exact value of a number literal, refusing one beyond `MAX_RESULT_BITS`.

    The power of ten is bounded before it is built: ``Fraction("1e99999999")`` would compute
    10**99999999 (minutes of CPU). With its trailing zeros moved into the exponent, a literal
    whose power of ten exceeds 10**MAX_RESULT_BITS has a numerator (or denominator) of more
    than MAX_RESULT_BITS bits, so the bound refuses nothing the size check would accept.
    """
    match = _LITERAL.fullmatch(token)
    if match is None:  # the tokenizer only passes number literals
        raise InvalidArgument(f"{token[:30]!r} is not a number")
    fraction = match.group("fraction") or ""
    digits = match.group("whole") + fraction
    significant = digits.rstrip("0")
    if not significant.lstrip("0"):
        return Fraction(0)
    shift = int(match.group("exponent") or "0") - len(fraction) + len(digits) - len(significant)
    too_big = f"the number {token[:30]!r} is too large or too precise to compute exactly"
    if abs(shift) > MAX_RESULT_BITS:
        raise InvalidArgument(too_big)
    mantissa = int(significant)
    value = Fraction(mantissa * 10**shift) if shift >= 0 else Fraction(mantissa, 10**-shift)
    if _bits(value) > MAX_RESULT_BITS:
        raise InvalidArgument(too_big)
    return value


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            break  # only trailing whitespace is left
        position = match.end()
        if match.group("number") is not None:
            tokens.append(match.group("number"))
        elif match.group("op") is not None:
            tokens.append(match.group("op"))
        elif match.group("name") is not None:
            raise InvalidArgument(
                f"names are not allowed in an arithmetic expression, found {match.group('name')!r}"
            )
        else:
            raise InvalidArgument(
                f"unexpected character {match.group('other')!r} in the expression; use numbers, "
                "+ - * / // % ** ^ and parentheses"
            )
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def descend(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise InvalidArgument(f"the expression nests deeper than {MAX_DEPTH} levels")

    def expression(self) -> Number:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = _check_size(value + right if op == "+" else value - right)
        return value

    def term(self) -> Number:
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()
            right = self.unary()
            value = _multiplicative(op, value, right)
        return value

    def unary(self) -> Number:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.descend()
            operand = self.unary()
            self.depth -= 1
            return -operand if op == "-" else operand
        return self.power()

    def power(self) -> Number:
        base = self.atom()
        if self.peek() in ("**", "^"):
            self.take()
            self.descend()
            # Right-associative and tighter than a unary minus on its left: -2**2 == -4.
            exponent = self.unary()
            self.depth -= 1
            return _power(base, exponent)
        return base

    def atom(self) -> Number:
        token = self.peek()
        if token is None:
            raise InvalidArgument("the expression ends where a number was expected")
        if token == "(":
            self.take()
            self.descend()
            value = self.expression()
            self.depth -= 1
            if self.peek() != ")":
                raise InvalidArgument("a '(' is not closed")
            self.take()
            return value
        if token[0].isdigit() or token[0] == ".":
            self.take()
            return _literal(token)
        raise InvalidArgument(f"expected a number or '(' but found {token!r}")


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _check_size(value: Number) -> Number:
    if isinstance(value, Fraction):
        if _bits(value) > MAX_RESULT_BITS:
            raise InvalidArgument("the result is too large to compute exactly")
        return value
    if not math.isfinite(value):
        raise InvalidArgument("the result is too large (overflow)")
    return value


def _multiplicative(op: str, left: Number, right: Number) -> Number:
    if op == "*":
        return _check_size(left * right)
    if right == 0:
        raise InvalidArgument("division by zero" if op != "%" else "modulo by zero")
    if op == "/":
        return _check_size(left / right)
    if op == "//":
        floored = left // right
        return _check_size(Fraction(floored) if isinstance(floored, int) else floored)
    return _check_size(left % right)


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        n = exponent.numerator
        if base == 0 and n < 0:
            raise InvalidArgument("zero cannot be raised to a negative power")
        if isinstance(base, Fraction):
            if base in (0, 1, -1):
                return base**n
            # The result's size grows linearly with the exponent: refuse before computing.
            if _bits(base) * abs(n) > MAX_RESULT_BITS * 2:
                raise InvalidArgument("the result is too large to compute exactly")
            return _check_size(base**n)
        try:
            return _check_size(base ** float(n))
        except OverflowError as exc:
            raise InvalidArgument("the result is too large (overflow)") from exc
    if base == 0 and exponent < 0:
        raise InvalidArgument("zero cannot be raised to a negative power")
    if base < 0:
        raise InvalidArgument("a negative number raised to a fractional power is not real")
    try:
        return _check_size(float(base) ** float(exponent))
    except OverflowError as exc:
        raise InvalidArgument("the result is too large (overflow)") from exc


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression exactly where possible.

    Supports numbers (``12``, ``3.5``, ``.5``, ``1e3``), ``+ - * / // %``, powers with ``**``
    or ``^`` (right-associative, binding tighter than a unary minus on their left, as in
    Python), unary ``+``/``-`` and parentheses. Arithmetic is exact over fractions
    (``0.1 + 0.2`` is ``3/10``); a fractional power falls back to floating point.

    Args:
        expression: the text to evaluate.

    Returns:
        A `Fraction` (exact) of at most `MAX_RESULT_BITS` bits, or a finite float (after a
        fractional power).

    Raises:
        InvalidArgument: the text is empty, too long, not arithmetic (names, other
            characters), malformed, divides by zero, or a number in it or its result (or a
            step on the way) is too large.
    """
    if not isinstance(expression, str):
        raise InvalidArgument(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidArgument(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    tokens = _tokenize(expression)
    if not tokens:
        raise InvalidArgument("the expression is empty")
    parser = _Parser(tokens)
    try:
        value = parser.expression()
    except ZeroDivisionError as exc:  # e.g. a float step that rounded to zero, then divided
        raise InvalidArgument("division by zero") from exc
    except OverflowError as exc:  # a float step meeting an exact value beyond a float's range
        raise InvalidArgument("the result is too large (overflow)") from exc
    if parser.peek() is not None:
        raise InvalidArgument(f"unexpected {parser.peek()!r} after a complete expression")
    return value


def to_json_number(value: Number) -> int | float:
    """Return ``value`` as a JSON number: an int when it is integral, else the nearest float.

    Raises:
        InvalidArgument: a non-integral value is too large for a float.
    """
    if isinstance(value, Fraction):
        if value.denominator == 1:
            return value.numerator
        try:
            return float(value)
        except OverflowError as exc:
            raise InvalidArgument("the result is too large to show as a decimal") from exc
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value
