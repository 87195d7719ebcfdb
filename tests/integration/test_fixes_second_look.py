"""Second look at the session-16 fixes: the due-scanner under a steady flow of tasks, a turn too
large by itself, a retried cancel, inputs nested too deeply."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns.server import duties
from tests.integration.test_engine import plane

pytestmark = pytest.mark.db


async def test_task_announcements_do_not_make_the_due_scanner_scan_once_each(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notifier._dispatch now calls deadline_added(1.05 s) for every task NOTIFY. When the
    scanner sleeps longer than that (nothing waits: workers claim tasks as they come, so
    next_straggler_s is None and it sleeps until a timeout or the reclaim interval),
    deadline_added does not shorten the sleep to 1.05 s: it pokes the scanner, which scans at
    once. A steady flow of tasks claimed promptly (here 20 announcements a second, the queue
    empty) so costs a full scan (timers, timeouts, requeues, breakers, keys: ~8 statements) per
    task, what deadline_added's own docstring says must not happen. The straggler look the
    fix wants needs about one scan a second."""
    scans = 0
    original = duties._scan_once

    async def counting(engine: Any, since: Any) -> Any:
        nonlocal scans
        scans += 1
        return await original(engine, since)

    monkeypatch.setattr(duties, "_scan_once", counting)
    with trio.fail_after(30):
        async with plane(database_url):
            await trio.sleep(1.5)  # the scanner settles into its long sleep
            before = scans
            t0 = trio.current_time()
            for _ in range(60):  # 3 s of 20 tasks/s, each claimed at once (none left waiting)
                await pool.execute("SELECT pg_notify('everruns_tasks', 'activity:work')")
                await trio.sleep(0.05)
            per_second = (scans - before) / (trio.current_time() - t0)
            assert per_second <= 3, (
                f"the due-scanner scanned {per_second:.1f} times a second under 20 task "
                "announcements a second with nothing waiting (one scan per NOTIFY)"
            )


# ------------------------------------------------------------------ agent: context budget

from everruns.agent import register, send_message, tool  # noqa: E402
from everruns.agent.workflow import turn_workflow_id  # noqa: E402
from everruns.domain.registry import Registry  # noqa: E402
from everruns.errors import WorkflowFailed  # noqa: E402
from everruns.worker import ActivityContext  # noqa: E402
from tests.integration.agent_harness import serve_agent  # noqa: E402

AGENT = register(Registry())


@tool(
    name="review_d_blob",
    description="Returns a large document.",
    offered_by_default=False,
    registry=AGENT,
)
async def review_d_blob(ctx: ActivityContext, arguments: Any) -> str:
    return "x" * 199_960


async def _context_of(client: Any, session_id: str, turn: int) -> list[Any]:
    events = await client.get_handle(turn_workflow_id(session_id, turn)).history()
    return list(events[0].data["input"]["context"])


async def test_a_turn_too_large_by_itself_does_not_wipe_the_session_memory(
    database_url: str,
) -> None:
    """agent_session (workflow.py:279-281) sets ``budget = _size(turns) // 2`` after any turn
    that failed with ResourceExhausted, whatever made it too large. A turn whose own tool
    result is too large fails so while the context is a few hundred characters: the budget
    falls to half of that for the rest of the run, and every later turn (each as small as the
    first) is sent with no context at all: the session forgets the conversation for good,
    though the context never came near any limit."""
    with trio.fail_after(90):
        async with serve_agent(database_url, AGENT, max_payload_bytes=200_000) as client:
            first = await send_message(client, "rd1", "my name is Ada")
            await first.result()
            big = await send_message(
                client, "rd1", "please run review_d_blob", tools=["review_d_blob"]
            )
            with pytest.raises(WorkflowFailed) as refused:
                await big.result()
            assert "too large" in str(refused.value) or "ResourceExhausted" in str(refused.value)
            third = await send_message(client, "rd1", "what is my name")
            await third.result()
            fourth = await send_message(client, "rd1", "and again: what is my name")
            await fourth.result()
            third_context = await _context_of(client, "rd1", third.turn)
            fourth_context = await _context_of(client, "rd1", fourth.turn)
    texts = [m.get("content") for m in fourth_context if isinstance(m, dict)]
    assert third_context and fourth_context, (
        f"after one oversized turn the session sends no context at all: turn {third.turn} "
        f"got {len(third_context)} messages, turn {fourth.turn} got {len(fourth_context)} "
        f"({texts})"
    )


# ------------------------------------------------------------------ cancel retried on UNAVAILABLE

import contextlib  # noqa: E402

from everruns.client import Client  # noqa: E402
from everruns.errors import DatabaseUnavailable, ServerUnavailable  # noqa: E402
from everruns.server.engine import Engine  # noqa: E402


async def test_a_retried_cancel_does_not_cancel_another_run_of_the_workflow_id(
    database_url: str, pool: pg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WorkflowHandle.cancel is now retried on UNAVAILABLE (client.py:603, retry=True), but a
    handle from get_handle(workflow_id) sends run_id "" and the control plane cancels whatever
    run is the workflow id's latest when the retry lands. When the first attempt committed and
    only its reply was lost (the connection dropped at COMMIT: DatabaseUnavailable, UNAVAILABLE), a
    run started meanwhile under the same id, which the fix frees at once for a run no worker
    picked up, is cancelled by the retry: a cancel the user never asked for. (start_workflow
    retries only with an idempotency key; cancel has none and is not pinned to a run.)"""
    real_cancel = Engine.cancel
    attempts: list[str] = []

    async def cancel_then_lose_the_reply(self: Engine, wid: str, run_id: str, reason: str) -> None:
        attempts.append(run_id)
        await real_cancel(self, wid, run_id, reason)
        if len(attempts) == 1:
            await p.start("nobody", wid="k")  # someone starts the freed id again meanwhile
            raise DatabaseUnavailable("PostgreSQL connection lost: at COMMIT")

    monkeypatch.setattr(Engine, "cancel", cancel_then_lose_the_reply)
    with trio.fail_after(30):
        async with plane(database_url) as p:
            await p.start("nobody", wid="k")
            async with Client.connect(f"127.0.0.1:{p.port}") as client:
                with contextlib.suppress(ServerUnavailable):  # not retried: acceptable
                    await client.get_handle("k").cancel("stop the first one")
            rows = await pool.fetch(
                "SELECT status, cancel_requested_at IS NOT NULL AS asked"
                " FROM durable_workflow_instances WHERE workflow_id = 'k' ORDER BY created_at"
            )
    later = [(r["status"], r["asked"]) for r in rows[1:]]
    assert all(status != "cancelled" and not asked for status, asked in later), (
        f"the retried cancel cancelled the run started after its first attempt committed: "
        f"{[(r['status'], r['asked']) for r in rows]} (attempts: {len(attempts)})"
    )


# ------------------------------------------------------------------ payloads nested too deeply

from everruns._proto.everruns import v1 as pb  # noqa: E402
from everruns.errors import InvalidArgument  # noqa: E402


async def test_a_start_with_input_nested_too_deeply_is_refused_as_invalid(
    database_url: str,
) -> None:
    """The commit makes a value nested past the recursion limit a PayloadError "everywhere",
    but only on the encoding side (payload._text). payload.json_error, which the control
    plane's check_payload (engine.py:204) runs on every client payload, and payload.decode,
    which the worker and client run on every payload they read, still let RecursionError
    escape: 60 kB of '[' (far under the payload limit) sent by any client (another language,
    a raw gRPC call) is an INTERNAL error of the control plane instead of INVALID_ARGUMENT
    naming the input; once in a history, it would escape replay as before."""
    deep = ("[" * 30_000 + "]" * 30_000).encode()
    with trio.fail_after(20):
        async with plane(database_url) as p:
            with pytest.raises(Exception) as refused:
                await p.channel.unary(
                    p.workflows.start_workflow,
                    pb.StartWorkflowRequest(workflow_type="step", input=deep, workflow_id="deep"),
                )
    assert isinstance(refused.value, InvalidArgument) or "INVALID_ARGUMENT" in repr(
        refused.value
    ), (
        f"a deeply nested input is refused as {type(refused.value).__name__}: "
        f"{str(refused.value)[:200]}"
    )
