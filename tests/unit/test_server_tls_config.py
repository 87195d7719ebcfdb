"""The control plane's TLS certificate and key are checked with the rest of its configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from everruns.errors import ConfigError
from everruns.server.config import ServerConfig


def test_tls_files_that_cannot_be_loaded_are_a_config_error(tmp_path: Path) -> None:
    """A certificate and key that are files but not PEM are refused in one line naming both
    variables. They passed the check of their existence before, and `python -m
    everruns.server` ended with an ssl.SSLError traceback when it began to serve."""
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage\n")
    with pytest.raises(ConfigError, match=r"EVERRUNS_TLS_CERT=.*EVERRUNS_TLS_KEY=") as caught:
        ServerConfig.from_env({"EVERRUNS_TLS_CERT": str(bad), "EVERRUNS_TLS_KEY": str(bad)})
    assert "\n" not in str(caught.value)
