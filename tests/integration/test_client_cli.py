"""`everruns.Client` and the `everruns` command against a real control plane (in-process, on a
fresh database). Where a run has to end, a scripted stand-in for a worker completes its
workflow task over WorkerService, so these tests need no worker code."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from everruns import cli
from everruns._aio.grpc import open_channel
from everruns._proto.everruns import v1 as pb
from everruns.client import Client, parse_address
from everruns.domain.commands import CompleteWorkflow, FailWorkflow
from everruns.errors import (
    FailedPrecondition,
    NotFound,
    PayloadError,
    ServerUnavailable,
    WorkflowFailed,
)
from everruns.server import ServerConfig, serve

pytestmark = pytest.mark.db

SCRIPTED = "scripted"  # the workflow type the stand-in worker serves


@pytest.fixture
async def address(database_url: str) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
        yield info.address
        nursery.cancel_scope.cancel()


@pytest.fixture
async def client(address: str) -> AsyncIterator[Client]:
    async with Client.connect(address) as c:
        yield c


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `everruns ARGV` in a thread (it runs its own Trio loop); return (code, out, err)."""
    capsys.readouterr()
    code = await trio.to_thread.run_sync(cli.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def end_next_run(address: str, command: dict[str, Any]) -> str:
    """Act as a worker serving SCRIPTED: claim one workflow task and answer it with ``command``.

    Returns the workflow id of the run it ended.
    """
    host, port = parse_address(address)
    worker_id = f"scripted-{os.getpid()}"
    async with open_channel(host, port) as channel:
        stub = pb.WorkerServiceStub(channel.raw)
        await channel.unary(
            stub.register_worker,
            pb.RegisterWorkerRequest(
                worker_id=worker_id,
                workflow_types=[SCRIPTED],
                max_concurrency=1,
                host="test",
                pid=os.getpid(),
                version="test",
            ),
        )
        reply = await channel.unary(
            stub.poll_tasks,
            pb.PollTasksRequest(
                worker_id=worker_id, max_tasks=1, workflow_types=[SCRIPTED], wait_s=5
            ),
        )
        (task,) = reply.tasks
        done = await channel.unary(
            stub.complete_workflow_task,
            pb.CompleteWorkflowTaskRequest(
                task_id=task.task_id,
                lease_token=task.lease_token,
                worker_id=worker_id,
                seen_sequence=max(e.sequence_num for e in task.history),
                commands=json.dumps([command]).encode(),
                claim_time=task.claimed_at,
            ),
        )
        assert done.accepted
        workflow_id: str = task.workflow_id
        return workflow_id


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_start_is_idempotent_and_a_new_type_waits_for_a_worker(client: Client) -> None:
    with trio.fail_after(20):
        big = {"n": 2**70, "f": 0.1, "s": "é\u2028", "l": [None, True]}
        first = await client.start_workflow("nobody_serves_this", big, workflow_id="order-1")
        assert first.created and first.workflow_id == "order-1" and first.run_id
        again = await client.start_workflow("nobody_serves_this", [2], workflow_id="order-1")
        assert not again.created and again.run_id == first.run_id

        description = await first.describe()
        assert description.status == "pending"
        assert description.waiting_for_worker is True
        assert description.input == big
        assert description.result is None and description.completed_at is None
        assert description.created_at.utcoffset() is not None

        generated = await client.start_workflow("nobody_serves_this")
        assert generated.created and generated.workflow_id not in ("", "order-1")


async def test_history_starts_with_workflow_started(client: Client) -> None:
    with trio.fail_after(20):
        handle = await client.start_workflow("t", {"a": 1}, workflow_id="h-1")
        events = await client.get_handle("h-1").history()
        assert events[0].sequence_num == 1
        assert events[0].type == "workflow_started"
        assert events[0].data["input"] == {"a": 1}
        assert events[0].data["run_id"] == handle.run_id
        assert [e.sequence_num for e in events] == list(range(1, len(events) + 1))


async def test_list_workflows_pages_through_every_run(client: Client) -> None:
    with trio.fail_after(30):
        handles = await client.start_workflows([("listed", i, f"l-{i}") for i in range(5)])
        await client.start_workflows([("other", None, "o-1"), ("other", None, "o-2")])
        assert [h.workflow_id for h in handles] == [f"l-{i}" for i in range(5)]

        seen: list[str] = []
        token: str | None = None
        pages = 0
        while True:
            runs, token = await client.list_workflows(
                workflow_type="listed", limit=2, page_token=token
            )
            pages += 1
            assert len(runs) <= 2
            seen += [r.workflow_id for r in runs]
            assert all(r.workflow_type == "listed" and r.status == "pending" for r in runs)
            if token is None:
                break
        assert sorted(seen) == [f"l-{i}" for i in range(5)] and len(seen) == 5
        assert pages >= 3

        everything, _ = await client.list_workflows(limit=50)
        assert len(everything) == 7
        created = [r.created_at for r in everything]
        assert created == sorted(created, reverse=True)  # newest first
        none, token = await client.list_workflows(status="completed")
        assert none == [] and token is None


async def test_unknown_workflow_id_is_not_found(
    client: Client, address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(30):
        handle = client.get_handle("no-such-workflow")
        for call in (handle.describe, handle.history, handle.cancel, handle.result):
            with pytest.raises(NotFound):
                await call()
        with pytest.raises(NotFound):
            await handle.signal("go", 1)

        for argv in (
            ("workflow", "show", "no-such-workflow"),
            ("workflow", "signal", "no-such-workflow", "go"),
            ("workflow", "cancel", "no-such-workflow"),
        ):
            code, out, err = await run_cli(capsys, "--address", address, *argv)
            assert code == cli.EXIT_NOT_FOUND, err
            assert out == "" and len(err.strip().splitlines()) == 1
            assert "Traceback" not in err


async def test_cancel_an_open_run_twice(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(20):
        handle = await client.start_workflow("t", None, workflow_id="c-1")
        await handle.cancel("first")
        await handle.cancel("second")  # idempotent while the request is pending
        requests = [e for e in await handle.history() if e.type == "workflow_cancel_requested"]
        assert len(requests) == 1 and requests[0].data["reason"] == "first"
        code, out, _ = await run_cli(
            capsys, "--address", client.address, "workflow", "cancel", "c-1"
        )
        assert code == 0 and "workflow c-1 is cancelled" in out  # no worker ever took it


async def test_non_json_input_is_refused_at_the_client(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(20):
        with pytest.raises(PayloadError, match="set"):
            await client.start_workflow("t", {"tags": {"a", "b"}}, workflow_id="bad-1")
        with pytest.raises(PayloadError, match="nan"):
            await client.start_workflow("t", float("nan"), workflow_id="bad-2")
        # In a batch the bad input is named by its workflow, and nothing of the batch is sent.
        with pytest.raises(PayloadError, match=r"^input of workflow 'u' is nan") as caught:
            await client.start_workflows([("t", 1), ("u", float("nan")), ("t", 2)])
        assert caught.value.__context__ is None
        code, _, err = await run_cli(
            capsys, "--address", client.address, "workflow", "start", "t", "--input", "NaN"
        )
        assert code == cli.EXIT_USAGE and err.startswith("everruns: ")
        runs, _ = await client.list_workflows()
        assert runs == []  # nothing reached the server


async def test_result_times_out_while_open(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(20):
        handle = await client.start_workflow("t", None, workflow_id="slow-1")
        start = trio.current_time()
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.5)
        assert 0.5 <= trio.current_time() - start < 3
        code, _, err = await run_cli(
            capsys, "--address", client.address, "workflow", "result", "slow-1", "--timeout", "0.3"
        )
        assert code == cli.EXIT_TIMEOUT and "still open" in err


async def test_ended_runs_result_failure_and_precondition(
    client: Client, address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(40):
        ok = await client.start_workflow(SCRIPTED, 1, workflow_id="ends-ok")
        async with trio.open_nursery() as nursery:
            # The wait begins before the run ends: the long-poll must be woken, not re-polled.
            got: list[Any] = []

            async def wait() -> None:
                got.append(await ok.result(timeout=20))

            nursery.start_soon(wait)
            await trio.sleep(0.2)
            assert (
                await end_next_run(address, CompleteWorkflow(result=2**80).to_dict()) == "ends-ok"
            )
        assert got == [2**80]

        await client.start_workflow(SCRIPTED, 1, workflow_id="ends-bad")
        error = {
            "type": "ValueError",
            "message": "card declined",
            "traceback": "",
            "non_retryable": True,
        }
        await end_next_run(address, FailWorkflow(error=error).to_dict())
        with pytest.raises(WorkflowFailed, match="card declined") as info:
            await client.get_handle("ends-bad").result(timeout=10)
        assert info.value.status == "failed" and info.value.error["type"] == "ValueError"

        description = await client.get_handle("ends-ok").describe()
        assert description.status == "completed" and description.result == 2**80
        assert description.completed_at is not None and not description.is_open

        with pytest.raises(FailedPrecondition, match="completed"):
            await ok.signal("late", 1)
        with pytest.raises(FailedPrecondition, match="completed"):
            await ok.cancel()

        code, out, _ = await run_cli(capsys, "--address", address, "workflow", "result", "ends-ok")
        assert code == 0 and json.loads(out) == 2**80
        code, out, err = await run_cli(
            capsys, "--address", address, "workflow", "result", "ends-bad"
        )
        assert code == cli.EXIT_FAILED and "ValueError: card declined" in err
        code, out, _ = await run_cli(
            capsys, "--address", address, "--json", "workflow", "result", "ends-bad"
        )
        assert code == cli.EXIT_FAILED and json.loads(out)["status"] == "failed"
        code, _, err = await run_cli(
            capsys, "--address", address, "workflow", "signal", "ends-ok", "late"
        )
        assert code == cli.EXIT_PRECONDITION and "completed" in err
        assert len(err.strip().splitlines()) == 1

        # The stand-in registered as a worker serving SCRIPTED: new runs no longer wait.
        fresh = await client.start_workflow(SCRIPTED, None, workflow_id="served")
        assert (await fresh.describe()).waiting_for_worker is False
        code, out, _ = await run_cli(capsys, "--address", address, "workers", "list")
        assert code == 0 and f"scripted-{os.getpid()}" in out and SCRIPTED in out


async def test_unreachable_control_plane_is_reported_quickly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(20):
        address = f"127.0.0.1:{closed_port()}"
        start = trio.current_time()
        async with Client.connect(address) as client:
            with pytest.raises(ServerUnavailable):
                await client.get_handle("w").describe()
        assert trio.current_time() - start < 5
        code, out, err = await run_cli(capsys, "--address", address, "workflow", "list")
        assert code == cli.EXIT_UNREACHABLE and out == ""
        assert err.strip() == (
            f"everruns: control plane at {address} unreachable; is `python -m everruns.server` "
            "running? (set --address or GRPC_ADDRESS)"
        )


async def test_cli_json_outputs_parse(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(40):
        base = ("--address", address, "--json")
        code, out, err = await run_cli(
            capsys,
            *base,
            "workflow",
            "start",
            "t",
            "--id",
            "j-1",
            "--input",
            '{"n": 123456789012345678901}',
        )
        assert code == 0, err
        started = json.loads(out)
        assert started["workflow_id"] == "j-1" and started["created"] is True

        code, out, _ = await run_cli(capsys, *base, "workflow", "start", "t", "--id", "j-1")
        assert code == 0 and json.loads(out)["created"] is False

        code, out, _ = await run_cli(capsys, *base, "workflow", "list", "--limit", "10")
        listing = json.loads(out)
        assert [w["workflow_id"] for w in listing["workflows"]] == ["j-1"]
        assert listing["next_page_token"] is None

        code, out, _ = await run_cli(capsys, *base, "workflow", "show", "j-1")
        shown = json.loads(out)
        assert shown["status"] == "pending" and shown["input"] == {"n": 123456789012345678901}
        assert shown["waiting_for_worker"] is True and shown["run_id"] == started["run_id"]

        code, out, _ = await run_cli(capsys, *base, "workflow", "history", "j-1")
        history = json.loads(out)
        assert history["events"][0]["type"] == "workflow_started"
        assert history["run_id"] == started["run_id"]  # the run read, though --run was left out

        code, out, _ = await run_cli(
            capsys, *base, "workflow", "signal", "j-1", "go", "--payload", "[1, 2]"
        )
        assert code == 0 and json.loads(out)["ok"] is True

        for argv in (("workers", "list", "--all"), ("dlq", "list"), ("breakers", "list")):
            code, out, err = await run_cli(capsys, *base, *argv)
            assert code == 0, err
            assert isinstance(json.loads(out), dict)


async def test_cli_tables(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(40):
        code, out, _ = await run_cli(
            capsys, "--address", address, "workflow", "start", "shop", "--id", "t-1"
        )
        assert code == 0 and "started workflow t-1" in out
        code, out, _ = await run_cli(capsys, "workflow", "list", "--address", address)
        lines = out.strip().splitlines()
        assert lines[0].startswith("WORKFLOW ID") and "t-1" in lines[1] and "pending" in lines[1]
        code, out, _ = await run_cli(capsys, "--address", address, "workflow", "show", "t-1")
        assert "status" in out and "pending" in out and "no live worker" in out
        code, out, _ = await run_cli(capsys, "--address", address, "workflow", "history", "t-1")
        assert out.splitlines()[0].split() == ["SEQ", "TIME", "TYPE", "DETAILS"]
        assert "workflow_started" in out
        code, out, _ = await run_cli(capsys, "--address", address, "workers", "list")
        assert code == 0 and out.strip() == "(no workers registered)"
        code, out, _ = await run_cli(capsys, "--address", address, "breakers", "reset", "nothing")
        # No breaker has recorded state yet: a closed breaker has no row, so the reset of a
        # key without one is a success that changes nothing (as a retried reset is).
        assert code == cli.EXIT_OK and "'nothing' reset to closed" in out


async def test_a_named_start_retried_after_a_lost_reply_starts_one_run(
    address: str, client: Client
) -> None:
    """A named start is retried when the control plane seems unreachable, which it may also
    seem after it started the run (the reply lost with the connection). The retry carries the
    first try's idempotency key, so it returns that run, reported as not created, even if the
    run ended in between; before, it started the workflow a second time."""
    channel = client._channel
    unary = channel.unary
    lost: list[Any] = []

    async def reply_lost_once(method: Any, request: Any, **kwargs: Any) -> Any:
        reply = await unary(method, request, **kwargs)
        if not lost and isinstance(request, pb.StartWorkflowRequest):
            lost.append(reply)
            await end_next_run(address, {"type": "complete_workflow", "result": 1})
            raise ServerUnavailable("start_workflow: connection reset (test)")
        return reply

    channel.unary = reply_lost_once  # type: ignore[method-assign]
    with trio.fail_after(30):
        handle = await client.start_workflow(SCRIPTED, 1, workflow_id="pay-1")
        assert lost, "the first try's reply was not lost"
        assert (handle.run_id, handle.created) == (lost[0].run_id, False)
        assert await handle.result(timeout=5) == 1
        runs, _ = await client.list_workflows(workflow_type=SCRIPTED)
        assert [run.workflow_id for run in runs] == ["pay-1"]
