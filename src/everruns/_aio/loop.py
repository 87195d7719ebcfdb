"""The asyncio loop that asyncpg and grpclib run on: its own thread, one per Trio run.

asyncpg and grpclib need an asyncio loop. It runs in a thread of its own (uvloop when installed,
else the standard selector loop), opened by whoever owns the Trio run's root nursery (server,
worker, client, tests) and shared by everything in that run. Two doors cross between the threads:

- `run_aio(fn, *args)`: a Trio task awaits the asyncio coroutine ``fn(*args)``. Cancelling the
  Trio task cancels the asyncio task, and the Trio task waits until the asyncio side has really
  ended, so a cancelled query or call never outlives its caller.
- `AioLoop.run_trio` (the gRPC server's door): an asyncio task awaits a Trio function, run as a
  task in a nursery the caller names. Cancelling the asyncio task cancels the Trio task.

Each crossing costs one wake-up of the other thread. Before this, the loop was trio-asyncio's
loop hosted on Trio, which spent about three times as much CPU per pooled query under load
(docs/performance.md has the measurement).

If the loop's thread ends while calls are in flight (a `BaseException` such as `SystemExit`
escaped a callback, say), each of them fails with `ConnectionError`, as any call made after it
does: a caller never waits for a loop that is gone.

asyncio's reports of background errors ("exception was never retrieved", a callback that raised)
come from library internals — a connection dropped during teardown, a stream reset by a peer —
whose consequences our own awaited calls already receive, so they are logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

log = logging.getLogger("everruns.aio")

_SHUTDOWN_SECONDS = 10.0


def _log_background_error(loop: Any, context: dict[str, Any]) -> None:
    exception = context.get("exception")
    message = context.get("message") or "asyncio background error"
    if exception is not None:
        log.warning("%s: %s: %s", message, type(exception).__name__, exception)
    else:
        log.warning("%s", message)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.SelectorEventLoop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class CallAbandoned(Exception):
    """A Trio function called from asyncio ended without an outcome: it was cancelled from
    the Trio side (its nursery or the whole run is ending)."""


class _ToAio:
    """One Trio → asyncio call in flight."""

    __slots__ = ("_aio", "_args", "_fn", "_raise_cancel", "_task", "_trio_task", "finished")

    def __init__(self, aio: AioLoop, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]):
        self._aio = aio
        self._fn = fn
        self._args = args
        self._task: asyncio.Future[Any] | None = None
        self._raise_cancel: Any = None
        self._trio_task = trio.lowlevel.current_task()
        self.finished = False

    def start(self) -> None:  # on the asyncio thread
        try:
            self._task = asyncio.ensure_future(self._fn(*self._args), loop=self._aio.loop)
        except BaseException as exc:  # fn raised before returning an awaitable: the caller's
            self._tell(outcome.Error(exc))
            return
        self._task.add_done_callback(self._done)
        if self._raise_cancel is not None:
            self._task.cancel()

    def _done(self, task: asyncio.Future[Any]) -> None:  # on the asyncio thread
        if task.cancelled():
            self._tell(None)
            return
        error = task.exception()
        self._tell(outcome.Error(error) if error is not None else outcome.Value(task.result()))

    def _tell(self, result: outcome.Outcome[Any] | None) -> None:  # on the asyncio thread
        try:
            self._aio.token.run_sync_soon(self._finish, result)
        except trio.RunFinishedError:  # cannot happen while the Trio task waits
            pass

    def cancel(self) -> None:  # on the asyncio thread
        if self._task is not None:
            self._task.cancel()

    def _finish(self, result: outcome.Outcome[Any] | None) -> None:  # on the Trio thread
        if self.finished:  # the loop's end failed it already (`AioLoop._fail_calls`)
            return
        self.finished = True
        self._aio.calls.discard(self)
        if self._raise_cancel is not None and not isinstance(result, outcome.Value):
            # Cancelled while the asyncio side ran: whatever it ended with, the caller sees
            # its own cancellation (a value that arrived anyway is still delivered).
            result = outcome.capture(self._raise_cancel)
        elif result is None:  # cancelled, but not by us: only a stopping loop does that
            result = outcome.Error(ConnectionError("the asyncio loop stopped"))
        trio.lowlevel.reschedule(self._trio_task, result)

    def abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:  # on the Trio thread
        first = self._raise_cancel is None
        self._raise_cancel = raise_cancel
        if first:
            try:
                self._aio.loop.call_soon_threadsafe(self.cancel)
            except RuntimeError:  # the loop is closed: its end fails this call (soon, if not yet)
                pass
        # The asyncio task must end first; `_done` reports when it has.
        return trio.lowlevel.Abort.FAILED


class _ToTrio:
    """One asyncio → Trio call in flight."""

    __slots__ = ("_aio", "_args", "_cancelled", "_fn", "_scope", "future", "orphan")

    def __init__(
        self,
        aio: AioLoop,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        orphan: Callable[[Any], None] | None = None,
    ):
        self._aio = aio
        self._fn = fn
        self._args = args
        self._scope: trio.CancelScope | None = None
        self._cancelled = False
        self.future: asyncio.Future[Any] = aio.loop.create_future()
        self.orphan = orphan

    def _settle(self, value: Any, error: BaseException | None) -> None:  # asyncio thread
        if self.future.done():  # its awaiter was cancelled: nobody takes the value
            if error is None and self.orphan is not None:
                self.orphan(value)
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)

    def _abandon(self) -> None:  # asyncio thread
        if not self.future.done():
            self.future.set_exception(CallAbandoned("the Trio side ended before answering"))

    def start_in(self, nursery: trio.Nursery) -> None:  # on the Trio thread
        try:
            nursery.start_soon(self.run)
        except RuntimeError:  # the nursery closed: the server is going away
            self._aio.loop.call_soon_threadsafe(self._abandon)

    async def run(self) -> None:  # a Trio task
        settled = False
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                if self._cancelled:
                    scope.cancel()
                try:
                    value = await self._fn(*self._args)
                except Exception as exc:
                    self._aio.loop.call_soon_threadsafe(self._settle, None, exc)
                else:
                    self._aio.loop.call_soon_threadsafe(self._settle, value, None)
                settled = True
        finally:
            if not settled:
                self._aio.loop.call_soon_threadsafe(self._abandon)

    def cancel(self) -> None:  # on the Trio thread
        self._cancelled = True
        if self._scope is not None:
            self._scope.cancel()


class AioLoop:
    """An asyncio loop running in its own thread, and the Trio run it serves."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.loop.set_exception_handler(_log_background_error)
        self.token = trio.lowlevel.current_trio_token()
        self.users = 0
        self.calls: set[_ToAio] = set()  # in flight, to fail if the loop's thread ends
        self._ended = trio.Event()
        self._thread = threading.Thread(target=self._serve, name="everruns-asyncio", daemon=True)

    def _serve(self) -> None:  # the loop's thread
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_forever()
            except BaseException:  # nothing above this thread would see it: say so, end
                log.critical(
                    "the asyncio loop's thread died; calls through it now fail", exc_info=True
                )
                return
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=_SHUTDOWN_SECONDS))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            try:
                self.token.run_sync_soon(self._fail_calls)
            except trio.RunFinishedError:
                pass

    def _fail_calls(self) -> None:  # on the Trio thread, once the loop is closed
        """Fail the calls still in flight: the loop that would have answered them is gone
        (an orderly stop has answered them all already)."""
        gone = outcome.Error(ConnectionError("the asyncio loop stopped"))
        for call in list(self.calls):
            call._finish(gone)
        self._ended.set()

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Stop the loop (its leftover tasks are cancelled) and wait for its thread, bounded."""
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed: its thread has ended already
            pass
        with trio.move_on_after(_SHUTDOWN_SECONDS + 2, shield=True) as scope:
            await self._ended.wait()
        if scope.cancelled_caught:
            log.warning("the asyncio loop's thread did not end within %.0f s", _SHUTDOWN_SECONDS)
        else:
            self._thread.join()

    async def run_aio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Raises:
        ConnectionError: the loop has stopped (before or during the call)."""
        call = _ToAio(self, fn, args)
        try:
            self.loop.call_soon_threadsafe(call.start)
        except RuntimeError:  # closed
            await trio.lowlevel.checkpoint()
            raise ConnectionError("the asyncio loop stopped") from None
        self.calls.add(call)
        result: T = await trio.lowlevel.wait_task_rescheduled(call.abort)
        return result

    async def run_trio(
        self,
        nursery: trio.Nursery,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        orphan: Callable[[T], None] | None = None,
    ) -> T:
        """Await the Trio function ``fn(*args)`` from the asyncio thread, as a task of
        ``nursery``; cancelling the awaiting asyncio task cancels it.

        ``orphan``: called on the asyncio thread with a value ``fn`` returned that its awaiter,
        cancelled, will never take (returned before the cancellation reached it, or in spite
        of it)."""
        call = _ToTrio(self, fn, args, orphan)
        try:
            self.token.run_sync_soon(call.start_in, nursery)
        except trio.RunFinishedError:
            raise CallAbandoned("the Trio run has ended") from None
        try:
            result: T = await call.future
        except asyncio.CancelledError:
            future = call.future
            # A value that came just before the cancellation reached this task:
            settled = future.done() and not future.cancelled() and future.exception() is None
            if orphan is not None and settled:
                orphan(future.result())
            try:
                self.token.run_sync_soon(call.cancel)
            except trio.RunFinishedError:
                pass
            raise
        return result


_loop_of_run: trio.lowlevel.RunVar[AioLoop | None] = trio.lowlevel.RunVar("everruns_aio_loop")


def current_aio_loop() -> AioLoop:
    """The asyncio loop of this Trio run.

    Raises:
        RuntimeError: no loop is open (the caller forgot `open_aio_loop`).
    """
    aio = _loop_of_run.get(None)
    if aio is None:
        raise RuntimeError("no asyncio loop is open in this Trio run; use open_aio_loop()")
    return aio


@asynccontextmanager
async def open_aio_loop() -> AsyncIterator[AioLoop]:
    """Run the asyncio loop for the duration of the block.

    Re-entrant and shared: if this Trio run has a loop open (the server embeds the worker, or a
    test opens one around both), it is used, and the last block to leave stops it.
    """
    aio = _loop_of_run.get(None)
    if aio is None:
        aio = AioLoop()
        aio.start()
        _loop_of_run.set(aio)
    aio.users += 1
    try:
        yield aio
    finally:
        aio.users -= 1
        if aio.users == 0:
            _loop_of_run.set(None)
            await aio.stop()


async def run_aio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await the asyncio coroutine function ``fn(*args)`` from Trio.

    Cancellation of the calling Trio task cancels the asyncio side and waits for it to end.

    Raises:
        RuntimeError: no loop is open.
    """
    return await current_aio_loop().run_aio(fn, *args)


async def call_in_loop(fn: Callable[..., T], *args: Any) -> T:
    """Call the plain function ``fn(*args)`` on the loop's thread (to build or close an object
    bound to the loop) and return its result."""

    async def call() -> T:
        return fn(*args)

    return await run_aio(call)


__all__ = [
    "AioLoop",
    "CallAbandoned",
    "call_in_loop",
    "current_aio_loop",
    "open_aio_loop",
    "run_aio",
]
