"""A LISTEN connection whose peer goes silent without closing it is noticed and dropped.

A connection that only listens sends nothing, so a network partition or a vanished host (no
reset, no FIN) would leave it looking alive for as long as TCP takes to give up, hours, and no
wake-up would arrive meanwhile. `pg.listen` pings it and closes it when a ping goes unanswered;
its receiver then sees the channel end and reconnects.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio

from everruns._aio import pg
from tests.conftest import fail_after

pytestmark = pytest.mark.db


class Proxy:
    """A TCP proxy in front of PostgreSQL that can stop passing bytes, both ways, without
    closing anything: what a partition looks like to both ends."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = trio.Event()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while data := await source.receive_some(65536):
            if self.silent.is_set():
                await trio.sleep_forever()
            await sink.send_all(data)

    async def _serve(self, client: trio.SocketStream) -> None:
        async with (
            client,
            await trio.open_tcp_stream(*self.target) as server,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._pump, client, server)
            nursery.start_soon(self._pump, server, client)


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[str, Proxy]]:
    parts = urlsplit(url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, proxy._serve, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        yield urlunsplit(parts._replace(netloc=netloc)), proxy
        nursery.cancel_scope.cancel()


@fail_after(30)
async def test_a_listen_connection_gone_silent_is_dropped(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the receive channel stayed open for ever (until TCP gave up): the notifier
    never reconnected, and every wake-up was lost until then."""
    monkeypatch.setattr(pg, "LISTEN_PING_INTERVAL", 0.2)
    monkeypatch.setattr(pg, "LISTEN_PING_TIMEOUT", 0.5)
    async with proxied(database_url) as (url, proxy), pg.listen(url, ["everruns_test"]) as notes:
        with trio.move_on_after(1):  # pings answered: it stays open
            await notes.receive()
        proxy.silent.set()
        with trio.fail_after(5), pytest.raises(trio.EndOfChannel):
            await notes.receive()


@fail_after(30)
async def test_a_listen_connection_that_answers_stays_open_and_delivers(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "LISTEN_PING_INTERVAL", 0.05)
    async with pg.listen(database_url, ["everruns_test"]) as notes, pg.connect(database_url) as db:
        await trio.sleep(0.3)  # several pings
        await db.execute("NOTIFY everruns_test, 'hello'")
        with trio.fail_after(5):
            assert await notes.receive() == ("everruns_test", "hello")
