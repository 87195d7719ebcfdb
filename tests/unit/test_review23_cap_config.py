"""Review 23 (config checks, dfef042): a ServerConfig made in Python that worked before is refused.

``data_dir``, ``tls_cert`` and ``tls_key`` given as `pathlib.Path` (the natural way to name a
file in Python) were taken before dfef042 (``os.path.expanduser`` turned the data directory
into text; ``load_cert_chain`` and the embedded PostgreSQL take paths). Now `_check_path`
refuses them, with a message that contradicts itself ("must be a path or None, not
PosixPath(...)"). No I/O beyond writing two PEM files to a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import trustme

from everruns.server.config import ServerConfig


def test_review23_cap_a_data_dir_given_as_a_path_is_taken() -> None:
    config = ServerConfig(data_dir=Path("~/everruns-review23-pg"))  # type: ignore[arg-type]
    assert os.fspath(config.data_dir or "") == os.path.expanduser("~/everruns-review23-pg")


def test_review23_cap_tls_files_given_as_paths_are_taken(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    config = ServerConfig(tls_cert=cert_file, tls_key=key_file)  # type: ignore[arg-type]
    assert os.fspath(config.tls_cert or "") == str(cert_file)
