"""Agent tools: each tool is an activity (``act.<name>``) with its own retries and breaker.

`tool` registers a function both as an everruns activity named ``act.<name>`` (so the ``act``
step runs every call as its own durable task) and as a `ToolSpec` in this process's tool table
(name, description, JSON-schema parameters) that ``process_input`` offers to the model. Built
in: ``calculator`` (safe arithmetic, no eval), ``clock``, ``sleep`` (waits, for demos of long
steps and cancellation) and ``http_get`` (off unless ``EVERRUNS_ENABLE_HTTP_GET`` is on, e.g.
``1``, on the worker). A tool receives the model's arguments (a JSON object) and returns a JSON
value; it raises `NonRetryableError` when the arguments are wrong (the model is told), anything
else to be retried. This module decides nothing about turns.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import trio

from everruns.agent import _http
from everruns.agent.calculator import evaluate, to_json_number
from everruns.domain.address import switch_from_env
from everruns.domain.registry import Registry, activity
from everruns.domain.retry import RetryPolicy
from everruns.errors import ConfigError, EverrunsError, InvalidArgument, NonRetryableError
from everruns.worker.activity import ActivityContext

__all__ = [
    "HTTP_GET_ENV",
    "TOOL_ACTIVITY_PREFIX",
    "ToolSpec",
    "available_tools",
    "get_tool",
    "tool",
    "tool_names",
]

TOOL_ACTIVITY_PREFIX = "act."
HTTP_GET_ENV = "EVERRUNS_ENABLE_HTTP_GET"
MAX_SLEEP_SECONDS = 60.0
HTTP_GET_TIMEOUT = 20.0
HTTP_GET_MAX_CHARS = 20_000
HTTP_GET_MAX_BYTES = 2 * 1024 * 1024

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

F = TypeVar("F", bound=Callable[..., Any])


def _always(_env: Mapping[str, str]) -> bool:
    return True


@attrs.frozen
class ToolSpec:
    """A tool as the model sees it, and the activity that runs it.

    Attributes:
        name: what the model calls (letters, digits, ``_``, ``-``; at most 64).
        description: tells the model what it does and when to use it.
        parameters: JSON schema of its arguments object.
        offered_by_default: offered when the message does not list its tools.
        enabled: given the worker's environment, whether the tool may be offered at all.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    offered_by_default: bool = True
    enabled: Callable[[Mapping[str, str]], bool] = _always

    @property
    def activity_type(self) -> str:
        """The activity that runs it: ``act.<name>``."""
        return TOOL_ACTIVITY_PREFIX + self.name

    def to_dict(self) -> dict[str, Any]:
        """Return the definition recorded in the turn (and sent to the model)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "activity": self.activity_type,
        }


_TOOLS: dict[str, ToolSpec] = {}


def tool(
    *,
    name: str,
    description: str,
    parameters: dict[str, Any] | None = None,
    offered_by_default: bool = True,
    enabled: Callable[[Mapping[str, str]], bool] = _always,
    retry: RetryPolicy | None = None,
    start_to_close_timeout: float | None = None,
    registry: Registry | None = None,
) -> Callable[[F], F]:
    """Register ``fn(ctx, arguments) -> result`` as tool ``name`` and activity ``act.<name>``.

    Args:
        name: the tool's name.
        description: for the model.
        parameters: JSON schema of the arguments (default: no arguments).
        offered_by_default: offer it when a message does not list its tools.
        enabled: whether the worker's environment allows it.
        retry: the activity's default retry policy.
        start_to_close_timeout: seconds one attempt may run.
        registry: where the activity goes (default `default_registry`).

    Returns:
        A decorator returning the function unchanged.

    Raises:
        InvalidArgument: the name is not usable, or another tool has it.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"tool name {name!r} must be 1-64 letters, digits, '_' or '-' (what LLM APIs accept)"
        )
    spec = ToolSpec(
        name,
        description,
        parameters if parameters is not None else {"type": "object", "properties": {}},
        offered_by_default,
        enabled,
    )

    def decorate(fn: F) -> F:
        existing = _TOOLS.get(name)
        if existing is not None and existing != spec:
            raise InvalidArgument(f"a tool named {name!r} is already registered")
        activity(
            fn,
            name=spec.activity_type,
            retry=retry,
            start_to_close_timeout=start_to_close_timeout,
            registry=registry,
        )
        _TOOLS[name] = spec
        return fn

    return decorate


def get_tool(name: str) -> ToolSpec | None:
    """Return the tool registered as ``name``, or None."""
    return _TOOLS.get(name)


def tool_names() -> list[str]:
    """Return every registered tool's name, sorted."""
    return sorted(_TOOLS)


def available_tools(env: Mapping[str, str] | None = None) -> list[ToolSpec]:
    """Return the tools offered by default under ``env`` (default: ``os.environ``), by name."""
    env = os.environ if env is None else env
    return [
        spec for _, spec in sorted(_TOOLS.items()) if spec.offered_by_default and spec.enabled(env)
    ]


def _arguments(arguments: Any) -> Mapping[str, Any]:
    if not isinstance(arguments, Mapping):
        raise NonRetryableError(f"tool arguments must be a JSON object, got {arguments!r}"[:300])
    return arguments


# ----------------------------------------------------------------------------- built-ins

TOOL_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.5, maximum_interval=10.0)


@tool(
    name="calculator",
    description=(
        "Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses. "
        "Use it for any calculation."
    ),
    parameters={
        "type": "object",
        "properties": {
            "expression": {"type": "string", "description": "e.g. (2 + 3) * 7 / 4"},
        },
        "required": ["expression"],
    },
    retry=TOOL_RETRY,
    start_to_close_timeout=30.0,
)
async def calculator(ctx: ActivityContext, arguments: Any) -> dict[str, Any]:
    """Evaluate ``arguments["expression"]``; returns ``{"expression", "result"}``.

    Raises:
        NonRetryableError: the expression is missing or not valid arithmetic.
    """
    expression = _arguments(arguments).get("expression")
    if not isinstance(expression, str):
        raise NonRetryableError("calculator needs a string argument 'expression'")
    try:
        value = to_json_number(evaluate(expression))
    except InvalidArgument as exc:
        raise NonRetryableError(f"cannot evaluate {expression[:100]!r}: {exc}") from exc
    return {"expression": expression.strip(), "result": value}


@tool(
    name="clock",
    description="Return the current date and time (UTC, ISO 8601) and the Unix time.",
    retry=TOOL_RETRY,
    start_to_close_timeout=30.0,
)
async def clock(ctx: ActivityContext, arguments: Any) -> dict[str, Any]:
    """Return ``{"utc": "...Z", "unix": seconds}`` read from the worker's clock."""
    now = time.time()
    utc = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"utc": utc, "unix": round(now, 3)}


@tool(
    name="sleep",
    description=(
        f"Wait for a number of seconds (at most {MAX_SLEEP_SECONDS:g}). Use it only when the "
        "user asks you to wait."
    ),
    parameters={
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0}},
        "required": ["seconds"],
    },
    retry=TOOL_RETRY,
    start_to_close_timeout=MAX_SLEEP_SECONDS + 30.0,
)
async def sleep(ctx: ActivityContext, arguments: Any) -> dict[str, Any]:
    """Wait ``arguments["seconds"]`` (capped); returns ``{"slept": seconds}``.

    Raises:
        NonRetryableError: ``seconds`` is not a number >= 0.

    Cancellation (the turn was cancelled) interrupts the wait at once.
    """
    seconds = _arguments(arguments).get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise NonRetryableError(f"sleep needs a number of seconds >= 0, got {seconds!r}")
    seconds = min(float(seconds), MAX_SLEEP_SECONDS)
    await trio.sleep(seconds)
    return {"slept": seconds}


def _http_get_enabled(env: Mapping[str, str]) -> bool:
    """`EVERRUNS_ENABLE_HTTP_GET` read as every on/off variable is (1/true/yes/on, 0/false/
    no/off); any other value leaves the tool off (the other tools are still offered), and a
    call of it is refused saying why (`_http_get_refusal`)."""
    try:
        return switch_from_env(env, HTTP_GET_ENV, default=False)
    except ConfigError:
        return False


def _http_get_refusal(env: Mapping[str, str]) -> str:
    try:
        switch_from_env(env, HTTP_GET_ENV, default=False)
    except ConfigError as exc:
        return f"http_get is disabled on this worker: {exc}"
    return f"http_get is disabled on this worker; set {HTTP_GET_ENV}=1 to allow it"


@tool(
    name="http_get",
    description="Fetch a web page or API over HTTP(S) with GET; returns the status and text.",
    parameters={
        "type": "object",
        "properties": {"url": {"type": "string", "description": "http:// or https:// URL"}},
        "required": ["url"],
    },
    enabled=_http_get_enabled,
    retry=TOOL_RETRY,
    start_to_close_timeout=HTTP_GET_TIMEOUT + 10.0,
)
async def http_get(ctx: ActivityContext, arguments: Any) -> dict[str, Any]:
    """GET ``arguments["url"]``; returns ``{"url", "status", "content_type", "body",
    "truncated"}`` whatever the status.

    At most `HTTP_GET_MAX_BYTES` of the body are read and `HTTP_GET_MAX_CHARS` characters
    returned; ``truncated`` says the page was longer.

    Raises:
        NonRetryableError: the tool is disabled on this worker, or the URL is unusable.
        EverrunsError: the host could not be reached or the transfer failed (retried).
    """
    if not _http_get_enabled(os.environ):
        raise NonRetryableError(_http_get_refusal(os.environ))
    url = _arguments(arguments).get("url")
    if not isinstance(url, str):
        raise NonRetryableError("http_get needs a string argument 'url'")
    try:
        with trio.fail_after(HTTP_GET_TIMEOUT):
            response = await _http.request("GET", url, max_body=HTTP_GET_MAX_BYTES, truncate=True)
    except InvalidArgument as exc:
        raise NonRetryableError(str(exc)) from exc
    except trio.TooSlowError as exc:
        raise EverrunsError(f"GET {url} took longer than {HTTP_GET_TIMEOUT:g} s") from exc
    text = response.text()
    return {
        "url": url,
        "status": response.status,
        "content_type": response.header("content-type") or "",
        "body": text[:HTTP_GET_MAX_CHARS],
        "truncated": response.truncated or len(text) > HTTP_GET_MAX_CHARS,
    }
