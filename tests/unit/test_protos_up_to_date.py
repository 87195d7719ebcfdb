"""Guards the committed gRPC code: it matches the .proto files, and it is the contract we expect.

`scripts/gen-protos --check` must pass on the committed tree and must fail on a tampered copy;
the generated messages must round-trip exactly (payload bytes and 64-bit lease tokens above all),
and the stubs and server bases must expose the methods the rpc layer is written against. These
tests never write to the source tree: the tampering happens in a throwaway copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns._proto.everruns import v1 as pb

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen-protos"
OUT_OF_DATE = "generated protobuf code is out of date: run scripts/gen-protos"

WORKER_METHODS = {
    "register_worker",
    "worker_heartbeat",
    "poll_tasks",
    "record_heartbeat",
    "complete_workflow_task",
    "complete_workflow_tasks",
    "fail_workflow_task",
    "complete_activity_task",
    "complete_activity_tasks",
    "fail_activity_task",
    "stream_cancellations",
}
WORKFLOW_METHODS = {
    "start_workflow",
    "start_workflows",
    "signal_workflow",
    "cancel_workflow",
    "describe_workflow",
    "get_history",
    "list_workflows",
    "await_result",
    "list_dead_letters",
    "requeue_dead_letter",
    "list_workers",
    "list_circuit_breakers",
    "reset_circuit_breaker",
    "create_schedule",
    "describe_schedule",
    "list_schedules",
    "pause_schedule",
    "delete_schedule",
    "trigger_schedule",
}

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _require_generator() -> None:
    pytest.importorskip(
        "grpc_tools", reason="grpcio-tools is not installed; install the [test] extra to run this"
    )


def _run_check(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        [str(root / "scripts" / "gen-protos"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _copy_tree(dest: Path) -> Path:
    """Copies what gen-protos reads and checks into `dest`; returns the copy's _proto dir."""
    (dest / "scripts").mkdir()
    shutil.copy2(SCRIPT, dest / "scripts" / "gen-protos")
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(ROOT / "protos", dest / "protos")
    proto_dir = dest / "src" / "everruns" / "_proto"
    shutil.copytree(
        ROOT / "src" / "everruns" / "_proto",
        proto_dir,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return proto_dir


def test_committed_code_is_up_to_date() -> None:
    _require_generator()
    result = _run_check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "betterproto2-compiler 0.10.1" in result.stdout


def test_check_fails_on_edited_generated_code(tmp_path: Path) -> None:
    _require_generator()
    proto_dir = _copy_tree(tmp_path)
    module = proto_dir / "everruns" / "v1" / "__init__.py"
    module.write_text(module.read_text() + "\n# edited by hand\n")

    result = _run_check(tmp_path)

    assert result.returncode == 1
    assert OUT_OF_DATE in result.stderr
    assert "edited by hand" in result.stderr


def test_check_fails_when_a_proto_changes(tmp_path: Path) -> None:
    _require_generator()
    _copy_tree(tmp_path)
    common = tmp_path / "protos" / "everruns" / "v1" / "common.proto"
    common.write_text(common.read_text() + "\nmessage AddedLater {}\n")

    result = _run_check(tmp_path)

    assert result.returncode == 1
    assert OUT_OF_DATE in result.stderr


def test_check_fails_on_a_stray_file(tmp_path: Path) -> None:
    _require_generator()
    proto_dir = _copy_tree(tmp_path)
    (proto_dir / "stray.py").write_text("")

    result = _run_check(tmp_path)

    assert result.returncode == 1
    assert OUT_OF_DATE in result.stderr


def test_services_expose_the_contract_methods() -> None:
    for cls, expected in [
        (pb.WorkerServiceBase, WORKER_METHODS),
        (pb.WorkerServiceStub, WORKER_METHODS),
        (pb.WorkflowServiceBase, WORKFLOW_METHODS),
        (pb.WorkflowServiceStub, WORKFLOW_METHODS),
    ]:
        public = {name for name in vars(cls) if not name.startswith("_")}
        assert public == expected, cls.__name__


def test_server_bases_route_every_rpc() -> None:
    routes = set(pb.WorkerServiceBase().__mapping__())
    assert routes == {
        f"/everruns.v1.WorkerService/{''.join(p.title() for p in m.split('_'))}"
        for m in WORKER_METHODS
    }
    routes = set(pb.WorkflowServiceBase().__mapping__())
    assert routes == {
        f"/everruns.v1.WorkflowService/{''.join(p.title() for p in m.split('_'))}"
        for m in WORKFLOW_METHODS
    }


@given(
    commands=st.binary(),
    lease_token=INT64,
    seen_sequence=INT64,
    claim_time=st.floats(allow_nan=False),
    task_id=st.text(),
)
def test_complete_workflow_task_request_round_trips(
    commands: bytes, lease_token: int, seen_sequence: int, claim_time: float, task_id: str
) -> None:
    msg = pb.CompleteWorkflowTaskRequest(
        task_id=task_id,
        lease_token=lease_token,
        worker_id="w-1",
        seen_sequence=seen_sequence,
        commands=commands,
        claim_time=claim_time,
    )

    back = pb.CompleteWorkflowTaskRequest.parse(bytes(msg))

    assert back == msg
    assert back.commands == commands
    assert back.lease_token == lease_token


def test_nested_messages_round_trip() -> None:
    event = pb.HistoryEvent(
        sequence_num=7, type="activity_completed", data=b'{"result": 12345678901234567890}'
    )
    task = pb.Task(
        task_id="t-1",
        kind="workflow",
        lease_token=2**62 + 1,
        history=[event],
        heartbeat_details=b"null",
    )
    poll = pb.PollTasksResponse(tasks=[task])

    back = pb.PollTasksResponse.parse(bytes(poll))

    assert back.tasks[0].history[0].data == b'{"result": 12345678901234567890}'
    assert back.tasks[0].lease_token == 2**62 + 1
    assert back == poll


def test_unset_message_field_is_none_and_empty_request_is_empty() -> None:
    # The rpc layer relies on these defaults to tell "not set" apart.
    assert pb.AwaitResultResponse().workflow is None
    assert bytes(pb.ListCircuitBreakersRequest()) == b""
    assert pb.WorkflowDescription().result == b""
    assert pb.StartWorkflowsRequest.parse(b"").requests == []
