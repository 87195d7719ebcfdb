"""Review of 394bb3a/6c9379e (ctx.continue_as_new), pure: what a continuing run carries.

Each test fails on 6c9379e and passes once its defect is mended."""

from __future__ import annotations

from typing import Any

from everruns.domain.commands import ContinueAsNewWorkflow
from tests.unit.test_replay import Sim


def test_a_signal_given_to_a_gather_branch_after_the_run_continued_is_carried() -> None:
    """`_take_commands` carries the signals "no wait_signal took", also those of the batch
    delivered after the code ended. But a signal arriving after the code ended is handed to
    the future of a `wait_signal` still blocked in a gather branch (`_deliver_signal`: a
    waiter takes it before the buffer does): a branch that will never run again, of a run
    that has ended. The signal is neither in the buffer nor seen by any code: the new run
    never gets it, and the sender was told it was delivered."""

    async def listener(ctx: Any, _: Any) -> Any:
        async def listen() -> Any:
            return await ctx.wait_signal("x")

        async def decide() -> None:
            await ctx.execute_activity("tick", 1)
            ctx.continue_as_new({"round": 2})

        await ctx.gather(listen(), decide())

    sim = Sim(listener, None)
    sim.step()  # schedules the activity; the listen branch waits for "x"
    # One batch: the activity's result (the code continues as new at once), then "x".
    sim.release_all()
    sim.signal("x", "hello")
    (command,) = sim.step()
    assert isinstance(command, ContinueAsNewWorkflow)
    carried = [sim.events[seq - 1] for seq in command.signals]
    assert [(e["name"], e["payload"]) for e in carried] == [("x", "hello")], (
        "a signal that arrived in the batch after the code continued as new was given to a "
        "dead gather branch's wait and is lost to the new run"
    )
