"""everruns under the benchmark: real control-plane and worker processes, a Trio client.

The control plane runs as ``python -m everruns.server`` on the run's fresh database, workers as
``python -m everruns.worker`` importing `bench.everruns_tasks` (or one half of it), and this
process is the client. Figures come from the task bodies' UDP signals (`bench.signals`), the
client's own clock and psutil on the server. With ``--profile-dir``, py-spy records the server
and the worker during the measured part of workloads 2 and 3, and the claim query is EXPLAINed.
It reads the everruns tables only to know when a setup phase is done, never to measure.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import psycopg
import trio

from bench import signals
from bench.common import (
    PYTHON,
    BenchError,
    Child,
    Children,
    RunnerArgs,
    RunResult,
    free_port,
    percentile,
    write_result,
)
from bench.everruns_activities import FIRST_RUNS_ENV
from bench.workloads import BY_KEY, Sizes
from everruns.client import Client
from everruns.errors import WorkflowFailed

WORKER_REGISTERED = r"registered with the control plane"
SERVER_READY = r"everruns control plane listening on"
ALL_TASKS = "bench.everruns_tasks"
WORKFLOWS_ONLY = "bench.everruns_workflows"
ACTIVITIES_ONLY = "bench.everruns_activities"


class Bench:
    """One run: the children, the signal receiver, the client address."""

    def __init__(self, args: RunnerArgs) -> None:
        self.args = args
        self.sizes: Sizes = BY_KEY[args.workload].sizes(args.quick)
        self.children = Children(args.logs)
        self.receiver = signals.Receiver()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server: Child | None = None
        self.result = RunResult()
        self._workers = 0

    # ------------------------------------------------------------------------ processes

    async def start_server(self) -> Child:
        server = self.children.start(
            "server",
            [PYTHON, "-m", "bench.launch", "server"],
            {"DATABASE_URL": self.args.db, "GRPC_ADDRESS": self.address},
        )
        await trio.to_thread.run_sync(server.wait_for_line, SERVER_READY, 60.0)
        self.server = server
        return server

    def spawn_worker(self, modules: list[str], env: dict[str, str] | None = None) -> Child:
        self._workers += 1
        extra = {
            "GRPC_ADDRESS": self.address,
            "MAX_CONCURRENT_TASKS": "10",
            "WORKER_ID": f"bench-worker-{self._workers}",
            "EVERRUNS_WORKER_GRACE_PERIOD": "1",
            **self.receiver.env(),
            **(env or {}),
        }
        return self.children.start(
            f"worker-{self._workers}",
            [PYTHON, "-m", "bench.launch", "worker", *modules],
            extra,
        )

    async def start_worker(self, modules: list[str], env: dict[str, str] | None = None) -> Child:
        worker = self.spawn_worker(modules, env)
        await trio.to_thread.run_sync(worker.wait_for_line, WORKER_REGISTERED, 60.0)
        return worker

    async def wait_signal(
        self, predicate: Callable[[signals.Signal], bool], timeout: float
    ) -> signals.Signal | None:
        return await trio.to_thread.run_sync(self.receiver.wait_for, predicate, timeout)

    def profile(self, child: Child, name: str) -> Child | None:
        if self.args.profile_dir is None:
            return None
        self.args.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.args.profile_dir / f"everruns-{self.args.workload}-{name}.txt"
        spy = str(Path(sys.executable).parent / "py-spy")
        return self.children.start(
            f"py-spy-{name}",
            [spy, "record", "-r", "250", "-f", "raw", "-o", str(out), "--pid", str(child.pid)],
        )

    # ------------------------------------------------------------------------- database

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.args.db, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    async def wait_sql(self, query: str, want: int, timeout: float) -> None:
        deadline = trio.current_time() + timeout
        while True:
            got = (await trio.to_thread.run_sync(self.sql, query))[0][0]
            if got >= want:
                return
            if trio.current_time() > deadline:
                raise BenchError(f"setup: {got} of {want} after {timeout:g} s ({query})")
            await trio.sleep(0.1)

    def statements_reset(self) -> None:
        """Start counting SQL statements (profile runs only; the cluster preloads the module)."""
        if self.args.profile_dir is None:
            return
        with psycopg.connect(self.args.db, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")

    def statements_report(self, per: str, units: int) -> None:
        """Write the statements run since `statements_reset`, with calls per ``per``."""
        if self.args.profile_dir is None or units <= 0:
            return
        rows = self.sql(
            "SELECT calls, total_exec_time, mean_exec_time, "
            "total_plan_time / greatest(calls, 1), plans, rows, "
            "regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC"
        )
        calls = sum(r[0] for r in rows)
        total = sum(r[1] for r in rows)
        lines = [
            f"{len(rows)} distinct statements, {calls} calls for {units} {per} "
            f"({calls / units:.1f} statements and {total / units:.2f} ms of execution per {per})",
            "",
            "calls | per " + per + " | total ms | mean ms | planning ms per call | plans | rows "
            "| statement",
            "---|---|---|---|---|---|---|---",
        ]
        for c, tot, mean, plan, plans, n, query in rows[:25]:
            lines.append(
                f"{c} | {c / units:.2f} | {tot:.0f} | {mean:.3f} | {plan:.3f} | {plans} | {n} | "
                f"`{query[:160]}`"
            )
        name = f"statements-{self.args.workload}.md"
        (self.args.profile_dir / name).write_text("\n".join(lines) + "\n")

    def explain_claim(self) -> None:
        """EXPLAIN (ANALYZE, BUFFERS) each claim query on the queued activities, rolled back."""
        if self.args.profile_dir is None:
            return
        from everruns.store.queries import QUERIES

        # The parameters every claim variant takes, in order (a variant may use fewer).
        types = ["text", "text[]", "text[]", "int", "text[]"]
        values = ["'explain'", "'{}'::text[]", "'{bench_noop}'::text[]", "10", "'{}'::text[]"]
        parts = []
        for name in sorted(n for n in QUERIES if n.startswith("claim_tasks")):
            sql = QUERIES[name]
            used = max(int(n) for n in re.findall(r"\$(\d+)", sql))
            if "$1::text[]" in sql:  # the claim for several claimers: a worker per slot
                types[0], values[0] = "text[]", "array_fill('explain'::text, ARRAY[10])"
            else:
                types[0], values[0] = "text", "'explain'"
            with psycopg.connect(self.args.db) as conn:
                conn.execute(f"PREPARE bench_claim({', '.join(types[:used])}) AS {sql}")
                rows = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_claim("
                    + ", ".join(values[:used])
                    + ")"
                ).fetchall()
                conn.rollback()
            plan = "\n".join(r[0] for r in rows)
            parts.append(f"-- {name}\n{sql}\n\n{plan}\n")
        self.args.profile_dir.mkdir(parents=True, exist_ok=True)
        (self.args.profile_dir / "explain-claim.txt").write_text("\n".join(parts))

    # ------------------------------------------------------------------------ workloads

    async def w1(self, client: Client) -> None:
        sizes = self.sizes
        for i in range(20):  # connection set-up and first-call costs are not the figure
            await client.start_workflow("bench_latency", -1 - i)
        # The cap is checked between calls, as for the peers: a call in flight completes.
        started = 0
        t0 = time.perf_counter()
        while started < sizes.count and time.perf_counter() - t0 < sizes.cap_s:
            await client.start_workflow("bench_latency", started)
            started += 1
        self.result.figures["start_one_by_one"] = started / (time.perf_counter() - t0)
        self.result.cap_note("one by one", started, sizes.count, sizes.cap_s)
        started = 0
        t0 = time.perf_counter()
        while started < sizes.count and time.perf_counter() - t0 < sizes.cap_s:
            batch = [("bench_latency", started + j) for j in range(sizes.batch)]
            await client.start_workflows(batch)
            started += len(batch)
        self.result.figures["start_batch"] = started / (time.perf_counter() - t0)
        self.result.cap_note("batch", started, sizes.count, sizes.cap_s)

    async def w2(self, client: Client) -> None:
        sizes = self.sizes
        per = sizes.extra
        for first in range(0, sizes.count // per, 50):
            n = min(50, sizes.count // per - first)
            await client.start_workflows([("bench_fanout", per)] * n)
        scheduler = await self.start_worker([WORKFLOWS_ONLY])
        await self.wait_sql(
            "SELECT count(*) FROM durable_task_queue WHERE kind = 'activity'", sizes.count, 120.0
        )
        scheduler.kill()
        await trio.to_thread.run_sync(self.explain_claim)
        env = {signals.COUNT_ENV: str(sizes.count), signals.PROGRESS_ENV: str(sizes.count // 20)}
        await trio.to_thread.run_sync(self.statements_reset)
        worker = await self.start_worker([ACTIVITIES_ONLY], env)
        spies = [self.profile(worker, "worker"), self.profile(self._server(), "server")]
        await self.drain("noop", sizes)
        for spy in spies:
            if spy is not None:
                await trio.to_thread.run_sync(spy.interrupt)
        done = (await trio.to_thread.run_sync(self.sql, _COMPLETED_ACTIVITIES))[0][0]
        self.result.details["completed_activities_in_db"] = done
        await trio.to_thread.run_sync(self.statements_report, "activity", done)

    async def w3(self, client: Client) -> None:
        sizes = self.sizes
        for first in range(0, sizes.count, 1000):
            n = min(1000, sizes.count - first)
            await client.start_workflows([("bench_three_steps", first + j) for j in range(n)])
        env = {signals.COUNT_ENV: str(sizes.count), signals.PROGRESS_ENV: str(sizes.count // 100)}
        await trio.to_thread.run_sync(self.statements_reset)
        worker = await self.start_worker([ALL_TASKS], env)
        t0 = time.time()  # the worker starts claiming as soon as it is registered
        spies = [self.profile(worker, "worker"), self.profile(self._server(), "server")]
        rate, partial = await trio.to_thread.run_sync(
            self.receiver.steps, t0, sizes.cap_s, sizes.count
        )
        stopped = time.time()
        for spy in spies:
            if spy is not None:
                await trio.to_thread.run_sync(spy.interrupt)
        if partial is not None:
            # Cut short. everruns' queue is FIFO across all runs, so it runs every workflow's
            # first task, then every first step, and so on: whole workflows finish only at the
            # very end. Count the work done instead: 4 workflow tasks + 3 activities each.
            tasks = (await trio.to_thread.run_sync(self.sql, _COMPLETED_TASKS))[0][0]
            rate = tasks / 7 / (stopped - t0)
            self.result.notes.append(
                f"time cap {sizes.cap_s:g} s reached with {tasks} of {7 * sizes.count} tasks "
                "done (4 workflow tasks + 3 activities per workflow); figure = tasks done / 7 "
                "per second"
            )
        self.result.figures["workflow_throughput"] = rate
        tasks = (await trio.to_thread.run_sync(self.sql, _COMPLETED_TASKS))[0][0]
        await trio.to_thread.run_sync(self.statements_report, "task (workflow or activity)", tasks)
        done = (await trio.to_thread.run_sync(self.sql, _COMPLETED_RUNS))[0][0]
        self.result.details["completed_workflows_in_db"] = done

    async def w4(self, client: Client) -> None:
        sizes = self.sizes
        await self.start_worker([ALL_TASKS])
        await trio.to_thread.run_sync(self.statements_reset)
        latencies: list[float] = []
        t_end = time.monotonic() + sizes.cap_s + 5.0
        for i in range(-5, sizes.count):  # the first five warm up the worker and the channel
            handle = await client.start_workflow("bench_latency", i)
            returned = time.time()
            tag = str(i)
            got = await self.wait_signal(signals.matching("start", tag), 15.0)
            if got is None:
                raise BenchError(f"the activity of start {i} never ran")
            if i >= 0:
                latencies.append((got.time - returned) * 1000.0)
            with trio.fail_after(15):
                await handle.result()
            if len(latencies) >= 20 and time.monotonic() > t_end:
                break
        self.latency_figures("latency", latencies, sizes.count)
        await trio.to_thread.run_sync(self.statements_report, "start", len(latencies) + 5)

    async def w5(self, client: Client) -> None:
        sizes = self.sizes
        await self.start_worker([ALL_TASKS])
        latencies: list[float] = []
        t_end = time.monotonic() + sizes.cap_s
        for i in range(sizes.count):
            handle = await client.start_workflow("bench_cancel", i)
            tag = str(i)
            if await self.wait_signal(signals.matching("start", tag), 15) is None:
                raise BenchError(f"the activity of workflow {i} never ran")
            requested = time.time()
            await handle.cancel("bench")
            got = await self.wait_signal(signals.matching("cancelled", tag), 30)
            if got is None:
                raise BenchError(f"the activity of workflow {i} never saw its cancellation")
            latencies.append((got.time - requested) * 1000.0)
            with trio.fail_after(15):
                try:
                    await handle.result()
                except WorkflowFailed:
                    pass
            if time.monotonic() > t_end:
                break
        self.latency_figures("cancel", latencies, sizes.count)

    async def w6(self, client: Client) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-w6-") as marks:
            await self._w6(client, {FIRST_RUNS_ENV: marks})

    async def _w6(self, client: Client, env: dict[str, str]) -> None:
        sizes = self.sizes
        workers = {}
        for _ in range(2):
            w = await self.start_worker([ALL_TASKS], env)
            workers[w.pid] = w
        recoveries: list[float] = []
        t_end = time.monotonic() + sizes.cap_s
        for i in range(sizes.count):
            handle = await client.start_workflow("bench_crash", i)
            first = await self.wait_signal(signals.matching("start", tag_prefix=f"{i}:"), 15.0)
            if first is None:
                raise BenchError(f"the activity of workflow {i} never ran")
            victim = workers.pop(first.pid, None)
            if victim is None:
                raise BenchError(f"the activity ran in pid {first.pid}, not a known worker")
            killed = time.time()
            os.kill(victim.pid, signal.SIGKILL)
            replacement = self.spawn_worker([ALL_TASKS], env)
            again = await self.wait_signal(
                signals.matching("start", tag_prefix=f"{i}:", not_pid=victim.pid), 45.0
            )
            if again is None:
                raise BenchError(f"the activity of workflow {i} never ran again after the kill")
            recoveries.append(again.time - killed)
            victim.kill()
            with trio.fail_after(30):
                await handle.result()
            await trio.to_thread.run_sync(replacement.wait_for_line, WORKER_REGISTERED, 60.0)
            workers[replacement.pid] = replacement
            if time.monotonic() > t_end:
                break
        self.result.figures["recovery_p50_s"] = percentile(recoveries, 50)
        self.result.figures["recovery_max_s"] = max(recoveries)
        self.result.details["trials"] = len(recoveries)
        self.note_cap("trials", len(recoveries), sizes.count)

    async def w7(self, client: Client) -> None:
        sizes = self.sizes
        server = psutil.Process(self._server().pid)
        rss_peak = 0.0

        async def sample_rss() -> None:
            nonlocal rss_peak
            while True:
                rss_peak = max(rss_peak, server.memory_info().rss / 1e6)
                await trio.sleep(0.25)

        await self.start_worker([WORKFLOWS_ONLY])
        processes = 4
        per = sizes.count // processes
        out_dir = self.args.logs
        sims = []
        for k in range(processes):
            argv = [PYTHON, "-m", "bench.sim_workers", "--address", self.address]
            argv += ["--workers", str(per), "--name", f"sim{k}"]
            argv += ["--out", str(out_dir / f"sim-{k}.json")]
            sims.append(self.children.start(f"sim-{k}", argv, self.receiver.env()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss)
            registered = 0
            for _ in range(processes):
                got = await self.wait_signal(lambda s: s.kind == "registered", 120.0)
                if got is None:
                    raise BenchError(f"simulated workers did not register: {sims[0].tail()}")
                registered += int(got.tag)
            self.result.details["registered_workers"] = registered
            await trio.sleep(1.0)
            per_workflow = 10
            interval = per_workflow / sizes.extra  # one workflow of 10 every 0.1 s: 100/s
            spy = self.profile(self._server(), "server")
            cpu0 = server.cpu_times()
            window_start = time.time()
            next_at = trio.current_time()
            started = 0
            # Paced starts; a start that takes longer than the pace delays the next ones (the
            # achieved rate then says so), and the window ends on time whatever happens.
            with trio.move_on_after(sizes.cap_s):
                while True:
                    await client.start_workflow("bench_scale", per_workflow)
                    started += 1
                    next_at += interval
                    await trio.sleep_until(next_at)
            window_end = time.time()
            cpu1 = server.cpu_times()
            if spy is not None:
                await trio.to_thread.run_sync(spy.interrupt)
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()
        for sim in sims:
            sim.proc.send_signal(signal.SIGTERM)
        claims: list[tuple[float, float]] = []
        for k, sim in enumerate(sims):
            await trio.to_thread.run_sync(_wait_exit, sim, 30.0)
            path = out_dir / f"sim-{k}.json"
            if not path.exists():
                raise BenchError(f"sim-{k} wrote no result: {sim.tail()}")
            import json

            claims.extend((a, b) for a, b in json.loads(path.read_text())["claims"])
        window = [lat for scheduled, lat in claims if window_start <= scheduled <= window_end]
        seconds = window_end - window_start
        if not window:
            # Nothing scheduled in the window was claimed before the sims stopped: every claim
            # took longer than what is left of the window, which is then a lower bound.
            window = [seconds + 2.0]
            self.result.notes.append(
                "no task scheduled in the window was claimed: claim latency figures are the "
                "lower bound (window + 2 s)"
            )
        cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        self.result.figures["claim_p50_ms"] = percentile(window, 50) * 1000.0
        self.result.figures["claim_p99_ms"] = percentile(window, 99) * 1000.0
        claimed = sum(1 for scheduled, _ in claims if window_start <= scheduled <= window_end)
        self.result.figures["achieved_activities_per_s"] = claimed / seconds
        self.result.figures["server_cpu_percent"] = 100.0 * cpu / seconds
        self.result.figures["server_rss_mb"] = rss_peak
        self.result.details["activities_scheduled"] = started * per_workflow
        self.result.details["activities_claimed_in_window"] = claimed
        offered = sizes.extra * seconds
        if started * per_workflow < 0.9 * offered:
            self.result.notes.append(
                f"offered load not reached: {started * per_workflow} activities started in "
                f"{seconds:.0f} s instead of {offered:.0f} (starts were slowed by the server)"
            )

    # -------------------------------------------------------------------------- helpers

    def _server(self) -> Child:
        assert self.server is not None
        return self.server

    async def drain(self, kind: str, sizes: Sizes) -> None:
        try:
            got = await trio.to_thread.run_sync(self.receiver.drain, kind, sizes.cap_s)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        self.result.figures["activity_throughput"] = got.rate
        self.note_cap("executions", got.count, sizes.count)

    def note_cap(self, what: str, done: int, wanted: int) -> None:
        self.result.cap_note(what, done, wanted, self.sizes.cap_s)

    def latency_figures(self, prefix: str, latencies: list[float], wanted: int) -> None:
        self.result.figures[f"{prefix}_p50_ms"] = percentile(latencies, 50)
        self.result.figures[f"{prefix}_p99_ms"] = percentile(latencies, 99)
        self.result.details["samples"] = len(latencies)
        self.note_cap("samples", len(latencies), wanted)

    async def run(self) -> None:
        await self.start_server()
        async with Client.connect(self.address) as client:
            await getattr(self, self.args.workload)(client)


_COMPLETED_ACTIVITIES = (
    "SELECT count(*) FROM durable_task_queue WHERE kind = 'activity' AND status = 'completed'"
)
_COMPLETED_RUNS = "SELECT count(*) FROM durable_workflow_instances WHERE status = 'completed'"
_COMPLETED_TASKS = "SELECT count(*) FROM durable_task_queue WHERE status = 'completed'"


def _wait_exit(child: Child, timeout: float) -> None:
    try:
        child.proc.wait(timeout)
    except Exception:
        child.kill()


def main() -> None:
    args = RunnerArgs.parse()
    bench = Bench(args)
    try:
        trio.run(bench.run)
    finally:
        bench.children.close()
        bench.receiver.close()
    bench.result.figures = {k: v for k, v in bench.result.figures.items() if not math.isnan(v)}
    write_result(args.out, bench.result)


if __name__ == "__main__":
    main()
