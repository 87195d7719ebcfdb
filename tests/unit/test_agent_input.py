"""``process_input``'s pure core: validating a message and building what the turn runs on; the
tool table; and the agent's registration in a registry of one's own."""

from __future__ import annotations

from typing import Any

import pytest

from everruns.agent import register
from everruns.agent.activities import SYSTEM_PROMPT, prepare_turn, process_input
from everruns.agent.tools import HTTP_GET_ENV, available_tools, get_tool, http_get, sleep, tool
from everruns.domain.registry import Registry, default_registry
from everruns.domain.retry import RetryPolicy
from everruns.errors import InvalidArgument, NonRetryableError
from everruns.worker.activity import ActivityContext, ActivityInfo


def turn(**message: Any) -> dict[str, Any]:
    return {"session_id": "s", "turn": 2, "message": {"text": "hi", "message_id": "m", **message}}


def test_defaults() -> None:
    prepared = prepare_turn(turn(), env={})
    assert prepared["provider"] == "scripted" and prepared["model"] == "scripted-1"
    assert prepared["max_steps"] == 10
    assert prepared["llm_retry"] is None and prepared["tool_retry"] is None
    assert (prepared["session_id"], prepared["turn"], prepared["message_id"]) == ("s", 2, "m")
    assert prepared["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
    ]
    names = [t["name"] for t in prepared["tools"]]
    assert names == ["calculator", "clock", "sleep"]  # http_get is off by default
    assert prepared["tools"][0]["activity"] == "act.calculator"
    assert prepared["tools"][0]["parameters"]["required"] == ["expression"]


def test_environment_picks_openai_and_enables_http_get() -> None:
    env = {"OPENAI_API_KEY": "sk-very-secret", "EVERRUNS_MODEL": "gpt-x", HTTP_GET_ENV: "1"}
    prepared = prepare_turn(turn(), env=env)
    assert (prepared["provider"], prepared["model"]) == ("openai", "gpt-x")
    assert "http_get" in [t["name"] for t in prepared["tools"]]
    assert "sk-very-secret" not in str(prepared)  # the key never enters the history


def test_options_from_the_message() -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=0.1)
    prepared = prepare_turn(
        turn(
            max_steps=3,
            provider="scripted",
            model="m2",
            tools=["clock", "calculator", "clock"],
            llm_retry=policy.to_dict(),
            tool_retry={"max_attempts": 9},
        ),
        env={},
    )
    assert prepared["max_steps"] == 3 and prepared["model"] == "m2"
    assert [t["name"] for t in prepared["tools"]] == ["clock", "calculator"]
    assert prepared["llm_retry"] == policy.to_dict()
    assert prepared["tool_retry"] == RetryPolicy(max_attempts=9).to_dict()
    assert prepare_turn(turn(tools=[]), env={})["tools"] == []


def test_context_goes_between_the_system_prompt_and_the_message() -> None:
    context = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    prepared = prepare_turn({**turn(), "context": context}, env={})
    assert prepared["messages"][1:3] == context


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "JSON object"),
        ({"message": "hi"}, "JSON object with a 'text'"),
        (turn(text=""), "non-empty"),
        (turn(text="   "), "non-empty"),
        (turn(text=42), "non-empty"),
        (turn(text="x" * 40000), "the limit is"),
        (turn(max_steps=0), "max_steps"),
        (turn(max_steps=101), "max_steps"),
        (turn(max_steps=True), "max_steps"),
        (turn(max_steps="3"), "max_steps"),
        (turn(provider="nope"), "unknown LLM provider"),
        (turn(model=5), "model"),
        (turn(tools="clock"), "list of tool names"),
        (turn(tools=["teleport"]), "no tool named 'teleport'"),
        (turn(tools=["http_get"]), "disabled"),
        (turn(llm_retry={"max_attempts": 0}), "llm_retry"),
        (turn(tool_retry=[1]), "tool_retry"),
        ({**turn(), "context": "x"}, "list of messages"),
        ({**turn(), "context": [{"role": "god"}]}, "malformed message"),
    ],
)
def test_bad_input_is_refused_with_a_reason(value: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        prepare_turn(value, env={})
    assert message in str(caught.value)


def ctx(activity_type: str) -> ActivityContext:
    return ActivityContext(ActivityInfo("wf", "run", "agent_turn", "1", activity_type, 1, 3))


async def test_process_input_fails_an_invalid_message_without_retries() -> None:
    with pytest.raises(NonRetryableError, match="invalid message: the message text"):
        await process_input(ctx("process_input"), turn(text=""))


async def test_disabled_http_get_and_bad_sleep_fail_without_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(HTTP_GET_ENV, raising=False)
    with pytest.raises(NonRetryableError, match=HTTP_GET_ENV):
        await http_get(ctx("act.http_get"), {"url": "http://127.0.0.1:1/"})
    monkeypatch.setenv(HTTP_GET_ENV, "1")
    with pytest.raises(NonRetryableError, match="http:// or https://"):
        await http_get(ctx("act.http_get"), {"url": "file:///etc/passwd"})
    with pytest.raises(NonRetryableError, match="seconds"):
        await sleep(ctx("act.sleep"), {"seconds": -1})
    assert await sleep(ctx("act.sleep"), {"seconds": 0}) == {"slept": 0.0}


def test_tool_table_and_registration() -> None:
    assert [t.name for t in available_tools({})] == ["calculator", "clock", "sleep"]
    spec = get_tool("calculator")
    assert spec is not None and spec.activity_type == "act.calculator"
    assert default_registry.get_activity("act.calculator") is not None
    with pytest.raises(InvalidArgument, match="letters, digits"):
        tool(name="bad name", description="x")
    reg = Registry()

    @tool(name="unit_test_lookup", description="looks up", offered_by_default=False, registry=reg)
    async def lookup(ctx: ActivityContext, arguments: Any) -> str:
        return "found"

    assert reg.get_activity("act.unit_test_lookup") is not None
    assert "unit_test_lookup" not in [t.name for t in available_tools({})]
    assert prepare_turn(turn(tools=["unit_test_lookup"]), env={})["tools"][0]["name"] == (
        "unit_test_lookup"
    )
    register(reg)
    register(reg)  # idempotent
    assert reg.workflow_types() == ["agent_session", "agent_turn"]
    assert set(reg.activity_types()) == {
        "process_input",
        "reason",
        "act.calculator",
        "act.clock",
        "act.sleep",
        "act.http_get",
        "act.unit_test_lookup",
    }


@pytest.mark.parametrize("value", ["true", "yes", "on", "TRUE", "1"])
def test_http_get_is_switched_on_as_every_switch_is(value: str) -> None:
    """`EVERRUNS_ENABLE_HTTP_GET` accepts what every on/off variable does (only "1" did: "true"
    left the tool off without a word)."""
    prepared = prepare_turn(turn(), env={HTTP_GET_ENV: value})
    assert "http_get" in [t["name"] for t in prepared["tools"]]


async def test_a_bad_http_get_switch_leaves_the_tool_off_and_its_call_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value the switch does not know leaves http_get off (the turn still gets the other
    tools); a call of it is refused naming the variable and its value."""
    prepared = prepare_turn(turn(), env={HTTP_GET_ENV: "maybe"})
    names = [t["name"] for t in prepared["tools"]]
    assert "calculator" in names and "http_get" not in names
    monkeypatch.setenv(HTTP_GET_ENV, "maybe")
    with pytest.raises(NonRetryableError, match=f"{HTTP_GET_ENV}='maybe'"):
        await http_get(ctx("act.http_get"), {"url": "http://127.0.0.1:1/"})
