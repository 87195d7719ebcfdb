"""Client-side helpers: send a message to a session and follow the turn that answers it.

`send_message` makes sure the session's workflow (``session:<id>``) is open — starting it, or
reopening it after a close with its turn numbering and conversation carried over — and delivers
the message as a ``message`` signal. The session gives turns numbers in signal-arrival order,
so the signal's position in the session's history tells which turn (``session:<id>:turn:<n>``)
will answer it; the returned `TurnHandle` waits for that turn to start, then follows it:
`TurnHandle.stream` yields `TurnEvent`s derived from the turn's history as they are recorded,
`TurnHandle.result` returns the answer. Everything here goes through `everruns.Client`; it never
touches the database and holds no state a crash could lose (the message is durable once the
signal call returns).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import trio

from everruns.agent.activities import DEFAULT_MAX_STEPS, MAX_STEPS_LIMIT, MAX_TEXT_CHARS
from everruns.agent.events import TurnEvent, TurnEventMapper
from everruns.agent.workflow import (
    MESSAGE_SIGNAL,
    SESSION_WORKFLOW,
    is_close,
    message_id_of,
    session_workflow_id,
    turn_workflow_id,
)
from everruns.client import Client, WorkflowDescription, WorkflowHandle, deadline_after
from everruns.domain.retry import RetryPolicy
from everruns.errors import FailedPrecondition, InvalidArgument, NotFound, WorkflowFailed

__all__ = [
    "TurnHandle",
    "TurnResult",
    "close_session",
    "get_turn",
    "send_message",
]

POLL_FIRST = 0.05
POLL_MAX = 0.5
"""History is polled (there is no history long-poll RPC): from 50 ms, growing to 0.5 s while
nothing happens, back to 50 ms as soon as something does."""
SEND_ATTEMPTS = 5
MAX_MESSAGE_ID_CHARS = 200
"""The longest idempotency key `send_message` takes."""
MAX_SESSION_ID_CHARS = 200


class _Poll:
    def __init__(self) -> None:
        self.delay = POLL_FIRST

    def reset(self) -> None:
        self.delay = POLL_FIRST

    async def wait(self) -> None:
        await trio.sleep(self.delay)
        self.delay = min(POLL_MAX, self.delay * 1.5)


@attrs.frozen
class TurnResult:
    """How a turn ended (a completed turn; failed and cancelled ones raise instead).

    Attributes:
        outcome: ``answered``, or ``turn_limit_reached`` when the step limit stopped it.
        answer: the model's final text; None when the step limit was reached.
        steps: LLM calls made.
        tool_calls: tool calls run.
        session_id, turn, message_id: which message it answered (None if started directly).
        provider, model: who answered.
        messages: the turn's messages (user, model, tools), oldest first.
    """

    outcome: str
    answer: str | None
    steps: int
    tool_calls: int
    session_id: str | None
    turn: int | None
    message_id: str | None
    provider: str
    model: str
    messages: tuple[dict[str, Any], ...]

    @classmethod
    def from_dict(cls, d: Any) -> TurnResult:
        """Build from the turn workflow's result.

        Raises:
            InvalidArgument: ``d`` is not a turn result.
        """
        if not isinstance(d, dict) or not isinstance(d.get("outcome"), str):
            raise InvalidArgument(f"not a turn result: {d!r}"[:300])
        answer = d.get("answer")
        return cls(
            outcome=d["outcome"],
            answer=answer if isinstance(answer, str) else None,
            steps=int(d.get("steps") or 0),
            tool_calls=int(d.get("tool_calls") or 0),
            session_id=d.get("session_id"),
            turn=d.get("turn"),
            message_id=d.get("message_id"),
            provider=str(d.get("provider") or ""),
            model=str(d.get("model") or ""),
            messages=tuple(m for m in d.get("messages") or [] if isinstance(m, dict)),
        )


class TurnHandle:
    """One turn of a session: ``session:<id>:turn:<n>``.

    A turn that is queued behind another has no workflow yet; every method first waits for it
    to start (and raises `WorkflowFailed` if the session ends before it does).

    Attributes:
        session_id: the session.
        turn: the turn's number in the session, from 1.
        message_id: the id `send_message` gave the message, when known.
    """

    def __init__(
        self,
        client: Client,
        session_id: str,
        turn: int,
        *,
        message_id: str | None = None,
        session_run_id: str | None = None,
    ) -> None:
        self._client = client
        self.session_id = session_id
        self.turn = turn
        self.message_id = message_id
        self._session_run_id = session_run_id
        self._handle: WorkflowHandle | None = None

    def __repr__(self) -> str:
        return f"TurnHandle(workflow_id={self.workflow_id!r}, message_id={self.message_id!r})"

    @property
    def workflow_id(self) -> str:
        """The turn's workflow id."""
        return turn_workflow_id(self.session_id, self.turn)

    async def workflow(self) -> WorkflowHandle:
        """Wait until the turn's workflow exists and return a handle pinned to its run.

        Raises:
            WorkflowFailed: the session ended (closed or cancelled) before starting this turn.
            ServerUnavailable: the control plane stayed unreachable.
        """
        poll = _Poll()
        while True:
            found = await self._look_up()
            if found is not None:
                return found
            await poll.wait()

    async def _look_up(self) -> WorkflowHandle | None:
        """Look for the turn's workflow once: its handle, or None while it has not started.

        Raises:
            WorkflowFailed: the session ended before starting this turn.
        """
        if self._handle is not None:
            return self._handle
        found = await self._find()
        if found is not None:
            return found
        if not await self._session_open():
            found = await self._find()  # it may have started just before the session ended
            if found is not None:
                return found
            raise WorkflowFailed(
                f"session {self.session_id!r} ended before turn {self.turn} started; "
                "send the message again",
                status="failed",
            )
        return None

    async def _find(self) -> WorkflowHandle | None:
        try:
            description = await self._client.get_handle(self.workflow_id).describe()
        except NotFound:
            return None
        turn_input = description.input if isinstance(description.input, dict) else {}
        message = turn_input.get("message")
        found_id = message.get("message_id") if isinstance(message, dict) else None
        if self.message_id is not None and found_id != self.message_id:
            # The session was cancelled before this turn started and a later run gave the
            # number to another message: ours will never be answered.
            raise WorkflowFailed(
                f"turn {self.workflow_id!r} answers another message; the session ended before "
                "this one was answered; send it again",
                status="failed",
            )
        self._handle = self._client.get_handle(self.workflow_id, description.run_id)
        return self._handle

    async def _session_open(self) -> bool:
        """Whether the session run that received the message, or the run it continued as
        (with the messages it had not answered), is open."""
        run_id = self._session_run_id
        while True:
            handle = self._client.get_handle(session_workflow_id(self.session_id), run_id)
            try:
                description = await handle.describe()
            except NotFound:
                return False
            if description.continued_run_id is None:
                return description.is_open
            run_id = description.continued_run_id

    async def stream(self) -> AsyncIterator[TurnEvent]:
        """Yield the turn's events from its start, as they are recorded, until it ends.

        Events that already happened are yielded first, so a late follower misses nothing.
        The last event is ``turn.completed``, ``turn.failed`` or ``turn.cancelled``.

        Raises:
            WorkflowFailed: the session ended before the turn started.
            ServerUnavailable: the control plane stayed unreachable.

        Breaking out of the loop or cancelling stops following; the turn is unaffected.
        """
        handle = await self.workflow()
        mapper = TurnEventMapper(self.workflow_id)
        after = 0
        poll = _Poll()
        while True:
            events = await handle.history(after_sequence=after)
            for event in events:
                after = max(after, event.sequence_num)
                for turn_event in mapper.feed(
                    event.type, event.data, event.sequence_num, event.time
                ):
                    yield turn_event
            if mapper.finished:
                return
            if events:
                poll.reset()
            await poll.wait()

    async def result(self, timeout: float | None = None) -> TurnResult:
        """Wait for the turn to end and return its result.

        Args:
            timeout: seconds to wait in all (including while the turn is queued); None waits
                as long as it takes.

        Raises:
            WorkflowFailed: the turn ended ``failed`` (e.g. the LLM failed after its retries)
                or ``cancelled``, or the session ended before it started.
            TimeoutError: it had not ended after ``timeout`` seconds.
            InvalidArgument: ``timeout`` is negative or NaN.
        """
        deadline = deadline_after(timeout)
        # One lookup whatever the timeout (like WorkflowHandle.result): a turn that started
        # long ago is found even with timeout=0; only the waiting is bounded.
        handle = await self._look_up()
        if handle is None:
            with trio.move_on_at(deadline):
                handle = await self.workflow()
        if handle is None:
            raise TimeoutError(f"turn {self.workflow_id!r} had not started after {timeout:g} s")
        remaining = None if timeout is None else max(0.0, deadline - trio.current_time())
        return TurnResult.from_dict(await handle.result(timeout=remaining))

    async def cancel(self, reason: str = "") -> None:
        """Cancel the turn: the LLM call or tools in flight are cancelled, it ends
        ``cancelled``; the session goes on with the next message.

        Raises:
            FailedPrecondition: the turn has already ended.
            WorkflowFailed: the session ended before the turn started.
        """
        handle = await self.workflow()
        await handle.cancel(reason)

    async def describe(self) -> WorkflowDescription:
        """Wait for the turn to start, then return its workflow description."""
        handle = await self.workflow()
        return await handle.describe()


def get_turn(client: Client, session_id: str, turn: int) -> TurnHandle:
    """Return a handle to turn ``turn`` of a session (started or not).

    Raises:
        InvalidArgument: the session id or turn number is malformed.
    """
    _check_session_id(session_id)
    if isinstance(turn, bool) or not isinstance(turn, int) or turn < 1:
        raise InvalidArgument(f"turn must be an integer >= 1, got {turn!r}")
    return TurnHandle(client, session_id, turn)


_LIKE_A_TURN = re.compile(r":turn:[0-9]+$")
"""Session ids ending like this would give the session a workflow id that is another session's
turn (``session:acme:turn:1`` is turn 1 of session ``acme``)."""


def _check_session_id(session_id: Any) -> str:
    if (
        not isinstance(session_id, str)
        or not session_id
        or len(session_id) > MAX_SESSION_ID_CHARS
        or any(c.isspace() or not c.isprintable() for c in session_id)
    ):
        raise InvalidArgument(
            f"session id must be 1-{MAX_SESSION_ID_CHARS} printable characters without spaces, "
            f"got {session_id!r}"
        )
    if _LIKE_A_TURN.search(session_id):
        raise InvalidArgument(
            f"session id {session_id!r} ends in ':turn:<number>', which names a turn of "
            "another session; choose another id"
        )
    return session_id


def _message(
    text: str,
    max_steps: int,
    provider: str | None,
    model: str | None,
    tools: Sequence[str] | None,
    llm_retry: RetryPolicy | None,
    tool_retry: RetryPolicy | None,
    message_id: str | None = None,
) -> dict[str, Any]:
    if message_id is not None and (
        not isinstance(message_id, str)
        or not message_id.strip()
        or len(message_id) > MAX_MESSAGE_ID_CHARS
    ):
        raise InvalidArgument(
            f"message_id must be a non-empty string of at most {MAX_MESSAGE_ID_CHARS} characters"
        )
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("the message text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"the message text is longer than {MAX_TEXT_CHARS} characters")
    if (
        isinstance(max_steps, bool)
        or not isinstance(max_steps, int)
        or not 1 <= max_steps <= MAX_STEPS_LIMIT
    ):
        raise InvalidArgument(f"max_steps must be an integer from 1 to {MAX_STEPS_LIMIT}")
    message: dict[str, Any] = {
        "message_id": message_id or uuid.uuid4().hex,
        "text": text,
        "max_steps": max_steps,
    }
    if provider is not None:
        message["provider"] = provider
    if model is not None:
        message["model"] = model
    if tools is not None:
        if isinstance(tools, str) or not all(isinstance(t, str) for t in tools):
            raise InvalidArgument("tools must be a list of tool names")
        message["tools"] = list(tools)
    if llm_retry is not None:
        message["llm_retry"] = llm_retry.to_dict()
    if tool_retry is not None:
        message["tool_retry"] = tool_retry.to_dict()
    return message


async def _reopened_state(
    client: Client, session_id: str, ended: WorkflowDescription
) -> dict[str, Any]:
    """The input of a session run that follows ``ended``: the next turn number (so no turn id
    is used twice) and, after a clean close, the conversation."""
    result = ended.result if isinstance(ended.result, dict) else {}
    next_turn = result.get("next_turn")
    if ended.status != "completed" or not isinstance(next_turn, int):
        history = await client.get_handle(ended.workflow_id, ended.run_id).history()
        start = ended.input if isinstance(ended.input, dict) else {}
        next_turn = int(start.get("first_turn") or 1)
        for event in history:
            if event.type == "child_workflow_started":
                child = event.data.get("input")
                turn = child.get("turn") if isinstance(child, dict) else None
                if isinstance(turn, int):
                    next_turn = max(next_turn, turn + 1)
    context = result.get("context") if ended.status == "completed" else None
    return {
        "session_id": session_id,
        "first_turn": next_turn,
        "context": context if isinstance(context, list) else [],
    }


async def _open_session_run(client: Client, session_id: str) -> str:
    """Return the run id of the session's open run, starting one if none is open."""
    workflow_id = session_workflow_id(session_id)
    try:
        latest: WorkflowDescription | None = await client.get_handle(workflow_id).describe()
    except NotFound:
        latest = None
    if latest is not None and latest.is_open:
        return latest.run_id
    state: dict[str, Any] = {"session_id": session_id, "first_turn": 1, "context": []}
    if latest is not None:
        state = await _reopened_state(client, session_id, latest)
    handle = await client.start_workflow(SESSION_WORKFLOW, state, workflow_id=workflow_id)
    if handle.run_id is None:
        raise FailedPrecondition(f"the control plane returned no run for {workflow_id!r}")
    return handle.run_id


async def _turn_of(
    client: Client, handle: WorkflowHandle, message_id: str, text: str
) -> tuple[int | None, str]:
    """Return the turn the session will give ``message_id`` (None if the run that received
    it was closed before it: it will never be answered there) and the session run that
    received it: the one ``handle`` names or, when that run continued as new meanwhile, the
    chain's run the signal went on to.

    Raises:
        InvalidArgument: another send of ``message_id``, with another text, got there first.
    """
    while True:
        found, turn = await _find_turn(handle, message_id, text)
        if found:
            assert handle.run_id is not None
            return turn, handle.run_id
        continued = (await handle.describe()).continued_run_id
        if continued is None:
            raise FailedPrecondition(
                f"the message {message_id} is not in the history of session run {handle.run_id}"
            )
        handle = client.get_handle(handle.workflow_id, continued)


async def _find_turn(
    handle: WorkflowHandle, message_id: str, text: str | None = None
) -> tuple[bool, int | None]:
    """Whether the session run received ``message_id``, and the turn it gives it (None: the
    run was closed before it). The session's rules: one turn per message signal in arrival
    order, none after a close, none for a ``message_id`` the run already received (the first
    copy is the one answered).

    Raises:
        InvalidArgument: the run received ``message_id`` first with another text than ``text``.
    """
    events = await handle.history()
    start = events[0].data.get("input") if events else None
    turn = int(start.get("first_turn") or 1) if isinstance(start, dict) else 1
    closed = False
    carried = start.get("received") if isinstance(start, dict) else None
    received: set[str] = set(carried) if isinstance(carried, list) else set()
    for event in events:
        if event.type != "signal_received" or event.data.get("name") != MESSAGE_SIGNAL:
            continue
        payload = event.data.get("payload")
        if is_close(payload):
            closed = True
            continue
        found_id = message_id_of(payload)
        if found_id == message_id and isinstance(payload, dict):
            if text is not None and payload.get("text") != text:
                raise InvalidArgument(
                    f"message_id {message_id!r} was sent to this session with another text; "
                    "a new message needs a new message_id"
                )
            return True, None if closed else turn
        if found_id is not None:
            if found_id in received:
                continue  # a second copy gets no turn
            received.add(found_id)
        if not closed:
            turn += 1
    return False, None


async def send_message(
    client: Client,
    session_id: str,
    text: str,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    provider: str | None = None,
    model: str | None = None,
    tools: Sequence[str] | None = None,
    llm_retry: RetryPolicy | None = None,
    tool_retry: RetryPolicy | None = None,
    message_id: str | None = None,
) -> TurnHandle:
    """Send a message to a session; a turn of its own will answer it, after earlier ones.

    Args:
        client: a connected client.
        session_id: the session (created on first use).
        text: the message.
        max_steps: LLM calls the turn may make before it ends ``turn_limit_reached``.
        provider: LLM provider name (default: ``openai`` if the worker has
            ``OPENAI_API_KEY``, else ``scripted``).
        model: model name (default: the provider's, e.g. ``EVERRUNS_MODEL``).
        tools: names of the tools to offer (default: every tool enabled on the worker).
        llm_retry: retry policy of the LLM calls (default: 4 attempts from 1 s).
        tool_retry: retry policy of every tool call (default: each tool's own).
        message_id: the message's idempotency key (default: a new one). A retry with the same
            key after a lost reply does not send the message again if the session's open run
            has it: it returns the turn that answers it. Sends of one key that race may both
            deliver it; the session answers the first copy once and gives the others no turn,
            and every such send returns that turn. The same key with another text is
            InvalidArgument.

    Returns:
        A handle to the turn that will answer the message.

    Raises:
        InvalidArgument: a bad session id (including one ending in ``:turn:<number>``, which
            names another session's turn), empty or too long text, a bad option, or a
            ``message_id`` the session received with another text.
        ServerUnavailable: the control plane is unreachable (the message may not have been
            delivered; a signal is not retried automatically: retry with the same
            ``message_id`` to send it at most once).
        FailedPrecondition: the session kept ending while the message was being delivered.
    """
    _check_session_id(session_id)
    message = _message(text, max_steps, provider, model, tools, llm_retry, tool_retry, message_id)
    workflow_id = session_workflow_id(session_id)
    for _ in range(SEND_ATTEMPTS):
        run_id = await _open_session_run(client, session_id)
        handle = client.get_handle(workflow_id, run_id)
        found, turn = (
            await _find_turn(handle, message_id, text) if message_id is not None else (False, None)
        )
        if not found:
            try:
                await handle.signal(MESSAGE_SIGNAL, message)
            except FailedPrecondition:
                continue  # the run ended between finding it and signalling it: the next one
            turn, run_id = await _turn_of(client, handle, message["message_id"], text)
            handle = client.get_handle(workflow_id, run_id)
        if turn is not None:
            return TurnHandle(
                client, session_id, turn, message_id=message["message_id"], session_run_id=run_id
            )
        # The run was closed before our message: wait for it to end, then use the next run.
        try:
            await handle.result()
        except WorkflowFailed:
            pass
    raise FailedPrecondition(
        f"session {session_id!r} kept ending while a message was being delivered; try again"
    )


async def close_session(client: Client, session_id: str) -> bool:
    """Ask a session to end after the messages sent before this call are answered.

    A later `send_message` reopens it, with its turn numbering and conversation.

    Returns:
        True if an open session was asked to close, False if none was open.

    Raises:
        InvalidArgument: a bad session id.
        ServerUnavailable: the control plane is unreachable.
    """
    _check_session_id(session_id)
    handle = client.get_handle(session_workflow_id(session_id))
    try:
        await handle.signal(MESSAGE_SIGNAL, {"close": True})
    except (NotFound, FailedPrecondition):
        return False
    return True
