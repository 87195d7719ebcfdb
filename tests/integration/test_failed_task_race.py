"""A workflow task that fails without input it never saw: the input still gets its try.

A signal or result appended while a workflow task is pending makes no task of its own (the
pending one absorbs its wake-up); if that task is then claimed by a statement whose snapshot
predates the input, its history lacks it. When that task fails (non-determinism, a workflow
task failure), the run is marked stuck as before, and since `FailWorkflowTaskRequest.seen_sequence`
says what the failed replay saw, a workflow task replays the run once more with the input.
Before, the input sat in the history with no workflow task to replay it until another event
came. The race is made exact as in `test_held_input.py`: the claimed task's history is cut
back to the snapshot that missed the input.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from everruns._proto.everruns import v1 as pb
from everruns.errors import InvalidArgument
from tests.integration.test_engine import Plane, plane
from tests.integration.test_held_input import _signal

pytestmark = pytest.mark.db


async def reads_the_signal(ctx: Any, input: Any) -> Any:
    return await ctx.wait_signal("go")


async def _report_failure(
    p: Plane, task: pb.Task, seen_sequence: int, *, non_determinism: bool = True
) -> None:
    """What a worker sends when its replay of ``task``, which saw up to ``seen_sequence``,
    fails."""
    error = {"type": "NonDeterminismError", "message": "diverged"}
    await p.fail_workflow_task(
        task, error, non_determinism=non_determinism, seen_sequence=seen_sequence
    )


async def _task_that_missed_a_signal(p: Plane) -> pb.Task:
    """Run "w" started, then signalled while its first workflow task is pending (the signal's
    wake-up is that task's), the task claimed with a history read before the signal."""
    await p.register(workflow_types=["wf"])
    await p.start("wf", wid="w")
    await _signal(p, "w", "go", "late")
    (task,) = await p.poll(wf=["wf"])
    assert "signal_received" in [e.type for e in task.history]
    task.history = [e for e in task.history if e.type != "signal_received"]
    return task


def _last(task: pb.Task) -> int:
    return task.history[-1].sequence_num


async def test_a_failed_task_that_missed_input_is_followed_by_a_replay_with_it(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await _task_that_missed_a_signal(p)
            await _report_failure(p, task, _last(task))
            stuck = await p.describe("w")
            assert stuck.status == "running" and "non-determinism" in stuck.stuck_reason
            assert (await p.history_types("w"))[-1] == "workflow_task_failed"
            # The signal's try: a workflow task replays the history, the signal included.
            (again,) = await p.poll(wf=["wf"], wait=5)
            assert "signal_received" in [e.type for e in again.history]
            reply = await p.run_workflow_task(again, reads_the_signal)
            assert reply.accepted
            final = await p.describe("w")
            assert final.status == "completed" and json.loads(final.result) == "late"
            assert not final.stuck_reason


async def test_a_failed_task_that_saw_every_input_leaves_the_run_stuck(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("wf")
            await _report_failure(p, task, _last(task), non_determinism=False)
            assert "workflow task failed" in (await p.describe("w")).stuck_reason
            assert await p.poll(wf=["wf"], wait=0.3) == []  # not retried in a loop

            # A new signal gives it another try (as before); that task fails too, having seen
            # every input: stuck again, no task.
            await _signal(p, "w", "go", 1)
            (again,) = await p.poll(wf=["wf"])
            assert again.history[-1].type == "signal_received"
            await _report_failure(p, again, _last(again))
            assert "non-determinism" in (await p.describe("w")).stuck_reason
            assert await p.poll(wf=["wf"], wait=0.3) == []


async def test_a_failure_after_only_diagnostic_events_makes_no_task(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await _task_that_missed_a_signal(p)
            await _report_failure(p, task, _last(task))
            (again,) = await p.poll(wf=["wf"], wait=5)
            # As if read before the first failure was recorded: only that diagnostic event
            # follows what it saw, no input.
            assert again.history[-1].type == "workflow_task_failed"
            seen = again.history[-2].sequence_num
            await _report_failure(p, again, seen)
            assert (await p.describe("w")).stuck_reason
            assert await p.poll(wf=["wf"], wait=0.3) == []


async def test_a_failure_from_an_older_worker_leaves_the_run_stuck_as_before(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await _task_that_missed_a_signal(p)
            await _report_failure(p, task, 0)  # seen_sequence unknown
            described = await p.describe("w")
            assert described.status == "running" and described.stuck_reason
            assert await p.poll(wf=["wf"], wait=0.3) == []


async def test_a_run_whose_cancel_was_requested_still_ends_cancelled(database_url: str) -> None:
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await _task_that_missed_a_signal(p)
            await p.channel.unary(
                p.workflows.cancel_workflow, pb.CancelWorkflowRequest(workflow_id="w", reason="x")
            )
            await _report_failure(p, task, _last(task))
            assert (await p.describe("w")).status == "cancelled"
            assert await p.poll(wf=["wf"], wait=0.3) == []


async def test_a_seen_sequence_outside_the_history_is_refused_and_records_nothing(
    database_url: str,
) -> None:
    """Refused as a completion's is (INVALID_ARGUMENT): the task stays claimed under its lease,
    the run is not marked stuck, and a well-formed report is then taken."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await _task_that_missed_a_signal(p)
            before = await p.history_types("w")
            for bad in (-1, len(before) + 1, 2**62):
                with pytest.raises(InvalidArgument, match=f"seen_sequence {bad} is outside"):
                    await _report_failure(p, task, bad)
            assert await p.history_types("w") == before
            assert not (await p.describe("w")).stuck_reason
            await _report_failure(p, task, _last(task))
            assert (await p.describe("w")).stuck_reason
            (again,) = await p.poll(wf=["wf"], wait=5)
            assert "signal_received" in [e.type for e in again.history]
