"""Control-plane configuration, read from the environment once at start.

Every variable of the operator guide keeps its name and default (RUNNER_MODE, DATABASE_URL,
GRPC_ADDRESS); everruns' own settings are prefixed EVERRUNS_. A bad value is a `ConfigError`
whose one line names the variable, the value's problem and what to set instead.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

import attrs

from everruns._aio.pg import CONNECT_TIMEOUT_PARAMETER, parse_connect_timeout
from everruns.domain.address import (
    DEFAULT_GRPC_ADDRESS,
    check_auth_token,
    parse_address,
    split_userinfo,
)
from everruns.domain.limits import MAX_SECONDS
from everruns.errors import ConfigError
from everruns.store.migrate import DEFAULT_LOCK_TIMEOUT

__all__ = ["ServerConfig", "validate_database_url"]


def validate_database_url(url: str) -> str:
    """Return ``url`` if it looks like a PostgreSQL URL: the ``postgresql://`` scheme and, for
    each host it names (``h1:5432,h2:5432`` fails over, as in libpq), a valid port if any. No
    host at all (``postgresql:///everruns``) is libpq's too: ``PGHOST`` or the local socket.

    Raises:
        ConfigError: wrong scheme, no ``//``, or a bad host or port; names DATABASE_URL.
    """
    # The messages never quote the URL or urlsplit's error: either may hold the password.
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ConfigError(f"DATABASE_URL is invalid: {_BAD_HOST}") from exc
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            f"DATABASE_URL is invalid: scheme {parts.scheme or '(none)'!r} is not postgresql:// "
            "(e.g. postgresql://user:password@localhost:5432/everruns)"
        )
    if not url.split(":", 1)[1].startswith("//"):
        raise ConfigError(
            "DATABASE_URL is invalid: it needs // after the scheme (postgresql://HOST/DB, or "
            "postgresql:///DB for the local socket)"
        )
    if _misplaced_at(url.split("://", 1)[1]):
        # The user name or password holds a "/", "?" or "#": the host part ended before "@".
        raise ConfigError(f"DATABASE_URL is invalid: {_BAD_HOST}")
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(","):
        try:
            _ = urlsplit(f"//{host}").port  # raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError(f"DATABASE_URL is invalid: {_BAD_HOST}") from exc
    _check_parameters(parts.query)
    return url


def _misplaced_at(rest: str) -> bool:
    """Whether ``rest`` (the URL after ``://``) holds an '@' that ends a user name or password
    holding an unescaped '/', '?' or '#': user info (libpq's, `split_userinfo`) holding '?' or
    '#' (urlsplit, and asyncpg, would end the host part there and read the password as host
    and port), or an '@' in the path, a parameter's name or the fragment. An '@' in a query
    value (``?user=admin@corp``, ``application_name=a@b``) is the value's, as in libpq."""
    userinfo, rest = split_userinfo(rest)
    if "?" in userinfo or "#" in userinfo:
        return True
    authority_end = next((i for i, char in enumerate(rest) if char in "/?#"), len(rest))
    path, _, after_path = rest[authority_end:].partition("?")  # without '?', up to the end
    query, _, fragment = after_path.partition("#")
    names = (pair.partition("=")[0] for pair in query.split("&"))
    return "@" in path or "@" in fragment or any("@" in name for name in names)


# libpq's connection parameters that asyncpg does not understand: it would send each to the
# server as a setting, which PostgreSQL refuses ("unrecognized configuration parameter").
# connect_timeout is not here: the control plane takes it out of the URL and uses it.
_LIBPQ_ONLY = frozenset(
    {
        "channel_binding",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "load_balance_hosts",
        "max_protocol_version",
        "min_protocol_version",
        "require_auth",
        "requirepeer",
        "requiressl",
        "sslcertmode",
        "sslcompression",
        "sslkeylogfile",
        "sslsni",
        "tcp_user_timeout",
    }
)


def _check_parameters(query: str) -> None:
    """Refuse a query asyncpg cannot read, the libpq-only parameters the control plane cannot
    honour, and a ``connect_timeout`` that is not a whole number of seconds (libpq's rule).
    The messages never quote the query: it may hold the password."""
    if not query:
        return
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ConfigError(
            "DATABASE_URL is invalid: its parameters (after '?') must be name=value pairs "
            "joined by '&'"
        ) from exc
    unusable = sorted({name for name, _ in pairs} & _LIBPQ_ONLY)
    if unusable:
        raise ConfigError(
            f"DATABASE_URL has libpq parameter(s) the control plane cannot use: "
            f"{', '.join(unusable)}; remove them (connect_timeout, sslmode and the other ssl* "
            "settings, target_session_attrs, passfile and server settings such as "
            "application_name or options are understood)"
        )
    for name, value in pairs:
        if name == CONNECT_TIMEOUT_PARAMETER:
            try:
                parse_connect_timeout(value)
            except ValueError as exc:
                raise ConfigError(f"DATABASE_URL is invalid: {exc}") from exc


_BAD_HOST = (
    "its host or port cannot be read (percent-encode '/', '?', '#' and '@' in the user name "
    "and password, and put an IPv6 address in brackets)"
)


def _least_message_bytes(max_payload_bytes: int) -> int:
    """The least message limit a payload limit allows: a request carrying a few maximal
    payloads (a start, a decision) must always fit."""
    return 4 * max_payload_bytes + 64 * 1024


def _default_message_bytes(max_payload_bytes: object) -> int:
    """64 MiB, or the least the payload limit allows when it is raised that far (so raising
    EVERRUNS_MAX_PAYLOAD_BYTES alone never makes the default limit refused)."""
    least = 64 * 1024 * 1024
    if isinstance(max_payload_bytes, int) and not isinstance(max_payload_bytes, bool):
        return max(least, _least_message_bytes(max_payload_bytes))
    return least


def _path_text(path: str | os.PathLike[str] | None) -> str | None:
    """A path as text (a `pathlib.Path` too); anything else is left for the validator."""
    return os.fspath(path) if isinstance(path, os.PathLike) else path


def _expand_home(path: str | os.PathLike[str] | None) -> str | None:
    # `~/pg` from an env file names the same directory as in a shell (and as the demo reads it)
    text = _path_text(path)
    return os.path.expanduser(text) if text and isinstance(text, str) else text


_SECONDS_PER_DAY = 86400.0


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float = 0.0,
    maximum: float = MAX_SECONDS,
    unit: str = "seconds",
) -> float:
    """A duration: a number from ``minimum`` to ``maximum`` (100 years in ``unit``), since
    the control plane hands its settings to PostgreSQL, whose intervals end short of infinity."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum:  # also NaN
        raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
    if not value <= maximum:  # also infinity
        raise ConfigError(f"{name}={raw!r} must be at most {maximum:.0f} {unit} (100 years)")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _tls_file(env: Mapping[str, str], name: str, partner: str) -> str | None:
    value = env.get(name) or None
    if value is None:
        if env.get(partner):
            raise ConfigError(f"{partner} is set but {name} is not; TLS needs both")
        return None
    if not os.path.isfile(value):
        raise ConfigError(f"{name}={value!r} is not a readable file")
    return value


def _tls_pair(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``EVERRUNS_TLS_CERT`` and ``EVERRUNS_TLS_KEY``: both or neither, each a file."""
    cert = _tls_file(env, "EVERRUNS_TLS_CERT", "EVERRUNS_TLS_KEY")
    key = _tls_file(env, "EVERRUNS_TLS_KEY", "EVERRUNS_TLS_CERT")
    return cert, key  # ServerConfig loads them together


# What a ServerConfig made in Python (embedding the control plane) may hold: the ranges
# `from_env` accepts and a little more (shorter intervals, for tests and impatient apps). Each
# refusal is a ConfigError naming the field and the variable that sets it from the environment.


def _zero_is_none(value: float | None) -> float | None:
    """0 turns a limit off, as the variable's 0 does (None in Python)."""
    return None if value == 0 and not isinstance(value, bool) else value


def _number_text(value: object) -> str:
    return repr(value) if isinstance(value, (int, float, str)) else type(value).__name__


def _seconds(variable: str, *, zero_ok: bool = False) -> Callable[..., None]:
    def check(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if number and (value >= 0 if zero_ok else value > 0) and value <= MAX_SECONDS:
            return
        floor = "from 0" if zero_ok else "above 0"
        raise ConfigError(
            f"ServerConfig.{attr.name} must be a number of seconds {floor} to {MAX_SECONDS:.0f} "
            f"(100 years), not {_number_text(value)} ({variable})"
        )

    return check


def _optional_seconds(variable: str) -> Callable[..., None]:
    check = _seconds(variable)

    def check_optional(
        inst: object, attr: attrs.Attribute[float | None], value: float | None
    ) -> None:
        if value is not None:
            check(inst, attr, value)

    return check_optional


def _count(variable: str, minimum: int) -> Callable[..., None]:
    def check(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"ServerConfig.{attr.name} must be an integer from {minimum}, not "
                f"{_number_text(value)} ({variable})"
            )

    return check


def _check_port(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(
            f"ServerConfig.grpc_port must be an integer from 0 (any free port) to 65535, not "
            f"{_number_text(value)} (GRPC_ADDRESS)"
        )


def _check_host(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value or value != value.strip() or "\x00" in value:
        raise ConfigError(
            f"ServerConfig.grpc_host must be a host name or address, not {value!r} (GRPC_ADDRESS)"
        )


def _check_url(_inst: object, _attr: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None:
        if not isinstance(value, str):
            raise ConfigError(
                f"ServerConfig.database_url must be a string or None, not "
                f"{type(value).__name__} (DATABASE_URL)"
            )
        validate_database_url(value)


def _check_token(_inst: object, _attr: attrs.Attribute[str | None], value: str | None) -> None:
    check_auth_token(value, setting="ServerConfig.auth_token (EVERRUNS_AUTH_TOKEN)")


def _check_path(_inst: object, attr: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value or "\x00" in value):
        raise ConfigError(f"ServerConfig.{attr.name} must be a path or None, not {value!r}")


@attrs.frozen
class ServerConfig:
    """Everything the control plane reads from its environment.

    Attributes:
        database_url: PostgreSQL URL; None means the embedded PostgreSQL.
        data_dir: the embedded PostgreSQL's data directory (None: the per-user default).
        grpc_host, grpc_port: where gRPC listens (port 0: any free port).
        db_connect_timeout: how long to keep retrying an unreachable database at start.
        stale_after: seconds without a heartbeat after which a claimed task is released.
        reclaim_interval: how often the reclaim round runs (stale tasks, lost workers, operator
            requeues, child runs an ended parent left open).
        worker_lost_after: seconds without a worker heartbeat before it is marked lost.
        max_pending_tasks: refuse new work with RESOURCE_EXHAUSTED at this many pending tasks
            (0: no limit).
        max_payload_bytes: the largest payload accepted in one request.
        max_message_bytes: the largest gRPC message read; a larger one is refused unread.
        retention_seconds: ended workflows older than this are deleted (0: keep forever).
        auth_token: when set, every RPC must carry it as a bearer token.
        pool_size: PostgreSQL connections the control plane holds (all opened at start).
        schedule_to_start_timeout: default limit on an activity's wait in the queue (None or
            0: off).
        start_to_close_timeout: default limit on one attempt's run time (None or 0: off).
        retention_interval: how often the retention duty looks for expired runs.
        tls_cert, tls_key: PEM files; when both are set, gRPC is served over TLS.
        migrate_lock_timeout: how long a migration waits for a lock before it is rolled back
            and tried again (None or 0: as long as it takes).

    Made in Python (embedding the control plane), each field is checked as its variable is:
    a bad value is a one-line `ConfigError` naming the field and the variable.
    """

    database_url: str | None = attrs.field(default=None, validator=_check_url)
    data_dir: str | None = attrs.field(default=None, converter=_expand_home, validator=_check_path)
    grpc_host: str = attrs.field(default="127.0.0.1", validator=_check_host)
    grpc_port: int = attrs.field(default=9001, validator=_check_port)
    db_connect_timeout: float = attrs.field(
        default=30.0, validator=_seconds("EVERRUNS_DB_CONNECT_TIMEOUT", zero_ok=True)
    )
    stale_after: float = attrs.field(default=30.0, validator=_seconds("EVERRUNS_STALE_AFTER"))
    reclaim_interval: float = attrs.field(
        default=10.0, validator=_seconds("EVERRUNS_RECLAIM_INTERVAL")
    )
    worker_lost_after: float = attrs.field(
        default=30.0, validator=_seconds("EVERRUNS_WORKER_LOST_AFTER")
    )
    max_pending_tasks: int = attrs.field(
        default=0, validator=_count("EVERRUNS_MAX_PENDING_TASKS", 0)
    )
    max_payload_bytes: int = attrs.field(
        default=2 * 1024 * 1024, validator=_count("EVERRUNS_MAX_PAYLOAD_BYTES", 1024)
    )
    max_message_bytes: int = attrs.field(
        default=attrs.Factory(lambda self: _default_message_bytes(self.max_payload_bytes), True),
        validator=_count("EVERRUNS_MAX_MESSAGE_BYTES", 0),
    )

    @max_message_bytes.validator
    def _holds_payloads(self, _: object, value: int) -> None:
        least = _least_message_bytes(self.max_payload_bytes)
        if value < least:
            raise ConfigError(
                f"EVERRUNS_MAX_MESSAGE_BYTES={value} (ServerConfig.max_message_bytes) must be at "
                f"least 4 x EVERRUNS_MAX_PAYLOAD_BYTES + 64 KiB ({least}); raise it or lower "
                "EVERRUNS_MAX_PAYLOAD_BYTES"
            )

    retention_seconds: float = attrs.field(
        default=7 * 24 * 3600.0, validator=_seconds("EVERRUNS_RETENTION_DAYS", zero_ok=True)
    )
    auth_token: str | None = attrs.field(default=None, validator=_check_token)
    pool_size: int = attrs.field(default=10, validator=_count("EVERRUNS_DB_POOL_SIZE", 2))
    schedule_to_start_timeout: float | None = attrs.field(
        default=60.0,
        converter=_zero_is_none,
        validator=_optional_seconds("EVERRUNS_SCHEDULE_TO_START_TIMEOUT"),
    )
    start_to_close_timeout: float | None = attrs.field(
        default=300.0,
        converter=_zero_is_none,
        validator=_optional_seconds("EVERRUNS_START_TO_CLOSE_TIMEOUT"),
    )
    retention_interval: float = attrs.field(
        default=300.0, validator=_seconds("EVERRUNS_RETENTION_INTERVAL")
    )
    tls_cert: str | None = attrs.field(default=None, converter=_path_text, validator=_check_path)
    tls_key: str | None = attrs.field(default=None, converter=_path_text, validator=_check_path)
    migrate_lock_timeout: float | None = attrs.field(
        default=DEFAULT_LOCK_TIMEOUT,
        converter=_zero_is_none,
        validator=_optional_seconds("EVERRUNS_MIGRATE_LOCK_TIMEOUT"),
    )

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "ServerConfig.tls_cert and tls_key go together: TLS needs both "
                "(EVERRUNS_TLS_CERT, EVERRUNS_TLS_KEY)"
            )
        if self.tls_cert is not None and self.tls_key is not None:
            # Loaded together here, so a file that is not PEM, or a key that does not match, is
            # refused in one line rather than when the server starts serving.
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.tls_cert, self.tls_key
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"EVERRUNS_TLS_CERT={self.tls_cert!r} with EVERRUNS_TLS_KEY="
                    f"{self.tls_key!r} (ServerConfig.tls_cert, tls_key) cannot be used: {exc}"
                ) from exc

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerConfig:
        """Read the configuration from ``env`` (default: the process environment).

        Every duration is at most `MAX_SECONDS` (100 years; 36525 EVERRUNS_RETENTION_DAYS).

        Raises:
            ConfigError: a variable has a bad value; the message names it.
        """
        env = os.environ if env is None else env
        mode = env.get("RUNNER_MODE") or "durable"  # empty, as in `RUNNER_MODE=`: the default
        if mode != "durable":
            raise ConfigError(f"RUNNER_MODE={mode!r} is not supported; the only mode is 'durable'")
        url = env.get("DATABASE_URL") or None
        tls_cert, tls_key = _tls_pair(env)
        payload_bytes = _int(env, "EVERRUNS_MAX_PAYLOAD_BYTES", 2 * 1024 * 1024, minimum=1024)
        host, port = parse_address(
            env.get("GRPC_ADDRESS") or DEFAULT_GRPC_ADDRESS, allow_any_port=True
        )
        return cls(
            database_url=validate_database_url(url) if url else None,
            data_dir=env.get("EVERRUNS_DATA_DIR") or None,
            grpc_host=host,
            grpc_port=port,
            db_connect_timeout=_float(env, "EVERRUNS_DB_CONNECT_TIMEOUT", 30.0),
            stale_after=_float(env, "EVERRUNS_STALE_AFTER", 30.0, minimum=0.1),
            reclaim_interval=_float(env, "EVERRUNS_RECLAIM_INTERVAL", 10.0, minimum=0.05),
            worker_lost_after=_float(env, "EVERRUNS_WORKER_LOST_AFTER", 30.0, minimum=0.1),
            max_pending_tasks=_int(env, "EVERRUNS_MAX_PENDING_TASKS", 0),
            max_payload_bytes=payload_bytes,
            max_message_bytes=_int(
                env, "EVERRUNS_MAX_MESSAGE_BYTES", _default_message_bytes(payload_bytes)
            ),
            retention_seconds=_float(
                env,
                "EVERRUNS_RETENTION_DAYS",
                7.0,
                maximum=MAX_SECONDS / _SECONDS_PER_DAY,
                unit="days",
            )
            * _SECONDS_PER_DAY,
            auth_token=check_auth_token(env.get("EVERRUNS_AUTH_TOKEN") or None),
            pool_size=_int(env, "EVERRUNS_DB_POOL_SIZE", 10, minimum=2),
            schedule_to_start_timeout=_float(env, "EVERRUNS_SCHEDULE_TO_START_TIMEOUT", 60.0)
            or None,
            start_to_close_timeout=_float(env, "EVERRUNS_START_TO_CLOSE_TIMEOUT", 300.0) or None,
            retention_interval=_float(env, "EVERRUNS_RETENTION_INTERVAL", 300.0, minimum=1.0),
            tls_cert=tls_cert,
            tls_key=tls_key,
            migrate_lock_timeout=_float(env, "EVERRUNS_MIGRATE_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)
            or None,
        )
