"""DATABASE_URL forms that must still be refused, with a one-line ConfigError."""

from __future__ import annotations

import pytest

from everruns.errors import ConfigError
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
