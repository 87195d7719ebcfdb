"""The agent turn's activities: ``process_input`` (validate the message, build the context) and
``reason`` (one LLM call). Tools, the ``act`` step's activities, live in `everruns.agent.tools`.

`prepare_turn` is the pure heart of ``process_input``: it checks the message a session received,
picks the provider, model and tools from the worker's environment, and returns everything the
turn workflow needs, so that those choices are recorded in the history once and every replay
sees the same ones. ``reason`` looks the provider up in this process, calls it under a deadline,
and classifies failures: configuration and request mistakes fail at once (`NonRetryableError`),
the rest is retried by its policy. No API key or other secret ever enters a payload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import trio

from everruns.agent.providers import (
    ReasonRequest,
    default_model,
    default_provider_name,
    get_provider,
    provider_names,
)
from everruns.agent.tools import available_tools, get_tool
from everruns.domain.registry import activity
from everruns.domain.retry import RetryPolicy
from everruns.errors import (
    ConfigError,
    EverrunsError,
    InvalidArgument,
    NonRetryableError,
    NotFound,
)
from everruns.worker.activity import ActivityContext

__all__ = [
    "DEFAULT_MAX_STEPS",
    "LLM_CALL_TIMEOUT",
    "LLM_RETRY",
    "MAX_STEPS_LIMIT",
    "MAX_TEXT_CHARS",
    "SYSTEM_PROMPT",
    "prepare_turn",
    "process_input",
    "reason",
]

DEFAULT_MAX_STEPS = 10
MAX_STEPS_LIMIT = 100
MAX_TEXT_CHARS = 32_000
LLM_CALL_TIMEOUT = 120.0
"""Seconds one LLM call may take before the attempt fails (and is retried)."""

LLM_RETRY = RetryPolicy(max_attempts=4, initial_interval=1.0, maximum_interval=30.0)
"""Default retries of ``reason``: a busy or briefly unreachable LLM API is ridden over."""

INPUT_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.2, maximum_interval=2.0)

SYSTEM_PROMPT = (
    "You are a helpful assistant running on everruns, a durable execution engine. Use the "
    "tools you are given when they help (always use the calculator for arithmetic) and "
    "answer concisely."
)

_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _text(message: Mapping[str, Any]) -> str:
    text = message.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("the message text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(
            f"the message text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}"
        )
    return text.strip()


def _max_steps(message: Mapping[str, Any]) -> int:
    value = message.get("max_steps", DEFAULT_MAX_STEPS)
    if value is None:
        return DEFAULT_MAX_STEPS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS_LIMIT:
        raise InvalidArgument(
            f"max_steps must be an integer from 1 to {MAX_STEPS_LIMIT}, got {value!r}"
        )
    return value


def _retry(message: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{key} must be a retry policy object, got {value!r}")
    try:
        return RetryPolicy.from_dict(value).to_dict()
    except InvalidArgument as exc:
        raise InvalidArgument(f"{key}: {exc}") from exc


def _tools(message: Mapping[str, Any], env: Mapping[str, str]) -> list[dict[str, Any]]:
    names = message.get("tools")
    if names is None:
        return [spec.to_dict() for spec in available_tools(env)]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument(f"tools must be a list of tool names, got {names!r}")
    out = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        spec = get_tool(name)
        if spec is None:
            raise InvalidArgument(f"no tool named {name!r} is registered on this worker")
        if not spec.enabled(env):
            raise InvalidArgument(f"tool {name!r} is disabled on this worker")
        out.append(spec.to_dict())
    return out


def _context(turn: Mapping[str, Any]) -> list[dict[str, Any]]:
    context = turn.get("context") or []
    if not isinstance(context, list):
        raise InvalidArgument("the turn context must be a list of messages")
    for message in context:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InvalidArgument(f"the turn context holds a malformed message: {message!r}"[:300])
    return context


def prepare_turn(turn: Any, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Validate a turn's input and return what the turn workflow runs on.

    Args:
        turn: the turn workflow's input: ``{"message": {...}, "session_id"?, "turn"?,
            "context"?}`` where the message has ``text`` and optionally ``message_id``,
            ``max_steps``, ``provider``, ``model``, ``tools`` (names), ``llm_retry`` and
            ``tool_retry`` (retry policy objects).
        env: the worker's environment (default ``os.environ``).

    Returns:
        ``{"session_id", "turn", "message_id", "messages", "tools", "provider", "model",
        "max_steps", "llm_retry", "tool_retry"}``; ``messages`` is the system prompt, the
        context, then the user message.

    Raises:
        InvalidArgument: the input or the message is malformed, or names an unknown provider,
            tool, or a bad retry policy; the message says which.
    """
    env = os.environ if env is None else env
    if not isinstance(turn, Mapping):
        raise InvalidArgument(f"the turn input must be a JSON object, got {turn!r}"[:300])
    message = turn.get("message")
    if not isinstance(message, Mapping):
        raise InvalidArgument(
            f"the message must be a JSON object with a 'text', got {message!r}"[:300]
        )
    text = _text(message)
    provider = message.get("provider") or default_provider_name(env)
    if not isinstance(provider, str) or provider not in provider_names():
        raise InvalidArgument(
            f"unknown LLM provider {provider!r}; known: {', '.join(provider_names())}"
        )
    model = message.get("model") or default_model(provider, env)
    if not isinstance(model, str):
        raise InvalidArgument(f"model must be a string, got {model!r}")
    message_id = message.get("message_id")
    return {
        "session_id": turn.get("session_id"),
        "turn": turn.get("turn"),
        "message_id": message_id if isinstance(message_id, str) else None,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            *_context(turn),
            {"role": "user", "content": text},
        ],
        "tools": _tools(message, env),
        "provider": provider,
        "model": model,
        "max_steps": _max_steps(message),
        "llm_retry": _retry(message, "llm_retry"),
        "tool_retry": _retry(message, "tool_retry"),
    }


@activity(name="process_input", retry=INPUT_RETRY, start_to_close_timeout=30.0)
async def process_input(ctx: ActivityContext, turn: Any) -> dict[str, Any]:
    """Validate the message and build the turn's context (see `prepare_turn`).

    Raises:
        NonRetryableError: the message is invalid; the turn fails with the reason.
    """
    try:
        return prepare_turn(turn)
    except InvalidArgument as exc:
        raise NonRetryableError(f"invalid message: {exc}") from exc


def _request(data: Any) -> tuple[str, ReasonRequest]:
    if not isinstance(data, Mapping):
        raise InvalidArgument("the reason input must be a JSON object")
    provider = data.get("provider")
    messages = data.get("messages")
    tools = data.get("tools") or []
    model = data.get("model") or None
    if not isinstance(provider, str) or not isinstance(messages, list):
        raise InvalidArgument("the reason input needs a provider name and a list of messages")
    if not isinstance(tools, list) or (model is not None and not isinstance(model, str)):
        raise InvalidArgument("the reason input has malformed tools or model")
    return provider, ReasonRequest(tuple(_with_tool_content(messages)), tuple(tools), model)


def _with_tool_content(messages: list[Any]) -> list[Any]:
    """The messages with a ``content`` text on every tool message: the JSON of its ``error``
    (``{"error": ...}``) or of its ``result``. The turn keeps each tool result once, without
    that text (it would double the size of what the turn carries and records); providers read
    ``content``. A message that has one (written by an earlier version) keeps it."""
    out = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "tool" and "content" not in message:
            if "error" in message:
                content = json.dumps({"error": message["error"]})
            else:
                content = json.dumps(message.get("result"))
            message = {**message, "content": content}
        out.append(message)
    return out


@activity(name="reason", retry=LLM_RETRY, start_to_close_timeout=LLM_CALL_TIMEOUT + 30.0)
async def reason(ctx: ActivityContext, data: Any) -> dict[str, Any]:
    """Make one LLM call: ``{"provider", "model", "messages", "tools", "step"}`` in, a
    `ReasonReply` dict (``content``, ``tool_calls``, ``model``, ``finish_reason``) out.

    Raises:
        NonRetryableError: unknown provider, missing or bad configuration (e.g. no API key, an
            unusable base URL), a request that cannot be sent (the provider raised
            `InvalidArgument` or `ConfigError`) or one the service refuses.
        EverrunsError: the call failed or took longer than `LLM_CALL_TIMEOUT` (retried).

    Cancellation (the turn was cancelled) abandons the call at once.
    """
    try:
        name, request = _request(data)
        provider = get_provider(name)
    except (InvalidArgument, NotFound, ConfigError) as exc:
        raise NonRetryableError(str(exc)) from exc
    try:
        with trio.fail_after(LLM_CALL_TIMEOUT):
            reply = await provider.complete(request)
    except trio.TooSlowError as exc:
        raise EverrunsError(f"the LLM call took longer than {LLM_CALL_TIMEOUT:g} s") from exc
    except (InvalidArgument, ConfigError) as exc:
        # Every attempt would fail the same way: a retry cannot help.
        raise NonRetryableError(f"the LLM request cannot be sent: {exc}") from exc
    return reply.to_dict()
