"""The agent's turn and session workflows, driven by the pure replay engine against a tiny
simulated control plane (no I/O): the tool loop, the step limit, failures, cancellation, queueing
of messages, and the turn events derived from the resulting history."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from everruns.agent.activities import prepare_turn
from everruns.agent.calculator import evaluate, to_json_number
from everruns.agent.events import TurnEventMapper
from everruns.agent.providers import ReasonRequest, ScriptedProvider
from everruns.agent.workflow import (
    ANSWERED,
    TURN_LIMIT_REACHED,
    agent_session,
    agent_turn,
    turn_workflow_id,
)
from everruns.domain import history as h
from everruns.domain.commands import (
    CancelWorkflow,
    Command,
    CompleteWorkflow,
    FailWorkflow,
    ScheduleActivity,
    StartChildWorkflow,
)
from everruns.domain.context import WorkflowInfo
from everruns.domain.history import HistoryEvent
from everruns.domain.replay import replay
from everruns.domain.retry import RetryPolicy
from everruns.errors import NonRetryableError

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class Boom(Exception):
    """A simulated activity failure."""


def scripted_reason(request: dict[str, Any]) -> dict[str, Any]:
    reply = ScriptedProvider().reply(
        ReasonRequest(tuple(request["messages"]), tuple(request["tools"]), request["model"])
    )
    return reply.to_dict()


def calculator(arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "expression": arguments["expression"],
        "result": to_json_number(evaluate(arguments["expression"])),
    }


def default_activities() -> dict[str, Callable[[Any], Any]]:
    return {
        "process_input": lambda turn: prepare_turn(turn, env={}),
        "reason": scripted_reason,
        "act.calculator": calculator,
        "act.clock": lambda _: {"utc": "2025-01-01T12:00:00Z", "unix": 1735732800.0},
        "act.sleep": lambda args: {"slept": float(args["seconds"])},
    }


class Sim:
    """Plays the control plane for one run: applies commands and holds their outcomes until a
    test releases them into the history."""

    def __init__(
        self,
        wf: Callable[..., Any],
        input: Any,
        *,
        workflow_id: str = "session:s:turn:1",
        activities: dict[str, Callable[[Any], Any]] | None = None,
        children: Callable[[StartChildWorkflow], Any] | None = None,
    ) -> None:
        self.wf = wf
        self.info = WorkflowInfo(workflow_id, f"run-{workflow_id}", wf.__name__)
        self.activities = default_activities() | (activities or {})
        self.children = children
        self.events: list[dict[str, Any]] = [
            h.workflow_started(self.info.workflow_type, workflow_id, self.info.run_id, input)
        ]
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.tasks: list[list[Command]] = []
        self.completed = False
        self.clock = T0

    def history(self) -> list[HistoryEvent]:
        return [
            HistoryEvent.of(i, e, time=T0 + timedelta(seconds=i))
            for i, e in enumerate(self.events, start=1)
        ]

    def step(self) -> list[Command]:
        result = replay(self.wf, self.history(), info=self.info, now=self.clock)
        self.events.append(h.workflow_task_completed("worker-1", self.clock))
        for command in result.commands:
            self.events.append(command.to_event())
            self._apply(command)
        self.tasks.append(result.commands)
        self.completed = result.completed
        self.clock += timedelta(seconds=1)
        return result.commands

    def _apply(self, command: Command) -> None:
        if isinstance(command, ScheduleActivity):
            fn = self.activities[command.activity_type]
            out: list[dict[str, Any]] = [h.activity_started(command.activity_id, 1, "w")]
            try:
                value = fn(command.input)
            except Exception as exc:
                error = h.error_info(
                    type(exc).__name__, str(exc), non_retryable=isinstance(exc, NonRetryableError)
                )
                out.append(h.activity_failed(command.activity_id, error, 1, will_retry=False))
            else:
                out.append(h.activity_completed(command.activity_id, value, 1))
            self.pending[command.activity_id] = out
        elif isinstance(command, StartChildWorkflow):
            assert self.children is not None
            try:
                value = self.children(command)
            except Exception as exc:
                event = h.child_workflow_failed(
                    command.child_id, h.error_info(type(exc).__name__, str(exc))
                )
            else:
                event = h.child_workflow_completed(command.child_id, value)
            self.pending[command.child_id] = [event]

    def release(self, *ids: str) -> None:
        for command_id in ids:
            self.events.extend(self.pending.pop(command_id))

    def release_all(self) -> None:
        for command_id in sorted(self.pending, key=int):
            self.release(command_id)

    def signal(self, name: str, payload: Any) -> None:
        self.events.append(h.signal_received(name, payload))

    def run(self, max_tasks: int = 100) -> dict[str, Any]:
        for _ in range(max_tasks):
            self.step()
            if self.completed:
                again = replay(self.wf, self.history(), info=self.info, now=self.clock)
                assert again.commands == [], "replaying the full history must add nothing"
                return self.events[-1]
            self.release_all()
        raise AssertionError("the workflow did not finish")

    def described(self) -> list[list[str]]:
        return [[c.describe() for c in task] for task in self.tasks]

    def scheduled(self, activity_type: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["type"] == h.ACTIVITY_SCHEDULED and e["activity_type"] == activity_type
        ]


def turn_input(text: str, **message: Any) -> dict[str, Any]:
    return {"session_id": "s", "turn": 1, "message": {"text": text, "message_id": "m1", **message}}


# ----------------------------------------------------------------------------------- turn


def test_tool_loop_runs_tool_calls_concurrently_then_answers() -> None:
    sim = Sim(agent_turn, turn_input("What is 6 * 7, and what time is it?"))
    final = sim.run()
    assert sim.described() == [
        ["ScheduleActivity(id=1, type=process_input)"],
        ["ScheduleActivity(id=2, type=reason)"],
        # Both tool calls are issued by the same workflow task: they run concurrently.
        ["ScheduleActivity(id=3, type=act.calculator)", "ScheduleActivity(id=4, type=act.clock)"],
        ["ScheduleActivity(id=5, type=reason)"],
        ["CompleteWorkflow()"],
    ]
    result = final["result"]
    assert result["outcome"] == ANSWERED
    assert result["steps"] == 2 and result["tool_calls"] == 2
    assert "6 * 7 = 42" in result["answer"]
    assert "2025-01-01T12:00:00Z" in result["answer"]
    # The second LLM call saw both tool results, tied to their calls.
    second = sim.scheduled("reason")[1]["input"]
    tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
    assert [(m["name"], m["tool_call_id"]) for m in tool_messages] == [
        ("calculator", "call_1_0"),
        ("clock", "call_1_1"),
    ]
    assert tool_messages[0]["result"]["result"] == 42
    assert second["step"] == 2
    # The turn's messages: user, assistant (tool calls), two tool results, final answer.
    assert [m["role"] for m in result["messages"]] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]


def test_plain_message_is_answered_in_one_step_without_tools() -> None:
    final = Sim(agent_turn, turn_input("Tell me a story")).run()
    result = final["result"]
    assert result["outcome"] == ANSWERED and result["steps"] == 1 and result["tool_calls"] == 0
    assert "Tell me a story" in result["answer"]
    assert [m["role"] for m in result["messages"]] == ["user", "assistant"]


def test_step_limit_ends_the_turn_with_turn_limit_reached() -> None:
    def always_tools(request: dict[str, Any]) -> dict[str, Any]:
        step = request["step"]
        return {
            "content": "",
            "tool_calls": [
                {"id": f"c{step}", "name": "calculator", "arguments": {"expression": "1+1"}}
            ],
        }

    sim = Sim(agent_turn, turn_input("loop", max_steps=3), activities={"reason": always_tools})
    final = sim.run()
    result = final["result"]
    assert result["outcome"] == TURN_LIMIT_REACHED
    assert result["answer"] is None
    assert result["steps"] == 3
    assert len(sim.scheduled("reason")) == 3
    # Tools of the last step are not run: nobody would read their results.
    assert len(sim.scheduled("act.calculator")) == 2 and result["tool_calls"] == 2
    # The unanswered last request is kept out of the conversation.
    assert result["messages"][-1]["role"] == "tool"


def test_default_step_limit_is_ten() -> None:
    def always_tools(request: dict[str, Any]) -> dict[str, Any]:
        return {"content": "", "tool_calls": [{"id": "c", "name": "clock", "arguments": {}}]}

    sim = Sim(agent_turn, turn_input("loop"), activities={"reason": always_tools})
    assert sim.run()["result"]["steps"] == 10
    assert len(sim.scheduled("reason")) == 10


def test_llm_failure_after_retries_fails_the_turn() -> None:
    def down(request: dict[str, Any]) -> dict[str, Any]:
        raise Boom("the model is overloaded")

    sim = Sim(agent_turn, turn_input("What is 1+1?"), activities={"reason": down})
    final = sim.run()
    assert final["type"] == h.WORKFLOW_FAILED
    assert final["error"]["type"] == "everruns.errors.ActivityError"
    assert "reason" in final["error"]["message"]
    assert "the model is overloaded" in final["error"]["message"]
    assert isinstance(sim.tasks[-1][-1], FailWorkflow)


def test_invalid_message_fails_the_turn_in_process_input() -> None:
    def strict(turn: Any) -> Any:
        try:
            return prepare_turn(turn, env={})
        except Exception as exc:
            raise NonRetryableError(f"invalid message: {exc}") from exc

    sim = Sim(agent_turn, turn_input("   "), activities={"process_input": strict})
    final = sim.run()
    assert final["type"] == h.WORKFLOW_FAILED
    assert "non-empty" in final["error"]["message"]
    assert sim.scheduled("reason") == []


def test_a_tool_failing_for_good_is_reported_to_the_model_not_fatal() -> None:
    def broken(arguments: Any) -> Any:
        raise NonRetryableError("cannot evaluate '1/0': division by zero")

    sim = Sim(agent_turn, turn_input("what is 1/0"), activities={"act.calculator": broken})
    final = sim.run()
    assert final["type"] == h.WORKFLOW_COMPLETED
    assert "calculator tool failed" in final["result"]["answer"]
    assert "division by zero" in final["result"]["answer"]
    tool_message = final["result"]["messages"][2]
    assert tool_message["role"] == "tool" and "division by zero" in tool_message["error"]


def test_unknown_tool_and_unreadable_arguments_are_answered_without_an_activity() -> None:
    replies = iter(
        [
            {
                "content": "",
                "tool_calls": [
                    {"id": "a", "name": "teleport", "arguments": {}},
                    {"id": "b", "name": "calculator", "arguments": {}, "error": "not JSON"},
                ],
            },
            {"content": "sorry", "tool_calls": []},
        ]
    )
    sim = Sim(agent_turn, turn_input("go"), activities={"reason": lambda _: next(replies)})
    final = sim.run()
    assert final["result"]["answer"] == "sorry"
    scheduled = [e["activity_type"] for e in sim.events if e["type"] == h.ACTIVITY_SCHEDULED]
    assert scheduled == ["process_input", "reason", "reason"]
    errors = [m["error"] for m in final["result"]["messages"] if m["role"] == "tool"]
    assert "no tool 'teleport'" in errors[0] and errors[1] == "not JSON"


def test_cancelling_during_tools_ends_the_turn_cancelled() -> None:
    sim = Sim(agent_turn, turn_input("what is 2+2 and the time"))
    for _ in range(2):
        sim.step()
        sim.release_all()
    assert [c.describe() for c in sim.step()] == [
        "ScheduleActivity(id=3, type=act.calculator)",
        "ScheduleActivity(id=4, type=act.clock)",
    ]
    # The tools are still running when the cancellation arrives.
    sim.events.append(h.workflow_cancel_requested("user changed their mind"))
    sim.events.append(h.activity_cancel_requested("3"))
    sim.events.append(h.activity_cancelled("4"))
    assert sim.step() == [CancelWorkflow()]
    assert sim.completed


def test_retry_policies_from_the_message_reach_the_commands() -> None:
    llm = RetryPolicy(max_attempts=2, initial_interval=0.05)
    tools = RetryPolicy(max_attempts=7, initial_interval=0.1)
    sim = Sim(
        agent_turn,
        turn_input("what is 3*3", llm_retry=llm.to_dict(), tool_retry=tools.to_dict()),
    )
    sim.run()
    reason_options = sim.scheduled("reason")[0]["options"]
    tool_options = sim.scheduled("act.calculator")[0]["options"]
    assert reason_options["retry"] == llm.to_dict()
    assert tool_options["retry"] == tools.to_dict()


def test_context_from_earlier_turns_reaches_the_llm() -> None:
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    sim = Sim(agent_turn, {**turn_input("and now?"), "context": earlier})
    sim.run()
    messages = sim.scheduled("reason")[0]["input"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1:3] == earlier


# -------------------------------------------------------------------------------- events


def test_turn_events_follow_the_history() -> None:
    sim = Sim(agent_turn, turn_input("What is 6 * 7, and what time is it?"))
    sim.run()
    mapper = TurnEventMapper("session:s:turn:1")
    events = [
        te
        for seq, e in enumerate(sim.events, start=1)
        for te in mapper.feed(e["type"], e, seq, None)
    ]
    assert [(e.kind, e.step) for e in events] == [
        ("turn.started", None),
        ("input.processed", None),
        ("reason.started", 1),
        ("reason.completed", 1),
        ("tool.called", 1),
        ("tool.called", 1),
        ("tool.result", 1),
        ("tool.result", 1),
        ("reason.started", 2),
        ("reason.completed", 2),
        ("turn.completed", 2),
    ]
    assert mapper.finished
    assert events[0].data["text"] == "What is 6 * 7, and what time is it?"
    assert events[3].data["tool_calls"][0] == {
        "name": "calculator",
        "arguments": {"expression": "6 * 7"},
    }
    assert events[4].data == {
        "activity_id": "3",
        "tool": "calculator",
        "arguments": {"expression": "6 * 7"},
    }
    assert events[6].data["result"]["result"] == 42
    assert events[-1].data["outcome"] == ANSWERED and "messages" not in events[-1].data
    assert events[-1].is_terminal and not events[-2].is_terminal


def test_turn_events_show_retries_failures_and_cancellation() -> None:
    mapper = TurnEventMapper("t")
    feed: list[dict[str, Any]] = [
        h.activity_scheduled("2", "reason", {"step": 1}, {}),
        h.activity_failed("2", h.error_info("builtins.OSError", "refused"), 1, will_retry=True),
        h.activity_completed(
            "2", {"content": "", "tool_calls": [{"id": "x", "name": "sleep", "arguments": {}}]}, 2
        ),
        h.activity_scheduled("3", "act.sleep", {"seconds": 5}, {}),
        h.activity_timed_out("3", "start_to_close", 1, will_retry=True),
        h.activity_cancelled("3"),
        h.workflow_cancelled(),
    ]
    kinds = [
        (e.kind, e.data) for i, ev in enumerate(feed, 1) for e in mapper.feed(ev["type"], ev, i)
    ]
    assert kinds == [
        ("reason.started", {}),
        ("reason.retrying", {"attempt": 1, "error": "OSError: refused"}),
        ("reason.completed", {"content": "", "tool_calls": [{"name": "sleep", "arguments": {}}]}),
        ("tool.called", {"activity_id": "3", "tool": "sleep", "arguments": {"seconds": 5}}),
        (
            "tool.retrying",
            {
                "activity_id": "3",
                "tool": "sleep",
                "attempt": 1,
                "error": "timed out (start_to_close)",
            },
        ),
        ("tool.result", {"activity_id": "3", "tool": "sleep", "error": "cancelled"}),
        ("turn.cancelled", {}),
    ]
    failed = TurnEventMapper("t").feed(
        "workflow_failed",
        h.workflow_failed(h.error_info("everruns.errors.ActivityError", "down")),
        9,
    )
    assert failed[0].kind == "turn.failed" and failed[0].data["message"] == "ActivityError: down"


# ------------------------------------------------------------------------------- session


def run_turn(command: StartChildWorkflow) -> Any:
    """Run the real turn workflow to completion in its own simulation."""
    assert command.workflow_id is not None
    return Sim(agent_turn, command.input, workflow_id=command.workflow_id).run()["result"]


def message(text: str, mid: str) -> dict[str, Any]:
    return {"message_id": mid, "text": text, "max_steps": 10}


def test_session_runs_one_turn_per_message_in_order_with_context() -> None:
    sim = Sim(agent_session, {"session_id": "s"}, workflow_id="session:s", children=run_turn)
    sim.step()
    sim.signal("message", message("What is 2+2?", "m1"))
    sim.signal("message", message("hello there", "m2"))
    (first,) = sim.step()
    assert isinstance(first, StartChildWorkflow)
    assert first.workflow_id == turn_workflow_id("s", 1) == "session:s:turn:1"
    assert first.input["turn"] == 1 and first.input["context"] == []
    # The second message waits, buffered, until the first turn ends.
    assert sim.step() == []
    sim.release(first.child_id)
    (second,) = sim.step()
    assert isinstance(second, StartChildWorkflow)
    assert second.workflow_id == "session:s:turn:2"
    assert second.input["message"]["message_id"] == "m2"
    # The second turn sees the first turn's messages (user, tool call, tool, answer).
    context = second.input["context"]
    assert context[0] == {"role": "user", "content": "What is 2+2?"}
    assert "2+2 = 4" in context[-1]["content"]


def test_session_goes_on_after_a_failed_turn_and_closes_with_the_next_number() -> None:
    outcomes: list[str] = []

    def child(command: StartChildWorkflow) -> Any:
        outcomes.append(str(command.workflow_id))
        if command.input["turn"] == 3:
            raise Boom("turn failed")
        return {"messages": [{"role": "user", "content": command.input["message"]["text"]}]}

    sim = Sim(
        agent_session,
        {"session_id": "s", "first_turn": 3, "context": [[{"role": "user", "content": "old"}]]},
        workflow_id="session:s",
        children=child,
    )
    sim.step()
    sim.signal("message", message("a", "m1"))
    sim.signal("message", message("b", "m2"))
    sim.signal("message", {"close": True})
    sim.signal("message", message("too late", "m3"))
    final = sim.run()
    assert outcomes == ["session:s:turn:3", "session:s:turn:4"]
    assert final["type"] == h.WORKFLOW_COMPLETED
    assert final["result"]["next_turn"] == 5 and final["result"]["turns"] == 2
    # Turn 3 failed: only turn 4 joined the carried-over conversation.
    assert final["result"]["context"] == [
        [{"role": "user", "content": "old"}],
        [{"role": "user", "content": "b"}],
    ]
    starts = [e for e in sim.events if e["type"] == h.CHILD_WORKFLOW_STARTED]
    assert starts[1]["input"]["context"] == [{"role": "user", "content": "old"}]


def test_session_keeps_only_the_last_turns_as_context() -> None:
    def child(command: StartChildWorkflow) -> Any:
        n = command.input["turn"]
        return {"messages": [{"role": "user", "content": str(n)}]}

    sim = Sim(agent_session, {"session_id": "s"}, workflow_id="session:s", children=child)
    sim.step()
    for n in range(1, 14):
        sim.signal("message", message(str(n), f"m{n}"))
    sim.signal("message", {"close": True})
    final = sim.run()
    assert [turn[0]["content"] for turn in final["result"]["context"]] == [
        str(n) for n in range(4, 14)
    ]


@pytest.mark.parametrize("state", [None, {"session_id": ""}, {"session_id": "s", "first_turn": 0}])
def test_session_with_a_malformed_input_fails(state: Any) -> None:
    sim = Sim(agent_session, state, workflow_id="session:x")
    final = sim.run()
    assert final["type"] == h.WORKFLOW_FAILED
    assert final["error"]["type"] == "everruns.errors.InvalidArgument"


def test_completed_turn_result_is_json_and_terminal_command_is_complete() -> None:
    sim = Sim(agent_turn, turn_input("hi"))
    sim.run()
    assert isinstance(sim.tasks[-1][-1], CompleteWorkflow)
