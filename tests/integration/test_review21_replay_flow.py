"""Review (session 21) of the workflow model and deterministic replay, end to end: values the
payload layer accepts that leave a run stuck instead of ending it. Each test fails on the code
it was written against."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from everruns.client import WorkflowHandle
from everruns.domain.registry import Registry, activity, workflow
from everruns.errors import WorkflowFailed
from everruns.worker import ActivityContext
from tests.integration.test_activity_edges import served

pytestmark = pytest.mark.db

DEPTH = 600  # exact JSON well inside the payload layer's limit (Python's recursion limit)


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


async def _ending(handle: WorkflowHandle) -> tuple[str, Any]:
    """("completed", result) or ("failed", error type); ("open", stuck reason) after 8 s."""
    try:
        return "completed", await handle.result(timeout=8)
    except WorkflowFailed as exc:
        return exc.status, (exc.error or {}).get("type")
    except TimeoutError:
        return "open", (await handle.describe()).stuck_reason


async def test_a_nested_activity_result_does_not_leave_the_run_stuck(database_url: str) -> None:
    """Defect: an activity returns a list nested 600 deep. The activity worker encodes and
    sends it (exact JSON), the control plane records it, and then every replay of the run
    raises RecursionError (`copy.deepcopy` of the result in `WorkflowContext._apply_input`):
    the workflow task fails and the run stays open and stuck, though code and value are fine.
    Expected: the workflow gets the result and completes."""
    registry = Registry()

    @activity(registry=registry)
    async def fetch_tree(ctx: ActivityContext, _: Any) -> Any:
        return _nested(DEPTH)

    @workflow(registry=registry)
    async def tree_depth(ctx: Any, _: Any) -> Any:
        return _depth(await ctx.execute_activity(fetch_tree, None))

    with trio.fail_after(30):
        async with served(database_url, registry) as (client, _):
            handle = await client.start_workflow(tree_depth, None)
            assert await _ending(handle) == ("completed", DEPTH)


async def test_a_workflow_error_with_a_lone_surrogate_fails_the_run(database_url: str) -> None:
    """Defect: workflow code raises FileNotFoundError naming a file whose name came from
    `os.fsdecode` (a lone surrogate, as for any non-UTF-8 name). Replay turns it into a
    FailWorkflow, but the worker cannot encode that command (`payload.encode` in `_decide`,
    runtime.py), reports a workflow task failure instead, and the run stays open and stuck
    for good. docs/internals.md: a bug in workflow code that raises is the workflow's failure
    (`workflow_failed`). Expected: the run ends failed with the FileNotFoundError."""
    registry = Registry()
    name = os.fsdecode(b"report-caf\xe9.csv")

    @workflow(registry=registry)
    async def read_report(ctx: Any, _: Any) -> Any:
        raise FileNotFoundError(f"no such file: {name}")

    with trio.fail_after(30):
        async with served(database_url, registry) as (client, _):
            handle = await client.start_workflow(read_report, None)
            assert await _ending(handle) == ("failed", "FileNotFoundError")
