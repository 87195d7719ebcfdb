"""Values JSON or UTF-8 cannot carry, and replay that must notice changed code.

Pure unit tests of the replay core and payload layer (no I/O). They reuse the in-memory
control-plane stand-in `Sim` of test_replay.
"""

from __future__ import annotations

from typing import Any

import pytest

from everruns.domain import history as h
from everruns.domain import payload
from everruns.domain.commands import FailWorkflow, ScheduleActivity
from everruns.domain.context import WorkflowContext
from everruns.domain.replay import replay
from everruns.errors import NonDeterminismError, PayloadError
from tests.unit.test_replay import INFO, Sim


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _circular() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


# ---------------------------------------------------------------- 1. deep / circular payloads


@pytest.mark.parametrize("make", [lambda: _nested(5000), _circular], ids=["deep", "circular"])
def test_unencodable_nesting_in_a_workflow_result_fails_the_workflow(make: Any) -> None:
    """replay() promises: "a result that is not exact JSON gives FailWorkflow with a
    PayloadError". A deeply nested (or self-referencing) result instead makes replay itself
    raise RecursionError, so the workflow task fails (the run is marked stuck) on every try."""

    async def wf(ctx: WorkflowContext, _: None) -> Any:
        return make()

    result = Sim(wf).replay()  # not a RecursionError out of replay()
    (command,) = result.commands
    assert isinstance(command, FailWorkflow)
    assert command.error["type"] == "everruns.errors.PayloadError"


@pytest.mark.parametrize("make", [lambda: _nested(5000), _circular], ids=["deep", "circular"])
def test_unencodable_nesting_is_a_payload_error_everywhere(make: Any) -> None:
    """The payload layer promises PayloadError for "values JSON cannot carry". Deep nesting and
    cycles raise RecursionError instead, which callers that catch PayloadError (the worker's
    activity-result path, runtime.py:_call_activity) do not catch."""
    with pytest.raises(PayloadError):
        payload.encode(make(), what="result")


# ---------------------------------------------------------------- 2. lone surrogates


def test_lone_surrogate_is_a_payload_error() -> None:
    """A str with a lone surrogate is JSON-encodable as text (ensure_ascii=False) but not as
    UTF-8 bytes: payload.encode raises UnicodeEncodeError, not PayloadError."""
    with pytest.raises(PayloadError):
        payload.encode({"name": "caf\udce9"}, what="activity input")


def test_lone_surrogate_activity_input_is_refused_in_workflow_code() -> None:
    """ctx.start_activity checks its input "here, inside workflow code, where the user can see
    it" (context.py:_json_copy). It round-trips through encode_text (a str), so a lone
    surrogate passes; the worker's payload.encode of the commands then raises
    UnicodeEncodeError and the run is marked stuck instead of the workflow seeing a
    PayloadError it could handle."""

    async def wf(ctx: WorkflowContext, _: None) -> str:
        try:
            await ctx.execute_activity("store", "caf\udce9")
        except PayloadError:
            return "refused"
        return "scheduled"

    result = Sim(wf).replay()
    issued = [c.describe() for c in result.commands]
    assert not any(isinstance(c, ScheduleActivity) for c in result.commands), issued
    for command in result.commands:  # what the worker does with them (runtime.py _decide)
        payload.encode(command.to_dict(), what="workflow commands")


# ---------------------------------------------------------------- 3. child workflow id change


def test_changed_child_workflow_id_is_nondeterminism() -> None:
    """The child_workflow_started event records the child's workflow_id, but _matches
    (replay.py) compares only child_id and workflow_type: code changed to start the child
    under another workflow_id replays silently, and its handle names a workflow that was
    never started (handle.workflow_id == 'order-42:ship:v2', the real child is ':v1')."""

    async def v1(ctx: WorkflowContext, _: None) -> Any:
        return await ctx.execute_child_workflow("ship", 1, workflow_id="order-42:ship:v1")

    async def v2(ctx: WorkflowContext, _: None) -> Any:
        return await ctx.execute_child_workflow("ship", 1, workflow_id="order-42:ship:v2")

    sim = Sim(v1)
    sim.step()
    sim.release_all()
    assert sim.events[-1]["type"] == h.CHILD_WORKFLOW_COMPLETED
    with pytest.raises(NonDeterminismError, match=r"workflow_id|order-42:ship"):
        replay(v2, sim.history(), info=INFO, now=sim.clock)
