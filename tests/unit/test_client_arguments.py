"""Arguments of the client's operator calls checked before anything is sent: a value the wire
cannot carry is a one-line `InvalidArgument` at the call, not an AttributeError out of the
serializer deep in the channel. No I/O: the first call made is reported as `_Reached`."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest

from everruns.client import Client, WorkflowHandle
from everruns.errors import InvalidArgument


class _Reached(Exception):
    pass


class _Stub:
    def __getattr__(self, name: str) -> Any:
        return name


class _FakeClient:
    _stub = _Stub()

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        raise _Reached


_client: Any = _FakeClient()


@pytest.mark.parametrize("bad", [123, None, b"id", "a\udc80"])
async def test_requeue_dead_letter_refuses_an_id_that_is_not_sendable_text(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="dead_letter_id"):
        await Client.requeue_dead_letter(_client, bad)
    with pytest.raises(_Reached):
        await Client.requeue_dead_letter(_client, "7d4f6c1e-0000-0000-0000-000000000000")


@pytest.mark.parametrize("bad", [5, None, "", "k\x00", "k\udc80"])
async def test_reset_circuit_breaker_refuses_a_key_the_control_plane_would(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="key"):
        await Client.reset_circuit_breaker(_client, bad)
    with pytest.raises(_Reached):
        await Client.reset_circuit_breaker(_client, "payments")


@pytest.mark.parametrize("bad", [5, b"token", ["t"], "t\udc80"])
async def test_page_tokens_must_be_strings(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        await Client.list_workflows(_client, page_token=bad)
    with pytest.raises(InvalidArgument, match="page_token"):
        await Client.list_dead_letters(_client, page_token=bad)
    for first_page in (None, ""):
        with pytest.raises(_Reached):
            await Client.list_workflows(_client, page_token=first_page)
        with pytest.raises(_Reached):
            await Client.list_dead_letters(_client, page_token=first_page)


@pytest.mark.parametrize("timeout", [math.inf, 10**400, 1e308])
async def test_a_timeout_longer_than_any_wait_waits(timeout: float) -> None:
    """An integer past a float's range waits as ``math.inf`` does (it once raised
    OverflowError)."""
    with pytest.raises(_Reached):
        await WorkflowHandle(_client, "wf-1").result(timeout=timeout)


@pytest.mark.parametrize("timeout", [-1, float("nan"), True, "5"])
async def test_a_turns_result_refuses_a_bad_timeout(timeout: Any) -> None:
    """`TurnHandle.result` checks its timeout as `WorkflowHandle.result` does (it did not: a
    huge integer raised OverflowError, a negative one was a wait of zero)."""
    from everruns.agent.session import TurnHandle

    handle = TurnHandle(cast(Any, None), "s", 1)
    with pytest.raises(InvalidArgument, match="timeout must be"):
        await handle.result(timeout=timeout)
