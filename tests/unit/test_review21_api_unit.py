"""Review 21 (public API as user code meets it), no I/O: bad arguments to `Worker`,
`WorkerConfig`, the decorators, `Client.connect` and `WorkflowHandle.result` that are accepted
and fail later (deep in the stack, or not at all), where the documentation promises a one-line
error at the call. Each test failed on the code it was written against."""

from __future__ import annotations

from typing import Any

import pytest

from everruns.client import Client, WorkflowHandle
from everruns.domain.limits import MAX_NAME_LENGTH
from everruns.domain.registry import Registry, activity, workflow
from everruns.errors import ConfigError, InvalidArgument
from everruns.worker import Worker, WorkerConfig


async def _wf(ctx: Any, value: Any) -> Any:
    return value


async def _act(ctx: Any, value: Any) -> Any:
    return value


# ----------------------------------------------------------------------------- Worker


def test_worker_refuses_an_auth_token_a_grpc_header_cannot_carry() -> None:
    """Defect: `Worker(auth_token="tok\\n")` (a secret read from a file) is accepted; its
    `run` then dies with a bare ``ValueError: Invalid metadata value`` from grpclib.

    Expected: `ConfigError` at construction, as `Worker`'s docstring says ("Raises:
    ConfigError: an argument is invalid; the message names it") and as `Client.connect` and
    `WorkerConfig.from_env` already do with the same token (`check_auth_token`)."""
    with pytest.raises(ConfigError, match="auth_token"):
        Worker(Registry(), auth_token="tok\n")
    with pytest.raises(ConfigError):
        WorkerConfig(host="127.0.0.1", port=9001, auth_token="tok\n")


def test_worker_refuses_a_worker_id_with_a_nul_character() -> None:
    """Defect: `Worker(worker_id="a\\x00b")` is accepted (the validator checks only spaces
    and length); `run` then fails with the control plane's InvalidArgument at registration.

    Expected: `ConfigError` at construction (Worker docstring: "ConfigError: an argument is
    invalid"), as for a worker id that is too long or blank."""
    with pytest.raises(ConfigError):
        Worker(Registry(), worker_id="a\x00b")


@pytest.mark.parametrize(
    ("host", "port"),
    [("127.0.0.1", 70000), ("127.0.0.1", -1), ("127.0.0.1", 0), ("", 9001), ("127.0.0.1", "9001")],
)
def test_worker_config_refuses_an_address_no_worker_can_reach(host: Any, port: Any) -> None:
    """Defect: `WorkerConfig(host=..., port=...)` validates neither field; a worker built
    from it with `Worker.from_config` retries "the unreachable control plane" for ever
    (see the integration test of the same name).

    Expected: `ConfigError` naming the address, as the module docstring promises ("A bad
    value is a `ConfigError` whose one line names the variable") and as `Worker(address=...)`
    and `WorkerConfig.from_env` do through `parse_address`."""
    with pytest.raises(ConfigError):
        WorkerConfig(host=host, port=port)


def test_worker_start_ahead_must_be_a_bool() -> None:
    """Defect: `Worker(start_ahead="no")` (a value read from a config file) is kept as the
    truthy string, so start-ahead stays ON.

    Expected: a one-line error, as the client gives for the same mistake
    (`client._check_flag`: "Refuse a flag that is not a bool ("no" would mean yes)") and as
    `EVERRUNS_START_AHEAD` gives through `switch_from_env`."""
    with pytest.raises((ConfigError, InvalidArgument)):
        Worker(Registry(), start_ahead="no")  # type: ignore[arg-type]


def test_worker_refuses_a_non_string_address_with_a_clear_error() -> None:
    """Defect: `Worker(address=9001)` raises ``AttributeError: 'int' object has no attribute
    'strip'`` from `parse_address`.

    Expected: `ConfigError` (Worker docstring: "an argument is invalid; the message names
    it")."""
    with pytest.raises(ConfigError):
        Worker(Registry(), address=9001)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["w" * (MAX_NAME_LENGTH + 1), "a\x00b"])
def test_decorators_refuse_a_name_the_control_plane_cannot_store(name: str) -> None:
    """Defect: `@workflow(name=...)` / `@activity(name=...)` accept a name longer than 512
    characters or holding a NUL; every worker serving the registry then fails to register
    at all (`InvalidArgument: type name is 600 characters long`), taking its other
    workflows down with it.

    Expected: `InvalidArgument` at decoration (`Registry.add_workflow`: "Raises:
    InvalidArgument: ... the name is invalid"; `name_of` already refuses names "no worker
    could ever register")."""
    with pytest.raises(InvalidArgument):
        workflow(_wf, name=name, registry=Registry())
    with pytest.raises(InvalidArgument):
        activity(_act, name=name, registry=Registry())


# ----------------------------------------------------------------------------- Client


async def test_client_connect_refuses_non_string_address_and_token_clearly() -> None:
    """Defect: `Client.connect(9001)` raises ``AttributeError: 'int' object has no attribute
    'strip'`` and `Client.connect(auth_token=5)` ``AttributeError: ... 'isascii'``.

    Expected: a one-line `ConfigError`/`InvalidArgument` (or a TypeError) naming the argument,
    as `connect` gives for a bad ``tls`` or ``call_stream``."""
    with pytest.raises((ConfigError, InvalidArgument, TypeError)):
        async with Client.connect(9001):  # type: ignore[arg-type]
            pass
    with pytest.raises((ConfigError, InvalidArgument, TypeError)):
        async with Client.connect("127.0.0.1:1", auth_token=5):  # type: ignore[arg-type]
            pass


class _Reached(Exception):
    pass


class _FakeClient:
    """Stands in for a Client: the first call made is reported as `_Reached`."""

    class _Stub:
        await_result = None

    _stub = _Stub()

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        raise _Reached


async def test_result_with_a_huge_integer_timeout_is_not_an_overflow_error() -> None:
    """Defect: `handle.result(timeout=10**400)` raises ``OverflowError: int too large to
    convert to float`` (``trio.current_time() + timeout``).

    Expected: either waits like any timeout larger than the run needs (the call is made) or
    a one-line `InvalidArgument`; the docstring lists only "InvalidArgument: ``timeout`` is
    negative or NaN" as an argument error."""
    handle = WorkflowHandle(_FakeClient(), "wf-1")  # type: ignore[arg-type]
    with pytest.raises((_Reached, InvalidArgument)):
        await handle.result(timeout=10**400)
