"""The agent's workflows: a session that queues messages, and the turn that answers one.

``agent_session`` (workflow id ``session:<id>``) receives messages as ``message`` signals and
runs one ``agent_turn`` child workflow per message (id ``session:<id>:turn:<n>``), strictly one
after another, in arrival order: a message that arrives while a turn runs waits in the signal
buffer, which is part of the history, so it is never dropped and never reordered; a second copy
of a message (a ``message_id`` the run already received) gets no turn. The session carries the
conversation (the messages of its last completed turns) into each turn's input.

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
from everruns.errors import (
    ActivityCancelled,
    ActivityError,
    ChildWorkflowError,
    InvalidArgument,
    ResourceExhausted,
)

__all__ = [
    "ANSWERED",
    "MAX_CONTEXT_TURNS",
    "MESSAGE_SIGNAL",
    "RECEIVED_KEPT",
    "SESSION_WORKFLOW",
    "TURNS_PER_RUN",
    "TURN_LIMIT_REACHED",
    "TURN_WORKFLOW",
    "agent_session",
    "agent_turn",
    "is_close",
    "message_id_of",
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

TURNS_PER_RUN = 100
"""The turns one run of a session gives before it continues as new (`ctx.continue_as_new`):
the next run carries the turn numbering, the conversation and the messages already waiting, so
the history a session's workflow task replays, and the one `send_message` reads, stay bounded
however long the session lives. Part of the session's workflow code: a run replays with the
value it was decided under."""

ROLLOVER_PATCH = "session-rollover"
"""The `ctx.patched` id of the rollover: runs begun before it keep all their turns."""

RECEIVED_KEPT = 100
"""How many of the latest message ids a session run hands on when it continues as new, so that
a second copy of a message (two sends that raced) arriving in the next run gets no turn."""

MAX_CONTEXT_BYTES = 1_000_000
"""The most JSON text of earlier turns a new turn carries; older turns are left out first.
Half the control plane's default payload limit (EVERRUNS_MAX_PAYLOAD_BYTES, 2 MB), so that the
context, the message and what the turn adds fit in one payload. A control plane may set a lower
limit: a turn whose input it refuses as too large (the turn is not started) is started again
with half the context, as often as needed, and the run keeps that smaller budget; a turn that
fails as too large once started (its own tool results, say) halves it for the rest of the run,
down to `MIN_CONTEXT_BYTES`."""

MIN_CONTEXT_BYTES = 20_000
"""The least context a turn that failed as too large leaves its successors: a turn too large
by itself (its own tool results, say) does not take the conversation's memory with it."""

TOO_LARGE_ERROR = "everruns.errors.ResourceExhausted"
"""The error type of a payload over the control plane's limit, as workflow code sees it."""


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
    # The result (or error) is kept once: the ``content`` text providers read is made from it
    # by the ``reason`` activity, so a tool's result is not carried and recorded twice.
    if error is not None:
        message["error"] = error
    else:
        message["result"] = result
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
        ResourceExhausted: the session could not give the turn its message (``refused`` in
            the input: even without context, the input was over the payload limit).
        WorkflowCancelled: the turn was cancelled (it ends ``cancelled``).
    """
    refused = turn.get("refused") if isinstance(turn, dict) else None
    if isinstance(refused, str):
        # The session could not start this turn with the message in its input: say so.
        raise ResourceExhausted(f"the message was not answered: {refused}")
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


def _session_state(state: Any) -> tuple[str, int, list[list[dict[str, Any]]], list[str]]:
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
    received = state.get("received") or []
    if not isinstance(received, list) or not all(isinstance(m, str) for m in received):
        raise InvalidArgument("the session's received message ids must be a list of strings")
    return session_id, first_turn, context[-MAX_CONTEXT_TURNS:], received[-RECEIVED_KEPT:]


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


def _not_started(exc: ChildWorkflowError) -> bool:
    """Whether the control plane refused to start a turn because its input is too large: no
    workflow holds the turn's id, so the turn may be started again under it. (A turn that
    started and failed as too large names its own payload: an activity's input, its result.)"""
    return (
        exc.error_type == TOO_LARGE_ERROR
        and f"{TOO_LARGE_ERROR}: input of child workflow " in str(exc)
    )


def message_id_of(payload: Any) -> str | None:
    """The ``message_id`` of a ``message`` signal's payload; `send_message` always sets one.
    The client's `everruns.agent.session._find_turn` numbers turns by the same rule."""
    message_id = payload.get("message_id") if isinstance(payload, dict) else None
    return message_id if isinstance(message_id, str) else None


@workflow(name=SESSION_WORKFLOW)
async def agent_session(ctx: WorkflowContext, state: Any) -> dict[str, Any]:
    """Run a session: one turn per ``message`` signal, in arrival order, until closed.

    A message whose ``message_id`` this run has already received (two sends of one message
    that raced) is skipped: it gets no turn and no turn number.

    Args:
        ctx: the workflow context.
        state: ``{"session_id", "first_turn"?: 1, "context"?: [[message, ...], ...],
            "received"?: [message_id, ...]}``; a session reopened after a close continues the
            numbering and the conversation, and one that continued as new (after
            `TURNS_PER_RUN` turns) also the message ids it received.

    Returns:
        After a close signal (``{"close": true}``): ``{"session_id", "closed": true,
        "next_turn", "turns", "context"}``.

    Raises:
        InvalidArgument: ``state`` is malformed (the session fails).
        WorkflowCancelled: the session was cancelled (a running turn is cancelled with it).
    """
    session_id, turn, turns, carried = _session_state(state)
    first_turn = turn
    budget = MAX_CONTEXT_BYTES
    received = set(carried)
    arrived = list(carried)  # the same, in arrival order
    while True:
        if turn - first_turn >= TURNS_PER_RUN and ctx.patched(ROLLOVER_PATCH):
            # The messages waiting go on with it, and get their turns there first.
            ctx.continue_as_new(
                {
                    "session_id": session_id,
                    "first_turn": turn,
                    "context": _within(turns, budget),
                    "received": arrived[-RECEIVED_KEPT:],
                }
            )
        payload = await ctx.wait_signal(MESSAGE_SIGNAL)
        if is_close(payload):
            return {
                "session_id": session_id,
                "closed": True,
                "next_turn": turn,
                "turns": turn - first_turn,
                "context": _within(turns, budget),
            }
        message_id = message_id_of(payload)
        if message_id is not None:
            if message_id in received:
                continue  # a second copy: the first one has (or had) its turn
            received.add(message_id)
            arrived.append(message_id)
        turns = _within(turns, budget)
        child_input: dict[str, Any] = {
            "session_id": session_id,
            "turn": turn,
            "message": payload,
            "context": [message for past in turns for message in past],
        }
        while True:
            try:
                result = await ctx.execute_child_workflow(
                    agent_turn, child_input, workflow_id=turn_workflow_id(session_id, turn)
                )
            except ChildWorkflowError as exc:
                if _not_started(exc) and "refused" not in child_input:
                    if turns:
                        # Not started, so the number is free: the same turn again, with half
                        # the context, and the rest of the run keeps to that.
                        budget = _size(turns) // 2
                        turns = _within(turns, budget)
                        child_input["context"] = [m for past in turns for m in past]
                    else:
                        # Too large with no context at all: a turn that fails saying so, so
                        # that the sender is told (not one left waiting for a turn that never
                        # starts).
                        child_input = {
                            "session_id": session_id,
                            "turn": turn,
                            "message": {"message_id": message_id},
                            "refused": str(exc).split(f"{TOO_LARGE_ERROR}: ", 1)[-1][:1000],
                        }
                    continue
                # A failed or cancelled turn adds nothing to the conversation. One that failed
                # as too large would fail again with the same context: later turns carry half.
                if "ResourceExhausted" in str(exc):
                    budget = min(budget, max(_size(turns) // 2, MIN_CONTEXT_BYTES))
            else:
                new = result.get("messages") if isinstance(result, dict) else None
                if isinstance(new, list):
                    turns = [*turns, new][-MAX_CONTEXT_TURNS:]
            break
        turn += 1
