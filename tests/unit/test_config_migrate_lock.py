"""EVERRUNS_MIGRATE_LOCK_TIMEOUT: how long a migration waits for a lock before it is rolled back
and tried again. Before it, a migration waited as long as it took: behind an operator's open
transaction, for ever, holding the advisory lock every other control plane waits on."""

from __future__ import annotations

import pytest

from everruns.errors import ConfigError
from everruns.server.config import ServerConfig

NAME = "EVERRUNS_MIGRATE_LOCK_TIMEOUT"


def test_a_migration_waits_five_seconds_for_a_lock_by_default() -> None:
    assert ServerConfig.from_env({}).migrate_lock_timeout == 5.0
    assert ServerConfig.from_env({NAME: ""}).migrate_lock_timeout == 5.0
    assert ServerConfig().migrate_lock_timeout == 5.0


def test_the_lock_timeout_is_read_in_seconds_and_zero_means_no_limit() -> None:
    assert ServerConfig.from_env({NAME: "0.25"}).migrate_lock_timeout == 0.25
    assert ServerConfig.from_env({NAME: "30"}).migrate_lock_timeout == 30.0
    assert ServerConfig.from_env({NAME: "0"}).migrate_lock_timeout is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("soon", "is not a number"),
        ("5s", "is not a number"),
        ("-1", "must be at least 0"),
        ("nan", "must be at least 0"),
        ("inf", "must be at most"),
        ("1e300", "must be at most"),
    ],
)
def test_a_bad_lock_timeout_is_one_line_naming_the_variable(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_env({NAME: value})
    message = str(info.value)
    assert message.startswith(f"{NAME}={value!r}") and problem in message, message
    assert "\n" not in message
