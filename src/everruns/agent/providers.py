"""LLM providers for the ``reason`` step: one call in, one reply (text and/or tool calls) out.

A provider turns a `ReasonRequest` (the conversation so far in a neutral, OpenAI-like message
format, and the tools on offer) into a `ReasonReply`. Two are built in: `ScriptedProvider`, a
deterministic rule-based stand-in that needs no network (the default, so the demo and the tests
run anywhere), and `OpenAIProvider`, which calls any OpenAI-compatible ``/chat/completions``
endpoint over the Trio HTTP client in `everruns.agent._http` (chosen when ``OPENAI_API_KEY`` is
set). Others are added with `register_provider`. Providers run inside the ``reason`` activity:
they may do I/O, but they hold no state between calls and never see the API key in a payload
(it is read from the worker's environment, never recorded in the history).

Errors: a provider raises `NonRetryableError` when repeating the call cannot help (bad request,
bad credentials; `InvalidArgument` and `ConfigError` count as such) and any other exception (an
`EverrunsError` for the network or the service failing) when a retry may; the ``reason``
activity's retry policy does the rest. Configuration that cannot work (a key with a stray
newline, a base URL with a bad port) is refused when the provider is built, before any call.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

from everruns.agent import _http
from everruns.agent.tools import MAX_SLEEP_SECONDS
from everruns.domain.limits import MAX_SECONDS
from everruns.domain.payload import copy_json
from everruns.errors import (
    ConfigError,
    EverrunsError,
    InvalidArgument,
    NonRetryableError,
    NotFound,
    RetryAfter,
)

__all__ = [
    "DEFAULT_OPENAI_BASE_URL",
    "DEFAULT_OPENAI_MODEL",
    "MAX_RETRY_AFTER",
    "OPENAI_PROVIDER",
    "SCRIPTED_PROVIDER",
    "OpenAIProvider",
    "Provider",
    "ReasonReply",
    "ReasonRequest",
    "ScriptedProvider",
    "ToolCall",
    "default_model",
    "default_provider_name",
    "get_provider",
    "parse_openai_reply",
    "provider_names",
    "register_provider",
    "retry_after_seconds",
    "to_openai_messages",
    "to_openai_tools",
]

SCRIPTED_PROVIDER = "scripted"
OPENAI_PROVIDER = "openai"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
SCRIPTED_MODEL = "scripted-1"
SCRIPTED_SCAN_CHARS = 2000
"""The scripted provider's rules look at the first 2,000 characters of a message."""


# ------------------------------------------------------------------------------- values


@attrs.frozen
class ToolCall:
    """A tool the model asks to run.

    Attributes:
        id: the call's id, echoed in the tool's result message.
        name: the tool's name.
        arguments: the arguments, a JSON object.
        error: set when the model's arguments could not be read (the tool is not run; the
            error goes back to the model as the call's result).
    """

    id: str
    name: str
    arguments: dict[str, Any] = attrs.field(factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form used in messages and activity results."""
        data: dict[str, Any] = {"id": self.id, "name": self.name, "arguments": self.arguments}
        if self.error is not None:
            data["error"] = self.error
        return data

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ToolCall:
        """Build from `to_dict`'s shape.

        Raises:
            InvalidArgument: a field is missing or of the wrong type.
        """
        call_id, name, arguments = d.get("id"), d.get("name"), d.get("arguments", {})
        error = d.get("error")
        if not isinstance(call_id, str) or not isinstance(name, str) or not name:
            raise InvalidArgument(f"a tool call needs a string id and name, got {dict(d)!r}")
        if not isinstance(arguments, dict):
            raise InvalidArgument(f"tool call {call_id!r} arguments must be a JSON object")
        if error is not None and not isinstance(error, str):
            raise InvalidArgument(f"tool call {call_id!r} error must be a string")
        return cls(call_id, name, arguments, error)


@attrs.frozen
class ReasonRequest:
    """One LLM call.

    Attributes:
        messages: the conversation, oldest first: ``{"role": "system"|"user"|"assistant"|
            "tool", "content": ...}``; assistant messages may carry ``tool_calls`` (`ToolCall`
            dicts), tool messages carry ``tool_call_id``, ``name``, the tool's ``result`` or
            ``error``, and as ``content`` the JSON text of either.
        tools: the tools on offer: ``{"name", "description", "parameters"}`` (JSON schema).
        model: the model to use, or None for the provider's default.
    """

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] = ()
    model: str | None = None

    @property
    def tool_names(self) -> frozenset[str]:
        """The names of the tools on offer."""
        return frozenset(str(t.get("name")) for t in self.tools)


@attrs.frozen
class ReasonReply:
    """The model's answer to one call.

    Attributes:
        content: its text (may be empty when it only asks for tools).
        tool_calls: the tools it asks to run, in order; empty when it answers.
        model: the model that answered.
        finish_reason: why it stopped, as the provider says (e.g. ``stop``, ``tool_calls``).
    """

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    model: str = ""
    finish_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (the ``reason`` activity's result)."""
        return {
            "content": self.content,
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "model": self.model,
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReasonReply:
        """Build from `to_dict`'s shape.

        Raises:
            InvalidArgument: a field is of the wrong type.
        """
        content = d.get("content") or ""
        calls = d.get("tool_calls") or []
        if not isinstance(content, str) or not isinstance(calls, list):
            raise InvalidArgument("a reply needs a string content and a list of tool_calls")
        return cls(
            content,
            tuple(ToolCall.from_dict(c) for c in calls),
            str(d.get("model") or ""),
            str(d.get("finish_reason") or ""),
        )


class Provider(Protocol):
    """What the ``reason`` activity calls."""

    @property
    def name(self) -> str:
        """The provider's name, for messages."""
        ...

    async def complete(self, request: ReasonRequest) -> ReasonReply:
        """Run one LLM call.

        Raises:
            NonRetryableError: retrying cannot help (so do `InvalidArgument` and
                `ConfigError`: the request or the configuration is unusable).
            Exception: anything else is retried by the ``reason`` activity's policy.
        """
        ...


# ----------------------------------------------------------------------------- registry

ProviderFactory = Callable[[], Provider]

_PROVIDERS: dict[str, ProviderFactory] = {}


def register_provider(name: str, factory: ProviderFactory, *, replace: bool = False) -> None:
    """Make a provider available to turns under ``name`` (in this process).

    The factory is called for every ``reason`` call, so it may read the environment then.

    Args:
        name: what ``send_message(provider=...)`` names.
        factory: returns the provider.
        replace: allow replacing a registered provider.

    Raises:
        InvalidArgument: the name is empty or taken (and ``replace`` is false).
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"a provider name must be a non-empty string, got {name!r}")
    if name in _PROVIDERS and not replace:
        raise InvalidArgument(f"a provider named {name!r} is already registered")
    _PROVIDERS[name] = factory


def provider_names() -> list[str]:
    """Return the registered provider names, sorted."""
    return sorted(_PROVIDERS)


def get_provider(name: str) -> Provider:
    """Return a fresh provider registered as ``name``.

    Raises:
        NotFound: no such provider (the message lists the known ones).
        ConfigError: the provider's configuration is missing or bad.
    """
    factory = _PROVIDERS.get(name)
    if factory is None:
        raise NotFound(
            f"no LLM provider named {name!r} on this worker; known: {', '.join(provider_names())}"
        )
    return factory()


def default_provider_name(env: Mapping[str, str] | None = None) -> str:
    """Return ``openai`` when ``OPENAI_API_KEY`` is set, else ``scripted``."""
    env = os.environ if env is None else env
    return OPENAI_PROVIDER if env.get("OPENAI_API_KEY") else SCRIPTED_PROVIDER


def default_model(provider: str, env: Mapping[str, str] | None = None) -> str:
    """Return the model a turn uses when the message names none.

    ``EVERRUNS_MODEL`` for the OpenAI provider (default ``gpt-4o-mini``); ``scripted-1`` for
    the scripted one; the empty string (the provider's choice) for others.
    """
    env = os.environ if env is None else env
    if provider == OPENAI_PROVIDER:
        return env.get("EVERRUNS_MODEL") or DEFAULT_OPENAI_MODEL
    if provider == SCRIPTED_PROVIDER:
        return SCRIPTED_MODEL
    return ""


# ------------------------------------------------------------------------ scripted model

_ARITHMETIC = re.compile(r"-?[\d(][\d\s.+\-*/%^()]*[\d)]")
_OPERATOR = re.compile(r"[\d)]\s*(?:\*\*|//|[-+*/%^])\s*[-+(]*\s*[\d.(]")
_TIME = re.compile(r"\b(?:time|clock|date|today)\b", re.IGNORECASE)
_WAIT = re.compile(
    r"\b(?:wait|sleep|pause)\b\D{0,20}?(\d+(?:\.\d+)?)\s*(?:s|secs?|seconds?)?\b", re.IGNORECASE
)
_URL = re.compile(r"https?://[^\s'\"<>]+")
_GREETING = re.compile(r"^\s*(?:hi|hello|hey|good (?:morning|afternoon|evening))\b", re.IGNORECASE)


def find_arithmetic(text: str) -> str | None:
    """Return the longest arithmetic expression in ``text`` (e.g. ``"6 * 7"``), or None."""
    best: str | None = None
    for match in _ARITHMETIC.finditer(text):
        candidate = match.group(0).strip()
        if _OPERATOR.search(candidate) and (best is None or len(candidate) > len(best)):
            best = candidate
    return best


class ScriptedProvider:
    """A deterministic stand-in for a language model: rules, no network.

    Given a user message it asks for tools when the message calls for them (only tools on
    offer): arithmetic → ``calculator``; "time"/"clock"/"date" → ``clock``; "wait N seconds" →
    ``sleep``; a URL → ``http_get``; any other offered tool named in the message → that tool
    with no arguments (the rules read the message's first `SCRIPTED_SCAN_CHARS` characters).
    Several rules may match: their calls are made together. With nothing
    to call, it answers directly. Given tool results, it answers with them. The same request
    always gives the same reply.
    """

    name = SCRIPTED_PROVIDER

    async def complete(self, request: ReasonRequest) -> ReasonReply:
        """Return `reply` (never fails, never waits)."""
        return self.reply(request)

    def reply(self, request: ReasonRequest) -> ReasonReply:
        """Return the scripted reply to ``request`` (pure)."""
        messages = list(request.messages)
        if messages and messages[-1].get("role") == "tool":
            return ReasonReply(
                _answer_from_tools(messages), model=SCRIPTED_MODEL, finish_reason="stop"
            )
        text = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                text = str(message.get("content") or "")
                break
        # The rules' patterns backtrack; bounding what they read bounds their cost.
        calls = self._tool_calls(text[:SCRIPTED_SCAN_CHARS], request.tool_names, messages)
        if calls:
            return ReasonReply("", tuple(calls), SCRIPTED_MODEL, "tool_calls")
        return ReasonReply(_direct_answer(text), model=SCRIPTED_MODEL, finish_reason="stop")

    def _tool_calls(
        self, text: str, offered: frozenset[str], messages: Sequence[Mapping[str, Any]]
    ) -> list[ToolCall]:
        # Ids only need to be unique within the conversation.
        prefix = f"call_{sum(1 for m in messages if m.get('role') == 'assistant') + 1}"
        wanted: list[tuple[str, dict[str, Any]]] = []
        wait = _WAIT.search(text)
        if wait and "sleep" in offered:
            # Capped as the tool caps it: 400 nines read as a float are inf, which JSON lacks.
            seconds = float(wait.group(1))
            wanted.append(("sleep", {"seconds": min(seconds, MAX_SLEEP_SECONDS)}))
        expression = find_arithmetic(_WAIT.sub(" ", text) if wait else text)
        if expression and "calculator" in offered:
            wanted.append(("calculator", {"expression": expression}))
        if _TIME.search(text) and "clock" in offered:
            wanted.append(("clock", {}))
        url = _URL.search(text)
        if url and "http_get" in offered:
            wanted.append(("http_get", {"url": url.group(0).rstrip(".,;:!?)")}))
        named = {name for name, _ in wanted}
        for name in sorted(offered - named - {"calculator", "clock", "sleep", "http_get"}):
            if re.search(rf"\b{re.escape(name)}\b", text):
                wanted.append((name, {}))
        return [ToolCall(f"{prefix}_{i}", name, args) for i, (name, args) in enumerate(wanted)]


def _tool_block(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    block: list[Mapping[str, Any]] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        block.append(message)
    return list(reversed(block))


def _describe_result(name: str, result: Any) -> str:
    if name == "calculator" and isinstance(result, dict) and "result" in result:
        return f"{result.get('expression')} = {result['result']}"
    if name == "clock" and isinstance(result, dict) and "utc" in result:
        return f"the current UTC time is {result['utc']}"
    if name == "sleep" and isinstance(result, dict) and "slept" in result:
        return f"I waited {result['slept']:g} seconds"
    if name == "http_get" and isinstance(result, dict) and "status" in result:
        return f"GET {result.get('url')} answered HTTP {result['status']}"
    return f"{name} returned {json.dumps(result, sort_keys=True)}"


def _answer_from_tools(messages: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for message in _tool_block(messages):
        name = str(message.get("name") or "tool")
        if message.get("error"):
            parts.append(f"the {name} tool failed ({message['error']})")
        else:
            parts.append(_describe_result(name, message.get("result")))
    return "Here is what I found: " + "; ".join(parts) + "."


def _direct_answer(text: str) -> str:
    if _GREETING.search(text):
        return (
            "Hello! I am the everruns scripted assistant. Ask me to calculate something "
            "(e.g. 'what is 6 * 7?') or for the time."
        )
    shown = " ".join(text.split())
    if len(shown) > 200:
        shown = shown[:199] + "…"
    return f"You said: {shown!r}. No tool was needed, so this is my whole answer."


# ---------------------------------------------------------------------- OpenAI-compatible


def to_openai_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Convert neutral messages to the chat-completions format.

    Raises:
        InvalidArgument: a message has an unknown role.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "user"):
            out.append({"role": role, "content": str(message.get("content") or "")})
        elif role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": message.get("content") or None}
            calls = message.get("tool_calls") or []
            if calls:
                item["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {
                            "name": c["name"],
                            "arguments": json.dumps(c.get("arguments") or {}),
                        },
                    }
                    for c in calls
                ]
            out.append(item)
        elif role == "tool":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": str(message.get("tool_call_id") or ""),
                    "content": str(message.get("content") or ""),
                }
            )
        else:
            raise InvalidArgument(f"message role {role!r} is not system/user/assistant/tool")
    return out


def to_openai_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Convert tool definitions to the chat-completions ``tools`` format."""
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t.get("description", ""),
                "parameters": t.get("parameters") or {"type": "object", "properties": {}},
            },
        }
        for t in tools
    ]


_NON_FINITE = "the arguments hold a number JSON cannot carry (NaN, Infinity or too large)"


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _all_finite(value: Any) -> bool:
    # Iterative: the arguments may nest as deep as the JSON parser allowed.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _clean_text(text: str) -> str:
    """Return ``text`` with each lone surrogate replaced by U+FFFD (a split pair is joined)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _clean(value: Any) -> Any:
    """Return parsed JSON ``value`` with `_clean_text` applied to every string, keys included.

    JSON's ``\\uXXXX`` escapes can carry half a surrogate pair, which UTF-8 (so the ``reason``
    activity's result) cannot. Iterative (`copy_json`): the reply may nest as deep as the JSON
    parser allowed.
    """
    return copy_json(value, text=_clean_text)


def _tool_arguments(text: Any) -> tuple[dict[str, Any] | None, str]:
    """Return a tool call's arguments as a JSON object, or None and what is wrong with them.

    NaN, Infinity and numbers beyond a float's range (``1e999``) are refused: JSON cannot carry
    them, so the ``reason`` activity's result could not be recorded and the turn would fail
    where the model should be told.
    """
    try:
        arguments = (
            json.loads(text, parse_constant=_refuse_constant) if isinstance(text, str) else text
        )
    except _NonFinite:
        return None, _NON_FINITE
    except (ValueError, RecursionError):
        return None, "the arguments are not a JSON object"
    if not isinstance(arguments, dict):
        return None, "the arguments are not a JSON object"
    if not _all_finite(arguments):
        return None, _NON_FINITE
    return _clean(arguments), ""


def parse_openai_reply(data: Any, *, model: str = "") -> ReasonReply:
    """Read a chat-completions response body (already parsed JSON).

    A tool call whose arguments are not a JSON object, or hold a number JSON cannot carry
    (NaN, Infinity, ``1e999``), is kept with ``error`` set, so the model is told instead of
    the turn failing. Half a surrogate pair (``\\ud83d``, an emoji cut in two) in any string
    becomes U+FFFD, for the same reason.

    Raises:
        EverrunsError: the body does not have the chat-completions shape.
    """
    data = _clean(data)
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise EverrunsError(
            f"the LLM response has no choices[0].message: {json.dumps(data)[:300]}"
        ) from exc
    if not isinstance(message, dict):
        raise EverrunsError("the LLM response's choices[0].message is not an object")
    calls: list[ToolCall] = []
    ids: set[str] = set()
    for index, raw in enumerate(message.get("tool_calls") or []):
        function = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise EverrunsError(f"the LLM response has a malformed tool call: {raw!r}"[:300])
        # Each tool result answers its call by id: one missing or repeated (some compatible
        # servers send none) gets one of its own, unique in the conversation (`call_0` of every
        # step answered several calls). The reply is recorded once, so a random id is safe.
        call_id = str(raw.get("id") or "")
        if not call_id or call_id in ids:
            call_id = f"call_{uuid.uuid4().hex[:16]}_{index}"
        ids.add(call_id)
        text = function.get("arguments") or "{}"
        arguments, problem = _tool_arguments(text)
        if arguments is not None:
            calls.append(ToolCall(call_id, function["name"], arguments))
        else:
            calls.append(ToolCall(call_id, function["name"], {}, f"{problem}: {str(text)[:200]!r}"))
    content = message.get("content")
    return ReasonReply(
        content if isinstance(content, str) else "",
        tuple(calls),
        str(data.get("model") or model) if isinstance(data, dict) else model,
        str(choice.get("finish_reason") or "") if isinstance(choice, dict) else "",
    )


def _error_detail(response: _http.HttpResponse) -> str:
    try:
        data = response.json()
        message = data["error"]["message"]
        if isinstance(message, str):
            return _clean_text(message[:300])
    except (EverrunsError, KeyError, TypeError):
        pass
    return response.text()[:300]


_API_KEY = re.compile(r"[!-~]+")
"""An API key is printable ASCII without spaces: it is sent as a bearer token in a header."""


def _check_base_url(base: str) -> None:
    """Refuse an ``OPENAI_BASE_URL`` no request could be sent to.

    Raises:
        ConfigError: it is not ``http(s)://host[:port][/path]`` in printable ASCII.
    """
    where = f"OPENAI_BASE_URL={base[:200]!r}"
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"{where} must start with http:// or https://")
    if not _API_KEY.fullmatch(base):
        raise ConfigError(
            f"{where} holds whitespace, control or non-ASCII characters; write international "
            "host names in their xn-- form"
        )
    try:
        parts = urlsplit(base)
    except ValueError as exc:  # a malformed [IPv6] host, e.g. http://[::1/v1
        raise ConfigError(
            f"{where} has a malformed host ({exc}); write an IPv6 address in brackets, "
            "e.g. http://[::1]:8080/v1"
        ) from exc
    if not parts.hostname:
        raise ConfigError(f"{where} has no host name")
    try:
        parts.port  # noqa: B018 -- reading it validates it
    except ValueError as exc:
        raise ConfigError(f"{where} has a bad port; use a number from 1 to 65535") from exc
    if parts.port == 0:
        raise ConfigError(f"{where} has a bad port; use a number from 1 to 65535")
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{where} must not have a query or fragment: /chat/completions is appended"
        )


MAX_RETRY_AFTER = 600.0
"""The longest ``Retry-After`` an LLM call honours, in seconds: a turn is interactive, and an
endpoint asking for more (a bug, or a quota reset hours away) is asked again after ten minutes;
the turn's LLM retry policy then decides, as for any failure."""

_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Return the seconds a ``Retry-After`` header value asks to wait from ``now`` (a Unix
    time), or None when there is none or it is malformed.

    The value is a number of seconds (a decimal fraction is accepted too) or an HTTP date
    (RFC 9110, 10.2.3); a date already past asks for 0. A wait past `MAX_SECONDS` is read as
    `MAX_SECONDS`.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        # float() reads any length; a decimal fraction is beyond the RFC, but meant plainly
        return min(float(text), MAX_SECONDS)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": the date is in UTC, as HTTP dates are
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, when.timestamp() - now), MAX_SECONDS)


@attrs.frozen
class OpenAIProvider:
    """An OpenAI-compatible chat-completions endpoint.

    Attributes:
        api_key: sent as a bearer token; never logged or recorded.
        base_url: e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is appended).
        model: the default model when the request names none.
    """

    api_key: str = attrs.field(repr=False)
    base_url: str = DEFAULT_OPENAI_BASE_URL
    model: str = DEFAULT_OPENAI_MODEL
    name: str = OPENAI_PROVIDER

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OpenAIProvider:
        """Build from ``OPENAI_API_KEY``, ``OPENAI_BASE_URL`` and ``EVERRUNS_MODEL``.

        Raises:
            ConfigError: ``OPENAI_API_KEY`` is not set or holds whitespace, control or
                non-ASCII characters (the message never shows the key), or
                ``OPENAI_BASE_URL`` is not an http(s) URL with a host and a valid port.
        """
        env = os.environ if env is None else env
        key = env.get("OPENAI_API_KEY")
        if not key:
            raise ConfigError(
                "OPENAI_API_KEY is not set on this worker; set it, or use the scripted provider"
            )
        # Checked here, not when the request is sent: such a key fails every attempt the same
        # way, and a retry policy must not spend minutes on it.
        if not _API_KEY.fullmatch(key):
            raise ConfigError(
                "OPENAI_API_KEY holds whitespace, control or non-ASCII characters (a trailing "
                "newline from a file?); set it to the key alone"
            )
        base = (env.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        _check_base_url(base)
        return cls(key, base, env.get("EVERRUNS_MODEL") or DEFAULT_OPENAI_MODEL)

    def request_body(self, request: ReasonRequest) -> dict[str, Any]:
        """Return the JSON body of the chat-completions call for ``request``."""
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": to_openai_messages(request.messages),
        }
        if request.tools:
            body["tools"] = to_openai_tools(request.tools)
        return body

    async def complete(self, request: ReasonRequest) -> ReasonReply:
        """POST ``{base_url}/chat/completions`` and read the reply.

        Raises:
            NonRetryableError: the service refused the request (HTTP 4xx other than 408/409/429).
            RetryAfter: the service is failing or busy (5xx, 408, 409, 429) and said when to
                come back (``Retry-After``): the next attempt waits at least that long.
            EverrunsError: the service is unreachable, failing or busy with no
                ``Retry-After``, or answered nonsense.

        Cancellation closes the connection at once.
        """
        body = json.dumps(self.request_body(request)).encode()
        response = await _http.request(
            "POST",
            f"{self.base_url}/chat/completions",
            headers={
                "Authorization": f"Bearer {self.api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            body=body,
        )
        if response.status != 200:
            detail = _error_detail(response)
            message = f"the LLM API answered HTTP {response.status}: {detail}"
            if 400 <= response.status < 500 and response.status not in (408, 409, 429):
                raise NonRetryableError(message)
            busy = response.status >= 500 or response.status in (408, 409, 429)
            wait = retry_after_seconds(response.header("retry-after"), time.time())
            if busy and wait is not None:
                wait = min(wait, MAX_RETRY_AFTER)
                raise RetryAfter(wait, f"{message} (Retry-After: {wait:g} s)")
            raise EverrunsError(message)
        return parse_openai_reply(response.json(), model=request.model or self.model)


register_provider(SCRIPTED_PROVIDER, ScriptedProvider)
register_provider(OPENAI_PROVIDER, OpenAIProvider.from_env)
