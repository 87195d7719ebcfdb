"""LLM providers without a network: the scripted provider's rules, the chat-completions format
(both directions), provider configuration, the provider table, and how the ``reason`` activity
classifies a provider's failures."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from everruns.agent import activities
from everruns.agent.providers import (
    DEFAULT_OPENAI_BASE_URL,
    OpenAIProvider,
    ReasonReply,
    ReasonRequest,
    ScriptedProvider,
    ToolCall,
    default_model,
    default_provider_name,
    find_arithmetic,
    get_provider,
    parse_openai_reply,
    provider_names,
    register_provider,
    to_openai_messages,
    to_openai_tools,
)
from everruns.domain import payload
from everruns.errors import (
    ConfigError,
    EverrunsError,
    InvalidArgument,
    NonRetryableError,
    NotFound,
)
from everruns.worker.activity import ActivityContext, ActivityInfo

ALL_TOOLS = ("calculator", "clock", "sleep", "http_get")


def tools(*names: str) -> tuple[dict[str, Any], ...]:
    return tuple(
        {"name": n, "description": f"the {n} tool", "parameters": {"type": "object"}} for n in names
    )


def ask(text: str, *offered: str) -> ReasonReply:
    request = ReasonRequest(
        ({"role": "system", "content": "sys"}, {"role": "user", "content": text}),
        tools(*offered),
    )
    return ScriptedProvider().reply(request)


def calls(reply: ReasonReply) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, c.arguments) for c in reply.tool_calls]


# ----------------------------------------------------------------------------- scripted


def test_arithmetic_asks_for_the_calculator() -> None:
    reply = ask("What is (2 + 3) * 7?", *ALL_TOOLS)
    assert calls(reply) == [("calculator", {"expression": "(2 + 3) * 7"})]
    assert reply.content == "" and reply.finish_reason == "tool_calls"


def test_time_asks_for_the_clock_and_both_rules_combine() -> None:
    assert calls(ask("What time is it?", *ALL_TOOLS)) == [("clock", {})]
    assert calls(ask("what is 6*7 and the current date?", *ALL_TOOLS)) == [
        ("calculator", {"expression": "6*7"}),
        ("clock", {}),
    ]


def test_wait_asks_for_sleep_and_its_number_is_not_arithmetic() -> None:
    assert calls(ask("please wait 30 seconds", *ALL_TOOLS)) == [("sleep", {"seconds": 30.0})]
    assert calls(ask("sleep 2.5s then compute 1+1", *ALL_TOOLS)) == [
        ("sleep", {"seconds": 2.5}),
        ("calculator", {"expression": "1+1"}),
    ]
    # Capped as the tool caps it; 400 nines read as a float are inf, which JSON cannot carry.
    assert calls(ask("wait 90 seconds", *ALL_TOOLS)) == [("sleep", {"seconds": 60.0})]
    assert calls(ask("wait " + "9" * 400 + " s", *ALL_TOOLS)) == [("sleep", {"seconds": 60.0})]


def test_urls_use_http_get_only_when_offered() -> None:
    assert calls(ask("fetch https://example.com/x.json.", *ALL_TOOLS)) == [
        ("http_get", {"url": "https://example.com/x.json"})
    ]
    reply = ask("fetch https://example.com/", "calculator", "clock")
    assert reply.tool_calls == () and "fetch https://example.com/" in reply.content


def test_tools_not_offered_are_never_requested() -> None:
    reply = ask("What is 6 * 7 at this time?", "sleep")
    assert reply.tool_calls == ()
    assert reply.finish_reason == "stop"


def test_any_offered_tool_named_in_the_message_is_called() -> None:
    assert calls(ask("please run lookup_order now", "calculator", "lookup_order")) == [
        ("lookup_order", {})
    ]
    assert ask("lookup_orders", "lookup_order").tool_calls == ()  # whole words only


def test_direct_answers() -> None:
    assert ask("Hello!", *ALL_TOOLS).content.startswith("Hello! I am the everruns scripted")
    reply = ask("Tell me about durable execution", *ALL_TOOLS)
    assert "Tell me about durable execution" in reply.content
    assert reply.tool_calls == () and reply.model == "scripted-1"


def test_after_tool_results_it_answers_with_them() -> None:
    messages = (
        {"role": "user", "content": "what is 6*7 and the time"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1_0", "name": "calculator", "arguments": {"expression": "6*7"}},
                {"id": "call_1_1", "name": "clock", "arguments": {}},
                {"id": "call_1_2", "name": "sleep", "arguments": {"seconds": 1}},
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1_0",
            "name": "calculator",
            "result": {"expression": "6*7", "result": 42},
            "content": "{}",
        },
        {
            "role": "tool",
            "tool_call_id": "call_1_1",
            "name": "clock",
            "result": {"utc": "2025-01-01T00:00:00Z"},
            "content": "{}",
        },
        {
            "role": "tool",
            "tool_call_id": "call_1_2",
            "name": "sleep",
            "error": "cancelled",
            "content": "{}",
        },
    )
    reply = ScriptedProvider().reply(ReasonRequest(messages, tools(*ALL_TOOLS)))
    assert reply.tool_calls == ()
    assert reply.content == (
        "Here is what I found: 6*7 = 42; the current UTC time is 2025-01-01T00:00:00Z; "
        "the sleep tool failed (cancelled)."
    )


def test_scripted_replies_are_deterministic_and_ids_unique_per_step() -> None:
    first = ask("what is 1+1 and the time", *ALL_TOOLS)
    assert first == ask("what is 1+1 and the time", *ALL_TOOLS)
    assert [c.id for c in first.tool_calls] == ["call_1_0", "call_1_1"]
    later = ScriptedProvider().reply(
        ReasonRequest(
            (
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "what is 2*2"},
            ),
            tools("calculator"),
        )
    )
    assert [c.id for c in later.tool_calls] == ["call_2_0"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("what is 6 * 7?", "6 * 7"),
        ("compute (1+2)*(3+4) please", "(1+2)*(3+4)"),
        ("-3 + 4", "-3 + 4"),
        ("2 ** 10", "2 ** 10"),
        ("I have 3 apples", None),
        ("version 1.2.3", None),
    ],
)
def test_find_arithmetic(text: str, expected: str | None) -> None:
    assert find_arithmetic(text) == expected


# ------------------------------------------------------------------------------- OpenAI


def test_messages_and_tools_convert_to_chat_completions() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "name": "calculator", "arguments": {"expression": "1+1"}}],
        },
        {
            "role": "tool",
            "tool_call_id": "c1",
            "name": "calculator",
            "result": {"result": 2},
            "content": '{"result": 2}',
        },
        {"role": "assistant", "content": "2"},
    ]
    assert to_openai_messages(messages) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"result": 2}'},
        {"role": "assistant", "content": "2"},
    ]
    with pytest.raises(InvalidArgument, match="role"):
        to_openai_messages([{"role": "wizard", "content": "x"}])
    assert to_openai_tools(
        [{"name": "clock", "description": "d", "parameters": None, "activity": "act.clock"}]
    ) == [
        {
            "type": "function",
            "function": {
                "name": "clock",
                "description": "d",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]


def test_parse_a_reply_with_tool_calls() -> None:
    body = {
        "model": "gpt-test",
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {
                                "name": "calculator",
                                "arguments": '{"expression": "2*21"}',
                            },
                        },
                        {
                            "id": "b",
                            "type": "function",
                            "function": {"name": "clock", "arguments": "not json"},
                        },
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "clock", "arguments": "[1]"},
                        },
                    ],
                },
            }
        ],
    }
    reply = parse_openai_reply(body)
    assert reply.content == "" and reply.model == "gpt-test" and reply.finish_reason == "tool_calls"
    assert reply.tool_calls[0] == ToolCall("a", "calculator", {"expression": "2*21"})
    assert reply.tool_calls[1].arguments == {} and "not a JSON object" in (
        reply.tool_calls[1].error or ""
    )
    assert reply.tool_calls[2].error is not None
    assert ReasonReply.from_dict(reply.to_dict()) == reply


def test_parse_a_plain_answer_and_refuse_nonsense() -> None:
    reply = parse_openai_reply(
        {"choices": [{"message": {"content": "42"}, "finish_reason": "stop"}]}, model="m"
    )
    assert reply == ReasonReply("42", (), "m", "stop")
    bodies: list[Any] = [{}, {"choices": []}, {"choices": [{"message": "x"}]}, [1, 2]]
    for body in bodies:
        with pytest.raises(EverrunsError):
            parse_openai_reply(body)
    with pytest.raises(EverrunsError, match="malformed tool call"):
        parse_openai_reply({"choices": [{"message": {"tool_calls": [{"function": {}}]}}]})


def test_openai_configuration_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIProvider.from_env({})
    provider = OpenAIProvider.from_env({"OPENAI_API_KEY": "sk-secret"})
    assert provider.base_url == DEFAULT_OPENAI_BASE_URL and provider.model == "gpt-4o-mini"
    assert "sk-secret" not in repr(provider)
    provider = OpenAIProvider.from_env(
        {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1/", "EVERRUNS_MODEL": "m"}
    )
    assert provider.base_url == "http://127.0.0.1:1/v1" and provider.model == "m"
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        OpenAIProvider.from_env({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "ftp://x"})


def _tool_call_reply(arguments: Any) -> dict[str, Any]:
    function = {"name": "sleep", "arguments": arguments}
    call = {"id": "call_1", "type": "function", "function": function}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"model": "m", "choices": [{"message": message, "finish_reason": "tool_calls"}]}


@pytest.mark.parametrize(
    "arguments",
    [
        '{"seconds": NaN}',
        '{"seconds": Infinity}',
        '{"seconds": -Infinity}',
        '{"seconds": 1e999}',  # json.loads reads it as inf
        '{"nested": {"deep": [1, 2, -1e999]}}',
        {"seconds": float("nan")},  # arguments already parsed, from a body with NaN in it
    ],
)
def test_tool_arguments_json_cannot_carry_are_reported_to_the_model(arguments: Any) -> None:
    """Python's JSON reader accepts NaN and Infinity and turns 1e999 into inf, which the
    ``reason`` activity's result could not carry: the turn would fail. Such a call is kept with
    ``error`` set, like any other unreadable arguments, so the model is told."""
    reply = parse_openai_reply(_tool_call_reply(arguments))
    (call,) = reply.tool_calls
    assert call.arguments == {}
    assert call.error is not None and "NaN, Infinity or too large" in call.error
    payload.encode(reply.to_dict(), what="result of activity 'reason'")


def test_finite_tool_arguments_are_kept() -> None:
    reply = parse_openai_reply(_tool_call_reply('{"seconds": 1.5e3, "deep": [[-0.0]]}'))
    assert reply.tool_calls[0] == ToolCall("call_1", "sleep", {"seconds": 1500.0, "deep": [[-0.0]]})


def test_half_a_surrogate_pair_anywhere_in_a_reply_becomes_a_replacement_character() -> None:
    """JSON escapes can carry half a surrogate pair, which UTF-8 (so the ``reason`` result)
    cannot: each lone half becomes U+FFFD, in text, keys and nested values; a pair whose
    halves arrived apart (a CESU-8 body) is joined into its character."""
    body = (
        '{"model": "m\\ud83d", "choices": [{"finish_reason": "stop\\udc00", "message": '
        '{"content": "ok \\ud83d and \\ud83d\\ude00", "tool_calls": [{"id": "c\\udc00", '
        '"function": {"name": "sleep", "arguments": '
        '"{\\"k\\\\ud83d\\": [[\\"v\\\\udc00\\", 1]], \\"n\\": 1}"}}]}}]}'
    )
    data = json.loads(body)
    reply = parse_openai_reply(data)
    assert reply.content == "ok \ufffd and \U0001f600"
    assert (reply.model, reply.finish_reason) == ("m\ufffd", "stop\ufffd")
    assert reply.tool_calls == (
        ToolCall("c\ufffd", "sleep", {"k\ufffd": [["v\ufffd", 1]], "n": 1}),
    )
    assert data["model"] == "m\ud83d"  # the caller's data is not changed
    payload.encode(reply.to_dict(), what="result of activity 'reason'")
    cesu = b'{"choices": [{"message": {"content": "\xed\xa0\xbd\xed\xb8\x80"}}]}'
    assert parse_openai_reply(json.loads(cesu)).content == "\U0001f600"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPENAI_API_KEY": "sk-secret\n"}, "trailing newline"),  # a key read from a file
        ({"OPENAI_API_KEY": " sk-secret"}, "whitespace"),
        ({"OPENAI_API_KEY": "sk-se cret"}, "whitespace"),
        ({"OPENAI_API_KEY": "sk-secret\x00"}, "control"),
        ({"OPENAI_API_KEY": "sk-secret\u2014"}, "non-ASCII"),
        ({"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "http://127.0.0.1:99999/v1"}, "port"),
        ({"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "http://127.0.0.1:0/v1"}, "port"),
        ({"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "http://h:eighty/v1"}, "port"),
        ({"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "http:///v1"}, "no host"),
        ({"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "https://h/v 1"}, "whitespace"),
        ({"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "https://h/v1?x=1"}, "query"),
    ],
)
def test_openai_configuration_no_call_can_succeed_with_is_refused(
    env: dict[str, str], message: str
) -> None:
    """Refused when the provider is built, in one line that never shows the key."""
    with pytest.raises(ConfigError, match=message) as refused:
        OpenAIProvider.from_env(env)
    text = str(refused.value)
    assert "secret" not in text and "\n" not in text


def _reason_ctx() -> ActivityContext:
    return ActivityContext(ActivityInfo("wf", "run", "agent_turn", "3", "reason", 1, 4))


def _reason_input(provider: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"provider": provider, "model": "m", "messages": messages, "tools": [], "step": 1}


@pytest.mark.parametrize(
    ("key", "base_url"),
    [
        ("sk-secret\n", "http://127.0.0.1:9/v1"),  # a key read from a file with its newline
        ("sk-secret", "http://127.0.0.1:99999/v1"),  # a port out of range
    ],
)
async def test_reason_fails_at_once_on_an_openai_configuration_mistake(
    monkeypatch: pytest.MonkeyPatch, key: str, base_url: str
) -> None:
    """``reason`` promises NonRetryableError for configuration errors: these used to surface
    during the call as InvalidArgument, which the retry policy retried four times."""
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    data = _reason_input("openai")
    with trio.fail_after(10):
        with pytest.raises(NonRetryableError) as raised:
            await activities.reason(_reason_ctx(), data)
    assert "secret" not in str(raised.value)
    assert "secret" not in json.dumps(data)


class _UnsendableProvider:
    """A provider whose request cannot be sent, whatever the attempt."""

    name = "test_unsendable"

    async def complete(self, request: ReasonRequest) -> ReasonReply:
        raise InvalidArgument("HTTP header 'Authorization' contains a line break or a colon")


register_provider("test_unsendable", _UnsendableProvider, replace=True)


async def test_reason_does_not_retry_a_request_that_cannot_be_sent() -> None:
    """InvalidArgument from `Provider.complete` (an unusable URL or header found while
    sending) fails the attempt for good instead of being retried by the policy."""
    with pytest.raises(NonRetryableError, match="cannot be sent: HTTP header 'Authorization'"):
        await activities.reason(_reason_ctx(), _reason_input("test_unsendable"))


def test_request_body() -> None:
    provider = OpenAIProvider("k", model="default-model")
    request = ReasonRequest(({"role": "user", "content": "hi"},), tools("clock"), None)
    body = provider.request_body(request)
    assert body["model"] == "default-model"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["tools"][0]["function"]["name"] == "clock"
    assert "tools" not in provider.request_body(
        ReasonRequest(({"role": "user", "content": "x"},), (), "m")
    )
    json.dumps(body)  # the body is JSON


def test_provider_choice_and_table() -> None:
    assert default_provider_name({}) == "scripted"
    assert default_provider_name({"OPENAI_API_KEY": "k"}) == "openai"
    assert default_model("openai", {"EVERRUNS_MODEL": "x"}) == "x"
    assert default_model("openai", {}) == "gpt-4o-mini"
    assert default_model("scripted", {}) == "scripted-1"
    assert {"scripted", "openai"} <= set(provider_names())
    assert isinstance(get_provider("scripted"), ScriptedProvider)
    with pytest.raises(NotFound, match="known: "):
        get_provider("nope")
    with pytest.raises(InvalidArgument, match="already registered"):
        register_provider("scripted", ScriptedProvider)
    with pytest.raises(InvalidArgument):
        register_provider(" ", ScriptedProvider)


def test_tool_call_values_validate() -> None:
    assert ToolCall.from_dict({"id": "a", "name": "b"}) == ToolCall("a", "b", {})
    for bad in (
        {"id": 1, "name": "b"},
        {"id": "a", "name": ""},
        {"id": "a", "name": "b", "arguments": []},
    ):
        with pytest.raises(InvalidArgument):
            ToolCall.from_dict(bad)


def test_pathological_messages_are_answered_quickly() -> None:
    import time

    started = time.monotonic()
    for text in ("(" * 32000, "1 " * 16000 + "x", "-" * 32000, "wait " * 6000):
        ask(text, *ALL_TOOLS)
    assert time.monotonic() - started < 2.0


def test_tool_call_ids_missing_or_repeated_get_ids_of_their_own() -> None:
    """A compatible server that sends no ids (or one id twice) got `call_0`, `call_1`... in
    every step: later steps answered earlier calls' ids, and a strict API refuses that."""

    def reply(*ids: str | None) -> ReasonReply:
        tool_calls = [
            {"function": {"name": "clock", "arguments": "{}"}, **({"id": i} if i else {})}
            for i in ids
        ]
        return parse_openai_reply({"choices": [{"message": {"tool_calls": tool_calls}}]})

    first = [c.id for c in reply(None, None).tool_calls]
    second = [c.id for c in reply(None, "abc", "abc").tool_calls]
    assert len(set(first + second)) == 5
    assert second[1] == "abc"
