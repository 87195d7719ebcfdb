"""The activities of everruns' benchmark workers (see `bench.everruns_tasks` for workflows).

Importing only this module gives a worker that serves activities and no workflows, which is how
workload 2 drains 10,000 queued activities without also running their workflows' tasks.
"""

from __future__ import annotations

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
    signals.send("start", f"{i}:{ctx.attempt}")
    if ctx.attempt == 1:
        await trio.sleep(120)
    return i
