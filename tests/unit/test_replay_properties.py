"""Replay properties over random workflow programs and random orders of delivery.

Hypothesis builds a small program (activities that succeed or fail, sleeps, signal waits with
and without timeouts, parallel groups run through ``ctx.gather`` or through handles), then plays
the control plane: it records each workflow task's commands, and between tasks delivers a random
handful of the outcomes that are due, in random order, sometimes throwing a task's answer away
(a superseded completion). The recorded history must then replay from scratch, cut anywhere,
into exactly what was recorded. Cancel requests arrive the same way, into programs whose
gathered branches compensate; values from the history reach the code whole at any depth.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import random
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from everruns.domain import history as h
from everruns.domain import payload
from everruns.domain.commands import (
    CancelTimer,
    Command,
    CompleteWorkflow,
    ScheduleActivity,
    StartTimer,
)
from everruns.domain.context import WorkflowContext, WorkflowInfo
from everruns.domain.history import HistoryEvent
from everruns.domain.replay import Replayer, ReplayResult, continues_decision, replay
from everruns.errors import ActivityError, InvalidArgument, NonDeterminismError, WorkflowCancelled

# Every property here runs 300 random programs, each simulated in full.
_PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INFO = WorkflowInfo(workflow_id="prop", run_id="run-prop", workflow_type="program")
T0 = datetime(2030, 1, 1, tzinfo=UTC)

# A program is a list of steps, each a tuple:
#   ("act", ok, n)                      execute_activity("ok"|"bad", n)
#   ("sleep", seconds)                  ctx.sleep
#   ("wait", name, timeout, sent)       ctx.wait_signal; the signal is sent only if `sent`
#   ("gather", [[step, ...], ...])      branches run as coroutines under ctx.gather
#   ("handles", [("act", ok, n), ...])  start_activity each, await them last to first
Step = tuple[Any, ...]


@st.composite
def programs(draw: st.DrawFn) -> list[Step]:
    names = iter(range(1000))

    def act() -> Step:
        return ("act", draw(st.booleans() | st.just(True)), draw(st.integers(0, 9)))

    def simple() -> Step:
        kind = draw(st.sampled_from(["act", "act", "sleep", "wait"]))
        if kind == "act":
            return act()
        if kind == "sleep":
            return ("sleep", draw(st.integers(1, 3)))
        timeout = draw(st.none() | st.integers(1, 3))
        sent = True if timeout is None else draw(st.booleans())
        return ("wait", f"s{next(names)}", timeout, sent)

    def step(depth: int) -> Step:
        kind = draw(st.sampled_from(["simple", "simple", "gather", "handles"]))
        if kind == "simple" or depth > 0:
            return simple()
        if kind == "handles":
            return ("handles", [act() for _ in range(draw(st.integers(1, 4)))])
        branches = [
            [step(depth + 1) for _ in range(draw(st.integers(1, 3)))]
            for _ in range(draw(st.integers(1, 4)))
        ]
        return ("gather", branches)

    return [step(0) for _ in range(draw(st.integers(1, 6)))]


def _payload(name: str) -> str:
    return f"payload-{name}"


async def _act(ctx: WorkflowContext, ok: bool, n: int) -> Any:
    try:
        return await ctx.execute_activity("ok" if ok else "bad", n)
    except ActivityError as exc:
        return ["err", exc.error_type, exc.attempt]


async def _run_steps(ctx: WorkflowContext, steps: list[Step]) -> list[Any]:
    out = []
    for step in steps:
        out.append(await _run_step(ctx, step))
    return out


async def _run_step(ctx: WorkflowContext, step: Step) -> Any:
    kind = step[0]
    if kind == "act":
        return await _act(ctx, step[1], step[2])
    if kind == "sleep":
        await ctx.sleep(step[1])
        return None
    if kind == "wait":
        try:
            return await ctx.wait_signal(step[1], timeout=step[2])
        except TimeoutError:
            return "timeout"
    if kind == "gather":
        return await ctx.gather(*(_run_steps(ctx, branch) for branch in step[1]))
    handles = [ctx.start_activity("ok" if ok else "bad", n) for _, ok, n in step[1]]
    results: list[Any] = [None] * len(handles)
    for index in reversed(range(len(handles))):
        try:
            results[index] = await handles[index]
        except ActivityError as exc:
            results[index] = ["err", exc.error_type, exc.attempt]
    return results


def make_workflow(program: list[Step]) -> Callable[..., Any]:
    async def workflow(ctx: WorkflowContext, _input: Any) -> list[Any]:
        return await _run_steps(ctx, program)

    return workflow


@attrs.frozen
class Either:
    options: tuple[Any, ...]


def _expected(steps: list[Step]) -> list[Any]:
    return [_expected_step(step) for step in steps]


def _expected_step(step: Step) -> Any:
    kind = step[0]
    if kind == "act":
        return ["ok", step[2]] if step[1] else ["err", "ActivityBoom", 3]
    if kind == "sleep":
        return None
    if kind == "wait":
        _, name, timeout, sent = step
        if not sent:
            return "timeout"
        return _payload(name) if timeout is None else Either((_payload(name), "timeout"))
    if kind == "gather":
        return [_expected(branch) for branch in step[1]]
    return [_expected_step(act) for act in step[1]]


def _agrees(expected: Any, actual: Any) -> bool:
    if isinstance(expected, Either):
        return actual in expected.options
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_agrees(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


def _signals(steps: list[Step]) -> list[str]:
    found = []
    for step in steps:
        if step[0] == "wait" and step[3]:
            found.append(step[1])
        elif step[0] == "gather":
            for branch in step[1]:
                found.extend(_signals(branch))
    return found


@attrs.frozen
class Task:
    """One recorded workflow task: the history it saw and what it answered."""

    seen: int  # events[:seen] were replayed
    now: datetime
    commands: list[Command]
    completed: bool


def _event(seq: int, data: dict[str, Any]) -> HistoryEvent:
    return HistoryEvent.of(seq, data, time=T0 + timedelta(seconds=seq))


def _replay(wf: Callable[..., Any], events: list[HistoryEvent], now: datetime) -> ReplayResult:
    return replay(wf, events, info=INFO, now=now)


class History:
    """The growing history, as dicts (to inspect and tamper with) and as events (to replay)."""

    def __init__(self, first: dict[str, Any]) -> None:
        self.dicts: list[dict[str, Any]] = []
        self.events: list[HistoryEvent] = []
        self.append(first)

    def append(self, data: dict[str, Any]) -> None:
        self.dicts.append(data)
        self.events.append(_event(len(self.dicts), data))


def simulate(
    rng: random.Random,
    wf: Callable[..., Any],
    program: list[Step],
    attempts: list[tuple[int, datetime]] | None = None,
    *,
    whole: bool = False,
    cancels: int = 0,
) -> tuple[History, list[Task]]:
    """Play the control plane until the workflow ends; return the history and the tasks.

    ``attempts`` (when given) gets every workflow task's (events seen, claim time), those
    whose answer was thrown away included. ``whole``: an attempt's start and end arrive
    together, as a worker's result does. ``cancels``: how many cancel requests arrive, at
    random points, as signals do."""
    log = History(h.workflow_started("program", "prop", "run-prop", None))
    pending: dict[str, list[dict[str, Any]]] = {}
    unsent = [h.signal_received(name, _payload(name)) for name in _signals(program)]
    unsent += [h.workflow_cancel_requested(f"cancel {n}") for n in range(cancels)]
    tasks: list[Task] = []
    clock = T0
    for _ in range(400):
        result = _replay(wf, log.events, clock)
        if attempts is not None:
            attempts.append((len(log.events), clock))
        due = len(pending) + len(unsent)
        if not result.completed and due and rng.random() < 0.1:
            pass  # superseded: the answer is dropped, more events arrive first
        else:
            tasks.append(Task(len(log.events), clock, result.commands, result.completed))
            log.append(h.workflow_task_completed("w", clock))
            for command in result.commands:
                log.append(command.to_event())
                _apply(rng, command, pending)
            if result.completed:
                return log, tasks
        clock += timedelta(seconds=1)
        due = len(pending) + len(unsent)
        assert due, f"workflow blocked with nothing due; program={program}"
        for _ in range(rng.randint(1, min(due, 4))):
            keys = sorted(pending, key=int)
            pick = rng.randrange(len(keys) + len(unsent))
            if pick < len(keys):
                queue = pending[keys[pick]]
                log.append(queue.pop(0))
                if whole and log.dicts[-1]["type"] == h.ACTIVITY_STARTED:
                    log.append(queue.pop(0))
                if not queue:
                    del pending[keys[pick]]
            else:
                log.append(unsent.pop(pick - len(keys)))
        if rng.random() < 0.125:
            log.append(h.workflow_task_scheduled())
    raise AssertionError("the simulation did not finish")


def _apply(rng: random.Random, command: Command, pending: dict[str, list[dict[str, Any]]]) -> None:
    if isinstance(command, ScheduleActivity):
        activity_id, n = command.activity_id, command.input
        error = h.error_info("ActivityBoom", "boom")
        if command.activity_type == "bad":
            out = []
            for attempt in (1, 2, 3):
                out.append(h.activity_started(activity_id, attempt, "w"))
                out.append(h.activity_failed(activity_id, error, attempt, will_retry=attempt < 3))
            pending[activity_id] = out
        elif rng.random() < 0.5:
            pending[activity_id] = [
                h.activity_started(activity_id, 1, "w"),
                h.activity_completed(activity_id, ["ok", n], 1),
            ]
        else:
            pending[activity_id] = [
                h.activity_started(activity_id, 1, "w"),
                h.activity_failed(activity_id, error, 1, will_retry=True),
                h.activity_completed(activity_id, ["ok", n], 2),
            ]
    elif isinstance(command, StartTimer):
        pending[command.timer_id] = [h.timer_fired(command.timer_id)]
    elif isinstance(command, CancelTimer):
        pending.pop(command.timer_id, None)


def _command_block(events: list[dict[str, Any]], marker_index: int) -> list[dict[str, Any]]:
    block = []
    for event in events[marker_index + 1 :]:
        if event["type"] not in h.COMMAND_EVENT_TYPES:
            break
        block.append(event)
    return block


def _must_not_replay(wf: Callable[..., Any], dicts: list[dict[str, Any]], what: str) -> str:
    try:
        replay(wf, [_event(i, d) for i, d in enumerate(dicts, 1)], info=INFO, now=T0)
    except NonDeterminismError as exc:
        return str(exc)
    raise AssertionError(f"{what} went unnoticed")


@_PROPERTY
@given(program=programs(), rng=st.randoms(use_true_random=True))
def test_recorded_histories_replay_exactly_when_cut_anywhere(
    program: list[Step], rng: random.Random
) -> None:
    wf = make_workflow(program)
    log, tasks = simulate(rng, wf, program)
    events = log.dicts

    final = events[-1]
    assert final["type"] == h.WORKFLOW_COMPLETED, final
    assert _agrees(_expected(program), final["result"]), (program, final["result"])

    # The whole history replays without a complaint and asks for nothing more.
    again = _replay(wf, log.events, T0 + timedelta(days=1))
    assert again.commands == [] and again.completed

    # Cut right before each marker: from scratch, replay answers with exactly the command
    # events recorded after that marker (full content, not just type and id).
    for task in tasks:
        assert events[task.seen]["type"] == h.WORKFLOW_TASK_COMPLETED
        result = _replay(wf, log.events[: task.seen], task.now)
        assert [c.to_event() for c in result.commands] == _command_block(events, task.seen)
        assert result.commands == task.commands
        assert result.completed == task.completed

    # Cut inside a batch: events are delivered one at a time, so what the workflow does
    # depends on the order of events, never on where task boundaries fell; a partial batch
    # issues a prefix of the batch's commands.
    starts = [0] + [t.seen + 1 + len(_command_block(events, t.seen)) for t in tasks[:-1]]
    for task, start in zip(tasks, starts, strict=True):
        if task.seen - start >= 2:
            cut = rng.randint(start + 1, task.seen - 1)
            partial = _replay(wf, log.events[:cut], task.now)
            assert partial.commands == task.commands[: len(partial.commands)]

    # Changing or dropping any recorded command event is detected, naming its seq.
    positions = [i for i, e in enumerate(events) if e["type"] in h.COMMAND_EVENT_TYPES]
    index = rng.choice(positions)
    event = events[index]
    kind = event["type"]
    if kind == h.ACTIVITY_SCHEDULED:
        tampered = {**event, "activity_type": "ok" if event["activity_type"] == "bad" else "bad"}
    elif kind == h.TIMER_STARTED:
        tampered = {**event, "seconds": event["seconds"] + 1}
    elif kind == h.TIMER_CANCELLED:
        tampered = h.timer_started(event["timer_id"], 1)
    elif kind == h.WORKFLOW_COMPLETED:
        tampered = h.workflow_cancelled()
    else:
        raise AssertionError(f"unexpected command event {event}")
    message = _must_not_replay(wf, [*events[:index], tampered, *events[index + 1 :]], "tampering")
    assert f"at seq {index + 1}," in message
    _must_not_replay(wf, [*events[:index], *events[index + 1 :]], "a dropped command event")


def replay_kept_open(
    wf: Callable[..., Any], log: History, attempts: list[tuple[int, datetime]]
) -> int:
    """Answer every workflow task (events seen, claim time) as a worker does, with one replay
    kept open between tasks (advanced, or replayed in full when the events do not continue its
    last decision); check each answer equals a full replay's. Returns how many advanced."""
    kept: Replayer | None = None
    advanced = 0
    for seen, now in attempts:
        events = log.events[:seen]
        full = _replay(wf, events, now)
        got = None
        if kept is not None:
            got = kept.advance(events[kept.seen_sequence :], now=now)
            if got is None:
                kept.close()
            else:
                advanced += 1
        if got is None:
            kept = Replayer(wf, info=INFO)
            got = kept.replay(events, now=now)
        assert got == full
        if got.completed:
            kept.close()
            kept = None
    assert kept is None  # the last task ends the workflow
    return advanced


@_PROPERTY
@given(program=programs(), rng=st.randoms(use_true_random=True))
def test_a_replay_kept_open_answers_every_task_as_a_full_replay(
    program: list[Step], rng: random.Random
) -> None:
    """What a worker does with a run's replay kept between tasks: each task advances it with
    the events that came since, or replays in full when they do not continue from its last
    decision (an answer thrown away). Every answer equals a full replay's."""
    wf = make_workflow(program)
    attempts: list[tuple[int, datetime]] = []
    log, _ = simulate(rng, wf, program, attempts)
    advanced = replay_kept_open(wf, log, attempts)
    # Every task after a recorded one went on from it (none is thrown away without more
    # events arriving, and those come before any marker).
    recorded_then_next = sum(
        1
        for (seen, _), (next_seen, _) in itertools.pairwise(attempts)
        if log.dicts[seen]["type"] == h.WORKFLOW_TASK_COMPLETED and next_seen > seen
    )
    assert advanced == recorded_then_next


def make_compensating_workflow(program: list[Step], branches: dict[str, str]) -> Callable[..., Any]:
    """The program, each gather branch a saga step: cancelled, it runs an ``undo`` activity
    to its end (cancelled again meanwhile too) before it lets the cancellation go on.
    ``branches`` gets each branch's state in the last replay: running, done or undone."""

    async def branch(ctx: WorkflowContext, steps: list[Step], tag: str) -> list[Any]:
        branches[tag] = "running"
        try:
            result = await _run_steps(ctx, steps)
        except WorkflowCancelled:
            undo = ctx.start_activity("undo", tag)
            while True:
                try:
                    await undo
                    break
                except WorkflowCancelled:
                    continue
            branches[tag] = "undone"
            raise
        branches[tag] = "done"
        return result

    async def workflow(ctx: WorkflowContext, _input: Any) -> list[Any]:
        branches.clear()
        out = []
        for k, step in enumerate(program):
            if step[0] == "gather":
                parts = (branch(ctx, steps, f"{k}.{i}") for i, steps in enumerate(step[1]))
                out.append(await ctx.gather(*parts))
            else:
                out.append(await _run_step(ctx, step))
        return out

    return workflow


@_PROPERTY
@given(program=programs(), cancels=st.integers(0, 2), rng=st.randoms(use_true_random=True))
def test_a_cancelled_gather_lets_its_branches_finish_and_replays_exactly(
    program: list[Step], cancels: int, rng: random.Random
) -> None:
    """Cancel requests (none, one, or two) arrive at random points of random programs whose
    gather branches compensate when cancelled. A cancelled run ends only after every branch
    it interrupted has run its compensation to the end, never with a branch left midway; and
    its history replays exactly, cut anywhere, in full or kept open between tasks."""
    branches: dict[str, str] = {}
    wf = make_compensating_workflow(program, branches)
    attempts: list[tuple[int, datetime]] = []
    log, tasks = simulate(rng, wf, program, attempts, cancels=cancels)
    events = log.dicts

    final = _replay(wf, log.events, T0 + timedelta(days=1))
    assert final.commands == [] and final.completed
    assert "running" not in branches.values(), branches
    undos = {
        e["activity_id"]: e["input"]
        for e in events
        if e["type"] == h.ACTIVITY_SCHEDULED and e["activity_type"] == "undo"
    }
    assert sorted(undos.values()) == sorted(t for t, state in branches.items() if state == "undone")
    end = next(i for i, e in enumerate(events) if e["type"] in h.TERMINAL_EVENT_TYPES)
    if events[end]["type"] == h.WORKFLOW_COMPLETED:
        assert not undos and _agrees(_expected(program), events[end]["result"])
    else:
        assert events[end]["type"] == h.WORKFLOW_CANCELLED, events[end]
        finished = {e["activity_id"] for e in events[:end] if e["type"] == h.ACTIVITY_COMPLETED}
        assert set(undos) <= finished, (undos, events)

    for task in tasks:
        result = _replay(wf, log.events[: task.seen], task.now)
        assert [c.to_event() for c in result.commands] == _command_block(events, task.seen)
        assert result.completed == task.completed
    replay_kept_open(wf, log, attempts)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


def _nest(value: Any, depth: int) -> list[Any]:
    nested: list[Any] = [value]
    for _ in range(depth - 1):
        nested = [nested]
    return nested


def _containers(value: Any) -> set[int]:
    found: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, dict)):
            found.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


@_PROPERTY
@given(value=_JSON, share=st.integers(1, 80))
def test_values_from_the_history_reach_the_workflow_whole_and_its_own(
    value: Any, share: int
) -> None:
    """A workflow input, a signal payload and an activity result reach workflow code as the
    recorded JSON value (1, 1.0 and true kept apart) at any nesting the payload layer accepts,
    and as the code's own: changing it changes nothing recorded."""
    # Up to 80% of the recursion limit deep, which the payload layer accepts (checked here):
    # it refuses only what reaches the limit. Hypothesis raises the limit while a test runs,
    # so the depth follows the limit in force.
    depth = max(1, sys.getrecursionlimit() * share // 100)
    payload.decode(payload.encode(_nest(value, depth)))
    got: list[Any] = []

    async def wf(ctx: WorkflowContext, tree: Any) -> None:
        got.clear()
        got.extend([tree, await ctx.wait_signal("tree"), await ctx.execute_activity("fetch")])
        for received in got:
            received.append("changed by the workflow")

    log = History(h.workflow_started("program", "prop", "run-prop", _nest(value, depth)))
    log.append(h.signal_received("tree", _nest(value, depth)))
    (command,) = _replay(wf, log.events, T0).commands
    log.append(h.workflow_task_completed("w", T0))
    log.append(command.to_event())
    log.append(h.activity_started("1", 1, "w"))
    log.append(h.activity_completed("1", _nest(value, depth), 1))
    assert _replay(wf, log.events, T0).commands == [CompleteWorkflow(None)]
    recorded = [log.dicts[0]["input"], log.dicts[1]["payload"], log.dicts[-1]["result"]]
    for received, original in zip(got, recorded, strict=True):
        assert len(original) == 1 and received[1:] == ["changed by the workflow"]
        received, original = received[0], original[0]
        for _ in range(depth - 1):
            assert isinstance(received, list) and len(received) == 1
            received, original = received[0], original[0]
        assert json.dumps(received) == json.dumps(original)
        assert not _containers(received) & _containers(original)


def _three_steps_history() -> tuple[Callable[..., Any], list[HistoryEvent], datetime]:
    program: list[Step] = [("act", True, 1), ("act", True, 2)]
    wf = make_workflow(program)
    log, tasks = simulate(random.Random(7), wf, program)
    return wf, log.events, tasks[1].now


def test_advance_refuses_what_does_not_continue_its_last_decision() -> None:
    wf, events, _ = _three_steps_history()
    marker = next(i for i, e in enumerate(events) if e.type == h.WORKFLOW_TASK_COMPLETED)
    first = Replayer(wf, info=INFO)
    first.replay(events[:marker], now=T0)
    # Another claim time than the one its decision was made with: not its decision.
    assert first.advance(events[marker:], now=T0 + timedelta(seconds=9)) is not None
    other = Replayer(wf, info=INFO)
    other.replay(events[:marker], now=T0 + timedelta(seconds=1))
    assert other.advance(events[marker:], now=T0 + timedelta(seconds=9)) is None
    # A gap, nothing new, or a closed replayer: no.
    gap = Replayer(wf, info=INFO)
    gap.replay(events[:marker], now=T0)
    assert gap.advance(events[marker + 1 :], now=T0) is None
    assert gap.advance([], now=T0) is None
    gap.close()
    assert gap.advance(events[marker:], now=T0) is None
    # A replayer replays a whole history once.
    with pytest.raises(InvalidArgument, match="replayed a history already"):
        first.replay(events, now=T0)
    for r in (first, other):
        r.close()


def test_a_kept_replay_resumes_the_workflow_in_its_own_context() -> None:
    """A workflow that sets a context variable before an await and resets it after gets the
    same answer whether its next task runs in the same context or, as a worker's thread would,
    in another one; nothing it sets leaks into the caller's context."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def wf(ctx: WorkflowContext, _input: Any) -> Any:
        token = var.set("inside")
        try:
            await ctx.execute_activity("ok", 1)
            return var.get()
        finally:
            var.reset(token)

    first = [_event(1, h.workflow_started("program", "prop", "run-prop", None))]
    kept = Replayer(wf, info=INFO)
    (command,) = kept.replay(first, now=T0).commands
    assert var.get() == "unset"
    assert isinstance(command, ScheduleActivity)
    later = [
        h.workflow_task_completed("w", T0),
        command.to_event(),
        h.activity_started(command.activity_id, 1, "w"),
        h.activity_completed(command.activity_id, ["ok", 1], 1),
    ]
    events = first + [_event(seq, data) for seq, data in enumerate(later, start=2)]
    answers: list[ReplayResult | None] = []
    thread = threading.Thread(
        target=lambda: answers.append(kept.advance(events[1:], now=T0 + timedelta(seconds=1)))
    )
    thread.start()
    thread.join()
    full = _replay(wf, events, T0 + timedelta(seconds=1))
    assert full.completed and answers == [full]
    kept.close()


def _fresh_replay(wf: Callable[..., Any], events: list[HistoryEvent], task: Task) -> Replayer:
    """A replayer as a worker keeps it after answering ``task``."""
    kept = Replayer(wf, info=INFO)
    assert kept.replay(events[: task.seen], now=task.now).commands == task.commands
    return kept


@_PROPERTY
@given(program=programs(), rng=st.randoms(use_true_random=True))
def test_a_decision_made_ahead_is_a_full_replays_where_the_history_continues_it(
    program: list[Step], rng: random.Random
) -> None:
    """What a worker does when an activity it ran completes: it decides the next workflow task
    on the run's kept replay, assuming the history grows by its last decision and that result
    only. Wherever a recorded history ends so (`continues_decision` says yes), that decision
    equals a full replay of the history; where it says no, the history holds something else."""
    wf = make_workflow(program)
    log, tasks = simulate(rng, wf, program, whole=rng.random() < 0.8)
    events = log.events
    for task in tasks:
        if task.completed:
            continue
        for end in range(task.seen + 1, len(events)):
            completed = events[end]
            if completed.type != h.ACTIVITY_COMPLETED:
                continue
            prefix = events[: end + 1]
            activity_id = completed.data["activity_id"]
            fits = continues_decision(
                prefix,
                after_sequence=task.seen,
                after_time=task.now,
                worker_id="w",
                activity_id=activity_id,
                result=completed.data["result"],
                seen_sequence=end + 1,
            )
            between = [e.type for e in events[task.seen + 1 : end - 1]]
            plain = all(t == h.ACTIVITY_SCHEDULED for t in between)
            started = events[end - 1]
            assert fits == (
                plain
                and started.type == h.ACTIVITY_STARTED
                and started.data["activity_id"] == activity_id
            ), between
            if not fits:
                continue
            kept = _fresh_replay(wf, events, task)
            now = task.now + timedelta(seconds=rng.choice([-1, 0, 0.5]))
            ahead = kept.follow_up(
                activity_id,
                completed.data["attempt"],
                completed.data["result"],
                worker_id="w",
                now=now,
            )
            kept.close()
            # The history fits only after a decision of activities alone (one event each).
            assert all(isinstance(c, ScheduleActivity) for c in task.commands)
            assert ahead is not None
            assert ahead.after_sequence == task.seen and ahead.after_time == task.now
            assert ahead.decided_at == max(now, task.now)
            assert ahead.result == _replay(wf, prefix, ahead.decided_at)


def test_continues_decision_refuses_another_marker_worker_or_activity() -> None:
    _, events, _ = _three_steps_history()
    marker = next(i for i, e in enumerate(events) if e.type == h.WORKFLOW_TASK_COMPLETED)
    completed = next(i for i, e in enumerate(events) if e.type == h.ACTIVITY_COMPLETED)
    activity_id = events[completed].data["activity_id"]
    time = h.parse_time(events[marker].data["time"])
    prefix = events[: completed + 1]

    def fits(**change: Any) -> bool:
        args: dict[str, Any] = {
            "after_sequence": marker,
            "after_time": time,
            "worker_id": "w",
            "activity_id": activity_id,
            "result": events[completed].data["result"],
            "seen_sequence": completed + 1,
        }
        return continues_decision(prefix, **{**args, **change})

    assert fits()
    # Another result than the one recorded (the same JSON value only counts: 1 is not true).
    recorded = events[completed].data["result"]
    assert not fits(result=[recorded])
    assert not fits(result=json.loads(json.dumps(recorded).replace("1", "true")))
    assert not fits(after_time=time + timedelta(microseconds=1))
    assert not fits(worker_id="another")
    assert not fits(activity_id="9")
    assert not fits(seen_sequence=completed + 2)
    assert not fits(after_sequence=marker - 1)
    assert not continues_decision(
        prefix[:-1],
        after_sequence=marker,
        after_time=time,
        worker_id="w",
        activity_id=activity_id,
        result=events[completed].data["result"],
        seen_sequence=completed + 1,
    )


def test_no_decision_ahead_without_a_decision_or_after_the_end() -> None:
    wf, events, _ = _three_steps_history()
    fresh = Replayer(wf, info=INFO)
    assert fresh.follow_up("1", 1, None, worker_id="w", now=T0) is None
    marker = next(i for i, e in enumerate(events) if e.type == h.WORKFLOW_TASK_COMPLETED)
    kept = Replayer(wf, info=INFO)
    kept.replay(events[:marker], now=T0)
    kept.close()
    assert kept.follow_up("1", 1, None, worker_id="w", now=T0) is None
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        Replayer(wf, info=INFO).follow_up("1", 1, None, worker_id="w", now=datetime(2030, 1, 1))
