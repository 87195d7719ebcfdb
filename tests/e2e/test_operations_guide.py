"""docs/operations.md cannot go stale: its two service commands are started as this test's
control plane and worker, every `bash` block line must succeed against them, and every `sql`
block must run against their database."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import trio

from everruns._aio import pg
from everruns.agent import send_message
from everruns.client import Client
from everruns.domain.retry import RetryPolicy
from everruns.errors import WorkflowFailed

from .harness import free_port

pytestmark = pytest.mark.db

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(kind: str, tag: str = "") -> list[str]:
    found = []
    for match in _BLOCK.finditer(GUIDE.read_text()):
        if match.group(1) == kind and match.group(2).strip() == tag:
            found.append(match.group(3))
    return found


def test_the_guide_has_what_the_test_runs() -> None:
    services = blocks("bash", "service")
    assert [s.strip() for s in services] == [
        "python -m everruns.server",
        "python -m everruns.worker",
    ]
    assert len(blocks("bash")) >= 5 and len(blocks("sql")) >= 8


async def _wait_for_line(
    nursery: trio.Nursery, process: trio.Process, needle: str, seen: list[str]
) -> None:
    """Read the process's output until ``needle``, then keep draining it in the background
    (a full pipe would block the process)."""
    assert process.stdout is not None
    stdout = process.stdout
    buffer = b""
    while not any(needle in line for line in seen):
        chunk = await stdout.receive_some(4096)
        assert chunk, "\n".join(seen)
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        seen.extend(line.decode(errors="replace") for line in lines)

    async def drain() -> None:
        async for chunk in stdout:
            seen.append(chunk.decode(errors="replace"))

    nursery.start_soon(drain)


async def test_every_command_and_query_of_the_guide(database_url: str, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WORKER_ID")}
    env.update(GRPC_ADDRESS=address, PATH=f"{bin_dir}:{env.get('PATH', '')}")
    server_cmd, worker_cmd = (shlex.split(b.strip()) for b in blocks("bash", "service"))
    server_cmd[0] = worker_cmd[0] = sys.executable  # `python` is the venv's interpreter
    processes: list[trio.Process] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            try:
                server = await trio.lowlevel.open_process(
                    server_cmd, env={**env, "DATABASE_URL": database_url}, stdout=-1, stderr=-2
                )
                processes.append(server)
                server_lines: list[str] = []
                await _wait_for_line(nursery, server, "listening on", server_lines)
                assert (
                    server_lines[0] == "Using Durable execution engine runner (PostgreSQL-backed)"
                )
                worker = await trio.lowlevel.open_process(worker_cmd, env=env, stdout=-1, stderr=-2)
                processes.append(worker)
                await _wait_for_line(nursery, worker, "registered", [])

                # Something for the commands to look at: an answered turn and a dead letter.
                async with Client.connect(address) as client:
                    turn = await send_message(client, "guide", "what is 2 + 2?")
                    await turn.result(timeout=30)
                    failing = await send_message(
                        client,
                        "guide-dlq",
                        "hello",
                        provider="openai",
                        llm_retry=RetryPolicy(max_attempts=1),
                    )
                    with pytest.raises(WorkflowFailed):
                        await failing.result(timeout=30)
                    (letter,), _ = await client.list_dead_letters()
                env.update(WORKFLOW_ID=turn.workflow_id, DLQ_ID=letter.id)

                for block in blocks("bash"):
                    for line in block.strip().splitlines():
                        done = await trio.run_process(
                            ["bash", "-c", line],
                            env=env,
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                        )
                        output = (done.stdout + done.stderr).decode()
                        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{output}"

                async with pg.connect(database_url) as conn:
                    for query in blocks("sql"):
                        await conn.fetch(query.replace("<dlq_id>", letter.id))
                    # The upgrade's index builds, one statement at a time, on indexes dropped
                    # first: each is built again, and valid.
                    (upgrade,) = blocks("sql", "upgrade")
                    names = re.findall(r"IF NOT EXISTS (\w+)", upgrade)
                    assert len(names) == 4
                    for name in names:
                        await conn.execute(f"DROP INDEX {name}")
                    for statement in upgrade.split(";"):
                        if statement.strip():
                            await conn.execute(statement)
                    valid = await conn.fetch(
                        "SELECT indexrelid::regclass::text AS name FROM pg_index "
                        "WHERE indisvalid AND indexrelid::regclass::text = ANY($1::text[])",
                        names,
                    )
                    assert sorted(r["name"] for r in valid) == sorted(names)
            finally:
                for process in reversed(processes):
                    with trio.move_on_after(15, shield=True):
                        process.terminate()
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
