"""The agent end to end in one process: the real control plane on a fresh database, a real
`Worker` serving the agent's workflows and activities over gRPC, and `everruns.agent`'s client
helpers. The OpenAI-compatible provider talks to a fake chat-completions server on loopback."""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from everruns.agent import (
    ReasonReply,
    ReasonRequest,
    ToolCall,
    TurnEvent,
    TurnHandle,
    _http,
    close_session,
    register,
    register_provider,
    send_message,
    tool,
)
from everruns.agent.tools import HTTP_GET_ENV, http_get
from everruns.client import Client
from everruns.domain.registry import Registry
from everruns.domain.retry import RetryPolicy
from everruns.errors import EverrunsError, NotFound, WorkflowFailed
from everruns.worker import ActivityContext, ActivityInfo
from tests.integration.agent_harness import serve_agent

FAST = RetryPolicy(max_attempts=5, initial_interval=0.05, maximum_interval=0.2)

# ------------------------------------------------------------- test tools and providers


@attrs.define
class State:
    """What the test tools and providers report back to the running test."""

    flaky_attempts: list[int] = attrs.field(factory=list)
    blocker_started: trio.Event = attrs.field(factory=trio.Event)
    blocker_cleaned_up: trio.Event = attrs.field(factory=trio.Event)
    gate_entered: trio.Event = attrs.field(factory=trio.Event)
    gate_open: trio.Event = attrs.field(factory=trio.Event)
    llm_calls: int = 0


STATE = State.__new__(State)  # replaced by the `state` fixture inside each test's Trio run
REGISTRY = register(Registry())


@tool(
    name="flaky_lookup",
    description="Looks an order up; the backend is flaky.",
    offered_by_default=False,
    registry=REGISTRY,
)
async def flaky_lookup(ctx: ActivityContext, arguments: Any) -> dict[str, Any]:
    STATE.flaky_attempts.append(ctx.attempt)
    if ctx.attempt < 3:
        raise ConnectionError(f"backend unavailable (attempt {ctx.attempt})")
    return {"order": 7, "status": "shipped", "attempt": ctx.attempt}


@tool(
    name="blocker",
    description="Never finishes on its own.",
    offered_by_default=False,
    registry=REGISTRY,
)
async def blocker(ctx: ActivityContext, arguments: Any) -> None:
    STATE.blocker_started.set()
    try:
        await trio.sleep_forever()
    finally:
        STATE.blocker_cleaned_up.set()


@tool(
    name="gate_tool",
    description="Finishes when the test opens the gate.",
    offered_by_default=False,
    registry=REGISTRY,
)
async def gate_tool(ctx: ActivityContext, arguments: Any) -> str:
    STATE.gate_entered.set()
    await STATE.gate_open.wait()
    return "through the gate"


class DownProvider:
    """An LLM whose every call fails."""

    name = "test_down"

    async def complete(self, request: ReasonRequest) -> ReasonReply:
        STATE.llm_calls += 1
        raise EverrunsError("the model is down (HTTP 503)")


register_provider("test_down", DownProvider, replace=True)


@pytest.fixture
async def state() -> State:
    global STATE
    STATE = State()
    return STATE


def agent_system(database_url: str) -> AbstractAsyncContextManager[Client]:
    """The control plane, one worker serving the agent and this module's tools, a client."""
    return serve_agent(database_url, REGISTRY)


async def follow(handle: TurnHandle) -> list[TurnEvent]:
    return [event async for event in handle.stream()]


# ---------------------------------------------------------------------------- the tests


@pytest.mark.db
def _use_fake_api(monkeypatch: pytest.MonkeyPatch, port: int, *, key: str = "sk-test-key") -> None:
    """Point the OpenAI provider of the agents started from here at a local fake API."""
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")


async def test_a_full_turn_with_tools(database_url: str, state: State) -> None:
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            handle = await send_message(client, "s1", "What is 6 * 7, and what time is it?")
            assert (handle.turn, handle.workflow_id) == (1, "session:s1:turn:1")
            events = await follow(handle)
            result = await handle.result()
            description = await handle.describe()
            session = await client.get_handle("session:s1").describe()
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
    assert events[0].data["text"] == "What is 6 * 7, and what time is it?"
    assert events[1].data["provider"] == "scripted"
    results = {e.data["tool"]: e.data["result"] for e in events if e.kind == "tool.result"}
    assert results["calculator"] == {"expression": "6 * 7", "result": 42}
    assert results["clock"]["utc"].endswith("Z")
    assert [e.sequence_num for e in events] == sorted(e.sequence_num for e in events)
    assert result.outcome == "answered" and result.steps == 2 and result.tool_calls == 2
    assert result.answer is not None and "6 * 7 = 42" in result.answer
    assert result.answer == events[-1].data["answer"]
    assert (result.session_id, result.turn) == ("s1", 1)
    assert description.status == "completed" and description.parent_workflow_id == "session:s1"
    assert session.status == "running" and session.workflow_type == "agent_session"


@pytest.mark.db
async def test_a_tool_that_fails_transiently_then_succeeds(database_url: str, state: State) -> None:
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            handle = await send_message(
                client, "s2", "check flaky_lookup for me", tools=["flaky_lookup"], tool_retry=FAST
            )
            events = await follow(handle)
            result = await handle.result()
    assert state.flaky_attempts == [1, 2, 3]
    retries = [e for e in events if e.kind == "tool.retrying"]
    assert [e.data["attempt"] for e in retries] == [1, 2]
    assert "ConnectionError: backend unavailable" in retries[0].data["error"]
    (tool_result,) = [e for e in events if e.kind == "tool.result"]
    assert tool_result.data["result"]["status"] == "shipped"
    assert result.outcome == "answered" and result.answer is not None
    assert '"status": "shipped"' in result.answer


@pytest.mark.db
async def test_an_llm_failing_for_good_fails_the_turn(database_url: str, state: State) -> None:
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            handle = await send_message(
                client,
                "s3",
                "hello",
                provider="test_down",
                llm_retry=RetryPolicy(max_attempts=3, initial_interval=0.05),
            )
            with pytest.raises(WorkflowFailed) as failed:
                await handle.result()
            events = await follow(handle)
            description = await handle.describe()
            # The session is not stuck: the next message gets its own turn and is answered.
            after = await send_message(client, "s3", "hello again")
            answered = await after.result()
    assert failed.value.status == "failed"
    assert "the model is down" in str(failed.value)
    assert state.llm_calls == 3
    assert description.status == "failed"
    assert description.error is not None and "the model is down" in description.error["message"]
    assert [e.kind for e in events if e.kind == "reason.retrying"] == ["reason.retrying"] * 2
    assert events[-1].kind == "turn.failed" and "the model is down" in events[-1].data["message"]
    assert after.turn == 2 and answered.outcome == "answered"


@pytest.mark.db
async def test_two_messages_make_two_turns_in_order(database_url: str, state: State) -> None:
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            first = await send_message(client, "s4", "What is 2 + 2?")
            second = await send_message(client, "s4", "Thanks, and what is 3 * 3?")
            first_result = await first.result()
            second_result = await second.result()
            first_run = await first.describe()
            second_run = await second.describe()
    assert (first.turn, second.turn) == (1, 2)
    assert first_result.answer is not None and "2 + 2 = 4" in first_result.answer
    assert second_result.answer is not None and "3 * 3 = 9" in second_result.answer
    assert first_run.completed_at is not None
    assert second_run.created_at >= first_run.completed_at
    # The second turn saw the first turn's conversation.
    context = second_run.input["context"]
    assert context[0] == {"role": "user", "content": "What is 2 + 2?"}
    assert context[-1]["content"] == first_result.answer


@pytest.mark.db
async def test_a_message_during_a_turn_is_answered_in_the_next(
    database_url: str, state: State
) -> None:
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            first = await send_message(client, "s5", "please run gate_tool", tools=["gate_tool"])
            await state.gate_entered.wait()
            second = await send_message(client, "s5", "what is 5 * 5")
            assert second.turn == 2
            with pytest.raises(NotFound):
                await client.get_handle(second.workflow_id).describe()  # queued, not started
            state.gate_open.set()
            first_result = await first.result()
            second_result = await second.result()
    assert first_result.answer is not None and "through the gate" in first_result.answer
    assert second_result.answer is not None and "5 * 5 = 25" in second_result.answer


@pytest.mark.db
async def test_a_turn_cancelled_mid_tool(database_url: str, state: State) -> None:
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            handle = await send_message(client, "s6", "run the blocker", tools=["blocker"])
            await state.blocker_started.wait()
            asked = trio.current_time()
            await handle.cancel("changed my mind")
            with trio.fail_after(2):
                await state.blocker_cleaned_up.wait()  # Trio cancellation reached the tool
            cleaned_up_after = trio.current_time() - asked
            with pytest.raises(WorkflowFailed) as cancelled:
                await handle.result()
            events = await follow(handle)
            after = await send_message(client, "s6", "what is 1 + 1")
            answered = await after.result()
    assert cleaned_up_after < 2
    assert cancelled.value.status == "cancelled"
    assert events[-1].kind == "turn.cancelled"
    assert ("tool.called", "blocker") in [(e.kind, e.data.get("tool")) for e in events]
    assert after.turn == 2 and answered.answer is not None and "1 + 1 = 2" in answered.answer


@pytest.mark.db
async def test_a_closed_session_reopens_with_its_numbering_and_conversation(
    database_url: str, state: State
) -> None:
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            first = await send_message(client, "s7", "what is 10 / 4")
            assert await close_session(client, "s7")
            first_result = await first.result()
            closed = await client.get_handle("session:s7").result()
            assert not await close_session(client, "s7")  # nothing open any more
            again = await send_message(client, "s7", "hello")
            again_result = await again.result()
            again_run = await again.describe()
    assert first_result.answer is not None and "10 / 4 = 2.5" in first_result.answer
    assert closed["closed"] is True and closed["next_turn"] == 2
    assert again.turn == 2 and again_result.outcome == "answered"
    assert again_run.input["context"][0] == {"role": "user", "content": "what is 10 / 4"}


# ------------------------------------------------------------------- OpenAI-compatible


@attrs.define
class FakeChatCompletions:
    """A chat-completions endpoint on loopback that answers from a script and records requests."""

    replies: list[tuple[int, dict[str, Any], bool]]
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    # extra header lines of the reply of the same index ("Retry-After: 3\r\n")
    headers: dict[int, str] = attrs.field(factory=dict)

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        request_line, *lines = head.decode().split("\r\n")
        method, path, _ = request_line.split(" ")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)
        }
        while len(body) < int(headers.get("content-length", "0")):
            body += await stream.receive_some(65536)
        extra = self.headers.get(len(self.requests), "")
        self.requests.append(
            {
                "method": method,
                "path": path,
                "headers": headers,
                "body": json.loads(body),
                "at": trio.current_time(),
            }
        )
        status, reply, chunked = self.replies.pop(0)
        payload = json.dumps(reply).encode()
        if chunked:
            middle = len(payload) // 2
            framed = b"".join(
                f"{len(part):x}\r\n".encode() + part + b"\r\n"
                for part in (payload[:middle], payload[middle:])
            )
            response = (
                (
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode()
                + framed
                + b"0\r\n\r\n"
            )
        else:
            response = (
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload
        await stream.send_all(response)
        await stream.aclose()


@asynccontextmanager
async def fake_server(fake: FakeChatCompletions) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, fake.handle, listeners)
        yield port
        nursery.cancel_scope.cancel()


def completion(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "fake-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
    }


@pytest.mark.db
async def test_the_openai_provider_against_a_fake_chat_completions_server(
    database_url: str, state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool_call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps({"expression": "6 * 7"})},
    }
    fake = FakeChatCompletions(
        replies=[
            (200, completion({"content": None, "tool_calls": [tool_call]}, "tool_calls"), True),
            (200, completion({"content": "6 times 7 is 42."}, "stop"), False),
        ]
    )
    with trio.fail_after(60):
        async with fake_server(fake) as port:
            _use_fake_api(monkeypatch, port)
            monkeypatch.setenv("EVERRUNS_MODEL", "fake-model")
            async with agent_system(database_url) as client:
                handle = await send_message(client, "s8", "What is 6 times 7?")
                result = await handle.result()
                history = await client.get_handle(handle.workflow_id).history()
    assert result.answer == "6 times 7 is 42." and result.steps == 2 and result.tool_calls == 1
    assert (result.provider, result.model) == ("openai", "fake-model")
    first, second = fake.requests
    for request in (first, second):
        assert (request["method"], request["path"]) == ("POST", "/v1/chat/completions")
        assert request["headers"]["authorization"] == "Bearer sk-test-key"
        assert request["headers"]["content-type"] == "application/json"
        assert request["body"]["model"] == "fake-model"
    offered = {t["function"]["name"]: t for t in first["body"]["tools"]}
    assert set(offered) == {"calculator", "clock", "sleep"}
    assert offered["calculator"]["function"]["parameters"]["required"] == ["expression"]
    assert [m["role"] for m in first["body"]["messages"]] == ["system", "user"]
    roles = [m["role"] for m in second["body"]["messages"]]
    assert roles == ["system", "user", "assistant", "tool"]
    assistant, tool_message = second["body"]["messages"][2:]
    assert assistant["tool_calls"][0]["id"] == "call_abc"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {
        "expression": "6 * 7"
    }
    assert tool_message["tool_call_id"] == "call_abc"
    assert json.loads(tool_message["content"]) == {"expression": "6 * 7", "result": 42}
    # The API key never reaches the history.
    assert all("sk-test-key" not in json.dumps(e.data) for e in history)


@pytest.mark.db
async def test_an_llm_api_refusal_fails_the_turn_without_retries(
    database_url: str, state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeChatCompletions(
        replies=[(401, {"error": {"message": "Incorrect API key provided"}}, False)]
    )
    with trio.fail_after(60):
        async with fake_server(fake) as port:
            _use_fake_api(monkeypatch, port, key="sk-wrong")
            async with agent_system(database_url) as client:
                handle = await send_message(client, "s9", "hello")
                with pytest.raises(WorkflowFailed) as failed:
                    await handle.result()
    assert len(fake.requests) == 1
    assert "HTTP 401: Incorrect API key provided" in str(failed.value)


@pytest.mark.db
async def test_a_rate_limited_llm_call_waits_as_long_as_the_api_asks(
    database_url: str, state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP 429 with ``Retry-After: 3``: the next call comes no sooner than 3 s later (the
    LLM retry policy's own backoff is about 1 s), and the turn then completes. Before, the
    header was ignored and the retry came after the backoff, into the same rate limit."""
    fake = FakeChatCompletions(
        replies=[
            (429, {"error": {"message": "Rate limit reached"}}, False),
            (200, completion({"content": "hello back"}, "stop"), False),
        ],
        headers={0: "Retry-After: 3\r\n"},
    )
    with trio.fail_after(60):
        async with fake_server(fake) as port:
            _use_fake_api(monkeypatch, port)
            async with agent_system(database_url) as client:
                handle = await send_message(client, "s-rate", "hello")
                result = await handle.result()
                history = await client.get_handle(handle.workflow_id).history()
    assert result.answer == "hello back"
    first, second = fake.requests
    assert second["at"] - first["at"] >= 3.0
    failed = [e.data["error"] for e in history if e.type == "activity_failed"]
    assert failed and failed[0]["retry_after"] == 3.0
    assert "HTTP 429: Rate limit reached" in failed[0]["message"]


@pytest.mark.db
async def test_tool_arguments_json_cannot_carry_are_reported_to_the_model(
    database_url: str, state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that writes NaN in a tool call's arguments is told, as for any other unreadable
    arguments, and the turn goes on: the reply used to be unrecordable and failed the turn."""
    bad_call = {
        "id": "call_nan",
        "type": "function",
        "function": {"name": "sleep", "arguments": '{"seconds": NaN}'},
    }
    fake = FakeChatCompletions(
        replies=[
            (200, completion({"content": None, "tool_calls": [bad_call]}, "tool_calls"), False),
            (200, completion({"content": "sorry, bad arguments"}, "stop"), False),
        ]
    )
    with trio.fail_after(60):
        async with fake_server(fake) as port:
            _use_fake_api(monkeypatch, port)
            async with agent_system(database_url) as client:
                handle = await send_message(client, "s-nan", "wait a bit")
                result = await handle.result()
    assert (result.outcome, result.answer) == ("answered", "sorry, bad arguments")
    tool_message = fake.requests[1]["body"]["messages"][-1]
    assert tool_message["tool_call_id"] == "call_nan"
    assert "NaN, Infinity or too large" in json.loads(tool_message["content"])["error"]


class HugeNumberProvider:
    """Asks the calculator for 1e5000 once, then answers with what the tool said."""

    name = "test_huge_number"

    async def complete(self, request: ReasonRequest) -> ReasonReply:
        last = request.messages[-1]
        if last.get("role") == "tool":
            return ReasonReply(str(last.get("error") or last.get("content")), (), "m", "stop")
        call = ToolCall("c1", "calculator", {"expression": "1e5000"})
        return ReasonReply("", (call,), "m", "tool_calls")


register_provider("test_huge_number", HugeNumberProvider, replace=True)


@pytest.mark.db
async def test_a_calculator_result_beyond_its_bound_is_a_tool_error_the_model_sees(
    database_url: str, state: State
) -> None:
    """1e5000 is beyond the calculator's MAX_RESULT_BITS: the tool refuses it at once and the
    model is told. It used to return a 5,001-digit integer the worker could not record, so the
    attempt was retried and dead-lettered and the model heard only that the worker stopped."""
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            handle = await send_message(
                client, "s-huge", "what is 1e5000?", provider="test_huge_number"
            )
            result = await handle.result()
    assert result.answer is not None
    assert "cannot evaluate '1e5000'" in result.answer and "too large" in result.answer


@pytest.mark.db
async def test_the_demo_shows_why_a_turn_failed(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo passes its environment to its workers, so with OPENAI_API_KEY set and no
    network every turn fails: its board shows each retry's error and its answer the reason,
    where both used to say only "failed"."""
    from everruns import demo

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there: like an unreachable API
    _use_fake_api(monkeypatch, port)
    answers: dict[str, str] = {}
    with trio.fail_after(60):
        async with agent_system(database_url) as client:
            board = demo.Board(["math"])
            await demo._follow(
                client, board, "math", "s-demo", "what is (17 + 25) * 2?", answers, None
            )
    shown = capsys.readouterr().out
    assert answers["math"].startswith("turn failed: ") and "cannot connect" in answers["math"]
    assert "the model call failed (attempt 1), retrying:" in shown
    assert f"cannot connect to 127.0.0.1:{port}" in shown
    assert "sk-test-key" not in shown + answers["math"]


# ------------------------------------------------------------------ HTTP client, no database


@asynccontextmanager
async def raw_server(
    response: bytes, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """Serve one canned response to every connection; yield the port and the requests seen."""
    seen: list[bytes] = []

    async def handle(stream: trio.abc.Stream) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            seen.append(data)
            await stream.send_all(response)
        except trio.BrokenResourceError:
            pass  # a client that refused our certificate
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        if ssl_context is None:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
        else:
            listeners = await nursery.start(
                functools.partial(trio.serve_ssl_over_tcp, handle, 0, ssl_context, host="127.0.0.1")
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
        yield port, seen
        nursery.cancel_scope.cancel()


async def test_http_get_tool_over_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"hello from loopback " * 2000  # longer than the tool returns
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body  # ends at close
    ctx = ActivityContext(ActivityInfo("wf", "run", "agent_turn", "3", "act.http_get", 1, 3))
    monkeypatch.setenv(HTTP_GET_ENV, "1")
    with trio.fail_after(10):
        async with raw_server(response) as (port, seen):
            result = await http_get(ctx, {"url": f"http://127.0.0.1:{port}/page?q=1"})
    assert result["status"] == 200 and result["content_type"] == "text/plain"
    assert result["truncated"] is True and result["body"] == body.decode()[:20_000]
    assert seen[0].startswith(b"GET /page?q=1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_https_requests_verify_the_server() -> None:
    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    payload = b'{"ok": true}'
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(payload):x}\r\n".encode()
        + payload
        + b"\r\n0\r\n\r\n"
    )
    with trio.fail_after(10):
        async with raw_server(chunked, ssl_context=server_context) as (port, seen):
            response = await _http.request(
                "POST",
                f"https://127.0.0.1:{port}/v1/chat/completions",
                headers={"Content-Type": "application/json"},
                body=b"{}",
                ssl_context=client_context,
            )
            assert response.json() == {"ok": True}
            # A server the client does not trust is refused (retryable: it may be a glitch).
            with pytest.raises(EverrunsError, match="broke"):
                await _http.request("GET", f"https://127.0.0.1:{port}/")
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


async def test_unreachable_hosts_are_reported() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there any more
    with trio.fail_after(10), pytest.raises(EverrunsError, match="cannot connect"):
        await _http.request("GET", f"http://127.0.0.1:{port}/")
