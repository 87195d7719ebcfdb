"""DBOS Transact under the benchmark: `DBOSClient` for starts, DBOS itself for running them.

``python -m bench.systems.dbos_sys --workload w1 ...`` is the runner. Workload 1 enqueues
through `DBOSClient` (DBOS has no batch start API, which the results say); workload 3 runs the
3-step workflow in the runner process with `DBOS.start_workflow_async`, at most 10 at a time;
workload 4 enqueues through the client to a worker process (``python -m
bench.systems.dbos_sys worker URL``) whose queue has ``worker_concurrency=10``. Every DBOS
setting is its default.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench import measure, signals
from bench.common import PYTHON, BenchError, Children, RunnerArgs, RunResult, write_result
from bench.workloads import BY_KEY

WORKER_READY = "dbos worker ready"


def _config(url: str) -> dict[str, object]:
    return {"name": "bench", "system_database_url": url, "log_level": "WARNING"}


async def worker(url: str) -> None:
    from dbos import DBOS

    from bench.systems import dbos_app

    DBOS(config=_config(url))  # type: ignore[arg-type]
    DBOS.launch()
    await dbos_app.register_queue()
    print(WORKER_READY, flush=True)
    await asyncio.Event().wait()


async def migrate(url: str) -> None:
    """Create DBOS's system tables and the queue; `DBOSClient` needs both and creates neither."""
    from dbos import DBOS

    from bench.systems import dbos_app

    DBOS(config=_config(url))  # type: ignore[arg-type]
    DBOS.launch()
    await dbos_app.register_queue()
    DBOS.destroy()


async def _migrate(url: str) -> None:
    # In its own process: DBOS.destroy() shuts down the event loop's default executor.
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bench.systems.dbos_sys",
        "migrate",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120.0)
    if proc.returncode != 0:
        raise BenchError(f"DBOS migration failed: {out.decode(errors='replace')[-500:]}")


async def run(args: RunnerArgs) -> RunResult:
    from dbos import DBOS, DBOSClient

    from bench.systems import dbos_app

    sizes = BY_KEY[args.workload].sizes(args.quick)
    result = RunResult()
    children = Children(args.logs)
    receiver = signals.Receiver()
    try:
        if args.workload == "w1":
            await _migrate(args.db)
            client = DBOSClient(system_database_url=args.db)
            options = {"queue_name": dbos_app.QUEUE, "workflow_name": "bench_noop"}

            async def one(i: int) -> None:
                client.enqueue(options, i)  # type: ignore[arg-type]

            await measure.start_rates(one, None, sizes, result)
            result.notes.append("batch: DBOS has no batch start API")
            client.destroy()
        elif args.workload == "w3":
            import os

            os.environ.update(receiver.env())
            os.environ[signals.COUNT_ENV] = str(sizes.count)
            os.environ[signals.PROGRESS_ENV] = str(sizes.count // 100)
            signals.configure_from_env()
            DBOS(config=_config(args.db))  # type: ignore[arg-type]
            DBOS.launch()
            slots = asyncio.Semaphore(10)
            stop = asyncio.Event()

            async def one_workflow(i: int) -> None:
                async with slots:
                    if stop.is_set():
                        return
                    handle = await DBOS.start_workflow_async(dbos_app.three_steps, i)
                    await handle.get_result()

            t0 = time.time()
            runner = asyncio.gather(*(one_workflow(i) for i in range(sizes.count)))
            try:
                rate, steps = await asyncio.to_thread(receiver.steps, t0, sizes.cap_s, sizes.count)
            finally:
                stop.set()
                await runner
                DBOS.destroy()
            result.figures["workflow_throughput"] = rate
            if steps is not None:
                result.notes.append(
                    f"time cap {sizes.cap_s:g} s reached with {steps} of {3 * sizes.count} "
                    "steps done; figure = steps done / 3 per second"
                )
        elif args.workload == "w4":
            await _migrate(args.db)
            argv = [PYTHON, "-m", "bench.systems.dbos_sys", "worker", args.db]
            w = children.start("worker", argv, receiver.env())
            await asyncio.to_thread(w.wait_for_line, WORKER_READY, 60.0)
            client = DBOSClient(system_database_url=args.db)
            options = {"queue_name": dbos_app.QUEUE, "workflow_name": "bench_latency"}

            async def enqueue(i: int) -> None:
                client.enqueue(options, i)  # type: ignore[arg-type]

            await measure.latency_loop(
                enqueue, receiver, sizes, result, count=sizes.extra, warm_up=1, describe=w.tail
            )
            result.notes.append(
                f"{sizes.extra} samples: DBOS's queue is polled every 1 s (its default)"
            )
            client.destroy()
        else:
            raise BenchError(f"dbos does not run {args.workload}")
    finally:
        children.close()
        receiver.close()
    return result


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        asyncio.run(worker(sys.argv[2]))
        return
    if sys.argv[1:2] == ["migrate"]:
        asyncio.run(migrate(sys.argv[2]))
        return
    args = RunnerArgs.parse()
    write_result(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    main()
