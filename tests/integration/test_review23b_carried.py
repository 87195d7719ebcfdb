"""Review of 101bc22: carried signals travel as sequence numbers, and the control plane
copies the events they name into the new run (`Engine._carried_signals`).

Each test fails at 101bc22 and passes once its defect is mended."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from everruns._proto.everruns import v1 as pb
from tests.integration.test_engine import plane

pytestmark = pytest.mark.db


async def test_review23b_a_sequence_number_named_twice_delivers_its_signal_twice(
    database_url: str,
) -> None:
    """`ContinueAsNewWorkflow.signals` checks each number's range, `_carried_signals` that
    each names a signal of the run (a set), and then copies one event per number *given*:
    ``[s, s]`` gives the new run two copies of one signal (and ``[b, a]`` gives them out of
    arrival order). A signal is delivered exactly once (DESIGN §3, `wait_signal`: "each
    signal is consumed by exactly one call"); a decision naming one twice (a worker's bug, a
    forged completion) should be refused, as one naming a non-signal is."""
    with trio.fail_after(60):
        async with plane(database_url) as p:
            await p.register(workflow_types=["looper"])
            await p.start("looper", None, wid="d")
            await p.channel.unary(
                p.workflows.signal_workflow,
                pb.SignalWorkflowRequest(workflow_id="d", name="x", payload=b"1"),
            )
            (task,) = await p.poll(wf=["looper"])
            (seq,) = [e.sequence_num for e in task.history if e.type == "signal_received"]
            commands = [{"type": "continue_as_new", "input": None, "signals": [seq, seq]}]
            refused: Exception | None = None
            try:
                await p.channel.unary(
                    p.workers.complete_workflow_task,
                    pb.CompleteWorkflowTaskRequest(
                        task_id=task.task_id,
                        lease_token=task.lease_token,
                        worker_id="w1",
                        seen_sequence=task.history[-1].sequence_num,
                        commands=json.dumps(commands).encode(),
                        claim_time=task.claimed_at,
                    ),
                )
            except Exception as exc:  # refused: what a mend may do
                refused = exc
            reply = await p.channel.unary(
                p.workflows.get_history, pb.GetHistoryRequest(workflow_id="d")
            )
            events: list[Any] = [
                (e.type, json.loads(e.data).get("name"))
                for e in reply.events
                if e.type == "signal_received"
            ]
    assert refused is not None or len(events) <= 1, (
        f"one signal 'x' was sent; the open run of 'd' has {events}"
    )
