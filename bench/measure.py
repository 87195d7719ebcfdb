"""The measuring loops the asyncio runners share (the peers and the floor).

Each loop does the same work for every system, given the system's own calls: `start_rates` for
workload 1, `latency_loop` for workload 4. everruns' runner (Trio) has its own copies of the
same loops in `bench.systems.everruns_sys`; both follow the workload descriptions in
`bench.workloads` exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bench import signals
from bench.common import BenchError, RunResult
from bench.workloads import Sizes

WARM_UP = 20


async def start_rates(
    one: Callable[[int], Awaitable[object]],
    batch: Callable[[int, int], Awaitable[object]] | None,
    sizes: Sizes,
    result: RunResult,
) -> None:
    """Workload 1: ``one(i)`` starts one, ``batch(first, n)`` starts ``n``; both timed."""
    for i in range(WARM_UP):  # connection set-up and first-call costs are not the figure
        await one(-1 - i)
    done = 0
    t0 = time.perf_counter()
    while done < sizes.count and time.perf_counter() - t0 < sizes.cap_s:
        await one(done)
        done += 1
    result.figures["start_one_by_one"] = done / (time.perf_counter() - t0)
    result.cap_note("one by one", done, sizes.count, sizes.cap_s)
    if batch is None:
        return
    done = 0
    t0 = time.perf_counter()
    while done < sizes.count and time.perf_counter() - t0 < sizes.cap_s:
        await batch(done, sizes.batch)
        done += sizes.batch
    result.figures["start_batch"] = done / (time.perf_counter() - t0)
    result.cap_note("batch", done, sizes.count, sizes.cap_s)


async def latency_loop(
    enqueue: Callable[[int], Awaitable[object]],
    receiver: signals.Receiver,
    sizes: Sizes,
    result: RunResult,
    *,
    count: int | None = None,
    settle: float = 0.005,
    warm_up: int = 5,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Workload 4: enqueue one job at a time, time enqueue-returned -> body-started.

    The first ``warm_up`` are not counted. ``settle`` lets the finished job's completion land so the
    worker is idle at the next enqueue.
    """
    wanted = sizes.count if count is None else count
    latencies: list[float] = []
    t_end = time.monotonic() + sizes.cap_s + 5.0
    for i in range(-warm_up, wanted):
        await enqueue(i)
        returned = time.time()
        got = await asyncio.to_thread(receiver.wait_for, signals.matching("start", str(i)), 15.0)
        if got is None:
            raise BenchError(f"job {i} never ran: {describe()}")
        if i >= 0:
            latencies.append((got.time - returned) * 1000.0)
        await asyncio.sleep(settle)
        if len(latencies) >= min(20, wanted) and time.monotonic() > t_end:
            break
    result.latencies("latency", latencies, wanted, sizes.cap_s)


async def drain(receiver: signals.Receiver, kind: str, sizes: Sizes, result: RunResult) -> None:
    """Workload 2: wait for the worker's counted drain; record the rate."""
    try:
        got = await asyncio.to_thread(receiver.drain, kind, sizes.cap_s)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from exc
    result.figures["activity_throughput"] = got.rate
    result.cap_note("executions", got.count, sizes.count, sizes.cap_s)
