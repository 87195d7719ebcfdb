"""Simulated everruns workers for the scale workload (w7), speaking raw gRPC.

``python -m bench.sim_workers --address HOST:PORT --workers 250 --out FILE`` runs that many
workers in one asyncio process, each with its own channel (its own TCP connection, as real
workers have): it registers, heartbeats every 10 s and long-polls PollTasks for one activity
type; a claimed task is completed at once and its claim latency (received - ``scheduled_at``,
same machine clock) recorded. Like real workers, each sends its calls over its channel's call
stream (`CallService.Calls`, everruns' `CallStream`); ``--unary`` (or, as for real workers,
``EVERRUNS_CALL_STREAM=0``) sends them as unary calls. It signals ``registered <n>`` over
`bench.signals` once all its workers are registered, and on SIGTERM writes
``{"claims": [[scheduled_at, latency_s], ...]}`` to ``--out`` and exits. It is a load
generator: it never runs workflow code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpclib.client import Channel

from bench import signals
from everruns._aio.grpc import CallStream, unary_route
from everruns._aio.wire import FastCodec
from everruns._proto.everruns import v1 as pb
from everruns.domain.address import call_stream_from_env

ACTIVITY = "bench_scale_noop"
HEARTBEAT_S = 10.0
POLL_WAIT_S = 20.0


class SimWorker:
    """One simulated worker: registration, heartbeat loop, poll-and-complete loop."""

    def __init__(
        self,
        host: str,
        port: int,
        worker_id: str,
        claims: list[list[float]],
        codec: FastCodec,
        unary: bool,
    ) -> None:
        self.channel = Channel(host, port, codec=codec)
        self.stub = pb.WorkerServiceStub(self.channel)
        self.calls = None if unary else CallStream(self.channel, None, codec)
        self.worker_id = worker_id
        self.claims = claims

    async def call(
        self, method: Callable[..., Awaitable[Any]], request: Any, timeout: float
    ) -> Any:
        """A unary stub method (``self.stub.poll_tasks``...), over the call stream unless it
        is off."""
        if self.calls is None:
            return await method(request, timeout=timeout)
        route = unary_route(method)
        assert route is not None, method
        return await self.calls.call(route[0], request, route[1], timeout)

    async def register(self) -> None:
        for attempt in range(20):
            try:
                await self.stub.register_worker(
                    pb.RegisterWorkerRequest(
                        worker_id=self.worker_id,
                        activity_types=[ACTIVITY],
                        max_concurrency=1,
                        host=socket.gethostname(),
                        pid=os.getpid(),
                        version="bench",
                    ),
                    timeout=60,
                )
                return
            except Exception:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.2)

    async def heartbeat_loop(self) -> None:
        # Spread the first beats so 1,000 workers do not all beat in the same instant.
        await asyncio.sleep(HEARTBEAT_S * (hash(self.worker_id) % 1000) / 1000)
        while True:
            try:
                await self.call(
                    self.stub.worker_heartbeat,
                    pb.WorkerHeartbeatRequest(worker_id=self.worker_id, status="active"),
                    30,
                )
            except Exception:
                pass
            await asyncio.sleep(HEARTBEAT_S)

    async def poll_loop(self) -> None:
        while True:
            try:
                reply = await self.call(
                    self.stub.poll_tasks,
                    pb.PollTasksRequest(
                        worker_id=self.worker_id,
                        max_tasks=1,
                        activity_types=[ACTIVITY],
                        wait_s=POLL_WAIT_S,
                    ),
                    POLL_WAIT_S + 30,
                )
            except Exception:
                await asyncio.sleep(0.5)
                continue
            received = time.time()
            for task in reply.tasks:
                self.claims.append([task.scheduled_at, received - task.scheduled_at])
                try:
                    await self.call(
                        self.stub.complete_activity_task,
                        pb.CompleteActivityTaskRequest(
                            task_id=task.task_id,
                            lease_token=task.lease_token,
                            worker_id=self.worker_id,
                            result=b"null",
                        ),
                        30,
                    )
                except Exception:
                    pass

    def close(self) -> None:
        if self.calls is not None:
            self.calls.close()
        self.channel.close()


async def main_async(args: argparse.Namespace) -> None:
    host, _, port = args.address.rpartition(":")
    claims: list[list[float]] = []
    codec = FastCodec()
    unary = args.unary or not call_stream_from_env(os.environ)
    workers = [
        SimWorker(host, int(port), f"{args.name}-{i}", claims, codec, unary)
        for i in range(args.workers)
    ]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sem = asyncio.Semaphore(50)

    async def register(worker: SimWorker) -> None:
        async with sem:
            await worker.register()

    await asyncio.gather(*(register(w) for w in workers))
    signals.send("registered", str(len(workers)))
    tasks = [asyncio.create_task(w.heartbeat_loop()) for w in workers]
    tasks += [asyncio.create_task(w.poll_loop()) for w in workers]
    await stop.wait()
    # The event loop has nothing left to serve: the claims are all in, the result is small.
    Path(args.out).write_text(json.dumps({"claims": claims}))  # noqa: ASYNC240
    for task in tasks:
        task.cancel()
    for worker in workers:
        worker.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--unary", action="store_true", help="unary calls, no call stream")
    # A plain selector loop, not asyncio.run's default: importing everruns imports trio-asyncio,
    # which makes asyncio.run build its slower Trio-hosted loop, and a load generator that is
    # slower than the server it loads would measure itself.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
