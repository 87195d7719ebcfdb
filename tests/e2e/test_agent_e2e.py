"""The agent turn through real processes, with a worker killed in the middle of a tool: the turn
completes on another worker and no step whose result was recorded runs again."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import trio

from everruns.agent import send_message

from .harness import open_cluster, wait_until

pytestmark = pytest.mark.db


async def test_worker_killed_mid_turn_the_turn_completes_elsewhere(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            first = await cluster.start_worker("agent-a", modules=())
            async with cluster.client() as client:
                turn = await send_message(client, "crash", "please wait 3 seconds")
                handle = await turn.workflow()

                async def sleep_tool_running() -> bool:
                    return any(
                        e.type == "activity_scheduled" and e.data["activity_type"] == "act.sleep"
                        for e in await handle.history()
                    )

                await wait_until(sleep_tool_running, timeout=30, what="the sleep tool to start")
                await trio.sleep(0.5)  # it is now running on agent-a
                await first.kill_and_wait()  # kill -9 in the middle of the tool
                await cluster.start_worker("agent-b", modules=())
                result = await turn.result(timeout=60)
                assert result.outcome == "answered" and result.answer

                history = await handle.history()
                completed = collections.Counter(
                    e.data["activity_id"] for e in history if e.type == "activity_completed"
                )
                assert all(n == 1 for n in completed.values()), completed  # none completed twice
                started = [
                    (e.data["activity_id"], e.data["attempt"], e.data["worker_id"])
                    for e in history
                    if e.type == "activity_started"
                ]
                scheduled = {
                    e.data["activity_id"]: e.data["activity_type"]
                    for e in history
                    if e.type == "activity_scheduled"
                }
                by_type = collections.defaultdict(list)
                for activity_id, attempt, worker in started:
                    by_type[scheduled[activity_id]].append((attempt, worker))
                # Steps recorded before the crash ran once, on the first worker.
                assert by_type["process_input"] == [(1, "agent-a")]
                assert by_type["reason"][0] == (1, "agent-a")
                # The interrupted tool ran again, on the second worker, as a new attempt.
                assert by_type["act.sleep"][-1][1] == "agent-b"
                assert by_type["act.sleep"][-1][0] >= 2
