"""Review of session 20's two commits (skip records, migration 010; the worker's poll without
the sync types running beside its poll loop). Each test here fails on the commits under review
because of the defect its docstring names.
Mended in the commit that adds this file: a poll without the sync types leaves one free slot out.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import trio

from everruns._proto.everruns import v1 as pb
from everruns.domain.registry import Registry, activity
from everruns.worker import ActivityContext
from tests.integration.test_worker import (
    FakeControlPlane,
    activity_task,
    fake_control_plane,
    make_worker,
    running,
)


class _TypedFake(FakeControlPlane):
    """The fake control plane, handing a poll only the activity types it asks for (as the
    real one does: a poll without the sync types never gets a sync activity)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.poll_types: list[tuple[int, tuple[str, ...]]] = []

    async def poll_tasks(self, request: Any) -> Any:
        types = tuple(sorted(request.activity_types))
        self.polls.append(request.max_tasks)
        self.poll_types.append((request.max_tasks, types))
        self._poke()

        def matching() -> list[Any]:
            return [t for t in self.pending if t.kind != "activity" or t.activity_type in types]

        with trio.move_on_after(request.wait_s):
            while not matching():
                await self._changed.wait()
        out = matching()[: request.max_tasks]
        taken = {t.task_id for t in out}
        self.pending = [t for t in self.pending if t.task_id not in taken]
        for task in out:
            task.claimed_at = time.time()
        self._poke()
        return pb.PollTasksResponse(tasks=out)


async def test_a_thread_freed_by_an_abandoned_activity_is_used_before_the_long_poll_ends() -> None:
    """Commit c3f4c3f says (CHANGELOG, docs/internals "Known limits"): when a sync thread comes
    free while the long poll without the sync types is out - "its activity failed or was
    cancelled, or an abandoned thread ended" - the worker "sends another poll with them at
    once, with that thread". It does not when the thread is one abandoned by a cancel: the
    cancelled task gives its slot back at once, while its thread runs on; the next poll
    without the sync types (sent when the one out ends) reserves every free slot, that freed
    one included. When the abandoned thread then ends, `_until_thread_or` returns but
    `wait_claimable` finds no free slot (the poll without the sync types holds them all), so
    no poll with the sync types goes out until that long poll ends: a queued sync activity
    waits up to ``poll_wait`` (20 s by default) with the thread free - the very limit the
    commit says it fixed, in the case of an abandoned thread (the typical sync activity that
    ignores ``ctx.cancel_requested``: a blocking call). 2 slots, 1 thread, poll_wait 4 s."""
    reg = Registry()
    gate = threading.Event()
    token = trio.lowlevel.current_trio_token()
    quick_started = trio.Event()
    quick_at: list[float] = []

    @activity(registry=reg)
    def stubborn(ctx: ActivityContext, _: Any) -> str:
        while not gate.wait(0.02):
            ctx.heartbeat({"still": "here"})  # never looks at ctx.cancel_requested
        return "late"

    @activity(registry=reg)
    def quick(ctx: ActivityContext, _: Any) -> str:
        quick_at.append(time.monotonic())
        token.run_sync_soon(quick_started.set)
        return "quick"

    @activity(registry=reg)
    async def other(ctx: ActivityContext, _: Any) -> str:  # a type polled without a thread
        return "other"

    poll_wait = 4.0
    fake = _TypedFake()
    freed_at = 0.0
    try:
        with trio.fail_after(30):
            async with fake_control_plane(fake) as port:
                worker = make_worker(
                    reg, port, max_concurrent_tasks=2, max_sync_threads=1, poll_wait=poll_wait
                )
                async with running(worker):
                    first = activity_task("stubborn")
                    fake.cancel_on_heartbeat.add(first.task_id)
                    fake.push(first)
                    await fake.wait_for(lambda: bool(fake.failures_of(first.task_id)))
                    assert fake.failures_of(first.task_id)[0].cancelled
                    # Its slot is free, its thread runs on (abandoned). The poll without the
                    # sync types that was out ends (poll_wait); the next one goes out with
                    # both free slots (before the fix) or with one, keeping one back.
                    sent = len(fake.poll_types)
                    await fake.wait_for(
                        lambda: any("quick" not in types for _, types in fake.poll_types[sent:])
                    )
                    second = activity_task("quick")
                    fake.push(second)
                    await trio.sleep(0.2)
                    assert not quick_started.is_set()
                    freed_at = time.monotonic()
                    gate.set()  # the abandoned thread ends: the only thread is free
                    with trio.move_on_after(poll_wait + 2):
                        await quick_started.wait()
    finally:
        gate.set()
    waited = quick_at[0] - freed_at if quick_at else float("inf")
    assert waited < 1.5, (
        f"a sync activity queued while the only thread ran an abandoned activity started "
        f"{waited:.1f} s after that thread ended (poll_wait {poll_wait:g} s): the poll "
        "without the sync types held every free slot, so no poll with the sync types went "
        f"out until it ended (polls sent: {fake.poll_types})"
    )
