"""The worker's activity side at its edges: an activity that raises a BaseException of its own
(asyncio's CancelledError out of a sync activity's asyncio.run(), a library's BaseException,
GeneratorExit) fails its attempt, and the worker goes on. From a review (session 17); each
failed before: the worker died, and the task, released uncharged, killed the next one."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns.domain.registry import Registry, activity
from everruns.worker import ActivityContext
from tests.integration.test_worker import (
    FakeControlPlane,
    activity_task,
    fake_control_plane,
    make_worker,
    running,
)

# ------------------------------------------------------ unusual BaseExceptions in activities


class _Abort(BaseException):
    """A library's own BaseException (as gevent's GreenletExit or asyncio's CancelledError)."""


def _raising_registry() -> Registry:
    reg = Registry()

    @activity(registry=reg)
    def sync_asyncio_cancelled(ctx: ActivityContext, _: Any) -> None:
        # A sync activity driving asyncio code whose inner task was cancelled.
        import asyncio

        async def inner() -> None:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(1)

        asyncio.run(inner())

    @activity(registry=reg)
    async def custom_base_exception(ctx: ActivityContext, _: Any) -> None:
        raise _Abort("a library gave up")

    @activity(registry=reg)
    async def generator_exit(ctx: ActivityContext, _: Any) -> None:
        raise GeneratorExit

    @activity(registry=reg)
    async def fine(ctx: ActivityContext, _: Any) -> str:
        return "fine"

    return reg


@pytest.mark.parametrize(
    "activity_type", ["sync_asyncio_cancelled", "custom_base_exception", "generator_exit"]
)
async def test_an_activity_raising_a_base_exception_fails_without_taking_the_worker_down(
    activity_type: str,
) -> None:
    """SystemExit from an activity fails the activity (a fix of an earlier session: it used to
    take the worker down, on every worker the task went to next). Any other BaseException
    still does: it escapes `_call_activity` (which catches Exception and SystemExit), the
    task is *released* as if the worker were stopping (an attempt that costs nothing), and
    it ends `Worker.run`. The next worker claims the task and dies the same way, forever,
    with no attempt ever counted. Workflow code gets this right (any BaseException but
    KeyboardInterrupt fails the workflow); activities should fail the attempt."""
    reg = _raising_registry()
    fake = FakeControlPlane()
    crashed: list[BaseException] = []
    with trio.fail_after(10):
        async with fake_control_plane(fake) as port:
            worker = make_worker(reg, port)
            try:
                async with running(worker):
                    bad = activity_task(activity_type)
                    fake.push(bad)
                    await fake.wait_for(lambda: bool(fake.failures_of(bad.task_id)))
                    after = activity_task("fine")
                    fake.push(after)  # the worker is still there to take it
                    with trio.move_on_after(2):
                        await fake.wait_for(lambda: after.task_id in fake.completed)
            except BaseException as exc:
                crashed.append(exc)
    (report,) = fake.failures_of(bad.task_id)
    assert not crashed and not report.release, (
        f"Worker.run ended with {crashed[0] if crashed else None!r}; the failing attempt was "
        f"reported with release={report.release} (released uncharged, as at a shutdown)"
    )
    assert fake.completed.get(after.task_id) == "fine"
