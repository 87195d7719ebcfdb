"""The DBOS workflows of the benchmark (imported by the runner and by the DBOS worker process).

Registered under fixed names so that `DBOSClient.enqueue` can name them. Step bodies only call
`bench.signals`. The queue is declared with ``worker_concurrency=10`` and DBOS's default
polling interval (1 s).
"""

from __future__ import annotations

from dbos import DBOS

from bench import signals

QUEUE = "bench_queue"


async def register_queue() -> None:
    """Declare the benchmark's queue (after `DBOS.launch`): 10 slots, default polling."""
    await DBOS.register_queue_async(QUEUE, worker_concurrency=10)


@DBOS.step(name="bench_step_1")
async def step_1(i: int) -> int:
    signals.count("step1")
    return i


@DBOS.step(name="bench_step_2")
async def step_2(i: int) -> int:
    signals.count("step2")
    return i


@DBOS.step(name="bench_step_3")
async def step_3(i: int) -> int:
    signals.count("step3")
    return i


@DBOS.workflow(name="bench_three_steps")
async def three_steps(i: int) -> int:
    await step_1(i)
    await step_2(i)
    await step_3(i)
    return i


@DBOS.step(name="bench_signal_start")
async def signal_start(i: int) -> int:
    signals.send("start", str(i))
    return i


@DBOS.workflow(name="bench_latency")
async def latency(i: int) -> int:
    return await signal_start(i)


@DBOS.workflow(name="bench_noop")
async def noop(i: int) -> int:
    return i
