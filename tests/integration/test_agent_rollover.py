"""A long session is served by a chain of runs: after `TURNS_PER_RUN` turns a run continues as
new, handing on the numbering, the conversation and the messages waiting, so no run's history
grows without bound. Messages sent while a run rolls over all get their turn, once, in
order."""

from __future__ import annotations

import pytest
import trio

from everruns.agent import register, send_message
from everruns.agent import workflow as agent_workflow
from everruns.domain.registry import Registry
from tests.integration.agent_harness import serve_agent

pytestmark = pytest.mark.db

REGISTRY = register(Registry())


async def test_a_session_rolls_over_to_a_new_run_keeping_numbers_and_context(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_workflow, "TURNS_PER_RUN", 2)
    with trio.fail_after(90):
        async with serve_agent(database_url, REGISTRY) as client:
            answers = []
            for text in (
                "what is 10 / 4",
                "what is 6 * 7",
                "what is 3 + 4",
                "hello",
                "what is 1 + 1",
            ):
                handle = await send_message(client, "long", text)
                answers.append((handle.turn, (await handle.result()).outcome))
            session = client.get_handle("session:long")
            listed, _ = await client.list_workflows("agent_session", limit=100)
            runs = [w for w in listed if w.workflow_id == "session:long"]
            latest = await session.describe()
            first_run = await client.get_handle("session:long", runs[-1].run_id).describe()
    assert answers == [(n, "answered") for n in range(1, 6)]
    # two runs of two turns each, then the open one (turn 5)
    assert [r.status for r in runs] == ["running", "continued_as_new", "continued_as_new"]
    assert first_run.continued_run_id == runs[1].run_id
    assert latest.is_open and latest.input["first_turn"] == 5
    assert {"role": "user", "content": "what is 10 / 4"} in latest.input["context"][0]


async def test_messages_sent_together_across_a_rollover_each_get_one_turn(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_workflow, "TURNS_PER_RUN", 1)
    with trio.fail_after(90):
        async with serve_agent(database_url, REGISTRY) as client:
            handles = []

            async def send(text: str) -> None:
                handles.append(await send_message(client, "busy", text))

            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(send, f"what is {n} + 1")
            results = [(h.turn, await h.result()) for h in handles]
    assert sorted(turn for turn, _ in results) == [1, 2, 3, 4, 5]
    assert all(r.outcome == "answered" for _, r in results)
