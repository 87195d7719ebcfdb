"""ActivityContext: info, attempt, heartbeat details (thread-safe, JSON-checked)."""

from __future__ import annotations

import threading

import pytest

from everruns.errors import PayloadError
from everruns.worker import ActivityContext, ActivityInfo


def _info(attempt: int = 2) -> ActivityInfo:
    return ActivityInfo(
        workflow_id="wf-1",
        run_id="r-1",
        workflow_type="checkout",
        activity_id="3",
        activity_type="charge",
        attempt=attempt,
        max_attempts=5,
    )


def test_info_attempt_and_previous_details() -> None:
    ctx = ActivityContext(_info(), heartbeat_details={"done": 40})
    assert ctx.attempt == 2
    assert ctx.info.activity_id == "3"
    assert ctx.heartbeat_details == {"done": 40}
    assert not ctx.cancel_requested


def test_heartbeat_records_latest_details_and_wakes() -> None:
    pokes: list[int] = []
    ctx = ActivityContext(_info(), on_heartbeat=lambda: pokes.append(1))
    ctx.heartbeat({"done": 1})
    ctx.heartbeat({"done": 2})
    ctx.heartbeat()  # no new details: the last ones stay pending
    assert len(pokes) == 3
    assert ctx._take_details() == b'{"done":2}'
    assert ctx._take_details() is None
    ctx._requeue_details(b'{"done":2}')
    ctx.heartbeat({"done": 3})
    assert ctx._take_details() == b'{"done":3}'


def test_heartbeat_refuses_non_json_details_naming_the_type() -> None:
    ctx = ActivityContext(_info())
    with pytest.raises(PayloadError, match="set"):
        ctx.heartbeat({1, 2})


def test_heartbeat_from_threads() -> None:
    ctx = ActivityContext(_info(), on_heartbeat=lambda: None)
    threads = [threading.Thread(target=ctx.heartbeat, args=({"n": i},)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ctx._take_details() is not None
