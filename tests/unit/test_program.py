"""`run_program`, the entry point of the server, the worker and the demo: an everruns error is
one line on stderr and an exit code."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from everruns._program import SWITCH_INTERVAL, run_program
from everruns.errors import ConfigError, NotFound


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    # run_program freezes what is alive when it starts: here, the test session's objects.
    yield
    gc.unfreeze()


def test_what_is_alive_at_start_is_frozen() -> None:
    counts: list[int] = []

    async def main() -> None:
        counts.append(gc.get_freeze_count())

    gc.unfreeze()
    assert run_program("everruns-worker", main) == 0
    assert counts[0] > 1000  # this process's modules, classes and functions at least


def test_everruns_errors_become_one_line_and_an_exit_code(
    capsys: pytest.CaptureFixture[str],
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


def test_everruns_programs_hand_the_gil_over_sooner_than_pythons_default() -> None:
    seen: list[float] = []

    async def program() -> None:
        seen.append(sys.getswitchinterval())

    before = sys.getswitchinterval()
    try:
        assert run_program("everruns-worker", program) == 0
    finally:
        sys.setswitchinterval(before)
    assert seen == [SWITCH_INTERVAL] and SWITCH_INTERVAL < 0.005
