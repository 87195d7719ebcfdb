"""The control plane's address, and how to call it: one parser for the server, the worker, the
client and the CLI.

Pure string handling; no sockets here.
"""

from __future__ import annotations

from collections.abc import Mapping

from everruns.errors import ConfigError

__all__ = [
    "DEFAULT_GRPC_ADDRESS",
    "call_stream_from_env",
    "check_auth_token",
    "parse_address",
    "switch_from_env",
]

DEFAULT_GRPC_ADDRESS = "127.0.0.1:9001"


def parse_address(
    value: str, *, setting: str = "GRPC_ADDRESS", allow_any_port: bool = False
) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) into its parts.

    Args:
        value: the address text.
        setting: the variable or flag it came from, named in the error.
        allow_any_port: accept port 0 ("any free port"), which only a listener can use.

    Returns:
        ``(host, port)`` with the brackets of an IPv6 host removed.

    Raises:
        ConfigError: not a string of the form host:port with a valid port; names ``setting``.
    """
    if not isinstance(value, str):
        raise ConfigError(
            f"{setting} must be a string host:port (e.g. {DEFAULT_GRPC_ADDRESS}), "
            f"got {type(value).__name__}"
        )
    host, sep, port_text = value.strip().rpartition(":")
    host = host.strip("[]")
    lowest = 0 if allow_any_port else 1
    # isdigit() alone is true for '²', which int() refuses.
    digits = port_text.isascii() and port_text.isdigit()
    # A URL ('http://host:port') is the commonest mistake: its "host" would be taken as a name
    # to resolve, and the failure reported as an unreachable control plane.
    odd_host = any(c in host for c in "/@?# ") or "://" in value
    if not sep or not host or odd_host or not digits or not lowest <= int(port_text) <= 65535:
        raise ConfigError(
            f"{setting}={value!r} is not host:port (e.g. {DEFAULT_GRPC_ADDRESS}, no scheme)"
        )
    return host, int(port_text)


def check_auth_token(token: str | None, *, setting: str = "EVERRUNS_AUTH_TOKEN") -> str | None:
    """Return ``token`` if an HTTP/2 header can carry it as ``Bearer <token>``.

    Raises:
        ConfigError: it is not a string, or holds a character other than visible ASCII (a
            trailing newline from a secret file, a space, a non-ASCII letter); names
            ``setting``.
    """
    if token is None:
        return None
    if not isinstance(token, str):
        raise ConfigError(f"{setting} must be a string, got {type(token).__name__}")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(
            f"{setting} holds a character a gRPC header cannot carry (only visible ASCII, no "
            "spaces or line ends; a secret read from a file may end with a newline)"
        )
    return token


def switch_from_env(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    """Read the on/off variable ``name``: 1/true/yes/on or 0/false/no/off, in any case.

    Returns:
        The switch; ``default`` when the variable is unset or empty.

    Raises:
        ConfigError: any other value; the one line names the variable.
    """
    raw = env.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} must be 1/true/yes/on or 0/false/no/off")


def call_stream_from_env(env: Mapping[str, str]) -> bool:
    """Whether a caller sends its unary calls over the control plane's call stream
    (``EVERRUNS_CALL_STREAM``, default on; off: one HTTP/2 stream per call).

    Raises:
        ConfigError: the value is not one of 1/true/yes/on, 0/false/no/off.
    """
    return switch_from_env(env, "EVERRUNS_CALL_STREAM", default=True)


def split_userinfo(rest: str) -> tuple[str, str]:
    """Split what follows ``://`` in a PostgreSQL URL into its user info and what follows the
    user info's "@", as libpq reads it: the user info ends at the last "@" before the first
    "/" (an "@" after that belongs to the path or a query value, ``?user=admin@corp``).
    No user info: ``("", rest)``."""
    userinfo, at, _ = rest.partition("/")[0].rpartition("@")
    return (userinfo, rest[len(userinfo) + 1 :]) if at else ("", rest)
