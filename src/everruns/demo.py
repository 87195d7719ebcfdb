"""`scripts/demo`: the whole system on one machine with only Python, narrated step by step.

It starts the embedded PostgreSQL (or uses DATABASE_URL's server), then the control plane and two
workers as real processes; sends three messages to the agent — one that needs a tool, one plain,
one that is cancelled in the middle of a slow tool — and shows each turn's progress live; prints
what the operator guide's runbook SQL returns; and stops everything it started, also on Ctrl-C.
It only drives the public pieces (processes, `everruns.Client`, SQL); it holds no engine logic.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio

from everruns._aio import open_aio_loop, pg
from everruns._program import run_program
from everruns.agent import OpenAIProvider, close_session
from everruns.agent.providers import OPENAI_PROVIDER, default_provider_name
from everruns.client import Client
from everruns.errors import ConfigError, EverrunsError, WorkflowFailed
from everruns.store import embedded

DEMO_DATABASE = "everruns_demo"
RUNBOOK = [
    (
        "workflows still pending or running",
        "SELECT id, workflow_type, status, created_at FROM durable_workflow_instances "
        "WHERE status IN ('pending', 'running') ORDER BY created_at DESC",
    ),
    (
        "tasks waiting in the queue",
        "SELECT id, workflow_id, activity_type, status, attempt FROM durable_task_queue "
        "WHERE status = 'pending' ORDER BY created_at",
    ),
    (
        "dead letters",
        "SELECT id, workflow_id, activity_type, last_error, dead_at "
        "FROM durable_dead_letter_queue ORDER BY dead_at DESC",
    ),
    (
        "active workers",
        "SELECT id, status, current_load, last_heartbeat_at FROM durable_workers "
        "WHERE status = 'active'",
    ),
]


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@asynccontextmanager
async def _postgres() -> AsyncIterator[str]:
    """The server URL to create the demo database on: DATABASE_URL's, or the embedded one."""
    url = os.environ.get("DATABASE_URL")
    if url:
        say(f"using the PostgreSQL server of DATABASE_URL ({embedded.mask_url(url)})")
        yield url
        return
    data_dir = embedded.default_data_dir()
    say(f"starting the embedded PostgreSQL in {data_dir} (first run: initialising it)")
    handle = await trio.to_thread.run_sync(embedded.start, data_dir)
    say(f"PostgreSQL ready on port {handle.port}" + ("" if handle.started_by_us else " (reused)"))
    try:
        yield handle.url
    finally:
        if handle.started_by_us:
            with trio.move_on_after(30, shield=True):
                await trio.to_thread.run_sync(embedded.stop, handle)
                say("embedded PostgreSQL stopped")


@attrs.define
class Process:
    name: str
    process: trio.Process
    lines: list[str] = attrs.Factory(list)


async def _start(
    nursery: trio.Nursery, name: str, args: Sequence[str], env: dict[str, str], ready: str
) -> Process:
    process = await trio.lowlevel.open_process(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches the demo, which stops its children in order
    )
    proc = Process(name, process)
    seen = trio.Event()

    async def pump() -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                proc.lines.append(line)
                if ready in line:
                    seen.set()
        seen.set()

    nursery.start_soon(pump)
    with trio.fail_after(60):
        await seen.wait()
    if process.returncode is not None or not any(ready in line for line in proc.lines):
        tail = "\n".join(proc.lines[-15:])
        raise EverrunsError(f"{name} did not start:\n{tail}")
    return proc


async def _stop(proc: Process) -> None:
    with trio.move_on_after(40, shield=True):
        if proc.process.returncode is None:
            proc.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(35):
                await proc.process.wait()
        if proc.process.returncode is None:
            proc.process.kill()
            await proc.process.wait()
    say(f"{proc.name} stopped (exit code {proc.process.returncode})")


class Board:
    """The live progress display: one line per turn, with the step it is on."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.rows = {label: "waiting" for label in labels}
        self.tty = sys.stdout.isatty()
        self.drawn = False

    def update(self, label: str, text: str) -> None:
        self.rows[label] = text
        if not self.tty:
            print(f"  {label:<9} {text}", flush=True)
            return
        if self.drawn:
            sys.stdout.write(f"\x1b[{len(self.rows)}F")
        for name, row in self.rows.items():
            sys.stdout.write(f"\x1b[2K  {name:<9} {row[:110]}\n")
        sys.stdout.flush()
        self.drawn = True


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _step_text(event: Any) -> str:
    data = dict(event.data)
    step = f"step {event.step}: " if event.step else ""
    if event.kind in ("reason.retrying", "tool.retrying"):
        what = "the model call" if event.kind == "reason.retrying" else f"tool {data.get('tool')}"
        attempt = data.get("attempt")
        return (
            f"{step}{what} failed (attempt {attempt}), retrying: "
            f"{_first_line(str(data.get('error') or ''))}"
        )
    if event.kind == "turn.failed":
        return f"failed: {_first_line(str(data.get('message') or ''))}"
    if event.kind == "tool.called":
        return f"{step}calling tool {data.get('tool')} {data.get('arguments')}"
    if event.kind == "tool.result":
        result = data.get("error") or data.get("result")
        return f"{step}tool {data.get('tool')} returned {result}"
    if event.kind == "reason.started":
        return f"{step}asking the model"
    if event.kind == "reason.completed":
        calls = [c.get("name") for c in data.get("tool_calls") or []]
        return f"{step}model wants {', '.join(calls)}" if calls else f"{step}model answered"
    if event.kind in ("turn.completed", "turn.failed", "turn.cancelled"):
        return f"{event.kind.split('.')[1]}"
    return f"{step}{event.kind}"


async def _follow(
    client: Client,
    board: Board,
    label: str,
    session: str,
    text: str,
    answers: dict[str, str],
    cancel_on_tool: str | None,
) -> None:
    turn = await client.send_message(session, text)
    board.update(label, f"message sent: {text!r}")
    async for event in turn.stream():
        board.update(label, _step_text(event))
        if (
            cancel_on_tool
            and event.kind == "tool.called"
            and event.data.get("tool") == cancel_on_tool
        ):
            await turn.cancel("the demo cancels this turn mid-tool")
            board.update(label, f"cancel requested while {cancel_on_tool} runs")
    try:
        result = await turn.result()
    except WorkflowFailed as exc:
        # The status alone ("turn failed") leaves the operator guessing: say why.
        answers[label] = f"turn {exc.status}" + (
            f": {_first_line(str(exc))}" if exc.status == "failed" else ""
        )
    else:
        answers[label] = result.answer or result.outcome


def provider_note(env: Mapping[str, str]) -> str:
    """Return the line saying which LLM the demo's workers will use, given their environment."""
    if default_provider_name(env) != OPENAI_PROVIDER:
        return (
            "the agent uses the scripted stand-in for an LLM (no network); set OPENAI_API_KEY "
            "to use an OpenAI-compatible API"
        )
    try:
        provider = OpenAIProvider.from_env(env)
    except ConfigError as exc:
        return f"the agent uses the OpenAI provider, but every turn will fail: {exc}"
    host = urlsplit(provider.base_url).hostname
    return (
        f"the agent uses the OpenAI provider (OPENAI_API_KEY is set): model {provider.model} "
        f"at {host}; unset OPENAI_API_KEY to use the scripted stand-in"
    )


def _table(rows: Sequence[Any]) -> str:
    if not rows:
        return "    (no rows)"
    columns = list(rows[0].keys())
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["    " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["    " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


async def run_demo() -> None:
    started = time.monotonic()
    async with open_aio_loop(), _postgres() as server_url:
        async with pg.connect(server_url) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
        url = _with_database(server_url, DEMO_DATABASE)
        address = f"127.0.0.1:{_free_port()}"
        base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WORKER_ID")}
        base["GRPC_ADDRESS"] = address
        processes: list[Process] = []
        async with trio.open_nursery() as nursery:
            try:
                say(f"starting the control plane (python -m everruns.server) on {address}")
                server = await _start(
                    nursery,
                    "control plane",
                    ["-m", "everruns.server"],
                    {**base, "DATABASE_URL": url},
                    "listening on",
                )
                processes.append(server)
                say("control plane ready: migrations applied, gRPC serving")
                for n in (1, 2):
                    say(f"starting worker demo-worker-{n} (python -m everruns.worker)")
                    processes.append(
                        await _start(
                            nursery,
                            f"worker demo-worker-{n}",
                            ["-m", "everruns.worker"],
                            {**base, "WORKER_ID": f"demo-worker-{n}"},
                            "registered",
                        )
                    )
                say(provider_note(base))
                say("sending three messages to the agent; each is answered by its own durable turn")
                messages = [
                    ("math", "demo-math", "what is (17 + 25) * 2?", None),
                    ("greeting", "demo-hello", "hello, who are you?", None),
                    ("cancelled", "demo-slow", "please wait 20 seconds", "sleep"),
                ]
                board = Board([label for label, *_ in messages])
                answers: dict[str, str] = {}
                async with Client.connect(address) as client:
                    async with trio.open_nursery() as turns:
                        for label, session, text, cancel_on in messages:
                            turns.start_soon(
                                _follow,
                                client,
                                board,
                                label,
                                session,
                                text,
                                answers,
                                cancel_on,
                            )
                    say("closing the three sessions (each ends once its messages are answered)")
                    for _, session, _, _ in messages:
                        await close_session(client, session)
                        await client.get_handle(f"session:{session}").result(timeout=30)
                say("answers:")
                for label, *_ in messages:
                    print(f"  {label:<9} {answers.get(label, '(none)')}", flush=True)
                say("what the operator guide's runbook SQL shows now:")
                async with pg.connect(url) as conn:
                    for title, query in RUNBOOK:
                        print(f"  -- {title}", flush=True)
                        print(_table(await conn.fetch(query)), flush=True)
            finally:
                say("stopping the workers and the control plane")
                for proc in reversed(processes):
                    await _stop(proc)
                nursery.cancel_scope.cancel()
    say(f"done in {time.monotonic() - started:.1f} s")


async def _main() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    say("interrupted: stopping everything")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signal)
            await run_demo()
            nursery.cancel_scope.cancel()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    Path.home()  # fail early and clearly if HOME is unusable
    return run_program("demo", _main)


if __name__ == "__main__":
    sys.exit(main())
