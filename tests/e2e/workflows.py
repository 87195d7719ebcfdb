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
import signal
import time
from typing import Any

import trio

from everruns.domain.context import WorkflowContext
from everruns.domain.registry import activity, workflow
from everruns.domain.retry import RetryPolicy
from everruns.errors import ActivityError, NonRetryableError, WorkflowCancelled
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


# ------------------------------------------------------------------------ fault-injection work


class FlakyError(Exception):
    """What the fault-injection activities raise when told to fail (retryable by default)."""


RELEASE_POLL = 0.05
"""How often an activity held by a release file looks for it, in seconds."""


async def _wait_for_file(path: str) -> None:
    # The test process, not the workflow, decides when a held activity may finish; a file is
    # the one channel both processes see, and polling it is confined to test activities.
    while not await trio.Path(path).exists():  # noqa: ASYNC110 - another process sets it
        await trio.sleep(RELEASE_POLL)


@activity
async def flaky(ctx: ActivityContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Fail the first ``failures`` attempts with `FlakyError`, then succeed (after waiting for
    the ``release`` file, when one is named)."""
    attempt = ctx.info.attempt
    record(ctx, "start", input=spec)
    if attempt <= int(spec.get("failures", 0)):
        record(ctx, "failed", error="FlakyError")
        raise FlakyError(f"attempt {attempt} of flaky failed on purpose")
    if spec.get("release"):
        await _wait_for_file(str(spec["release"]))
    record(ctx, "end", attempt=attempt)
    return {"attempt": attempt}


@activity
async def fails(ctx: ActivityContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Raise the error ``spec["error"]`` names (``flaky``, ``value``, ``non_retryable``) on the
    first ``failures`` attempts (all of them by default) — unless the ``fixed_flag`` file exists,
    which stands for an operator having fixed the cause before requeueing."""
    attempt = ctx.info.attempt
    record(ctx, "start", input=spec)
    fixed = bool(spec.get("fixed_flag")) and await trio.Path(str(spec["fixed_flag"])).exists()
    failures = spec.get("failures")
    if not fixed and (failures is None or attempt <= int(failures)):
        kind = str(spec.get("error", "flaky"))
        record(ctx, "failed", error=kind)
        message = f"attempt {attempt} of fails raised {kind} on purpose"
        if kind == "value":
            raise ValueError(message)
        if kind == "non_retryable":
            raise NonRetryableError(message)
        raise FlakyError(message)
    record(ctx, "end", attempt=attempt, fixed=fixed)
    return {"attempt": attempt, "fixed": fixed}


@activity
async def sleepy(ctx: ActivityContext, spec: dict[str, Any]) -> Any:
    """Sleep ``seconds`` (``retry_seconds`` on later attempts), or until the ``release`` file
    exists; record a cancellation if one interrupts it. Returns ``spec["i"]``."""
    record(ctx, "start", input=spec)
    seconds = float(spec.get("seconds", 0))
    if ctx.info.attempt > 1 and "retry_seconds" in spec:
        seconds = float(spec["retry_seconds"])
    try:
        if spec.get("release"):
            await _wait_for_file(str(spec["release"]))
        elif seconds:
            await trio.sleep(seconds)
    except trio.Cancelled:
        record(ctx, "cancelled")
        raise
    record(ctx, "end")
    return spec.get("i")


@activity
async def block_event_loop(ctx: ActivityContext, spec: dict[str, Any]) -> int:
    """On its first attempt, block the worker's whole event loop for ``seconds`` (a sync call
    hanging inside async code: the worker stops heartbeating); later attempts return at once."""
    attempt = ctx.info.attempt
    record(ctx, "start", input=spec)
    if attempt == 1:
        time.sleep(float(spec["seconds"]))  # noqa: ASYNC251 - blocking the loop is the fault
    record(ctx, "end", attempt=attempt)
    return attempt


@activity
async def kill_own_worker(ctx: ActivityContext, spec: Any) -> None:
    """``kill -9`` the worker process running it: a poison task."""
    record(ctx, "start", input=spec)
    os.kill(os.getpid(), signal.SIGKILL)


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


async def _run_step(ctx: WorkflowContext, step: dict[str, Any]) -> dict[str, Any]:
    options = dict(step.get("options") or {})
    retry = RetryPolicy.from_dict(step["retry"]) if "retry" in step else None
    try:
        result = await ctx.execute_activity(
            str(step["activity"]),
            step.get("input"),
            retry=retry,
            schedule_to_start_timeout=options.get("schedule_to_start_timeout"),
            start_to_close_timeout=options.get("start_to_close_timeout"),
            heartbeat_timeout=options.get("heartbeat_timeout"),
            breaker_key=options.get("breaker_key"),
        )
    except ActivityError as exc:
        return {
            "ok": False,
            "error_type": exc.error_type,
            "attempt": exc.attempt,
            "message": str(exc),
            "details": exc.details,
        }
    return {"ok": True, "result": result}


@workflow
async def run_steps(ctx: WorkflowContext, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``spec["steps"]`` (each: activity name, input, optional retry policy dict and
    options), one after another or all at once (``parallel``), catching each `ActivityError`;
    return one outcome per step: ``{"ok": True, "result"}`` or ``{"ok": False, "error_type",
    "attempt", "message", "details"}``."""
    steps = list(spec["steps"])
    if spec.get("parallel"):
        outcomes: list[dict[str, Any]] = await ctx.gather(*(_run_step(ctx, s) for s in steps))
        return outcomes
    return [await _run_step(ctx, step) for step in steps]


@workflow
async def fan_out_sleepy(ctx: WorkflowContext, spec: dict[str, Any]) -> list[Any]:
    """Run ``count`` `sleepy` activities at once with ``spec``'s seconds/release; return their
    indexes."""
    template = {k: v for k, v in spec.items() if k != "count"}
    handles = [ctx.start_activity(sleepy, {**template, "i": i}) for i in range(spec["count"])]
    results: list[Any] = await ctx.gather(*handles)
    return results


@workflow
async def slow_countdown(ctx: WorkflowContext, state: dict[str, Any]) -> dict[str, Any]:
    """One slow step a run, then continues as new until ``left`` is 0: a chain of runs."""
    total = state["total"] + await ctx.execute_activity(
        slow_step, {"value": state["left"], "seconds": state["seconds"]}
    )
    if state["left"] == 0:
        return {"total": total}
    ctx.continue_as_new({**state, "left": state["left"] - 1, "total": total})
