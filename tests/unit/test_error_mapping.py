"""How the adapter's errors become everruns errors: what the database's or the connection's
state causes is UNAVAILABLE (callers retry it), what the request causes is its own error."""

from __future__ import annotations

import ssl

import asyncpg
import pytest

from everruns._aio import pg
from everruns._aio.pg import map_pg_error
from everruns.errors import AlreadyExists, DatabaseError, DatabaseUnavailable, InvalidArgument


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # the database's state: transient, retried by workers and clients
        (asyncpg.exceptions.DeadlockDetectedError, DatabaseUnavailable),
        (asyncpg.exceptions.SerializationError, DatabaseUnavailable),
        (asyncpg.exceptions.TooManyConnectionsError, DatabaseUnavailable),
        (asyncpg.exceptions.OutOfMemoryError, DatabaseUnavailable),
        (asyncpg.exceptions.DiskFullError, DatabaseUnavailable),
        (asyncpg.exceptions.CannotConnectNowError, DatabaseUnavailable),
        # the request's: not retried
        (asyncpg.exceptions.UniqueViolationError, AlreadyExists),
        (asyncpg.exceptions.CheckViolationError, InvalidArgument),
        (asyncpg.exceptions.DivisionByZeroError, DatabaseError),
    ],
)
def test_postgres_errors_map_to_what_callers_should_do(
    error: type[Exception], expected: type[Exception]
) -> None:
    """Deadlocks, serialization failures and a lack of resources (too many connections, no
    memory, a full disk) were INTERNAL, which clients do not retry; they are UNAVAILABLE now."""
    mapped = map_pg_error(error("boom"))
    assert type(mapped) is expected
    assert "boom" in str(mapped)


def test_a_broken_stream_or_a_reply_that_does_not_decode_is_an_everruns_error() -> None:
    """`RpcChannel.unary` turns what a call can fail with into everruns errors: an HTTP/2
    stream closed under a write is ServerUnavailable (retried), a reply that does not decode
    is RpcError; both escaped as raw h2/wire exceptions before."""
    import h2.exceptions

    from everruns._aio import grpc
    from everruns._aio.wire import WireError
    from everruns.errors import RpcError, ServerUnavailable

    closed = h2.exceptions.StreamClosedError(3)
    malformed = WireError("truncated varint")
    assert isinstance(closed, grpc._CALL_ERRORS) and isinstance(malformed, grpc._CALL_ERRORS)
    assert type(grpc._to_everruns_error(closed, "describe")) is ServerUnavailable
    mapped = grpc._to_everruns_error(malformed, "describe")
    assert type(mapped) is RpcError and "truncated varint" in str(mapped)


@pytest.mark.parametrize(
    ("error", "temporary"),
    [
        # what passes: retried for EVERRUNS_DB_CONNECT_TIMEOUT at start
        (ConnectionRefusedError("refused"), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.exceptions.TooManyConnectionsError("too many clients"), True),
        (asyncpg.exceptions.ConnectionFailureError("connection failure"), True),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
        # what stays: refused at once, naming PostgreSQL's message
        (asyncpg.exceptions.InsufficientPrivilegeError("permission denied for database"), False),
        (asyncpg.exceptions.UndefinedObjectError("unrecognized configuration parameter"), False),
        (asyncpg.exceptions.InvalidPasswordError("password authentication failed"), False),
        (asyncpg.exceptions.InvalidCatalogNameError('database "x" does not exist'), False),
        (asyncpg.exceptions.ClientConfigurationError("invalid sslmode"), False),
        # TLS: a certificate refused stays; a TLS connection cut short passes
        (ssl.SSLCertVerificationError("certificate verify failed"), False),
        (ssl.SSLEOFError("EOF occurred in violation of protocol"), True),
        # a local file (a TLS file of DATABASE_URL) stays; a Unix socket not there yet passes
        (FileNotFoundError(2, "No such file or directory", "/run/secrets/ca.pem"), False),
        (PermissionError(13, "Permission denied", "/run/secrets/client.key"), False),
        (IsADirectoryError(21, "Is a directory", "/run/secrets"), False),
        (FileNotFoundError(2, "No such file or directory"), True),
    ],
)
def test_a_connection_refusal_is_retried_only_if_it_can_pass(
    error: Exception, temporary: bool
) -> None:
    """wait_until_ready retried every server error but three (a role refused CONNECT was
    retried for the whole budget, then reported as an unreachable server)."""
    assert pg._temporary(error) is temporary
