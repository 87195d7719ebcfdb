"""Odd activity results on the real worker (scripted fake control plane), and agent sessions on
the real control plane and worker (fresh database): each docstring says what went wrong
before."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import everruns.client
from everruns.agent import register, send_message, tool
from everruns.domain import history as h
from everruns.domain.registry import Registry, activity
from everruns.errors import InvalidArgument, ServerUnavailable, WorkflowFailed
from everruns.worker import ActivityContext, Worker
from tests.integration.agent_harness import serve_agent
from tests.integration.test_worker import (
    FakeControlPlane,
    activity_task,
    fake_control_plane,
    make_worker,
    running,
)

# --------------------------------------------- 1. an activity result payload.encode rejects oddly


@pytest.mark.parametrize("kind", ["lone_surrogate", "circular"])
async def test_an_unencodable_activity_result_fails_the_attempt_at_once(kind: str) -> None:
    """runtime.py:_call_activity catches only PayloadError around payload.encode(result). A
    result with a lone surrogate (UnicodeEncodeError) or a cycle (RecursionError) escapes to
    _run_task's "internal error"; _run_activity's finally then reports the attempt as
    "everruns.WorkerShutdown: worker ... stopped before the activity finished; released to
    another worker" (release=True, retryable), although the worker is not stopping. The task is
    run again at once (no backoff) until max_attempts, then dead-lettered with that false
    reason; the real one is only in the worker's log. A set in the result (test_worker) is
    failed at once, non-retryably, with a PayloadError."""
    reg = Registry()
    runs: list[int] = []

    @activity(registry=reg)
    async def odd(ctx: ActivityContext, _: Any) -> Any:
        runs.append(ctx.attempt)
        if kind == "lone_surrogate":
            return {"name": "caf\udce9"}  # e.g. os.fsdecode of a latin-1 file name
        loop: list[Any] = []
        loop.append(loop)
        return loop

    fake = FakeControlPlane()
    with trio.fail_after(15):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            task = activity_task("odd")
            fake.push(task)
            await fake.wait_for(lambda: len(runs) == 1)
            with trio.move_on_after(5):
                await fake.wait_for(lambda: bool(fake.failures_of(task.task_id)))
    assert fake.failures_of(task.task_id), (
        f"the {kind} result of attempt 1 was never reported (failed or completed) within 5 s; "
        f"completed={fake.completed!r}"
    )
    (failure,) = fake.failures_of(task.task_id)
    error = failure.error.decode()
    assert not failure.release, f"released as if the worker stopped: {error}"
    assert failure.non_retryable and "PayloadError" in error, error


async def test_an_internal_error_of_the_worker_is_not_reported_as_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure of the worker's own code after an activity ran (a bug) releases the task to
    another worker, as a stop does, but says so: not 'worker stopped' from a running worker."""
    reg = Registry()

    @activity(registry=reg)
    async def fine(ctx: ActivityContext, _: Any) -> int:
        return 1

    async def broken(self: Worker, *args: Any) -> Any:
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(Worker, "_call_activity", broken)
    fake = FakeControlPlane()
    with trio.fail_after(15):
        async with fake_control_plane(fake) as port, running(make_worker(reg, port)):
            task = activity_task("fine")
            fake.push(task)
            await fake.wait_for(lambda: bool(fake.failures_of(task.task_id)))
    (failure,) = fake.failures_of(task.task_id)
    error = failure.error.decode()
    assert failure.release and not failure.non_retryable, error
    assert "everruns.WorkerError" in error and "stopped" not in error, error


# ------------------------------------------------------------------------- agent system

REGISTRY = register(Registry())
BULKY_CHARS = 70_000


@tool(
    name="bulky_document",
    description="Returns a large document.",
    offered_by_default=False,
    registry=REGISTRY,
)
async def bulky_document(ctx: ActivityContext, arguments: Any) -> str:
    return "x" * BULKY_CHARS


@pytest.mark.db
async def test_a_session_whose_conversation_outgrows_the_payload_limit_stays_usable(
    database_url: str,
) -> None:
    """The session carries the messages of its last 10 turns into every turn's input
    (workflow.py agent_session); a turn's result holds a tool result three times over (tool
    result, tool content, the scripted answer). Once that passes EVERRUNS_MAX_PAYLOAD_BYTES,
    the turn fails as too large, and the session goes on: a failed turn adds nothing to the
    conversation. Before session 17 the turn's result was not size-checked: the turn was
    answered, its conversation then too large for every later turn's input (refused as an
    activity result), and every later message failed the same way, even a trivial one. Here
    the limit is 200 kB (the default 2 MB behaves the same with a 700 kB tool result)."""
    with trio.fail_after(90):
        async with serve_agent(database_url, REGISTRY, max_payload_bytes=200_000) as client:
            first = await send_message(
                client, "rc1", "please run bulky_document", tools=["bulky_document"]
            )
            with pytest.raises(WorkflowFailed) as first_failed:
                await first.result()
            second = await send_message(client, "rc1", "what is 1 + 1")
            second_result = await second.result()
            third = await send_message(client, "rc1", "what is 2 + 2")
            try:
                third_result = await third.result()
            except WorkflowFailed as exc:
                pytest.fail(f"the session is bricked: turn {third.turn} failed too: {exc}"[:600])
    assert "too large" in str(first_failed.value)
    assert second_result.outcome == "answered"
    assert third_result.answer is not None and "2 + 2 = 4" in third_result.answer


@pytest.mark.db
async def test_send_message_retried_after_a_lost_reply_is_answered_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_message documents ServerUnavailable as "the message may not have been delivered",
    so a caller retries; but the signal has no idempotency key (client.py signal, retry=False;
    session.py _message draws a fresh message_id per call and send_message takes none), so
    when only the reply was lost the retry is a second message: the session runs two turns
    (two LLM calls, two sets of tool side effects) for one user message."""
    real_signal = everruns.client.WorkflowHandle.signal
    lost = [False]

    async def signal_then_lose_the_reply(self: Any, name: str, payload: Any = None) -> None:
        await real_signal(self, name, payload)
        if not lost[0]:
            lost[0] = True
            raise ServerUnavailable("connection reset while reading the reply")

    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY) as client:
            monkeypatch.setattr(
                everruns.client.WorkflowHandle, "signal", signal_then_lose_the_reply
            )
            try:
                await send_message(client, "rc2", "what is 3 * 3", message_id="m-1")
            except ServerUnavailable:
                # the retry, with the same idempotency key
                handle = await send_message(client, "rc2", "what is 3 * 3", message_id="m-1")
            monkeypatch.setattr(everruns.client.WorkflowHandle, "signal", real_signal)
            await handle.result()
            await trio.sleep(0.5)
            history = await client.get_handle("session:rc2").history()
    messages = [
        e.data["payload"]["text"]
        for e in history
        if e.type == h.SIGNAL_RECEIVED and isinstance(e.data.get("payload"), dict)
    ]
    assert messages == ["what is 3 * 3"], f"one user message became {len(messages)}: {messages}"


@pytest.mark.db
async def test_a_message_id_sent_again_with_another_text_is_refused(database_url: str) -> None:
    """An idempotency key names one message: sent again with another text, it used to return
    the earlier message's turn, and the new text was never delivered, without a word."""
    with trio.fail_after(60):
        async with serve_agent(database_url, REGISTRY) as client:
            first = await send_message(client, "rc3", "what is 1 + 1", message_id="m-7")
            again = await send_message(client, "rc3", "what is 1 + 1", message_id="m-7")
            assert again.turn == first.turn
            with pytest.raises(InvalidArgument, match="another text"):
                await send_message(client, "rc3", "what is 2 + 2", message_id="m-7")
            await first.result()
