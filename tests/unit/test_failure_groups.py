"""An activity's exception group (what a Trio nursery raises) is read by its leaves: a lone
error is described as itself, any NonRetryableError makes the attempt final, and the longest
RetryAfter holds the next one back. Before, the group's type was all that was read: a
NonRetryableError raised in a nursery was retried, and a RetryAfter's delay was lost."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.retry import retry_after_of
from everruns.errors import NonRetryableError, RetryAfter
from everruns.worker.failure import MAX_LEAVES, _leaves, error_from_exception

leaf = st.one_of(
    st.builds(ValueError, st.text(max_size=5)),
    st.builds(NonRetryableError, st.text(max_size=5)),
    st.builds(RetryAfter, st.floats(min_value=0, max_value=1e6), st.text(max_size=5)),
    st.builds(KeyError, st.text(max_size=5)),
)


def groups(children: st.SearchStrategy[BaseException]) -> st.SearchStrategy[BaseException]:
    return st.lists(children, min_size=1, max_size=4).map(lambda e: ExceptionGroup("g", e))


tree = st.recursive(leaf, groups, max_leaves=12)


def flat(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [x for child in exc.exceptions for x in flat(child)]
    return [exc]


@given(tree)
def test_an_error_is_read_by_its_leaves(exc: BaseException) -> None:
    leaves = flat(exc)
    assert _leaves(exc) == leaves
    error = error_from_exception(exc)
    assert error["non_retryable"] is any(isinstance(x, NonRetryableError) for x in leaves)
    waits = [x.seconds for x in leaves if isinstance(x, RetryAfter)]
    assert retry_after_of(error) == (max(waits) if waits else None)
    lone = leaves[0] if len(leaves) == 1 else exc
    cls = type(lone)
    assert error["type"] == f"{cls.__module__}.{cls.__qualname__}"


def test_a_lone_error_in_nested_nurseries_is_described_as_itself() -> None:
    inner = ValueError("bad input 7")
    error = error_from_exception(ExceptionGroup("outer", [ExceptionGroup("inner", [inner])]))
    assert error["type"] == "builtins.ValueError"
    assert error["message"] == "bad input 7"
    assert error["non_retryable"] is False
    assert "ExceptionGroup" in error["traceback"]  # the traceback is still the group's


def test_a_non_retryable_error_beside_others_makes_the_attempt_final() -> None:
    exc = ExceptionGroup("two", [OSError("reset"), NonRetryableError("card declined")])
    error = error_from_exception(exc)
    assert error["type"] == "builtins.ExceptionGroup"
    assert error["non_retryable"] is True
    assert error_from_exception(exc, non_retryable=False)["non_retryable"] is False


def test_the_longest_retry_after_wins() -> None:
    exc = ExceptionGroup("two", [RetryAfter(3, "busy"), RetryAfter(7.5, "busier")])
    assert retry_after_of(error_from_exception(exc)) == 7.5


def test_a_huge_group_is_read_up_to_its_first_leaves() -> None:
    many: list[Any] = [ValueError(str(i)) for i in range(MAX_LEAVES * 3)]
    many.append(NonRetryableError("late"))
    leaves = _leaves(ExceptionGroup("many", many))
    assert len(leaves) == MAX_LEAVES
    assert leaves[0].args == ("0",)
