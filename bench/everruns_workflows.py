"""The workflows everruns' benchmark workers run (activities: `bench.everruns_activities`).

Workflows name their activities as strings, so a worker started with only this module serves
workflow tasks and no activities: the scheduling worker of workload 2 and the real worker of
workload 7, whose activities the simulated workers claim.
"""

from __future__ import annotations

from typing import Any

from everruns.domain.context import WorkflowContext
from everruns.domain.registry import workflow


@workflow
async def bench_fanout(ctx: WorkflowContext, n: int) -> int:
    """Schedules ``n`` no-op activities at once (workload 2's queued activities)."""
    await ctx.gather(*(ctx.execute_activity("bench_noop", i) for i in range(n)))
    return n


@workflow
async def bench_three_steps(ctx: WorkflowContext, i: int) -> int:
    """Three sequential no-op activities (workload 3)."""
    await ctx.execute_activity("bench_step_1", i)
    await ctx.execute_activity("bench_step_2", i)
    await ctx.execute_activity("bench_step_3", i)
    return i


@workflow
async def bench_latency(ctx: WorkflowContext, i: int) -> int:
    """One activity that reports when its body starts (workload 4; also workload 1's type)."""
    result: int = await ctx.execute_activity("bench_signal_start", i)
    return result


@workflow
async def bench_cancel(ctx: WorkflowContext, i: int) -> Any:
    """One activity that runs until cancelled (workload 5)."""
    return await ctx.execute_activity("bench_until_cancelled", i)


@workflow
async def bench_crash(ctx: WorkflowContext, i: int) -> Any:
    """One activity whose first attempt blocks, so its worker can be killed (workload 6)."""
    return await ctx.execute_activity("bench_block_first_attempt", i)


@workflow
async def bench_scale(ctx: WorkflowContext, n: int) -> int:
    """``n`` activities claimed by the simulated workers of workload 7."""
    await ctx.gather(*(ctx.execute_activity("bench_scale_noop", i) for i in range(n)))
    return n
