"""Status life cycles: the transition tables, their checks and terminality."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.status import (
    TASK_STATUSES,
    TASK_TRANSITIONS,
    WORKER_STATUSES,
    WORKER_TRANSITIONS,
    WORKFLOW_STATUSES,
    WORKFLOW_TRANSITIONS,
    check_task_transition,
    check_worker_transition,
    check_workflow_transition,
    is_terminal,
)
from everruns.errors import FailedPrecondition, InvalidArgument

MIGRATIONS = Path(__file__).resolve().parents[2] / "src" / "everruns" / "store" / "migrations"


def test_vocabularies() -> None:
    assert WORKFLOW_STATUSES == (
        "pending",
        "running",
        "completed",
        "failed",
        "cancelled",
        "continued_as_new",
    )
    assert TASK_STATUSES == ("pending", "claimed", "completed", "failed", "dead", "cancelled")
    assert WORKER_STATUSES == ("active", "draining", "stopped", "lost")
    assert set(WORKFLOW_TRANSITIONS) == set(WORKFLOW_STATUSES)
    assert set(TASK_TRANSITIONS) == set(TASK_STATUSES)
    assert set(WORKER_TRANSITIONS) == set(WORKER_STATUSES)


@pytest.mark.parametrize(
    ("table", "statuses"),
    [
        ("durable_workflow_instances", WORKFLOW_STATUSES),
        ("durable_task_queue", TASK_STATUSES),
        ("durable_workers", WORKER_STATUSES),
    ],
)
def test_vocabularies_match_the_schema(table: str, statuses: tuple[str, ...]) -> None:
    sql = "\n".join(p.read_text() for p in sorted(MIGRATIONS.glob("*.sql")))
    if not sql:
        pytest.skip("no migrations in this tree")
    body = sql.split(f"CREATE TABLE {table}", 1)[1].split(");", 1)[0]
    found = re.search(r"CHECK \(status IN \(([^)]*)\)\)", body)
    # a later migration's CHECK replaces it (012: continued_as_new)
    for later in re.finditer(
        rf"ADD CONSTRAINT {table}_run_status\s+CHECK \(status IN \(([^)]*)\)", sql
    ):
        found = later
    assert found is not None
    assert tuple(re.findall(r"'([a-z_]+)'", found.group(1))) == statuses


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("pending", "running"),
        ("pending", "cancelled"),
        ("pending", "completed"),
        ("running", "completed"),
        ("running", "failed"),
        ("running", "cancelled"),
        ("running", "running"),
    ],
)
def test_legal_workflow_transitions(a: str, b: str) -> None:
    check_workflow_transition(a, b)


@pytest.mark.parametrize(
    ("a", "b", "needle"),
    [
        ("completed", "running", "already completed"),
        ("completed", "completed", "already completed"),
        ("cancelled", "completed", "already been cancelled"),
        ("failed", "cancelled", "already failed"),
        ("running", "pending", "can only become cancelled, completed, continued_as_new, failed"),
    ],
)
def test_illegal_workflow_transitions(a: str, b: str, needle: str) -> None:
    with pytest.raises(FailedPrecondition, match=needle) as info:
        check_workflow_transition(a, b, name="order-7")
    msg = str(info.value)
    assert "'order-7'" in msg
    assert f"from {a!r} to {b!r}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("pending", "claimed"),
        ("pending", "pending"),
        ("pending", "cancelled"),
        ("pending", "dead"),
        ("claimed", "pending"),
        ("claimed", "completed"),
        ("claimed", "failed"),
        ("claimed", "dead"),
        ("claimed", "cancelled"),
        ("dead", "pending"),
    ],
)
def test_legal_task_transitions(a: str, b: str) -> None:
    check_task_transition(a, b)


@pytest.mark.parametrize(
    ("a", "b", "needle"),
    [
        ("completed", "completed", "already completed"),
        ("completed", "pending", "already completed"),
        ("dead", "completed", "dead-letter queue"),
        ("dead", "dead", "dead-letter queue"),
        ("pending", "completed", "can only become"),
        ("pending", "failed", "can only become"),
        ("cancelled", "claimed", "already been cancelled"),
    ],
)
def test_illegal_task_transitions(a: str, b: str, needle: str) -> None:
    with pytest.raises(FailedPrecondition, match=needle):
        check_task_transition(a, b)


def test_worker_transitions() -> None:
    check_worker_transition("active", "draining")
    check_worker_transition("draining", "stopped")
    check_worker_transition("lost", "active")
    check_worker_transition("stopped", "stopped")
    with pytest.raises(FailedPrecondition, match="worker 'w1'"):
        check_worker_transition("draining", "active", name="w1")


@pytest.mark.parametrize(
    ("fn", "a", "b"),
    [
        (check_workflow_transition, "claimed", "running"),
        (check_workflow_transition, "running", "done"),
        (check_task_transition, "running", "completed"),
        (check_worker_transition, "active", "pending"),
    ],
)
def test_unknown_statuses_are_invalid_arguments(fn: object, a: str, b: str) -> None:
    assert callable(fn)
    with pytest.raises(InvalidArgument, match="unknown"):
        fn(a, b)


def test_is_terminal() -> None:
    assert [is_terminal(s) for s in WORKFLOW_STATUSES] == [False, False, True, True, True, True]
    assert [is_terminal(s) for s in TASK_STATUSES] == [False, False, True, True, True, True]
    with pytest.raises(InvalidArgument):
        is_terminal("active")
    with pytest.raises(InvalidArgument):
        is_terminal("nonsense")


@given(st.sampled_from(WORKFLOW_STATUSES), st.sampled_from(WORKFLOW_STATUSES))
def test_workflow_check_agrees_with_table(a: str, b: str) -> None:
    legal = b in WORKFLOW_TRANSITIONS[a] or (a == b and not is_terminal(a))
    if legal:
        check_workflow_transition(a, b)
    else:
        with pytest.raises(FailedPrecondition):
            check_workflow_transition(a, b)


@given(st.sampled_from(TASK_STATUSES), st.sampled_from(TASK_STATUSES))
def test_task_check_agrees_with_table(a: str, b: str) -> None:
    legal = b in TASK_TRANSITIONS[a] or (a == b and not is_terminal(a))
    if legal:
        check_task_transition(a, b)
    else:
        with pytest.raises(FailedPrecondition):
            check_task_transition(a, b)


def test_terminal_statuses_have_no_way_out_except_requeue() -> None:
    for s in WORKFLOW_STATUSES:
        assert (not WORKFLOW_TRANSITIONS[s]) is is_terminal(s)
    exits = {s for s in TASK_STATUSES if is_terminal(s) and TASK_TRANSITIONS[s]}
    assert exits == {"dead"}
    assert TASK_TRANSITIONS["dead"] == frozenset({"pending"})


@given(st.lists(st.sampled_from(TASK_STATUSES), max_size=30))
def test_walks_through_the_task_table_end_only_in_terminal_or_live_states(
    steps: list[str],
) -> None:
    # Following only legal edges from pending, a completed task is never seen again.
    status = "pending"
    for nxt in steps:
        try:
            check_task_transition(status, nxt)
        except FailedPrecondition:
            continue
        assert status not in ("completed", "failed", "cancelled")
        status = nxt
