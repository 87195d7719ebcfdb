"""The trio-asyncio loop that asyncpg and grpclib run on.

One loop per process, opened by whoever owns the process's root nursery (server, worker, client,
tests). Bridged calls find it through trio-asyncio's own context, so nothing here is global.

trio-asyncio's default turns every error asyncio reports in the background ("exception was
never retrieved", a callback that raised) into an exception that tears down the Trio program.
Those reports come from library internals — a connection dropped during teardown, a stream
reset by a peer — whose consequences our own awaited calls already receive, so here they are
logged instead.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio_asyncio

T = TypeVar("T")

log = logging.getLogger("everruns.aio")


def _log_background_error(loop: Any, context: dict[str, Any]) -> None:
    exception = context.get("exception")
    message = context.get("message") or "asyncio background error"
    if exception is not None:
        log.warning("%s: %s: %s", message, type(exception).__name__, exception)
    else:
        log.warning("%s", message)


@asynccontextmanager
async def open_aio_loop() -> AsyncIterator[None]:
    """Run an asyncio loop inside the current Trio task for the duration of the block.

    Re-entrant: if a loop is already open in this context (the server embeds the worker, or a
    test opens one around both), the existing one is used.
    """
    current = trio_asyncio.current_loop.get(None)
    if current is not None:
        current.set_exception_handler(_log_background_error)
        yield
        return
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_background_error)
        yield


async def run_aio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await the asyncio coroutine function ``fn(*args)`` from Trio.

    Cancellation of the calling Trio task cancels the asyncio side.
    """
    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
    return result
