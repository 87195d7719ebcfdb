"""Review 21, start-up and configuration: DATABASE_URL forms that are valid libpq URLs but are
refused at start."""

from __future__ import annotations

import pytest

from everruns.server.config import ServerConfig, validate_database_url


@pytest.mark.parametrize(
    "url",
    [
        # The user name in the query, as Azure and Kerberos-style names need (user@server).
        "postgresql://db.example.com:5432/everruns?user=admin@corp&sslmode=require",
        # The Unix-socket form with the role in the query.
        "postgresql:///everruns?host=/var/run/postgresql&user=svc@corp",
        # A server setting whose value holds an '@'.
        "postgresql://127.0.0.1:5432/everruns?application_name=worker@eu-1",
    ],
)
def test_an_at_sign_in_a_query_value_is_not_taken_for_a_broken_host(url: str) -> None:
    """Defect: validate_database_url assumes that any '@' after the scheme belongs to the
    user-info part; when the URL has no user-info and the '@' is in a query value
    (``?user=admin@corp``, ``application_name=a@b``), it is refused with "its host or port
    cannot be read", exit 2, although libpq and asyncpg both read the URL fine (libpq looks
    for '@' only before the first '/').

    Expected: the URL is accepted unchanged (by validate_database_url and ServerConfig)."""
    assert validate_database_url(url) == url
    assert ServerConfig.from_env({"DATABASE_URL": url}).database_url == url
