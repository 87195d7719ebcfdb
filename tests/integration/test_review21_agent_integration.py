"""Review 21 of the agent turn: failing tests, end to end, for defects found in `everruns.agent`
(a real control plane, a worker, a fake chat-completions server on loopback)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from everruns.agent import register, send_message
from everruns.agent.tools import HTTP_GET_ENV, HTTP_GET_MAX_BYTES, HTTP_GET_MAX_CHARS, http_get
from everruns.domain.registry import Registry
from everruns.worker import ActivityContext, ActivityInfo
from tests.integration.agent_harness import serve_agent

REGISTRY = register(Registry())


@asynccontextmanager
async def raw_server(responses: list[bytes]) -> AsyncIterator[int]:
    """A loopback HTTP server that answers each request with the next of ``responses``."""

    async def handle(stream: trio.abc.Stream) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                body += chunk
            await stream.send_all(responses.pop(0) if len(responses) > 1 else responses[0])
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def _json_response(body: str) -> bytes:
    data = body.encode("ascii")
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


@pytest.mark.db
async def test_a_model_reply_with_half_a_surrogate_pair_does_not_fail_the_turn(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: an OpenAI-compatible reply whose text holds half a surrogate pair (``\\ud83d``,
    a model cutting an emoji in two; valid JSON) is parsed into a lone surrogate that the
    ``reason`` activity's result cannot carry: the attempt fails non-retryably and the turn
    ends ``failed`` ("holds the lone surrogate"). Expected: the turn is answered (the broken
    character replaced), as the NaN handling of tool arguments already does for numbers."""
    reply = (
        '{"id": "x", "model": "fake-model", "choices": [{"index": 0, "message": '
        '{"role": "assistant", "content": "42 \\ud83d"}, "finish_reason": "stop"}]}'
    )
    with trio.fail_after(60):
        async with raw_server([_json_response(reply)]) as port:
            monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
            monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
            async with serve_agent(database_url, REGISTRY) as client:
                handle = await send_message(client, "r21-surrogate", "what is 6 * 7?")
                result = await handle.result()
    assert result.outcome == "answered"
    assert result.answer is not None and result.answer.startswith("42")


@pytest.mark.db
async def test_asking_the_scripted_agent_to_wait_a_huge_number_of_seconds_does_not_fail_the_turn(
    database_url: str,
) -> None:
    """Defect: the scripted provider (documented "never fails") reads "wait 999…9 seconds"
    (400 digits) as ``float`` inf and asks the sleep tool for ``{"seconds": inf}``; the reason
    activity's result cannot be recorded, so the turn fails at once. Expected: the sleep tool
    is called (it caps the wait at 60 s) or the model answers; the turn must not fail. The
    test waits 10 s: a turn still sleeping then is the expected behaviour."""
    text = "please wait " + "9" * 400 + " seconds"
    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY) as client:
            handle = await send_message(
                client, "r21-wait", text, provider="scripted", tools=["sleep"]
            )
            with trio.move_on_after(10):
                await handle.result()  # raises WorkflowFailed on the defect


async def test_http_get_of_a_page_larger_than_its_byte_bound_is_truncated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect: the http_get tool returns at most 20,000 characters and says ``truncated``, yet
    a page over HTTP_GET_MAX_BYTES (2 MB, common for real web pages) makes it raise a
    retryable EverrunsError ("body is larger than 2097152 bytes"): the activity downloads it
    three times and the model only hears that the tool failed. Expected: the first
    HTTP_GET_MAX_CHARS characters with ``truncated`` true."""
    body = b"a" * (HTTP_GET_MAX_BYTES + 1000)
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    ctx = ActivityContext(ActivityInfo("wf", "run", "agent_turn", "3", "act.http_get", 1, 3))
    monkeypatch.setenv(HTTP_GET_ENV, "1")
    with trio.fail_after(20):
        async with raw_server([response]) as port:
            result = await http_get(ctx, {"url": f"http://127.0.0.1:{port}/big"})
    assert result["status"] == 200 and result["truncated"] is True
    assert result["body"] == "a" * HTTP_GET_MAX_CHARS
