"""A run marked stuck (non-determinism) recovers once compatible code is deployed: the new
workers' registration gives it another try (session 22: before, each stuck run needed an event
such as a signal, and the test sent one), and it is no longer reported stuck: ``stuck_reason``
was never cleared, so ``describe()``, ``everruns workflow show`` and the runbook's query went on
listing it after it completed. From a review (session 18); the test failed before its fix, and
without a signal it failed before session 22's (the run stayed stuck)."""

from __future__ import annotations

import pytest
import trio

from everruns.worker import Worker
from tests.integration.test_workflow_model_edges import stuck_evolving_run

pytestmark = pytest.mark.db


async def test_a_stuck_run_that_recovers_is_no_longer_reported_stuck(database_url: str) -> None:
    """The runbook's way out of non-determinism: "Deploy code compatible with the recorded
    history"; the control plane says "a new event gives it another try". With compatible code
    back, a new signal makes the run replay cleanly and complete. But ``stuck_reason`` is set
    by ``set_run_stuck`` and cleared by nothing: the completed run still reports
    "stuck: non-determinism ..." in ``describe()`` / ``everruns workflow show`` and in the
    runbook's ``WHERE stuck_reason IS NOT NULL`` query, sending operators after a run that is
    fine (or finished long ago)."""
    with trio.fail_after(40):
        async with stuck_evolving_run(database_url) as (info, handle, bad, old_registry):
            bad.shutdown()
            # Compatible code is deployed again: its worker's registration gives the run
            # another try (session 22; a new event, such as a signal, was needed before).
            fixed = Worker(old_registry, address=info.address, grace_period=0.5)
            async with trio.open_nursery() as inner:
                await inner.start(fixed.run)
                assert await handle.result(timeout=10) == 1
                described = await handle.describe()
                fixed.shutdown()
    assert described.status == "completed", described
    assert described.stuck_reason is None, (
        f"the run recovered and completed, yet describe() still reports it stuck: "
        f"{described.stuck_reason!r} (stuck_reason is never cleared once set)"
    )
