"""Review 24b: defects of schedules as mended in b9db44b (and the trigger of 1edb6fa), each
shown by a test that fails on that code for the reason its docstring gives."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from typing import Any

import pytest
import trio

from everruns import cli
from everruns._aio import pg
from everruns.client import Client
from everruns.errors import InvalidArgument
from everruns.server.duties import _scan_once
from everruns.server.engine import schedule_workflow_id
from everruns.store.store import Store
from tests.conftest import fail_after
from tests.integration.test_client_cli import address
from tests.integration.test_schedules import _cli, _create, _engine, _make_due, _runs_of

__all__ = ["address"]  # the fixture

pytestmark = pytest.mark.db


@fail_after(30)
async def test_a_firing_cut_short_by_a_statement_timeout_is_retried_not_paused_for_good(
    store: Store, pool: pg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Engine._fire` pauses the schedule on any EverrunsError but DatabaseUnavailable, and
    `map_pg_error` makes every unclassified PostgreSQL error a plain DatabaseError: a
    statement cancelled by `statement_timeout` (an operator's ALTER ROLE ... SET
    statement_timeout, while the database is slow), by `lock_timeout`, or by an operator's
    pg_cancel_backend (57014, 55P03) pauses the schedule for good, with paused_reason
    "DatabaseError: canceling statement due to statement timeout". Nothing about the row is
    wrong; the next round would have fired it. The docs promise only rows the control plane
    cannot use are paused ("Only a lost connection or an aborted transaction fails the
    batch")."""
    engine = _engine(store, database_url)
    await _create(engine)
    await _make_due(pool, "tick")
    start = engine._start
    slow = [True]

    async def timed_out_start(conn: pg.Connection, request: Any, **kwargs: Any) -> Any:
        if slow[0]:
            # What a role's statement_timeout does to a statement of the firing that waits.
            await conn.execute("SET LOCAL statement_timeout = '20ms'")
            await conn.execute("SELECT pg_sleep(1)")
        return await start(conn, request, **kwargs)

    monkeypatch.setattr(engine, "_start", timed_out_start)
    with contextlib.suppress(Exception):  # failing the batch (retried next round) is fine
        await engine.fire_due_schedules()
    slow[0] = False
    after = await engine.get_schedule("tick")
    assert not after.paused, f"paused for good by a transient error: {after.paused_reason}"
    await engine.fire_due_schedules()
    assert len(await _runs_of(pool, "tick")) == 1


@fail_after(30)
async def test_a_schedule_falling_due_during_a_round_is_not_put_off_a_second(
    store: Store, pool: pg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`next_due` says "one second" for every schedule due when it runs, taking it for one
    whose row another transaction holds. But `fire_due_schedules` fires only what was due
    when it began (`due_by`): a schedule that falls due during the rest of the round
    (enforce_timeouts, requeues, breakers: any round busy enough, or woken by a NOTIFY just
    before a firing time) is nobody's, and still waits a full second. An `@every 1s`
    schedule then loses a firing (fired 1 s late for T, its next time is T+2) while a control
    plane runs, which the docs say happens only to times missed while none ran.
    (Shown: a schedule due 0.3 s into a round whose timeouts take 0.6 s.)"""
    engine = _engine(store, database_url)
    await _create(engine)
    await pool.execute(
        "UPDATE durable_schedules SET next_fire_at = now() + interval '0.3 s' WHERE id = 'tick'"
    )
    enforce = engine.enforce_timeouts

    async def slow_enforce() -> int:
        await trio.sleep(0.6)
        return await enforce()

    monkeypatch.setattr(engine, "enforce_timeouts", slow_enforce)
    _, wait = await _scan_once(engine, None)
    assert await _runs_of(pool, "tick") == []  # not fired by this round: it was not due yet
    assert wait < 0.3, f"a schedule due and held by nobody waits {wait:.2f} s"


@fail_after(30)
@pytest.mark.parametrize("moment", ["0001-01-01 00:00:00+00 BC", "10000-01-01 00:00:00+00"])
async def test_a_next_fire_at_python_cannot_hold_is_refused_by_the_table(
    store: Store, pool: pg.Pool, database_url: str, moment: str
) -> None:
    """Migration 013's CHECKs "keep rows edited by hand within what the firing can use" with
    isfinite(next_fire_at), but PostgreSQL's finite range (4713 BC to 294276 AD) is far wider
    than Python's datetime (years 1-9999): asyncpg raises OverflowError ("date value out of
    range") reading such a row. A due one (a BC date, typed to "fire it now") fails
    `lock_due_schedules` itself, outside any savepoint, every round: it sorts first, so no
    schedule fires any more. One far ahead (parked) makes `list_schedules` fail for every
    schedule (INTERNAL), and `describe_schedule` for it."""
    engine = _engine(store, database_url)
    await _create(engine, "bad")
    await _create(engine, "good")
    try:
        await pool.execute(
            "UPDATE durable_schedules SET next_fire_at = $1::text::timestamptz WHERE id = 'bad'",
            moment,
        )
    except InvalidArgument:
        return  # the table refuses it: fixed that way
    await _make_due(pool, "good")
    with contextlib.suppress(Exception):
        await engine.fire_due_schedules()
    assert len(await _runs_of(pool, "good")) == 1, "a row Python cannot read stopped firing"
    listed = await store.list_schedules(after=None, limit=10)
    assert [s.schedule_id for s in listed] == ["bad", "good"]


@fail_after(60)
async def test_the_trigger_command_says_when_it_started_no_run(
    address: str, pool: pg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """`TriggerScheduleResponse.created` is False when the workflow id of this second already
    had an open run (two triggers in one second, or a trigger in the second a time fell due):
    nothing started. `everruns schedule trigger` drops it: it prints "schedule ... triggered:
    workflow ..." and its --json has no "created", unlike `everruns workflow start`, which
    says "already open ...; not started again" and carries "created". An operator (or a
    script) believes a second run started. (Shown with open runs under the trigger's workflow
    ids of the next seconds, started by hand.)"""
    async with Client.connect(address) as client:
        await client.create_schedule("nightly", "report", spec="0 3 * * *")
        now = await pool.fetchval("SELECT now()")
        for second in range(6):
            await client.start_workflow(
                "report",
                workflow_id=schedule_workflow_id("nightly", now + timedelta(seconds=second)),
            )
    code, out, _ = await _cli(capsys, address, "--json", "schedule", "trigger", "nightly")
    assert code == cli.EXIT_OK
    assert json.loads(out).get("created") is False, out
    code, out, _ = await _cli(capsys, address, "schedule", "trigger", "nightly")
    assert code == cli.EXIT_OK and ("already open" in out or "not started" in out), out
