"""`ctx.continue_as_new`, pure: the command it issues, its replay, what it carries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain import history as h
from everruns.domain.commands import (
    ContinueAsNewWorkflow,
    FailWorkflow,
    command_from_dict,
    is_terminal,
)
from everruns.domain.history import HistoryEvent
from everruns.domain.replay import replay, superseded_by
from everruns.errors import ContinueAsNew, InvalidArgument, WorkflowCancelled
from tests.unit.test_replay import Sim


async def counter(ctx: Any, n: int) -> Any:
    await ctx.execute_activity("tick", n)
    if n < 3:
        ctx.continue_as_new(n + 1)
    return n


def test_it_ends_the_run_with_the_new_input_and_replays_as_it_was_decided() -> None:
    sim = Sim(counter, 0)
    final = sim.run()
    assert final == {"type": h.WORKFLOW_CONTINUED_AS_NEW, "input": 1, "signals": []}
    assert isinstance(sim.tasks[-1][-1], ContinueAsNewWorkflow)
    again = replay(counter, sim.history(), info=sim.info, now=sim.clock)
    assert again.commands == [] and again.completed


def test_except_exception_does_not_stop_it() -> None:
    async def careful(ctx: Any, _: Any) -> Any:
        try:
            ctx.continue_as_new("next")
        except Exception:
            return "caught"
        return "not reached"

    final = Sim(careful, None).run()
    assert final["type"] == h.WORKFLOW_CONTINUED_AS_NEW and final["input"] == "next"


def test_an_input_that_is_not_json_fails_the_run() -> None:
    async def bad(ctx: Any, _: Any) -> Any:
        ctx.continue_as_new({1, 2})

    async def by_hand(ctx: Any, _: Any) -> Any:
        raise ContinueAsNew(object())

    for wf in (bad, by_hand):
        sim = Sim(wf, None)
        sim.run()
        (command,) = sim.tasks[-1]
        assert isinstance(command, FailWorkflow)
        assert "continue_as_new" in command.error["message"]


signal_names = st.sampled_from(["a", "b", "c"])


@given(
    before=st.lists(st.tuples(signal_names, st.integers()), max_size=8),
    after=st.lists(st.tuples(signal_names, st.integers()), max_size=4),
    takes=st.integers(0, 4),
)
def test_the_signals_no_wait_took_go_on_in_arrival_order(
    before: list[tuple[str, int]], after: list[tuple[str, int]], takes: int
) -> None:
    """Signals buffered before the code decides to continue, less those it takes, then
    those of the same batch that arrive after it decided: carried once each, in the order
    they arrived."""

    async def taker(ctx: Any, _: Any) -> Any:
        await ctx.wait_signal("go")
        for _ in range(takes):
            try:
                await ctx.wait_signal("a", timeout=0)
            except TimeoutError:
                break
        ctx.continue_as_new(None)

    sim = Sim(taker, None)
    sim.step()
    for name, value in before:
        sim.signal(name, value)
    sim.signal("go", None)
    for name, value in after:
        sim.signal(name, value)
    sim.step()
    (command,) = sim.tasks[-1]
    assert isinstance(command, ContinueAsNewWorkflow)
    taken = 0
    expected = []
    for name, value in before:
        if name == "a" and taken < takes:
            taken += 1
            continue
        expected.append({"name": name, "payload": value})
    expected += [{"name": name, "payload": value} for name, value in after]
    # named by sequence number: the control plane copies the events themselves
    carried = [sim.events[seq - 1] for seq in command.signals]
    assert [{"name": e["name"], "payload": e["payload"]} for e in carried] == expected
    sim.check_replays()


def test_the_command_travels_as_json_and_is_checked() -> None:
    command = ContinueAsNewWorkflow(input={"n": 1}, signals=[4, 7], cancel=True)
    assert is_terminal(command)
    assert command_from_dict(command.to_dict()) == command
    assert command_from_dict({"type": "continue_as_new"}) == ContinueAsNewWorkflow()
    for bad in (
        {"type": "continue_as_new", "signals": "go"},
        {"type": "continue_as_new", "signals": [0]},
        {"type": "continue_as_new", "signals": [True]},
        {"type": "continue_as_new", "signals": [{"name": "go"}]},
        {"type": "continue_as_new", "cancel": "yes"},
        {"type": "continue_as_new", "new_run_id": "x"},
    ):
        with pytest.raises(InvalidArgument):
            command_from_dict(bad)


def test_any_input_arriving_while_it_travels_supersedes_it() -> None:
    """Ending the run without seeing a signal would lose it: the decision is made again."""
    signal = HistoryEvent.of(9, h.signal_received("go", 1), time=datetime(2024, 1, 1, tzinfo=UTC))
    assert superseded_by([ContinueAsNewWorkflow(input=1)], [signal]) == signal


def _continued(wf: Any, input: Any, *carried: tuple[str, Any]) -> Sim:
    """A run that continues another: its start names the run, the signals it carries follow."""
    sim = Sim(wf, input)
    sim.events[0] = {**sim.events[0], "continued_from": "run-0"}
    for name, value in carried:
        sim.events.append({**h.signal_received(name, value), "carried": True})
    return sim


def test_a_continued_runs_code_finds_the_carried_signals_waiting() -> None:
    """Its code takes its first step once they are buffered, as the run it continues left
    them: a poll at the start finds them (delivered one by one, the code ran at the start
    event and found none)."""

    async def counter(ctx: Any, _: Any) -> Any:
        taken = []
        while True:
            try:
                taken.append(await ctx.wait_signal("blob", timeout=0))
            except TimeoutError:
                return taken

    final = _continued(counter, None, ("blob", 1), ("other", 2), ("blob", 3)).run()
    assert final == {"type": h.WORKFLOW_COMPLETED, "result": [1, 3]}


def test_a_cancel_in_a_continued_runs_first_task_reaches_its_code() -> None:
    async def cleans_up(ctx: Any, _: Any) -> Any:
        try:
            return await ctx.wait_signal("never")
        except WorkflowCancelled:
            await ctx.execute_activity("compensate", 1)
            raise

    sim = _continued(cleans_up, None, ("x", 1))
    sim.cancel()
    commands = sim.step()
    assert [c.describe() for c in commands] == ["ScheduleActivity(id=1, type=compensate)"]


def test_a_cancel_the_code_did_not_see_goes_on_with_the_run() -> None:
    async def continues(ctx: Any, _: Any) -> Any:
        await ctx.execute_activity("tick", 1)
        ctx.continue_as_new(None)

    sim = Sim(continues, None)
    sim.step()
    sim.release_all()  # the activity's result: the code continues at once
    sim.cancel()  # in the same workflow task, after the code ended
    (command,) = sim.step()
    assert isinstance(command, ContinueAsNewWorkflow) and command.cancel
    seen = Sim(continues, None)
    seen.step()
    seen.cancel()  # before the result: the code sees it and fails at its await
    seen.release_all()
    (command,) = seen.step()
    assert not isinstance(command, ContinueAsNewWorkflow)
