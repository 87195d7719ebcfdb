"""The `everruns` command without a server: parsing, exit codes, rendering, and the client's
retry/long-poll logic against a fake channel (no network, autojump clock)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from everruns import cli
from everruns._proto.everruns import v1 as pb
from everruns.client import (
    MAX_PAGE_SIZE,
    Client,
    HistoryEvent,
    PendingActivity,
    WorkflowDescription,
    WorkflowSummary,
    parse_address,
)
from everruns.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PayloadError,
    RpcError,
    ServerUnavailable,
    WorkflowFailed,
)

T0 = datetime(2025, 3, 1, 12, 0, 5, tzinfo=UTC)

LEAVES = [
    ["workflow", "start"],
    ["workflow", "list"],
    ["workflow", "show"],
    ["workflow", "history"],
    ["workflow", "result"],
    ["workflow", "signal"],
    ["workflow", "cancel"],
    ["workers", "list"],
    ["dlq", "list"],
    ["dlq", "requeue"],
    ["breakers", "list"],
    ["breakers", "reset"],
    ["server"],
    ["migrate"],
    ["worker"],
]


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to connect fail the test: bad input must be refused before that."""

    def connect(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the CLI tried to connect")

    monkeypatch.setattr(cli.Client, "connect", connect)


# --- parsing -------------------------------------------------------------------------------


def test_parse_workflow_start() -> None:
    args = cli.build_parser().parse_args(
        ["workflow", "start", "checkout", "--input", '{"a": 1}', "--id", "o-1", "--wait"]
    )
    assert (args.group, args.verb, args.type, args.id, args.wait) == (
        "workflow",
        "start",
        "checkout",
        "o-1",
        True,
    )
    assert args.input == '{"a": 1}'
    assert args.json is False and args.address is None


def test_global_options_before_or_after_the_verb() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--json", "--address", "h:1", "workflow", "list"])
    after = parser.parse_args(["workflow", "list", "--json", "--address", "h:1"])
    neither = parser.parse_args(["workflow", "list"])
    assert (before.json, before.address) == (True, "h:1")
    assert (after.json, after.address) == (True, "h:1")
    assert (neither.json, neither.address) == (False, None)


def test_parse_list_defaults_and_filters() -> None:
    args = cli.build_parser().parse_args(
        ["workflow", "list", "--type", "t", "--status", "failed", "--limit", "7"]
    )
    assert (args.type, args.status, args.limit, args.page_token) == ("t", "failed", 7, None)
    assert cli.build_parser().parse_args(["workflow", "list"]).limit == 50


def test_parse_other_groups() -> None:
    p = cli.build_parser()
    assert p.parse_args(["workers", "list", "--all"]).all is True
    assert p.parse_args(["dlq", "requeue", "17"]).dead_letter_id == "17"
    assert p.parse_args(["breakers", "reset", "charge"]).key == "charge"
    assert p.parse_args(["worker", "a.b", "c"]).modules == ["a.b", "c"]
    signal = p.parse_args(["workflow", "signal", "w", "go", "--payload", "1", "--run", "r"])
    assert (signal.workflow_id, signal.name, signal.payload, signal.run) == ("w", "go", "1", "r")
    for verb in (["show", "w"], ["history", "w"], ["result", "w"], ["cancel", "w"]):
        assert p.parse_args(["workflow", *verb]).run is None
        assert p.parse_args(["workflow", *verb, "--run", "r"]).run == "r"


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: " ".join(leaf))
def test_every_command_has_help_with_an_example(
    leaf: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*leaf, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"everruns {leaf[0]}" in out


def test_top_level_help_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for code in range(7):
        assert f"  {code}  " in out
    for group in ("workflow", "workers", "dlq", "breakers", "server", "migrate", "worker"):
        assert group in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["workflow"],
        ["workflow", "frobnicate"],
        ["workflow", "start"],
        ["workflow", "list", "--limit", "0"],
        ["workflow", "list", "--limit", "many"],
        ["workflow", "list", "--status", "sleeping"],
        ["workflow", "result", "w", "--timeout", "-1"],
        ["workflow", "result", "w", "--timeout", "nan"],
        # Once refused only after the message was queued (a ValueError traceback).
        ["message", "send", "s", "hi", "--timeout", "-1"],
        ["message", "send", "s", "hi", "--timeout", "nan"],
        ["message", "send", "s", "hi", "--timeout", "inf"],
        ["workflow", "signal", "w"],
        ["dlq", "list", "--limit", "-3"],
        ["workflow", "list", "--bogus"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], no_server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["workflow", "start", "t", "--input", "{bad"], "--input is not valid JSON"),
        (["workflow", "start", "t", "--input", "hello"], "--input is not valid JSON"),
        (["workflow", "signal", "w", "s", "--payload", "[1,"], "--payload is not valid JSON"),
        (["workflow", "start", "t", "--input", "@/nonexistent/x.json"], "cannot read --input"),
        (["--address", "no-port", "workflow", "list"], "is not host:port"),
        (["workflow", "list", "--address", "h:99999"], "is not host:port"),
        # Once silently ignored: a start that did not wait, and the latest run.
        (["workflow", "start", "t", "--timeout", "5"], "--timeout applies to --wait"),
        (["workflow", "show", "w", "--run", ""], "--run needs a run id"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_connecting(
    argv: list[str], needle: str, no_server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("everruns: ") and needle in lines[0]
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["workflow", "list", "--limit", str(MAX_PAGE_SIZE + 1)],
        # Past int32 the wire wraps: 2**31 arrives negative, 2**32 as 0 (the server's default).
        ["workflow", "list", "--limit", str(2**31)],
        ["dlq", "list", "--limit", str(2**32)],
    ],
)
def test_a_limit_past_the_largest_page_is_refused_before_connecting(
    argv: list[str], no_server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    assert f"must be at most {MAX_PAGE_SIZE}" in capsys.readouterr().err
    assert cli.build_parser().parse_args([*argv[:2], "--limit", str(MAX_PAGE_SIZE)]).limit == (
        MAX_PAGE_SIZE
    )


@pytest.mark.parametrize(
    "leaf", [["workflow", "start"], ["workflow", "result"], ["message", "send"]], ids=" ".join
)
def test_every_timeout_option_gives_0_the_same_meaning(
    leaf: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*leaf, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0: do not wait, exit 6 unless already ended" in text


def test_input_from_file(tmp_path: Any) -> None:
    path = tmp_path / "in.json"
    path.write_text('{"n": 12345678901234567890}')
    assert cli._json_argument("--input", f"@{path}") == {"n": 12345678901234567890}


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9001") == ("127.0.0.1", 9001)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("", "host", ":80", "h:0", "h:x", "h:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad)


@pytest.mark.parametrize(
    "address",
    ["h:\u00b2", "h:9\u00b2", "h:\u0663", "h:\uff19\uff10\uff10\uff11"],
    ids=["superscript-2", "9-superscript-2", "arabic-indic-3", "fullwidth-9001"],
)
def test_a_port_of_non_ascii_digits_is_a_config_error(address: str) -> None:
    """str.isdigit() holds for '²' (int() then raised a bare ValueError) and for other
    scripts' digits (which int() read as a port)."""
    with pytest.raises(ConfigError, match="is not host:port"):
        parse_address(address, setting="--address")


# --- rendering ------------------------------------------------------------------------------


def test_format_table_aligns_columns() -> None:
    text = cli.format_table(("A", "LONGER"), [("xxxx", "1"), ("y", "22")])
    assert text.splitlines() == ["A     LONGER", "xxxx  1", "y     22"]


cell = st.text(alphabet=st.characters(blacklist_categories=["Cc", "Zl", "Zp"]), max_size=12)


@given(
    st.integers(1, 5).flatmap(
        lambda n: st.tuples(
            st.lists(cell, min_size=n, max_size=n),
            st.lists(st.lists(cell, min_size=n, max_size=n), max_size=6),
        )
    )
)
def test_format_table_properties(table: tuple[list[str], list[list[str]]]) -> None:
    headers, rows = table
    lines = cli.format_table(headers, rows).split("\n")
    assert len(lines) == len(rows) + 1
    assert all(line == line.rstrip(" ") for line in lines)
    # Every column starts at the same offset on every line.
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for stripped, row in zip(lines, [headers, *rows], strict=True):
        line = stripped.ljust(sum(widths) + 2 * len(widths))  # only trailing blanks were cut
        offset = 0
        for i, value in enumerate(row):
            assert line[offset : offset + len(value)] == value
            offset += widths[i] + 2


def _description(**changes: Any) -> WorkflowDescription:
    base: dict[str, Any] = dict(
        workflow_id="order-42",
        run_id="run-1",
        workflow_type="checkout",
        status="running",
        input={"order": 42},
        result=None,
        error=None,
        created_at=T0,
        updated_at=T0,
        completed_at=None,
        stuck_reason=None,
        parent_workflow_id=None,
        pending_activities=(),
        waiting_for_worker=False,
    )
    base.update(changes)
    return WorkflowDescription(**base)


def test_render_description_shows_attempts_and_errors() -> None:
    errors = (
        {"type": "ValueError", "message": "card declined", "traceback": "..."},
        {"type": "TimeoutError", "message": "slow\nsecond line"},
    )
    activity = PendingActivity(
        activity_id="1",
        activity_type="charge",
        status="pending",
        attempt=2,
        max_attempts=5,
        last_error=errors[-1],
        error_history=errors,
        claimed_by=None,
    )
    text = cli.render_description(_description(pending_activities=(activity,)))
    assert "order-42" in text and "checkout" in text and "running" in text
    assert '{"order":42}' in text
    assert "2/5" in text
    assert "attempt 1: ValueError: card declined" in text
    assert "attempt 2: TimeoutError: slow" in text
    assert "second line" not in text
    assert "2025-03-01 12:00:05Z" in text


def test_render_description_says_until_when_a_retry_is_held_back() -> None:
    held = PendingActivity(
        activity_id="1",
        activity_type="charge",
        status="pending",
        attempt=1,
        max_attempts=5,
        last_error={"type": "everruns.errors.RetryAfter", "message": "rate limited"},
        error_history=(),
        claimed_by=None,
        next_attempt_at=datetime(2025, 3, 1, 13, 30, tzinfo=UTC),
    )
    due = attrs.evolve(held, activity_id="2", next_attempt_at=None)
    text = cli.render_description(_description(pending_activities=(held, due)))
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "pending until 2025-03-01 13:30:00Z" in rows["1"]
    assert "until" not in rows["2"] and "pending" in rows["2"]


def test_render_description_says_waiting_for_worker_and_stuck() -> None:
    waiting = cli.render_description(_description(status="pending", waiting_for_worker=True))
    assert "no live worker serves" in waiting
    stuck = cli.render_description(_description(stuck_reason="non-determinism at event 7"))
    assert "non-determinism at event 7" in stuck
    failed = cli.render_description(
        _description(
            status="failed", error={"type": "KeyError", "message": "'x'", "traceback": "tb line"}
        )
    )
    assert "KeyError: 'x'" in failed and "tb line" in failed


def test_render_workflows_and_page_token() -> None:
    runs = [
        WorkflowSummary("a", "r1", "t", "completed", T0, T0),
        WorkflowSummary("bbbbbb", "r2", "t", "running", T0, None),
    ]
    text = cli.render_workflows(runs, "tok")
    lines = text.splitlines()
    assert lines[0].split() == [
        "WORKFLOW",
        "ID",
        "RUN",
        "ID",
        "TYPE",
        "STATUS",
        "CREATED",
        "COMPLETED",
    ]
    assert lines[1].split()[:4] == ["a", "r1", "t", "completed"]
    assert lines[1].index("r1") == lines[0].index("RUN ID") == lines[2].index("r2")
    assert lines[2].endswith("-")
    assert text.endswith("--page-token tok")
    assert cli.render_workflows([], None) == "(no workflows)"


def test_render_history_hides_tracebacks() -> None:
    events = [
        HistoryEvent(1, "workflow_started", {"type": "workflow_started", "input": 1}, T0),
        HistoryEvent(
            2,
            "workflow_failed",
            {"type": "workflow_failed", "error": {"type": "E", "traceback": "long\ntrace"}},
            T0,
        ),
    ]
    text = cli.render_history(events)
    assert "workflow_started" in text and '{"input":1}' in text
    assert "long" not in text and "…" in text


def test_to_json_is_plain_json() -> None:
    doc = cli.to_json({"workflow": _description(completed_at=T0)})
    again = json.loads(json.dumps(doc))
    assert again["workflow"]["created_at"] == "2025-03-01T12:00:05+00:00"
    assert again["workflow"]["input"] == {"order": 42}
    assert again["workflow"]["pending_activities"] == []


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ServerUnavailable("x"), 4),
        (NotFound("x"), 3),
        (FailedPrecondition("x"), 5),
        (InvalidArgument("x"), 2),
        (PayloadError("x"), 2),
        (ConfigError("x"), 2),
        (TimeoutError("x"), 6),
        (WorkflowFailed("x", status="failed"), 1),
        (RpcError("x", status="INTERNAL"), 1),
    ],
)
def test_exit_code_for(exc: BaseException, code: int) -> None:
    assert cli.exit_code_for(exc) == code


# --- the CLI against a fake client -------------------------------------------------------------


class FakeHandle:
    def __init__(self, behaviour: dict[str, Any], workflow_id: str) -> None:
        self.behaviour = behaviour
        self.workflow_id = workflow_id
        self.run_id = "run-1"
        self.created = True

    async def _act(self, name: str) -> Any:
        outcome = self.behaviour.get(name)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def result(self, timeout: float | None = None) -> Any:
        return await self._act("result")

    async def signal(self, name: str, payload: Any = None) -> None:
        self.behaviour["signalled"] = (name, payload)
        await self._act("signal")

    async def cancel(self, reason: str = "") -> None:
        await self._act("cancel")

    async def describe(self) -> Any:
        return await self._act("describe")

    async def history(self) -> Any:
        return await self._act("history")


class FakeClient:
    def __init__(self, behaviour: dict[str, Any]) -> None:
        self.behaviour = behaviour
        self.address = "fake:1"

    def get_handle(self, workflow_id: str, run_id: str | None = None) -> FakeHandle:
        return FakeHandle(self.behaviour, workflow_id)

    async def start_workflow(
        self, workflow: str, input: Any = None, *, workflow_id: Any = None
    ) -> FakeHandle:
        self.behaviour["started"] = (workflow, input, workflow_id)
        return FakeHandle(self.behaviour, workflow_id or "generated")

    async def list_workflows(self, **kwargs: Any) -> Any:
        outcome = self.behaviour.get("list")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    behaviour: dict[str, Any] = {}

    @asynccontextmanager
    async def connect(address: str | None = None, **kwargs: Any) -> AsyncIterator[FakeClient]:
        behaviour["address"] = address
        yield FakeClient(behaviour)

    monkeypatch.setattr(cli.Client, "connect", connect)
    monkeypatch.delenv("GRPC_ADDRESS", raising=False)
    return behaviour


def test_start_passes_decoded_input(
    fake: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["--json", "workflow", "start", "t", "--input", '{"n": 12345678901234567890}', "--id", "x"]
    )
    assert code == 0
    assert fake["started"] == ("t", {"n": 12345678901234567890}, "x")
    assert json.loads(capsys.readouterr().out) == {
        "workflow_id": "x",
        "run_id": "run-1",
        "created": True,
    }


def test_signal_payload(fake: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["workflow", "signal", "w", "go", "--payload", "[1, null]"]) == 0
    assert fake["signalled"] == ("go", [1, None])
    assert "go" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("verb", "exc", "code"),
    [
        (["workflow", "show", "w"], NotFound("no workflow 'w'"), 3),
        (["workflow", "history", "w"], NotFound("no workflow 'w'"), 3),
        (["workflow", "cancel", "w"], FailedPrecondition("workflow 'w' has ended: completed"), 5),
        (["workflow", "signal", "w", "s"], FailedPrecondition("run has ended as cancelled"), 5),
        (["workflow", "show", "w"], ServerUnavailable("x: control plane unreachable: refused"), 4),
        (["workflow", "list"], RpcError("boom", status="INTERNAL"), 1),
        (["workflow", "result", "w", "--timeout", "1"], TimeoutError("still open"), 6),
    ],
)
def test_errors_map_to_exit_codes_with_one_line(
    verb: list[str],
    exc: BaseException,
    code: int,
    fake: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in ("describe", "history", "cancel", "signal", "list", "result"):
        fake[key] = exc
    assert cli.main(verb) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("everruns: "), captured.err
    if code == 4:
        assert lines[0] == (
            "everruns: control plane at 127.0.0.1:9001 unreachable; is `python -m everruns.server` "
            "running? (set --address or GRPC_ADDRESS)"
        )


def test_json_output_refuses_a_value_json_cannot_carry_in_one_line(
    fake: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A payload stored before the control plane refused numbers beyond a double's range
    reads as infinity: `--json` says so in one line instead of printing `Infinity`."""
    stored = _pb_description("running", input=b'{"amount": 1e400}')
    fake["describe"] = WorkflowDescription.from_proto(stored)
    assert fake["describe"].input == {"amount": math.inf}
    assert cli.main(["--json", "workflow", "show", "w"]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("everruns: the reply cannot be printed as JSON")
    assert "leave out --json" in lines[0]


def test_unreachable_line_names_the_address(
    fake: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake["list"] = ServerUnavailable("x: control plane unreachable: refused")
    assert cli.main(["workflow", "list", "--address", "10.1.2.3:7000"]) == 4
    assert "control plane at 10.1.2.3:7000 unreachable" in capsys.readouterr().err
    assert fake["address"] == "10.1.2.3:7000"


def test_failed_precondition_without_status_gets_final_status(
    fake: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake["cancel"] = FailedPrecondition("the run has ended")
    fake["describe"] = _description(status="completed", completed_at=T0)
    assert cli.main(["workflow", "cancel", "w"]) == 5
    assert "is completed" in capsys.readouterr().err


def test_result_failed_exit_1(fake: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    error = {"type": "ValueError", "message": "bad"}
    fake["result"] = WorkflowFailed(
        "workflow 'w' failed: ValueError: bad", status="failed", error=error
    )
    assert cli.main(["workflow", "result", "w"]) == 1
    assert "ValueError: bad" in capsys.readouterr().err
    assert cli.main(["--json", "workflow", "result", "w"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "failed" and doc["error"] == error


def test_result_completed_prints_json(
    fake: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake["result"] = {"total": 2**70}
    assert cli.main(["workflow", "result", "w"]) == 0
    assert json.loads(capsys.readouterr().out) == {"total": 2**70}


async def test_message_send_timeout_0_gives_up_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Like every --timeout, 0 does not wait (it once meant "no timeout" and followed forever)."""

    class Turn:
        turn = 1
        workflow_id = "session:s:turn:1"

        async def stream(self) -> Any:
            await trio.sleep_forever()
            yield None

    class TurnClient:
        async def send_message(self, *args: Any, **kwargs: Any) -> Turn:
            return Turn()

    args = cli.build_parser().parse_args(["message", "send", "s", "hi", "--timeout", "0"])
    cli._prepare(args)
    with trio.fail_after(5):
        code = await cli._message_send(TurnClient(), args, cli.Output(False))  # type: ignore[arg-type]
    assert code == cli.EXIT_TIMEOUT
    assert "still running after 0 s" in capsys.readouterr().out


def test_show_json_and_table(fake: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    fake["describe"] = _description()
    assert cli.main(["workflow", "show", "order-42", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["workflow_id"] == "order-42" and doc["status"] == "running"
    assert cli.main(["workflow", "show", "order-42"]) == 0
    assert capsys.readouterr().out.startswith("workflow   order-42")


def test_worker_delegation_reports_missing_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> Any:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    assert cli.main(["worker", "app"]) == 1
    assert "worker is not available" in capsys.readouterr().err


def test_worker_delegation_passes_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class Module:
        @staticmethod
        def main(argv: list[str]) -> int:
            seen.append(argv)
            return 7

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Module)
    monkeypatch.setenv("GRPC_ADDRESS", "old:1")  # monkeypatch restores the original at teardown
    assert cli.main(["--address", "h:5", "worker", "a", "b"]) == 7
    assert seen == [["a", "b"]]
    assert os.environ["GRPC_ADDRESS"] == "h:5"


# --- the client's retries and long-poll, against a fake channel --------------------------------


class FakeChannel:
    """Answers `RpcChannel.unary` from a script of replies and exceptions, recording calls."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[tuple[str, Any, float | None]] = []
        self.raw = None
        self.address = "fake:1"

    async def unary(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        self.calls.append((method.__name__, request, timeout))
        await trio.sleep(0.01)
        outcome = self.script.pop(0) if self.script else ServerUnavailable("script exhausted")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _pb_description(status: str, **fields: Any) -> Any:
    return pb.WorkflowDescription(
        workflow_id="w", run_id="run-9", workflow_type="t", status=status, created_at=1e9, **fields
    )


async def test_reads_retry_unavailable_then_give_up(autojump_clock: Any) -> None:
    channel = FakeChannel([ServerUnavailable("down")] * 10)
    client = Client(channel)
    start = trio.current_time()
    with pytest.raises(ServerUnavailable):
        await client.get_handle("w").describe()
    assert len(channel.calls) == 4
    assert trio.current_time() - start < 3


async def test_read_succeeds_after_a_transient_failure(autojump_clock: Any) -> None:
    reply = pb.DescribeWorkflowResponse(
        workflow=_pb_description("running", waiting_for_worker=True)
    )
    channel = FakeChannel([ServerUnavailable("blip"), reply])
    description = await Client(channel).get_handle("w").describe()
    assert description.status == "running" and description.waiting_for_worker
    assert description.created_at == datetime.fromtimestamp(1e9, tz=UTC)
    assert description.completed_at is None and description.result is None


async def test_a_signal_is_not_retried_a_cancel_is(autojump_clock: Any) -> None:
    # A signal delivered twice is two signals; a cancel made twice is one (idempotent).
    channel = FakeChannel([ServerUnavailable("down")] * 4)
    handle = Client(channel).get_handle("w")
    with pytest.raises(ServerUnavailable):
        await handle.signal("go", 1)
    assert [c[0] for c in channel.calls] == ["signal_workflow"]
    channel = FakeChannel([ServerUnavailable("down"), pb.CancelWorkflowResponse()])
    await Client(channel).get_handle("w", "r").cancel()
    assert [c[0] for c in channel.calls] == ["cancel_workflow"] * 2


async def test_start_retried_only_with_an_explicit_id(autojump_clock: Any) -> None:
    reply = pb.StartWorkflowResponse(workflow_id="x", run_id="r", created=True)
    channel = FakeChannel([ServerUnavailable("down"), reply])
    handle = await Client(channel).start_workflow("t", [1], workflow_id="x")
    assert (handle.workflow_id, handle.run_id, handle.created) == ("x", "r", True)
    assert len(channel.calls) == 2
    channel = FakeChannel([ServerUnavailable("down"), reply])
    with pytest.raises(ServerUnavailable):
        await Client(channel).start_workflow("t", [1])
    assert len(channel.calls) == 1


async def test_start_refuses_non_json_input_before_any_call() -> None:
    channel = FakeChannel([])
    client = Client(channel)
    with pytest.raises(PayloadError, match="set"):
        await client.start_workflow("t", {"items": {1, 2}})
    with pytest.raises(PayloadError, match="bytes"):
        await client.start_workflows([("t", 1), ("t", b"raw")])
    with pytest.raises(PayloadError):
        await client.get_handle("w").signal("s", object())
    with pytest.raises(InvalidArgument):
        await client.start_workflow("", 1)
    assert channel.calls == []


async def test_result_long_polls_until_done(autojump_clock: Any) -> None:
    open_reply = pb.AwaitResultResponse(done=False, workflow=_pb_description("running"))
    done_reply = pb.AwaitResultResponse(
        done=True, workflow=_pb_description("completed", result=b"12345678901234567890")
    )
    channel = FakeChannel([open_reply, ServerUnavailable("blip"), done_reply])
    result = await Client(channel).get_handle("w").result()
    assert result == 12345678901234567890
    requests = [c[1] for c in channel.calls]
    assert requests[0].run_id == "" and requests[0].wait_s == 20
    # Once the run is known, the wait stays on it even if a newer run appears.
    assert requests[-1].run_id == "run-9"


async def test_result_raises_workflow_failed(autojump_clock: Any) -> None:
    error = b'{"type": "ValueError", "message": "bad card", "traceback": "", "non_retryable": true}'
    failed = pb.AwaitResultResponse(done=True, workflow=_pb_description("failed", error=error))
    with pytest.raises(WorkflowFailed, match="ValueError: bad card") as info:
        await Client(FakeChannel([failed])).get_handle("w").result()
    assert info.value.status == "failed" and info.value.error["type"] == "ValueError"
    cancelled = pb.AwaitResultResponse(done=True, workflow=_pb_description("cancelled"))
    with pytest.raises(WorkflowFailed, match="cancelled") as info:
        await Client(FakeChannel([cancelled])).get_handle("w").result()
    assert info.value.status == "cancelled"


async def test_result_timeout_bounds_the_whole_wait(autojump_clock: Any) -> None:
    class Slow(FakeChannel):
        async def unary(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
            self.calls.append((method.__name__, request, timeout))
            await trio.sleep(request.wait_s)  # a server that answers "not done" after wait_s
            return pb.AwaitResultResponse(done=False, workflow=_pb_description("running"))

    channel = Slow([])
    start = trio.current_time()
    with pytest.raises(TimeoutError, match="still open after 45 s"):
        await Client(channel).get_handle("w").result(timeout=45)
    assert 45 <= trio.current_time() - start < 46
    assert [c[1].wait_s for c in channel.calls] == [20, 20, 5]


@pytest.mark.parametrize("timeout", [0, 0.005])
async def test_result_lets_its_poll_answer_however_short_the_timeout(
    timeout: float, autojump_clock: Any
) -> None:
    """The deadline once cancelled the poll whose reply said the run had completed."""
    done = pb.AwaitResultResponse(done=True, workflow=_pb_description("completed", result=b"7"))
    channel = FakeChannel([done])
    assert await Client(channel).get_handle("w").result(timeout=timeout) == 7
    assert len(channel.calls) == 1


async def test_result_with_timeout_0_looks_once_without_waiting(autojump_clock: Any) -> None:
    running = pb.AwaitResultResponse(done=False, workflow=_pb_description("running"))
    channel = FakeChannel([running])
    with pytest.raises(TimeoutError, match="still open after 0 s"):
        await Client(channel).get_handle("w").result(timeout=0)
    assert [c[1].wait_s for c in channel.calls] == [0]
    failed = pb.AwaitResultResponse(done=True, workflow=_pb_description("failed"))
    with pytest.raises(WorkflowFailed):
        await Client(FakeChannel([failed])).get_handle("w").result(timeout=0)


@pytest.mark.parametrize("timeout", [0, 0.5, 1])
async def test_result_reports_an_unreachable_server_not_a_timeout(
    timeout: float, autojump_clock: Any
) -> None:
    """A timeout shorter than the retries stops them and raises their ServerUnavailable (exit
    4), not TimeoutError ("still open", exit 6)."""
    channel = FakeChannel([ServerUnavailable("down")] * 10)
    start = trio.current_time()
    with pytest.raises(ServerUnavailable, match="down"):
        await Client(channel).get_handle("w").result(timeout=timeout)
    assert trio.current_time() - start < timeout + 0.05


@pytest.mark.parametrize("timeout", [-1, float("nan")])
async def test_result_refuses_a_negative_or_nan_timeout(timeout: float) -> None:
    channel = FakeChannel([])
    with pytest.raises(InvalidArgument, match="timeout"):
        await Client(channel).get_handle("w").result(timeout=timeout)
    assert channel.calls == []


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.list_workflows(limit=MAX_PAGE_SIZE + 1),
        lambda c: c.list_workflows(limit=2**31),
        lambda c: c.list_dead_letters(limit=2**32),
        lambda c: c.get_handle("w").history(page_size=2**32),
        lambda c: c.get_handle("w").history(page_size=-1),
    ],
    ids=["workflows-10001", "workflows-2**31", "dead-letters-2**32", "history-2**32", "history--1"],
)
async def test_a_page_size_the_wire_cannot_carry_is_refused_before_any_call(
    call: Callable[[Client], Awaitable[Any]], autojump_clock: Any
) -> None:
    """The int32 field wraps: 2**31 arrives negative, 2**32 as 0 (the server's default page)."""
    channel = FakeChannel([])
    with pytest.raises(InvalidArgument, match=f"to {MAX_PAGE_SIZE}"):
        await call(Client(channel))
    assert channel.calls == []


@pytest.mark.parametrize("name", ["checkout ", " checkout", "\tcheckout", " "])
async def test_start_refuses_a_type_no_worker_can_register(name: str) -> None:
    """The registry refuses names with surrounding spaces, so such a run would wait forever."""
    channel = FakeChannel([])
    client = Client(channel)
    with pytest.raises(InvalidArgument, match="surrounding spaces"):
        await client.start_workflow(name, 1)
    with pytest.raises(InvalidArgument, match="surrounding spaces"):
        await client.start_workflows([(name, 1)])
    assert channel.calls == []


async def test_history_pages_until_the_end(autojump_clock: Any) -> None:
    def event(n: int) -> Any:
        data = json.dumps({"type": "signal_received", "name": "s", "payload": n}).encode()
        return pb.HistoryEvent(sequence_num=n, type="signal_received", data=data, time=1e9 + n)

    pages = [
        pb.GetHistoryResponse(events=[event(1), event(2)], next_after=2),
        pb.GetHistoryResponse(events=[event(3)], next_after=0),
    ]
    channel = FakeChannel(pages)
    events = await Client(channel).get_handle("w", "r").history()
    assert [e.sequence_num for e in events] == [1, 2, 3]
    assert events[2].data["payload"] == 3 and events[0].time.tzinfo is UTC
    assert [c[1].after_sequence for c in channel.calls] == [0, 2]
    assert all(c[1].run_id == "r" for c in channel.calls)


async def test_history_of_the_latest_run_reads_every_page_from_one_run(
    autojump_clock: Any,
) -> None:
    """Without a run id the latest run is looked up once, and every page asks for that run."""
    pages = [
        pb.DescribeWorkflowResponse(workflow=_pb_description("running")),
        pb.GetHistoryResponse(events=[], next_after=0),
    ]
    channel = FakeChannel(pages)
    assert await Client(channel).get_handle("w").history() == []
    assert [c[0] for c in channel.calls] == ["describe_workflow", "get_history"]
    assert channel.calls[1][1].run_id == "run-9"


async def test_list_workflows_validates_and_returns_token(autojump_clock: Any) -> None:
    reply = pb.ListWorkflowsResponse(
        workflows=[
            pb.WorkflowSummary(
                workflow_id="a", run_id="r", workflow_type="t", status="pending", created_at=1e9
            )
        ],
        next_page_token="next",
    )
    client = Client(FakeChannel([reply, pb.ListWorkflowsResponse()]))
    runs, token = await client.list_workflows(status="pending", limit=1)
    assert [r.workflow_id for r in runs] == ["a"] and token == "next"
    assert runs[0].completed_at is None
    runs, token = await client.list_workflows(page_token="next")
    assert runs == [] and token is None
    with pytest.raises(InvalidArgument):
        await client.list_workflows(status="sleeping")
    with pytest.raises(InvalidArgument):
        await client.list_workflows(limit=0)


async def test_connect_lets_errors_of_the_block_through_unwrapped() -> None:
    # Client.connect opens the trio-asyncio loop here (none is open), whose nursery would wrap
    # the error in exception groups; callers must be able to write `except NotFound`.
    with pytest.raises(NotFound, match="gone"):
        async with Client.connect("127.0.0.1:1") as client:
            assert client.address == "127.0.0.1:1"
            raise NotFound("gone")


async def test_connect_refuses_a_bad_address(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="address='no-port'"):
        async with Client.connect("no-port"):
            pass
    monkeypatch.setenv("GRPC_ADDRESS", "also:bad")
    with pytest.raises(ConfigError, match="GRPC_ADDRESS"):
        async with Client.connect():
            pass


def test_python_dash_m_everruns_is_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "everruns", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: everruns")
