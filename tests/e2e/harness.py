"""End-to-end harness: real control-plane and worker processes, killed on purpose, never leaked.

`start_server` and `start_worker` launch ``python -m everruns.server`` / ``python -m
everruns.worker`` with `trio.run_process` inside a nursery the caller owns, each in its own
session (process group), and return once the process says it is ready. Cancelling that nursery
terminates every process (SIGTERM, then SIGKILL after a short bound), and `open_cluster` wraps
it all: it owns the nursery, remembers every process it started, and on the way out asserts that
none of them (nor anything they spawned) is still alive. `ExecutionLog` reads the per-test file
in which the activities of `tests.e2e.workflows` record each execution; `run_cli` runs the
`everruns` command as an operator would; `private_postgres` gives a test a PostgreSQL of its
own that it may stop and start. The harness only starts, signals and observes processes; it must
not reach into the engine's internals — what a test checks about the database it reads through
the `pool` fixture (or its own connection to its private PostgreSQL).
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from everruns.client import Client
from everruns.store import embedded
from everruns.store.embedded import EmbeddedHandle

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_MODULE = "tests.e2e.workflows"
"""What workers import by default (resolved through ``PYTHONPATH=REPO_ROOT``)."""

SERVER_READY = re.compile(r"everruns control plane listening on (?P<address>\S+)")
WORKER_READY = re.compile(r"everruns worker (?P<worker_id>\S+) serving")
WORKER_REGISTERED = re.compile(r"worker (?P<worker_id>\S+) registered with the control plane")
"""The worker's log line once RegisterWorker succeeded (its ready line comes before that)."""

READY_TIMEOUT = 30.0
"""Seconds a process may take to print its ready line (imports, migrations, registration)."""
TERM_GRACE = 3.0
"""Seconds between SIGTERM and SIGKILL when the harness stops a process."""
WORKER_GRACE_PERIOD = "1"
"""The workers' shutdown grace in tests, so a SIGTERM at teardown does not wait 30 s."""


class HarnessError(AssertionError):
    """A process did not start, exited early, or outlived its test; the message has its output."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (bind to 0, read it, close).

    The caller keeps the number, so a restarted server comes back on the same address.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(
    env_extra: Mapping[str, str] | None = None, *, drop: Iterable[str] = ()
) -> dict[str, str]:
    """Return this process's environment prepared for a child everruns process.

    The repository root is put first on ``PYTHONPATH`` so workers can import
    ``tests.e2e.workflows``; output is unbuffered so ready lines arrive at once.
    """
    env = dict(os.environ)
    for name in drop:
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if env_extra:
        env.update(env_extra)
    return env


class ManagedProcess:
    """One child process started by the harness, with everything it printed.

    Attributes:
        name: a label for messages (``server-1``, ``worker-a``).
        argv: the command line.
        lines: every line of its stdout and stderr (merged), in order.
        log_path: where the same output is written as it arrives, or None.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path | None) -> None:
        self.name = name
        self.argv = list(argv)
        self.lines: list[str] = []
        self.log_path = log_path
        self._process: trio.Process | None = None
        self._changed = trio.Event()
        self._eof = False
        self._exited = trio.Event()
        self._start_time: int | None = None

    # ------------------------------------------------------------------------------ identity

    @property
    def process(self) -> trio.Process:
        if self._process is None:
            raise HarnessError(f"{self.name} was never started")
        return self._process

    @property
    def pid(self) -> int:
        """The process id (also its process-group id: each child leads its own session)."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal), else None."""
        return self.process.returncode

    def tail(self, n: int = 40) -> str:
        """Return the last ``n`` output lines, indented, for failure messages."""
        shown = self.lines[-n:]
        header = f"--- last {len(shown)} of {len(self.lines)} lines of {self.name} (pid {self.pid})"
        return "\n".join([header, *("    " + line for line in shown)])

    # ------------------------------------------------------------------------------- signals

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process's whole group; a no-op once the group is gone.

        Other test sessions share the machine: once our group is gone its id may be reused by
        one of theirs, which must never receive our signals (see `owns_group`).
        """
        if not self.owns_group():
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        """SIGTERM: ask for a graceful stop."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (``kill -9``): no cleanup of any kind runs in the process."""
        self.send_signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its connections open (a stalled host or VM)."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: a paused process carries on where it stopped."""
        self.send_signal(signal.SIGCONT)

    def output_matches(self, pattern: re.Pattern[str] | str, *, since: int = 0) -> list[str]:
        """Return the output lines (from index ``since`` on) in which ``pattern`` occurs."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [line for line in self.lines[since:] if regex.search(line)]

    async def wait(self) -> int:
        """Wait for the process to exit and return its status (cancellable)."""
        code: int = await self.process.wait()
        return code

    async def kill_and_wait(self) -> int:
        """SIGKILL the process and wait (shielded, bounded) until it is reaped.

        Raises:
            HarnessError: it was still not reaped 10 s after SIGKILL.
        """
        self.kill()
        with trio.move_on_after(10, shield=True):
            return await self.wait()
        raise HarnessError(f"{self.name} survived SIGKILL for 10 s\n{self.tail()}")

    def group_alive(self) -> bool:
        """Whether any process of this one's group still exists (zombies included)."""
        return self.owns_group()

    def owns_group(self) -> bool:
        """Whether the process group named by our pid exists and is still ours.

        The kernel never reuses a pid that is still a group id, so while any member of our
        group lives the id is ours. Once the group is empty, a new session leader elsewhere may
        get the same pid (and group id); it is told apart by its start time.
        """
        members = _group_members(self.pid)
        if not members:
            return False
        if self.pid in members:
            return _start_time(self.pid) == self._start_time
        return True

    # -------------------------------------------------------------------------------- output

    async def wait_for_line(
        self, pattern: re.Pattern[str] | str, *, timeout: float, since: int = 0
    ) -> re.Match[str]:
        """Wait until an output line (from index ``since`` on) matches ``pattern``.

        Returns:
            The match.

        Raises:
            HarnessError: the process closed its output first, or ``timeout`` passed; the
                message carries its last lines.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        checked = since
        with trio.move_on_after(timeout):
            while True:
                while checked < len(self.lines):
                    found = regex.search(self.lines[checked])
                    checked += 1
                    if found is not None:
                        return found
                if self._eof:
                    raise HarnessError(
                        f"{self.name} exited (status {self.returncode}) before printing "
                        f"{regex.pattern!r}\n{self.tail()}"
                    )
                await self._changed.wait()
        raise HarnessError(
            f"{self.name} did not print {regex.pattern!r} within {timeout:g} s\n{self.tail()}"
        )

    async def _pump(self, stream: trio.abc.ReceiveStream) -> None:
        # Splits on newlines ourselves: trio streams deliver arbitrary chunks.
        pending = b""
        log = self.log_path.open("ab") if self.log_path is not None else None
        try:
            async with stream:
                async for chunk in stream:
                    if log is not None:
                        log.write(chunk)
                        log.flush()
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    if complete:
                        self.lines.extend(c.decode(errors="replace") for c in complete)
                        self._wake()
        except trio.BrokenResourceError:
            pass
        finally:
            if pending:
                self.lines.append(pending.decode(errors="replace"))
            self._eof = True
            self._wake()
            if log is not None:
                log.close()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _deliver_cancel(self, process: trio.Process) -> None:
        # Called shielded by trio.run_process when the nursery is cancelled; run_process
        # cancels this as soon as the process exits, so SIGKILL only follows a hung SIGTERM.
        self.terminate()
        self.resume()  # a paused process acts on SIGTERM only once it runs again
        await trio.sleep(TERM_GRACE)
        self.kill()


def _proc_stat(pid: int) -> list[str] | None:
    # /proc/PID/stat: "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses,
    # so split after its last ")". Fields from "state" on, numbered from 3 in proc(5).
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None else None


def _group_members(pgid: int) -> set[int]:
    """The pids of every process (zombies included) in process group ``pgid``."""
    members: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is not None and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


@attrs.define(eq=False)
class _Controlled:
    """Signals and waits of a started process, shared by servers and workers."""

    proc: ManagedProcess

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> None:
        """SIGTERM: a server shuts down cleanly; a worker drains within its grace period."""
        self.proc.terminate()

    def kill(self) -> None:
        """SIGKILL (``kill -9``): the process vanishes without closing anything."""
        self.proc.kill()

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its TCP connections still open."""
        self.proc.pause()

    def resume(self) -> None:
        """SIGCONT: it carries on, unaware that time passed."""
        self.proc.resume()

    async def wait(self) -> int:
        """Wait for exit; returns the status."""
        return await self.proc.wait()

    async def kill_and_wait(self) -> int:
        """SIGKILL and wait until reaped (bounded)."""
        return await self.proc.kill_and_wait()

    def tail(self, n: int = 40) -> str:
        return self.proc.tail(n)


@attrs.define(eq=False)
class ServerProcess(_Controlled):
    """A running control plane.

    Attributes:
        proc: the process and its output.
        address: ``host:port`` it listens on (the same across `restart_server`).
        port: the port.
        database_url: the database it serves.
        env_extra: the extra environment it was started with (reused on restart).
    """

    address: str
    port: int
    database_url: str
    env_extra: dict[str, str]


@attrs.define(eq=False)
class WorkerProcess(_Controlled):
    """A running worker.

    Attributes:
        proc: the process and its output.
        worker_id: its ``WORKER_ID``.
        address: the control plane it talks to.
        modules: what it imported.
    """

    worker_id: str
    address: str
    modules: tuple[str, ...]


async def _launch(
    nursery: trio.Nursery,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    ready: re.Pattern[str] | None,
    *,
    log_dir: Path | None,
    ready_timeout: float,
    started: list[ManagedProcess] | None,
) -> tuple[ManagedProcess, re.Match[str] | None]:
    log_path = log_dir / f"{name}.log" if log_dir is not None else None
    managed = ManagedProcess(name, argv, log_path)
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            list(argv),
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(REPO_ROOT),
            start_new_session=True,
            deliver_cancel=managed._deliver_cancel,
        )
    )
    managed._process = process
    managed._start_time = _start_time(process.pid)
    if started is not None:
        started.append(managed)
    assert process.stdout is not None
    nursery.start_soon(managed._pump, process.stdout)
    if ready is None:
        return managed, None
    try:
        match = await managed.wait_for_line(ready, timeout=ready_timeout)
    except BaseException:
        await managed.kill_and_wait()
        raise
    return managed, match


async def start_server(
    database_url: str,
    *,
    nursery: trio.Nursery,
    address: str | None = None,
    env_extra: Mapping[str, str] | None = None,
    name: str = "server",
    log_dir: Path | None = None,
    ready_timeout: float = READY_TIMEOUT,
    started: list[ManagedProcess] | None = None,
) -> ServerProcess:
    """Start ``python -m everruns.server`` and return once it listens.

    Args:
        database_url: the database (``DATABASE_URL``).
        nursery: owns the process; cancelling it stops the process (SIGTERM, then SIGKILL).
        address: ``host:port`` to listen on; default a free loopback port. Pass a previous
            server's address to bring a control plane back where workers expect it.
        env_extra: extra environment (``EVERRUNS_STALE_AFTER``, ``EVERRUNS_AUTH_TOKEN``...).
        name: label for messages and the log file.
        log_dir: write its whole output to ``log_dir/NAME.log`` as well.
        ready_timeout: seconds to wait for the ready line.
        started: list the process is appended to as soon as it exists (for leak checks).

    Returns:
        The server; ``address`` is what it printed.

    Raises:
        HarnessError: it exited or stayed silent instead (its output is in the message).
    """
    if address is None:
        address = f"127.0.0.1:{free_port()}"
    extra = dict(env_extra or {})
    env = base_env({"DATABASE_URL": database_url, "GRPC_ADDRESS": address, **extra})
    argv = [sys.executable, "-m", "everruns.server"]
    managed, match = await _launch(
        nursery,
        name,
        argv,
        env,
        SERVER_READY,
        log_dir=log_dir,
        ready_timeout=ready_timeout,
        started=started,
    )
    assert match is not None
    printed = match["address"]
    port = int(printed.rpartition(":")[2])
    return ServerProcess(managed, printed, port, database_url, extra)


async def start_worker(
    address: str,
    modules: Sequence[str] = (WORKFLOWS_MODULE,),
    *,
    nursery: trio.Nursery,
    worker_id: str,
    env_extra: Mapping[str, str] | None = None,
    max_concurrent_tasks: int | None = None,
    log_dir: Path | None = None,
    ready_timeout: float = READY_TIMEOUT,
    wait_ready: bool = True,
    started: list[ManagedProcess] | None = None,
) -> WorkerProcess:
    """Start ``python -m everruns.worker MODULE...`` and return once it has registered.

    The worker gets no ``DATABASE_URL`` (it must not need one) and a short shutdown grace
    period unless ``env_extra`` says otherwise.

    Args:
        address: the control plane (``GRPC_ADDRESS``).
        modules: modules defining workflows and activities.
        nursery: owns the process.
        worker_id: its ``WORKER_ID``.
        env_extra: extra environment, e.g. ``E2E_LOG``.
        max_concurrent_tasks: ``MAX_CONCURRENT_TASKS``; default the worker's own.
        log_dir: write its whole output to ``log_dir/WORKER_ID.log`` as well.
        ready_timeout: seconds to wait for the ready line.
        wait_ready: False returns as soon as the process exists (e.g. no server is up yet);
            True waits for its ready line and then for its registration.
        started: list the process is appended to as soon as it exists (for leak checks).

    Returns:
        The worker.

    Raises:
        HarnessError: it exited or stayed silent instead (its output is in the message).
    """
    env_map: dict[str, str] = {
        "GRPC_ADDRESS": address,
        "WORKER_ID": worker_id,
        "EVERRUNS_WORKER_GRACE_PERIOD": WORKER_GRACE_PERIOD,
    }
    if max_concurrent_tasks is not None:
        env_map["MAX_CONCURRENT_TASKS"] = str(max_concurrent_tasks)
    env_map.update(env_extra or {})
    env = base_env(env_map, drop=("DATABASE_URL",))
    argv = [sys.executable, "-m", "everruns.worker", *modules]
    managed, match = await _launch(
        nursery,
        worker_id,
        argv,
        env,
        WORKER_READY if wait_ready else None,
        log_dir=log_dir,
        ready_timeout=ready_timeout,
        started=started,
    )
    if match is not None:
        if match["worker_id"] != worker_id:
            await managed.kill_and_wait()
            raise HarnessError(
                f"worker started with WORKER_ID={worker_id!r} announced itself as "
                f"{match['worker_id']!r}\n{managed.tail()}"
            )
        try:
            await managed.wait_for_line(WORKER_REGISTERED, timeout=ready_timeout)
        except BaseException:
            await managed.kill_and_wait()
            raise
    return WorkerProcess(managed, worker_id, address, tuple(modules))


# ------------------------------------------------------------------------------ executions


@attrs.frozen
class Execution:
    """One line of the execution log (see `tests.e2e.workflows.record`).

    Attributes:
        event: ``start``, ``end``, ``cancelled`` or ``finally``.
        activity: the activity type.
        workflow_id, run_id, activity_id: which activity of which run.
        attempt: the attempt number the worker was given.
        worker: the ``WORKER_ID`` of the process that ran it.
        pid: that process.
        t: ``time.monotonic()`` when recorded (comparable across processes).
        data: whatever the activity added (input, result, label).
    """

    event: str
    activity: str
    workflow_id: str
    run_id: str
    activity_id: str
    attempt: int
    worker: str
    pid: int
    t: float
    data: dict[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        """The activity's identity across attempts: (run id, activity id)."""
        return (self.run_id, self.activity_id)

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> Execution:
        return cls(
            event=str(entry["event"]),
            activity=str(entry["activity"]),
            workflow_id=str(entry["workflow_id"]),
            run_id=str(entry["run_id"]),
            activity_id=str(entry["activity_id"]),
            attempt=int(entry["attempt"]),
            worker=str(entry["worker"]),
            pid=int(entry["pid"]),
            t=float(entry["t"]),
            data=dict(entry.get("data") or {}),
        )


class ExecutionLog:
    """The file the test activities append to; pass `env` to every worker.

    Every line must parse: writes are single ``O_APPEND`` writes, so a torn line is a bug worth
    failing on.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def env(self) -> dict[str, str]:
        """The environment a worker needs to record here."""
        return {"E2E_LOG": str(self.path)}

    def records(
        self,
        event: str | None = None,
        *,
        activity: str | None = None,
        workflow_id: str | None = None,
    ) -> list[Execution]:
        """Return the records so far, in file order, optionally filtered.

        Raises:
            HarnessError: a line is not a complete record.
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        found: list[Execution] = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                item = Execution.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise HarnessError(f"{self.path}:{number} is not a record: {line!r}") from exc
            if event is not None and item.event != event:
                continue
            if activity is not None and item.activity != activity:
                continue
            if workflow_id is not None and item.workflow_id != workflow_id:
                continue
            found.append(item)
        return found

    def count_by_key(
        self, event: str, *, activity: str | None = None, workflow_id: str | None = None
    ) -> collections.Counter[tuple[str, str]]:
        """How many ``event`` records each (run id, activity id) has."""
        return collections.Counter(
            r.key for r in self.records(event, activity=activity, workflow_id=workflow_id)
        )


FINISHED_EVENTS = frozenset({"end", "failed", "cancelled"})
"""Execution-log events that end an activity body's run (``finally`` comes after one of them)."""


def peak_concurrency(records: Sequence[Execution], worker: str | None = None) -> int:
    """The most activity bodies that were running at one moment (on ``worker``, or anywhere).

    A run starts at its ``start`` record and ends at its first finishing record (`end`,
    `failed`, `cancelled`); a run with no finishing record (its process was killed) counts as
    running until the last record of the log.
    """
    mine = [r for r in records if worker is None or r.worker == worker]
    if not mine:
        return 0
    horizon = max(r.t for r in mine)
    ends: dict[tuple[tuple[str, str], int, int], float] = {}
    for r in mine:
        if r.event in FINISHED_EVENTS:
            ends.setdefault((r.key, r.attempt, r.pid), r.t)
    marks: list[tuple[float, int]] = []
    for r in mine:
        if r.event == "start":
            marks.append((r.t, 1))
            marks.append((ends.get((r.key, r.attempt, r.pid), horizon), -1))
    running = peak = 0
    # At equal times count the end first: a slot freed and reused is not an overlap.
    for _, step in sorted(marks):
        running += step
        peak = max(peak, running)
    return peak


# -------------------------------------------------------------------------------------- cli


@attrs.frozen
class CliResult:
    """What one run of the ``everruns`` command did.

    Attributes:
        argv: the arguments given after the program name.
        code: its exit status.
        stdout, stderr: what it printed.
    """

    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The JSON document it printed (run it with ``--json``).

        Raises:
            HarnessError: it failed or printed something else; the message has its output.
        """
        if self.code != 0:
            raise HarnessError(f"{self.describe()} failed")
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise HarnessError(f"{self.describe()} did not print JSON") from exc

    def describe(self) -> str:
        """The command line and its output, for assertion messages."""
        return (
            f"`everruns {' '.join(self.argv)}` (exit {self.code})\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


def server_env(env_extra: Mapping[str, str]) -> dict[str, str]:
    """`base_env` for ``python -m everruns.server`` run as an operator would: the database and
    the address come from ``env_extra`` alone, never from the test run's own environment."""
    return base_env(env_extra, drop=("DATABASE_URL", "GRPC_ADDRESS"))


async def run_server_command(
    args: Sequence[str], env_extra: Mapping[str, str], timeout: float = 30.0
) -> tuple[int, str]:
    """Run ``python -m everruns.server ARGS...`` to its end (within ``timeout`` seconds, else
    ``trio.TooSlowError``); return its exit status and its output, stdout then stderr."""
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [sys.executable, "-m", "everruns.server", *args],
            env=server_env(env_extra),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, (done.stdout + done.stderr).decode()


async def run_cli(
    address: str,
    *args: str,
    env_extra: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> CliResult:
    """Run ``python -m everruns.cli --address ADDRESS ARGS...`` and return what it did.

    The CLI gets no ``DATABASE_URL``: an operator's command talks to the control plane only.

    Raises:
        HarnessError: it ran longer than ``timeout`` seconds (it is killed).
    """
    argv = ("--address", address, *args)
    with trio.move_on_after(timeout):
        done = await trio.run_process(
            [sys.executable, "-m", "everruns.cli", *argv],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
            env=base_env(env_extra, drop=("DATABASE_URL",)),
            cwd=str(REPO_ROOT),
        )
        return CliResult(
            tuple(argv),
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
    raise HarnessError(f"`everruns {' '.join(argv)}` ran longer than {timeout:g} s")


# --------------------------------------------------------------------------- private database


async def start_private_postgres(data_dir: Path) -> EmbeddedHandle:
    """Start (or restart) an embedded PostgreSQL of the test's own on ``data_dir``.

    A restart on the same directory comes back on the same port while that port is free, so
    the control plane's ``DATABASE_URL`` stays valid.
    """
    return await trio.to_thread.run_sync(embedded.start, data_dir)


async def stop_private_postgres(handle: EmbeddedHandle) -> None:
    """Stop it (fast shutdown: sessions are terminated, as in a real restart); shielded."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(embedded.stop, handle)


@asynccontextmanager
async def private_postgres(data_dir: Path) -> AsyncIterator[EmbeddedHandle]:
    """A PostgreSQL for one test, stopped when the block ends however it ends.

    The block may stop and start it again (`stop_private_postgres`, `start_private_postgres`);
    the last server started on ``data_dir`` is the one stopped at the end.
    """
    handle = await start_private_postgres(data_dir)
    try:
        yield handle
    finally:
        # Whatever the block did, stop what runs on the directory now: start() reuses a
        # running server (then stop() would leave it alone), so restart it to own it.
        with trio.CancelScope(shield=True):
            current = await trio.to_thread.run_sync(embedded.start, data_dir)
            await trio.to_thread.run_sync(embedded.stop, attrs.evolve(current, started_by_us=True))


# ---------------------------------------------------------------------------------- waiting


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Wait until ``predicate()`` (sync or async) is true, checking every ``interval`` s.

    Polling is acceptable here: the harness observes other processes, which cannot wake us.

    Raises:
        HarnessError: still false after ``timeout`` seconds; the message says ``what``.
    """
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if not isinstance(value, bool):
                value = await value
            if value:
                return
            await trio.sleep(interval)
    raise HarnessError(f"timed out after {timeout:g} s waiting until {what}")


def connect(address: str) -> AbstractAsyncContextManager[Client]:
    """Open a client to ``address`` (``async with connect(server.address) as client``)."""
    return Client.connect(address)


def monotonic() -> float:
    """The clock the execution log's ``t`` uses (not trio's, which has a random offset)."""
    return time.monotonic()


# ---------------------------------------------------------------------------------- cluster


class Cluster:
    """The processes of one test; made by `open_cluster`.

    Attributes:
        database_url: the test's database.
        log: the execution log every worker it starts records to.
        log_dir: where each process's output file goes.
        processes: every process started, in order.
        servers: every control plane started, in order (several may share the database).
        workers: every worker started, in order.
        server: the most recently started server (None before the first).
    """

    def __init__(
        self, nursery: trio.Nursery, database_url: str, log_dir: Path, server_env: dict[str, str]
    ) -> None:
        self._nursery = nursery
        self.database_url = database_url
        self.log_dir = log_dir
        self.log = ExecutionLog(log_dir / "executions.jsonl")
        self.processes: list[ManagedProcess] = []
        self.servers: list[ServerProcess] = []
        self.workers: list[WorkerProcess] = []
        self.server: ServerProcess | None = None
        self._server_env = server_env
        self._servers = 0

    @property
    def address(self) -> str:
        """The current server's address."""
        if self.server is None:
            raise HarnessError("no server has been started in this cluster")
        return self.server.address

    async def start_server(
        self, *, address: str | None = None, env_extra: Mapping[str, str] | None = None
    ) -> ServerProcess:
        """Start a control plane (on ``address`` if given); see `start_server`."""
        self._servers += 1
        server = await start_server(
            self.database_url,
            nursery=self._nursery,
            address=address,
            env_extra={**self._server_env, **(env_extra or {})},
            name=f"server-{self._servers}",
            log_dir=self.log_dir,
            started=self.processes,
        )
        self.server = server
        self.servers.append(server)
        return server

    async def restart_server(self, *, kill: bool = True) -> ServerProcess:
        """Stop the current server (SIGKILL, or SIGTERM) and start a new one on its address.

        Raises:
            HarnessError: the old one did not exit within 10 s, or the new one did not start.
        """
        old = self.server
        if old is None:
            raise HarnessError("no server to restart")
        if kill:
            await old.kill_and_wait()
        else:
            old.terminate()
            with trio.move_on_after(10):
                await old.wait()
            if old.proc.returncode is None:
                raise HarnessError(f"{old.proc.name} ignored SIGTERM for 10 s\n{old.tail()}")
        return await self.start_server(address=old.address, env_extra=old.env_extra)

    async def start_worker(
        self,
        worker_id: str,
        *,
        modules: Sequence[str] = (WORKFLOWS_MODULE,),
        env_extra: Mapping[str, str] | None = None,
        max_concurrent_tasks: int | None = None,
        address: str | None = None,
        wait_ready: bool = True,
    ) -> WorkerProcess:
        """Start a worker recording to `log`; see `start_worker`."""
        worker = await start_worker(
            address or self.address,
            modules,
            nursery=self._nursery,
            worker_id=worker_id,
            env_extra={**self.log.env, **(env_extra or {})},
            max_concurrent_tasks=max_concurrent_tasks,
            log_dir=self.log_dir,
            wait_ready=wait_ready,
            started=self.processes,
        )
        self.workers.append(worker)
        return worker

    def client(self, address: str | None = None) -> AbstractAsyncContextManager[Client]:
        """A client of the current server (or ``address``)."""
        return connect(address or self.address)

    async def cli(self, *args: str, address: str | None = None) -> CliResult:
        """Run the ``everruns`` command against the current server (or ``address``)."""
        return await run_cli(address or self.address, *args)

    def tails(self, n: int = 30) -> str:
        """The last lines of every process, for a failure message."""
        return "\n".join(p.tail(n) for p in self.processes)


@asynccontextmanager
async def open_cluster(
    database_url: str,
    log_dir: Path,
    *,
    server_env: Mapping[str, str] | None = None,
) -> AsyncIterator[Cluster]:
    """Own the processes of one test: stop them all on exit and assert none outlived it.

    On exit (normal or not) every process still running gets SIGTERM, then SIGKILL after
    `TERM_GRACE` seconds; the wait is shielded by trio.run_process, so a failing or cancelled
    test cannot leak a process. If the block raised, the tail of every process's output is
    printed (pytest shows it with the failure).

    Raises:
        HarnessError: a process (or a child it spawned) was still alive after teardown.
    """
    await trio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    processes: list[ManagedProcess] = []
    failed = True
    try:
        async with trio.open_nursery() as nursery:
            cluster = Cluster(nursery, database_url, log_dir, dict(server_env or {}))
            cluster.processes = processes
            try:
                yield cluster
                failed = False
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps the test's own failure; show the test the failure itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        if failed and processes:
            print("\n".join(p.tail(60) for p in processes if p._process is not None))
        _assert_no_survivors(processes)


def _assert_no_survivors(processes: Sequence[ManagedProcess]) -> None:
    leaked: list[str] = []
    for proc in processes:
        if proc._process is None:
            continue
        # A grandchild reparented to init may be a zombie for a moment before init reaps it.
        deadline = time.monotonic() + 1.0
        while proc.group_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.returncode is None or proc.group_alive():
            leaked.append(f"{proc.name} (pid {proc.pid}, status {proc.returncode})")
            proc.kill()
    if leaked:
        raise HarnessError("processes outlived their test: " + ", ".join(leaked))
