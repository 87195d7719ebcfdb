"""`run_program`, the entry point of the server, the worker and the demo: exit codes, and the
garbage collector set up for a long-running engine process."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from everruns._program import run_program
from everruns.errors import ConfigError, NotFound


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_a_program_runs_with_its_startup_heap_frozen_and_fewer_collections(
    restore_gc: None,
) -> None:
    seen: dict[str, Any] = {}

    async def program() -> None:
        await trio.lowlevel.checkpoint()
        seen["frozen"] = gc.get_freeze_count()
        seen["thresholds"] = gc.get_threshold()

    assert run_program("test", program) == 0
    assert seen["frozen"] > 1000  # the modules and objects alive at start
    assert seen["thresholds"][0] >= 10_000


def test_everruns_errors_become_one_line_and_an_exit_code(
    restore_gc: None, capsys: pytest.CaptureFixture[str]
) -> None:
    async def bad_config() -> None:
        raise ConfigError("GRPC_ADDRESS must be host:port")

    async def missing() -> None:
        raise NotFound("workflow 'x' not found")

    assert run_program("everruns-server", bad_config) == 2
    assert run_program("everruns-worker", missing) == 1
    assert capsys.readouterr().err.splitlines() == [
        "everruns-server: GRPC_ADDRESS must be host:port",
        "everruns-worker: workflow 'x' not found",
    ]
