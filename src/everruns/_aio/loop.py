"""The trio-asyncio loop that asyncpg and grpclib run on.

One loop per process, opened by whoever owns the process's root nursery (server, worker, client,
tests). Bridged calls find it through trio-asyncio's own context, so nothing here is global.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio_asyncio

T = TypeVar("T")


@asynccontextmanager
async def open_aio_loop() -> AsyncIterator[None]:
    """Run an asyncio loop inside the current Trio task for the duration of the block.

    Re-entrant: if a loop is already open in this context (the server embeds the worker, or a
    test opens one around both), the existing one is used.
    """
    if trio_asyncio.current_loop.get(None) is not None:
        yield
        return
    async with trio_asyncio.open_loop():
        yield


async def run_aio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await the asyncio coroutine function ``fn(*args)`` from Trio.

    Cancellation of the calling Trio task cancels the asyncio side.
    """
    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
    return result
