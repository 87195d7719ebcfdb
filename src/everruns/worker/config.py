"""Worker configuration: the few settings a worker reads from its environment, validated once.

A worker knows only where the control plane is (``GRPC_ADDRESS``), who it is (``WORKER_ID``),
how much it may run at once (``MAX_CONCURRENT_TASKS``), the bearer token it sends
(``EVERRUNS_AUTH_TOKEN``), how long a graceful shutdown waits for running tasks
(``EVERRUNS_WORKER_GRACE_PERIOD``) and whether it starts the activities a decision schedules
before the control plane has recorded them (``EVERRUNS_START_AHEAD``). It must never read
``DATABASE_URL``: workers hold no database credentials by design. A bad value is a
`ConfigError` whose one line names the variable.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping

import attrs

from everruns.domain.address import (
    DEFAULT_GRPC_ADDRESS,
    call_stream_from_env,
    check_auth_token,
    parse_address,
    switch_from_env,
)
from everruns.domain.limits import (
    MAX_SECONDS_TEXT,
    MAX_WORKER_ID_LENGTH,
    check_utf8,
    is_delay,
    shown,
)
from everruns.errors import ConfigError, InvalidArgument

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_GRPC_ADDRESS",
    "DEFAULT_MAX_CONCURRENT_TASKS",
    "MAX_CONCURRENT_TASKS_LIMIT",
    "WorkerConfig",
    "default_worker_id",
    "parse_address",
]

DEFAULT_MAX_CONCURRENT_TASKS = 10
# The most task slots one worker may have: the count travels as an int32, and a worker keeps an
# object per free slot. Past this, run more workers.
MAX_CONCURRENT_TASKS_LIMIT = 10_000
DEFAULT_GRACE_PERIOD = 30.0


def default_worker_id() -> str:
    """Return a fresh worker id, ``hostname-pid-random``, unique per process.

    The random part keeps ids unique when a pid is reused on the same host (containers).
    """
    return f"{socket.gethostname() or 'worker'}-{os.getpid()}-{secrets.token_hex(3)}"


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _bracketed(host: str) -> str:
    """``host`` as an address writes it: an IPv6 host in brackets."""
    return f"[{host}]" if ":" in host else host


def _check_host(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    # The rules of `parse_address`, which `address` must give back as (host, port) unchanged:
    # a host it would refuse, or read differently (brackets, spaces), reaches no control plane.
    if isinstance(value, str):
        try:
            if parse_address(f"{_bracketed(value)}:1") == (value, 1):
                return
        except ConfigError:
            pass
    raise ConfigError(
        f"host={shown(value) if isinstance(value, str) else repr(value)} is not a host name or "
        "IP address (e.g. 127.0.0.1; no scheme, port or brackets)"
    )


def _check_port(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"port must be an integer from 1 to 65535, got {value!r}")


def _check_worker_id(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value.strip() or value.strip() != value:
        raise ConfigError(
            f"WORKER_ID={value!r} must be a non-empty name without surrounding spaces"
        )
    if len(value) > MAX_WORKER_ID_LENGTH:
        raise ConfigError(
            f"WORKER_ID is {len(value)} characters long; the limit is {MAX_WORKER_ID_LENGTH}"
        )
    if "\x00" in value:
        raise ConfigError(f"WORKER_ID={value!r} must not contain NUL characters")
    try:
        check_utf8(value, "WORKER_ID")
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None


def _check_capacity(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    _positive_int(value, "MAX_CONCURRENT_TASKS")
    if value > MAX_CONCURRENT_TASKS_LIMIT:
        raise ConfigError(
            f"MAX_CONCURRENT_TASKS must be at most {MAX_CONCURRENT_TASKS_LIMIT}, got {value!r}; "
            "run more workers instead"
        )


def _check_grace(_inst: object, _attr: attrs.Attribute[float], value: float) -> None:
    # Bounded, as the variable is: an infinite grace period would never cancel the tasks of a
    # worker told to stop, and an integer past a float's range fails only as it stops.
    if not is_delay(value):
        raise ConfigError(
            "EVERRUNS_WORKER_GRACE_PERIOD must be a number of seconds from 0 to "
            f"{MAX_SECONDS_TEXT}, got {value!r}"
        )


def _check_auth_token(_inst: object, _attr: attrs.Attribute[str | None], value: str | None) -> None:
    check_auth_token(value, setting="auth_token")


def _check_switch(_inst: object, attr: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):  # a string read from a file ("no") would mean yes
        raise ConfigError(f"{attr.name} must be True or False, got {value!r}")


def _check_threads(_inst: object, _attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None:
        _positive_int(value, "max_sync_threads")


@attrs.frozen
class WorkerConfig:
    """What a worker needs to know, whether it came from the environment or from code.

    Attributes:
        host: the control plane's host (a name or an IP address, IPv6 without brackets).
        port: the control plane's gRPC port (1 to 65535).
        worker_id: this worker's name, unique among live workers.
        max_concurrent_tasks: task slots (1 to `MAX_CONCURRENT_TASKS_LIMIT`); the worker never holds
            more claimed tasks.
        auth_token: bearer token sent with every call, if the control plane requires one.
        grace_period: seconds a graceful shutdown lets running tasks finish (at most
            `MAX_SECONDS`).
        max_sync_threads: threads for sync activities (default: one per task slot). A sync
            activity is claimed only with a thread free for it, so that it never waits for
            one while its start-to-close timeout runs: with fewer threads than slots, claims
            are no larger than the free threads, and leave sync activities out while every
            thread is busy. A thread abandoned by a stop keeps its place until it ends.
        call_stream: send calls over the control plane's call stream (one HTTP/2 stream for
            all of them) where it serves one; False: one HTTP/2 stream per call.
        start_ahead: start the activities a workflow task's decision schedules, in free slots,
            while the decision is on its way; an activity the control plane does not record
            and hand back is cancelled and its outcome dropped. False: wait for the reply.

    Raises:
        ConfigError: a field has a bad value (a port outside 1 to 65535, a token a gRPC
            header cannot carry, a flag that is not a bool...); the one line names it.
    """

    host: str = attrs.field(validator=_check_host)
    port: int = attrs.field(validator=_check_port)
    worker_id: str = attrs.field(factory=default_worker_id, validator=_check_worker_id)
    max_concurrent_tasks: int = attrs.field(
        default=DEFAULT_MAX_CONCURRENT_TASKS, validator=_check_capacity
    )
    auth_token: str | None = attrs.field(default=None, validator=_check_auth_token)
    grace_period: float = attrs.field(default=DEFAULT_GRACE_PERIOD, validator=_check_grace)
    max_sync_threads: int | None = attrs.field(default=None, validator=_check_threads)
    call_stream: bool = attrs.field(default=True, validator=_check_switch)
    start_ahead: bool = attrs.field(default=True, validator=_check_switch)

    @property
    def address(self) -> str:
        """``host:port`` as given (IPv6 hosts in brackets)."""
        return f"{_bracketed(self.host)}:{self.port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        """Read the configuration from ``env`` (default: the process environment).

        ``DATABASE_URL`` is deliberately not read.

        Returns:
            The configuration.

        Raises:
            ConfigError: a variable has a bad value; the one-line message names it.
        """
        env = os.environ if env is None else env
        host, port = parse_address(env.get("GRPC_ADDRESS") or DEFAULT_GRPC_ADDRESS)
        worker_id = env.get("WORKER_ID") or default_worker_id()
        return cls(
            host=host,
            port=port,
            worker_id=worker_id,
            max_concurrent_tasks=_env_int(
                env, "MAX_CONCURRENT_TASKS", DEFAULT_MAX_CONCURRENT_TASKS
            ),
            auth_token=check_auth_token(env.get("EVERRUNS_AUTH_TOKEN") or None),
            grace_period=_env_seconds(env, "EVERRUNS_WORKER_GRACE_PERIOD", DEFAULT_GRACE_PERIOD),
            call_stream=call_stream_from_env(env),
            start_ahead=switch_from_env(env, "EVERRUNS_START_AHEAD", default=True),
        )


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer (e.g. {name}={default})") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r} must be at least 1")
    return value


def _env_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds (e.g. {default:g})") from None
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{name}={raw!r} must be a finite number of seconds >= 0")
    return value
