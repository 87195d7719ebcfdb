"""Review (session 21) of the workflow model and deterministic replay: values the payload layer
accepts that replay then cannot handle, gathered branches that never see their cancellation
through, and asyncio primitives taken for the workflow's own failure. Pure (no I/O); each
test fails on the code it was written against."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from everruns.domain import payload
from everruns.domain.commands import CompleteWorkflow, FailWorkflow
from everruns.domain.context import WorkflowContext
from everruns.errors import IllegalAwait, WorkflowCancelled
from tests.unit.test_replay import Sim

# Well inside what the payload layer accepts (it refuses only nesting "deeper than Python's
# recursion limit", 1,000), and inside what `json.loads` reads back.
DEPTH = 600


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        value, depth = value[0], depth + 1
    return depth


def test_a_nested_activity_result_the_payload_layer_accepts_replays() -> None:
    """Defect: an activity result nested ~600 deep (exact JSON: the activity worker's
    `payload.encode` accepts it, the history reads back) makes replay itself raise
    RecursionError: `WorkflowContext._apply_input` runs `copy.deepcopy` on the result, which
    needs about two frames a level, outside any workflow step. The worker reports a workflow
    task failure and the run is stuck on every retry, though nothing is wrong with the value
    or the code. Expected: the workflow receives the result (or, at worst, sees an error it can
    handle), and replay returns normally."""

    async def wf(ctx: WorkflowContext, _: Any) -> Any:
        result = await ctx.execute_activity("fetch_tree", None)
        return _depth(result)

    value = _nested(DEPTH)
    # Exact JSON both ways: the activity worker sends it, the history reads it back.
    assert payload.decode(payload.encode(value, what="result")) == value
    sim = Sim(wf, activities={"fetch_tree": lambda _: value})
    sim.step()
    sim.release_all()
    try:
        result = sim.replay()
    except RecursionError as exc:
        raise AssertionError(
            "replay raised RecursionError out of the driver for an activity result the "
            "payload layer accepts: the run is left stuck"
        ) from exc
    assert result.commands == [CompleteWorkflow(result=DEPTH)], result.commands


def test_a_nested_signal_payload_the_payload_layer_accepts_replays() -> None:
    """Defect: as for an activity result, a signal payload nested ~600 deep makes replay raise
    RecursionError (`WorkflowContext._deliver_signal` deep-copies it outside any workflow
    step). Expected: the workflow receives the payload."""

    async def wf(ctx: WorkflowContext, _: Any) -> Any:
        return _depth(await ctx.wait_signal("tree"))

    sim = Sim(wf)
    sim.step()
    sim.signal("tree", _nested(DEPTH))
    try:
        result = sim.replay()
    except RecursionError as exc:
        raise AssertionError(
            "replay raised RecursionError out of the driver for a signal payload the "
            "payload layer accepts: the run is left stuck"
        ) from exc
    assert result.commands == [CompleteWorkflow(result=DEPTH)], result.commands


def test_a_nested_workflow_input_the_payload_layer_accepts_reaches_the_workflow() -> None:
    """Defect: a workflow input nested ~600 deep (the client's `payload.encode` accepts it)
    fails the workflow with RecursionError before its first line runs: the driver's `_main`
    deep-copies the input (replay.py `_main`). Expected: the workflow function is called
    with the input."""

    async def wf(ctx: WorkflowContext, tree: Any) -> Any:
        return _depth(tree)

    result = Sim(wf, _nested(DEPTH)).replay()
    assert result.commands == [CompleteWorkflow(result=DEPTH)], [
        c.describe() for c in result.commands
    ]


@pytest.mark.parametrize(
    "message",
    [
        # os.fsdecode of a Latin-1 file name on a UTF-8 system: surrogateescape.
        "no such file: " + os.fsdecode(b"report-caf\xe9.csv"),
        # Text from a JSON "\\udce9" escape.
        "bad name caf\udce9",
    ],
    ids=["fsdecode", "json-escape"],
)
def test_a_workflow_failure_whose_message_holds_a_lone_surrogate_can_be_sent(message: str) -> None:
    """Defect: workflow code raising an exception whose message holds a lone surrogate (a
    file name from `os.fsdecode`, say) gives a FailWorkflow whose error the worker cannot
    encode: `_decide` (runtime.py) runs `payload.encode` over the commands, which raises
    PayloadError, and reports a workflow task failure instead; the run is left stuck for good
    rather than failed. docs/internals.md: "A bug in workflow code that raises is the
    workflow's failure (`workflow_failed`), even when the exception cannot be turned into
    text". (A workflow *result* with a lone surrogate is already turned into a FailWorkflow
    with a PayloadError; the failure path has no such guard.) Expected: the FailWorkflow's
    error is exact JSON the worker can send (the surrogate escaped or replaced)."""

    async def wf(ctx: WorkflowContext, _: Any) -> Any:
        raise FileNotFoundError(message)

    result = Sim(wf).replay()
    (command,) = result.commands
    assert isinstance(command, FailWorkflow)
    assert command.error["type"] == "FileNotFoundError"
    # What the worker does with the commands before it sends them (runtime.py `_decide`).
    payload.encode([c.to_dict() for c in result.commands], what="workflow commands")


async def _book(ctx: WorkflowContext, what: str) -> Any:
    """One branch of a saga: reserve, wait for confirmation, release if cancelled."""
    booking = await ctx.execute_activity("reserve", what)
    try:
        await ctx.wait_signal(f"confirm-{what}")
    except WorkflowCancelled:
        await ctx.execute_activity("release", booking)  # compensation
        raise
    return booking


def test_cancellation_lets_gathered_branches_run_their_cleanup() -> None:
    """Defect: a workflow cancelled while ``ctx.gather`` waits on branches that catch
    WorkflowCancelled to compensate ends at once with CancelWorkflow: the interrupted gather
    (creation index 0) is stepped first, re-raises, ends the workflow, and the driver stops
    before the branches it also interrupted run, so their ``release`` activities are never
    scheduled. Awaited directly, the same branch does compensate. DESIGN.md: the workflow
    "sees a cancellation exception at its current await, may run cleanup activities, and
    ends cancelled"; ctx.gather's docstring: WorkflowCancelled "is raised here and in every
    blocked child". asyncio.gather (Temporal's model) and a Trio nursery both let the
    children finish their cancellation before the waiting parent goes on. Expected: both
    branches schedule ``release`` before the workflow is cancelled."""

    async def trip(ctx: WorkflowContext, _: Any) -> Any:
        return await ctx.gather(_book(ctx, "flight"), _book(ctx, "hotel"))

    sim = Sim(trip)
    sim.step()  # reserve flight, reserve hotel
    sim.release_all()
    sim.step()  # both wait for confirmation
    sim.cancel()
    issued = [c.describe() for c in sim.step()]
    releases = [c for c in issued if "type=release" in c]
    assert len(releases) == 2, (
        f"cancelled while gathering two compensating branches, the workflow issued {issued}: "
        "their cleanup never ran"
    )


@pytest.mark.parametrize(
    "wait",
    [
        lambda: asyncio.Event().wait(),
        lambda: asyncio.Queue().get(),
        lambda: asyncio.Semaphore(0).acquire(),
    ],
    ids=["Event.wait", "Queue.get", "Semaphore.acquire"],
)
def test_awaiting_an_asyncio_primitive_is_an_illegal_await(wait: Any) -> None:
    """Defect: workflow code that awaits an asyncio primitive (``asyncio.Event().wait()``,
    ``asyncio.Queue().get()``, a contended Semaphore) ends the run *failed*, for good, with
    ``AttributeError: 'NoneType' object has no attribute 'create_future'``: the primitive
    binds to no loop (none runs), and `_illegal_call` (replay.py) recognises only a
    RuntimeError or a loop's own BaseException as a foreign call, so the AttributeError is
    taken for the workflow's own failure. Awaiting ``asyncio.sleep(0)``, an asyncio future or
    any Trio call is an IllegalAwait instead (the workflow task fails, the run waits for fixed
    code). DESIGN.md: awaiting anything else "(trio.sleep, an asyncio future, a network
    call)" is stopped "with an error that says so and names the ctx method to use instead".
    Expected: IllegalAwait naming the asyncio call, as for asyncio.sleep."""

    async def wf(ctx: WorkflowContext, _: Any) -> Any:
        await wait()
        return "woken"

    try:
        result = Sim(wf).replay()
    except IllegalAwait as exc:
        assert "asyncio" in str(exc) and "ctx." in str(exc), str(exc)
        return
    raise AssertionError(
        "awaiting an asyncio primitive was taken for the workflow's own failure: "
        f"{[c.describe() for c in result.commands]} "
        f"{[getattr(c, 'error', {}).get('message') for c in result.commands]}"
    )
