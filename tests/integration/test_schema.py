"""The schema: migrations apply once, refuse edits, race safely; the operator guide's runbook SQL
runs unmodified; constraints refuse illegal states."""

from __future__ import annotations

import uuid

import pytest
import trio

from everruns._aio import pg
from everruns.errors import InvalidArgument, MigrationError
from everruns.store.migrate import Migration, apply_migrations, load_migrations

pytestmark = pytest.mark.db

# Copied verbatim from shared/reference/original-durable-mode-setup.txt.
RUNBOOK = [
    """SELECT id, workflow_type, status, created_at
FROM durable_workflow_instances
WHERE status IN ('pending', 'running')
ORDER BY created_at DESC;""",
    """SELECT id, workflow_id, activity_type, status, attempt
FROM durable_task_queue
WHERE status = 'pending'
ORDER BY created_at;""",
    """SELECT id, workflow_id, activity_type, last_error, dead_at
FROM durable_dead_letter_queue
ORDER BY dead_at DESC;""",
    """SELECT id, status, current_load, last_heartbeat_at
FROM durable_workers
WHERE status = 'active';""",
    """SELECT id, workflow_id, activity_type, claimed_by, heartbeat_at
FROM durable_task_queue
WHERE status = 'claimed'
AND heartbeat_at < NOW() - INTERVAL '30 seconds';""",
    """SELECT * FROM durable_dead_letter_queue ORDER BY dead_at DESC;""",
    """UPDATE durable_dead_letter_queue SET requeued_at = NOW() WHERE id = '00000000-0000-0000-0000-000000000000';""",
]

SEVEN_TABLES = {
    "durable_workflow_instances",
    "durable_workflow_events",
    "durable_task_queue",
    "durable_dead_letter_queue",
    "durable_workers",
    "durable_signals",
    "durable_circuit_breaker_state",
}


async def test_seven_tables_exist(pool: pg.Pool) -> None:
    with trio.fail_after(10):
        rows = await pool.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert {r["table_name"] for r in rows} >= SEVEN_TABLES


@pytest.mark.parametrize("query", RUNBOOK)
async def test_runbook_sql_runs_unmodified(pool: pg.Pool, query: str) -> None:
    with trio.fail_after(10):
        await pool.execute(query)


async def test_every_foreign_key_has_an_index(pool: pg.Pool) -> None:
    # Deleting a row makes PostgreSQL look up the rows that reference it; without an index
    # led by the referencing column that is a sequential scan per deleted row (retention then
    # scans whole tables once per expired run). A partial index serves only if its predicate
    # is that the column is not null (what the lookup's equality implies).
    with trio.fail_after(10):
        rows = await pool.fetch(
            "SELECT c.conrelid::regclass::text AS tbl, c.conname, cardinality(c.conkey) AS n, "
            "EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid "
            "        AND i.indkey[0] = c.conkey[1] AND (i.indpred IS NULL "
            "             OR pg_get_expr(i.indpred, i.indrelid) = format('(%I IS NOT NULL)', "
            "                (SELECT attname FROM pg_attribute WHERE attrelid = c.conrelid "
            "                 AND attnum = c.conkey[1])))) AS indexed "
            "FROM pg_constraint c "
            "WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace"
        )
        assert len(rows) >= 7
        assert [r["conname"] for r in rows if r["n"] != 1] == []
        assert [f"{r['tbl']}.{r['conname']}" for r in rows if not r["indexed"]] == []


async def test_migrations_are_recorded_and_idempotent(database_url: str) -> None:
    with trio.fail_after(20):
        async with pg.connect(database_url) as conn:
            assert await apply_migrations(conn) == []  # the template is already migrated
            rows = await conn.fetch("SELECT version, checksum FROM everruns_schema_migrations")
        assert {r["version"] for r in rows} == {m.version for m in load_migrations()}


async def test_edited_migration_stops_with_clear_error(database_url: str) -> None:
    with trio.fail_after(20):
        edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in load_migrations()]
        async with pg.connect(database_url) as conn:
            with pytest.raises(MigrationError, match="was changed after it was applied"):
                await apply_migrations(conn, edited)


async def test_failing_migration_rolls_back_and_names_itself(database_url: str) -> None:
    with trio.fail_after(20):
        bad = [
            *load_migrations(),
            Migration(999, "broken", "CREATE TABLE t999 (x int); SELECT 1/0;"),
        ]
        async with pg.connect(database_url) as conn:
            with pytest.raises(MigrationError, match=r"999_broken\.sql failed"):
                await apply_migrations(conn, bad)
            assert await conn.fetchval("SELECT to_regclass('t999')") is None


async def test_two_servers_migrating_at_once_apply_each_migration_once(database_url: str) -> None:
    with trio.fail_after(30):
        extra = [*load_migrations(), Migration(900, "extra", "CREATE TABLE t900 (x int);")]
        results: list[list[str]] = []

        async def migrate() -> None:
            async with pg.connect(database_url) as conn:
                results.append(await apply_migrations(conn, extra))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(migrate)
        assert sorted(len(r) for r in results) == [0, 0, 1]


async def test_constraints_refuse_illegal_states(pool: pg.Pool) -> None:
    with trio.fail_after(10):
        run_id = uuid.uuid4()
        await pool.execute(
            "INSERT INTO durable_workflow_instances (id, workflow_id, workflow_type, input, "
            "partition_key) VALUES ($1, 'w', 't', '1', 'w')",
            run_id,
        )
        illegal = [
            # unknown status
            "UPDATE durable_workflow_instances SET status = 'weird'",
            # completed without a result or end time
            "UPDATE durable_workflow_instances SET status = 'completed'",
            # a claimed task without a holder
            f"INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, "
            f"activity_id, status, partition_key) VALUES (gen_random_uuid(), '{run_id}', 'w', "
            f"'activity', 'a', '1', 'claimed', 'w')",
            # an activity task without an activity id
            f"INSERT INTO durable_task_queue (id, run_id, workflow_id, kind, activity_type, "
            f"partition_key) VALUES (gen_random_uuid(), '{run_id}', 'w', 'activity', 'a', 'w')",
            # a worker status outside the four
            "INSERT INTO durable_workers (id, status, max_concurrency) VALUES ('x', 'zombie', 1)",
            # an unknown breaker state
            "INSERT INTO durable_circuit_breaker_state (key, state) VALUES ('k', 'ajar')",
        ]
        for statement in illegal:
            with pytest.raises(InvalidArgument):
                await pool.execute(statement)
