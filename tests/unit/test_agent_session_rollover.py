"""The session workflow's rollover, pure: after TURNS_PER_RUN turns a run ends at its first
quiet moment (messages already there get their turns first), and a run begun before the
rollover existed replays as it was decided and keeps waiting."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns.agent import workflow as agent_workflow
from everruns.agent.workflow import agent_session
from everruns.domain import history as h
from everruns.domain.commands import CompleteWorkflow, StartChildWorkflow
from everruns.domain.replay import replay
from tests.unit.test_agent_workflow import Sim


def message(n: int) -> dict[str, Any]:
    return {"message_id": f"m{n}", "text": f"question {n}", "max_steps": 10}


def answer(command: StartChildWorkflow) -> Any:
    text = command.input["message"]["text"]
    return {"messages": [{"role": "user", "content": text}]}


def session(first_turn: int = 1) -> Sim:
    return Sim(
        agent_session,
        {"session_id": "s", "first_turn": first_turn},
        workflow_id="session:s",
        children=answer,
    )


def turns_started(sim: Sim) -> list[int]:
    return [
        e["input"]["turn"]
        for e in sim.events
        if e["type"] == h.CHILD_WORKFLOW_STARTED and isinstance(e.get("input"), dict)
    ]


def test_a_run_ends_after_its_turns_when_no_message_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent_workflow, "TURNS_PER_RUN", 2)
    sim = session(first_turn=7)
    sim.step()
    sim.signal("message", message(1))
    sim.signal("message", message(2))
    final = sim.run()
    assert turns_started(sim) == [7, 8]
    result = final["result"]
    assert result["rolled_over"] is True and result["closed"] is False
    assert result["next_turn"] == 9 and result["turns"] == 2
    assert [m["content"] for turn in result["context"] for m in turn] == [
        "question 1",
        "question 2",
    ]
    assert h.PATCH_RECORDED in [e["type"] for e in sim.events]


@settings(max_examples=60, deadline=None)
@given(per_run=st.integers(1, 4), extra=st.integers(0, 6))
def test_messages_already_there_get_their_turns_before_the_run_ends(
    per_run: int, extra: int
) -> None:
    """However many messages wait when the run reaches its turns, each gets one turn, in
    order, and the run then ends without losing one."""
    waiting = per_run + extra
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agent_workflow, "TURNS_PER_RUN", per_run)
        sim = session()
        sim.step()
        for n in range(waiting):
            sim.signal("message", message(n))
        final = sim.run()
    assert turns_started(sim) == list(range(1, waiting + 1))
    assert final["result"]["rolled_over"] is True
    assert final["result"]["next_turn"] == waiting + 1


def test_a_run_begun_before_the_rollover_replays_and_keeps_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its history has more turns than TURNS_PER_RUN and no patch: replaying it with the
    rollover in the code must give the same commands (no non-determinism), and the run goes
    on waiting for messages, as the code it began under did."""
    monkeypatch.setattr(agent_workflow, "TURNS_PER_RUN", 10**6)  # the code before
    sim = session()
    sim.step()
    for n in range(3):
        sim.signal("message", message(n))
        sim.step()
        sim.release_all()
    sim.step()
    assert turns_started(sim) == [1, 2, 3]
    monkeypatch.setattr(agent_workflow, "TURNS_PER_RUN", 2)  # the code now
    again = replay(agent_session, sim.history(), info=sim.info, now=sim.clock)
    assert again.commands == []
    assert not again.completed
    sim.signal("message", message(3))
    commands = sim.step()
    assert [type(c) for c in commands] == [StartChildWorkflow]
    sim.release_all()
    assert not any(isinstance(c, CompleteWorkflow) for c in sim.step())
    assert h.PATCH_RECORDED not in [e["type"] for e in sim.events]
