"""What `scripts/demo` shows an operator, without a database: the live board's line for each
turn event (failures with their reason) and the start-up line naming the LLM provider."""

from __future__ import annotations

from typing import Any

import pytest

from everruns import demo
from everruns.agent import TurnEvent


def event(kind: str, step: int | None = 1, **data: Any) -> TurnEvent:
    return TurnEvent(kind, "session:s:turn:1", 7, None, step, data)


def test_a_retried_model_call_shows_why_it_failed() -> None:
    text = demo._step_text(
        event(
            "reason.retrying",
            attempt=2,
            error="EverrunsError: cannot connect to 127.0.0.1:9: refused\ndetails",
        )
    )
    assert text == (
        "step 1: the model call failed (attempt 2), retrying: "
        "EverrunsError: cannot connect to 127.0.0.1:9: refused"
    )


def test_a_retried_tool_shows_why_it_failed() -> None:
    text = demo._step_text(event("tool.retrying", tool="flaky", attempt=1, error="Boom: down"))
    assert text == "step 1: tool flaky failed (attempt 1), retrying: Boom: down"


def test_a_failed_turn_shows_its_reason() -> None:
    text = demo._step_text(
        event("turn.failed", message="ActivityError: cannot connect to api.example\nmore")
    )
    assert text == "failed: ActivityError: cannot connect to api.example"


def test_other_events_keep_their_lines() -> None:
    assert demo._step_text(event("turn.cancelled")) == "cancelled"
    assert demo._step_text(event("reason.started")) == "step 1: asking the model"


def test_the_scripted_provider_is_named_at_start_up() -> None:
    note = demo.provider_note({})
    assert "scripted" in note and "OPENAI_API_KEY" in note


def test_the_openai_provider_is_named_with_its_model_and_host() -> None:
    note = demo.provider_note(
        {
            "OPENAI_API_KEY": "sk-secret",
            "OPENAI_BASE_URL": "https://llm.example:8443/v1",
            "EVERRUNS_MODEL": "m-1",
        }
    )
    assert "OpenAI" in note and "m-1" in note and "llm.example" in note
    assert "sk-secret" not in note


@pytest.mark.parametrize(
    "env",
    [
        {"OPENAI_API_KEY": "sk-secret\n"},
        {"OPENAI_API_KEY": "sk-secret", "OPENAI_BASE_URL": "http://h:99999/v1"},
    ],
)
def test_an_unusable_openai_configuration_is_reported_at_start_up(env: dict[str, str]) -> None:
    note = demo.provider_note(env)
    assert "every turn will fail" in note and "sk-secret" not in note
