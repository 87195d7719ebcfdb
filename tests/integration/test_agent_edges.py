"""Agent sessions at their edges: racing sends of one message, payload limits lower than the
conversation or a turn's tool results, session ids shaped like turn ids, and following a turn
with no time to wait."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import attrs
import pytest
import trio

from everruns.agent import (
    ReasonReply,
    ReasonRequest,
    ToolCall,
    close_session,
    get_turn,
    register,
    register_provider,
    send_message,
    tool,
)
from everruns.agent.workflow import session_workflow_id
from everruns.domain.registry import Registry
from everruns.errors import InvalidArgument, WorkflowFailed
from everruns.worker import ActivityContext
from tests.integration.agent_harness import serve_agent

REGISTRY = register(Registry())


@attrs.define
class Counts:
    charges: list[str] = attrs.field(factory=list)


COUNTS = Counts()


@pytest.fixture
async def counts() -> Counts:
    global COUNTS
    COUNTS = Counts()
    return COUNTS


@tool(
    name="edges_charge",
    description="Charges a card (a side effect that must happen once per message).",
    offered_by_default=False,
    registry=REGISTRY,
)
async def edges_charge(ctx: ActivityContext, arguments: Any) -> dict[str, Any]:
    COUNTS.charges.append(ctx.info.activity_id)
    return {"charged": True}


BIG_DOC_CHARS = 12_000


@tool(
    name="edges_big",
    description="Returns a large document.",
    offered_by_default=False,
    registry=REGISTRY,
)
async def edges_big(ctx: ActivityContext, arguments: Any) -> dict[str, Any]:
    return {"doc": "x" * BIG_DOC_CHARS}


class BigCalls:
    """Asked to "fetch N", calls edges_big N times at once, then answers."""

    name = "edges_big_calls"

    async def complete(self, request: ReasonRequest) -> ReasonReply:
        last = request.messages[-1]
        if last.get("role") == "tool":
            return ReasonReply("done", (), "m", "stop")
        wanted = re.search(r"fetch (\d+)", str(last.get("content") or ""))
        if wanted is None:
            return ReasonReply("nothing to fetch", (), "m", "stop")
        calls = tuple(ToolCall(f"c{i}", "edges_big", {}) for i in range(int(wanted.group(1))))
        return ReasonReply("", calls, "m", "tool_calls")


register_provider(BigCalls.name, BigCalls, replace=True)


class _Barrier:
    def __init__(self, parties: int) -> None:
        self.parties, self.arrived, self.event = parties, 0, trio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.event.set()
        with trio.move_on_after(5):
            await self.event.wait()


class _GatedHandle:
    """A WorkflowHandle whose `signal` waits until every racing sender got that far: the
    interleaving of two sends whose history reads both come before either signal lands."""

    def __init__(self, handle: Any, barrier: _Barrier) -> None:
        self._handle, self._barrier = handle, barrier

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    async def signal(self, name: str, payload: Any = None) -> None:
        await self._barrier.wait()
        await self._handle.signal(name, payload)


class _GatedClient:
    def __init__(self, client: Any, barrier: _Barrier) -> None:
        self._client, self._barrier = client, barrier

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_handle(self, workflow_id: str, run_id: str | None = None) -> Any:
        return _GatedHandle(self._client.get_handle(workflow_id, run_id), self._barrier)


@pytest.mark.db
async def test_concurrent_sends_with_one_message_id_run_one_turn(
    database_url: str, counts: Counts
) -> None:
    """Two sends of one message_id that race (a client retrying while its first call is still
    under way, a double-submitted form) both read the session's history before either signal
    lands, so both signal. The session used to run a turn for each copy: the tool (a card
    charge) ran twice. Now the session answers a message_id once per run, and the client numbers
    turns by the same rule: both sends follow turn 2, and the next message is turn 3."""
    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY) as client:
            await send_message(client, "edges-dup", "hello")  # the session exists
            gated = _GatedClient(client, _Barrier(2))
            handles: list[Any] = []

            async def send() -> None:
                handles.append(
                    await send_message(
                        gated,  # type: ignore[arg-type]
                        "edges-dup",
                        "please edges_charge my card",
                        tools=["edges_charge"],
                        message_id="order-42",
                    )
                )

            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(send)
            for h in handles:
                await h.result(timeout=20)
            later = await send_message(client, "edges-dup", "what is 6 * 7?")
            later_result = await later.result(timeout=20)
            assert await close_session(client, "edges-dup")
            closed = await client.get_handle(session_workflow_id("edges-dup")).result(timeout=20)
            history = await client.get_handle(session_workflow_id("edges-dup")).history()
    turns = [
        e.data["input"]["message"].get("message_id")
        for e in history
        if e.type == "child_workflow_started"
    ]
    assert turns.count("order-42") == 1, f"turns per message: {turns}; charges: {counts.charges}"
    assert len(counts.charges) == 1
    assert [h.turn for h in handles] == [2, 2]
    assert later.turn == 3 and later_result.answer is not None and "42" in later_result.answer
    assert closed["next_turn"] == 4


@pytest.mark.db
async def test_tool_results_are_carried_once_and_a_turn_that_outgrows_the_limit_fails_alone(
    database_url: str, counts: Counts
) -> None:
    """Each tool result used to travel twice in the turn (as `result` and as its JSON text in
    `content`), so three 12,000-character results (36 KB) made a 72 KB `reason` input, over a
    50 KB limit: the turn failed though its results fit. Now it is answered. A turn whose
    results do outgrow the limit (five of them) fails, and the session answers the next
    message. (Before the engine made a too-large activity input an ActivityError, that turn
    stayed open for ever and hung its session; that part passes since that change.)"""
    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY, max_payload_bytes=50_000) as client:
            fits = await send_message(
                client, "edges-big", "fetch 3", tools=["edges_big"], provider=BigCalls.name
            )
            fits_result = await fits.result(timeout=10)
            too_big = await send_message(
                client, "edges-big", "fetch 5", tools=["edges_big"], provider=BigCalls.name
            )
            with contextlib.suppress(TimeoutError, WorkflowFailed):
                await too_big.result(timeout=10)  # failing is fine; staying open is not
            d = await too_big.describe()
            assert not d.is_open, f"turn 2 is still {d.status}: stuck: {d.stuck_reason}"
            after = await send_message(client, "edges-big", "hello")
            after_result = await after.result(timeout=10)
    assert (fits_result.outcome, fits_result.answer, fits_result.tool_calls) == (
        "answered",
        "done",
        3,
    )
    tool_messages = [m for m in fits_result.messages if m["role"] == "tool"]
    assert [len(m["result"]["doc"]) for m in tool_messages] == [BIG_DOC_CHARS] * 3
    assert d.status == "failed"
    assert after_result.outcome == "answered"


@pytest.mark.db
async def test_a_conversation_that_outgrows_a_lower_payload_limit_keeps_being_answered(
    database_url: str, counts: Counts
) -> None:
    """With EVERRUNS_MAX_PAYLOAD_BYTES=20000 and 4,000-character messages, turn 5's input (the
    context plus the message) is over the limit. The control plane refused the session's
    command and the session was stuck; since the engine change the child's start fails
    instead, but the session then skipped the turn, and the sender waited for ever for a turn
    that never started. Now the session starts the same turn again with half the context (and
    keeps to that budget), so every message is answered."""
    answered = []
    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY, max_payload_bytes=20_000) as client:
            for n in range(6):
                sent = await send_message(client, "edges-grow", f"note {n}: " + "y" * 4_000)
                try:
                    result = await sent.result(timeout=8)
                except TimeoutError:
                    d = await client.get_handle(session_workflow_id("edges-grow")).describe()
                    raise AssertionError(
                        f"turn {sent.turn} never ended; session {d.status}, stuck: "
                        f"{d.stuck_reason}; answered before it: {answered}"
                    ) from None
                answered.append(result.turn)
            history = await client.get_handle(session_workflow_id("edges-grow")).history()
    assert answered == [1, 2, 3, 4, 5, 6]
    refused = [
        e.data.get("error", {}).get("type") for e in history if e.type == "child_workflow_failed"
    ]
    assert refused and set(refused) == {"everruns.errors.ResourceExhausted"}


@pytest.mark.db
async def test_a_session_id_that_looks_like_a_turn_id_is_refused(
    database_url: str, counts: Counts
) -> None:
    """Session ids may hold ':', so session "acme:turn:1" had the workflow id
    "session:acme:turn:1": the id of session "acme"'s first turn. Once the former existed, the
    latter's first turn could not start, and its sender was told the session ended before the
    message was answered. Such ids (ending in ":turn:<digits>", exactly those that can collide)
    are now InvalidArgument, and session "acme" is answered."""
    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY) as client:
            for bad in ("acme:turn:1", "x:turn:0042"):
                with pytest.raises(InvalidArgument, match="turn"):
                    await send_message(client, bad, "hello from the other session")
                with pytest.raises(InvalidArgument):
                    get_turn(client, bad, 1)
                with pytest.raises(InvalidArgument):
                    await close_session(client, bad)
            other = await send_message(client, "acme:turn:x", "hello from a fine session")
            other_result = await other.result(timeout=20)
            mine = await send_message(client, "acme", "what is 6 * 7?")
            mine_result = await mine.result(timeout=20)
    assert other_result.outcome == "answered"
    assert mine_result.answer is not None and "6 * 7 = 42" in mine_result.answer


@pytest.mark.db
async def test_result_with_timeout_zero_of_an_answered_turn_returns_it(
    database_url: str, counts: Counts
) -> None:
    """WorkflowHandle.result(timeout=0) returns the result of a run that has ended, but
    TurnHandle.result(timeout=0) of a turn answered long ago raised TimeoutError saying the
    turn "had not started after 0 s": the deadline cancelled the lookup of the turn at its
    first await. Now one lookup is always made; only waiting is bounded."""
    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY) as client:
            sent = await send_message(client, "edges-zero", "what is 2 + 3?")
            await sent.result(timeout=20)
            again = get_turn(client, "edges-zero", 1)
            result = await again.result(timeout=0)
            not_yet = get_turn(client, "edges-zero", 2)
            with pytest.raises(TimeoutError, match="had not started after 0 s"):
                await not_yet.result(timeout=0)
    assert result.answer is not None and "2 + 3 = 5" in result.answer
