"""Review 22: `ctx.patched` refuses every patch id it cannot record with InvalidArgument, as its
docstring promises, instead of failing otherwise (or leaving the run stuck)."""

from __future__ import annotations

from typing import Any

import pytest

from everruns.domain import payload
from everruns.domain.context import WorkflowContext
from tests.unit.test_replay import Sim


def test_an_unhashable_patch_id_fails_the_workflow_with_invalid_argument() -> None:
    """`patched` looks its cache up before it checks the id: a list gets TypeError
    ('unhashable type'), not the documented InvalidArgument naming patch_id."""

    async def asks(ctx: WorkflowContext, _: Any) -> Any:
        return ctx.patched(["tax-in-cents"])  # type: ignore[arg-type]

    (failed,) = Sim(asks).replay().commands
    assert failed.describe() == "FailWorkflow(type=everruns.errors.InvalidArgument)"
    assert "patch_id" in failed.to_dict()["error"]["message"]


def test_a_patch_id_utf8_cannot_carry_is_refused_in_workflow_code() -> None:
    """A lone surrogate passes check_name (no check_utf8), so `patched` answers True and
    issues RecordPatch; the worker then cannot encode the commands (PayloadError), fails the
    workflow task and the run is marked stuck, on every worker, instead of the workflow
    failing with the documented InvalidArgument."""

    async def asks(ctx: WorkflowContext, _: Any) -> Any:
        return ctx.patched("cents-\ud800")

    commands = Sim(asks).replay().commands
    # What the worker sends must be sendable...
    payload.encode([c.to_dict() for c in commands], what="workflow commands")
    # ...and the refusal is the workflow's InvalidArgument.
    (failed,) = commands
    assert failed.describe() == "FailWorkflow(type=everruns.errors.InvalidArgument)"


@pytest.mark.parametrize(
    "call",
    [
        lambda ctx: ctx.execute_activity("charge-\ud800", 1),
        lambda ctx: ctx.execute_child_workflow("ship", 1, workflow_id="order-\udce9"),
        lambda ctx: ctx.execute_child_workflow("ship-\ud800", 1),
    ],
    ids=["activity type", "child workflow id", "child workflow type"],
)
def test_any_command_name_utf8_cannot_carry_fails_the_workflow(call: Any) -> None:
    """The same gap in the commands `ctx.patched` joined (found with it): a name with a lone
    surrogate was accepted by workflow code, and the decision then could not be encoded, so
    every workflow task failed and the run stayed stuck. Now the workflow fails at the call
    with InvalidArgument, as for any other bad name."""

    async def wf(ctx: WorkflowContext, _: Any) -> Any:
        return await call(ctx)

    commands = Sim(wf).replay().commands
    payload.encode([c.to_dict() for c in commands], what="workflow commands")
    (failed,) = commands
    assert failed.describe() == "FailWorkflow(type=everruns.errors.InvalidArgument)"
    assert "cannot be sent" in failed.to_dict()["error"]["message"]
