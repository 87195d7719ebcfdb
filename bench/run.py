"""`python -m bench.run`: run the benchmark suite and write ``bench/results/latest.{json,md}``.

For each workload and repetition, every applicable system gets a fresh database on one
PostgreSQL server (the embedded one in ``/tmp/everruns-bench-pg`` unless ``DATABASE_URL`` names
another) and runs in its own runner process (`bench.systems`), started as a process-group
leader and killed with its whole group afterwards, so nothing outlives its run even on failure.
Systems are interleaved inside each repetition so that drift hits them alike. The suite has a
time budget; what does not fit is reported as skipped, never silently dropped. This module only
orchestrates and writes results; what is measured is decided by the runners and
`bench.workloads`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench import report
from bench.common import PYTHON, REPO_ROOT, with_database
from bench.workloads import SYSTEMS, WORKLOADS

RESULTS = REPO_ROOT / "bench" / "results"
PG_DIR = Path(os.environ.get("BENCH_PG_DIR", "/tmp/everruns-bench-pg"))
BUDGET_S = {"full": 14 * 60.0, "quick": 170.0}
PG_SETTINGS = (
    "synchronous_commit",
    "fsync",
    "shared_buffers",
    "max_connections",
    "wal_level",
    "work_mem",
)
VERSIONED = ("everruns", "pgqueuer", "procrastinate", "dbos", "asyncpg", "psycopg", "grpclib")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repetition, smaller counts")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="NAME",
        help="workloads (w1..w7) and/or systems (everruns, floor, pgqueuer, procrastinate, dbos)",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the everruns server (w2, w3, w7) and worker (w2, w3), count SQL statements "
        "(pg_stat_statements, on a separate cluster) and EXPLAIN the claim query; "
        "writes bench/results/profiles/ and profile-run.{json,md}, not latest.*",
    )
    parser.add_argument(
        "--save-baseline",
        action="store_true",
        help="store this run's medians as baseline.json (for its mode: full or quick)",
    )
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ PostgreSQL


class Postgres:
    """The server every system shares: DATABASE_URL's, or the embedded one (stopped at the end
    if this run started it)."""

    def __init__(self, *, statements: bool = False) -> None:
        self.handle: Any = None
        url = os.environ.get("DATABASE_URL")
        if url:
            self.admin_url = url
            self.where = "DATABASE_URL"
            return
        from everruns.store import embedded

        # Profiling wants pg_stat_statements, which must be preloaded: a cluster of its own,
        # so that the measuring runs never carry its overhead.
        data_dir = PG_DIR.with_name(PG_DIR.name + "-profile") if statements else PG_DIR
        self.handle = embedded.start(data_dir, database="postgres")
        self.admin_url = self.handle.url
        self.where = f"embedded, {data_dir}"
        if (
            statements
            and "pg_stat_statements" not in self.execute("SHOW shared_preload_libraries")[0][0]
        ):
            self.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            # Planning time too: what a statement costs before it executes.
            self.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
            embedded.stop(self.handle)
            self.handle = embedded.start(data_dir, database="postgres")
            self.admin_url = self.handle.url

    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def fresh(self, name: str) -> str:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.execute(f'CREATE DATABASE "{name}"')
        return with_database(self.admin_url, name)

    def drop(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def describe(self) -> dict[str, Any]:
        version = self.execute("SHOW server_version")[0][0]
        settings = {s: self.execute(f"SHOW {s}")[0][0] for s in PG_SETTINGS}
        return {"version": version, "where": self.where, "settings": settings}

    def close(self) -> None:
        if self.handle is not None:
            from everruns.store import embedded

            with contextlib.suppress(Exception):
                embedded.stop(self.handle)


# ------------------------------------------------------------------------------ environment


def environment(pg: Postgres) -> dict[str, Any]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        if dirty:
            commit += " (with uncommitted changes)"
    return {
        "cores": os.cpu_count(),
        "memory_gb": psutil.virtual_memory().total / 1e9,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": pg.describe(),
        "versions": versions,
        "commit": commit,
    }


def unavailable() -> dict[str, str]:
    """Peers that cannot run here, with why (scripts/bench records failed installs)."""
    failures: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (Path(sys.prefix) / "install-failures.txt").read_text().splitlines():
            name, _, reason = line.partition("\t")
            failures[name.strip().lower()] = reason.strip()
    reasons = {}
    for system in ("pgqueuer", "procrastinate", "dbos"):
        try:
            metadata.version(system)
        except metadata.PackageNotFoundError:
            reasons[system] = failures.get(system) or f"{system} is not installed in {sys.prefix}"
    return reasons


# ---------------------------------------------------------------------------------- runs


def run_one(
    pg: Postgres,
    system: str,
    wkey: str,
    rep: int,
    *,
    quick: bool,
    timeout: float,
    work: Path,
    profile_dir: Path | None,
) -> dict[str, Any]:
    """One runner process for one (system, workload, repetition); its result or its error."""
    name = f"bench_{system}_{wkey}_{rep}"
    url = pg.fresh(name)
    out = work / f"{name}.json"
    logs = work / name
    logs.mkdir(parents=True, exist_ok=True)
    argv = [
        PYTHON, "-m", f"bench.systems.{system}_sys", "--workload", wkey, "--db", url,
        "--out", str(out), "--logs", str(logs),
    ]  # fmt: skip
    if quick:
        argv.append("--quick")
    if profile_dir is not None and system == "everruns":
        argv += ["--profile-dir", str(profile_dir)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DATABASE_URL", None)  # runners get their own database via --db only
    runner_log = logs / "runner.log"
    started = time.monotonic()
    with runner_log.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout)
            error = None if proc.returncode == 0 else f"runner exited {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"runner timed out after {timeout:.0f} s"
        finally:
            # The runner leads its own process group; everything it started dies with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    pg.drop(name)
    elapsed = time.monotonic() - started
    if error is None and out.exists():
        result: dict[str, Any] = json.loads(out.read_text())
        result["figures"] = {
            k: float(v) for k, v in result.get("figures", {}).items() if math.isfinite(v)
        }
        result["seconds"] = round(elapsed, 1)
        return result
    tail = runner_log.read_text(errors="replace").strip().splitlines()[-6:]
    return {
        "error": f"{error or 'no result written'}: {' | '.join(tail)}"[:2000],
        "seconds": round(elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    reps = args.reps or (1 if args.quick else 3)
    wanted_workloads = {n for n in args.only if n.startswith("w")}
    wanted_systems = {n for n in args.only if n in SYSTEMS}
    unknown = set(args.only) - wanted_workloads - wanted_systems
    if unknown or not wanted_workloads <= {w.key for w in WORKLOADS}:
        print(f"bench: unknown names {sorted(unknown | wanted_workloads)}; use w1..w7 or "
              f"{', '.join(SYSTEMS)}", file=sys.stderr)  # fmt: skip
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("BENCH_WORK_DIR", "/tmp/everruns-bench-work"))
    work.mkdir(parents=True, exist_ok=True)
    profile_dir = RESULTS / "profiles" if args.profile else None
    budget = BUDGET_S[mode]
    t_start = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    # `timeout` (scripts/bench) and operators stop us with SIGTERM: unwind through the finally
    # blocks that kill every runner's process group and stop the embedded PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    missing = unavailable()
    pg = Postgres(statements=args.profile)
    runs: report.Runs = {}
    skipped: list[str] = []
    try:
        env = environment(pg)
        print(f"bench: {mode} run, {reps} repetition(s), PostgreSQL {env['postgres']['version']} "
              f"({pg.where})", flush=True)  # fmt: skip
        for workload in WORKLOADS:
            if wanted_workloads and workload.key not in wanted_workloads:
                continue
            systems = [s for s in workload.systems if not wanted_systems or s in wanted_systems]
            sizes = workload.sizes(args.quick)
            timeout = 3 * sizes.cap_s + 120.0
            for rep in range(reps):
                for system in systems:
                    if system in missing:
                        result: dict[str, Any] = {
                            "error": f"not run: {missing[system]}",
                            "seconds": 0.0,
                        }
                        runs.setdefault(workload.key, {}).setdefault(system, []).append(result)
                        continue
                    left = budget - (time.monotonic() - t_start)
                    if left < 15.0:
                        skipped.append(f"{workload.key} {system} rep {rep + 1}: time budget spent")
                        continue
                    result = run_one(
                        pg, system, workload.key, rep, quick=args.quick,
                        timeout=min(timeout, left), work=work,
                        profile_dir=profile_dir if rep == 0 else None,
                    )  # fmt: skip
                    runs.setdefault(workload.key, {}).setdefault(system, []).append(result)
                    shown = result.get("error") or ", ".join(
                        f"{k}={report._num(v)}" for k, v in result["figures"].items()
                    )
                    print(f"  {workload.key} rep {rep + 1} {system:<13} "
                          f"{result['seconds']:6.1f}s  {shown}", flush=True)  # fmt: skip
    finally:
        pg.close()
    agg = report.aggregate(runs)
    document: dict[str, Any] = {
        "mode": mode,
        "started_at": started_at,
        "duration_s": time.monotonic() - t_start,
        "repetitions": reps,
        "environment": env,
        "runs": runs,
        "aggregate": agg,
        "ratios": report.ratios(agg),
        "targets": report.judge(agg),
        "skipped": skipped,
        "regressions": None,
        "machine_speed": None,
        "adjusted_regressions": None,
    }
    baseline_path = RESULTS / "baseline.json"
    if baseline_path.exists() and not args.profile:
        baselines = json.loads(baseline_path.read_text())
        base = baselines.get(mode)
        if base is not None:
            document["regressions"] = report.regressions(agg, base["aggregate"])
            document["machine_speed"] = report.machine_speeds(agg, base["aggregate"])
            document["adjusted_regressions"] = report.adjusted_regressions(agg, base["aggregate"])
    # Only a complete full run is "latest"; subsets and profiles never overwrite it.
    if args.profile:
        stem = "profile-run"
    elif args.only:
        stem = f"latest-only-{mode}"
    else:
        stem = "latest" if mode == "full" else "latest-quick"
    report.write(document, RESULTS / f"{stem}.json", RESULTS / f"{stem}.md")
    if args.save_baseline:
        baselines = json.loads(baseline_path.read_text()) if baseline_path.exists() else {}
        baselines[mode] = {
            "started_at": started_at,
            "commit": env["commit"],
            "aggregate": agg,
        }
        baseline_path.write_text(json.dumps(baselines, indent=1))
    if mode == "full" and not args.only and not args.profile and not skipped:
        _append_history(document)
        report.update_docs(document, REPO_ROOT / "docs" / "performance.md")
    print()
    print(report.markdown(document))
    if document["regressions"]:
        print("bench: figures more than 20 % worse than baseline.json:")
        for line in document["regressions"]:
            print(f"  {line}")
    if document["machine_speed"]:
        print(
            f"bench: the peers ran {document['machine_speed']['all']:.2f} x as fast as in the "
            "baseline's run; everruns' figures at the baseline machine's speed, more than 20 % "
            "worse:"
        )
        for line in document["adjusted_regressions"] or ["none"]:
            print(f"  {line}")
    if profile_dir is not None:
        from bench import profiles

        print(profiles.summarize_dir(profile_dir))
    return 0


def _append_history(document: dict[str, Any]) -> None:
    """One line per complete full run with everruns' medians, so each lever's gain can be
    followed from commit to commit."""
    medians = {
        f"{wkey}.{name}": summary["median"]
        for wkey, by_system in document["aggregate"].items()
        for name, summary in by_system.get("everruns", {}).items()
    }
    entry = {
        "at": document["started_at"],
        "mode": document["mode"],
        "commit": document["environment"]["commit"],
        "everruns": medians,
    }
    with (RESULTS / "history.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    sys.exit(main())
