"""`python -m everruns.worker`: argument and environment mistakes give one line and exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from everruns.errors import ConfigError
from everruns.worker import __main__ as cli


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "GRPC_ADDRESS" in capsys.readouterr().out


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
