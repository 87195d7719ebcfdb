"""The Procrastinate app of the benchmark: its tasks, and the connector from the environment.

Imported by the runner and by the worker process (``BENCH_DB_URL`` names the database), so both
see the same task names. Task bodies only call `bench.signals`.
"""

from __future__ import annotations

import os

import procrastinate

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("BENCH_DB_URL", ""))
)


@app.task(name="noop")
async def noop() -> None:
    from bench import signals

    signals.count("noop")


@app.task(name="latency")
async def latency(i: int) -> None:
    from bench import signals

    signals.send("start", str(i))
