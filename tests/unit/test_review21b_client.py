"""Review 21b (client/worker/domain/agent side): failing tests for defects in today's fixes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# What the `everruns` console script runs (pyproject: everruns = "everruns.cli:main"): a
# script file, so sys.path[0] is the script's directory, not "" or the current directory.
_SCRIPT = "import sys\nfrom everruns.cli import main\nsys.exit(main())\n"


def _run_in_deleted_cwd(argv: list[str]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as bin_dir:
        script = Path(bin_dir, "everruns")
        script.write_text(_SCRIPT)
        gone = tempfile.mkdtemp()
        env = {**os.environ, "PYTHONPATH": str(SRC), "GRPC_ADDRESS": "127.0.0.1:1"}
        code = (
            "import os, sys, runpy\n"
            f"os.chdir({gone!r}); os.rmdir({gone!r})\n"
            "sys.argv = sys.argv[1:]\n"
            "sys.path[0] = os.path.dirname(sys.argv[0])\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        )
        return subprocess.run(
            [sys.executable, "-c", code, str(script), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


def test_everruns_worker_in_a_deleted_directory_is_not_a_traceback() -> None:
    """Defect: `everruns worker MODULE` started from a directory that has been removed (a
    deploy directory replaced under a running shell) dies with a FileNotFoundError
    traceback from `os.getcwd()` in cli.py `_run_worker` (the new "cwd on sys.path" code),
    before it even reads its module argument. `python -m everruns.worker MODULE` in the same
    directory reports the module problem in one line and exits 2. Expected: `everruns
    worker` behaves as `python -m everruns.worker` does (no traceback; here: the missing
    module named in one line, exit code 2)."""
    done = _run_in_deleted_cwd(["worker", "no_such_module_review21b"])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "no_such_module_review21b" in done.stderr


def test_a_bound_method_registers_as_an_activity_or_is_refused_in_one_line() -> None:
    """Defect: ``everruns.activity(service.send, name="send")`` (an ``async def`` method of an
    object holding its clients, the usual way to give activities dependencies) raises a raw
    ``AttributeError: 'method' object has no attribute '__everruns_definition__'``: the
    decorator (registry.py `activity`, ``setattr(f, DEFINITION_ATTRIBUTE, ...)``) stores its
    definition on the function, which a bound method refuses. Worse, the activity was already
    added to the registry before the setattr failed, so the call that "failed" registered it,
    and the same call again (a bound method is a new object at each access) is AlreadyExists.
    Review 21 made bad decorator arguments one-line errors and taught the registry to await
    async callables (`_is_async_callable`), yet a bound method, which `Registry.add_activity`
    accepts, still escapes as a traceback. Expected: the decorator registers it (and can be
    called again idempotently) or refuses it with InvalidArgument leaving nothing registered."""
    from everruns.domain.registry import Registry, activity
    from everruns.errors import InvalidArgument

    class Mailer:
        async def send(self, ctx: object, to: str) -> str:
            return to

    registry = Registry()
    mailer = Mailer()
    try:
        activity(mailer.send, name="send", registry=registry)
    except InvalidArgument:
        assert registry.get_activity("send") is None, "refused, yet registered"
        return
    except AttributeError as exc:
        raise AssertionError(
            f"a bound method escapes the decorator as {exc!r}; registered anyway: "
            f"{registry.get_activity('send') is not None}"
        ) from exc
    assert registry.activity("send").is_async


def test_a_bad_http_get_switch_does_not_fail_every_agent_turn() -> None:
    """Defect (regression of 24ee030, "EVERRUNS_ENABLE_HTTP_GET is a standard switch"): with
    the variable set to a value the switch does not know (``2``, ``enabled``), every agent
    turn that does not list its tools fails for good in ``process_input``: `prepare_turn`
    lists the default tools with `available_tools`, which calls http_get's ``enabled``
    predicate, `_http_get_enabled` (tools.py), and that now raises NonRetryableError for the
    unknown value. `process_input` catches only InvalidArgument, so the turn ends failed
    whether or not the model would ever fetch a page; `prepare_turn`'s docstring promises
    InvalidArgument only. Before, such a value meant "off" and turns ran with calculator,
    clock and sleep. The predicate's own docstring says a bad value "fails the call for good
    (the model is told)": the http_get call, not the turn. Expected: the turn is prepared
    (the other tools offered; http_get left out, or its call refused when made)."""
    from everruns.agent.activities import prepare_turn

    turn = {"message": {"text": "what is 2+2"}}
    prepared = prepare_turn(turn, env={"EVERRUNS_ENABLE_HTTP_GET": "enabled"})
    assert "calculator" in [tool["name"] for tool in prepared["tools"]]


def test_everruns_worker_honours_pythonsafepath_as_python_m_does(tmp_path: Path) -> None:
    """Defect (24ee030, "everruns worker imports from the current directory as python -m
    does"): cli.py `_run_worker` puts the current directory first on sys.path whenever
    neither "" nor the directory is there, without looking at ``sys.flags.safe_path``. With
    PYTHONSAFEPATH=1 (or ``python -P``), whose purpose is that no potentially unsafe path
    (the current directory) is prepended, `python -m everruns.worker MOD` does not import
    MOD from the current directory, but `everruns worker MOD` does: a module of that name in
    whatever directory the worker is started from (a shared or downloaded one) is run.
    Expected: the two agree; under safe_path the current directory is not added (here: the
    module is not found, exit 2, and its code never runs)."""
    (tmp_path / "rp21b_shadow.py").write_text(
        'import sys\nprint("IMPORTED-FROM-CWD", file=sys.stderr)\nsys.exit(3)\n'
    )  # ends the worker at once (a one-line error, exit 2) if it is ever imported
    script = tmp_path / "bin" / "everruns"
    script.parent.mkdir()
    script.write_text(_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "PYTHONSAFEPATH": "1",
        "GRPC_ADDRESS": "127.0.0.1:1",
    }
    as_module = subprocess.run(
        [sys.executable, "-m", "everruns.worker", "rp21b_shadow"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "IMPORTED-FROM-CWD" not in as_module.stderr  # python -m: not on the path
    assert as_module.returncode == 2, as_module.stderr[-2000:]
    as_script = subprocess.run(
        [sys.executable, str(script), "worker", "rp21b_shadow"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "IMPORTED-FROM-CWD" not in as_script.stderr, (
        "under PYTHONSAFEPATH=1 `everruns worker` imported the module from the current "
        "directory; `python -m everruns.worker` does not"
    )
    assert as_script.returncode == 2, as_script.stderr[-2000:]


def test_a_sleep_of_an_integer_past_a_floats_range_is_an_invalid_argument() -> None:
    """Defect: ``ctx.sleep(10**400)`` (or ``ctx.wait_signal(name, timeout=10**400)``) ends
    the run failed with ``OverflowError: int too large to convert to float``: context.py
    `_check_seconds` calls ``math.isfinite(value)`` on the int before any bound, and that
    conversion overflows. ctx.sleep's docstring promises InvalidArgument for more than
    `MAX_SECONDS` (100 years), and the activity options, retry intervals, worker grace
    period and client timeouts reviewed today all take such an int as "too long" (or as no
    deadline). Expected: the workflow fails with InvalidArgument naming the 100-year bound."""
    from everruns.domain.commands import FailWorkflow
    from everruns.domain.context import WorkflowContext
    from tests.unit.test_replay import Sim

    async def wf(ctx: WorkflowContext, _: object) -> None:
        await ctx.sleep(10**400)

    (command,) = Sim(wf).step()
    assert isinstance(command, FailWorkflow)
    assert command.error["type"].endswith("InvalidArgument"), command.error
