"""The per-test timeout that stops a hung test before CI's own time limit does.

Every test that does I/O has an absolute ``trio.fail_after``; a shielded scope that never ends
escapes it (session 17's CI run hung that way for over an hour). pytest-timeout's thread method
is the net under that: these tests prove it is configured and that it ends a Trio test stuck in
a shielded scope.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

HUNG_TEST = """
import pytest
import trio


@pytest.mark.trio
async def test_hangs_in_a_shielded_scope():
    with trio.CancelScope(shield=True):
        await trio.sleep_forever()
"""


def test_the_suite_runs_under_a_per_test_timeout(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert pytestconfig.getini("timeout") == "600"
    assert pytestconfig.getini("timeout_method") == "thread"


def test_a_trio_test_hung_in_a_shielded_scope_is_stopped(tmp_path: Path) -> None:
    (tmp_path / "test_hung.py").write_text(HUNG_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 2\ntimeout_method = thread\n")
    began = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_hung.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - began
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "Timeout" in out, out
    assert "Stack of MainThread" in out, out  # where each thread was is printed
    assert took < 60, took
