"""Workflow code the replay driver must survive: an exception whose ``__str__`` raises ends the
workflow failed (it made the replay itself raise, and the run was left stuck), and a loop that
swallows GeneratorExit with a bare ``except:`` lets the discarding of its replay end (it spun
for ever on the worker's Trio thread). From a review (session 18); each test failed before its
fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

import everruns
from everruns.domain import history as h
from everruns.domain.commands import FailWorkflow
from everruns.domain.context import WorkflowContext, WorkflowInfo
from everruns.domain.history import HistoryEvent
from everruns.domain.replay import replay

_SRC = str(Path(everruns.__file__).resolve().parent.parent)
INFO = WorkflowInfo(workflow_id="wf-review", run_id="run-review", workflow_type="review")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _history(*events: dict[str, Any]) -> list[HistoryEvent]:
    started = h.workflow_started(INFO.workflow_type, INFO.workflow_id, INFO.run_id, None)
    return [HistoryEvent.of(n, data, time=T0) for n, data in enumerate((started, *events), start=1)]


class ReportError(Exception):
    """A user error type whose message is built from an attribute set after construction; when
    the code forgets to set it, ``str()`` itself raises (an AttributeError)."""

    code: str

    def __str__(self) -> str:
        return f"report failed with code {self.code}"


async def raises_an_error_whose_str_fails(ctx: WorkflowContext, _: Any) -> Any:
    await ctx.execute_activity("make_report", 1)
    raise ReportError()  # .code never set


def test_an_exception_whose_str_raises_fails_the_workflow_instead_of_the_replay() -> None:
    """Workflow code that raises is the workflow's failure (`workflow_failed`), with the
    exception's type recorded: replay's contract says so for *any* exception. An exception
    whose ``__str__`` itself raises makes `error_from_exception` raise inside the driver, so
    replay raises that AttributeError instead: the worker reports a (retryable) workflow task
    failure and the run is left stuck, never failed, with an error naming AttributeError
    rather than the user's ReportError."""
    history = _history(
        h.workflow_task_completed("w", T0),
        h.activity_scheduled("1", "make_report", 1, {}),
        h.activity_started("1", 1, "w"),
        h.activity_completed("1", "ok", 1),
    )
    try:
        result = replay(raises_an_error_whose_str_fails, history, info=INFO, now=T0)
    except BaseException as exc:
        raise AssertionError(
            "replay raised "
            f"{type(exc).__name__} ({exc}) out of the driver instead of returning FailWorkflow "
            "for the workflow's ReportError: the run would be left stuck as a workflow task "
            "failure instead of ending failed"
        ) from exc
    assert result.completed
    assert len(result.commands) == 1 and isinstance(result.commands[0], FailWorkflow), (
        f"expected one FailWorkflow, got {result.commands}"
    )
    assert result.commands[0].error["type"].endswith("ReportError"), result.commands[0].error


# A workflow whose retry loop has a bare ``except:``. While it runs it is well behaved (each
# turn waits on a durable timer); the bare except only matters when the driver discards the
# suspended coroutine (end of a replay, worker cache eviction, worker stop, a replay the
# next task cannot continue): it swallows GeneratorExit, and every ctx call it makes then
# raises GeneratorExit again synchronously, without ever yielding, so `coroutine.close()`
# never returns.
_SWALLOWER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from everruns.domain import history as h
    from everruns.domain.context import WorkflowInfo
    from everruns.domain.history import HistoryEvent
    from everruns.domain.replay import Replayer
    from everruns.worker.replays import ReplayCache

    info = WorkflowInfo(workflow_id="wf", run_id="run", workflow_type="poller")
    t0 = datetime(2024, 5, 1, tzinfo=UTC)

    async def poller(ctx, _):
        while True:
            try:
                await ctx.sleep(60)
            except:  # noqa: E722 - sloppy but ordinary workflow code
                pass

    history = [HistoryEvent.of(1, h.workflow_started("poller", "wf", "run", None), time=t0)]
    replayer = Replayer(poller, info=info)
    result = replayer.replay(history, now=t0)
    print("decided", [c.describe() for c in result.commands], flush=True)
    cache = ReplayCache(10)
    cache.keep("run", poller, replayer)  # the worker keeps it for the run's next task
    cache.close()  # the worker stops (or evicts it, or a later task cannot continue it)
    print("closed", flush=True)
    """
)


async def test_a_workflow_that_swallows_generator_exit_does_not_hang_the_worker() -> None:
    """Discarding a suspended workflow must end even when its code catches the driver's
    GeneratorExit and carries on. Today every ctx operation made while closing raises
    GeneratorExit again without yielding, so a loop with a bare ``except:`` spins for ever
    inside `Replayer.close()`: on the worker's Trio thread (replays of short histories run
    inline, `_settle_ahead` and `ReplayCache.keep` close inline) that blocks the worker's event
    loop, its heartbeats and every other task, with no error anywhere."""
    with trio.fail_after(60):
        done: subprocess.CompletedProcess[bytes] | None = None
        with trio.move_on_after(10):
            done = await trio.run_process(
                [sys.executable, "-c", _SWALLOWER],
                env={"PYTHONPATH": _SRC, "PATH": "/usr/bin:/bin"},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        # When the deadline passes, run_process is cancelled and kills the child.
    assert done is not None, (
        "closing the replay of a workflow that swallows GeneratorExit never returned (killed "
        "after 10 s): ReplayCache.close() -> Replayer.close() spins in the workflow's loop, as "
        "every ctx call raises GeneratorExit again without yielding"
    )
    out = done.stdout.decode()
    assert done.returncode == 0 and "closed" in out, (done.returncode, out, done.stderr.decode())


# The same sloppiness through the pure `replay` function, in every shape a ctx operation can
# take while the replay closes: a wait, a signal wait with a timeout, a gather of children that
# swallow too, and a `finally:` that starts more work. Added with the fix (session 18).
_SWALLOWERS = textwrap.dedent(
    """
    from datetime import UTC, datetime
    from everruns.domain import history as h
    from everruns.domain.context import WorkflowInfo
    from everruns.domain.history import HistoryEvent
    from everruns.domain.replay import replay

    info = WorkflowInfo(workflow_id="wf", run_id="run", workflow_type="poller")
    t0 = datetime(2024, 5, 1, tzinfo=UTC)

    async def child(ctx, n):
        while True:
            try:
                await ctx.wait_signal(f"s{n}", timeout=5)
            except:  # noqa: E722
                pass

    async def poller(ctx, _):
        try:
            while True:
                try:
                    await ctx.gather(child(ctx, 1), child(ctx, 2), ctx.sleep(60))
                except:  # noqa: E722
                    pass
        finally:
            while True:
                try:
                    await ctx.gather(child(ctx, 3), ctx.execute_activity("cleanup"))
                except:  # noqa: E722
                    pass

    history = [HistoryEvent.of(1, h.workflow_started("poller", "wf", "run", None), time=t0)]
    result = replay(poller, history, info=info, now=t0)
    print("decided", [c.describe() for c in result.commands], flush=True)
    """
)


async def test_replay_of_workflow_code_that_swallows_generator_exit_returns() -> None:
    """`replay` closes what it ran before it returns; that too must end, and the commands it
    returns are those of the replay, none from the code run while closing."""
    with trio.fail_after(60):
        done: subprocess.CompletedProcess[bytes] | None = None
        with trio.move_on_after(10):
            done = await trio.run_process(
                [sys.executable, "-c", _SWALLOWERS],
                env={"PYTHONPATH": _SRC, "PATH": "/usr/bin:/bin"},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done is not None, "replay() never returned: closing the workflow's coroutines spins"
    out = done.stdout.decode()
    assert done.returncode == 0, (done.returncode, out, done.stderr.decode())
    assert out.splitlines()[0] == (
        "decided ['StartTimer(id=1, seconds=5.0)', 'StartTimer(id=2, seconds=5.0)', "
        "'StartTimer(id=3, seconds=60.0)']"
    ), out
