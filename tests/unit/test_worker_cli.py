"""`python -m everruns.worker`: argument and environment mistakes give one line and exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from everruns.errors import ConfigError
from everruns.worker import __main__ as cli


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in ("GRPC_ADDRESS", "EVERRUNS_TLS_CA", "EVERRUNS_TLS "))


def test_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--frobnicate"]) == 2
    assert "--frobnicate" in capsys.readouterr().err


def test_bad_environment_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_TASKS", "lots")
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "MAX_CONCURRENT_TASKS" in err
    assert err.count("\n") == 1


def test_module_that_does_not_import_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MAX_CONCURRENT_TASKS", raising=False)
    assert cli.main(["everruns_no_such_module_for_tests"]) == 2
    err = capsys.readouterr().err
    assert "everruns_no_such_module_for_tests" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_module_raising_on_import_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "everruns_test_broken_module.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="RuntimeError: no config"):
        cli.import_modules(["everruns_test_broken_module"])


def test_default_module_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, cli.DEFAULT_MODULE, None)  # type: ignore[arg-type]
    # `None` in sys.modules makes the import fail with ModuleNotFoundError for that very name.
    cli.import_modules([])


def test_default_module_with_a_broken_dependency_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_import(name: str) -> None:
        raise ModuleNotFoundError("No module named 'openai'", name="openai")

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with pytest.raises(ConfigError, match="openai"):
        cli.import_modules([])


def _capture_worker(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make main() build the worker but not run it; return where the workers built go."""
    built: list[Any] = []

    def fake_run_program(program: str, fn: Any, worker: Any) -> int:
        built.append(worker)
        return 0

    monkeypatch.setattr(cli, "run_program", fake_run_program)
    for name in ("MAX_CONCURRENT_TASKS", "EVERRUNS_TLS_CA", "EVERRUNS_TLS", "GRPC_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, cli.DEFAULT_MODULE, None)  # type: ignore[arg-type]
    return built


def test_tls_is_used_when_the_environment_asks_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """EVERRUNS_TLS=1 (docs/operations.md): the worker process connects with TLS."""
    built = _capture_worker(monkeypatch)
    monkeypatch.setenv("EVERRUNS_TLS", "1")
    assert cli.main([]) == 0
    (worker,) = built
    assert worker._tls is not None


def test_an_unusable_tls_ca_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """EVERRUNS_TLS_CA naming no readable certificate file: one line naming it, exit 2."""
    built = _capture_worker(monkeypatch)
    monkeypatch.setenv("EVERRUNS_TLS_CA", "/nonexistent/ca.pem")
    assert cli.main([]) == 2 and not built
    err = capsys.readouterr().err
    assert "EVERRUNS_TLS_CA" in err and err.count("\n") == 1


def test_module_exiting_on_import_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A module that calls sys.exit while imported (a script, say) stopped the worker with exit
    0 and no word; it is a one-line configuration error."""
    (tmp_path / "everruns_test_exiting_module.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"called sys\.exit\(0\)"):
        cli.import_modules(["everruns_test_exiting_module"])
