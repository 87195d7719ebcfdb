"""A stuck run's retry that fails the same way again adds nothing to its history: while the
code it needs is not deployed, each worker registration used to append one more
`workflow_task_failed` to every stuck run of its types."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns._proto.everruns import v1 as pb
from everruns.domain import payload
from everruns.errors import NonDeterminismError
from tests.integration.test_engine import plane

pytestmark = pytest.mark.db


async def v1(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity("a", 1)


async def v2(ctx: Any, input: Any) -> Any:
    return await ctx.execute_activity("b", 1)


async def test_the_same_failure_again_is_recorded_once(database_url: str) -> None:
    with trio.fail_after(60):
        async with plane(database_url) as p:
            wid = await p.start("nd")
            await p.drive(v1, "nd")
            (act,) = await p.poll(act=["a"])
            await p.complete(act, 1)

            async def fail_again(message: str) -> None:
                (task,) = await p.poll(wf=["nd"])
                with pytest.raises(NonDeterminismError):
                    await p.run_workflow_task(task, v2)
                error = {"type": "NonDeterminismError", "message": message}
                await p.fail_workflow_task(task, error, non_determinism=True)

            async def failures() -> list[str]:
                reply = await p.channel.unary(
                    p.workflows.get_history, pb.GetHistoryRequest(workflow_id=wid)
                )
                events = [payload.decode(e.data) for e in reply.events]
                return [
                    e["error"]["message"] for e in events if e["type"] == "workflow_task_failed"
                ]

            await fail_again("activity b is not a")
            for _ in range(3):  # three registrations of a worker with the same wrong code
                await p.register(workflow_types=["nd"])
                await fail_again("activity b is not a")
            assert await failures() == ["activity b is not a"]
            assert "non-determinism" in (await p.describe(wid)).stuck_reason

            # Another failure is recorded; so is the same one after a new event.
            await p.register(workflow_types=["nd"])
            await fail_again("something else")
            assert await failures() == ["activity b is not a", "something else"]
            await p.channel.unary(
                p.workflows.signal_workflow, pb.SignalWorkflowRequest(workflow_id=wid, name="x")
            )
            await fail_again("something else")
            assert await failures() == ["activity b is not a", "something else", "something else"]
