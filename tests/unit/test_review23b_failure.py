"""Review of 101bc22 (`everruns.worker.failure._trimmed`): an exception group's traceback
shows its first 15 errors.

Each test fails at 101bc22 and passes once its defect is mended. No I/O."""

from __future__ import annotations

from typing import Any

from everruns.worker.failure import MAX_LEAVES, error_from_exception
from tests.unit.test_review23_cap_failure import _Counted, _raised


def test_review23b_a_huge_group_in_the_context_of_the_error_is_formatted_whole() -> None:
    """The usual way a nursery's failure leaves an activity: ``except* OSError: raise
    FetchFailed(...)`` (or any ``except``/``raise`` around a nursery). The error raised is not
    a group, so `_trimmed` passes it as it is, and `short_traceback` formats its
    ``__context__``, the whole group: every one of its 20,000 errors is formatted (on the
    worker's Trio thread), as before the mend."""
    leaves = [_raised(_Counted()) for _ in range(20 * MAX_LEAVES)]
    try:
        try:
            raise ExceptionGroup("fan-out failed", leaves)
        except* _Counted:
            raise RuntimeError("the fan-out failed")  # noqa: B904 (the context is the point)
    except RuntimeError as caught:
        error: BaseException = caught
    assert isinstance(error.__context__, ExceptionGroup)
    _Counted.asked = 0
    described = error_from_exception(error)
    assert described["type"] == "builtins.RuntimeError"
    # At 101bc22: 20,000.
    assert _Counted.asked <= MAX_LEAVES, f"{_Counted.asked} errors formatted"


class _OddGroup(ExceptionGroup):  # type: ignore[type-arg]
    """A group subclass whose derive() returns nothing useful (a library's own group type
    that keeps extra state elsewhere); Python's own formatting never calls derive()."""

    def derive(self, excs: Any) -> Any:
        return None


def test_review23b_a_group_whose_derive_returns_no_group_fails_the_description() -> None:
    """`_trimmed` guards a derive() that raises ("a subclass whose derive() is broken"), not
    one that returns something other than an exception: ``shown.__traceback__ = ...`` then
    raises AttributeError out of `error_from_exception`, i.e. out of the worker's
    `_activity_failed` (before the mend, such a group was described as any other). The
    activity's failure is not reported as its own."""
    group = _raised(_OddGroup("odd", [_raised(ValueError(n)) for n in range(20)]))
    # At 101bc22: AttributeError: 'NoneType' object has no attribute '__traceback__'.
    described = error_from_exception(group)
    assert described["type"].endswith("_OddGroup")
    assert "ValueError" in described["traceback"]


class _SelfGroup(ExceptionGroup):  # type: ignore[type-arg]
    def derive(self, excs: Any) -> Any:
        return self


def test_review23b_a_group_whose_derive_returns_itself_gets_a_note_and_no_bound() -> None:
    """A derive() that returns the group itself: `_trimmed` sets the user's exception's
    ``__traceback__``/chain and adds a note to it (a side effect on the activity's own
    exception object, which the activity may still hold), and the traceback formats all
    of its errors."""
    group = _raised(_SelfGroup("same", [_raised(_Counted()) for _ in range(20 * MAX_LEAVES)]))
    _Counted.asked = 0
    error_from_exception(group)
    assert getattr(group, "__notes__", None) is None, (
        f"describing the error changed it: notes {group.__notes__!r}"
    )
    assert _Counted.asked <= MAX_LEAVES, f"{_Counted.asked} errors formatted"
