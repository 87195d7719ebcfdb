"""The asyncio loop in its own thread (`everruns._aio.loop`): values, errors and cancellation
crossing both ways, and the loop's lifetime."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from everruns._aio.loop import CallAbandoned, current_aio_loop, open_aio_loop, run_aio


async def test_a_coroutine_runs_on_the_loops_own_thread_and_its_value_comes_back() -> None:
    with trio.fail_after(10):
        async with open_aio_loop():

            async def where(x: int) -> tuple[int, int]:
                await asyncio.sleep(0)
                return threading.get_ident(), x * 2

            ident, doubled = await run_aio(where, 21)
            assert doubled == 42
            assert ident != threading.get_ident()


async def test_an_error_raised_on_the_asyncio_side_is_raised_to_the_caller() -> None:
    class Boom(Exception):
        pass

    async def fails() -> None:
        await asyncio.sleep(0)
        raise Boom("from asyncio")

    def fails_before_awaiting() -> None:
        raise ValueError("not even a coroutine")

    with trio.fail_after(10):
        async with open_aio_loop():
            with pytest.raises(Boom, match="from asyncio"):
                await run_aio(fails)
            with pytest.raises(ValueError, match="not even a coroutine"):
                await run_aio(fails_before_awaiting)  # type: ignore[arg-type]


async def test_cancelling_the_caller_cancels_the_asyncio_task_and_waits_for_its_end() -> None:
    ended = threading.Event()

    async def sleeps() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a while: the caller must wait for it
            ended.set()

    with trio.fail_after(10):
        async with open_aio_loop():
            with trio.move_on_after(0.05) as scope:
                await run_aio(sleeps)
            assert scope.cancelled_caught
            assert ended.is_set()


async def test_a_caller_cancelled_before_the_call_starts_does_not_hang() -> None:
    async def never() -> None:
        await asyncio.sleep(30)

    with trio.fail_after(10):
        async with open_aio_loop():
            with trio.CancelScope() as scope:
                scope.cancel()
                await run_aio(never)
            assert scope.cancelled_caught


async def test_a_value_that_arrives_despite_the_cancel_is_delivered() -> None:
    async def finishes_anyway() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return 7
        return 0

    with trio.fail_after(10):
        async with open_aio_loop():
            got = None
            with trio.move_on_after(0.05):
                got = await run_aio(finishes_anyway)
            assert got == 7


async def test_the_asyncio_side_awaits_a_trio_function_in_the_nursery_it_names() -> None:
    async def trio_double(x: int) -> int:
        await trio.lowlevel.checkpoint()
        return x * 2

    async def trio_fails() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError("trio side")

    with trio.fail_after(10):
        async with open_aio_loop() as aio, trio.open_nursery() as nursery:

            async def from_asyncio() -> tuple[int, str]:
                doubled = await aio.run_trio(nursery, trio_double, 4)
                try:
                    await aio.run_trio(nursery, trio_fails)
                except KeyError as exc:
                    return doubled, str(exc)
                return doubled, ""

            assert await run_aio(from_asyncio) == (8, "'trio side'")


async def test_cancelling_the_asyncio_caller_cancels_the_trio_task() -> None:
    cancelled = trio.Event()

    with trio.fail_after(10):
        async with open_aio_loop() as aio, trio.open_nursery() as nursery:

            async def from_asyncio() -> str:
                running: asyncio.Future[None] = asyncio.get_running_loop().create_future()

                async def trio_waits() -> None:
                    aio.loop.call_soon_threadsafe(running.set_result, None)
                    try:
                        await trio.sleep_forever()
                    except trio.Cancelled:
                        cancelled.set()
                        raise

                task = asyncio.ensure_future(aio.run_trio(nursery, trio_waits))
                await running
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    return "asyncio side cancelled"
                return "not cancelled"

            assert await run_aio(from_asyncio) == "asyncio side cancelled"
            await cancelled.wait()


async def test_the_loop_is_shared_by_nested_blocks_and_stops_after_the_last() -> None:
    with trio.fail_after(10):
        async with open_aio_loop() as outer:
            async with open_aio_loop() as inner:
                assert inner is outer
                assert current_aio_loop() is outer
            # Still usable: the outer block holds it.
            assert await run_aio(asyncio.sleep, 0, "still") == "still"
        assert outer.loop.is_closed()
        with pytest.raises(RuntimeError, match="no asyncio loop is open"):
            current_aio_loop()
        # A new block opens a new loop.
        async with open_aio_loop() as again:
            assert again is not outer
            assert await run_aio(asyncio.sleep, 0, 1) == 1


async def test_calling_without_a_loop_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="use open_aio_loop"):
        await run_aio(asyncio.sleep, 0)


async def test_a_trio_call_cancelled_on_the_trio_side_is_abandoned_not_hung() -> None:
    running = trio.Event()
    host_scope = trio.CancelScope()

    async def waits() -> None:
        running.set()
        await trio.sleep_forever()

    async def host(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        with host_scope:
            async with trio.open_nursery() as handlers:
                task_status.started(handlers)
                await trio.sleep_forever()

    with trio.fail_after(10):
        async with open_aio_loop() as aio, trio.open_nursery() as nursery:
            handlers = await nursery.start(host)

            async def from_asyncio() -> str:
                try:
                    await aio.run_trio(handlers, waits)
                except CallAbandoned:
                    return "abandoned"
                return "answered"

            async def cancel_the_host() -> None:
                await running.wait()
                host_scope.cancel()

            nursery.start_soon(cancel_the_host)
            assert await run_aio(from_asyncio) == "abandoned"
            # The nursery has closed: a new call is abandoned at once.
            assert await run_aio(from_asyncio) == "abandoned"


async def test_calls_fail_instead_of_hanging_once_the_loops_thread_has_died(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A BaseException escaping a callback ends the loop's thread. The call waiting on it, a
    caller cancelled meanwhile and any call made afterwards fail at once (ConnectionError,
    which the adapters map to "unavailable") instead of waiting for ever; leaving the block
    does not hang either."""
    started = threading.Event()

    async def waits() -> None:
        started.set()
        await asyncio.sleep(30)

    def dies() -> None:
        raise SystemExit("the loop's thread ends here")

    with trio.fail_after(10):
        async with open_aio_loop() as aio:
            async with trio.open_nursery() as nursery:

                async def waiting_caller() -> None:
                    with pytest.raises(ConnectionError, match="asyncio loop stopped"):
                        await run_aio(waits)

                nursery.start_soon(waiting_caller)
                await trio.to_thread.run_sync(started.wait)
                aio.loop.call_soon_threadsafe(dies)
            with pytest.raises(ConnectionError, match="asyncio loop stopped"):
                await run_aio(waits)
    assert "the asyncio loop's thread died" in caplog.text
