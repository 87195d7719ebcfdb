"""Worker configuration from the environment: defaults, validation, one-line errors."""

from __future__ import annotations

import os

import pytest

from everruns._aio.grpc import client_tls_from_env
from everruns.domain.address import call_stream_from_env
from everruns.domain.limits import MAX_SECONDS
from everruns.errors import ConfigError
from everruns.worker import Worker, WorkerConfig
from everruns.worker.config import MAX_CONCURRENT_TASKS_LIMIT, default_worker_id, parse_address


def test_defaults_when_environment_is_empty() -> None:
    config = WorkerConfig.from_env({})
    assert (config.host, config.port) == ("127.0.0.1", 9001)
    assert config.address == "127.0.0.1:9001"
    assert config.max_concurrent_tasks == 10
    assert config.grace_period == 30.0
    assert config.auth_token is None
    assert config.call_stream is True
    assert (
        config.worker_id.startswith(f"{os.uname().nodename}-{os.getpid()}-")
        or str(os.getpid()) in config.worker_id
    )


def test_reads_every_variable() -> None:
    config = WorkerConfig.from_env(
        {
            "GRPC_ADDRESS": "cp.internal:7000",
            "WORKER_ID": "w-1",
            "MAX_CONCURRENT_TASKS": "3",
            "EVERRUNS_AUTH_TOKEN": "s3cret",
            "EVERRUNS_WORKER_GRACE_PERIOD": "2.5",
            "EVERRUNS_CALL_STREAM": "off",
        }
    )
    assert config == WorkerConfig(
        host="cp.internal",
        port=7000,
        worker_id="w-1",
        max_concurrent_tasks=3,
        auth_token="s3cret",
        grace_period=2.5,
        call_stream=False,
    )


def test_database_url_is_never_read() -> None:
    class Spy(dict[str, str]):
        def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
            assert key != "DATABASE_URL", "the worker must not read DATABASE_URL"
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            assert key != "DATABASE_URL", "the worker must not read DATABASE_URL"
            return super().__getitem__(key)

    WorkerConfig.from_env(Spy(DATABASE_URL="postgresql://x/y"))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GRPC_ADDRESS", "no-port"),
        ("GRPC_ADDRESS", "host:99999"),
        ("GRPC_ADDRESS", ":9001"),
        ("GRPC_ADDRESS", "host:\u00b2"),  # isdigit() but not int(): once a bare ValueError
        ("MAX_CONCURRENT_TASKS", "ten"),
        ("MAX_CONCURRENT_TASKS", "0"),
        ("EVERRUNS_WORKER_GRACE_PERIOD", "soon"),
        ("EVERRUNS_WORKER_GRACE_PERIOD", "-1"),
        ("EVERRUNS_WORKER_GRACE_PERIOD", "inf"),
        ("EVERRUNS_CALL_STREAM", "maybe"),
    ],
)
def test_bad_values_name_the_variable_in_one_line(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_env({variable: value})
    message = str(info.value)
    assert variable in message
    assert "\n" not in message


@pytest.mark.parametrize("value", [MAX_CONCURRENT_TASKS_LIMIT + 1, 3_000_000_000, 2**32 + 1])
def test_max_concurrent_tasks_has_an_upper_bound(value: int) -> None:
    """Past int32 the count wraps at registration, and below that a worker keeps an object per
    free slot (10,000,000 slots: about 1 GB); both ways of configuring it are refused."""
    with pytest.raises(ConfigError, match="MAX_CONCURRENT_TASKS must be at most"):
        WorkerConfig.from_env({"MAX_CONCURRENT_TASKS": str(value)})
    with pytest.raises(ConfigError, match="MAX_CONCURRENT_TASKS must be at most"):
        Worker(max_concurrent_tasks=value)
    limit = str(MAX_CONCURRENT_TASKS_LIMIT)
    config = WorkerConfig.from_env({"MAX_CONCURRENT_TASKS": limit})
    assert config.max_concurrent_tasks == MAX_CONCURRENT_TASKS_LIMIT


def test_worker_ids_are_unique_per_call() -> None:
    ids = {default_worker_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(str(os.getpid()) in i for i in ids)


def test_ipv6_addresses() -> None:
    assert parse_address("[::1]:9001") == ("::1", 9001)
    assert WorkerConfig(host="::1", port=9001).address == "[::1]:9001"


def test_worker_constructor_validates() -> None:
    with pytest.raises(ConfigError, match="MAX_CONCURRENT_TASKS"):
        Worker(max_concurrent_tasks=0)
    with pytest.raises(ConfigError, match="address"):
        Worker(address="nowhere")
    worker = Worker(address="10.0.0.1:1234", worker_id="me", max_concurrent_tasks=4)
    assert (worker.worker_id, worker.address, worker.load, worker.draining) == (
        "me",
        "10.0.0.1:1234",
        0,
        False,
    )


@pytest.mark.parametrize("poll_wait", [-1.0, 0, float("nan"), float("inf")])
def test_a_poll_wait_that_is_not_a_positive_finite_number_is_a_config_error(
    poll_wait: float,
) -> None:
    """Negative: every PollTasks is INVALID_ARGUMENT; NaN: every claim fails in the worker;
    0: a busy loop of empty polls. Each is refused at once, naming the argument."""
    with pytest.raises(ConfigError, match="poll_wait"):
        Worker(poll_wait=poll_wait)


def test_from_env_uses_the_environment() -> None:
    worker = Worker.from_env(env={"WORKER_ID": "from-env", "GRPC_ADDRESS": "h:1"})
    assert worker.worker_id == "from-env"
    assert worker.address == "h:1"


def test_the_call_stream_switch_reads_the_usual_spellings() -> None:
    assert call_stream_from_env({}) is True
    for on in ("1", "true", "Yes", " on "):
        assert call_stream_from_env({"EVERRUNS_CALL_STREAM": on}) is True
    for off in ("0", "false", "NO", "off"):
        assert call_stream_from_env({"EVERRUNS_CALL_STREAM": off}) is False


def test_the_tls_switch_reads_the_usual_spellings() -> None:
    assert client_tls_from_env({}) is None
    for on in ("1", "true", "Yes", " on ", "true "):
        assert client_tls_from_env({"EVERRUNS_TLS": on}) is not None
    for off in ("0", "false", "NO", "off", ""):
        assert client_tls_from_env({"EVERRUNS_TLS": off}) is None


@pytest.mark.parametrize("value", ["2", "tls", "enable", "y"])
def test_an_unknown_tls_switch_is_refused_not_read_as_plaintext(value: str) -> None:
    """Plaintext would send the bearer token in clear; EVERRUNS_CALL_STREAM refuses such
    values too."""
    with pytest.raises(ConfigError, match="EVERRUNS_TLS="):
        client_tls_from_env({"EVERRUNS_TLS": value})


@pytest.mark.parametrize(
    "grace", [float("inf"), float("nan"), -1, 10**400, True, "30", MAX_SECONDS * 2]
)
def test_a_grace_period_that_is_not_a_bounded_number_is_refused_as_the_variable_is(
    grace: object,
) -> None:
    """EVERRUNS_WORKER_GRACE_PERIOD=inf is refused; so is the same value given in code (a
    worker told to stop would never cancel its tasks), and an integer too large for a float
    (which failed only as the worker stopped)."""
    with pytest.raises(ConfigError, match="EVERRUNS_WORKER_GRACE_PERIOD"):
        WorkerConfig(host="h", port=1, grace_period=grace)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="EVERRUNS_WORKER_GRACE_PERIOD"):
        Worker(grace_period=grace)  # type: ignore[arg-type]
    assert WorkerConfig(host="h", port=1, grace_period=MAX_SECONDS).grace_period == MAX_SECONDS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "[::1]"),
        ("host", " h"),
        ("host", "http://h"),
        ("host", 5),
        ("port", 65536),
        ("port", True),
        ("call_stream", "no"),
        ("call_stream", 1),
        ("start_ahead", None),
        ("auth_token", "two words"),
        ("auth_token", b"bytes"),
        ("worker_id", "w\udc80"),
    ],
)
def test_every_field_set_in_code_is_checked_and_named(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig(**{"host": "h", "port": 1, field: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert (field.upper() if field == "worker_id" else field) in message
    assert "\n" not in message


def test_hosts_and_ports_parse_address_accepts_round_trip() -> None:
    for host in ("127.0.0.1", "::1", "cp.internal", "localhost"):
        config = WorkerConfig(host=host, port=65535)
        assert parse_address(config.address) == (host, 65535)


@pytest.mark.parametrize("poll_wait", [10**400, MAX_SECONDS + 1])
def test_a_poll_wait_past_the_longest_duration_is_refused(poll_wait: float) -> None:
    with pytest.raises(ConfigError, match="poll_wait"):
        Worker(poll_wait=poll_wait)
