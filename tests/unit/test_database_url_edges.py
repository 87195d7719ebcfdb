"""DATABASE_URL forms that must still be refused, with a one-line ConfigError."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from everruns._aio import pg
from everruns.errors import ConfigError, DatabaseError
from everruns.server.config import validate_database_url


def test_database_url_with_a_malformed_ipv6_host_is_a_config_error() -> None:
    """validate_database_url moved urlsplit(url) out of its try: a malformed bracketed host
    (a typo'd IPv6 address) now escapes as a bare ValueError (a traceback at start) instead of
    ConfigError naming DATABASE_URL, as b42c4d7 gave."""
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        validate_database_url("postgresql://user@[::1/everruns")


def test_database_url_missing_its_slashes_is_still_refused() -> None:
    """A URL whose '//' was forgotten names no host: urlsplit reads 'localhost:5432/everruns' as
    the path. b42c4d7 refused it ("names no host"); the host-less form the fix meant to accept
    is 'postgresql:///db' (a netloc that is empty), but now any URL without a netloc passes, and
    the server connects to the local socket with database 'localhost:5432/everruns'."""
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        validate_database_url("postgresql:localhost:5432/everruns")


def test_libpq_connect_timeout_is_accepted_and_taken_out_of_the_url() -> None:
    """`?connect_timeout=10` is libpq's (psql takes it); asyncpg would send it to the server
    as a setting, so it becomes the connect timeout instead (as in libpq, 1 counts as 2, and
    0 means no limit of its own)."""
    url = "postgresql://u:secret@db:5432/everruns?connect_timeout=10&application_name=cp"
    assert validate_database_url(url) == url
    assert pg.split_connect_timeout(url) == (
        "postgresql://u:secret@db:5432/everruns?application_name=cp",
        10.0,
    )
    assert pg.split_connect_timeout("postgresql:///x?connect_timeout=1")[1] == 2.0
    assert pg.split_connect_timeout("postgresql:///x?connect_timeout=0") == (
        "postgresql:///x",
        None,
    )
    assert pg.split_connect_timeout("postgresql:///x?sslmode=require") == (
        "postgresql:///x?sslmode=require",
        None,
    )


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("keepalives=1&keepalives_idle=30", "keepalives, keepalives_idle"),
        ("tcp_user_timeout=1000", "tcp_user_timeout"),
        ("connect_timeout=ten", "connect_timeout='ten'"),
        ("password", "name=value"),
    ],
)
def test_libpq_parameters_the_control_plane_cannot_use_are_refused_in_one_line(
    query: str, named: str
) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL") as caught:
        validate_database_url(f"postgresql://u:secret@db/everruns?{query}")
    message = str(caught.value)
    assert named in message and "\n" not in message and "secret" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:Sup3r/Secret@db.example:5432/everruns?user=a@b",
        "postgresql://app:hunter2#x@db.example:5432/everruns",
        "postgresql://app:5432?Secret@db.example:5432/everruns?sslmode=require",
    ],
)
def test_an_at_sign_in_the_path_or_fragment_is_still_a_password_to_encode(url: str) -> None:
    """An '@' is accepted in a query value (?user=admin@corp); one in the path, a parameter's
    name or the fragment is the end of a password holding an unescaped '/', '?' or '#',
    refused without quoting it."""
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        validate_database_url(url)
    assert "Secret" not in str(caught.value) and "hunter2" not in str(caught.value)


def test_tls_files_named_by_the_url_or_pgssl_variables_must_be_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS file that cannot be read is named at once (asyncpg's FileNotFoundError names no
    file, and a missing sslkey without sslcert would not be noticed at all)."""
    for variable in ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL"):
        monkeypatch.delenv(variable, raising=False)
    readable = tmp_path / "ca.pem"
    readable.write_text("not checked here\n")
    missing = tmp_path / "missing" / "client.key"
    base = "postgresql://db/everruns"
    pg.check_tls_files(f"{base}?sslmode=verify-full&sslrootcert={readable}")
    pg.check_tls_files(f"{base}?sslmode=disable&sslkey={missing}")  # no TLS: never read
    with pytest.raises(DatabaseError) as caught:
        pg.check_tls_files(f"{base}?sslmode=require&sslrootcert={readable}&sslkey={missing}")
    message = str(caught.value)
    assert f"DATABASE_URL's sslkey file {missing} cannot be read" in message, message
    assert "\n" not in message
    with pytest.raises(DatabaseError, match=re.escape(f"sslcert file {tmp_path} cannot")):
        pg.check_tls_files(f"{base}?sslcert={tmp_path}")  # a directory
    monkeypatch.setenv("PGSSLROOTCERT", str(missing))
    with pytest.raises(DatabaseError, match=re.escape(f"PGSSLROOTCERT file {missing} cannot")):
        pg.check_tls_files(f"{base}?sslmode=verify-ca")
    pg.check_tls_files(f"{base}?sslmode=verify-ca&sslrootcert={readable}")  # the URL's first
    # Below verify-ca the root certificate is never read: a stale one stops nothing.
    pg.check_tls_files(base)
    pg.check_tls_files(f"{base}?sslmode=require")
