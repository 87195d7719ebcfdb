"""The registry of workflow and activity definitions, and the decorators that fill it.

``@workflow`` and ``@activity`` record a function under a name (the function's own name unless
one is given) in a `Registry` — the module-level `default_registry` unless another is passed —
and return the function unchanged, with its definition attached so that ``ctx.execute_activity(
charge, ...)`` can find the name and the default options. A worker resolves the types it is
asked to run here. This module only keeps names; it never runs the functions and performs no I/O.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

import attrs

from everruns.domain.commands import ActivityOptions
from everruns.domain.limits import check_type_name, check_utf8, shown
from everruns.domain.retry import RetryPolicy
from everruns.errors import AlreadyExists, InvalidArgument, NotFound

__all__ = [
    "DEFINITION_ATTRIBUTE",
    "ActivityDefinition",
    "Registry",
    "WorkflowDefinition",
    "activity",
    "default_registry",
    "definition_of",
    "name_of",
    "workflow",
]

DEFINITION_ATTRIBUTE = "__everruns_definition__"
"""The attribute the decorators set on a function: its `WorkflowDefinition`/`ActivityDefinition`."""

F = TypeVar("F", bound=Callable[..., Any])


def _is_name(value: object) -> bool:
    """The rule every registered name follows (and so every name a worker can serve)."""
    return isinstance(value, str) and bool(value) and value.strip() == value


def _check_storable(name: str, what: str) -> str:
    """Return ``name`` if the control plane can store it and the wire carry it.

    Raises:
        InvalidArgument: longer than `MAX_NAME_LENGTH`, a NUL character, or a character UTF-8
            cannot encode (a lone surrogate); every worker serving it would fail to register.
    """
    return check_utf8(check_type_name(name, what), what)


def _check_name(inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not _is_name(value):
        raise InvalidArgument(
            f"{attr.name} must be a non-empty string without surrounding spaces, got {value!r}"
        )
    kind = "workflow" if isinstance(inst, WorkflowDefinition) else "activity"
    _check_storable(value, f"{kind} name")


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives a coroutine to await: an ``async def`` function (a method,
    a `functools.partial` of one), or an object whose class has an ``async def __call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


@attrs.frozen
class WorkflowDefinition:
    """A workflow function under its registered name.

    Attributes:
        name: the workflow type, as clients start it.
        fn: ``async def fn(ctx: WorkflowContext, input) -> result``.
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[..., Any]


@attrs.frozen
class ActivityDefinition:
    """An activity function under its registered name.

    Attributes:
        name: the activity type, as workflows schedule it.
        fn: ``(async) def fn(ctx: ActivityContext, input) -> result``.
        is_async: whether calling ``fn`` gives a coroutine (an ``async def`` function, or an
            object with an ``async def __call__``); sync ones run in a thread.
        options: defaults for every call; arguments of ``ctx.execute_activity`` override them.
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[..., Any]
    is_async: bool
    options: ActivityOptions = attrs.field(factory=ActivityOptions)


def definition_of(fn: object) -> WorkflowDefinition | ActivityDefinition | None:
    """Return the definition a decorator attached to ``fn``, or None."""
    found = getattr(fn, DEFINITION_ATTRIBUTE, None)
    if isinstance(found, (WorkflowDefinition, ActivityDefinition)):
        return found
    return None


def name_of(fn_or_name: str | Callable[..., Any]) -> str:
    """Return the registered name of a workflow or activity given as a function or a name.

    A decorated function gives the name it was registered under; an undecorated one gives its
    ``__name__`` (the name the decorators would have chosen); a string is returned as is if
    it could be registered.

    Returns:
        The name.

    Raises:
        InvalidArgument: the string is empty or has surrounding spaces (no worker could ever
            register it), or the object has no usable name (e.g. a lambda). A name too long
            or holding a NUL is refused where it is used, under the field it fills
            (``workflow_type``, ``activity_type``), and by the decorators.
    """
    if isinstance(fn_or_name, str):
        if not _is_name(fn_or_name):
            raise InvalidArgument(
                "a workflow or activity name must be a non-empty string without surrounding "
                f"spaces (no worker can register it), got {shown(fn_or_name)}"
            )
        return fn_or_name
    definition = definition_of(fn_or_name)
    if definition is not None:
        return definition.name
    name = getattr(fn_or_name, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidArgument(
            f"cannot tell the registered name of {fn_or_name!r}; pass the name as a string "
            "or decorate the function with @everruns.workflow / @everruns.activity"
        )
    return name


class Registry:
    """Workflow and activity definitions by name.

    Registering the same function twice under the same name is a no-op (modules may be imported
    twice); registering a different function under a taken name is an error.
    """

    def __init__(self) -> None:
        self._workflows: dict[str, WorkflowDefinition] = {}
        self._activities: dict[str, ActivityDefinition] = {}

    def add_workflow(
        self, fn: Callable[..., Any], *, name: str | None = None
    ) -> WorkflowDefinition:
        """Register ``fn`` as workflow ``name`` (default ``fn.__name__``).

        Returns:
            The definition.

        Raises:
            InvalidArgument: ``fn`` is not an ``async def`` function, or the name is invalid.
            AlreadyExists: another function is registered under that name.
        """
        if not inspect.iscoroutinefunction(fn):
            raise InvalidArgument(
                f"workflow {getattr(fn, '__qualname__', fn)!r} must be an `async def` function "
                "taking (ctx, input)"
            )
        definition = WorkflowDefinition(name=name if name is not None else name_of(fn), fn=fn)
        existing = self._workflows.get(definition.name)
        if existing is not None:
            if existing.fn is fn:
                return existing
            raise AlreadyExists(
                f"workflow name {definition.name!r} is already registered to "
                f"{_describe(existing.fn)}; choose another name with @workflow(name=...)"
            )
        self._workflows[definition.name] = definition
        return definition

    def add_activity(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        options: ActivityOptions | None = None,
    ) -> ActivityDefinition:
        """Register ``fn`` (sync or async) as activity ``name`` (default ``fn.__name__``).

        Returns:
            The definition.

        Raises:
            InvalidArgument: ``fn`` is not callable, or the name is invalid.
            AlreadyExists: another function is registered under that name.
        """
        if not callable(fn):
            raise InvalidArgument(f"activity must be a function, got {type(fn).__name__}")
        definition = ActivityDefinition(
            name=name if name is not None else name_of(fn),
            fn=fn,
            is_async=_is_async_callable(fn),
            options=options if options is not None else ActivityOptions(),
        )
        existing = self._activities.get(definition.name)
        if existing is not None:
            if existing.fn is fn and existing.options == definition.options:
                return existing
            raise AlreadyExists(
                f"activity name {definition.name!r} is already registered to "
                f"{_describe(existing.fn)}; choose another name with @activity(name=...)"
            )
        self._activities[definition.name] = definition
        return definition

    def workflow(self, name: str) -> WorkflowDefinition:
        """Return the workflow registered as ``name``.

        Raises:
            NotFound: no such workflow; the message lists the registered ones.
        """
        found = self._workflows.get(name)
        if found is None:
            raise NotFound(
                f"no workflow named {name!r} is registered; known workflows: "
                f"{_listing(self._workflows)}. Register it with @everruns.workflow and give "
                "it to the worker"
            )
        return found

    def activity(self, name: str) -> ActivityDefinition:
        """Return the activity registered as ``name``.

        Raises:
            NotFound: no such activity; the message lists the registered ones.
        """
        found = self._activities.get(name)
        if found is None:
            raise NotFound(
                f"no activity named {name!r} is registered; known activities: "
                f"{_listing(self._activities)}. Register it with @everruns.activity and give "
                "it to the worker"
            )
        return found

    def get_activity(self, name: str) -> ActivityDefinition | None:
        """Return the activity registered as ``name``, or None."""
        return self._activities.get(name)

    def workflow_types(self) -> list[str]:
        """Return the registered workflow names, sorted."""
        return sorted(self._workflows)

    def activity_types(self) -> list[str]:
        """Return the registered activity names, sorted."""
        return sorted(self._activities)


def _listing(names: dict[str, Any]) -> str:
    return ", ".join(sorted(names)) if names else "(none)"


def _describe(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


default_registry = Registry()
"""The registry the decorators use when none is given."""


@overload
def workflow(fn: F, *, name: str | None = None, registry: Registry | None = None) -> F: ...


@overload
def workflow(
    fn: None = None, *, name: str | None = None, registry: Registry | None = None
) -> Callable[[F], F]: ...


def workflow(
    fn: F | None = None, *, name: str | None = None, registry: Registry | None = None
) -> F | Callable[[F], F]:
    """Register an ``async def wf(ctx, input)`` as a workflow; use bare or with arguments.

    Args:
        fn: the function (when used bare, ``@workflow``).
        name: the workflow type; defaults to ``fn.__name__``.
        registry: where to register; defaults to `default_registry`.

    Returns:
        ``fn`` itself (with its definition attached), or a decorator doing that.

    Raises:
        InvalidArgument: ``fn`` is not an ``async def`` function, or the name is invalid
            (see `name_of`).
        AlreadyExists: another function is registered under that name.
    """

    def decorate(f: F) -> F:
        target = registry if registry is not None else default_registry
        _attach(f, target.add_workflow(f, name=name))
        return f

    return decorate(fn) if fn is not None else decorate


@overload
def activity(
    fn: F,
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    schedule_to_start_timeout: float | None = None,
    start_to_close_timeout: float | None = None,
    heartbeat_timeout: float | None = None,
    priority: int = 0,
    breaker_key: str | None = None,
    registry: Registry | None = None,
) -> F: ...


@overload
def activity(
    fn: None = None,
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    schedule_to_start_timeout: float | None = None,
    start_to_close_timeout: float | None = None,
    heartbeat_timeout: float | None = None,
    priority: int = 0,
    breaker_key: str | None = None,
    registry: Registry | None = None,
) -> Callable[[F], F]: ...


def activity(
    fn: F | None = None,
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    schedule_to_start_timeout: float | None = None,
    start_to_close_timeout: float | None = None,
    heartbeat_timeout: float | None = None,
    priority: int = 0,
    breaker_key: str | None = None,
    registry: Registry | None = None,
) -> F | Callable[[F], F]:
    """Register a sync or async function as an activity; use bare or with arguments.

    The options become the defaults of every ``ctx.execute_activity`` of it; ``None`` leaves the
    control plane's default (see `ActivityOptions`).

    Args:
        fn: the function (when used bare, ``@activity``).
        name: the activity type; defaults to ``fn.__name__``.
        retry: default retry policy.
        schedule_to_start_timeout: default seconds the task may wait in the queue.
        start_to_close_timeout: default seconds one attempt may run.
        heartbeat_timeout: default seconds allowed between heartbeats.
        priority: default priority (higher first).
        breaker_key: default circuit breaker key (default: the activity type).
        registry: where to register; defaults to `default_registry`.

    Returns:
        ``fn`` itself (with its definition attached), or a decorator doing that.

    Raises:
        InvalidArgument: an option is malformed, or the name is invalid (see `name_of`).
        AlreadyExists: another function is registered under that name.
    """
    options = ActivityOptions(
        retry=retry,
        schedule_to_start_timeout=schedule_to_start_timeout,
        start_to_close_timeout=start_to_close_timeout,
        heartbeat_timeout=heartbeat_timeout,
        priority=priority,
        breaker_key=breaker_key,
    )

    def decorate(f: F) -> F:
        target = registry if registry is not None else default_registry
        _attach(f, target.add_activity(f, name=name, options=options))
        return f

    return decorate(fn) if fn is not None else decorate


def _attach(fn: Any, definition: Any) -> None:
    """Attach ``definition`` to a decorated ``fn`` (`name_of` reads it back). A bound method
    (``activity(service.send)``, an object holding its clients) takes no attributes of its
    own: its function carries it, which the method's attribute lookup finds. An object that
    takes none at all stays registered, under its name (pass that name to start it)."""
    for target in (fn, getattr(fn, "__func__", None)):
        if target is None:
            continue
        try:
            setattr(target, DEFINITION_ATTRIBUTE, definition)
            return
        except (AttributeError, TypeError):
            continue
