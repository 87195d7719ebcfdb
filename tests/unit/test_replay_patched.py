"""`ctx.patched`: changing a workflow's code while runs of it are under way. A run deciding
anew takes the new branch and records it; a run replaying a decision made before the change
takes the old one; a recorded patch the code no longer asks about is ignored."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain import history as h
from everruns.domain.commands import RecordPatch, command_from_dict
from everruns.domain.context import WorkflowContext
from everruns.domain.replay import Replayer, replay
from everruns.errors import InvalidArgument, NonDeterminismError
from tests.unit.test_replay import INFO, T0, Sim, commands_of


async def before(ctx: WorkflowContext, n: int) -> Any:
    """The code before the change."""
    total = await ctx.execute_activity("total_in_euros", n)
    await ctx.wait_signal("go")
    return await ctx.execute_activity("ship", total)


async def during(ctx: WorkflowContext, n: int) -> Any:
    """The change, the old code kept for runs that began before it."""
    if ctx.patched("cents"):
        total = await ctx.execute_activity("total_in_cents", n)
    else:
        total = await ctx.execute_activity("total_in_euros", n)
    await ctx.wait_signal("go")
    return await ctx.execute_activity("ship", total)


async def after(ctx: WorkflowContext, n: int) -> Any:
    """Once no run of the old code is open: the old branch and the call gone."""
    total = await ctx.execute_activity("total_in_cents", n)
    await ctx.wait_signal("go")
    return await ctx.execute_activity("ship", total)


def _finish(sim: Sim) -> dict[str, Any]:
    sim.release_all()
    sim.step()  # waits for the signal
    sim.signal("go", True)
    return sim.run()


def test_a_new_run_takes_the_new_branch_and_records_it() -> None:
    sim = Sim(during, 7)
    assert [c.describe() for c in sim.step()] == [
        "RecordPatch(id=cents)",
        "ScheduleActivity(id=1, type=total_in_cents)",
    ]
    assert _finish(sim) == h.workflow_completed("ship(total_in_cents(7))")
    assert [e for e in sim.events if e["type"] == h.PATCH_RECORDED] == [
        {"type": h.PATCH_RECORDED, "patch_id": "cents"}
    ]


def test_a_run_begun_before_the_change_keeps_the_old_branch() -> None:
    sim = Sim(before, 7)
    sim.step()
    sim.release_all()
    sim.step()  # waits for the signal, under the old code
    sim.wf = during  # the new code is deployed
    sim.signal("go", True)
    assert sim.run() == h.workflow_completed("ship(total_in_euros(7))")
    assert all(e["type"] != h.PATCH_RECORDED for e in sim.events)
    assert not any(isinstance(c, RecordPatch) for task in sim.tasks for c in task)


def test_a_patch_asked_first_after_the_change_takes_the_new_branch() -> None:
    """The old code never reached the point; the run reaches it after the change, deciding
    anew: the new branch (as the old run would take any new code there)."""

    async def later(ctx: WorkflowContext, n: int) -> Any:
        total = await ctx.execute_activity("total_in_euros", n)
        await ctx.wait_signal("go")
        carrier = "express" if ctx.patched("express") else "ship"
        return await ctx.execute_activity(carrier, total)

    sim = Sim(before, 7)
    sim.step()
    sim.release_all()
    sim.step()
    sim.wf = later
    sim.signal("go", True)
    assert sim.run() == h.workflow_completed("express(total_in_euros(7))")


def test_removing_the_old_branch_and_the_call_later_replays_cleanly() -> None:
    sim = Sim(during, 7)
    sim.step()
    _finish(sim)
    recorded = sim.history()
    again = replay(after, recorded, info=INFO, now=sim.clock)
    assert again.commands == [] and again.completed


def test_removing_the_old_branch_while_an_old_run_is_open_is_nondeterminism() -> None:
    sim = Sim(before, 7)
    sim.step()
    sim.release_all()
    with pytest.raises(NonDeterminismError, match="total_in_euros"):
        replay(after, sim.history(), info=INFO, now=sim.clock)


def test_the_answer_is_given_once_and_recorded_once() -> None:
    answers: list[bool] = []

    async def asks_twice(ctx: WorkflowContext, _: Any) -> Any:
        answers.append(ctx.patched("p"))
        await ctx.execute_activity("a", 1)
        answers.append(ctx.patched("p"))
        return answers[-2:]

    sim = Sim(asks_twice)
    assert sim.run() == h.workflow_completed([True, True])
    assert commands_of(sim)[0][0] == "RecordPatch(id=p)"
    assert sum(isinstance(c, RecordPatch) for task in sim.tasks for c in task) == 1


@pytest.mark.parametrize("bad", ["", "   ", "x" * 513, "a\x00b", 7, None])
def test_a_bad_patch_id_is_refused(bad: Any) -> None:
    async def asks(ctx: WorkflowContext, _: Any) -> Any:
        return ctx.patched(bad)

    result = Sim(asks).replay()
    (failed,) = result.commands
    assert failed.describe() == "FailWorkflow(type=everruns.errors.InvalidArgument)"
    assert "patch_id" in failed.to_dict()["error"]["message"]
    with pytest.raises(InvalidArgument):
        RecordPatch(bad)


def test_the_command_travels_as_json() -> None:
    command = RecordPatch("cents")
    assert command_from_dict(command.to_dict()) == command
    assert command.to_event() == {"type": h.PATCH_RECORDED, "patch_id": "cents"}
    with pytest.raises(InvalidArgument, match="lacks field"):
        command_from_dict({"type": "record_patch"})


def test_the_worker_cache_continues_a_patched_run() -> None:
    """`Replayer.advance` (a worker that kept the run's state) gives what a full replay gives."""
    sim = Sim(during, 7)
    replayer = Replayer(during, info=INFO)
    first = replayer.replay(sim.history(), now=sim.clock)
    assert first.commands[0].describe() == "RecordPatch(id=cents)"
    sim.step()
    sim.release_all()
    grown = sim.history()[replayer.seen_sequence :]
    step = replayer.advance(grown, now=sim.clock + timedelta(seconds=1))
    assert step is not None and step.commands == []  # waits for the signal
    replayer.close()


# --- many patches, many versions -----------------------------------------------------------------

ids = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=8)


def _asking(asked: list[str]) -> Any:
    async def wf(ctx: WorkflowContext, _: Any) -> Any:
        answers = {}
        for n, patch_id in enumerate(asked):
            answers[patch_id] = ctx.patched(patch_id)
            if n % 2:  # a decision boundary between some of the questions
                await ctx.execute_activity("step", n)
        return answers

    return wf


@given(ids, ids)
def test_any_version_replays_any_history_consistently(first: list[str], second: list[str]) -> None:
    """A run recorded by code asking ``first``, replayed (its end left out) by code asking
    ``second`` as many questions, with the same decisions between them: a question asked
    first in a replayed decision is True exactly when that decision recorded the patch, one
    asked first in the open decision is True, and the replay never fails on a patch."""
    second = (second * 8)[: len(first)]
    sim = Sim(_asking(first))
    final = sim.run()
    assert final["type"] == h.WORKFLOW_COMPLETED
    assert final["result"] == dict.fromkeys(first, True)
    recorded = sim.history()
    last = max(e.sequence_num for e in recorded if e.type == h.MARKER_EVENT_TYPE)
    history = recorded[: last - 1]  # not the last decision (its marker and what it recorded)
    again = replay(_asking(second), history, info=INFO, now=T0)
    # Question n is asked in decision n // 2; the open decision is the last, len // 2.
    recorded_in: dict[str, int] = {}
    for n, patch_id in enumerate(first):
        recorded_in.setdefault(patch_id, n // 2)
    expected: dict[str, bool] = {}
    for n, patch_id in enumerate(second):
        if patch_id not in expected:
            batch = n // 2
            expected[patch_id] = batch == len(first) // 2 or recorded_in.get(patch_id) == batch
    ended = again.commands[-1]
    assert ended.to_dict()["result"] == expected
    open_batch = len(first) // 2
    taken = [c.patch_id for c in again.commands if isinstance(c, RecordPatch)]
    assert taken == [p for p in expected if second.index(p) // 2 == open_batch]


def test_patches_of_one_decision_may_be_asked_in_another_order() -> None:
    async def a_then_b(ctx: WorkflowContext, _: Any) -> Any:
        return [ctx.patched("a"), ctx.patched("b"), await ctx.execute_activity("x", 1)]

    async def b_then_a(ctx: WorkflowContext, _: Any) -> Any:
        return [ctx.patched("b"), ctx.patched("a"), await ctx.execute_activity("x", 1)]

    sim = Sim(a_then_b)
    sim.run()
    again = replay(b_then_a, sim.history(), info=INFO, now=sim.clock)
    assert again.commands == [] and again.completed


def test_a_patch_taken_that_its_decision_did_not_record_is_nondeterminism() -> None:
    """A worker that kept a run's state took a patch in its decision; the marker then comes
    back with a record that lacks it (not this decision's): replay says so."""
    sim = Sim(during, 7)
    replayer = Replayer(during, info=INFO)
    first = replayer.replay(sim.history(), now=sim.clock)
    assert isinstance(first.commands[0], RecordPatch)
    sim.events.append(h.workflow_task_completed("worker-1", sim.clock))
    sim.events.append(h.activity_scheduled("1", "total_in_cents", 7, {}))
    with pytest.raises(NonDeterminismError, match="did not record"):
        replayer.advance(sim.history()[1:], now=sim.clock)
    replayer.close()
