"""Review of the operator surface (session 21): the client's operator calls and the `everruns`
command line against a real control plane (in-process, on a fresh database).

Each test fails against the code it was written for and says why in its docstring.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from everruns import cli
from everruns._aio import pg
from everruns._proto.everruns import v1 as pb
from everruns.client import Client
from everruns.errors import InvalidArgument, NotFound, ServerUnavailable
from everruns.server import ServerConfig, serve
from tests.integration.test_client_cli import SCRIPTED, end_next_run

pytestmark = pytest.mark.db


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


def _events(events: list[Any]) -> list[tuple[int, str, Any]]:
    return [(e.sequence_num, e.type, e.data) for e in events]


async def test_history_of_the_latest_run_does_not_mix_two_runs_across_pages(
    address: str, client: Client
) -> None:
    """`WorkflowHandle.history()` (and so `everruns workflow history ID` without `--run`) pages
    through the history, sending the workflow id with an empty run id on every page, so each
    page is resolved again to "the latest run". If the run ended and a new run of the same
    workflow id starts while the pages are read (an id reused for a retry of an order, a
    periodic job), the later pages come from the new run: the result is the first run's first
    events followed by the second run's later ones, a history neither run has. `result()` and
    `cancel()` pin the run id for exactly this reason; `history()` should too (resolve the run
    once, or take the run id from the first page), returning one run's events."""
    with trio.fail_after(30):
        first = await client.start_workflow(SCRIPTED, 1, workflow_id="order-7")
        await end_next_run(address, {"type": "complete_workflow", "result": "first"})
        whole = await client.get_handle("order-7", first.run_id).history()
        assert len(whole) > 2, _events(whole)

        channel = client._channel
        unary = channel.unary
        pages: list[int] = []

        async def new_run_between_pages(method: Any, request: Any, **kwargs: Any) -> Any:
            reply = await unary(method, request, **kwargs)
            if isinstance(request, pb.GetHistoryRequest):
                pages.append(len(reply.events))
                if len(pages) == 1:
                    # Between the first page and the second, the id gets a new run.
                    channel.unary = unary  # type: ignore[method-assign]
                    again = await client.start_workflow(SCRIPTED, 2, workflow_id="order-7")
                    assert again.created and again.run_id != first.run_id
                    await end_next_run(address, {"type": "complete_workflow", "result": "second"})
                    channel.unary = new_run_between_pages  # type: ignore[method-assign]
            return reply

        channel.unary = new_run_between_pages  # type: ignore[method-assign]
        try:
            read = await client.get_handle("order-7").history(page_size=2)
        finally:
            channel.unary = unary  # type: ignore[method-assign]
        assert len(pages) >= 2, pages
        assert _events(read) == _events(whole), (
            "history() read without a run id mixed two runs: the first page came from run "
            f"{first.run_id}, the later ones from the run started in between"
        )


async def test_a_breaker_reset_whose_reply_was_lost_is_not_reported_as_not_found(
    client: Client, pool: pg.Pool
) -> None:
    """`Client.reset_circuit_breaker` is documented as idempotent and is sent with
    ``retry=True``, so a try whose reply is lost (the connection drops after the control plane
    deleted the breaker's row) is sent again. The server answers the retry NOT_FOUND (the row
    the first try deleted is gone), so the operator's successful reset is reported as "circuit
    breaker 'charge' not found" (`everruns breakers reset charge` exits 3), and a script that
    resets breakers after a fix fails. Expected: the retried reset succeeds (a reset of a
    breaker with no recorded state is a closed breaker already, or the retry is not made)."""
    await pool.execute(
        "INSERT INTO durable_circuit_breaker_state (key, state, failure_count, opened_at) "
        "VALUES ('charge', 'open', 5, now())"
    )
    channel = client._channel
    unary = channel.unary
    lost: list[Any] = []

    async def reply_lost_once(method: Any, request: Any, **kwargs: Any) -> Any:
        reply = await unary(method, request, **kwargs)
        if not lost and isinstance(request, pb.ResetCircuitBreakerRequest):
            lost.append(reply)
            raise ServerUnavailable("reset_circuit_breaker: connection reset (test)")
        return reply

    channel.unary = reply_lost_once  # type: ignore[method-assign]
    with trio.fail_after(30):
        try:
            await client.reset_circuit_breaker("charge")
        except NotFound as exc:
            pytest.fail(f"a reset that succeeded was reported as not found: {exc}")
        finally:
            channel.unary = unary  # type: ignore[method-assign]
        assert lost, "the first try's reply was not lost"
        assert [b.key for b in await client.list_circuit_breakers()] == []


def _strict_json(text: str) -> Any:
    """Parse as RFC 8259 JSON (jq and most parsers refuse NaN and Infinity; Python's accepts
    them unless told not to)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


async def test_json_output_stays_json_for_a_number_beyond_double_range(
    address: str, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--json` promises "one JSON document for scripts". A payload holding a number beyond a
    double's range (`1e400`: valid JSON, accepted by PostgreSQL's json type and by the control
    plane's `check_payload`, e.g. a BigDecimal from a Java client) is decoded by the client's
    `json.loads` to ``inf``, and `Output.emit` writes it with `json.dumps`' default
    ``allow_nan=True``: `everruns --json workflow show ID` prints `"input": Infinity`, which is
    not JSON (jq and every strict parser reject the whole document). NaN and -Infinity are
    refused at the start; this one is let through and comes back as a value JSON cannot
    carry. Expected: either the start is refused as INVALID_ARGUMENT (as NaN is), or the
    document printed is valid JSON."""
    with trio.fail_after(30):
        try:
            await client._call(
                client._stub.start_workflow,
                pb.StartWorkflowRequest(
                    workflow_type="billing",
                    input=b'{"amount": 1e400}',
                    workflow_id="big-amount",
                ),
                retry=False,
            )
        except InvalidArgument:
            return  # refused at the door: fine
        capsys.readouterr()
        code = await trio.to_thread.run_sync(
            cli.main, ["--address", address, "--json", "workflow", "show", "big-amount"]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        try:
            _strict_json(out)
        except ValueError as exc:
            pytest.fail(
                f"`everruns --json workflow show` printed a document that is not JSON: {exc}"
            )
