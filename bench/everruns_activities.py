"""The activities of everruns' benchmark workers (see `bench.everruns_tasks` for workflows).

Importing only this module gives a worker that serves activities and no workflows, which is how
workload 2 drains 10,000 queued activities without also running their workflows' tasks.
"""

from __future__ import annotations

import os

import trio

from bench import signals
from everruns.domain.registry import activity
from everruns.worker.activity import ActivityContext


@activity
async def bench_noop(ctx: ActivityContext, i: int) -> int:
    signals.count("noop")
    return i


@activity
async def bench_step_1(ctx: ActivityContext, i: int) -> int:
    signals.count("step1")
    return i


@activity
async def bench_step_2(ctx: ActivityContext, i: int) -> int:
    signals.count("step2")
    return i


@activity
async def bench_step_3(ctx: ActivityContext, i: int) -> int:
    signals.count("step3")
    return i


@activity
async def bench_signal_start(ctx: ActivityContext, i: int) -> int:
    signals.send("start", str(i))
    return i


@activity
async def bench_until_cancelled(ctx: ActivityContext, i: int) -> int:
    signals.send("start", str(i))
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        signals.send("cancelled", str(i))
        raise
    return i


@activity
async def bench_block_first_attempt(ctx: ActivityContext, i: int) -> int:
    first = _first_run(ctx, i)  # before the signal: its worker may be killed right after it
    signals.send("start", f"{i}:{ctx.attempt}")
    if first:
        await trio.sleep(120)
    return i


FIRST_RUNS_ENV = "BENCH_FIRST_RUNS_DIR"
"""A directory where workload 6's activity marks the inputs it has begun (one file each)."""


def _first_run(ctx: ActivityContext, i: int) -> bool:
    """Whether no worker has run the activity of input ``i`` before. Its attempt number does
    not say: an activity started ahead of its decision and killed before the decision was
    applied runs again as attempt 1."""
    marks = os.environ.get(FIRST_RUNS_ENV)
    if not marks:
        return ctx.attempt == 1
    try:
        with open(os.path.join(marks, str(i)), "x"):
            return True
    except FileExistsError:
        return False
