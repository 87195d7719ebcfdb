"""Test harness: Trio for every async test, and one fresh PostgreSQL database per DB test.

The database comes from DATABASE_URL when set (CI runs the DB tests a second time against the
machine's PostgreSQL 15), else from the embedded PostgreSQL started once per session. A migrated
template database is built once; each test gets `CREATE DATABASE … TEMPLATE` of it, which takes
milliseconds, and drops it afterwards.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
from pytest_trio.plugin import automark

from everruns._aio import open_aio_loop, pg
from everruns.store.migrate import apply_migrations
from everruns.store.store import Store

_AIO_DIRS = ("integration", "e2e")


def _run_with_aio(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # Tests that reach asyncpg/grpclib run with the asyncio loop opened around the whole test,
    # so fixtures and the test body (separate Trio tasks) all inherit it.
    async def main() -> Any:
        async with open_aio_loop():
            return await fn(*args)

    return trio.run(main, **kwargs)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    aio = [i for i in items if any(f"/{d}/" in str(i.path) for d in _AIO_DIRS)]
    plain = [i for i in items if i not in aio]
    automark(plain, run=trio.run)
    automark(aio, run=_run_with_aio)


def pytest_configure(config: pytest.Config) -> None:
    # The tests of Ctrl-C need Python's own SIGINT handler: Trio delivers KeyboardInterrupt
    # only over it. A run started in the background by a shell script inherits SIGINT ignored
    # (as `(scripts/test > log &)` does), and those tests then failed for no fault of the code.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _sigint_handler_left_as_found() -> Iterator[None]:
    """A test that leaves SIGINT's handler changed (a Trio run that did not restore its own,
    say) fails here, and the handler is put back: a later ``trio.run`` installs its Ctrl-C
    handling only over Python's default handler, and tests of Ctrl-C would fail far from the
    cause."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test left SIGINT's handler changed: {after!r} instead of {before!r}")


def with_database(url: str, database: str) -> str:
    """Return ``url`` pointing at another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def wrong_start_deadlines(pool: pg.Pool) -> int:
    """How many live tasks have a stored schedule-to-start deadline other than their
    visibility's (visible_at + schedule_to_start_s): the statements that write it must agree."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM durable_task_queue WHERE status IN ('pending', 'claimed')"
        " AND start_deadline IS DISTINCT FROM"
        " visible_at + make_interval(secs => schedule_to_start_s)"
    )
    return count


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server to create test databases on."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from everruns.store import embedded

    # One cluster per session: a cluster shared between sessions would be stopped under the
    # others by whichever session ends first.
    chosen = os.environ.get("EVERRUNS_TEST_DATA_DIR")
    data_dir = Path(chosen or tempfile.mkdtemp(prefix="everruns-test-pg-")) / "pg"
    handle = embedded.start(data_dir)
    try:
        yield handle.url
    finally:
        embedded.stop(handle)
        if not chosen:
            shutil.rmtree(data_dir.parent, ignore_errors=True)


_counter = itertools.count()


async def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` of the server at ``server_url`` if it exists, its sessions
    ended."""
    async with pg.connect(server_url) as admin:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> Iterator[str]:
    """Name of a freshly migrated template database (built once per session, dropped at its
    end: on a shared server, one left behind per test run would pile up)."""
    name = f"everruns_tpl_{os.getpid()}"

    async def build() -> None:
        async with open_aio_loop():
            await drop_database(pg_server_url, name)  # one a killed run with this pid left
            async with pg.connect(pg_server_url) as admin:
                await admin.execute(f'CREATE DATABASE "{name}"')
            async with pg.connect(with_database(pg_server_url, name)) as c:
                await apply_migrations(c)

    async def drop() -> None:
        with trio.fail_after(30):
            async with open_aio_loop():
                await drop_database(pg_server_url, name)

    trio.run(build)
    try:
        yield name
    finally:
        trio.run(drop)


@pytest.fixture
async def database_url(pg_server_url: str, template_database: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database for this test only."""
    name = f"everruns_t_{os.getpid()}_{next(_counter)}"
    async with pg.connect(pg_server_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield with_database(pg_server_url, name)
    finally:
        with trio.move_on_after(10, shield=True):
            await drop_database(pg_server_url, name)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[pg.Pool]:
    async with pg.open_pool(database_url, min_size=1, max_size=10) as p:
        yield p


@pytest.fixture
async def store(pool: pg.Pool) -> Store:
    import random

    return Store(pool, rng=random.Random(7))


def fail_after(seconds: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an async test with an absolute deadline (a hang fails fast)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            with trio.fail_after(seconds):
                return await fn(*args, **kwargs)

        return run

    return wrap
