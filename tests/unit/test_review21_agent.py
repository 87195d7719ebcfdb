"""Review 21 of the agent turn: failing tests for defects found in `everruns.agent` and the demo
(no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from everruns.agent._http import ResponseParser, build_request
from everruns.agent.providers import (
    OpenAIProvider,
    ReasonRequest,
    ScriptedProvider,
    parse_openai_reply,
)
from everruns.agent.tools import HTTP_GET_ENV, http_get
from everruns.demo import provider_note
from everruns.domain import payload
from everruns.errors import ConfigError, EverrunsError, InvalidArgument, NonRetryableError
from everruns.worker.activity import ActivityContext, ActivityInfo

# ------------------------------------------------------- configuration: a malformed URL


@pytest.mark.parametrize("base", ["http://[::1/v1", "http://[not-an-ip]/v1", "https://a]b/v1"])
def test_openai_base_url_with_a_malformed_host_is_a_config_error(base: str) -> None:
    """Defect: an OPENAI_BASE_URL whose host urlsplit cannot read (an unclosed or bogus IPv6
    bracket) escapes `OpenAIProvider.from_env` as a bare ValueError ("Invalid IPv6 URL")
    instead of the documented ConfigError, so the ``reason`` activity does not classify it as a
    configuration mistake (it is retried 4 times) and the demo crashes on it. Expected: a
    ConfigError naming OPENAI_BASE_URL."""
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": base}
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        OpenAIProvider.from_env(env)


def test_demo_provider_note_survives_a_malformed_base_url() -> None:
    """Defect: `demo.provider_note` promises one line saying which LLM the workers will use
    (and that every turn will fail with a bad configuration), but with
    OPENAI_BASE_URL=http://[::1/v1 it raises ValueError and the whole demo dies with a
    traceback after starting the control plane and workers. Expected: a one-line note that
    names OPENAI_BASE_URL."""
    note = provider_note({"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "http://[::1/v1"})
    assert "OPENAI_BASE_URL" in note and "\n" not in note


@pytest.mark.parametrize("url", ["http://[::1/page", "http://[example.com]/", "http://a]b/"])
def test_build_request_refuses_a_malformed_host_as_invalid_argument(url: str) -> None:
    """Defect: `_http.build_request` documents InvalidArgument for a URL that is not
    http(s)://host[:port]/..., but a malformed bracketed host raises the ValueError of
    `urlsplit`. Expected: InvalidArgument."""
    with pytest.raises(InvalidArgument):
        build_request("GET", url)


async def test_http_get_with_a_malformed_url_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect: the http_get tool turns an unusable URL into NonRetryableError (the model is
    told at once), but a URL with a malformed IPv6 host escapes as ValueError, so the tool
    activity is retried (3 attempts, with backoff) for an error no retry can fix. Expected:
    NonRetryableError."""
    monkeypatch.setenv(HTTP_GET_ENV, "1")
    ctx = ActivityContext(ActivityInfo("wf", "run", "agent_turn", "3", "act.http_get", 1, 3))
    with pytest.raises(NonRetryableError):
        await http_get(ctx, {"url": "http://[::1/page"})


# ------------------------------------------------------------- HTTP response parsing


@pytest.mark.parametrize(
    "data",
    [
        "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),
        "HTTP/1.1 2\u00b20 OK\r\n\r\n".encode("latin-1"),
    ],
)
def test_non_ascii_digits_in_a_response_head_are_a_malformed_response(data: bytes) -> None:
    """Defect: the parser checks the status code and Content-Length with `str.isdigit`, which
    accepts superscript digits (latin-1 byte 0xB2 is '²'), then `int()` refuses them: a
    hostile or broken server makes `ResponseParser.feed` raise a bare ValueError instead of
    the documented EverrunsError ("malformed HTTP response"). Expected: EverrunsError."""
    with pytest.raises(EverrunsError, match="malformed"):
        ResponseParser().feed(data)


# ------------------------------------------------------- replies a payload cannot carry


def _reply(message: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "choices": [{"message": message, "finish_reason": "stop"}]}


@pytest.mark.parametrize(
    "body",
    [
        # content with half a surrogate pair (a model cutting an emoji in two)
        '{"model": "m", "choices": [{"message": {"content": "ok \\ud83d"}, '
        '"finish_reason": "stop"}]}',
        # tool-call arguments holding one
        '{"model": "m", "choices": [{"message": {"content": null, "tool_calls": [{"id": "c1", '
        '"type": "function", "function": {"name": "calculator", '
        '"arguments": "{\\"expression\\": \\"1 \\\\ud83d\\"}"}}]}, '
        '"finish_reason": "tool_calls"}]}',
    ],
)
def test_a_reply_with_a_lone_surrogate_can_be_recorded(body: str) -> None:
    """Defect: JSON's \\uXXXX escapes let a chat-completions body carry half a surrogate pair,
    which `json.loads` keeps as a lone surrogate. `parse_openai_reply` passes it on, so the
    ``reason`` activity's result cannot be encoded (UTF-8 cannot carry it): the attempt fails
    non-retryably and the whole turn fails, exactly what the NaN/Infinity handling of tool
    arguments exists to prevent. Expected: a reply the engine can record (the surrogate
    replaced, or the tool call kept with ``error`` set)."""
    reply = parse_openai_reply(json.loads(body))
    payload.encode(reply.to_dict(), what="result of activity 'reason'")


def test_scripted_provider_asked_to_wait_a_huge_number_of_seconds_gives_a_recordable_reply() -> (
    None
):
    """Defect: the scripted provider ("never fails") turns "wait 999…9 seconds" (400 digits)
    into ``float(...)`` = inf and asks the sleep tool for ``{"seconds": inf}``: the reason
    activity's result cannot be written as JSON, so the turn fails instead of sleeping the
    tool's capped 60 s (or telling the user). Expected: the reply is recordable JSON."""
    text = "please wait " + "9" * 400 + " seconds"
    request = ReasonRequest(
        ({"role": "system", "content": "sys"}, {"role": "user", "content": text}),
        ({"name": "sleep", "description": "", "parameters": {"type": "object"}},),
    )
    reply = ScriptedProvider().reply(request)
    payload.encode(reply.to_dict(), what="result of activity 'reason'")
