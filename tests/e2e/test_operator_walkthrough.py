"""A new user's walk through README.md and docs/operations.md: what an operator sees.

Each test starts real `python -m everruns.server` processes through the e2e harness
(`open_cluster` stops every process it started, also on failure, and asserts none survive),
under an absolute `trio.fail_after`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.e2e.harness import (
    WORKER_REGISTERED,
    open_cluster,
)

pytestmark = [pytest.mark.db, pytest.mark.e2e]


async def test_an_operators_cli_command_leaves_no_cancelled_request_line_in_the_server_log(
    database_url: str, tmp_path: Path
) -> None:
    """docs/operations.md "Everyday commands": an operator runs `everruns workflow list`,
    `everruns workers list`, `everruns dlq list`. Each run ends the CLI process, which cuts its
    long-lived CallService.Calls stream, and the control plane logs
    `grpclib.server: Request was cancelled: Connection lost` for every command — a log line
    that reads like a failure, once per CLI call, in the log operators are told to watch."""
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            server = await cluster.start_server()
            for args in (("workflow", "list"), ("workers", "list"), ("dlq", "list")):
                result = await cluster.cli(*args)
                assert result.code == 0, result.describe()
            await trio.sleep(1.0)  # let the server notice the dropped connections
            noisy = [line for line in server.proc.lines if "Request was cancelled" in line]
            assert noisy == [], (
                f"{len(noisy)} 'Request was cancelled' line(s) in the server log after three "
                "clean CLI commands:\n" + "\n".join(noisy)
            )


async def test_cancel_of_an_already_cancelled_run_does_not_claim_a_new_request(
    database_url: str, tmp_path: Path
) -> None:
    """docs/operations.md "Everyday commands": exit 5 when the object's state forbids the
    operation (e.g. the workflow has ended). `everruns workflow cancel` of a *completed* run
    exits 5 ("it has already ended completed"); of an already *cancelled* run it is a no-op
    (cancelling is idempotent, so a retried cancel succeeds) and it said "cancellation requested
    for workflow X; `everruns workflow result X` waits for it to end": nothing was requested
    and there is nothing to wait for. It now says the run is cancelled."""
    with trio.fail_after(90):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            # No worker serves this type: the first cancel ends the run at once (documented).
            started = await cluster.cli("workflow", "start", "no_such_type", "--id", "rf-cancel")
            assert started.code == 0, started.describe()
            first = await cluster.cli("workflow", "cancel", "rf-cancel")
            assert first.code == 0, first.describe()
            shown = await cluster.cli("--json", "workflow", "show", "rf-cancel")
            assert shown.json()["status"] == "cancelled", shown.describe()
            second = await cluster.cli("workflow", "cancel", "rf-cancel")
            assert "cancellation requested" not in second.stdout, second.describe()
            assert second.code == 0 and "is cancelled" in second.stdout, second.describe()


async def test_a_worker_stopped_with_sigterm_does_not_register_again_while_draining(
    database_url: str, tmp_path: Path
) -> None:
    """docs/operations.md: a worker gets SIGTERM, drains and stops ("clean exit"). The drain
    wakes a `status="draining"` WorkerHeartbeat while `_goodbye` sends `status="stopped"`; when
    the goodbye lands first the control plane answers the draining heartbeat `known=False` and
    the stopping worker logs `the control plane no longer knows worker X; registering again`
    and calls RegisterWorker (seen on 2 of 3 workers stopped together in the walkthrough).
    A re-registration that lands after the goodbye leaves a stopped worker listed `active`."""
    with trio.fail_after(150):
        async with open_cluster(database_url, tmp_path) as cluster:
            await cluster.start_server()
            offenders: list[str] = []
            for i in range(20):
                worker = await cluster.start_worker(f"rf-drain-{i}")
                await worker.proc.wait_for_line(WORKER_REGISTERED, timeout=20)
                worker.terminate()
                assert await worker.wait() == 0, worker.tail()
                offenders += [
                    f"rf-drain-{i}: {line}"
                    for line in worker.proc.lines
                    if "no longer knows" in line or "registering again" in line
                ]
            listed = (await cluster.cli("--json", "workers", "list")).json()
            still_active = [
                w["worker_id"]
                for w in listed["workers"]
                if w.get("status") == "active" and w["worker_id"].startswith("rf-drain-")
            ]
            assert offenders == [] and still_active == [], (offenders, still_active)
