"""Process lifecycle of `python -m everruns.server` and `python -m everruns.worker` as an operator
meets it: signals at any point of a start (SIGHUP from a closed terminal included), empty
variables, awkward data-directory paths, and the embedded PostgreSQL's life around control
planes that are killed or lose their postmaster. Each test starts real processes and stops
every one of them (and any PostgreSQL they leave) however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from .harness import REPO_ROOT, HarnessError, free_port, wait_until


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "GRPC_ADDRESS", "EVERRUNS_DATA_DIR")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A child process in its own session whose merged output is collected as it arrives."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = b""
        self._changed = trio.Event()
        self.eof = False

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    async def pump(self) -> None:
        assert self.process.stdout is not None
        try:
            async for chunk in self.process.stdout:
                self.output += chunk
                self._changed.set()
                self._changed = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.eof = True
            self._changed.set()

    async def wait_for(self, needle: str, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while needle not in self.text:
                if self.eof:
                    raise AssertionError(f"exited before printing {needle!r}:\n{self.text}")
                await self._changed.wait()
            return
        raise AssertionError(f"did not print {needle!r} within {timeout} s:\n{self.text}")

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    async def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it still runs after ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            return await self.process.wait()
        return None


@asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """Show a test's own failure, not the nursery's group around it."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def run_module(module: str, extra: Mapping[str, str], *args: str) -> AsyncIterator[Proc]:
    """Start ``python -m MODULE ARGS``; on the way out SIGTERM, then SIGKILL, its group."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", module, *args],
        env=_env(extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(REPO_ROOT),
        start_new_session=True,
    )
    proc = Proc(process)
    try:
        async with _unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(proc.pump)
            try:
                yield proc
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        proc.signal(signal.SIGTERM)
                        with trio.move_on_after(10):
                            await process.wait()
                    proc.signal(signal.SIGKILL)
                    with trio.move_on_after(5):
                        await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()


# ------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_while_waiting_for_the_database_stops_the_control_plane_at_once(
    signum: int,
) -> None:
    """The control plane started before its database says `retrying`; Ctrl-C or a SIGTERM from
    systemd/docker then stops it at once, with the clean-stop status 0.

    Before: signals were read only once the control plane served, so it ran on for the whole
    EVERRUNS_DB_CONNECT_TIMEOUT (30 s by default) and then exited 1 as if the database were
    the problem."""
    port = free_port()  # nothing listens there
    extra = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/everruns",
        "GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "EVERRUNS_DB_CONNECT_TIMEOUT": "40",
    }
    with trio.fail_after(60):
        async with run_module("everruns.server", extra) as server:
            await server.wait_for("retrying", timeout=20)
            began = time.monotonic()
            server.signal(signum)
            code = await server.wait(timeout=8)
            waited = time.monotonic() - began
            assert code == 0, (
                f"status {code} {waited:.1f} s after {signal.Signals(signum).name} "
                f"while waiting for the database:\n{server.text}"
            )
            assert "Traceback" not in server.text, server.text


async def test_closing_the_terminal_stops_the_control_plane_and_its_embedded_postgres(
    tmp_path: Path,
) -> None:
    """`python -m everruns.server` run in a terminal (the README's quick start) gets SIGHUP when
    the terminal or SSH session closes: it stops as on SIGTERM (status 0), stopping the
    embedded PostgreSQL it started.

    Before: SIGHUP killed it outright, and the PostgreSQL (in a session of its own, so it got
    no SIGHUP) ran on with nobody to stop it."""
    data_dir = tmp_path / "pg"
    address = f"127.0.0.1:{free_port()}"
    extra = {"EVERRUNS_DATA_DIR": str(data_dir), "GRPC_ADDRESS": address}
    try:
        with trio.fail_after(90):
            async with run_module("everruns.server", extra) as server:
                await server.wait_for(f"listening on {address}", timeout=60)
                assert _postmasters_on(data_dir)
                server.signal(signal.SIGHUP)
                code = await server.wait(timeout=30)
                assert code == 0, server.text
            await wait_until(
                lambda: not _postmasters_on(data_dir),
                timeout=5,
                what="the embedded PostgreSQL stopped with its control plane",
            )
    finally:
        await _stop_embedded(data_dir)


async def test_closing_the_terminal_drains_a_worker() -> None:
    """A worker run in a terminal gets SIGHUP when it closes: it drains as on SIGTERM and exits
    0 (here before it ever reached a control plane).

    Before: SIGHUP killed it outright (status -1), running tasks and all."""
    extra = {"GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}  # nothing listens there
    with trio.fail_after(30):
        async with run_module("everruns.worker", extra) as worker:
            await worker.wait_for("unreachable, retrying", timeout=20)
            worker.signal(signal.SIGHUP)
            code = await worker.wait(timeout=8)
            assert code == 0, f"status {code}:\n{worker.text}"
            assert "received SIGHUP: draining" in worker.text, worker.text


# ---------------------------------------------------------------------------- configuration


async def test_an_empty_runner_mode_means_the_default() -> None:
    """`RUNNER_MODE=` (an env or compose file) means the default, `durable`, as every other
    empty variable does: the control plane goes on to its database.

    Before: it exited 2 with `RUNNER_MODE='' is not supported`."""
    extra = {
        "RUNNER_MODE": "",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/everruns",
        "GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "EVERRUNS_DB_CONNECT_TIMEOUT": "0.5",
    }
    with trio.fail_after(30):
        async with run_module("everruns.server", extra) as server:
            code = await server.wait(timeout=20)
    assert "RUNNER_MODE" not in server.text, f"exit {code}:\n{server.text}"
    assert "did not accept a connection" in server.text, server.text


@pytest.mark.parametrize("name", ["every$runs", "every`id`runs"], ids=["dollar", "backtick"])
async def test_a_data_dir_pg_ctl_cannot_quote_is_refused_in_one_line(
    tmp_path: Path, name: str
) -> None:
    """pg_ctl starts the server with `/bin/sh -c` and the data directory in double quotes, where
    `$x` expands and a backtick runs a command. Such an EVERRUNS_DATA_DIR is refused at start
    with a line saying why (status 1), before anything is created or run.

    Before: the server did not start (or started on another path), and the error said
    `Examine the log output.; see DIR/everruns-postgres.log`, a log file that did not exist."""
    data_dir = tmp_path / name / "pg"
    extra = {"EVERRUNS_DATA_DIR": str(data_dir), "GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}
    try:
        with trio.fail_after(60):
            async with run_module("everruns.server", extra) as server:
                code = await server.wait(timeout=40)
        assert code == 1, f"status {code}:\n{server.text}"
        assert "Traceback" not in server.text, server.text
        assert "pg_ctl's shell command would interpret" in server.text, server.text
        assert "everruns-postgres.log" not in server.text, server.text
        assert not (tmp_path / name).exists(), "the refused data directory was created"
    finally:
        await _stop_embedded(data_dir)


# ------------------------------------------------------------------- embedded PostgreSQL


def _postmasters_on(data_dir: Path) -> list[int]:
    """Pids of live (non-zombie) processes whose working directory is ``data_dir`` (a
    postmaster and its backends chdir into their data directory)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.path.samefile(f"/proc/{entry.name}/cwd", data_dir):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                if stat.rpartition(")")[2].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


async def _stop_embedded(data_dir: Path) -> None:
    """Stop whatever PostgreSQL runs on ``data_dir`` (test cleanup; shielded, bounded)."""
    import attrs

    from everruns.store import embedded

    with trio.CancelScope(shield=True), trio.move_on_after(40):
        if (data_dir / "postmaster.pid").exists():
            handle = await trio.to_thread.run_sync(embedded.start, data_dir)
            await trio.to_thread.run_sync(embedded.stop, attrs.evolve(handle, started_by_us=True))


async def test_the_next_control_plane_takes_over_the_embedded_postgres_of_a_killed_one(
    tmp_path: Path,
) -> None:
    """kill -9 of the control plane leaves its embedded PostgreSQL running (nothing could stop
    it); the control plane started next on the same data directory reuses it, takes it over
    since its starter is dead, and stops it when it is stopped (SIGTERM), as the operator
    guide says: the embedded PostgreSQL stops with its control plane.

    Before: the second control plane never stopped a server it had not started, so this one
    ran on for good, owned by nobody."""
    data_dir = tmp_path / "pg"
    address = f"127.0.0.1:{free_port()}"
    extra = {"EVERRUNS_DATA_DIR": str(data_dir), "GRPC_ADDRESS": address}
    try:
        with trio.fail_after(120):
            async with run_module("everruns.server", extra) as first:
                await first.wait_for(f"listening on {address}", timeout=60)
                first.signal(signal.SIGKILL)
                assert await first.wait(timeout=10) == -signal.SIGKILL
            assert _postmasters_on(data_dir), "the killed control plane's PostgreSQL is gone"

            async with run_module("everruns.server", extra) as second:
                await second.wait_for(f"listening on {address}", timeout=60)
                second.signal(signal.SIGTERM)
                code = await second.wait(timeout=30)
                assert code == 0, second.text
            try:
                await wait_until(
                    lambda: not _postmasters_on(data_dir),
                    timeout=5,
                    what="the taken-over PostgreSQL stopped",
                )
            except HarnessError:
                raise AssertionError(
                    f"PostgreSQL processes {_postmasters_on(data_dir)} still run on {data_dir} "
                    f"after its control plane stopped cleanly:\n{second.text}"
                ) from None
    finally:
        await _stop_embedded(data_dir)


async def test_a_crashed_embedded_postgres_is_not_left_down_for_good(tmp_path: Path) -> None:
    """The embedded PostgreSQL belongs to its control plane: nothing else starts it. When its
    postmaster dies (the OOM killer, a kill -9), the control plane starts it again on the same
    port and serves again.

    Before: it stayed up, answered every call UNAVAILABLE and logged `database unavailable`
    forever: a control plane that looked alive and could never do anything again."""
    from everruns.client import Client
    from everruns.errors import EverrunsError

    data_dir = tmp_path / "pg"
    address = f"127.0.0.1:{free_port()}"
    extra = {
        "EVERRUNS_DATA_DIR": str(data_dir),
        "GRPC_ADDRESS": address,
        "EVERRUNS_RECLAIM_INTERVAL": "0.5",
    }
    try:
        with trio.fail_after(100):
            async with run_module("everruns.server", extra) as server:
                await server.wait_for(f"listening on {address}", timeout=60)
                await server.wait_for("connection pool warm", timeout=15)
                postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
                os.kill(postmaster, signal.SIGKILL)
                await server.wait_for("starting it again", timeout=15)
                probes = 0

                async def starts_a_workflow() -> bool:
                    nonlocal probes
                    probes += 1
                    with trio.move_on_after(3):
                        try:
                            await client.start_workflow(
                                "never_served", None, workflow_id=f"probe-{probes}"
                            )
                        except EverrunsError:
                            return False
                        return True
                    return False

                async with Client.connect(address) as client:
                    await wait_until(
                        starts_a_workflow, timeout=40, interval=1.0, what="it serves again"
                    )
                assert server.process.returncode is None, server.text[-3000:]
                assert "Traceback" not in server.text, server.text[-3000:]
    finally:
        await _stop_embedded(data_dir)
