"""Review of 101bc22 (`Client.start_workflows` sends a named workflow id once per batch).

Each test fails at 101bc22 and passes once its defect is mended."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns.client import Client
from everruns.domain.registry import Registry, activity, workflow
from everruns.errors import InvalidArgument, NotFound, PayloadError
from everruns.server import ServerConfig, serve

pytestmark = pytest.mark.db


async def test_review23b_a_later_start_of_a_named_id_is_checked_before_anything_is_sent(
    database_url: str,
) -> None:
    """`start_workflows` promises "PayloadError: an input is not exact JSON; nothing is
    sent" and "InvalidArgument: an entry ... names an @activity function". The dedupe drops
    every later start of a workflow id before the inputs are encoded and the types checked:
    a batch whose second start of ``dup`` has a NaN input (or names an activity) is no
    longer refused; the first start of ``dup`` is sent and its run started, and the bad
    entry gets the first's handle as if it were fine."""
    registry = Registry()

    @workflow(registry=registry)
    async def measure(ctx: Any, text: Any) -> int:
        return 1

    @activity(registry=registry)
    async def fetch(ctx: Any, url: str) -> str:
        return url

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
            async with Client.connect(info.address) as client:
                # At 101bc22: no error; two handles of one started run.
                with pytest.raises(PayloadError):
                    await client.start_workflows(
                        [(measure, "fine", "dup"), (measure, float("nan"), "dup")]
                    )
                with pytest.raises(InvalidArgument):
                    await client.start_workflows([(measure, "fine", "dup"), (fetch, "u", "dup")])
                with pytest.raises(NotFound):
                    await client.get_handle("dup").describe()
            nursery.cancel_scope.cancel()
