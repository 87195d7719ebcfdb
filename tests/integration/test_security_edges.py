"""Security-relevant behaviour and input limits of the control plane: long values quoted in
errors, NUL characters in a worker's host or version, an unbounded cancel reason, the
DATABASE_URL password and the bearer token kept out of messages and logs. From a review
(session 17); each test failed on the code before its fix."""

from __future__ import annotations

import logging

import pytest
import trio

from everruns._aio.grpc import open_channel
from everruns._proto.everruns import v1 as pb
from everruns.errors import (
    ConfigError,
    EverrunsError,
    InvalidArgument,
    ResourceExhausted,
)
from everruns.server import ServerConfig
from everruns.store.embedded import mask_url
from tests.integration.test_hostile import running

pytestmark = pytest.mark.db


# --------------------------------------------------------------------------------------------
# 1. A long id in a request is echoed whole into the grpc-message trailer: over a unary call
#    (EVERRUNS_CALL_STREAM=0) the client's HPACK decoder refuses the oversized header block and
#    the whole HTTP/2 connection is torn down. The caller sees "control plane unreachable"
#    (which workers treat as transient and retry), and every other call on the connection
#    dies with it.


async def test_long_run_id_gets_invalid_argument_not_a_dropped_connection(
    database_url: str,
) -> None:
    with trio.fail_after(30):
        async with (
            running(database_url) as port,
            open_channel("127.0.0.1", port, call_stream=False) as channel,
        ):
            stub = pb.WorkflowServiceStub(channel.raw)
            await channel.unary(
                stub.start_workflow,
                pb.StartWorkflowRequest(workflow_type="nobody-serves-it", workflow_id="w"),
            )
            bystander: list[BaseException | str] = []

            async def long_poll() -> None:  # another caller's call on the same connection
                try:
                    await channel.unary(
                        stub.await_result,
                        pb.AwaitResultRequest(workflow_id="w", wait_s=3),
                        timeout=10,
                    )
                    bystander.append("answered")
                except EverrunsError as exc:
                    bystander.append(exc)

            verdict: BaseException | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                await trio.sleep(0.5)
                try:
                    await channel.unary(
                        stub.describe_workflow,
                        pb.DescribeWorkflowRequest(workflow_id="w", run_id="x" * 100_000),
                        timeout=10,
                    )
                except EverrunsError as exc:
                    verdict = exc
            assert isinstance(verdict, InvalidArgument) and bystander == ["answered"], (
                f"long run_id: {verdict!r:.120}; the other call on the connection: "
                f"{bystander!r:.120}"
            )
            assert len(str(verdict)) < 2000, "the whole id is echoed back"


# --------------------------------------------------------------------------------------------
# 3. RegisterWorker checks worker_id and the type names, but not `host` or `version`: a NUL
#    character in either reaches PostgreSQL and fails as INTERNAL (which a worker retries as
#    transient, for ever) instead of INVALID_ARGUMENT.


@pytest.mark.parametrize("field", ["host", "version"])
async def test_register_worker_nul_in_host_or_version_is_invalid_argument(
    database_url: str, field: str
) -> None:
    with trio.fail_after(30):
        async with running(database_url) as port, open_channel("127.0.0.1", port) as channel:
            workers = pb.WorkerServiceStub(channel.raw)
            request = pb.RegisterWorkerRequest(
                worker_id="w-nul", max_concurrency=1, **{field: "box\x00name"}
            )
            with pytest.raises(InvalidArgument, match=field):
                await channel.unary(workers.register_worker, request, timeout=10)


# --------------------------------------------------------------------------------------------
# 4. CancelWorkflow's `reason` has no bound at all: neither EVERRUNS_MAX_PAYLOAD_BYTES nor a
#    name limit. It is written into the run's history (workflow_cancel_requested), which every
#    later workflow task carries to a worker.


async def test_cancel_reason_over_the_payload_limit_is_refused(database_url: str) -> None:
    with trio.fail_after(30):
        async with (
            running(database_url, max_payload_bytes=64 * 1024) as port,
            open_channel("127.0.0.1", port) as channel,
        ):
            stub = pb.WorkflowServiceStub(channel.raw)
            # A signal payload over the limit is refused...
            await channel.unary(
                stub.start_workflow,
                pb.StartWorkflowRequest(workflow_type="nobody-serves-it", workflow_id="c"),
            )
            with pytest.raises(ResourceExhausted):
                await channel.unary(
                    stub.signal_workflow,
                    pb.SignalWorkflowRequest(
                        workflow_id="c", name="s", payload=b'"' + b"r" * 1_000_000 + b'"'
                    ),
                )
            # ...a cancel reason of the same size is not.
            with pytest.raises((InvalidArgument, ResourceExhausted)):
                await channel.unary(
                    stub.cancel_workflow,
                    pb.CancelWorkflowRequest(workflow_id="c", reason="r" * 1_000_000),
                    timeout=10,
                )


# --------------------------------------------------------------------------------------------
# 5. DATABASE_URL's password leaks: an unescaped '/', '#' or '?' in it (common in generated
#    passwords) ends the netloc early, so urlsplit reads the password as the port and the
#    one-line ConfigError quotes it; when that "port" happens to be digits the URL passes, and
#    mask_url (which looks for '@' in the netloc) logs it unmasked.


@pytest.mark.parametrize(
    "url, secret",
    [
        ("postgresql://app:Sup3rSecret/x9@db.example:5432/everruns", "Sup3rSecret"),
        ("postgresql://app:hunter2#x@db.example:5432/everruns", "hunter2"),
    ],
)
def test_database_url_password_is_not_quoted_in_config_errors(url: str, secret: str) -> None:
    try:
        ServerConfig.from_env({"DATABASE_URL": url})
    except ConfigError as exc:
        assert secret not in str(exc), str(exc)


async def test_database_url_password_is_not_logged() -> None:
    """A password holding an unescaped "/" ends urlsplit's host part early: the URL passed the
    checks and was logged unmasked ("postgresql://app:5439/Secret@..."). It is now refused at
    start, with a message that quotes nothing of it, and `mask_url` cuts at the last "@"."""
    url = "postgresql://app:5439/Secret@127.0.0.1:5432/everruns"  # password '5439/Secret'
    with pytest.raises(ConfigError) as refused:
        ServerConfig.from_env({"DATABASE_URL": url})
    assert "Secret" not in str(refused.value) and "percent-encode" in str(refused.value)
    assert mask_url(url) == "postgresql://app:***@127.0.0.1:5432/everruns"


# --------------------------------------------------------------------------------------------
# 6. The bearer token is logged in clear when the embedding program logs at DEBUG: grpclib
#    turns off h2's header normalisation, so `authorization` is not sent as a never-indexed
#    (sensitive) header, and hpack's DEBUG lines print it on both ends (the server's decoder
#    prints even never-indexed headers). No logger is quieted.


async def test_bearer_token_never_reaches_the_log(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-7f3a9c1e5b"
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(30):
        async with (
            running(database_url, auth_token=token) as port,
            open_channel("127.0.0.1", port, auth_token=token) as channel,
        ):
            await channel.unary(
                pb.WorkflowServiceStub(channel.raw).list_workflows, pb.ListWorkflowsRequest()
            )
    leaks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if token in r.getMessage()]
    assert not leaks, leaks[:3]
