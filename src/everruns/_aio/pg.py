"""A typed Trio proxy over asyncpg: pools, connections, transactions and LISTEN.

The store talks to PostgreSQL only through this module. Every call crosses to the asyncio loop's
thread (`everruns._aio.loop`); closing and rolling back run shielded with a bound, so a cancelled
caller never leaks a connection or leaves a transaction open. asyncpg and OS errors are mapped
onto ``everruns.errors`` here. No SQL text lives here: callers pass it in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
import trio

from everruns._aio.loop import call_in_loop, current_aio_loop, run_aio
from everruns.errors import (
    AlreadyExists,
    DatabaseError,
    DatabaseUnavailable,
    FailedPrecondition,
    InvalidArgument,
)

Row = Mapping[str, Any]

_log = logging.getLogger("everruns.db")

_CLEANUP_SECONDS = 5.0

# SQLSTATE classes that mean "the data refused it" rather than "the database is broken".
_UNIQUE_VIOLATION = "23505"
_CHECK_VIOLATION = "23514"
_FK_VIOLATION = "23503"
_NOT_NULL_VIOLATION = "23502"
_INVALID_TEXT = "22P02"
# PostgreSQL aborted one transaction to let another go on: the same call succeeds when made again.
_DEADLOCK = "40P01"
_INSUFFICIENT_RESOURCES = "53"  # the SQLSTATE class
_SERIALIZATION_FAILURE = "40001"


def map_pg_error(exc: BaseException) -> Exception:
    """Return the everruns exception for an asyncpg/OS error (callers ``raise ... from exc``)."""
    state = getattr(exc, "sqlstate", None)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, asyncpg.InvalidCachedStatementError):
        # A table changed under a statement this connection prepared (a column added while
        # the control plane runs, as docs/operations.md's upgrades do). asyncpg has dropped
        # the connection's prepared statements and retries on its own outside a transaction;
        # inside one the caller must: the same call succeeds when made again.
        return DatabaseUnavailable(f"a table changed under a prepared statement: {message}")
    if state is not None and state.startswith(_INSUFFICIENT_RESOURCES):
        # Too many connections, out of memory or disk: the server's state, not the request's.
        return DatabaseUnavailable(f"PostgreSQL lacks resources: {message}")
    if state in (_DEADLOCK, _SERIALIZATION_FAILURE):
        # Reported as UNAVAILABLE, which workers and clients retry.
        return DatabaseUnavailable(f"PostgreSQL aborted the transaction, to be retried: {message}")
    if state == _UNIQUE_VIOLATION:
        return AlreadyExists(message)
    if state in (_CHECK_VIOLATION, _NOT_NULL_VIOLATION, _INVALID_TEXT):
        return InvalidArgument(message)
    if state == _FK_VIOLATION:
        return FailedPrecondition(message)
    if isinstance(exc, (OSError, asyncpg.exceptions.ConnectionDoesNotExistError)) or (
        isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in message
    ):
        return DatabaseUnavailable(f"PostgreSQL connection lost: {message}")
    if isinstance(exc, asyncpg.exceptions.CannotConnectNowError):
        return DatabaseUnavailable(f"PostgreSQL is not accepting connections: {message}")
    if isinstance(exc, asyncpg.InternalClientError):
        return DatabaseUnavailable(f"PostgreSQL connection left unusable: {message}")
    return DatabaseError(f"{type(exc).__name__}: {message}")


# InternalClientError: asyncpg's protocol is in a state it cannot leave, e.g. after the server
# ended the session mid-transaction ("cannot switch to state 11; another operation (2) is in
# progress"). It is not an InterfaceError, and the connection it comes from stays broken.
_MAPPED = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


# Connections dropped by `_drop` whose closing the loop's thread may not have run yet: they
# must not go back to a pool meanwhile.
_dropped: weakref.WeakSet[Any] = weakref.WeakSet()


def _terminate(raw: Any) -> None:
    try:
        raw.terminate()
    except asyncpg.InterfaceError:
        pass  # already released or closed: nothing left to drop


async def _terminate_after_cancels(raw: Any, pending: list[Any]) -> None:
    await asyncio.wait(pending, timeout=_CLEANUP_SECONDS)
    _terminate(raw)


def _close_dropped(raw: Any) -> None:  # on the loop's thread
    # A query cancelled mid-way leaves asyncpg sending PostgreSQL a cancel request (from a task
    # of its own, over a new connection); terminating the connection first would cancel that
    # task, and the statement would run on to its end at the server, holding its locks.
    # `_cancellations` is asyncpg's set of those tasks (private: absent, nothing is waited for).
    pending = [t for t in getattr(raw, "_cancellations", ()) if not t.done()]
    if pending:
        closing = asyncio.ensure_future(_terminate_after_cancels(raw, pending))
        _closing.add(closing)  # asyncio holds its tasks weakly
        closing.add_done_callback(_closing.discard)
    else:
        _terminate(raw)


_closing: set[asyncio.Future[None]] = set()


def _drop(raw: Any) -> None:
    """Close a connection without a goodbye (it may be mid-operation): at once, or as soon as
    the cancel request of a query cancelled on it has gone out (bounded).

    The close runs on the loop's thread (asyncpg objects belong to it); from here on the
    connection counts as closed.
    """
    _dropped.add(raw)
    try:
        current_aio_loop().loop.call_soon_threadsafe(_close_dropped, raw)
    except RuntimeError:
        pass  # the loop is already closed, and its connections with it


def _is_open(raw: Any) -> bool:
    return raw not in _dropped and not raw.is_closed()


class Connection:
    """One PostgreSQL connection, usable from Trio."""

    def __init__(self, raw: asyncpg.Connection) -> None:
        self._raw = raw

    def _failed(self, exc: BaseException) -> Exception:
        """The everruns error for ``exc``; a connection asyncpg can no longer drive is dropped
        (its pool then never hands it out again)."""
        if isinstance(exc, asyncpg.InternalClientError):
            _drop(self._raw)
        return map_pg_error(exc)

    async def execute(self, query: str, *args: Any) -> str:
        """Run a statement; return its status tag (e.g. ``UPDATE 3``)."""
        try:
            status: str = await run_aio(self._raw.execute, query, *args)
        except _MAPPED as exc:
            raise self._failed(exc) from exc
        return status

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        """Run a query; return all rows."""
        try:
            rows: list[Row] = await run_aio(self._raw.fetch, query, *args)
        except _MAPPED as exc:
            raise self._failed(exc) from exc
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        """Run a query; return its first row or None."""
        try:
            row: Row | None = await run_aio(self._raw.fetchrow, query, *args)
        except _MAPPED as exc:
            raise self._failed(exc) from exc
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        """Run a query; return the first column of its first row (None if no row)."""
        try:
            return await run_aio(self._raw.fetchval, query, *args)
        except _MAPPED as exc:
            raise self._failed(exc) from exc

    async def executemany(self, query: str, args: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each argument tuple, pipelined."""
        try:
            await run_aio(self._raw.executemany, query, args)
        except _MAPPED as exc:
            raise self._failed(exc) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """Run the block in a transaction: commit on success, roll back on any exception.

        Cancellation rolls back (shielded, bounded) and re-raises.
        """
        try:
            tx = self._raw.transaction()
            await run_aio(tx.start)
        except BaseException as exc:
            # Interrupted BEGIN: the transaction may or may not be open; never reuse that.
            _drop(self._raw)
            if isinstance(exc, _MAPPED):
                raise map_pg_error(exc) from exc
            raise
        try:
            yield self
        except BaseException:
            rolled_back = False
            with trio.move_on_after(_CLEANUP_SECONDS, shield=True):
                try:
                    await run_aio(tx.rollback)
                    rolled_back = True
                except _MAPPED:
                    pass
            if not rolled_back:
                # A cancelled query can leave the connection mid-operation, so the rollback
                # could not run: drop the connection (the server rolls back on disconnect)
                # rather than hand a connection with an open transaction back to the pool.
                _drop(self._raw)
            raise
        try:
            await run_aio(tx.commit)
        except BaseException as exc:
            # Interrupted COMMIT: the outcome is unknown to us; never reuse the connection.
            _drop(self._raw)
            if isinstance(exc, _MAPPED):
                raise map_pg_error(exc) from exc
            raise

    async def server_version(self) -> str:
        """Return PostgreSQL's version string, e.g. ``15.19``."""
        return str(await self.fetchval("SHOW server_version"))


class Pool:
    """A pool of PostgreSQL connections, usable from Trio.

    Kept on the Trio side: borrowing and returning a connection are plain Trio operations, so a
    pooled query crosses into asyncio once (asyncpg's own pool costs two more crossings and
    its bookkeeping per query, as much again as a short query). A connection comes back to the
    pool only if it is open and idle: one cancelled mid-query, closed by a lost server, or left
    in a transaction is dropped, and a new one is opened when needed.
    """

    def __init__(self, url: str, max_size: int, connect_kwargs: dict[str, Any]) -> None:
        self._url = url
        self._connect_kwargs = connect_kwargs
        # A semaphore, not a CapacityLimiter: one task may hold two connections (a query on
        # the pool while it holds a transaction).
        self._slots = trio.Semaphore(max_size)
        self._idle: list[Any] = []
        self._warm: weakref.WeakSet[Any] = weakref.WeakSet()  # connections that warmed up
        self._closed = False

    async def _connect(self) -> Any:
        try:
            return await run_aio(partial(asyncpg.connect, self._url, **self._connect_kwargs))
        except _MAPPED as exc:
            raise map_pg_error(exc) from exc

    def _take_idle(self) -> Any:
        """An idle connection still open (one the server closed meanwhile is dropped)."""
        while self._idle:
            raw = self._idle.pop()
            if _is_open(raw):
                return raw
        return None

    def _give_back(self, raw: Any) -> None:
        if self._closed or not _is_open(raw) or raw.is_in_transaction():
            _drop(raw)
        else:
            self._idle.append(raw)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        """Borrow a connection for the block; it is given back (or dropped) even on
        cancellation.

        Raises:
            DatabaseUnavailable: the pool is closed, or no connection could be opened.
        """
        async with self._slots:
            if self._closed:
                raise DatabaseUnavailable("the connection pool is closed")
            raw = self._take_idle() or await self._connect()
            try:
                yield Connection(raw)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Cancelled mid-query: the connection may still be busy with it; drop it.
                    _drop(raw)
                raise
            finally:
                self._give_back(raw)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """Borrow a connection and run the block in a transaction on it."""
        async with self.acquire() as conn, conn.transaction():
            yield conn

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return await conn.execute(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def warm_up(self, statements: Sequence[str]) -> int:
        """Open the pool to its full size and have each connection prepare ``statements``, one
        connection at a time; return how many connections did.

        A connection's first use of a statement costs a parse, a describe and, for types it has
        not met, a catalog query (23 ms for the claim statement against 2 ms afterwards, on
        PostgreSQL 15 here), and opening a connection 6 ms more. Without this, the
        first burst after the control plane starts (every worker reconnecting, say) pays both,
        on each connection it opens and for each statement it runs. Meant to run beside the
        pool's users: a connection warming up is borrowed like any other, and a connection
        that is borrowed meanwhile is left as it is.

        Raises:
            DatabaseError: a statement could not be prepared (it is named).
            DatabaseUnavailable: a connection could not be opened.
        """
        warmed = 0
        while True:
            async with self._slots:
                if self._closed:
                    return warmed
                raw = self._take_cold()
                if raw is None:
                    # Each slot others hold stands for a connection, borrowed or being opened:
                    # with this slot, the pool is full once the idle outnumber the free slots.
                    if sum(1 for c in self._idle if _is_open(c)) > self._slots.value:
                        return warmed
                    raw = await self._connect()
                try:
                    await run_aio(_prepare, raw, statements)
                except BaseException as exc:
                    # Cancelled, or failed anywhere (a private asyncpg call is involved): the
                    # connection may be mid-protocol, so it goes.
                    _drop(raw)
                    if not isinstance(exc, Exception):
                        raise
                    named = isinstance(exc, _NotPrepared)
                    error = map_pg_error((exc.__cause__ if named else None) or exc)
                    if isinstance(error, DatabaseUnavailable):
                        raise error from exc
                    raise DatabaseError(
                        f"{exc if named else 'connection warm-up'}: {error}"
                    ) from exc
                self._warm.add(raw)
                self._give_back(raw)
                warmed += 1

    def _take_cold(self) -> Any:
        """An idle open connection that has not warmed up, taken out of the idle list."""
        for raw in self._idle:
            if raw not in self._warm and _is_open(raw):
                self._idle.remove(raw)
                return raw
        return None

    async def _fill(self, count: int) -> None:
        while len(self._idle) < count:
            self._idle.append(await self._connect())

    async def _close(self) -> None:
        """Close the idle connections (politely, bounded); borrowed ones are dropped when
        given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.move_on_after(_CLEANUP_SECONDS, shield=True):
            while idle:
                raw = idle.pop()
                try:
                    await run_aio(raw.close)
                except _MAPPED:
                    _drop(raw)
        for raw in idle:
            _drop(raw)


class _NotPrepared(Exception):
    """A statement of a warm-up failed to prepare (the cause is the database's error)."""


async def _prepare(raw: asyncpg.Connection, statements: Sequence[str]) -> None:
    """Prepare ``statements`` on ``raw``, in one crossing from Trio."""
    for query in statements:
        try:
            # Into asyncpg's statement cache, where `fetch(query)` and its kin look first (the
            # public `prepare()` returns a handle outside it): STATEMENT_CACHE_SIZE, LRU.
            await raw._get_statement(query, None)
        except _MAPPED as exc:
            first_line = query.strip().splitlines()[0][:80]
            raise _NotPrepared(f"could not prepare {first_line!r}") from exc
    # asyncpg ends a prepare with Flush, not Sync: the implicit transaction it opened stays
    # open, holding a lock on every table the statements name, until the connection's next
    # statement, which for an idle pooled connection may be a long time (DDL such as a
    # migration's DROP INDEX would wait behind it, and every query behind the DDL). A simple
    # query ends that transaction.
    await raw.execute("SELECT 1")


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of the PostgreSQL error behind ``exc`` (itself or its chained causes), if
    any: how code outside this module tells, say, a missing privilege (``42501``) apart."""
    seen: BaseException | None = exc
    while seen is not None:
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str):
            return state
        seen = seen.__cause__
    return None


CONNECT_TIMEOUT_PARAMETER = "connect_timeout"
"""libpq's URL parameter for the seconds one connection attempt may take. asyncpg would send it
to the server as a setting (which PostgreSQL refuses), so it is taken out of the URL here and
becomes asyncpg's ``timeout``."""


def parse_connect_timeout(value: str) -> float | None:
    """The seconds a libpq ``connect_timeout`` value stands for (None: 0 or less, which libpq
    reads as no limit). As in libpq, 1 s counts as 2 s.

    Raises:
        ValueError: ``value`` is not a whole number.
    """
    try:
        seconds = int(value.strip())
    except ValueError:
        raise ValueError(f"connect_timeout={value!r} is not a whole number of seconds") from None
    return float(max(seconds, 2)) if seconds > 0 else None


def split_connect_timeout(url: str) -> tuple[str, float | None]:
    """Return ``url`` without libpq's ``connect_timeout`` and that timeout in seconds (None:
    not given, or no limit).

    Raises:
        ValueError: ``connect_timeout`` is not a whole number (the message does not quote the
            URL, which may hold a password).
    """
    parts = urlsplit(url)
    if CONNECT_TIMEOUT_PARAMETER not in parts.query:
        return url, None
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in pairs if k == CONNECT_TIMEOUT_PARAMETER]
    if not values:
        return url, None
    seconds = parse_connect_timeout(values[-1])  # the last one counts, in libpq and asyncpg
    rest = urlencode([(k, v) for k, v in pairs if k != CONNECT_TIMEOUT_PARAMETER])
    # Cut by hand: urlunsplit would turn a host-less postgresql:///db into postgresql:/db.
    start = url.rindex("?" + parts.query)
    end = start + 1 + len(parts.query)
    return url[:start] + (f"?{rest}" if rest else "") + url[end:], seconds


def _asyncpg_target(url: str) -> tuple[str, float | None]:
    try:
        return split_connect_timeout(url)
    except ValueError as exc:
        raise DatabaseError(f"the database URL is invalid: {exc}") from exc


async def _connect_once(url: str, timeout: float) -> asyncpg.Connection:
    """Connect once; ``timeout`` unless the URL's ``connect_timeout`` says otherwise."""
    dsn, url_timeout = _asyncpg_target(url)
    return await run_aio(partial(asyncpg.connect, dsn, timeout=url_timeout or timeout))


_LOCAL_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

# The files the TLS set-up of a connection reads: libpq's URL parameter, and the variable asyncpg
# reads when the URL does not name one.
_TLS_FILES = (
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslcrl", "PGSSLCRL"),
)


_VERIFYING_MODES = ("verify-ca", "verify-full")


def check_tls_files(url: str) -> None:
    """Make sure that every TLS file ``url`` names (``sslrootcert``, ``sslcert``, ``sslkey``,
    ``sslcrl``, or their ``PGSSL*`` variables) and the connection will read can be read: the
    client certificate and key unless ``sslmode=disable``, the root certificate and the CRL
    only when the server is verified (``verify-ca``, ``verify-full``; below that neither
    asyncpg nor libpq reads them, and a stale ``PGSSLROOTCERT`` must not stop a connection).

    asyncpg reports such a file missing as a bare FileNotFoundError, which names no file and
    looks like a Unix socket not there yet; and it skips ``sslkey`` without ``sslcert``, so a
    typo there would go unnoticed until the server asks for a client certificate.

    Raises:
        DatabaseError: a file cannot be read; names the parameter and the file.
    """
    params = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))  # the last one counts
    mode = params.get("sslmode") or os.environ.get("PGSSLMODE")
    if mode == "disable":
        return
    for name, variable in _TLS_FILES:
        if name in ("sslrootcert", "sslcrl") and mode not in _VERIFYING_MODES:
            continue
        path = params[name] if name in params else os.environ.get(variable, "")
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            where = f"DATABASE_URL's {name}" if name in params else variable
            raise DatabaseError(
                f"{where} file {path} cannot be read ({exc.strerror or exc}); "
                "correct the path, or make the file readable by this process"
            ) from exc


# SQLSTATEs of a connection refused for a reason that passes: the server is starting or
# stopping (57P01-57P03), lacks resources such as connection slots (class 53, with
# too_many_connections 53300), or the connection broke (class 08).
_TEMPORARY_STATES = ("57P01", "57P02", "57P03")
_TEMPORARY_CLASSES = ("53", "08")


def _temporary(exc: BaseException) -> bool:
    """Whether a failed connection attempt may succeed when made again."""
    if isinstance(exc, ssl.SSLError):
        # A certificate or TLS setting refused is the same at every attempt; a TLS connection
        # cut short (EOF) is the network's.
        return isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
    if isinstance(exc, _LOCAL_FILE_ERRORS) and exc.filename is not None:
        # A local file that is missing or unreadable, not the network: a socket's errors name
        # no file (a Unix socket not there yet is a FileNotFoundError, and passes).
        return False
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError)):
        # Unreachable, timed out, or the connection dropped mid-handshake; but a client
        # configuration asyncpg refuses (a bad sslmode) is the same at every attempt.
        return not isinstance(exc, asyncpg.ClientConfigurationError)
    state = getattr(exc, "sqlstate", None)
    if not isinstance(state, str):
        return False
    return state in _TEMPORARY_STATES or state.startswith(_TEMPORARY_CLASSES)


async def wait_until_ready(url: str, *, budget: float, log: Any = None) -> None:
    """Connect until PostgreSQL answers, backing off 0.1 s → 2 s; give up after ``budget`` s.

    Only what may pass is retried: the server unreachable or not answering in time, starting
    up or shutting down (57P01-57P03), out of resources such as connection slots (class 53),
    or the connection broken (class 08). Each attempt is bounded by the URL's libpq
    ``connect_timeout`` if given, else by ``budget`` (1 to 10 s). Cancellation stops it.

    Raises:
        DatabaseUnavailable: no connection within the budget (names the last cause).
        DatabaseError: the server answered but refused us for a reason that stays (a wrong
            password, no such database, no CONNECT privilege, an unknown setting in the URL):
            raised at once, naming PostgreSQL's message; or a TLS file the URL names cannot
            be read (raised at once, naming it).
    """
    await trio.to_thread.run_sync(check_tls_files, url)
    deadline = trio.current_time() + budget
    delay = 0.1
    attempt = 0
    while True:
        attempt += 1
        try:
            conn = await _connect_once(url, timeout=max(1.0, min(10.0, budget)))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not _temporary(exc):
                if isinstance(exc, asyncpg.PostgresError):
                    raise DatabaseError(f"PostgreSQL refused the connection: {cause}") from exc
                raise DatabaseError(f"could not connect to PostgreSQL: {cause}") from exc
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise DatabaseUnavailable(
                    f"PostgreSQL did not accept a connection within {budget:g} s "
                    f"({attempt} attempts; last error: {cause}); check that it is running "
                    "and that DATABASE_URL is right"
                ) from exc
            if log is not None:
                log(f"PostgreSQL not reachable yet ({cause}); retrying in {delay:.1f} s")
            await trio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)
            continue
        with trio.move_on_after(_CLEANUP_SECONDS, shield=True):
            await run_aio(conn.close)
        return


STATEMENT_CACHE_SIZE = 200
"""Statements each pooled connection keeps prepared (asyncpg's LRU cache; its default is 100,
which the control plane's statements outgrew): every statement of queries.sql, prepared at
warm-up, plus room for the few ad hoc ones (tests, operators' runbook checks)."""


@asynccontextmanager
async def open_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float | None = None,
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[Pool]:
    """Open a pool of up to ``max_size`` connections (``min_size`` opened now) for the block;
    it is closed (shielded, bounded) on the way out. ``settings``: server settings every
    connection starts with."""
    # Statements stay prepared for the connection's life (asyncpg's default drops each one
    # five minutes after preparing it, used or not, and the next use prepares it again): the
    # control plane runs a fixed set of them, fewer than the cache holds (STATEMENT_CACHE_SIZE).
    kwargs: dict[str, Any] = {
        "max_cached_statement_lifetime": 0,
        "statement_cache_size": STATEMENT_CACHE_SIZE,
    }
    if command_timeout is not None and math.isfinite(command_timeout):
        kwargs["command_timeout"] = command_timeout
    if settings:
        kwargs["server_settings"] = dict(settings)
    dsn, connect_timeout = _asyncpg_target(url)
    if connect_timeout is not None:
        kwargs["timeout"] = connect_timeout
    pool = Pool(dsn, max_size, kwargs)
    try:
        await pool._fill(min(min_size, max_size))
        yield pool
    finally:
        await pool._close()


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Connection]:
    """Open one dedicated connection for the block (closed shielded on the way out)."""
    try:
        raw = await _connect_once(url, timeout=10.0)
    except _MAPPED as exc:
        raise map_pg_error(exc) from exc
    try:
        yield Connection(raw)
    finally:
        with trio.move_on_after(_CLEANUP_SECONDS, shield=True) as scope:
            try:
                await run_aio(raw.close)
            except _MAPPED:
                pass
        if scope.cancelled_caught:
            _drop(raw)


LISTEN_PING_INTERVAL = 30.0
"""Seconds between the pings that check a LISTEN connection still answers. A connection that
only listens sends nothing: one whose peer vanished without a reset (a network partition, a
host gone) would look alive for as long as TCP takes to give up (hours), and no wake-up would
arrive meanwhile."""

LISTEN_PING_TIMEOUT = 10.0
"""Seconds a ping may take before its LISTEN connection counts as lost."""


async def _ping_until_lost(raw: Any, lost: Callable[[], None]) -> None:
    """Ping a LISTEN connection every `LISTEN_PING_INTERVAL` until it fails to answer within
    `LISTEN_PING_TIMEOUT` (then it is closed at once, without a goodbye, and ``lost`` called)
    or fails outright (its termination listener reports that)."""

    async def cut_off_if_silent(answered: trio.Event) -> None:
        with trio.move_on_after(LISTEN_PING_TIMEOUT):
            await answered.wait()
            return
        _log.warning(
            "the LISTEN connection did not answer within %.0f s; dropping it", LISTEN_PING_TIMEOUT
        )
        await call_in_loop(raw.terminate)  # the ping in flight fails at once
        lost()

    while True:
        await trio.sleep(LISTEN_PING_INTERVAL)
        answered = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_off_if_silent, answered)
            try:
                await run_aio(raw.fetchval, "SELECT 1")
            except _MAPPED:
                return
            finally:
                answered.set()


@asynccontextmanager
async def listen(
    url: str, channels: Sequence[str], *, on_dropped: Callable[[], None] | None = None
) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, str]]]:
    """LISTEN on ``channels`` over a dedicated connection; notifications arrive on the channel.

    The LISTEN is registered before the block starts, so nothing sent after entry is missed.
    If the connection is lost, the receive channel is closed (receivers see EndOfChannel),
    also when it stops answering (`LISTEN_PING_INTERVAL`) without being closed.
    A notification that finds the channel's buffer full is dropped, and ``on_dropped`` is
    called (on the Trio thread) so the receiver can make up for it.
    """
    send, receive = trio.open_memory_channel[tuple[str, str]](1024)
    token = trio.lowlevel.current_trio_token()

    def on_notify(_conn: Any, _pid: int, channel: str, payload: str) -> None:
        # Called on the asyncio side; a full buffer drops the wake-up, never blocks the loop:
        # listeners treat notifications as hints and re-query the table anyway.
        try:
            token.run_sync_soon(_deliver, channel, payload)
        except trio.RunFinishedError:
            pass

    def _deliver(channel: str, payload: str) -> None:
        try:
            send.send_nowait((channel, payload))
        except trio.WouldBlock:
            if on_dropped is not None:
                on_dropped()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def on_lost(_conn: Any) -> None:
        try:
            token.run_sync_soon(send.close)
        except trio.RunFinishedError:
            pass

    async with connect(url) as conn:
        raw = conn._raw
        await call_in_loop(raw.add_termination_listener, on_lost)
        try:
            for channel in channels:
                await run_aio(raw.add_listener, channel, on_notify)
        except _MAPPED as exc:  # the connection died while it registered: as any query's error
            raise map_pg_error(exc) from exc
        async with trio.open_nursery() as pinging:
            pinging.start_soon(_ping_until_lost, raw, send.close)
            try:
                yield receive
            finally:
                send.close()
                pinging.cancel_scope.cancel()
