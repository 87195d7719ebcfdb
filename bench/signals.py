"""Timing signals from task bodies to the process that measures them, over loopback UDP.

Task bodies run in other processes (workers). A body that must report when it ran sends one
small datagram — ``kind pid time.time() [tag]`` — to the port named by ``BENCH_SIGNAL_PORT``;
the measuring process owns the socket and reads them. UDP on loopback keeps the body's cost to
one non-blocking ``sendto`` and needs no shared file or database table. This module must stay
importable by every system's worker (no trio, no asyncio at import time).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import attrs

PORT_ENV = "BENCH_SIGNAL_PORT"
COUNT_ENV = "BENCH_COUNT"
PROGRESS_ENV = "BENCH_PROGRESS_EVERY"


class _Sender:
    """This process's sending side, configured from the environment."""

    def __init__(self) -> None:
        raw = os.environ.get(PORT_ENV, "")
        self.port = int(raw) if raw else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if raw else None
        self.target_count = int(os.environ.get(COUNT_ENV, "0") or 0)
        self.progress_every = int(os.environ.get(PROGRESS_ENV, "0") or 0)
        self.counts: dict[str, int] = {}


_sender = _Sender()


def configure_from_env() -> None:
    """Read the environment again (for a process that sets it after importing this module)."""
    global _sender
    _sender = _Sender()


def send(kind: str, tag: str = "") -> None:
    """Send ``kind`` with this process's pid, the wall clock and an optional tag."""
    sender = _sender
    if sender.sock is None or sender.port is None:
        return
    message = f"{kind} {os.getpid()} {time.time():.6f} {tag}".encode()
    sender.sock.sendto(message, ("127.0.0.1", sender.port))


def count(kind: str) -> None:
    """Count one execution of ``kind``; signal the first, every ``BENCH_PROGRESS_EVERY``-th
    and the ``BENCH_COUNT``-th one (tag: the count so far).

    A throughput run needs only when the drain began and how far it got by when, so the body's
    cost stays a dict increment for all but a few executions.
    """
    sender = _sender
    n = sender.counts.get(kind, 0) + 1
    sender.counts[kind] = n
    if n == 1:
        send(f"{kind}-first", "1")
    if n == sender.target_count:
        send(f"{kind}-last", str(n))
    elif sender.progress_every and n % sender.progress_every == 0:
        send(f"{kind}-progress", str(n))


@attrs.frozen
class Signal:
    """One datagram as received: what happened, in which process, when (unix seconds)."""

    kind: str
    pid: int
    time: float
    tag: str

    @classmethod
    def parse(cls, data: bytes) -> Signal:
        kind, pid, when, *rest = data.decode().split(" ", 3)
        return cls(kind, int(pid), float(when), rest[0] if rest else "")


def matching(
    kind: str | None = None,
    tag: str | None = None,
    *,
    tag_prefix: str | None = None,
    not_pid: int | None = None,
) -> Callable[[Signal], bool]:
    """A predicate for `Receiver.wait_for`: every given condition must hold."""

    def predicate(signal: Signal) -> bool:
        return (
            (kind is None or signal.kind == kind)
            and (tag is None or signal.tag == tag)
            and (tag_prefix is None or signal.tag.startswith(tag_prefix))
            and (not_pid is None or signal.pid != not_pid)
        )

    return predicate


class Receiver:
    """Collects signals on a loopback UDP port in a background thread.

    Framework-neutral on purpose (Trio and asyncio runners both use it): waiting is a blocking
    `wait_for` meant to be called through ``to_thread``. Times come from the senders' clocks,
    so the thread hop does not affect what is measured.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._cond = threading.Condition()
        self._received: list[Signal] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="bench-signals", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(512)
            except TimeoutError:
                continue
            except OSError:
                return
            signal = Signal.parse(data)
            with self._cond:
                self._received.append(signal)
                self._cond.notify_all()

    def env(self) -> dict[str, str]:
        """The environment a worker needs to send here."""
        return {PORT_ENV: str(self.port)}

    def take(self) -> list[Signal]:
        """Everything received so far, forgetting it."""
        with self._cond:
            got, self._received = self._received, []
            return got

    def wait_for(self, predicate: Callable[[Signal], bool], timeout: float) -> Signal | None:
        """Block until a signal matching ``predicate`` arrives (consuming it), or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, signal in enumerate(self._received):
                    if predicate(signal):
                        del self._received[i]
                        return signal
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def drain(self, kind: str, cap_s: float, first_kind: str | None = None) -> Drain:
        """Wait for a counted drain of ``kind`` to finish or hit ``cap_s``; how far it got.

        Raises:
            RuntimeError: nothing ran within 60 s, or no count was reported.
        """
        start = first_kind or kind
        first = self.wait_for(lambda s: s.kind == f"{start}-first", 60.0)
        if first is None:
            raise RuntimeError(f"no {start} execution within 60 s")
        last = self.wait_for(lambda s: s.kind == f"{kind}-last", cap_s)
        got = [first, *self.take(), *([last] if last else [])]
        drain = drain_of(got, kind, first_kind)
        if drain is None:
            raise RuntimeError(f"no {kind} progress within {cap_s:g} s")
        return drain

    def steps(self, t0: float, cap_s: float, n: int) -> tuple[float, int | None]:
        """Workload 3: wait until the ``n``-th ``step3`` ran or ``cap_s`` after ``t0`` passed.

        Returns:
            ``(rate, None)`` when all ``n`` finished: ``n`` / (last third step - ``t0``); else
            ``(steps_done / 3 / (now - t0), steps_done)`` from the counted steps 1 to 3.
        """
        last = self.wait_for(lambda s: s.kind == "step3-last", max(0.0, t0 + cap_s - time.time()))
        stopped = time.time()
        if last is not None:
            return n / (last.time - t0), None
        got = self.take()
        done = 0
        for k in ("step1", "step2", "step3"):
            tags = [int(s.tag) for s in got if s.kind in (f"{k}-progress", f"{k}-first")]
            done += max(tags, default=0)
        return done / 3 / (stopped - t0), done

    def close(self) -> None:
        self._closed = True
        self._thread.join(1.0)
        self._sock.close()


@attrs.frozen
class Drain:
    """How far a counted drain got: first start, and the latest count with its time."""

    first: float
    count: int
    at: float

    @property
    def rate(self) -> float:
        """Executions per second between the first start and the counted one."""
        if self.count < 2 or self.at <= self.first:
            return float("nan")
        return (self.count - 1) / (self.at - self.first)


def drain_of(received: list[Signal], kind: str, first_kind: str | None = None) -> Drain | None:
    """The `Drain` that the ``count(kind)`` signals describe (first from ``first_kind``)."""
    firsts = [s for s in received if s.kind == f"{first_kind or kind}-first"]
    marks = [s for s in received if s.kind in (f"{kind}-progress", f"{kind}-last")]
    if not firsts or not marks:
        return None
    best = max(marks, key=lambda s: int(s.tag))
    return Drain(min(s.time for s in firsts), int(best.tag), best.time)
