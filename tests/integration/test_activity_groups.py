"""An activity whose failure comes out of a Trio nursery (an exception group) is reported by
what it holds: NonRetryableError raised in a nursery is final, a lone error keeps its type,
and RetryAfter keeps its delay. Over real gRPC against the scripted control plane."""

from __future__ import annotations

from typing import Any

import trio

from everruns.domain import payload
from everruns.domain.registry import Registry, activity
from everruns.errors import NonRetryableError, RetryAfter
from everruns.worker import ActivityContext
from tests.integration.test_worker import (
    FakeControlPlane,
    activity_task,
    fake_control_plane,
    make_worker,
    running,
)


async def _raise_in_nursery(*errors: BaseException) -> None:
    async def fail(exc: BaseException) -> None:
        raise exc

    async with trio.open_nursery() as nursery:
        for exc in errors:
            nursery.start_soon(fail, exc)


async def test_failures_raised_in_nurseries_are_reported_by_what_they_hold() -> None:
    reg = Registry()

    @activity(registry=reg)
    async def declined(ctx: ActivityContext, _: Any) -> None:
        await _raise_in_nursery(NonRetryableError("card declined"))

    @activity(registry=reg)
    async def lone(ctx: ActivityContext, _: Any) -> None:
        await _raise_in_nursery(ValueError("bad input 7"))

    @activity(registry=reg)
    async def busy(ctx: ActivityContext, _: Any) -> None:
        await _raise_in_nursery(RetryAfter(2.5, "rate limited"), RetryAfter(9, "busier"))

    fake = FakeControlPlane()
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            tasks = [activity_task(t) for t in ("declined", "lone", "busy")]
            fake.push(*tasks)
            await fake.wait_for(lambda: len(fake.failed) == 3)
    by_id = {f.task_id: f for f in fake.failed}
    errors = {t.activity_type: payload.decode(by_id[t.task_id].error) for t in tasks}
    flags = {t.activity_type: by_id[t.task_id].non_retryable for t in tasks}
    assert flags == {"declined": True, "lone": False, "busy": False}
    assert errors["declined"]["type"] == "everruns.errors.NonRetryableError"
    assert errors["lone"]["type"] == "builtins.ValueError"
    assert errors["lone"]["message"] == "bad input 7"
    assert errors["busy"]["type"] == "builtins.ExceptionGroup"
    assert errors["busy"]["retry_after"] == 9.0
