"""Review 22: `everruns.RetryAfter` behaves as an exception must when it crosses a process
boundary (pickled), as a sync activity that offloads its work to a process pool does."""

from __future__ import annotations

import copy
import pickle

from everruns.errors import RetryAfter


def test_retry_after_survives_pickling() -> None:
    """RetryAfter passes only ``message`` to Exception.__init__, so ``args`` is
    ``(message,)`` and unpickling calls ``RetryAfter(message)``: InvalidArgument ('seconds
    must be a finite number ... got 'busy''). In a concurrent.futures.ProcessPoolExecutor
    the worker process's RetryAfter then breaks the whole pool (BrokenProcessPool) instead
    of reaching the activity."""
    exc = RetryAfter(30, "busy")
    again = pickle.loads(pickle.dumps(exc))
    assert isinstance(again, RetryAfter)
    assert again.seconds == 30.0
    assert str(again) == "busy"


def test_retry_after_can_be_copied() -> None:
    exc = RetryAfter(2.5)
    again = copy.copy(exc)
    assert again.seconds == 2.5
    assert str(again) == str(exc)
