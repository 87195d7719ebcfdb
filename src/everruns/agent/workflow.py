"""The agent's workflows: a session that queues messages, and the turn that answers one.

``agent_session`` (workflow id ``session:<id>``) receives messages as ``message`` signals and
runs one ``agent_turn`` child workflow per message (id ``session:<id>:turn:<n>``), strictly one
after another, in arrival order: a message that arrives while a turn runs waits in the signal
buffer, which is part of the history, so it is never dropped and never reordered. The session
carries the conversation (the messages of its last completed turns) into each turn's input.

``agent_turn`` is the reference guide's flow: ``process_input`` (validate, build the context) →
``reason`` (one LLM call) → when the model asks for tools, ``act``: every tool call is its own
activity (``act.<tool>``), all run concurrently, each with its own retries → ``reason`` again …
until the model answers without tool calls (outcome ``answered``) or the step limit is reached
(outcome ``turn_limit_reached``). A tool that fails for good does not fail the turn: the error
is the tool's result and the model decides what to say. An LLM call that fails for good fails
the turn. Cancelling the turn cancels whatever activity is in flight and ends it ``cancelled``.

This is workflow code: it runs in the deterministic replay driver, awaits only ``ctx``, and
takes every decision from its input and recorded activity results — never from the clock, the
environment or process state (``process_input`` records those choices once).
"""

from __future__ import annotations

import json
from typing import Any

from everruns.agent.activities import process_input, reason
from everruns.domain.context import WorkflowContext
from everruns.domain.registry import workflow
from everruns.domain.retry import RetryPolicy
from everruns.errors import ActivityCancelled, ActivityError, ChildWorkflowError, InvalidArgument

__all__ = [
    "ANSWERED",
    "MAX_CONTEXT_TURNS",
    "MESSAGE_SIGNAL",
    "SESSION_WORKFLOW",
    "TURN_LIMIT_REACHED",
    "TURN_WORKFLOW",
    "agent_session",
    "agent_turn",
    "is_close",
    "session_workflow_id",
    "turn_workflow_id",
]

TURN_WORKFLOW = "agent_turn"
SESSION_WORKFLOW = "agent_session"
MESSAGE_SIGNAL = "message"
ANSWERED = "answered"
TURN_LIMIT_REACHED = "turn_limit_reached"
MAX_CONTEXT_TURNS = 10
"""How many earlier turns of a session a new turn sees (older ones are left out)."""

MAX_CONTEXT_BYTES = 1_000_000
"""The most JSON text of earlier turns a new turn carries; older turns are left out first.
Half the control plane's default payload limit (EVERRUNS_MAX_PAYLOAD_BYTES, 2 MB), so that the
context, the message and what the turn adds fit in one payload. A turn refused as too large
halves it again for the rest of the run (a control plane may set a lower limit), down to
`MIN_CONTEXT_BYTES`."""

MIN_CONTEXT_BYTES = 20_000
"""The least context a refused turn leaves its successors: a turn too large by itself (its
own tool results, say) does not take the conversation's memory with it."""


def session_workflow_id(session_id: str) -> str:
    """Return the workflow id of a session: ``session:<id>``."""
    return f"session:{session_id}"


def turn_workflow_id(session_id: str, turn: int) -> str:
    """Return the workflow id of a session's turn ``n``: ``session:<id>:turn:<n>``."""
    return f"session:{session_id}:turn:{turn}"


def is_close(payload: Any) -> bool:
    """Return whether a ``message`` signal payload asks the session to close."""
    return isinstance(payload, dict) and payload.get("close") is True


# ----------------------------------------------------------------------------------- turn


def _tool_message(
    call: dict[str, Any], *, result: Any = None, error: str | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "tool",
        "tool_call_id": call.get("id"),
        "name": call.get("name"),
    }
    if error is not None:
        message["error"] = error
        message["content"] = json.dumps({"error": error})
    else:
        message["result"] = result
        message["content"] = json.dumps(result)
    return message


async def _act(
    ctx: WorkflowContext,
    call: dict[str, Any],
    tools: dict[str, dict[str, Any]],
    retry: RetryPolicy | None,
) -> dict[str, Any]:
    """Run one tool call as its own activity; return the tool message for the model."""
    if call.get("error"):
        return _tool_message(call, error=str(call["error"]))
    spec = tools.get(str(call.get("name")))
    if spec is None:
        offered = ", ".join(sorted(tools)) or "none"
        return _tool_message(
            call, error=f"there is no tool {call.get('name')!r} (offered: {offered})"
        )
    try:
        result = await ctx.execute_activity(
            spec["activity"], call.get("arguments") or {}, retry=retry
        )
    except ActivityCancelled:
        raise  # only a cancelled turn cancels its tools: let the cancellation end the turn
    except ActivityError as exc:
        return _tool_message(call, error=str(exc.details.get("message") or exc))
    return _tool_message(call, result=result)


def _policy(value: Any) -> RetryPolicy | None:
    return None if value is None else RetryPolicy.from_dict(value)


@workflow(name=TURN_WORKFLOW)
async def agent_turn(ctx: WorkflowContext, turn: Any) -> dict[str, Any]:
    """Answer one message: process_input → (reason → act)* → answer.

    Args:
        ctx: the workflow context.
        turn: ``{"message": {"text", ...}, "session_id"?, "turn"?, "context"?}`` (see
            `everruns.agent.activities.prepare_turn`).

    Returns:
        ``{"session_id", "turn", "message_id", "outcome", "answer", "steps", "tool_calls",
        "provider", "model", "messages"}``: ``outcome`` is ``answered`` or
        ``turn_limit_reached`` (then ``answer`` is None); ``messages`` are this turn's new
        messages (the user's, the model's and the tools'), for the next turn's context.

    Raises:
        ActivityError: the message is invalid, or the LLM call failed after its retries (the
            turn ends ``failed``).
        WorkflowCancelled: the turn was cancelled (it ends ``cancelled``).
    """
    prepared = await ctx.execute_activity(process_input, turn)
    messages: list[dict[str, Any]] = list(prepared["messages"])
    tools = {spec["name"]: spec for spec in prepared["tools"]}
    max_steps = int(prepared["max_steps"])
    llm_retry = _policy(prepared.get("llm_retry"))
    tool_retry = _policy(prepared.get("tool_retry"))
    new_messages = [messages[-1]]
    calls_made = 0

    def outcome(kind: str, answer: str | None, steps: int) -> dict[str, Any]:
        return {
            "session_id": prepared.get("session_id"),
            "turn": prepared.get("turn"),
            "message_id": prepared.get("message_id"),
            "outcome": kind,
            "answer": answer,
            "steps": steps,
            "tool_calls": calls_made,
            "provider": prepared["provider"],
            "model": prepared["model"],
            "messages": new_messages,
        }

    for step in range(1, max_steps + 1):
        reply = await ctx.execute_activity(
            reason,
            {
                "step": step,
                "provider": prepared["provider"],
                "model": prepared["model"],
                "messages": messages,
                "tools": prepared["tools"],
            },
            retry=llm_retry,
        )
        calls = list(reply.get("tool_calls") or [])
        assistant: dict[str, Any] = {"role": "assistant", "content": reply.get("content") or ""}
        if calls:
            assistant["tool_calls"] = calls
        if not calls:
            new_messages.append(assistant)
            return outcome(ANSWERED, assistant["content"], step)
        if step == max_steps:
            # No step is left to read the tools' results, so they are not run, and the
            # unanswered request is kept out of the conversation the next turn sees.
            break
        messages.append(assistant)
        new_messages.append(assistant)
        results = await ctx.gather(*(_act(ctx, call, tools, tool_retry) for call in calls))
        calls_made += len(calls)
        messages.extend(results)
        new_messages.extend(results)
    return outcome(TURN_LIMIT_REACHED, None, max_steps)


# -------------------------------------------------------------------------------- session


def _session_state(state: Any) -> tuple[str, int, list[list[dict[str, Any]]]]:
    if not isinstance(state, dict):
        raise InvalidArgument(f"the session input must be a JSON object, got {state!r}"[:300])
    session_id = state.get("session_id")
    first_turn = state.get("first_turn", 1)
    context = state.get("context") or []
    if not isinstance(session_id, str) or not session_id:
        raise InvalidArgument("the session input needs a non-empty string 'session_id'")
    if isinstance(first_turn, bool) or not isinstance(first_turn, int) or first_turn < 1:
        raise InvalidArgument(f"first_turn must be an integer >= 1, got {first_turn!r}")
    if not isinstance(context, list) or not all(isinstance(t, list) for t in context):
        raise InvalidArgument("the session context must be a list of turns (lists of messages)")
    return session_id, first_turn, context[-MAX_CONTEXT_TURNS:]


def _size(turns: list[list[dict[str, Any]]]) -> int:
    return sum(len(json.dumps(past)) for past in turns)


def _within(turns: list[list[dict[str, Any]]], budget: int) -> list[list[dict[str, Any]]]:
    """The latest ``turns`` whose JSON text adds up to at most ``budget`` characters."""
    kept: list[list[dict[str, Any]]] = []
    size = 0
    for past in reversed(turns):
        size += len(json.dumps(past))
        if size > budget:
            break
        kept.append(past)
    return kept[::-1]


@workflow(name=SESSION_WORKFLOW)
async def agent_session(ctx: WorkflowContext, state: Any) -> dict[str, Any]:
    """Run a session: one turn per ``message`` signal, in arrival order, until closed.

    Args:
        ctx: the workflow context.
        state: ``{"session_id", "first_turn"?: 1, "context"?: [[message, ...], ...]}``; a
            session reopened after a close continues the numbering and the conversation.

    Returns:
        After a close signal (``{"close": true}``): ``{"session_id", "closed": true,
        "next_turn", "turns", "context"}``.

    Raises:
        InvalidArgument: ``state`` is malformed (the session fails).
        WorkflowCancelled: the session was cancelled (a running turn is cancelled with it).
    """
    session_id, turn, turns = _session_state(state)
    first_turn = turn
    budget = MAX_CONTEXT_BYTES
    while True:
        payload = await ctx.wait_signal(MESSAGE_SIGNAL)
        if is_close(payload):
            return {
                "session_id": session_id,
                "closed": True,
                "next_turn": turn,
                "turns": turn - first_turn,
                "context": turns,
            }
        turns = _within(turns, budget)
        child_input = {
            "session_id": session_id,
            "turn": turn,
            "message": payload,
            "context": [message for past in turns for message in past],
        }
        try:
            result = await ctx.execute_child_workflow(
                agent_turn, child_input, workflow_id=turn_workflow_id(session_id, turn)
            )
        except ChildWorkflowError as exc:
            # A failed or cancelled turn adds nothing to the conversation. One refused as too
            # large would fail again with the same context: later turns carry half of it.
            if "ResourceExhausted" in str(exc):
                budget = min(budget, max(_size(turns) // 2, MIN_CONTEXT_BYTES))
        else:
            new = result.get("messages") if isinstance(result, dict) else None
            if isinstance(new, list):
                turns = [*turns, new][-MAX_CONTEXT_TURNS:]
        turn += 1
