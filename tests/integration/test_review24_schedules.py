"""Review 24: defects of schedules (session 24), each shown by a test that fails on the code
as committed (5df401d) for the reason its docstring gives."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from everruns._aio import pg
from everruns.client import Client
from everruns.errors import InvalidArgument
from everruns.server import engine as engine_module
from everruns.server.duties import _scan_once, run_due_scanner
from everruns.store.store import Store
from tests.conftest import fail_after
from tests.integration.test_client_cli import address
from tests.integration.test_schedules import _create, _engine, _make_due

__all__ = ["address"]  # the fixture

pytestmark = pytest.mark.db


async def _runs_of(pool: pg.Pool, schedule_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM durable_workflow_instances WHERE workflow_id LIKE $1",
            f"{schedule_id}@%",
        )
    )


@fail_after(30)
async def test_fire_due_schedules_ends_even_when_batches_take_longer_than_the_interval(
    store: Store, pool: pg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fire_due_schedules` loops while a batch came back full, re-reading `next_fire_at <=
    now()` with each transaction's own now(): when firing a full batch takes longer than the
    shortest interval, the schedules it fired are due again by the next batch, and the call
    never returns. The due-scanner's round is stuck in it: timers, timeouts, operator
    requeues and the wake-ups of delayed tasks all stop. (Shown with a batch of 2 and a start
    that takes 0.6 s; in production, a few hundred `@every 1s` schedules, or a slow database,
    do it with the batch of 100.)"""
    monkeypatch.setattr(engine_module, "_FIRE_BATCH", 2)
    engine = _engine(store, database_url)
    for schedule_id in ("a", "b"):
        await _create(engine, schedule_id, spec="@every 1s", overlap="allow")
        await _make_due(pool, schedule_id)
    start = engine._start

    async def slow_start(conn: Any, request: Any, **kwargs: Any) -> Any:
        await trio.sleep(0.6)
        return await start(conn, request, **kwargs)

    monkeypatch.setattr(engine, "_start", slow_start)
    with trio.move_on_after(4) as scope:
        await engine.fire_due_schedules()
    assert not scope.cancelled_caught, "fire_due_schedules kept firing the same schedules"


@fail_after(30)
async def test_one_schedule_that_cannot_start_its_run_does_not_stop_the_others(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    """A firing that fails (here: a workflow type edited by hand into one
    `durable_workflow_instances` refuses; `durable_schedules` has no CHECK on it, unlike
    every other name column) raises out of `fire_due_schedules`: the whole batch rolls back,
    so every schedule due after it never fires, and `_scan_once` fails before
    `enforce_timeouts` and the operator requeues, round after round. Only a spec that does
    not parse is isolated (paused)."""
    engine = _engine(store, database_url)
    await _create(engine, "bad")
    await _create(engine, "good")
    try:
        await pool.execute("UPDATE durable_schedules SET workflow_type = '' WHERE id = 'bad'")
    except InvalidArgument:
        # The table refuses that row now: make the bad schedule's start fail another way.
        await pool.execute(
            "CREATE FUNCTION review24_refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'refused'; END$$;"
            " CREATE TRIGGER review24_refuse BEFORE INSERT ON durable_workflow_instances"
            " FOR EACH ROW WHEN (NEW.workflow_id LIKE 'bad@%') EXECUTE FUNCTION review24_refuse()"
        )
    await _make_due(pool, "bad", ago=2)
    await _make_due(pool, "good", ago=1)
    await engine.fire_due_schedules()
    assert await _runs_of(pool, "good") == 1
    await _scan_once(engine, None)  # the rest of the round (timeouts, requeues) goes on


@fail_after(30)
async def test_a_schedule_parked_at_infinity_does_not_break_the_due_scanner(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    """`next_fire_at` accepts 'infinity' (no CHECK isfinite), a natural hand edit to park a
    schedule; `next_due` then computes `'infinity' - now()`, which PostgreSQL refuses
    ("cannot subtract infinite timestamps"), so every round of the due-scanner fails at its
    end and it retries on the outage backoff (up to 5 s) instead of sleeping until the next
    timer: timers fire late from then on."""
    engine = _engine(store, database_url)
    await _create(engine)
    try:
        await pool.execute("UPDATE durable_schedules SET next_fire_at = 'infinity'")
    except InvalidArgument:
        return  # the table refuses it (CHECK (isfinite(next_fire_at))): fixed that way
    await _scan_once(engine, None)


@fail_after(30)
async def test_the_due_scanner_does_not_spin_while_a_due_schedule_is_held(
    store: Store, pool: pg.Pool, database_url: str
) -> None:
    """While another transaction holds a past-due schedule's row (another control plane's
    firing batch waiting for the capacity lock behind a large start, a replace, an operator's
    open psql transaction), `next_due` is negative and the scanner looks again after 20 ms:
    every control plane runs whole due-scanner rounds (timers, schedules, timeouts, requeues,
    breakers, next_due, next_timeout) some 20 times a second for as long as the row is
    held."""
    engine = _engine(store, database_url)
    await _create(engine)
    await _make_due(pool, "tick")
    rounds = 0
    fire = engine.fire_due_schedules

    async def counted() -> int:
        nonlocal rounds
        rounds += 1
        return await fire()

    engine.fire_due_schedules = counted  # type: ignore[method-assign]
    async with store.transaction() as conn:
        await conn.execute("SELECT 1 FROM durable_schedules WHERE id = 'tick' FOR UPDATE")
        async with trio.open_nursery() as nursery:
            await nursery.start(run_due_scanner, engine)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    assert rounds <= 5, f"{rounds} scanner rounds in 1 s while one schedule's row was held"


@fail_after(30)
async def test_a_paused_schedule_created_again_at_deploy_is_answered_unchanged(
    store: Store, database_url: str
) -> None:
    """README: "Creating the same definition again changes nothing, so it can run at every
    deploy". But `paused` is part of the compared definition: once an operator pauses a
    schedule (`everruns schedule pause`), the deploy's unchanged `create_schedule` is refused
    with AlreadyExists (the CLI exits 5), and the only way through, `replace=True`, resumes
    the schedule the operator paused."""
    engine = _engine(store, database_url)
    first = await _create(engine, spec="@daily")
    await engine.pause_schedule("tick", paused=True)
    again, created = await engine.create_schedule(
        "tick", spec="@daily", workflow_type="report", input='{"n": 1}'
    )
    assert not created and again.paused and again.spec == first.spec


@fail_after(60)
async def test_the_client_refuses_an_empty_overlap(address: str) -> None:
    """`Client.create_schedule(overlap="")` is sent as proto3's default, which the server reads
    as "skip": a bad value is silently taken instead of refused with one line (the engine
    itself refuses "" as "overlap must be one of skip, allow")."""
    async with Client.connect(address) as client:
        with pytest.raises(InvalidArgument, match="overlap"):
            await client.create_schedule("tick", "report", spec="@daily", overlap="")
