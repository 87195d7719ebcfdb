"""Review of the user-facing docs (session 21): README.md, docs/operations.md and the `everruns`
command's own help, each claim checked against what the code does.

Each test fails against the code it was written for and says why in its docstring, quoting
the doc line it checks. Every test with I/O runs under an absolute `trio.fail_after`, and every
process it starts is stopped (and reaped) even when it fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from everruns.agent import register, send_message
from everruns.domain.registry import Registry
from tests.e2e.harness import REPO_ROOT, free_port, open_cluster
from tests.integration.agent_harness import serve_agent

pytestmark = pytest.mark.db

README = REPO_ROOT / "README.md"
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _write_readme_shop(root: Path) -> None:
    """README "Writing durable code": the first python block, "Saved as `shop/workflows.py`
    (with an empty `shop/__init__.py`)"."""
    code = _PYTHON_BLOCK.findall(README.read_text())[0]
    assert "async def checkout" in code, code
    (root / "shop").mkdir()
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "workflows.py").write_text(code)


@asynccontextmanager
async def _process(
    argv: Sequence[str], *, cwd: Path, env: dict[str, str]
) -> AsyncIterator[tuple[trio.Process, list[str]]]:
    """Run ``argv`` with its output (merged) collected line by line; stopped and reaped on the
    way out, whatever happened."""
    lines: list[str] = []
    process = await trio.lowlevel.open_process(
        list(argv),
        cwd=str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                assert process.stdout is not None
                buffer = b""
                async for chunk in process.stdout:
                    buffer += chunk
                    *done, buffer = buffer.split(b"\n")
                    lines.extend(line.decode(errors="replace") for line in done)
                if buffer:
                    lines.append(buffer.decode(errors="replace"))

            nursery.start_soon(pump)
            try:
                yield process, lines
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                try:
                    os.killpg(process.pid, 9)
                except ProcessLookupError:
                    pass
            with trio.move_on_after(10):
                await process.wait()


async def _until_serving_or_exit(process: trio.Process, lines: list[str]) -> bool:
    """Wait for the worker's ready line (True) or its exit (False)."""
    while True:
        if any(" serving " in line for line in lines):
            return True
        if process.returncode is not None or process.poll() is not None:
            await trio.sleep(0.2)  # let the pump read its last words
            return any(" serving " in line for line in lines)
        await trio.sleep(0.05)


async def test_everruns_worker_imports_modules_from_the_current_directory_as_python_m_does(
    tmp_path: Path,
) -> None:
    """`everruns --help`: "worker  run a worker serving the workflows and activities of MODULEs
    (same as `python -m everruns.worker`)"; README.md:33: "Saved as `shop/workflows.py` (with
    an empty `shop/__init__.py`), run from the directory that holds `shop`:
    python -m everruns.worker shop.workflows".

    From that directory `python -m everruns.worker shop.workflows` serves the module (`-m` puts
    the current directory on sys.path), but the installed `everruns worker shop.workflows`
    exits 2: "cannot import module 'shop.workflows': ModuleNotFoundError: No module named
    'shop'" — a console script's sys.path[0] is its bin directory. Not the same."""
    _write_readme_shop(tmp_path)
    script = Path(sys.executable).parent / "everruns"
    assert script.exists(), f"no console script at {script}"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WORKER_ID")}
    # The interpreter finds everruns as the test run does, but nothing of the current directory.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != "."
    )
    env.update(
        GRPC_ADDRESS=f"127.0.0.1:{free_port()}",  # nothing listens: the ready line comes first
        EVERRUNS_WORKER_GRACE_PERIOD="0",
        PYTHONUNBUFFERED="1",
    )
    with trio.fail_after(60):
        # The documented form works from that directory (the control for this test).
        async with _process(
            [sys.executable, "-m", "everruns.worker", "shop.workflows"], cwd=tmp_path, env=env
        ) as (process, lines):
            assert await _until_serving_or_exit(process, lines), "\n".join(lines)
        async with _process([str(script), "worker", "shop.workflows"], cwd=tmp_path, env=env) as (
            process,
            lines,
        ):
            served = await _until_serving_or_exit(process, lines)
        assert served, (
            "`everruns worker shop.workflows` run from the directory holding `shop` did not "
            f"serve it (exit {process.returncode}):\n" + "\n".join(lines)
        )


@pytest.mark.e2e
async def test_readme_checkout_show_tells_it_is_asleep_on_its_timer(
    database_url: str, tmp_path: Path
) -> None:
    """README.md:38: "everruns workflow show order-7                 # charged; asleep on its
    one-hour timer".

    The README's own example, run as written (its `shop/workflows.py`, `python -m
    everruns.worker shop.workflows`, `everruns workflow start checkout --input '{"id": 7}'
    --id order-7`): once `charge` completed and the run started its 3600 s timer, `everruns
    workflow show order-7` prints only `status running`, its input and no pending activity —
    nothing says it was charged or that it sleeps on a timer (nor until when); only
    `workflow history` shows `timer_started`. The JSON form has no timer field either."""
    _write_readme_shop(tmp_path)
    pythonpath = os.pathsep.join(
        p for p in (str(tmp_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    with trio.fail_after(120):
        async with open_cluster(database_url, tmp_path / "logs") as cluster:
            await cluster.start_server()
            await cluster.start_worker(
                "readme-shop", modules=("shop.workflows",), env_extra={"PYTHONPATH": pythonpath}
            )
            started = await cluster.cli(
                "workflow", "start", "checkout", "--input", '{"id": 7}', "--id", "order-7"
            )
            assert started.code == 0, started.describe()
            while True:  # charged, and asleep on its timer
                history = await cluster.cli("--json", "workflow", "history", "order-7")
                types = [e["type"] for e in history.json()["events"]]
                if "timer_started" in types:
                    break
                await trio.sleep(0.1)
            assert "activity_completed" in types, types
            shown = await cluster.cli("workflow", "show", "order-7")
            assert shown.code == 0, shown.describe()
            as_json = await cluster.cli("--json", "workflow", "show", "order-7")
            text = shown.stdout.lower() + json.dumps(as_json.json()).lower()
            assert "timer" in text or "sleep" in text, (
                "`everruns workflow show order-7` does not say the run is asleep on its "
                f"one-hour timer:\n{shown.stdout}\n{as_json.stdout}"
            )


async def test_a_turn_carries_the_sessions_latest_10_turns_as_documented(
    database_url: str,
) -> None:
    """README.md: "A turn carries the session's latest 10 turns, up to about 1 MB of JSON".

    (The review found the 10-turn cap, `MAX_CONTEXT_TURNS`, in no doc: the README gave only
    the 1 MB bound. The README now says it; this holds the code to it.)"""
    with trio.fail_after(120):
        async with serve_agent(database_url, register(Registry())) as client:
            for n in range(1, 12):
                turn = await send_message(client, "docs-ctx", f"what is {n} + {n}?")
                await turn.result(timeout=30)
            last = await send_message(client, "docs-ctx", "what is 12 + 12?")
            await last.result(timeout=30)
            context = (await last.describe()).input["context"]
    users = [m["content"] for m in context if m.get("role") == "user"]
    assert users == [f"what is {n} + {n}?" for n in range(2, 12)], users
    readme = (REPO_ROOT / "README.md").read_text()
    assert "latest 10 turns" in " ".join(readme.split())
