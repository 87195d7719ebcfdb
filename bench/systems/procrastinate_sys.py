"""Procrastinate under the benchmark: ``defer_async``/``batch_defer_async``, its async worker.

``python -m bench.systems.procrastinate_sys --workload w1 ...`` is the runner;
``python -m bench.systems.procrastinate_sys worker`` is the worker process it starts:
``run_worker_async(concurrency=10)`` with every other option at Procrastinate's default
(LISTEN/NOTIFY on, polling fallback every 5 s). The tasks live in
`bench.systems.procrastinate_app`.
"""

from __future__ import annotations

import asyncio
import os
import sys

from bench import measure, signals
from bench.common import PYTHON, BenchError, Children, RunnerArgs, RunResult, write_result
from bench.workloads import BY_KEY

WORKER_READY = "procrastinate worker ready"


async def worker() -> None:
    from bench.systems.procrastinate_app import app

    async with app.open_async():
        print(WORKER_READY, flush=True)
        await app.run_worker_async(concurrency=10)


async def run(args: RunnerArgs) -> RunResult:
    os.environ["BENCH_DB_URL"] = args.db
    from bench.systems.procrastinate_app import app, latency, noop

    sizes = BY_KEY[args.workload].sizes(args.quick)
    result = RunResult()
    children = Children(args.logs)
    receiver = signals.Receiver()
    worker_argv = [PYTHON, "-m", "bench.systems.procrastinate_sys", "worker"]

    async def one(i: int) -> None:
        await noop.defer_async()

    async def batch(first: int, n: int) -> None:
        await noop.batch_defer_async(*([{}] * n))

    try:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            if args.workload == "w1":
                await measure.start_rates(one, batch, sizes, result)
            elif args.workload == "w2":
                for first in range(0, sizes.count, 1000):
                    await batch(first, min(1000, sizes.count - first))
                env = {
                    **receiver.env(),
                    "BENCH_DB_URL": args.db,
                    signals.COUNT_ENV: str(sizes.count),
                    signals.PROGRESS_ENV: str(sizes.count // 20),
                }
                children.start("worker", worker_argv, env)
                await measure.drain(receiver, "noop", sizes, result)
            elif args.workload == "w4":
                env = {**receiver.env(), "BENCH_DB_URL": args.db}
                w = children.start("worker", worker_argv, env)
                await asyncio.to_thread(w.wait_for_line, WORKER_READY, 60.0)
                await asyncio.sleep(0.5)  # the worker's LISTEN starts inside run_worker_async

                async def enqueue(i: int) -> None:
                    await latency.defer_async(i=i)

                await measure.latency_loop(enqueue, receiver, sizes, result, describe=w.tail)
            else:
                raise BenchError(f"procrastinate does not run {args.workload}")
    finally:
        children.close()
        receiver.close()
    return result


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        asyncio.run(worker())
        return
    args = RunnerArgs.parse()
    write_result(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    main()
