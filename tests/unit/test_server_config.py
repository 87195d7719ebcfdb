"""Control-plane configuration from the environment: validation and one-line errors."""

from __future__ import annotations

import pytest

from everruns.domain.limits import MAX_SECONDS
from everruns.errors import ConfigError
from everruns.server.config import ServerConfig

# Every duration setting, with the ServerConfig field it sets.
DURATIONS = {
    "EVERRUNS_DB_CONNECT_TIMEOUT": "db_connect_timeout",
    "EVERRUNS_STALE_AFTER": "stale_after",  # the reclaimer's make_interval
    "EVERRUNS_RECLAIM_INTERVAL": "reclaim_interval",
    "EVERRUNS_WORKER_LOST_AFTER": "worker_lost_after",  # mark_lost_workers' make_interval
    "EVERRUNS_SCHEDULE_TO_START_TIMEOUT": "schedule_to_start_timeout",  # every activity insert
    "EVERRUNS_START_TO_CLOSE_TIMEOUT": "start_to_close_timeout",
    "EVERRUNS_RETENTION_INTERVAL": "retention_interval",
}


@pytest.mark.parametrize("name", [*DURATIONS, "EVERRUNS_RETENTION_DAYS"])
@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "-inf"])
def test_durations_postgres_cannot_hold_are_refused_at_start(name: str, value: str) -> None:
    """A duration must be a number of at most 100 years: accepted, an infinite or huge one
    would make every duty round (or every workflow task scheduling an activity) fail in
    PostgreSQL with "interval out of range"."""
    with pytest.raises(ConfigError, match=name) as info:
        ServerConfig.from_env({name: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", DURATIONS)
def test_durations_of_up_to_100_years_are_accepted(name: str) -> None:
    config = ServerConfig.from_env({name: repr(MAX_SECONDS)})
    assert getattr(config, DURATIONS[name]) == MAX_SECONDS
    with pytest.raises(ConfigError, match=rf"{name}=.* must be at most 3155760000 seconds"):
        ServerConfig.from_env({name: repr(MAX_SECONDS + 1)})


def test_retention_is_counted_in_days_up_to_100_years() -> None:
    config = ServerConfig.from_env({"EVERRUNS_RETENTION_DAYS": "36525"})
    assert config.retention_seconds == MAX_SECONDS
    with pytest.raises(ConfigError, match=r"EVERRUNS_RETENTION_DAYS=.* at most 36525 days"):
        ServerConfig.from_env({"EVERRUNS_RETENTION_DAYS": "36526"})
