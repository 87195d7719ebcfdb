"""Events held past a decision: input that arrives while a workflow task's decision travels.

The control plane applies a decision over events it was not made on unless one of them makes
it stale (`superseded_by`); the marker then records the decision's ``seen_sequence`` and replay
delivers the held events after its commands. Hypothesis plays that control plane over random
programs (the same as tests/unit/test_replay_properties.py) with events arriving during every
other decision: the histories it records must replay from scratch, and through a replay kept
open between tasks, into exactly what was decided, and the workflow must end with what its
program computes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain import history as h
from everruns.domain.commands import (
    CancelTimer,
    Command,
    CompleteWorkflow,
    ScheduleActivity,
    StartTimer,
)
from everruns.domain.context import WorkflowContext
from everruns.domain.history import HistoryEvent
from everruns.domain.replay import Replayer, replay, superseded_by
from everruns.errors import NonDeterminismError
from tests.unit.test_replay_properties import (
    _PROPERTY,
    INFO,
    T0,
    History,
    Step,
    _agrees,
    _apply,
    _event,
    _expected,
    _payload,
    _replay,
    _signals,
    make_workflow,
    programs,
    replay_kept_open,
)


def _arrive(
    rng: random.Random,
    log: History,
    pending: dict[str, list[dict[str, Any]]],
    unsent: list[dict[str, Any]],
    count: int,
) -> None:
    """Append up to ``count`` of the events that are due, picked at random."""
    for _ in range(count):
        keys = sorted(pending, key=int)
        if not keys and not unsent:
            return
        pick = rng.randrange(len(keys) + len(unsent))
        if pick < len(keys):
            queue = pending[keys[pick]]
            log.append(queue.pop(0))
            if not queue:
                del pending[keys[pick]]
        else:
            log.append(unsent.pop(pick - len(keys)))


def simulate_held(
    rng: random.Random, wf: Callable[..., Any], program: list[Step]
) -> tuple[History, list[tuple[int, datetime]], int]:
    """Play a control plane that holds what arrives while a decision travels. Returns the
    history, every workflow task's (events seen, claim time), and how many decisions were
    applied with events held past them."""
    log = History(h.workflow_started("program", "prop", "run-prop", None))
    pending: dict[str, list[dict[str, Any]]] = {}
    unsent = [h.signal_received(name, _payload(name)) for name in _signals(program)]
    attempts: list[tuple[int, datetime]] = []
    clock = T0
    held = 0
    for _ in range(600):
        seen = len(log.events)
        result = _replay(wf, log.events, clock)
        attempts.append((seen, clock))
        if rng.random() < 0.5:  # events arrive while the decision travels
            _arrive(rng, log, pending, unsent, rng.randint(1, 3))
        if rng.random() < 0.1:
            log.append(h.workflow_task_scheduled())  # diagnostic: never stale-making
        unseen = log.events[seen:]
        if superseded_by(result.commands, unseen) is None:
            held += any(e.type in h.INPUT_EVENT_TYPES for e in unseen)
            log.append(
                h.workflow_task_completed("w", clock, seen_sequence=seen if unseen else None)
            )
            for command in result.commands:
                log.append(command.to_event())
                _apply(rng, command, pending)
            if result.completed:
                return log, attempts, held
            news = [e for e in log.events[seen:] if e.type in h.INPUT_EVENT_TYPES]
        else:
            news = unseen
        clock += timedelta(seconds=1)
        if not news:  # nothing new for the workflow: something due must arrive
            assert pending or unsent, f"workflow blocked with nothing due; program={program}"
            _arrive(rng, log, pending, unsent, rng.randint(1, 3))
    raise AssertionError("the simulation did not finish")


@_PROPERTY
@given(program=programs(), rng=st.randoms(use_true_random=True))
def test_decisions_applied_over_held_events_replay_exactly(
    program: list[Step], rng: random.Random
) -> None:
    wf = make_workflow(program)
    log, attempts, _ = simulate_held(rng, wf, program)
    final = log.dicts[-1]
    assert final["type"] == h.WORKFLOW_COMPLETED, final
    assert _agrees(_expected(program), final["result"]), (program, final["result"])

    # From scratch, every recorded decision is what its batch issues (replay raises
    # otherwise), and the whole history asks for nothing more.
    again = _replay(wf, log.events, T0 + timedelta(days=1))
    assert again.commands == [] and again.completed

    # A replay kept open between tasks answers each as a full replay of what it saw.
    replay_kept_open(wf, log, attempts)


def test_the_simulation_holds_events_past_decisions() -> None:
    """The property above is not vacuous: with a stream of signals, decisions are applied
    with signals held past them."""
    program: list[Step] = [("wait", f"s{n}", None, True) for n in range(12)]
    wf = make_workflow(program)
    total = sum(simulate_held(random.Random(seed), wf, program)[2] for seed in range(20))
    assert total >= 20


# ------------------------------------------------------------------ a signal flood, by hand


async def _three_then_act(ctx: WorkflowContext, _input: Any) -> list[Any]:
    got = [await ctx.wait_signal("s") for _ in range(3)]
    return [got, await ctx.execute_activity("act", len(got)), await ctx.wait_signal("s")]


def _events(dicts: Sequence[dict[str, Any]]) -> list[HistoryEvent]:
    return [_event(n, d) for n, d in enumerate(dicts, 1)]


def _flood_history(seen: int | bool | str | None) -> list[dict[str, Any]]:
    """Three signals, one decision (the activity) made on them while a fourth arrived."""
    return [
        h.workflow_started("program", "prop", "run-prop", None),  # 1
        h.signal_received("s", 1),  # 2
        h.signal_received("s", 2),  # 3
        h.signal_received("s", 3),  # 4
        h.signal_received("s", 4),  # 5: arrived while the decision travelled
        h.workflow_task_completed("w", T0) | {"seen_sequence": seen},  # 6
        ScheduleActivity(activity_id="1", activity_type="act", input=3).to_event(),  # 7
    ]


def test_a_held_signal_is_delivered_after_the_decision_that_did_not_see_it() -> None:
    events = _events(
        [
            *_flood_history(4),
            h.activity_started("1", 1, "w"),
            h.activity_completed("1", "done", 1),
        ]
    )
    result = replay(_three_then_act, events, info=INFO, now=T0 + timedelta(seconds=5))
    # The fourth signal, held past the first decision, is the one the last wait gets.
    assert result.commands == [CompleteWorkflow(result=[[1, 2, 3], "done", 4])]
    # Kept open from the decision it made on four events, a replay goes on the same way.
    kept = Replayer(_three_then_act, info=INFO)
    made = kept.replay(events[:4], now=T0)
    assert [c.to_event() for c in made.commands] == [events[6].data]
    assert kept.advance(events[4:], now=T0 + timedelta(seconds=5)) == result
    kept.close()


def test_a_replay_kept_from_another_view_replays_in_full() -> None:
    """A marker recording another view than the kept replay's is not its decision."""
    events = _events(_flood_history(4))
    kept = Replayer(_three_then_act, info=INFO)
    kept.replay(events[:3], now=T0)
    assert kept.advance(events[3:], now=T0) is None
    kept.close()


@pytest.mark.parametrize("seen", [0, 6, 7, True, "4", 4.0])
def test_a_marker_recording_an_impossible_view_is_refused(seen: Any) -> None:
    with pytest.raises(NonDeterminismError, match=r"seq 6 records seen_sequence="):
        replay(_three_then_act, _events(_flood_history(seen)), info=INFO, now=T0)


def test_a_decision_sees_the_one_before_it() -> None:
    """A second decision that claims to have seen less than the first's events is refused."""
    dicts = [
        *_flood_history(None)[:-1],
        ScheduleActivity(activity_id="1", activity_type="act", input=3).to_event(),
        h.activity_completed("1", "done", 1),
        h.workflow_task_completed("w", T0, seen_sequence=6),  # before the first's command
    ]
    with pytest.raises(NonDeterminismError, match="records seen_sequence=6"):
        replay(_three_then_act, _events(dicts), info=INFO, now=T0)


# ------------------------------------------------------------------ what makes a decision stale


def _e(data: dict[str, Any]) -> HistoryEvent:
    return _event(10, data)


_SCHEDULE: list[Command] = [ScheduleActivity(activity_id="9", activity_type="act", input=None)]
_END: list[Command] = [CompleteWorkflow(result=None)]
_CANCEL_T: list[Command] = [CancelTimer(timer_id="t"), StartTimer(timer_id="u", seconds=1)]


@pytest.mark.parametrize(
    ("commands", "event", "stale"),
    [
        # Input is held past a decision that goes on...
        (_SCHEDULE, h.signal_received("s", 1), False),
        (_SCHEDULE, h.activity_completed("1", 1, 1), False),
        (_SCHEDULE, h.timer_fired("t"), False),
        (_SCHEDULE, h.child_workflow_completed("c", 1), False),
        ([], h.signal_received("s", 1), False),
        (_CANCEL_T, h.signal_received("s", 1), False),
        # (a timer cancelled after it fired: its firing is ignored, as when it comes first)
        (_CANCEL_T, h.timer_fired("t"), False),
        # ...but not past one that ends the run.
        (_END, h.signal_received("s", 1), True),
        (_END, h.activity_failed("1", h.error_info("E", "m"), 1, will_retry=True), True),
        # A cancel request or another decision's events: always stale.
        (_SCHEDULE, h.workflow_cancel_requested("stop"), True),
        ([], h.workflow_cancel_requested("stop"), True),
        (_SCHEDULE, h.workflow_task_completed("w", T0), True),
        (_SCHEDULE, h.timer_started("x", 1), True),
        # Diagnostic events: never.
        (_END, h.activity_started("1", 1, "w"), False),
        (_END, h.workflow_task_scheduled(), False),
        (_END, h.workflow_task_failed(h.error_info("E", "m")), False),
    ],
)
def test_what_makes_a_decision_stale(
    commands: list[Command], event: dict[str, Any], stale: bool
) -> None:
    unseen = [_e(h.workflow_task_scheduled()), _e(event)]
    assert (superseded_by(commands, unseen) is not None) == stale
    assert superseded_by(commands, []) is None
