"""everruns embedded in a host Trio program (serve, Worker.run and Client in the host's
own nurseries), each scenario in a `trio.run` of its own with no asyncio loop opened around it,
as a host program runs it. Checks: bounded stops, nothing left behind (threads, connections to
the test database), cancellation seen as Cancelled, the host's exceptions unchanged. From a
review (session 17): four tests failed on the code before (a taken port raised a nested group,
not ServerUnavailable; Client.connect unwrapped the host's own group; cancelling Worker.run
never told a running sync activity; a stop with an activity running took the final report's
whole 5 s budget); the others prove what held."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

import everruns
from everruns import Client, ServerConfig, Worker
from everruns._aio import open_aio_loop, pg
from everruns.domain.registry import Registry, activity, workflow
from tests.conftest import drop_database, with_database

pytestmark = pytest.mark.db

_counter = iter(range(10**6))


def _psql(server_url: str, sql: str) -> str:
    out = subprocess.run(
        ["psql", server_url, "-Atc", sql], capture_output=True, text=True, timeout=20, check=True
    )
    return out.stdout.strip()


def backends(server_url: str, name: str) -> int:
    """Client backends connected to database ``name`` right now."""
    return int(
        _psql(
            server_url,
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}' "
            "AND backend_type = 'client backend'",
        )
    )


class Db:
    def __init__(self, server_url: str, name: str) -> None:
        self.server_url = server_url
        self.name = name
        self.url = with_database(server_url, name)

    def backends(self) -> int:
        return backends(self.server_url, self.name)

    def backends_settled(self, seconds: float = 3.0) -> int:
        """Backends once they had ``seconds`` to go away (a closed connection's backend ends
        a moment after the client closed it)."""
        end = time.monotonic() + seconds
        while True:
            n = self.backends()
            if n == 0 or time.monotonic() > end:
                return n
            time.sleep(0.05)


@pytest.fixture
def db(pg_server_url: str, template_database: str) -> Iterator[Db]:
    name = f"everruns_rev17_{os.getpid()}_{next(_counter)}"

    async def create() -> None:
        with trio.fail_after(30):
            async with open_aio_loop(), pg.connect(pg_server_url) as admin:
                await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')

    async def drop() -> None:
        with trio.fail_after(30):
            async with open_aio_loop():
                await drop_database(pg_server_url, name)

    trio.run(create)
    try:
        yield Db(pg_server_url, name)
    finally:
        trio.run(drop)


def aio_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "everruns-asyncio" and t.is_alive()]


def config(db: Db, **overrides: Any) -> ServerConfig:
    return ServerConfig(database_url=db.url, grpc_port=0, **overrides)


def make_registry() -> tuple[Registry, dict[str, Any]]:
    reg = Registry()
    seen: dict[str, Any] = {}

    @activity(registry=reg)
    async def echo(ctx: Any, value: Any) -> Any:
        return value

    @activity(registry=reg)
    async def forever(ctx: Any, value: Any) -> Any:
        seen["forever"] = True
        await trio.sleep_forever()

    @workflow(registry=reg)
    async def echo_wf(ctx: Any, value: Any) -> Any:
        return await ctx.execute_activity(echo, value)

    @workflow(registry=reg)
    async def forever_wf(ctx: Any, value: Any) -> Any:
        return await ctx.execute_activity(forever, value)

    @workflow(registry=reg)
    async def waiting_wf(ctx: Any, value: Any) -> Any:
        return await ctx.wait_signal("go")

    return reg, seen


async def until(check: Callable[[], Any]) -> None:
    """Wait until ``check()`` (sync or async) is true: external state, polled."""
    while True:
        value = check()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return
        await trio.sleep(0.01)


async def activity_recorded(handle: Any) -> bool:
    return bool((await handle.describe()).pending_activities)


def run(main: Callable[[], Any], seconds: float = 25) -> Any:
    """``trio.run(main)`` under an absolute deadline."""

    async def bounded() -> Any:
        with trio.fail_after(seconds):
            return await main()

    return trio.run(bounded)


# ------------------------------------------------------------ defects (each fails today)


def test_serve_on_a_port_in_use_raises_server_unavailable_not_a_nested_group(
    db: Db,
) -> None:
    """DEFECT: `serve`'s docstring: "Raises: ServerUnavailable: the gRPC address cannot be bound." A
    host that writes `except ServerUnavailable` around `nursery.start(serve, ...)` must catch
    it, and nothing may be left behind."""
    import socket

    from everruns.errors import ServerUnavailable

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(
                    everruns.serve, ServerConfig(database_url=db.url, grpc_port=port)
                )
            except ServerUnavailable as exc:
                return exc
            except BaseExceptionGroup as group:
                return group
        return None

    try:
        raised = run(main)
    finally:
        sock.close()
    assert isinstance(raised, ServerUnavailable), repr(raised)
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_client_connect_leaves_the_hosts_own_exception_group_alone() -> None:
    """DEFECT: an ExceptionGroup raised by the host's own code inside `Client.connect` (e.g. by
    one of its own nurseries, which always raise groups under strict exception groups) comes
    out as its bare sole exception: the host's `except ExceptionGroup` / `except* ...` handlers
    and the group's message, notes and traceback are lost. No connection is needed: connecting
    is lazy."""

    class Mine(Exception):
        pass

    original = ExceptionGroup("the host's own group", [Mine("one")])

    async def main() -> Any:
        try:
            async with Client.connect("127.0.0.1:1"):
                raise original
        except BaseException as exc:
            return exc
        return None

    raised = run(main, 10)
    assert raised is original, f"the host's group came out as {raised!r}"


def test_cancelling_worker_run_tells_a_running_sync_activity(db: Db) -> None:
    """DEFECT: `Worker.run` documents cancellation as "an immediate stop", and
    `ActivityContext.cancel_requested` as "True once the worker decided to stop this attempt
    (cancel request, lost lease or shutdown)" — the only way a sync activity (a thread Trio
    cannot interrupt) can stop early. When the host cancels `Worker.run`, nothing sets it: the
    activity runs to its natural end and the host's cancellation waits for it (10 s here; for
    ever for an activity that loops until told)."""
    reg = Registry()
    running = threading.Event()
    saw: list[bool] = []

    @activity(registry=reg)
    def patient(ctx: Any, value: Any) -> Any:
        running.set()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if ctx.cancel_requested:
                saw.append(True)
                return "stopped early"
            time.sleep(0.01)
        saw.append(False)
        return "ran to the end"

    @workflow(registry=reg)
    async def patient_wf(ctx: Any, value: Any) -> Any:
        return await ctx.execute_activity(patient, value)

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            with trio.CancelScope() as worker_scope:
                async with trio.open_nursery() as workers:
                    await workers.start(Worker(reg, address=info.address).run)
                    async with Client.connect(info.address) as client:
                        handle = await client.start_workflow("patient_wf", 1)
                        await until(lambda: running.is_set())
                        await until(lambda: activity_recorded(handle))
                        await trio.sleep(0.3)
                    began = trio.current_time()
                    worker_scope.cancel()
            took = trio.current_time() - began
            nursery.cancel_scope.cancel()
        return took

    took = run(main)
    assert saw == [True], f"the activity was never told (saw={saw})"
    assert took < 3, f"Worker.run took {took:.1f} s to stop after its scope was cancelled"


def test_stopping_the_embedding_example_with_an_activity_running_is_prompt(db: Db) -> None:
    """DEFECT (minor): the README's embedding (serve, Worker.run and Client in one nursery).
    Cancelling that nursery while one activity runs takes FINAL_REPORT_BUDGET (5 s): the
    worker's shielded final report (FailActivityTask) retries with backoff against a control
    plane that the same cancellation has already stopped (connection refused every time);
    without a running activity the same stop takes milliseconds."""
    reg, seen = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            await nursery.start(Worker(reg, address=info.address, worker_id="w1").run)
            async with Client.connect(info.address) as client:
                handle = await client.start_workflow("forever_wf", 1)
                await until(lambda: seen.get("forever"))
                await until(lambda: activity_recorded(handle))
                await trio.sleep(0.5)
            began = trio.current_time()
            nursery.cancel_scope.cancel()
        return trio.current_time() - began

    stop = run(main)
    assert stop < 3, f"stopping took {stop:.1f} s"
    assert aio_threads() == []
    assert db.backends_settled() == 0


# ----------------------------------------------------- checked and found correct (pass)


def test_embedding_example_runs_and_leaves_nothing_behind(db: Db) -> None:
    reg, _ = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            await nursery.start(Worker(reg, address=info.address, worker_id="w1").run)
            async with Client.connect(info.address) as client:
                handle = await client.start_workflow("echo_wf", {"x": 1})
                result = await handle.result()
            began = trio.current_time()
            nursery.cancel_scope.cancel()
        return result, trio.current_time() - began

    result, stop = run(main)
    assert result == {"x": 1}
    assert stop < 5, f"stopping took {stop:.1f} s"
    assert aio_threads() == []
    assert db.backends_settled() == 0


@pytest.mark.parametrize("delay", [0, 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
def test_cancel_serve_during_startup(db: Db, delay: float) -> None:
    async def main() -> Any:
        began = None
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: nursery.start(everruns.serve, config(db)))
                await trio.sleep(delay)
                began = trio.current_time()
                scope.cancel()
        return trio.current_time() - began

    stop = run(main)
    assert stop < 3, f"stopping took {stop:.1f} s"
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_two_runs_one_after_another(db: Db) -> None:
    reg, _ = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            await nursery.start(Worker(reg, address=info.address).run)
            async with Client.connect(info.address) as client:
                handle = await client.start_workflow("echo_wf", 5)
                result = await handle.result()
            nursery.cancel_scope.cancel()
        return result

    assert run(main) == 5
    assert run(main) == 5
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_two_planes_in_one_run(db: Db) -> None:
    reg, _ = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            a = await nursery.start(everruns.serve, config(db))
            b = await nursery.start(everruns.serve, config(db))
            await nursery.start(Worker(reg, address=a.address).run)
            async with Client.connect(b.address) as client:
                handle = await client.start_workflow("echo_wf", 5)
                result = await handle.result()
            nursery.cancel_scope.cancel()
        return result

    assert run(main) == 5
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_host_exception_cancels_everything_and_propagates(db: Db) -> None:
    reg, _ = make_registry()

    class HostError(Exception):
        pass

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            await nursery.start(Worker(reg, address=info.address).run)
            async with Client.connect(info.address) as client:
                await client.start_workflow("waiting_wf", 5)
                raise HostError("boom")

    began = time.monotonic()
    with pytest.raises(BaseException) as info:
        run(main)
    took = time.monotonic() - began
    assert isinstance(info.value, BaseExceptionGroup), repr(info.value)
    assert info.value.split(HostError)[1] is None, repr(info.value)  # HostError and nothing else
    assert took < 5
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_keyboard_interrupt_stops_everything(db: Db) -> None:
    import signal

    reg, _ = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            await nursery.start(Worker(reg, address=info.address).run)
            async with Client.connect(info.address) as client:
                handle = await client.start_workflow("waiting_wf", 1)
                await trio.sleep(0.3)
                signal.raise_signal(signal.SIGINT)
                await handle.result()

    began = time.monotonic()
    with pytest.raises(BaseException) as caught:
        run(main)
    took = time.monotonic() - began
    assert took < 5, took
    assert isinstance(caught.value, KeyboardInterrupt) or (
        isinstance(caught.value, BaseExceptionGroup)
        and caught.value.subgroup(KeyboardInterrupt) is not None
    ), repr(caught.value)
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_many_start_stop_cycles_in_one_run_do_not_grow(db: Db) -> None:
    reg, _ = make_registry()

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    counts: list[tuple[int, int]] = []

    async def cycle() -> None:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db, pool_size=2))
            await nursery.start(Worker(reg, address=info.address).run)
            async with Client.connect(info.address) as client:
                handle = await client.start_workflow("echo_wf", 1)
                assert await handle.result() == 1
            nursery.cancel_scope.cancel()

    async def main() -> None:
        for _ in range(15):
            await cycle()
            counts.append((fds(), threading.active_count()))

    run(main, 25)
    assert counts[-1][0] <= counts[4][0] + 3, counts
    assert counts[-1][1] <= counts[4][1] + 1, counts


def test_client_tasks_cancelled_with_the_nursery_see_only_cancelled(db: Db) -> None:
    reg, _ = make_registry()
    outcomes: list[str] = []

    async def record(fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except trio.Cancelled:
            outcomes.append("cancelled")
            raise
        except BaseException as exc:
            outcomes.append(repr(exc))
            raise

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            await nursery.start(Worker(reg, address=info.address).run)
            async with Client.connect(info.address) as client, trio.open_nursery() as tasks:
                handles = [await client.start_workflow("waiting_wf", i) for i in range(5)]

                async def spin(handle: Any) -> None:
                    while True:
                        await handle.describe()

                for h in handles:
                    tasks.start_soon(record, h.result)
                    tasks.start_soon(record, lambda h=h: spin(h))
                await trio.sleep(0.5)
                began = trio.current_time()
                nursery.cancel_scope.cancel()
        return trio.current_time() - began

    took = run(main)
    assert outcomes == ["cancelled"] * 10, outcomes
    assert took < 3
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_a_client_waiting_on_a_plane_that_stops_is_told_promptly(db: Db) -> None:
    from everruns.errors import ServerUnavailable

    got: list[Any] = []

    async def main() -> Any:
        async with trio.open_nursery() as outer:
            plane_scope = trio.CancelScope()

            async def plane(task_status: Any) -> None:
                with plane_scope:
                    await everruns.serve(config(db), task_status=task_status)

            info = await outer.start(plane)
            async with Client.connect(info.address) as client:
                handle = await client.start_workflow("waiting_wf", 1)

                async def wait() -> None:
                    try:
                        await handle.result()
                    except Exception as exc:
                        got.append((exc, trio.current_time()))

                async with trio.open_nursery() as waiters:
                    waiters.start_soon(wait)
                    await trio.sleep(0.3)
                    began = trio.current_time()
                    plane_scope.cancel()
        return began

    began = run(main)
    assert len(got) == 1 and isinstance(got[0][0], ServerUnavailable), got
    assert got[0][1] - began < 5


def test_shutdown_before_run_returns_promptly(db: Db) -> None:
    reg, _ = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            worker = Worker(reg, address=info.address)
            worker.shutdown()
            began = trio.current_time()
            await worker.run()
            took = trio.current_time() - began
            async with Client.connect(info.address) as client:
                workers = await client.list_workers(include_stopped=True)
            nursery.cancel_scope.cancel()
        return took, workers

    took, workers = run(main)
    assert took < 2
    assert [w.status for w in workers] == ["stopped"]


def test_cancel_worker_while_registering_against_nothing() -> None:
    reg, _ = make_registry()

    async def main() -> Any:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        with trio.move_on_after(1.5) as scope:
            await Worker(reg, address=f"127.0.0.1:{port}").run()
        return scope.cancelled_caught

    assert run(main) is True
    assert aio_threads() == []


@pytest.mark.parametrize("delay", [0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_cancel_right_after_readiness(db: Db, delay: float) -> None:
    reg, _ = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            nursery.start_soon(Worker(reg, address=info.address).run)
            await trio.sleep(delay)
            began = trio.current_time()
            nursery.cancel_scope.cancel()
        return trio.current_time() - began

    took = run(main)
    assert took < 3, took
    assert aio_threads() == []
    assert db.backends_settled() == 0


def test_cancel_during_a_graceful_shutdown_stops_at_once(db: Db) -> None:
    reg, seen = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            worker = Worker(reg, address=info.address, grace_period=20)
            with trio.CancelScope() as worker_scope:
                async with trio.open_nursery() as workers:
                    await workers.start(worker.run)
                    async with Client.connect(info.address) as client:
                        handle = await client.start_workflow("forever_wf", 1)
                        await until(lambda: activity_recorded(handle))
                        await until(lambda: seen.get("forever"))
                    await trio.sleep(0.3)
                    worker.shutdown()
                    await trio.sleep(0.3)
                    began = trio.current_time()
                    worker_scope.cancel()
            took = trio.current_time() - began
            nursery.cancel_scope.cancel()
        return took

    took = run(main)
    assert took < 3, took


def test_worker_built_outside_the_trio_run(db: Db) -> None:
    reg, _ = make_registry()
    worker = Worker(reg, address="127.0.0.1:1")

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            worker.config = attrs_evolve(worker.config, info.port)
            await nursery.start(worker.run)
            async with Client.connect(info.address) as client:
                result = await (await client.start_workflow("echo_wf", 3)).result()
            nursery.cancel_scope.cancel()
        return result

    assert run(main) == 3


def attrs_evolve(cfg: Any, port: int) -> Any:
    import attrs

    return attrs.evolve(cfg, port=port)


def test_cancelling_a_worker_whose_cancellation_stream_is_not_open_yet_stops_it(
    db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker waits, after registering, for its cancellation stream's first message before
    it claims. Cancelled during that wait, it left the stream's loop running: the loop is
    shielded (it closes only after the goodbye), and only the code after the wait cancelled
    it, so the worker's nursery waited for it for ever, reconnecting (a fresh-clone CI run
    hung here, on test_cancel_right_after_readiness). Here the stream never opens, and its
    loop gives up after 5 s by itself: stopping must not wait for that."""
    from everruns.worker import runtime

    async def never_opens(self: Any) -> None:
        for _ in range(100):  # reconnecting, shielded; gives up after 5 s on its own
            await trio.sleep(0.05)

    monkeypatch.setattr(runtime.Worker, "_follow_cancellations", never_opens)
    monkeypatch.setattr(runtime, "STREAM_OPEN_WAIT", 30.0)
    reg, _ = make_registry()

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(everruns.serve, config(db))
            nursery.start_soon(Worker(reg, address=info.address).run)
            await trio.sleep(0.5)  # registered, waiting for its stream
            began = trio.current_time()
            nursery.cancel_scope.cancel()
        return trio.current_time() - began

    took = run(main)
    assert took < 3, f"stopping took {took:.1f} s"
