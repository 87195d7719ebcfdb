"""Plumbing shared by the benchmark runners: child processes, databases, statistics, results.

Everything here is synchronous and framework-neutral, so Trio runners (everruns) and asyncio
runners (the peers) use the same code, through ``to_thread`` where it blocks. Child processes
stay in the runner's process group: the driver starts each runner as a group leader and kills
the whole group when the runner ends, so nothing a runner started can outlive it, even when the
runner itself is killed. This module never decides what is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


class BenchError(RuntimeError):
    """A run could not be carried out (a process did not start, a drain never finished)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, with the repository importable and output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class Child:
    """A child process whose output goes to a log file that can be searched for a ready line."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            list(argv), env=dict(env), stdout=self._out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Block until the output matches ``pattern``.

        Raises:
            BenchError: the process exited first or ``timeout`` passed; the message holds the
                end of its output.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text())
            if match:
                return match
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {timeout:g} s: {self.tail()}")
            time.sleep(0.02)

    def tail(self, lines: int = 8) -> str:
        return " | ".join(self.text().strip().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL and reap (benchmarks keep no state worth a graceful stop)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()

    def interrupt(self, timeout: float = 10.0) -> None:
        """SIGINT (what makes py-spy write its profile), then wait, then kill."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class Children:
    """Every child a runner started; `close` kills those still running (use in ``finally``)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._all: list[Child] = []

    def start(
        self, name: str, argv: Sequence[str], env_extra: Mapping[str, str] | None = None
    ) -> Child:
        child = Child(name, argv, child_env(env_extra), self.log_dir / f"{name}.log")
        self._all.append(child)
        return child

    def close(self) -> None:
        for child in reversed(self._all):
            child.kill()


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rate_between(first: float, last: float, executions: int) -> float:
    """Executions per second from the first to the ``executions``-th start (inclusive)."""
    if executions < 2 or last <= first:
        return math.nan
    return (executions - 1) / (last - first)


# --------------------------------------------------------------------------------- runners


@attrs.define
class RunResult:
    """What one runner reports for one workload run."""

    figures: dict[str, float] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)
    details: dict[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"figures": self.figures, "notes": self.notes, "details": self.details}

    def cap_note(self, what: str, done: int, wanted: int, cap_s: float) -> None:
        """Say so when a time cap cut the run short (the figure is then from ``done``)."""
        if done < wanted:
            self.notes.append(f"{what}: time cap {cap_s:g} s reached after {done} of {wanted}")

    def latencies(self, prefix: str, values_ms: list[float], wanted: int, cap_s: float) -> None:
        """Record p50/p99 of ``values_ms`` as ``{prefix}_p50_ms``/``{prefix}_p99_ms``."""
        self.figures[f"{prefix}_p50_ms"] = percentile(values_ms, 50)
        self.figures[f"{prefix}_p99_ms"] = percentile(values_ms, 99)
        self.details["samples"] = len(values_ms)
        self.cap_note("samples", len(values_ms), wanted, cap_s)


@attrs.frozen
class RunnerArgs:
    """The command line every runner takes (`bench.run` builds it)."""

    workload: str
    db: str
    out: Path
    logs: Path
    quick: bool
    profile_dir: Path | None

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None) -> RunnerArgs:
        parser = argparse.ArgumentParser()
        parser.add_argument("--workload", required=True)
        parser.add_argument("--db", required=True, help="PostgreSQL URL of a fresh database")
        parser.add_argument("--out", required=True, type=Path)
        parser.add_argument("--logs", required=True, type=Path)
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--profile-dir", type=Path, default=None)
        ns = parser.parse_args(argv)
        return cls(ns.workload, ns.db, ns.out, ns.logs, ns.quick, ns.profile_dir)


def write_result(path: Path, result: RunResult) -> None:
    path.write_text(json.dumps(result.to_json(), indent=1, allow_nan=True))


def drop_nan(figures: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in figures.items() if not (isinstance(v, float) and math.isnan(v))}


def pg_ctl_url_parts(url: str) -> dict[str, str]:
    """Host, port, user, database of a ``postgresql://`` URL (for the conninfo of psycopg)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password or ""),
        "dbname": unquote(parts.path.lstrip("/") or "postgres"),
    }


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))
