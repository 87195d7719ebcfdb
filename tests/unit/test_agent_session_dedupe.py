"""The session workflow, pure: a message_id answered once, and a turn whose input the control
plane refuses as too large."""

from __future__ import annotations

import json
from typing import Any

from everruns.agent.workflow import agent_session, agent_turn
from everruns.domain import history as h
from everruns.domain.commands import StartChildWorkflow
from tests.unit.test_agent_workflow import Sim


def message(text: str, mid: str) -> dict[str, Any]:
    return {"message_id": mid, "text": text, "max_steps": 10}


def test_a_session_answers_a_message_id_once_even_if_it_arrives_twice() -> None:
    """send_message's idempotency rests on reading the history before signalling, so two sends
    of one message_id that race (a client retrying while its first call is still under way, a
    double-submitted form) both signal. The session ran a turn for each copy (the tools ran
    twice) and gave the second copy a turn number. Now the copy gets neither."""
    started: list[str] = []

    def child(command: StartChildWorkflow) -> Any:
        started.append(command.input["message"]["message_id"])
        return {"messages": []}

    sim = Sim(agent_session, {"session_id": "s"}, workflow_id="session:s", children=child)
    sim.step()
    payload = message("charge my card", "order-42")
    sim.signal("message", payload)
    sim.signal("message", dict(payload))
    sim.signal("message", message("and thanks", "m2"))
    sim.signal("message", dict(payload, text="another text"))
    sim.signal("message", {"close": True})
    final = sim.run()
    assert started == ["order-42", "m2"], f"turns started: {started}"
    assert final["result"]["next_turn"] == 3


class TurnFailed(Exception):
    """A simulated turn that ended failed."""


def run_turn(command: StartChildWorkflow) -> Any:
    """Run the real turn workflow in its own simulation; raise if it fails."""
    assert command.workflow_id is not None
    final = Sim(agent_turn, command.input, workflow_id=command.workflow_id).run()
    if final["type"] == h.WORKFLOW_FAILED:
        raise TurnFailed(f"{final['error']['type']}: {final['error']['message']}")
    return final["result"]


class LimitedSim(Sim):
    """A session run whose control plane refuses to start a turn whose input is over ``limit``
    characters of JSON, as the real one does: child_workflow_failed with
    everruns.errors.ResourceExhausted, the child not started."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.starts: list[tuple[str, int, bool]] = []
        """(workflow id, context messages, refused) of every start the session asked for."""
        super().__init__(
            agent_session, {"session_id": "s"}, workflow_id="session:s", children=run_turn
        )

    def _apply(self, command: Any) -> None:
        if isinstance(command, StartChildWorkflow):
            size = len(json.dumps(command.input))
            refused = size > self.limit
            context = command.input.get("context") or []
            self.starts.append((str(command.workflow_id), len(context), refused))
            if refused:
                error = h.error_info(
                    "everruns.errors.ResourceExhausted",
                    f"input of child workflow {command.workflow_id!r} is too large: {size} "
                    f"bytes; the limit is {self.limit} bytes (EVERRUNS_MAX_PAYLOAD_BYTES)",
                )
                self.pending[command.child_id] = [h.child_workflow_failed(command.child_id, error)]
                return
        super()._apply(command)


def test_a_turn_refused_as_too_large_is_started_again_with_half_the_context() -> None:
    """A turn whose input (the context and the message) the control plane refused was skipped:
    its number used, its message never answered, and its sender left waiting for a turn that
    never started. Now the same turn is started again with half the context, and later turns
    keep to that smaller budget."""
    sim = LimitedSim(limit=4_000)
    sim.step()
    for n in range(5):
        sim.signal("message", message(f"note {n}: " + "y" * 1_000, f"m{n}"))
    sim.signal("message", {"close": True})
    final = sim.run()
    assert final["result"]["next_turn"] == 6
    refused = [start for start in sim.starts if start[2]]
    assert refused, f"the limit never bit: {sim.starts}"
    # Every turn was started (once, not refused), in order, and had some context after turn 1.
    started = [(wid, context) for wid, context, no in sim.starts if not no]
    assert [wid for wid, _ in started] == [f"session:s:turn:{n}" for n in range(1, 6)]
    assert all(context > 0 for _, context in started[1:])
    # Only the first refusal costs a second start: the run keeps the smaller budget.
    assert len(refused) == 1


def test_a_message_too_large_even_without_context_fails_its_turn_saying_so() -> None:
    """A message whose turn input is over the limit with no context at all could never start:
    the session must not retry it for ever nor skip it silently. Its turn starts without the
    message and fails, saying why, and the next message is answered."""
    sim = LimitedSim(limit=2_000)
    sim.step()
    sim.signal("message", message("z" * 2_000, "huge"))
    sim.signal("message", message("hello", "small"))
    sim.signal("message", {"close": True})
    final = sim.run()
    assert [(wid, refused) for wid, _, refused in sim.starts] == [
        ("session:s:turn:1", True),
        ("session:s:turn:1", False),
        ("session:s:turn:2", False),
    ]
    failed = [e for e in sim.events if e["type"] == h.CHILD_WORKFLOW_FAILED]
    assert "the message was not answered" in failed[-1]["error"]["message"]
    assert "is too large" in failed[-1]["error"]["message"]
    assert final["result"]["next_turn"] == 3
    assert [turn[0]["content"] for turn in final["result"]["context"]] == ["hello"]
