"""PgQueuer under the benchmark: its own API for enqueueing, its QueueManager as the worker.

``python -m bench.systems.pgqueuer_sys --workload w1 ...`` is the runner (the client side);
``python -m bench.systems.pgqueuer_sys worker URL`` is the worker process it starts: one
asyncpg connection (PgQueuer's documented set-up), ``max_concurrent_tasks=10`` (PgQueuer
requires at least twice the batch size, hence ``batch_size=5``), durable tables (the default).
Job bodies only call `bench.signals`. Nothing here changes PgQueuer's defaults otherwise.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg
from pgqueuer import Job, QueueManager
from pgqueuer.db import AsyncpgDriver
from pgqueuer.queries import Queries

from bench import measure, signals
from bench.common import PYTHON, BenchError, Children, RunnerArgs, RunResult, write_result
from bench.workloads import BY_KEY

WORKER_READY = "pgqueuer worker ready"


async def worker(url: str) -> None:
    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        signals.count("noop")

    @qm.entrypoint("latency")
    async def latency(job: Job) -> None:
        signals.send("start", (job.payload or b"").decode())

    print(WORKER_READY, flush=True)
    await qm.run(batch_size=5, max_concurrent_tasks=10)


async def run(args: RunnerArgs) -> RunResult:
    sizes = BY_KEY[args.workload].sizes(args.quick)
    result = RunResult()
    conn = await asyncpg.connect(args.db)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    children = Children(args.logs)
    receiver = signals.Receiver()
    worker_argv = [PYTHON, "-m", "bench.systems.pgqueuer_sys", "worker", args.db]

    async def one(i: int) -> None:
        await queries.enqueue("noop", None)

    async def batch(first: int, n: int) -> None:
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)

    try:
        if args.workload == "w1":
            await measure.start_rates(one, batch, sizes, result)
        elif args.workload == "w2":
            for first in range(0, sizes.count, 1000):
                await batch(first, min(1000, sizes.count - first))
            env = {
                **receiver.env(),
                signals.COUNT_ENV: str(sizes.count),
                signals.PROGRESS_ENV: str(sizes.count // 20),
            }
            children.start("worker", worker_argv, env)
            await measure.drain(receiver, "noop", sizes, result)
        elif args.workload == "w4":
            w = children.start("worker", worker_argv, receiver.env())
            await asyncio.to_thread(w.wait_for_line, WORKER_READY, 60.0)

            async def enqueue(i: int) -> None:
                await queries.enqueue("latency", str(i).encode())

            await measure.latency_loop(enqueue, receiver, sizes, result, describe=w.tail)
        else:
            raise BenchError(f"pgqueuer does not run {args.workload}")
    finally:
        children.close()
        receiver.close()
        await conn.close()
    return result


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        asyncio.run(worker(sys.argv[2]))
        return
    args = RunnerArgs.parse()
    write_result(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    main()
