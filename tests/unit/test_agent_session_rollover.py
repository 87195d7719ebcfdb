"""The session workflow's rollover, pure: after TURNS_PER_RUN turns a run continues as new,
handing on the numbering, the conversation, the message ids it received and the messages
waiting; a run begun before the rollover existed replays as it was decided and keeps all its
turns."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns.agent import workflow as agent_workflow
from everruns.agent.workflow import agent_session
from everruns.domain import history as h
from everruns.domain.commands import ContinueAsNewWorkflow, StartChildWorkflow
from everruns.domain.replay import replay
from tests.unit.test_agent_workflow import Sim


def message(n: int) -> dict[str, Any]:
    return {"message_id": f"m{n}", "text": f"question {n}", "max_steps": 10}


def answer(command: StartChildWorkflow) -> Any:
    text = command.input["message"]["text"]
    return {"messages": [{"role": "user", "content": text}]}


def session(state: dict[str, Any] | None = None) -> Sim:
    return Sim(
        agent_session,
        {"session_id": "s", **(state or {})},
        workflow_id="session:s",
        children=answer,
    )


def turns_started(sim: Sim) -> list[int]:
    return [
        e["input"]["turn"]
        for e in sim.events
        if e["type"] == h.CHILD_WORKFLOW_STARTED and isinstance(e.get("input"), dict)
    ]


def test_a_run_continues_as_new_after_its_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_workflow, "TURNS_PER_RUN", 2)
    sim = session({"first_turn": 7, "received": ["old"]})
    sim.step()
    for n in (1, 2, 3):
        sim.signal("message", message(n))
    final = sim.run()
    assert turns_started(sim) == [7, 8]
    assert final["type"] == h.WORKFLOW_CONTINUED_AS_NEW
    state = final["input"]
    assert state["first_turn"] == 9 and state["received"] == ["old", "m1", "m2"]
    assert [m["content"] for turn in state["context"] for m in turn] == [
        "question 1",
        "question 2",
    ]
    # the third message was waiting: it goes on with the run
    assert [sim.events[seq - 1]["payload"] for seq in final["signals"]] == [message(3)]
    assert h.PATCH_RECORDED in [e["type"] for e in sim.events]


@settings(max_examples=40, deadline=None)
@given(per_run=st.integers(1, 3), messages=st.integers(1, 9), copies=st.integers(0, 3))
def test_every_message_gets_one_turn_across_the_chain(
    per_run: int, messages: int, copies: int
) -> None:
    """Playing the chain run after run (each continuation's input and carried signals start
    the next): every message gets exactly one turn, in order, numbered without a gap, and a
    second copy of a message, wherever it lands, gets none."""
    sent = [message(n) for n in range(messages)] + [message(n) for n in range(copies)][:messages]
    sent.append({"close": True})
    turns: list[tuple[int, str]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agent_workflow, "TURNS_PER_RUN", per_run)
        state: dict[str, Any] = {}
        waiting = [{"name": "message", "payload": p} for p in sent]
        for _ in range(messages + copies + 2):
            sim = session(state)
            for signal in waiting:
                sim.signal(signal["name"], signal["payload"])
            final = sim.run()
            turns += [
                (e["input"]["turn"], e["input"]["message"]["message_id"])
                for e in sim.events
                if e["type"] == h.CHILD_WORKFLOW_STARTED
            ]
            if final["type"] != h.WORKFLOW_CONTINUED_AS_NEW:
                break
            state = final["input"]
            waiting = [sim.events[seq - 1] for seq in final["signals"]]
    assert turns == [(n + 1, f"m{n}") for n in range(messages)]


def test_a_run_begun_before_the_rollover_replays_and_keeps_its_turns(
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
    assert not any(isinstance(c, ContinueAsNewWorkflow) for c in sim.step())
    assert h.PATCH_RECORDED not in [e["type"] for e in sim.events]


def test_a_malformed_received_list_fails_the_session() -> None:
    final = session({"received": "m1"}).run()
    assert final["type"] == h.WORKFLOW_FAILED
    assert "received message ids" in final["error"]["message"]
