"""Workflows and activities the end-to-end tests run in real worker processes.

A worker imports this module (``python -m everruns.worker tests.e2e.workflows``, with the
repository root on ``PYTHONPATH``); the test process imports it only to name the functions it
starts. Every activity appends one JSON line per event of its execution (``start``, ``end``,
``cancelled``, ``finally``) to the file named by ``E2E_LOG``, with one ``os.write`` on an
``O_APPEND`` descriptor, so lines from concurrent processes never interleave and a ``kill -9``
loses at most the line that was never written. The file, not PostgreSQL, is the record, so it
survives faults injected into the database too; `tests.e2e.harness.ExecutionLog` reads it.
Nothing here may depend on the test process: the worker has only its environment.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import trio

from everruns.domain.context import WorkflowContext
from everruns.domain.registry import activity, workflow
from everruns.errors import ActivityError, WorkflowCancelled
from everruns.worker.activity import ActivityContext

LOG_ENV = "E2E_LOG"
"""The environment variable naming the execution log file."""


def record(ctx: ActivityContext, event: str, **fields: Any) -> None:
    """Append one execution event of the running activity to the ``E2E_LOG`` file.

    ``t`` is ``time.monotonic()``, which is one clock for every process on the machine, so the
    test can compare times recorded by different workers with its own.

    Raises:
        RuntimeError: ``E2E_LOG`` is not set (a harness bug: records must never be dropped).
    """
    path = os.environ.get(LOG_ENV)
    if not path:
        raise RuntimeError(f"{LOG_ENV} is not set; the e2e harness must pass it to workers")
    info = ctx.info
    entry = {
        "event": event,
        "activity": info.activity_type,
        "workflow_id": info.workflow_id,
        "run_id": info.run_id,
        "activity_id": info.activity_id,
        "attempt": info.attempt,
        "worker": os.environ.get("WORKER_ID", ""),
        "pid": os.getpid(),
        "t": time.monotonic(),
        "data": fields,
    }
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- activities


@activity
async def add_one(ctx: ActivityContext, n: int) -> int:
    record(ctx, "start", input=n)
    result = n + 1
    record(ctx, "end", result=result)
    return result


@activity
async def double(ctx: ActivityContext, n: int) -> int:
    record(ctx, "start", input=n)
    result = n * 2
    record(ctx, "end", result=result)
    return result


@activity
def describe_number(ctx: ActivityContext, n: int) -> str:
    # Sync on purpose: the worker must run it in a thread and still report its result.
    record(ctx, "start", input=n)
    result = f"the answer is {n}"
    record(ctx, "end", result=result)
    return result


@activity
async def square(ctx: ActivityContext, spec: dict[str, Any]) -> int:
    record(ctx, "start", input=spec)
    seconds = float(spec.get("seconds", 0))
    if seconds:
        await trio.sleep(seconds)
    i = int(spec["i"])
    record(ctx, "end", result=i * i)
    return i * i


@activity
async def stamp(ctx: ActivityContext, label: str) -> str:
    record(ctx, "start", label=label)
    record(ctx, "end", label=label)
    return label


@activity
async def run_until_cancelled(ctx: ActivityContext, label: str) -> str:
    record(ctx, "start", label=label)
    try:
        # Stands for any long await (a network call, a queue): only cancellation ends it.
        await trio.sleep_forever()
    except trio.Cancelled:
        record(ctx, "cancelled", label=label)
        raise
    finally:
        record(ctx, "finally", label=label)


@activity
async def cleanup(ctx: ActivityContext, label: str) -> str:
    record(ctx, "start", label=label)
    record(ctx, "end", label=label)
    return f"cleaned {label}"


@activity
async def quick_step(ctx: ActivityContext, spec: dict[str, int]) -> int:
    record(ctx, "start", input=spec)
    result = spec["value"] + spec["step"]
    record(ctx, "end", result=result)
    return result


@activity
async def slow_step(ctx: ActivityContext, spec: dict[str, Any]) -> int:
    record(ctx, "start", input=spec)
    await trio.sleep(float(spec["seconds"]))
    result = int(spec["value"]) * 10
    record(ctx, "end", result=result)
    return result


@activity
async def returns_a_set(ctx: ActivityContext, _input: Any) -> Any:
    record(ctx, "start")
    record(ctx, "end")
    return {1, 2, 3}


# ----------------------------------------------------------------------------------- workflows


@workflow
async def three_steps(ctx: WorkflowContext, n: int) -> dict[str, Any]:
    a = await ctx.execute_activity(add_one, n)
    b = await ctx.execute_activity(double, a)
    c = await ctx.execute_activity(describe_number, b)
    return {"a": a, "b": b, "c": c}


@workflow
async def fan_out(ctx: WorkflowContext, spec: dict[str, Any]) -> list[int]:
    seconds = spec.get("seconds", 0)
    handles = [
        ctx.start_activity(square, {"i": i, "seconds": seconds}) for i in range(spec["count"])
    ]
    results: list[int] = await ctx.gather(*handles)
    return results


@workflow
async def nap(ctx: WorkflowContext, seconds: float) -> list[str]:
    before = await ctx.execute_activity(stamp, "before")
    await ctx.sleep(seconds)
    after = await ctx.execute_activity(stamp, "after")
    return [before, after]


@workflow
async def await_approval(ctx: WorkflowContext, request: Any) -> dict[str, Any]:
    approval = await ctx.wait_signal("approve")
    return {"request": request, "approval": approval}


@workflow
async def cancellable(ctx: WorkflowContext, label: str) -> str:
    try:
        await ctx.execute_activity(run_until_cancelled, label)
    except WorkflowCancelled:
        await ctx.execute_activity(cleanup, label)
        raise
    return "ran to the end without being cancelled"


@workflow
async def three_slow_steps(ctx: WorkflowContext, spec: dict[str, Any]) -> list[int]:
    first = await ctx.execute_activity(quick_step, {"step": 1, "value": spec["value"]})
    second = await ctx.execute_activity(slow_step, {"value": first, "seconds": spec["seconds"]})
    third = await ctx.execute_activity(quick_step, {"step": 3, "value": second})
    return [first, second, third]


@workflow
async def bad_result(ctx: WorkflowContext, _input: Any) -> dict[str, Any]:
    try:
        await ctx.execute_activity(returns_a_set, None)
    except ActivityError as exc:
        return {
            "error_type": exc.error_type,
            "message": str(exc),
            "attempt": exc.attempt,
            "details": exc.details,
        }
    return {"error_type": None}
