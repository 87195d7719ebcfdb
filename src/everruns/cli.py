"""The `everruns` command: an operator's view of workflows, schedules, workers, dead letters and
breakers.

It parses arguments (argparse), validates what it can before touching the network (JSON
arguments, numbers), calls the control plane through `everruns.Client`, and prints aligned
tables, or one JSON document with ``--json``. Every outcome maps to an exit code scripts can rely
on (see `EXIT_CODES`); an operator mistake prints one line, never a traceback. `server`,
`migrate` and `worker` only hand over to those programs' own entry points. It must hold no engine
logic and must not reach PostgreSQL itself.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

import attrs
import trio

from everruns.client import (
    DEFAULT_ADDRESS,
    MAX_PAGE_SIZE,
    CircuitBreakerInfo,
    Client,
    DeadLetterInfo,
    HistoryEvent,
    ScheduleInfo,
    WorkerInfo,
    WorkflowDescription,
    WorkflowSummary,
    describe_error,
    parse_address,
)
from everruns.domain.status import TERMINAL_WORKFLOW_STATUSES, WORKFLOW_STATUSES
from everruns.errors import (
    AlreadyExists,
    ConfigError,
    EverrunsError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PayloadError,
    ServerUnavailable,
    WorkflowFailed,
)

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PRECONDITION",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "build_parser",
    "format_table",
    "main",
    "render_breakers",
    "render_dead_letters",
    "render_description",
    "render_history",
    "render_schedules",
    "render_workers",
    "render_workflows",
    "to_json",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4
EXIT_PRECONDITION = 5
EXIT_TIMEOUT = 6
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader left

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "the operation failed (workflow failed or cancelled, server error)",
    EXIT_USAGE: "usage error or bad input (bad flag, invalid JSON, invalid value)",
    EXIT_NOT_FOUND: "no such workflow, run, schedule or dead letter",
    EXIT_UNREACHABLE: "the control plane is unreachable",
    EXIT_PRECONDITION: "the object's state forbids the operation (e.g. the workflow has ended, "
    "or the schedule id has another definition)",
    EXIT_TIMEOUT: "--timeout expired while the workflow was still open",
    EXIT_BROKEN_PIPE: "the reader of the output went away (e.g. `| head -1`)",
}

# What every --timeout means, 0 included: one meaning across the commands.
_TIMEOUT_HELP = "give up after S seconds (exit 6); 0: do not wait, exit 6 unless already ended"


class UsageError(Exception):
    """A command-line value is unusable; the message is the one line to print (exit 2)."""


# ---------------------------------------------------------------------------------------------
# Rendering: pure functions from values to text, so they are testable without a server.


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return rows under headers as left-aligned columns two spaces apart (no trailing blanks).

    A cell's line breaks are shown as ``⏎`` so that every row stays one line.
    """
    cells = [list(headers)] + [[str(c).replace("\n", "⏎") for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(" ") for row in cells
    ]
    return "\n".join(lines)


def render_workflows(runs: Sequence[WorkflowSummary], next_page_token: str | None) -> str:
    """The human form of `workflow list`."""
    if not runs:
        return "(no workflows)"
    table = format_table(
        ("WORKFLOW ID", "RUN ID", "TYPE", "STATUS", "CREATED", "COMPLETED"),
        [
            (
                r.workflow_id,
                r.run_id,
                r.workflow_type,
                r.status,
                _when(r.created_at),
                _when(r.completed_at),
            )
            for r in runs
        ],
    )
    if next_page_token:
        table += f"\n\nmore: --page-token {next_page_token}"
    return table


def _attempt_errors(errors: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for i, error in enumerate(errors, start=1):
        attempt = error.get("attempt", i)
        lines.append(f"attempt {attempt}: {describe_error(error)}")
    return lines


def render_description(d: WorkflowDescription) -> str:
    """The human form of `workflow show`: the run, then its pending activities and their errors."""
    fields: list[tuple[str, str]] = [
        ("workflow", d.workflow_id),
        ("run", d.run_id),
        ("type", d.workflow_type),
        ("status", d.status),
        ("created", _when(d.created_at)),
        ("updated", _when(d.updated_at)),
        ("completed", _when(d.completed_at)),
    ]
    if d.parent_workflow_id:
        fields.append(("parent", d.parent_workflow_id))
    fields.append(("input", _compact(d.input)))
    if d.status == "completed":
        fields.append(("result", _compact(d.result)))
    if d.continued_run_id:
        fields.append(("continued", f"as run {d.continued_run_id}"))
    if d.error:
        fields.append(("error", describe_error(d.error)))
    if d.stuck_reason:
        fields.append(("stuck", d.stuck_reason))
    if d.waiting_for_worker and d.is_open:
        fields.append(
            (
                "waiting",
                "no live worker serves a type this run needs; start one with "
                "`everruns worker MODULE`",
            )
        )
    if d.pending_timers:  # an open run asleep on ctx.sleep: when it wakes
        first = d.pending_timers[0]
        more = f" (and {len(d.pending_timers) - 1} more)" if len(d.pending_timers) > 1 else ""
        fields.append(("timer", f"{first.timer_id} fires {_when(first.fire_at)}{more}"))
    width = max(len(k) for k, _ in fields)
    lines = [f"{k.ljust(width)}  {v}" for k, v in fields]
    if d.error and d.error.get("traceback"):
        lines += ["", "traceback:", *("  " + t for t in str(d.error["traceback"]).splitlines())]
    if d.pending_activities:
        lines += ["", "pending activities:"]
        table = format_table(
            ("ID", "TYPE", "STATUS", "ATTEMPT", "CLAIMED BY", "LAST ERROR"),
            [
                (
                    a.activity_id,
                    a.activity_type,
                    a.status
                    if a.next_attempt_at is None
                    else f"{a.status} until {_when(a.next_attempt_at)}",
                    f"{a.attempt}/{a.max_attempts}",
                    a.claimed_by or "-",
                    describe_error(a.last_error) or "-",
                )
                for a in d.pending_activities
            ],
        )
        lines += ["  " + line for line in table.splitlines()]
        for a in d.pending_activities:
            if a.error_history:
                lines += ["", f"  errors of activity {a.activity_id} ({a.activity_type}):"]
                lines += ["    " + line for line in _attempt_errors(a.error_history)]
    return "\n".join(lines)


def _brief_event(data: dict[str, Any]) -> str:
    # Tracebacks are for `--json` and `workflow show`; in a one-line-per-event table they drown
    # the sequence of events.
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: "…" if k == "traceback" else strip(v) for k, v in value.items()}
        return value

    return _compact(strip({k: v for k, v in data.items() if k != "type"}))


def render_history(events: Sequence[HistoryEvent]) -> str:
    """The human form of `workflow history`."""
    if not events:
        return "(no events)"
    return format_table(
        ("SEQ", "TIME", "TYPE", "DETAILS"),
        [(str(e.sequence_num), _when(e.time), e.type, _brief_event(e.data)) for e in events],
    )


def render_workers(workers: Sequence[WorkerInfo]) -> str:
    """The human form of `workers list`."""
    if not workers:
        return "(no workers registered)"
    return format_table(
        ("WORKER ID", "STATUS", "LOAD", "HOST", "PID", "VERSION", "LAST HEARTBEAT", "SERVES"),
        [
            (
                w.id,
                w.status,
                f"{w.current_load}/{w.max_concurrency}",
                w.host or "-",
                str(w.pid or "-"),
                w.version or "-",
                _when(w.last_heartbeat_at),
                ", ".join([*w.workflow_types, *w.activity_types]) or "-",
            )
            for w in workers
        ],
    )


def render_dead_letters(letters: Sequence[DeadLetterInfo], next_page_token: str | None) -> str:
    """The human form of `dlq list`."""
    if not letters:
        return "(no dead letters)"
    table = format_table(
        ("ID", "WORKFLOW ID", "ACTIVITY", "ATTEMPTS", "DEAD AT", "REQUEUED AT", "LAST ERROR"),
        [
            (
                x.id,
                x.workflow_id,
                x.activity_type,
                str(x.attempts),
                _when(x.dead_at),
                _when(x.requeued_at),
                describe_error(x.last_error) or "-",
            )
            for x in letters
        ],
    )
    if next_page_token:
        table += f"\n\nmore: --page-token {next_page_token}"
    return table


def render_breakers(breakers: Sequence[CircuitBreakerInfo]) -> str:
    """The human form of `breakers list`."""
    if not breakers:
        return "(no circuit breakers have recorded state)"
    return format_table(
        ("KEY", "STATE", "FAILURES", "SUCCESSES", "PROBES", "OPENED AT", "UPDATED AT"),
        [
            (
                b.key,
                b.state,
                str(b.failure_count),
                str(b.success_count),
                str(b.probes_in_flight),
                _when(b.opened_at),
                _when(b.updated_at),
            )
            for b in breakers
        ],
    )


def render_schedules(schedules: Sequence[ScheduleInfo], next_page_token: str | None) -> str:
    """The human form of `schedule list`."""
    if not schedules:
        return "(no schedules)"
    table = format_table(
        ("ID", "SPEC", "TYPE", "OVERLAP", "NEXT", "LAST", "FIRED", "SKIPPED"),
        [
            (
                x.schedule_id,
                x.spec,
                x.workflow_type,
                x.overlap,
                "paused" if x.paused else _when(x.next_fire_at),
                _when(x.last_fired_at),
                str(x.fired_count),
                str(x.skipped_count),
            )
            for x in schedules
        ],
    )
    if next_page_token:
        table += f"\n\nmore: --page-token {next_page_token}"
    return table


def _next_firing(schedule: ScheduleInfo) -> str:
    if not schedule.paused:
        return _when(schedule.next_fire_at)
    return f"paused ({schedule.paused_reason})" if schedule.paused_reason else "paused"


def render_schedule(schedule: ScheduleInfo) -> str:
    """The human form of `schedule show` and of what the other schedule verbs answer."""
    rows = [
        ("schedule", schedule.schedule_id),
        (
            "spec",
            f"{schedule.spec} (UTC)" if not schedule.spec.startswith("@every") else schedule.spec,
        ),
        ("workflow type", schedule.workflow_type),
        ("input", _compact(schedule.input)),
        ("overlap", schedule.overlap),
        ("next firing", _next_firing(schedule)),
        ("last firing", _when(schedule.last_fired_at)),
        ("last workflow", schedule.last_workflow_id or "-"),
        ("fired / skipped", f"{schedule.fired_count} / {schedule.skipped_count}"),
        ("created", _when(schedule.created_at)),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def to_json(value: Any) -> Any:
    """Return ``value`` (attrs values, lists, dicts, datetimes) as plain JSON-ready data."""
    if attrs.has(type(value)):
        return {f.name: to_json(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Commands: each takes the connected client and the parsed arguments, prints, returns the code.


class Output:
    """Where a command writes: text for people, or exactly one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    @property
    def stream(self) -> TextIO:
        return sys.stdout  # looked up on every write so redirection (and capsys) works

    def emit(self, document: Any, text: str) -> None:
        if self.as_json:
            try:
                rendered = json.dumps(
                    to_json(document), ensure_ascii=False, indent=2, allow_nan=False
                )
            except ValueError as exc:  # NaN or infinity, never printed: they are not JSON
                raise PayloadError(
                    f"the reply cannot be printed as JSON: {exc} (a number in a payload beyond "
                    "a double's range reads as infinity); leave out --json to see it"
                ) from None
            print(rendered, file=self.stream)
        else:
            print(text, file=self.stream)


Command = Callable[[Client, argparse.Namespace, Output], Awaitable[int]]


async def _workflow_start(client: Client, args: argparse.Namespace, out: Output) -> int:
    handle = await client.start_workflow(args.type, args.input_value, workflow_id=args.id)
    doc: dict[str, Any] = {
        "workflow_id": handle.workflow_id,
        "run_id": handle.run_id,
        "created": handle.created,
    }
    if handle.created:
        text = f"started workflow {handle.workflow_id} (run {handle.run_id}, type {args.type})"
    else:
        text = (
            f"workflow {handle.workflow_id} is already open as run {handle.run_id}; "
            "not started again"
        )
    if not args.wait:
        out.emit(doc, text)
        return EXIT_OK
    if not out.as_json:
        print(text, file=out.stream, flush=True)
    try:
        result = await handle.result(timeout=args.timeout)
    except WorkflowFailed as exc:
        return _report_failure(out, doc, exc)
    except TimeoutError as exc:
        # Started all the same: say which run, so that a script does not start another.
        if out.as_json:
            doc.update(timed_out=True)
            out.emit(doc, text)
        print(f"everruns: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_TIMEOUT
    doc.update(status="completed", result=result)
    out.emit(doc, json.dumps(result, ensure_ascii=False, indent=2))
    return EXIT_OK


def _report_failure(out: Output, doc: dict[str, Any], exc: WorkflowFailed) -> int:
    doc.update(status=exc.status, error=exc.error or None)
    if out.as_json:
        out.emit(doc, "")
    else:
        print(f"everruns: {exc}", file=sys.stderr)
    return EXIT_FAILED


async def _workflow_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    runs, token = await client.list_workflows(
        workflow_type=args.type, status=args.status, limit=args.limit, page_token=args.page_token
    )
    out.emit({"workflows": runs, "next_page_token": token}, render_workflows(runs, token))
    return EXIT_OK


async def _workflow_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    description = await client.get_handle(args.workflow_id, args.run).describe()
    out.emit(description, render_description(description))
    return EXIT_OK


async def _workflow_history(client: Client, args: argparse.Namespace, out: Output) -> int:
    handle = client.get_handle(args.workflow_id, args.run)
    if handle.run_id is None:  # the latest run, looked up once: the output names its run
        handle = client.get_handle(args.workflow_id, (await handle.describe()).run_id)
    events = await handle.history()
    out.emit(
        {"workflow_id": args.workflow_id, "run_id": handle.run_id, "events": events},
        render_history(events),
    )
    return EXIT_OK


async def _workflow_result(client: Client, args: argparse.Namespace, out: Output) -> int:
    handle = client.get_handle(args.workflow_id, args.run)
    doc: dict[str, Any] = {"workflow_id": args.workflow_id, "run_id": args.run}
    try:
        result = await handle.result(timeout=args.timeout)
    except WorkflowFailed as exc:
        return _report_failure(out, doc, exc)
    doc.update(status="completed", result=result)
    out.emit(doc, json.dumps(result, ensure_ascii=False, indent=2))
    return EXIT_OK


async def _with_final_status(
    client: Client, args: argparse.Namespace, exc: FailedPrecondition
) -> str:
    # The operator asked to act on a run that has ended: say how it ended, even if the server's
    # message does not.
    message = str(exc)
    if any(status in message for status in TERMINAL_WORKFLOW_STATUSES):
        return message
    try:
        with trio.move_on_after(5):
            d = await client.get_handle(args.workflow_id, args.run).describe()
            return f"{message} (workflow {d.workflow_id} run {d.run_id} is {d.status})"
    except EverrunsError:
        pass
    return message


async def _workflow_signal(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        await client.get_handle(args.workflow_id, args.run).signal(args.name, args.payload_value)
    except FailedPrecondition as exc:
        raise FailedPrecondition(await _with_final_status(client, args, exc)) from exc
    out.emit(
        {"ok": True, "workflow_id": args.workflow_id, "run_id": args.run, "signal": args.name},
        f"signal {args.name!r} delivered to workflow {args.workflow_id}",
    )
    return EXIT_OK


async def _workflow_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    handle = client.get_handle(args.workflow_id, args.run)
    try:
        await handle.cancel(args.reason)
    except FailedPrecondition as exc:
        raise FailedPrecondition(await _with_final_status(client, args, exc)) from exc
    # Cancelling is idempotent: say whether the run is still ending or has ended cancelled
    # (a run no worker had picked up ends at once; one cancelled before stays so).
    status = (await handle.describe()).status
    text = (
        f"workflow {args.workflow_id} is cancelled"
        if status == "cancelled"
        else f"cancellation requested for workflow {args.workflow_id}; "
        f"`everruns workflow result {args.workflow_id}` waits for it to end"
    )
    out.emit(
        {"ok": True, "workflow_id": args.workflow_id, "run_id": args.run, "status": status},
        text,
    )
    return EXIT_OK


def render_turn_event(event: Any) -> str:
    """One line for a turn event: ``[step 1] tool.called calculator {"expression": "6*7"}``."""
    data = dict(event.data)
    label = f"[step {event.step}]" if event.step else "[turn]"
    if event.kind == "tool.called":
        detail = f"{data.get('tool', '')} {json.dumps(data.get('arguments'), ensure_ascii=False)}"
    elif event.kind == "tool.result":
        outcome = data.get("error") if "error" in data else data.get("result")
        detail = f"{data.get('tool', '')} -> {json.dumps(outcome, ensure_ascii=False)}"
    elif event.kind == "turn.started":
        detail = str(data.get("text") or "")
    elif event.kind == "input.processed":
        detail = f"{data.get('provider')}/{data.get('model')}, tools {data.get('tools')}"
    elif event.kind == "reason.completed":
        calls = [c.get("name") for c in data.get("tool_calls") or []]
        detail = f"asks for {', '.join(calls)}" if calls else str(data.get("content") or "")
    elif event.kind in ("turn.completed", "turn.failed", "turn.cancelled"):
        detail = str(data.get("outcome") or data.get("error") or "")
    else:
        detail = ""
    line = " ".join(detail.split())[:200]
    return f"{label} {event.kind} {line}".rstrip()


async def _message_send(client: Client, args: argparse.Namespace, out: Output) -> int:
    turn = await client.send_message(args.session, args.text, max_steps=args.max_steps)
    doc: dict[str, Any] = {"session_id": args.session, "turn": turn.turn}
    if not out.as_json:
        print(f"message queued for turn {turn.turn} ({turn.workflow_id})", file=out.stream)
    if args.no_follow:
        out.emit({**doc, "workflow_id": turn.workflow_id}, "not following (--no-follow)")
        return EXIT_OK
    events = []
    # Like every --timeout: 0 gives up at once (a turn just queued has not ended).
    limit = contextlib.nullcontext() if args.timeout is None else trio.fail_after(args.timeout)
    try:
        with limit:
            async for event in turn.stream():
                events.append(event)
                if not out.as_json:
                    print(render_turn_event(event), file=out.stream, flush=True)
            result = await turn.result()
    except trio.TooSlowError:
        out.emit(
            {**doc, "events": events, "timed_out": True}, f"still running after {args.timeout:g} s"
        )
        return EXIT_TIMEOUT
    except WorkflowFailed as exc:
        out.emit(
            {**doc, "events": events, "status": exc.status, "error": exc.error},
            f"turn {exc.status}: {exc}",
        )
        return EXIT_FAILED
    out.emit(
        {**doc, "events": events, "outcome": result.outcome, "answer": result.answer},
        f"answer: {result.answer}" if result.answer is not None else f"outcome: {result.outcome}",
    )
    return EXIT_OK


async def _workers_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    workers = await client.list_workers(include_stopped=args.all)
    out.emit({"workers": workers}, render_workers(workers))
    return EXIT_OK


async def _dlq_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    letters, token = await client.list_dead_letters(limit=args.limit, page_token=args.page_token)
    out.emit(
        {"dead_letters": letters, "next_page_token": token}, render_dead_letters(letters, token)
    )
    return EXIT_OK


async def _dlq_requeue(client: Client, args: argparse.Namespace, out: Output) -> int:
    task_id = await client.requeue_dead_letter(args.dead_letter_id)
    out.emit(
        {"ok": True, "dead_letter_id": args.dead_letter_id, "task_id": task_id},
        f"dead letter {args.dead_letter_id} requeued as task {task_id}",
    )
    return EXIT_OK


async def _breakers_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    breakers = await client.list_circuit_breakers()
    out.emit({"breakers": breakers}, render_breakers(breakers))
    return EXIT_OK


async def _breakers_reset(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.reset_circuit_breaker(args.key)
    out.emit({"ok": True, "key": args.key}, f"circuit breaker {args.key!r} reset to closed")
    return EXIT_OK


async def _schedule_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedule, created = await client.create_schedule(
        args.schedule_id,
        args.type,
        args.input_value,
        spec=args.spec,
        overlap=args.overlap,
        paused=args.paused,
        replace=args.replace,
    )
    said = (
        "created"
        if created
        else "exists (replaced where it differed)"
        if args.replace
        else "exists, unchanged"
    )
    out.emit(
        {"schedule": schedule, "created": created},
        f"schedule {schedule.schedule_id} {said}\n{render_schedule(schedule)}",
    )
    return EXIT_OK


async def _schedule_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedules, token = await client.list_schedules(limit=args.limit, page_token=args.page_token)
    out.emit({"schedules": schedules, "next_page_token": token}, render_schedules(schedules, token))
    return EXIT_OK


async def _schedule_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedule = await client.describe_schedule(args.schedule_id)
    out.emit({"schedule": schedule}, render_schedule(schedule))
    return EXIT_OK


async def _schedule_pause(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedule = await client.pause_schedule(args.schedule_id)
    out.emit({"schedule": schedule}, f"schedule {schedule.schedule_id} paused")
    return EXIT_OK


async def _schedule_resume(client: Client, args: argparse.Namespace, out: Output) -> int:
    schedule = await client.resume_schedule(args.schedule_id)
    out.emit(
        {"schedule": schedule},
        f"schedule {schedule.schedule_id} resumed; next firing {_when(schedule.next_fire_at)}",
    )
    return EXIT_OK


async def _schedule_trigger(client: Client, args: argparse.Namespace, out: Output) -> int:
    handle = await client.trigger_schedule(args.schedule_id)
    if handle.created:
        text = (
            f"schedule {args.schedule_id} triggered: workflow {handle.workflow_id} "
            f"(run {handle.run_id})"
        )
    else:
        text = (
            f"workflow {handle.workflow_id} is already open as run {handle.run_id} (this "
            "second's firing); not started again"
        )
    out.emit(
        {"workflow_id": handle.workflow_id, "run_id": handle.run_id, "created": handle.created},
        text,
    )
    return EXIT_OK


async def _schedule_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.delete_schedule(args.schedule_id)
    out.emit(
        {"ok": True, "schedule_id": args.schedule_id},
        f"schedule {args.schedule_id} deleted (the runs it started go on)",
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Delegation to the other programs (their own trio.run, their own exit codes).


def _set_address(args: argparse.Namespace) -> None:
    if args.address:
        os.environ["GRPC_ADDRESS"] = args.address


def _run_server(args: argparse.Namespace) -> int:
    _set_address(args)
    from everruns.server.__main__ import main as server_main

    return server_main([])


def _run_migrate(args: argparse.Namespace) -> int:
    from everruns.server.__main__ import main as server_main

    return server_main(["migrate"])


def _run_worker(args: argparse.Namespace) -> int:
    _set_address(args)
    # As `python -m everruns.worker` does: modules are found in the current directory first
    # (a console script's own path starts with its bin directory instead), unless the
    # interpreter was told not to (PYTHONSAFEPATH, -P) or there is no current directory.
    try:
        here = os.getcwd()
    except OSError:
        here = None
    if here is not None and not sys.flags.safe_path and "" not in sys.path:
        if here in sys.path:
            sys.path.remove(here)
        sys.path.insert(0, here)
    try:
        module = importlib.import_module("everruns.worker.__main__")
    except ImportError as exc:
        if exc.name not in ("everruns.worker.__main__", "everruns.worker"):
            raise
        print("everruns: the worker is not available in this installation", file=sys.stderr)
        return EXIT_FAILED
    worker_main: Callable[[list[str]], int] = module.main
    return worker_main(list(args.modules))


# ---------------------------------------------------------------------------------------------
# Parsing.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _page_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} must be at most {MAX_PAGE_SIZE}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def _json_argument(flag: str, text: str | None) -> Any:
    """Parse a JSON flag value; ``@PATH`` reads it from a file.

    Raises:
        UsageError: the file cannot be read or the text is not JSON.
    """
    if text is None:
        return None
    source = flag
    if text.startswith("@"):
        source = f"{flag} file {text[1:]!r}"
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise UsageError(f"{source} is nested too deeply to decode") from None
    except ValueError as exc:
        raise UsageError(
            f"{source} is not valid JSON ({exc}); quote JSON for the shell, "
            f"e.g. {flag} '{{\"order\": 42}}' or {flag} '\"text\"'"
        ) from None


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in epilogs as written."""


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _common_options() -> argparse.ArgumentParser:
    # The global options are accepted after the verb too (`everruns workflow list --json`);
    # SUPPRESS keeps a leaf from resetting a value given before the group.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        metavar="HOST:PORT",
        help=f"control plane address (default: $GRPC_ADDRESS or {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON document instead of tables",
    )
    return common


def _leaf(
    group: Any,
    name: str,
    common: argparse.ArgumentParser,
    summary: str,
    example: str,
    *,
    run: Command | None = None,
    delegate: Callable[[argparse.Namespace], int] | None = None,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(
        name,
        parents=[common],
        help=summary,
        description=summary,
        epilog=example,
        formatter_class=_Formatter,
    )
    parser.set_defaults(handler=run, delegate=delegate)
    return parser


def _group(
    commands: Any, name: str, summary: str, example: str
) -> tuple[argparse.ArgumentParser, Any]:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=summary, epilog=example, formatter_class=_Formatter
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    return parser, verbs


def _add_workflow(commands: Any, common: argparse.ArgumentParser) -> None:
    _, verbs = _group(
        commands,
        "workflow",
        "start, inspect, signal and cancel workflows",
        _example("everruns workflow list --status running"),
    )
    p = _leaf(
        verbs,
        "start",
        common,
        "start a workflow (returns the open run if ID is already running)",
        _example("everruns workflow start checkout --input '{\"order\": 42}' --id order-42 --wait"),
        run=_workflow_start,
    )
    p.add_argument("type", metavar="TYPE", help="registered workflow name")
    p.add_argument("--input", metavar="JSON", help="input as JSON, or @FILE (default: null)")
    p.add_argument("--id", metavar="ID", help="workflow id (default: a generated UUID)")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=_seconds, metavar="S", help=f"with --wait: {_TIMEOUT_HELP}")

    p = _leaf(
        verbs,
        "list",
        common,
        "list workflow runs, newest first",
        _example("everruns workflow list --type checkout --status failed --limit 20"),
        run=_workflow_list,
    )
    p.add_argument("--type", metavar="T", help="only runs of this workflow name")
    p.add_argument("--status", choices=WORKFLOW_STATUSES, help="only runs in this status")
    p.add_argument(
        "--limit", type=_page_size, default=50, metavar="N", help=f"page size (1-{MAX_PAGE_SIZE})"
    )
    p.add_argument("--page-token", metavar="P", help="the token printed after the last page")

    p = _leaf(
        verbs,
        "show",
        common,
        "describe a run: status, input, result or error, pending activities with their attempts",
        _example("everruns workflow show order-42"),
        run=_workflow_show,
    )
    p.add_argument("workflow_id", metavar="ID", help="workflow id")
    p.add_argument("--run", metavar="R", help="run id (default: the latest run)")

    p = _leaf(
        verbs,
        "history",
        common,
        "print a run's event history",
        _example("everruns workflow history order-42"),
        run=_workflow_history,
    )
    p.add_argument("workflow_id", metavar="ID", help="workflow id")
    p.add_argument("--run", metavar="R", help="run id (default: the latest run)")

    p = _leaf(
        verbs,
        "result",
        common,
        "wait for a run to end and print its result (exit 1 if it failed or was cancelled)",
        _example("everruns workflow result order-42 --timeout 60"),
        run=_workflow_result,
    )
    p.add_argument("workflow_id", metavar="ID", help="workflow id")
    p.add_argument("--run", metavar="R", help="run id (default: the latest run)")
    p.add_argument("--timeout", type=_seconds, metavar="S", help=_TIMEOUT_HELP)

    p = _leaf(
        verbs,
        "signal",
        common,
        "send a named signal to an open run",
        _example('everruns workflow signal order-42 approve --payload \'{"by": "ana"}\''),
        run=_workflow_signal,
    )
    p.add_argument("workflow_id", metavar="ID", help="workflow id")
    p.add_argument("name", metavar="NAME", help="signal name")
    p.add_argument("--payload", metavar="JSON", help="payload as JSON, or @FILE (default: null)")
    p.add_argument("--run", metavar="R", help="run id (default: the open run)")

    p = _leaf(
        verbs,
        "cancel",
        common,
        "ask an open run to cancel",
        _example("everruns workflow cancel order-42 --reason 'customer asked'"),
        run=_workflow_cancel,
    )
    p.add_argument("workflow_id", metavar="ID", help="workflow id")
    p.add_argument("--reason", default="", metavar="R", help="recorded with the request")
    p.add_argument("--run", metavar="R", help="run id (default: the open run)")


def _add_schedule(commands: Any, common: argparse.ArgumentParser) -> None:
    _, verbs = _group(
        commands,
        "schedule",
        "start workflows on a cron schedule (UTC) or every interval",
        _example("everruns schedule create nightly-report report --spec '0 3 * * *'"),
    )
    p = _leaf(
        verbs,
        "create",
        common,
        "create a schedule (the same definition again changes nothing)",
        _example(
            "everruns schedule create nightly-report report --spec '0 3 * * *'",
            "everruns schedule create poll-feed poll --spec '@every 30s' --input '{\"feed\": 7}'",
        ),
        run=_schedule_create,
    )
    p.add_argument("schedule_id", metavar="ID", help="schedule id")
    p.add_argument("type", metavar="TYPE", help="registered workflow name")
    p.add_argument(
        "--spec",
        required=True,
        metavar="SPEC",
        help="cron expression in UTC ('0 3 * * mon-fri', '@daily') or '@every 30s'",
    )
    p.add_argument("--input", metavar="JSON", help="each run's input as JSON, or @FILE")
    p.add_argument(
        "--overlap",
        choices=("skip", "allow"),
        default="skip",
        help="while the last run is open: skip the firing (default) or start another",
    )
    p.add_argument("--paused", action="store_true", help="create it paused")
    p.add_argument(
        "--replace", action="store_true", help="replace another definition under this id"
    )

    p = _leaf(
        verbs,
        "list",
        common,
        "list schedules by id",
        _example("everruns schedule list"),
        run=_schedule_list,
    )
    p.add_argument(
        "--limit", type=_page_size, default=100, metavar="N", help=f"page size (1-{MAX_PAGE_SIZE})"
    )
    p.add_argument("--page-token", metavar="P", help="the token printed after the last page")
    for verb, summary, run in (
        ("show", "describe a schedule: its spec, next and last firing, counts", _schedule_show),
        ("pause", "pause a schedule (it fires no more until resumed)", _schedule_pause),
        ("resume", "resume a schedule (missed firings are not made up)", _schedule_resume),
        ("trigger", "start a run of a schedule now, besides its times", _schedule_trigger),
        ("delete", "delete a schedule (the runs it started go on)", _schedule_delete),
    ):
        p = _leaf(
            verbs,
            verb,
            common,
            summary,
            _example(f"everruns schedule {verb} nightly-report"),
            run=run,
        )
        p.add_argument("schedule_id", metavar="ID", help="schedule id")


def _add_workers(commands: Any, common: argparse.ArgumentParser) -> None:
    _, verbs = _group(
        commands, "workers", "inspect registered workers", _example("everruns workers list")
    )
    p = _leaf(
        verbs,
        "list",
        common,
        "list workers with their status, load and what they serve",
        _example("everruns workers list --all"),
        run=_workers_list,
    )
    p.add_argument("--all", action="store_true", help="include stopped and lost workers")


def _add_dlq(commands: Any, common: argparse.ArgumentParser) -> None:
    _, verbs = _group(
        commands, "dlq", "inspect and requeue dead-lettered tasks", _example("everruns dlq list")
    )
    p = _leaf(
        verbs,
        "list",
        common,
        "list dead letters, newest first",
        _example("everruns dlq list --limit 20"),
        run=_dlq_list,
    )
    p.add_argument(
        "--limit", type=_page_size, default=50, metavar="N", help=f"page size (1-{MAX_PAGE_SIZE})"
    )
    p.add_argument("--page-token", metavar="P", help="the token printed after the last page")
    p = _leaf(
        verbs,
        "requeue",
        common,
        "put a dead-lettered task back in the queue with fresh attempts",
        _example("everruns dlq requeue 0b7e5c1e-3f52-4c4d-9a55-2d0f3c8e9a41"),
        run=_dlq_requeue,
    )
    p.add_argument("dead_letter_id", metavar="ID", help="dead letter id (from `dlq list`)")


def _add_breakers(commands: Any, common: argparse.ArgumentParser) -> None:
    _, verbs = _group(
        commands,
        "breakers",
        "inspect and reset circuit breakers",
        _example("everruns breakers list"),
    )
    _leaf(
        verbs,
        "list",
        common,
        "list circuit breakers and their shared state",
        _example("everruns breakers list --json"),
        run=_breakers_list,
    )
    p = _leaf(
        verbs,
        "reset",
        common,
        "close a circuit breaker and clear its counters",
        _example("everruns breakers reset charge"),
        run=_breakers_reset,
    )
    p.add_argument("key", metavar="KEY", help="breaker key (the activity type by default)")


def _add_programs(commands: Any, common: argparse.ArgumentParser) -> None:
    _leaf(
        commands,
        "server",
        common,
        "run the control plane (same as `python -m everruns.server`)",
        _example("DATABASE_URL=postgresql://localhost/everruns everruns server"),
        delegate=_run_server,
    )
    _leaf(
        commands,
        "migrate",
        common,
        "apply database migrations and exit (same as `python -m everruns.server migrate`)",
        _example("DATABASE_URL=postgresql://localhost/everruns everruns migrate"),
        delegate=_run_migrate,
    )
    p = _leaf(
        commands,
        "worker",
        common,
        "run a worker serving the workflows and activities of MODULEs "
        "(same as `python -m everruns.worker`)",
        _example("everruns worker myapp.workflows myapp.activities"),
        delegate=_run_worker,
    )
    p.add_argument("modules", nargs="*", metavar="MODULE", help="modules to import")


def _add_message(commands: Any, common: argparse.ArgumentParser) -> None:
    _, verbs = _group(
        commands,
        "message",
        "talk to the agent: each message is answered by its own durable turn",
        _example('everruns message send support-7 "what is 6 * 7?"'),
    )
    p = _leaf(
        verbs,
        "send",
        common,
        "send a message to a session and follow its turn live until it answers",
        _example(
            'everruns message send support-7 "what is 6 * 7?"',
            'everruns --json message send support-7 "hello" --timeout 30',
        ),
        run=_message_send,
    )
    p.add_argument("session", metavar="SESSION", help="session id (created on first use)")
    p.add_argument("text", metavar="TEXT", help="the message")
    p.add_argument("--max-steps", type=int, default=10, metavar="N", help="LLM calls allowed")
    p.add_argument("--timeout", type=_seconds, metavar="S", help=_TIMEOUT_HELP)
    p.add_argument("--no-follow", action="store_true", help="queue the message and return")


# Each entry adds one command group.
_GROUPS: tuple[Callable[[Any, argparse.ArgumentParser], None], ...] = (
    _add_workflow,
    _add_schedule,
    _add_message,
    _add_workers,
    _add_dlq,
    _add_breakers,
    _add_programs,
)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog="everruns",
        description="Operate an everruns control plane: workflows, schedules, workers, dead "
        "letters, circuit breakers.",
        epilog=_example(
            "everruns workflow start checkout --input '{\"order\": 42}' --wait",
            "everruns --json workflow list --status failed",
        )
        + "\n\nexit codes:\n"
        + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()),
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help=f"control plane address (default: $GRPC_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False,
        help="print one JSON document instead of tables",
    )
    commands = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    common = _common_options()
    for add in _GROUPS:
        add(commands, common)
    return parser


def _prepare(args: argparse.Namespace) -> None:
    """Check and convert what needs no server, so bad input fails before any connection."""
    args.input_value = _json_argument("--input", getattr(args, "input", None))
    args.payload_value = _json_argument("--payload", getattr(args, "payload", None))
    if getattr(args, "wait", None) is False and getattr(args, "timeout", None) is not None:
        raise UsageError("--timeout applies to --wait: add --wait, or leave --timeout out")
    if getattr(args, "run", None) == "":
        raise UsageError("--run needs a run id (leave --run out for the default run)")
    if args.address is not None:
        try:
            parse_address(args.address, setting="--address")
        except ConfigError as exc:
            raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Errors -> one line and an exit code.


def _address_of(args: argparse.Namespace) -> str:
    return args.address or os.environ.get("GRPC_ADDRESS") or DEFAULT_ADDRESS


def _unreachable(address: str, exc: ServerUnavailable) -> str:
    message = str(exc)
    if "unavailable:" in message and "unreachable" not in message:
        # The control plane answered but cannot serve (e.g. its database is down).
        detail = message.split("unavailable:", 1)[1].strip()
        return f"control plane at {address} is unavailable: {detail}"
    if "SSL" in message or "certificate" in message.lower():
        # Something answered and the TLS handshake failed: a setting to fix, not a server to
        # start.
        detail = message.split("unreachable:", 1)[-1].strip()
        return (
            f"control plane at {address}: TLS handshake failed ({detail}); check EVERRUNS_TLS "
            "and EVERRUNS_TLS_CA against the control plane's certificate (or plaintext)"
        )
    return (
        f"control plane at {address} unreachable; is `python -m everruns.server` running? "
        "(set --address or GRPC_ADDRESS)"
    )


def exit_code_for(exc: BaseException) -> int:
    """The exit code an error stands for (see `EXIT_CODES`)."""
    if isinstance(exc, ServerUnavailable):
        return EXIT_UNREACHABLE
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, (FailedPrecondition, AlreadyExists)):
        return EXIT_PRECONDITION
    if isinstance(exc, (UsageError, InvalidArgument, PayloadError, ConfigError)):
        return EXIT_USAGE
    if isinstance(exc, TimeoutError):
        return EXIT_TIMEOUT
    return EXIT_FAILED


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _sole_error(exc: BaseException) -> BaseException:
    # Nurseries wrap errors in groups; an operator needs the one error inside, not the wrapping.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _run_command(args: argparse.Namespace) -> int:
    handler: Command = args.handler
    async with Client.connect(args.address) as client:
        return await handler(client, args, Output(args.json))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `everruns` command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code (see `EXIT_CODES`); ``--help`` returns 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse reports usage errors and --help by exiting
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        _prepare(args)
    except UsageError as exc:
        print(f"everruns: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.delegate is not None:
        code: int = args.delegate(args)
        return code
    try:
        # A fresh context: this may run in a thread of a program that has its own trio-asyncio
        # loop open, and that loop (found through a context variable) is not ours to use.
        code = contextvars.Context().run(trio.run, _run_command, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except (EverrunsError, TimeoutError, BaseExceptionGroup) as raised:
        error = _sole_error(raised)
        if isinstance(error, BrokenPipeError):
            return _reader_gone()
        if not isinstance(error, (EverrunsError, TimeoutError)):
            raise
        if isinstance(error, ServerUnavailable):
            message = _unreachable(_address_of(args), error)
        else:
            message = str(error)
        print(f"everruns: {_one_line(message)}", file=sys.stderr)
        return exit_code_for(error)
    return code


def _reader_gone() -> int:
    """End quietly when the reader of the output has gone (`everruns ... | head -1`), with
    stdout pointed at the null device so that the interpreter's last flush fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (captured): nothing to flush there
        pass
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
