"""Operator mistakes and stuck runs, through the CLI and client against a real control plane
(in-process, fresh database); each comment says what went wrong before."""

from __future__ import annotations

import pytest
import trio

from everruns import cli
from tests.integration.test_client_cli import address, run_cli

__all__ = ["address"]  # the fixture

pytestmark = pytest.mark.db


async def test_cli_bad_auth_token_is_one_line_usage_error(
    address: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/operations.md: exit 2 on bad input; cli.py: "an operator mistake prints one line,
    # never a traceback". A token with a trailing newline (a secret read from a file) makes the
    # first call raise a bare ValueError out of cli.main (a traceback, exit 1 from Python).
    monkeypatch.setenv("EVERRUNS_AUTH_TOKEN", "secret\n")
    with trio.fail_after(30):
        try:
            code, _out, err = await run_cli(capsys, "--address", address, "workflow", "list")
        except ValueError as exc:
            pytest.fail(f"cli.main raised {exc!r} instead of printing one line and exiting 2")
    assert code == cli.EXIT_USAGE
    assert "EVERRUNS_AUTH_TOKEN" in err and len(err.strip().splitlines()) == 1


async def test_cli_address_with_scheme_is_bad_input_not_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `--address http://127.0.0.1:9001` is accepted as host "http://127.0.0.1"; the CLI then
    # says the control plane is unreachable (exit 4) instead of refusing the flag (exit 2).
    with trio.fail_after(30):
        code, _out, err = await run_cli(
            capsys, "--address", "http://127.0.0.1:9001", "workflow", "list"
        )
    assert (code, err.count("\n")) == (cli.EXIT_USAGE, 1), err
    assert "not host:port" in err, err


async def test_cancel_ends_a_run_no_worker_ever_picked_up(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run started with a mistyped type (no worker serves it, none ever will) cannot be ended:
    # `workflow cancel` records a request only a worker can act on, there is no terminate, and
    # the open run keeps its workflow id, so the corrected start returns the dead run.
    from everruns.client import Client

    with trio.fail_after(30):
        async with Client.connect(address) as client:
            typo = await client.start_workflow("chekout", {"id": 42}, workflow_id="order-42")
            code, _out, _err = await run_cli(
                capsys, "--address", address, "workflow", "cancel", "order-42"
            )
            assert code == cli.EXIT_OK
            code, _out, err = await run_cli(
                capsys, "--address", address, "workflow", "result", "order-42", "--timeout", "5"
            )
            status = (await typo.describe()).status
            assert (code, status) == (cli.EXIT_FAILED, "cancelled"), (code, status, err)
            again = await client.start_workflow("checkout", {"id": 42}, workflow_id="order-42")
            assert again.created and again.run_id != typo.run_id


async def test_long_worker_id_is_refused_naming_the_setting(address: str) -> None:
    # WorkerConfig takes any WORKER_ID, the control plane's check_name allows 512 characters,
    # but durable_workers.id is CHECK (length(id) BETWEEN 1 AND 256): a 300-character id gets
    # PostgreSQL's raw constraint text, naming neither WORKER_ID nor the limit.
    from everruns.domain.registry import Registry
    from everruns.errors import EverrunsError
    from everruns.worker.runtime import Worker

    with trio.fail_after(30):
        with pytest.raises(EverrunsError) as caught:
            worker = Worker.from_env(
                Registry(), env={"GRPC_ADDRESS": address, "WORKER_ID": "w" * 300}
            )
            await worker.run()
    message = str(caught.value)
    assert "check constraint" not in message, message
    assert "worker_id" in message.lower(), message
