"""The workflow/activity registry and the decorators that fill it."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from everruns.domain import registry as registry_module
from everruns.domain.commands import ActivityOptions
from everruns.domain.registry import (
    DEFINITION_ATTRIBUTE,
    ActivityDefinition,
    Registry,
    WorkflowDefinition,
    activity,
    definition_of,
    name_of,
    workflow,
)
from everruns.domain.retry import RetryPolicy
from everruns.errors import AlreadyExists, InvalidArgument, NotFound


def test_bare_decorators_register_under_the_function_name() -> None:
    reg = Registry()

    @workflow(registry=reg)
    async def checkout(ctx: Any, order: Any) -> None: ...

    @activity(registry=reg)
    async def charge(ctx: Any, order: Any) -> None: ...

    @activity(registry=reg)
    def send_mail(ctx: Any, to: Any) -> None: ...

    assert reg.workflow_types() == ["checkout"]
    assert reg.activity_types() == ["charge", "send_mail"]
    assert reg.workflow("checkout") == WorkflowDefinition(name="checkout", fn=checkout)
    assert reg.activity("charge").is_async is True
    assert reg.activity("send_mail").is_async is False
    assert reg.activity("send_mail").options == ActivityOptions()
    assert definition_of(charge) == reg.activity("charge")
    assert getattr(checkout, DEFINITION_ATTRIBUTE) == reg.workflow("checkout")


def test_decorators_really_used_bare_go_to_the_default_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fresh = Registry()
    monkeypatch.setattr(registry_module, "default_registry", fresh)

    @workflow
    async def bare_wf(ctx: Any, x: Any) -> Any:
        return x

    @activity
    def bare_act(ctx: Any, x: Any) -> Any:
        return x

    assert fresh.workflow_types() == ["bare_wf"]
    assert fresh.activity_types() == ["bare_act"]
    assert bare_act(None, 3) == 3  # the function is returned unchanged


def test_named_decorators_and_activity_defaults() -> None:
    reg = Registry()
    policy = RetryPolicy(max_attempts=2)

    @workflow(name="order.checkout", registry=reg)
    async def checkout(ctx: Any, order: Any) -> None: ...

    @activity(
        name="payments.charge",
        retry=policy,
        schedule_to_start_timeout=10,
        start_to_close_timeout=20,
        heartbeat_timeout=5,
        priority=9,
        breaker_key="psp",
        registry=reg,
    )
    async def charge(ctx: Any, order: Any) -> None: ...

    assert name_of(checkout) == "order.checkout"
    assert name_of(charge) == "payments.charge"
    assert reg.activity("payments.charge") == ActivityDefinition(
        name="payments.charge",
        fn=charge,
        is_async=True,
        options=ActivityOptions(
            retry=policy,
            schedule_to_start_timeout=10,
            start_to_close_timeout=20,
            heartbeat_timeout=5,
            priority=9,
            breaker_key="psp",
        ),
    )


def test_taken_names_are_refused_but_re_registering_is_harmless() -> None:
    reg = Registry()

    async def one(ctx: Any, x: Any) -> None: ...

    async def two(ctx: Any, x: Any) -> None: ...

    first = reg.add_workflow(one, name="wf")
    assert reg.add_workflow(one, name="wf") is first
    with pytest.raises(AlreadyExists, match=r"workflow name 'wf' is already registered to .*one"):
        reg.add_workflow(two, name="wf")
    reg.add_activity(one, name="act")
    with pytest.raises(AlreadyExists, match="activity name 'act'"):
        activity(two, name="act", registry=reg)
    # Workflows and activities are separate namespaces.
    reg.add_activity(two, name="wf")
    assert reg.activity("wf").fn is two


def test_workflows_must_be_async() -> None:
    reg = Registry()

    def sync_wf(ctx: Any, x: Any) -> None: ...

    with pytest.raises(InvalidArgument, match="must be an `async def` function"):
        workflow(sync_wf, registry=reg)
    assert reg.workflow_types() == []


def test_lookups_of_unknown_names_list_the_known_ones() -> None:
    reg = Registry()
    with pytest.raises(
        NotFound, match=r"no workflow named 'nope' is registered; known workflows: \(none\)"
    ):
        reg.workflow("nope")

    @activity(registry=reg)
    def b(ctx: Any, x: Any) -> None: ...

    @activity(registry=reg)
    def a(ctx: Any, x: Any) -> None: ...

    with pytest.raises(NotFound, match="known activities: a, b"):
        reg.activity("c")
    assert reg.get_activity("c") is None


def test_name_of() -> None:
    def plain(ctx: Any, x: Any) -> None: ...

    assert name_of("charge") == "charge"
    assert name_of(plain) == "plain"
    with pytest.raises(InvalidArgument, match="cannot tell the registered name"):
        name_of(lambda ctx, x: None)
    with pytest.raises(InvalidArgument, match="non-empty"):
        name_of("")


@pytest.mark.parametrize("bad", [" ", "checkout ", " checkout", "\tcheckout", "checkout\n"])
def test_name_of_refuses_a_name_no_worker_can_register(bad: str) -> None:
    """The registry refuses these names, so a run started under one would wait forever."""
    with pytest.raises(InvalidArgument, match="surrounding spaces"):
        name_of(bad)


@pytest.mark.parametrize("bad", ["", " padded", "x "])
def test_bad_names_are_invalid(bad: str) -> None:
    async def wf(ctx: Any, x: Any) -> None: ...

    with pytest.raises(InvalidArgument, match="name"):
        Registry().add_workflow(wf, name=bad)


def test_bad_activity_options_are_invalid_at_decoration() -> None:
    with pytest.raises(InvalidArgument, match="start_to_close_timeout"):

        @activity(start_to_close_timeout=-1, registry=Registry())
        def slow(ctx: Any, x: Any) -> None: ...


def test_callable_objects_are_classified_by_what_calling_them_gives() -> None:
    """An object with ``async def __call__`` (or a partial of one) is awaited, not run in a
    thread; an object with a sync ``__call__`` still runs in a thread."""

    class AsyncCall:
        async def __call__(self, ctx: Any, x: Any) -> Any:
            return x

    class SyncCall:
        def __call__(self, ctx: Any, x: Any) -> Any:
            return x

    async def coro(ctx: Any, x: Any, y: Any) -> Any:
        return y

    reg = Registry()
    assert reg.add_activity(AsyncCall(), name="a").is_async is True
    assert reg.add_activity(functools.partial(AsyncCall()), name="b").is_async is True
    assert reg.add_activity(functools.partial(coro, y=1), name="c").is_async is True
    assert reg.add_activity(SyncCall(), name="d").is_async is False


@pytest.mark.parametrize("bad", ["x" * 513, "a\x00b", "a\udc80b"])
def test_names_the_control_plane_cannot_store_or_the_wire_carry_are_refused(bad: str) -> None:
    async def wf(ctx: Any, x: Any) -> None: ...

    with pytest.raises(InvalidArgument) as info:
        Registry().add_workflow(wf, name=bad)
    assert "workflow name" in str(info.value)
    assert len(str(info.value)) < 200
    with pytest.raises(InvalidArgument, match="activity name"):
        Registry().add_activity(wf, name=bad)
    assert Registry().add_workflow(wf, name="x" * 512).name == "x" * 512
