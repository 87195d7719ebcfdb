"""Review 21, start-up and configuration against a real PostgreSQL: DATABASE_URL settings that
no retry can fix must stop the control plane at once, in one line that names the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.e2e.harness import run_server_command

pytestmark = pytest.mark.db


@pytest.mark.parametrize(
    ("mode", "param"),
    [("verify-full", "sslrootcert"), ("require", "sslcert"), ("require", "sslkey")],
)
async def test_a_missing_tls_file_in_database_url_fails_at_once_naming_the_file(
    pg_server_url: str, tmp_path: Path, mode: str, param: str
) -> None:
    """Defect: a TLS file named in DATABASE_URL that does not exist
    (``?sslmode=verify-full&sslrootcert=/missing/ca.pem``, a typo'd path or a secret that was
    not mounted) makes asyncpg raise FileNotFoundError before any connection is attempted.
    `pg._temporary` counts every OSError as a passing network failure, so the control plane
    retries it for the whole EVERRUNS_DB_CONNECT_TIMEOUT, then reports "PostgreSQL did not
    accept a connection ... ([Errno 2] No such file or directory); check that it is running":
    the wrong diagnosis, late, and without the file's name.

    Expected (docs/operations.md: "a refusal that retrying cannot change ... stops it at
    once"): a non-zero exit within a few seconds, naming the missing file, not blaming an
    unreachable server."""
    missing = tmp_path / "not-mounted" / "ca.pem"
    url = f"{pg_server_url}?sslmode={mode}&{param}={missing}"
    with trio.fail_after(40):
        began = trio.current_time()
        code, output = await run_server_command(
            ["migrate"], {"DATABASE_URL": url, "EVERRUNS_DB_CONNECT_TIMEOUT": "10"}, timeout=35
        )
        elapsed = trio.current_time() - began
    assert code != 0, output
    assert "Traceback" not in output, output
    assert elapsed < 6, (
        f"a missing {param} file was retried as if PostgreSQL were unreachable "
        f"(exit {code} after {elapsed:.1f} s); output:\n{output}"
    )
    assert str(missing) in output and "did not accept a connection" not in output, output
