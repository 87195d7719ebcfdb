"""A ServerConfig made in Python (the control plane embedded in an app) is checked as the
environment is: a bad field is a one-line ConfigError naming it and its variable, and 0 turns
an optional limit off as the variable's 0 does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.limits import MAX_SECONDS
from everruns.errors import ConfigError
from everruns.server.config import ServerConfig
from everruns.store.migrate import _lock_timeout_ms

# field -> (its variable, the smallest value it takes)
SECONDS = {
    "db_connect_timeout": ("EVERRUNS_DB_CONNECT_TIMEOUT", 0.0),
    "stale_after": ("EVERRUNS_STALE_AFTER", None),
    "reclaim_interval": ("EVERRUNS_RECLAIM_INTERVAL", None),
    "worker_lost_after": ("EVERRUNS_WORKER_LOST_AFTER", None),
    "retention_seconds": ("EVERRUNS_RETENTION_DAYS", 0.0),
    "retention_interval": ("EVERRUNS_RETENTION_INTERVAL", None),
}
OPTIONAL_SECONDS = {
    "schedule_to_start_timeout": "EVERRUNS_SCHEDULE_TO_START_TIMEOUT",
    "start_to_close_timeout": "EVERRUNS_START_TO_CLOSE_TIMEOUT",
    "migrate_lock_timeout": "EVERRUNS_MIGRATE_LOCK_TIMEOUT",
}
COUNTS = {
    "max_pending_tasks": ("EVERRUNS_MAX_PENDING_TASKS", 0),
    "max_payload_bytes": ("EVERRUNS_MAX_PAYLOAD_BYTES", 1024),
    "pool_size": ("EVERRUNS_DB_POOL_SIZE", 2),
}
NOT_NUMBERS: list[Any] = ["30", None, True, [1], float("nan"), float("inf"), -float("inf")]


def refused(field: str, value: Any, *words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig(**{field: value})
    message = str(caught.value)
    assert "\n" not in message
    for word in (field, *words):
        assert word in message, (word, message)


@pytest.mark.parametrize("field", [*SECONDS, *OPTIONAL_SECONDS])
@pytest.mark.parametrize("value", [*NOT_NUMBERS, -1, -0.5, MAX_SECONDS * 2])
def test_a_bad_duration_is_refused_naming_field_and_variable(field: str, value: Any) -> None:
    """Before, `ServerConfig(stale_after=-1)` was taken, and the reclaim round's stale rule
    (heartbeat older than now() minus -1 s) then matched every claimed task."""
    if value is None and field in OPTIONAL_SECONDS:
        return  # None: no limit
    variable = SECONDS[field][0] if field in SECONDS else OPTIONAL_SECONDS[field]
    refused(field, value, variable)


@pytest.mark.parametrize("field", [name for name, (_, low) in SECONDS.items() if low is None])
def test_an_interval_of_zero_is_refused(field: str) -> None:
    refused(field, 0, SECONDS[field][0])


@pytest.mark.parametrize("field", [name for name, (_, low) in SECONDS.items() if low == 0.0])
def test_zero_is_taken_where_the_variable_takes_it(field: str) -> None:
    assert getattr(ServerConfig(**{field: 0}), field) == 0


@pytest.mark.parametrize("field", OPTIONAL_SECONDS)
def test_zero_turns_an_optional_limit_off(field: str) -> None:
    """`ServerConfig(schedule_to_start_timeout=0)` used to put 0 s on every activity, which
    the table's CHECK refuses (every decision scheduling one failed), and
    `migrate_lock_timeout=0` meant a 1 ms lock timeout, where the variable's 0 means none."""
    assert getattr(ServerConfig(**{field: 0}), field) is None
    assert getattr(ServerConfig(**{field: 0.0}), field) is None
    assert getattr(ServerConfig(**{field: None}), field) is None


@given(
    field=st.sampled_from([*SECONDS, *OPTIONAL_SECONDS]),
    value=st.floats(min_value=0.001, max_value=MAX_SECONDS),
)
def test_every_duration_up_to_100_years_is_taken(field: str, value: float) -> None:
    assert getattr(ServerConfig(**{field: value}), field) == value


@pytest.mark.parametrize("field", COUNTS)
def test_a_bad_count_is_refused(field: str) -> None:
    variable, low = COUNTS[field]
    for value in (low - 1, 2.5, "10", None, True):
        refused(field, value, variable)
    assert getattr(ServerConfig(**{field: low}), field) == low


@pytest.mark.parametrize("value", [-1, 65536, "9001", 1.5, True])
def test_a_bad_port_is_refused(value: Any) -> None:
    refused("grpc_port", value, "GRPC_ADDRESS")


@pytest.mark.parametrize("value", ["", " host", 1, None, "a\x00b"])
def test_a_bad_host_is_refused(value: Any) -> None:
    refused("grpc_host", value, "GRPC_ADDRESS")


def test_the_database_url_and_token_are_checked_as_their_variables_are() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL is invalid"):
        ServerConfig(database_url="mysql://localhost/x")
    refused("database_url", 5, "DATABASE_URL")
    refused("auth_token", "secret\n", "EVERRUNS_AUTH_TOKEN")
    config = ServerConfig(database_url="postgresql://u@localhost:5432/db", auth_token="t0k")
    assert config.database_url == "postgresql://u@localhost:5432/db"


def test_tls_files_go_together_and_must_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage\n")
    refused("tls_cert", str(bad), "tls_key", "EVERRUNS_TLS_KEY")
    with pytest.raises(ConfigError, match=r"EVERRUNS_TLS_CERT=.*ServerConfig.tls_cert") as caught:
        ServerConfig(tls_cert=str(bad), tls_key=str(bad))
    assert "\n" not in str(caught.value)
    refused("data_dir", 7)


def test_the_environment_still_gives_what_it_gave() -> None:
    assert ServerConfig.from_env({}) == ServerConfig()
    config = ServerConfig.from_env(
        {"EVERRUNS_MIGRATE_LOCK_TIMEOUT": "0", "EVERRUNS_SCHEDULE_TO_START_TIMEOUT": "0"}
    )
    assert config.migrate_lock_timeout is None
    assert config.schedule_to_start_timeout is None


def test_a_lock_timeout_of_zero_waits_as_long_as_it_takes() -> None:
    """PostgreSQL's own `lock_timeout = 0` is no limit; apply_migrations(lock_timeout=0) meant
    1 ms before."""
    assert _lock_timeout_ms(0) == "0"
    assert _lock_timeout_ms(None) == "0"
    assert _lock_timeout_ms(0.0004) == "1ms"
    assert _lock_timeout_ms(5) == "5000ms"
