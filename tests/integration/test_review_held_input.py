"""Review of 1d75e63 (input held past a decision): cases that fail on that commit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from everruns._proto.everruns import v1 as pb
from everruns.domain.context import WorkflowInfo
from everruns.domain.history import HistoryEvent
from everruns.domain.replay import replay
from tests.integration.test_engine import history_events, plane

pytestmark = pytest.mark.db


async def _events(p: Any, wid: str) -> list[HistoryEvent]:
    reply = await p.channel.unary(p.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid))
    return history_events(reply.events)


async def work_then_wait(ctx: Any, input: Any) -> Any:
    done = await ctx.execute_activity("work", 1)
    return [done, await ctx.wait_signal("go")]


@pytest.mark.parametrize("seen", [0, 9])
async def test_a_seen_sequence_outside_the_history_never_writes_an_unreplayable_marker(
    database_url: str, seen: int
) -> None:
    """A completion whose seen_sequence lies outside the history (0: the proto default of a
    field left unset; past the end) used to be applied as made on the whole history. Now the
    control plane "holds" events past it and records that seen_sequence in the marker, which
    every later replay refuses as malformed: the run can never be replayed again."""
    with trio.fail_after(30):
        async with plane(database_url) as p:
            task = await p.first_workflow_task("wf", "work")
            request = p.decide(task, work_then_wait)
            request.seen_sequence = seen
            try:
                reply = await p.channel.unary(p.workers.complete_workflow_task, request)
            except Exception:
                return  # refused: fine
            if not reply.accepted:
                return
            events = await _events(p, "w")
            # Whatever was recorded must replay.
            replay(
                work_then_wait,
                events,
                info=WorkflowInfo(task.workflow_id, task.run_id, task.workflow_type),
                now=datetime.now(UTC),
            )
