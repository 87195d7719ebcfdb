"""Review 21 (public API as user code meets it), against a real in-process control plane and
worker: bad arguments and documented behaviour of `Client`, handles and `Worker` that end in a
hang, a deep traceback or a wrong result instead of what the docstrings promise. Each test
failed on the code it was written against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, activity, workflow
from everruns.errors import ConfigError, EverrunsError, InvalidArgument
from everruns.server import ServerConfig, serve
from everruns.worker import Worker, WorkerConfig

pytestmark = pytest.mark.db


@asynccontextmanager
async def stack(
    database_url: str, reg: Registry | None = None
) -> AsyncIterator[tuple[Client, str]]:
    """A control plane, a client and (with ``reg``) a worker serving ``reg``."""
    config = ServerConfig(database_url=database_url, grpc_port=0)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve, config)
        async with Client.connect(info.address) as client:
            worker = None
            if reg is not None:
                worker = Worker(reg, address=info.address, grace_period=0.5, poll_wait=1.0)
                await nursery.start(worker.run)
            yield client, info.address
            if worker is not None:
                worker.shutdown()
        nursery.cancel_scope.cancel()


async def test_history_after_a_sequence_past_int32_is_an_empty_page(database_url: str) -> None:
    """Defect: `handle.history(after_sequence=2**31)` passes the client's check (documented
    range 0 to 2**63 - 1) and the server's (only "not negative"), then PostgreSQL refuses the
    int32 parameter: ``RpcError: get_history: INTERNAL: DataError: ... value out of int32
    range``.

    Expected: the events after that sequence number, i.e. none (or a one-line
    `InvalidArgument`); never INTERNAL, which the docstring does not list."""
    with trio.fail_after(30):
        async with stack(database_url) as (client, _):
            handle = await client.start_workflow("nobody_serves_it", 1, workflow_id="h-1")
            assert len(await handle.history()) >= 1
            try:
                events = await handle.history(after_sequence=2**31)
            except InvalidArgument:
                return
            assert events == []


class Echo:
    """An activity with its dependencies on ``self``: an object whose ``__call__`` is async."""

    async def __call__(self, ctx: Any, value: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return value


async def echo_through(ctx: Any, value: Any) -> Any:
    return await ctx.execute_activity("echo", value)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
async def test_an_object_with_an_async_call_is_awaited_as_an_activity(
    database_url: str,
) -> None:
    """Defect: `activity(Echo(), name="echo")` is accepted (it is callable) but marked
    ``is_async=False`` (`inspect.iscoroutinefunction` is False for an instance), so the worker
    runs it in a thread, gets an un-awaited coroutine back and fails the activity for good:
    ``PayloadError: result of activity 'echo' is of type builtins.coroutine``.

    Expected: the activity's result (5). `Registry.add_activity` documents "``fn`` (sync or
    async)" and refuses only what is not callable; an async callable must be awaited (or
    refused at registration with InvalidArgument)."""
    reg = Registry()
    try:
        activity(Echo(), name="echo", registry=reg)
    except InvalidArgument:
        return
    workflow(echo_through, registry=reg)
    with trio.fail_after(30):
        async with stack(database_url, reg) as (client, _):
            handle = await client.start_workflow(echo_through, 5)
            assert await handle.result(timeout=15) == 5


async def test_operator_calls_refuse_non_string_ids_clearly(database_url: str) -> None:
    """Defect: `requeue_dead_letter(123)`, `reset_circuit_breaker(5)` and
    `list_workflows(page_token=5)` raise ``AttributeError: 'int' object has no attribute
    'encode'`` from betterproto's serializer, deep in the channel.

    Expected: a one-line `InvalidArgument` (or TypeError) at the call, as the other methods
    give for a non-string id (`get_handle`, `start_workflow`)."""
    with trio.fail_after(30):
        async with stack(database_url) as (client, _):
            with pytest.raises((InvalidArgument, TypeError)):
                await client.requeue_dead_letter(123)  # type: ignore[arg-type]
            with pytest.raises((InvalidArgument, TypeError)):
                await client.reset_circuit_breaker(5)  # type: ignore[arg-type]
            with pytest.raises((InvalidArgument, TypeError)):
                await client.list_workflows(page_token=5)  # type: ignore[arg-type]


async def test_worker_config_refuses_an_address_no_worker_can_reach() -> None:
    """Defect: `WorkerConfig(host="127.0.0.1", port=70000)` is accepted, and
    `Worker.from_config(...).run()` then retries "an unreachable control plane" for ever:
    ``nursery.start(worker.run)`` never returns nor raises.

    Expected: `ConfigError` naming the port at `WorkerConfig(...)` (module docstring: "A bad
    value is a `ConfigError` whose one line names the variable"), or at least an error out of
    ``run``, within seconds."""
    with trio.fail_after(20):
        try:
            config = WorkerConfig(host="127.0.0.1", port=70000)
        except ConfigError:
            return
        worker = Worker.from_config(config, Registry())
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(8) as waited:
                with pytest.raises(EverrunsError):
                    await nursery.start(worker.run)
            nursery.cancel_scope.cancel()
        assert not waited.cancelled_caught, "Worker.run kept retrying an impossible port"
