"""Review 23 (activity exception groups, 7c5207b): a huge group is described from at most
`MAX_LEAVES` of its errors, but its traceback is still built from every one of them.

`short_traceback(exc)` hands the whole group to `traceback.format_exception`, whose
`TracebackException` is built for every sub-exception (their frames, their text) before the
15 it prints are chosen. This runs on the worker's Trio thread: a nursery of 100,000 children
failing together (a fan-out whose network went away) stalls the worker for over a second
(heartbeats, leases, every other task) and the cost grows without bound. The bound predates
7c5207b (which only bounds the leaves it reads); counted here by the text each leaf is asked
for, which `TracebackException` reads as it is built. No I/O."""

from __future__ import annotations

from everruns.worker.failure import MAX_LEAVES, error_from_exception


class _Counted(Exception):
    asked = 0

    def __str__(self) -> str:
        _Counted.asked += 1
        return "the network went away"


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_review23_cap_a_huge_group_is_described_from_a_bounded_number_of_its_errors() -> None:
    leaves = [_raised(_Counted()) for _ in range(20 * MAX_LEAVES)]
    group = _raised(ExceptionGroup("fan-out failed", leaves))
    _Counted.asked = 0
    error = error_from_exception(group)
    assert error["type"] == "builtins.ExceptionGroup"
    assert error["traceback"]
    # On main: 20,000 (every leaf is formatted, 15 of them printed).
    assert _Counted.asked <= MAX_LEAVES, f"{_Counted.asked} errors formatted"
