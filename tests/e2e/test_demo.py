"""`scripts/demo`'s program end to end: real PostgreSQL, control plane and two workers; three
messages (tools, plain, cancelled mid-tool); runbook SQL; everything stopped; under 60 s."""

from __future__ import annotations

import os
import sys
import time

import pytest
import trio

pytestmark = pytest.mark.db


async def test_demo_runs_every_step_and_stops_cleanly(pg_server_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_ADDRESS", "WORKER_ID")}
    env["DATABASE_URL"] = pg_server_url
    started = time.monotonic()
    with trio.fail_after(90):
        done = await trio.run_process(
            [sys.executable, "-m", "everruns.demo"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    elapsed = time.monotonic() - started
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, output
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"
    for needle in (
        "starting the control plane",
        "starting worker demo-worker-1",
        "starting worker demo-worker-2",
        "math      step 1: calling tool calculator",
        "math      Here is what I found: (17 + 25) * 2 = 84.",
        "greeting  Hello!",
        "cancelled turn cancelled",
        "-- workflows still pending or running",
        "-- active workers",
        "demo-worker-1  active",
        "control plane stopped (exit code 0)",
    ):
        assert needle in output, f"{needle!r} missing from:\n{output}"
    assert "Traceback" not in output
