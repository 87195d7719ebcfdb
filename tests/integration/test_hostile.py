"""Hostile and careless clients: garbage on the gRPC port, truncated HTTP/2, generated request
fields, TLS with a certificate made here. The control plane must keep serving and answer every
malformed request with a readable status."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from everruns._aio.grpc import RpcChannel, client_tls, open_channel
from everruns._proto.everruns import v1 as pb
from everruns.errors import (
    EverrunsError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServerUnavailable,
)
from everruns.server import ServerConfig, serve

pytestmark = pytest.mark.db

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@asynccontextmanager
async def running(database_url: str, **overrides: Any) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        info = await nursery.start(
            serve, ServerConfig(database_url=database_url, grpc_port=0, **overrides)
        )
        yield info.port
        nursery.cancel_scope.cancel()


async def _still_serves(port: int) -> None:
    async with open_channel("127.0.0.1", port) as channel:
        reply = await channel.unary(
            pb.WorkflowServiceStub(channel.raw).list_workflows, pb.ListWorkflowsRequest(limit=1)
        )
        assert len(reply.workflows) <= 1


async def _send_raw(port: int, data: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(data)
        with trio.move_on_after(0.3):
            await stream.receive_some(65536)
    except (trio.BrokenResourceError, OSError):
        pass  # the server hung up on us: that is a fine answer to garbage
    finally:
        await stream.aclose()


async def test_garbage_and_truncated_frames_leave_the_server_serving(database_url: str) -> None:
    with trio.fail_after(30):
        async with running(database_url) as port:
            junk = bytes(range(256)) * 8
            await _send_raw(port, junk)
            await _send_raw(port, PREFACE)  # preface and then silence
            await _send_raw(port, PREFACE + b"\x00\x00\x12\x04\x00\x00\x00")  # truncated SETTINGS
            # A HEADERS frame claiming far more bytes than are sent.
            await _send_raw(
                port,
                PREFACE
                + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                + b"\x00\xff\xff\x01\x04\x00\x00\x00\x01abc",
            )
            await _send_raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with socket.create_connection(("127.0.0.1", port)) as sock:  # half-open, abandoned
                sock.sendall(PREFACE[:10])
            await _still_serves(port)


names = st.text(min_size=0, max_size=600)
payloads = st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
)


async def test_generated_request_fields_get_readable_errors(database_url: str) -> None:
    readable = (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted)
    with trio.fail_after(120):
        async with running(database_url) as port, open_channel("127.0.0.1", port) as channel:
            stub = pb.WorkflowServiceStub(channel.raw)
            workers = pb.WorkerServiceStub(channel.raw)
            seen: list[str] = []

            async def probe(wtype: str, wid: str, data: bytes, run_id: str, token: int) -> None:
                calls = [
                    (
                        stub.start_workflow,
                        pb.StartWorkflowRequest(workflow_type=wtype, workflow_id=wid, input=data),
                    ),
                    (
                        stub.describe_workflow,
                        pb.DescribeWorkflowRequest(workflow_id=wid, run_id=run_id),
                    ),
                    (
                        stub.signal_workflow,
                        pb.SignalWorkflowRequest(workflow_id=wid, name=wtype, payload=data),
                    ),
                    (
                        workers.record_heartbeat,
                        pb.RecordHeartbeatRequest(task_id=run_id, lease_token=token),
                    ),
                    (
                        workers.complete_activity_task,
                        pb.CompleteActivityTaskRequest(
                            task_id=run_id, lease_token=token, result=data
                        ),
                    ),
                ]
                for method, request in calls:
                    try:
                        await channel.unary(method, request)
                    except readable as exc:
                        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
                        seen.append(type(exc).__name__)
                    except EverrunsError as exc:  # anything else is a server bug
                        raise AssertionError(f"{method.__name__}: {exc!r}") from exc

            examples: list[tuple[str, str, bytes, str, int]] = []

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
            @given(
                names,
                names,
                payloads,
                st.one_of(st.just(""), st.uuids().map(str), names),
                st.integers(-(2**63), 2**63 - 1),
            )
            def collect(wtype: str, wid: str, data: bytes, run_id: str, token: int) -> None:
                examples.append((wtype, wid, data, run_id, token))

            collect()
            for example in examples:
                await probe(*example)
            await _still_serves(port)
            assert "InvalidArgument" in seen


async def test_quotes_sql_and_unicode_are_stored_verbatim(database_url: str) -> None:
    weird = 'Robert\'); DROP TABLE durable_workflow_events;-- "ünïcødé" 🚀 \\x00'
    payload = json.dumps({"k": weird, "n": 2**70, "f": 0.1, "l": [None, True]}).encode()
    with trio.fail_after(30):
        async with running(database_url) as port, open_channel("127.0.0.1", port) as channel:
            stub = pb.WorkflowServiceStub(channel.raw)
            await channel.unary(
                stub.start_workflow,
                pb.StartWorkflowRequest(workflow_type=weird, workflow_id=weird, input=payload),
            )
            described = (
                await channel.unary(
                    stub.describe_workflow, pb.DescribeWorkflowRequest(workflow_id=weird)
                )
            ).workflow
            assert described.workflow_type == weird
            assert described.input == payload  # byte for byte
            await channel.unary(
                stub.signal_workflow,
                pb.SignalWorkflowRequest(workflow_id=weird, name=weird, payload=payload),
            )
            history = await channel.unary(stub.get_history, pb.GetHistoryRequest(workflow_id=weird))
            signal = json.loads(history.events[-1].data)
            assert signal["name"] == weird and signal["payload"]["n"] == 2**70


async def test_tls_with_a_certificate_made_here(database_url: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    with trio.fail_after(30):
        async with running(database_url, tls_cert=str(cert_file), tls_key=str(key_file)) as port:
            async with open_channel("127.0.0.1", port, tls=client_tls(str(ca_file))) as channel:
                reply = await channel.unary(
                    pb.WorkflowServiceStub(channel.raw).list_workflows, pb.ListWorkflowsRequest()
                )
                assert reply.workflows == []
            async with open_channel("127.0.0.1", port) as plain:  # no TLS: refused
                with pytest.raises(ServerUnavailable):
                    await plain.unary(
                        pb.WorkflowServiceStub(plain.raw).list_workflows,
                        pb.ListWorkflowsRequest(),
                        timeout=3,
                    )
            async with open_channel("127.0.0.1", port, tls=client_tls(None)) as untrusted:
                with pytest.raises(ServerUnavailable):
                    await untrusted.unary(
                        pb.WorkflowServiceStub(untrusted.raw).list_workflows,
                        pb.ListWorkflowsRequest(),
                        timeout=3,
                    )


def test_channel_type_is_exported() -> None:
    assert RpcChannel.__name__ == "RpcChannel"
