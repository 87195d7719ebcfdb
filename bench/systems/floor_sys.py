"""The floor: what a bare PostgreSQL queue does on this machine, with nothing but asyncpg.

One table, a partial index matching the claim predicate, ten asyncpg connections in one
process each looping claim (``FOR UPDATE SKIP LOCKED``, committed) -> no-op -> complete
(committed), until the queue is empty. Workload 1's floor is one INSERT per start and one
1,000-row INSERT per batch. ``synchronous_commit`` is the server's (on), like every system.
This is a yardstick, not a product: no retries, leases or events.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench import measure
from bench.common import BenchError, RunnerArgs, RunResult, write_result
from bench.workloads import BY_KEY

SCHEMA = """
CREATE TABLE floor_jobs (
    id         bigserial PRIMARY KEY,
    status     text NOT NULL DEFAULT 'pending',
    payload    json NOT NULL DEFAULT 'null',
    created_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    done_at    timestamptz
);
CREATE INDEX floor_jobs_pending ON floor_jobs (id) WHERE status = 'pending';
"""

CLAIM = """
UPDATE floor_jobs SET status = 'running', claimed_at = now()
WHERE id = (
    SELECT id FROM floor_jobs WHERE status = 'pending' ORDER BY id
    LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id, payload
"""

COMPLETE = "UPDATE floor_jobs SET status = 'done', done_at = now() WHERE id = $1"

INSERT_ONE = "INSERT INTO floor_jobs (payload) VALUES ($1::json) RETURNING id"

INSERT_MANY = "INSERT INTO floor_jobs (payload) SELECT unnest($1::json[]) RETURNING id"

CONNECTIONS = 10


async def _drain(pool: asyncpg.Pool, cap_s: float) -> int:
    deadline = time.monotonic() + cap_s
    done = 0

    async def loop() -> None:
        nonlocal done
        async with pool.acquire() as conn:
            claim = await conn.prepare(CLAIM)
            complete = await conn.prepare(COMPLETE)
            while time.monotonic() < deadline:
                row = await claim.fetchrow()
                if row is None:
                    return
                await complete.fetch(row["id"])
                done += 1

    await asyncio.gather(*(loop() for _ in range(CONNECTIONS)))
    return done


async def run(args: RunnerArgs) -> RunResult:
    sizes = BY_KEY[args.workload].sizes(args.quick)
    result = RunResult()
    pool = await asyncpg.create_pool(args.db, min_size=CONNECTIONS, max_size=CONNECTIONS)
    try:
        async with pool.acquire() as conn:
            await conn.execute(SCHEMA)
            if args.workload == "w1":

                async def one(i: int) -> None:
                    await conn.fetchval(INSERT_ONE, str(i))

                async def batch(first: int, n: int) -> None:
                    await conn.fetch(INSERT_MANY, [str(first + j) for j in range(n)])

                await measure.start_rates(one, batch, sizes, result)
                return result
            if args.workload != "w2":
                raise BenchError(f"the floor does not run {args.workload}")
            for first in range(0, sizes.count, 1000):
                n = min(1000, sizes.count - first)
                await conn.fetch(INSERT_MANY, [str(first + j) for j in range(n)])
            await conn.execute("ANALYZE floor_jobs")
        t0 = time.perf_counter()
        done = await _drain(pool, sizes.cap_s)
        result.figures["activity_throughput"] = done / (time.perf_counter() - t0)
        result.cap_note("executions", done, sizes.count, sizes.cap_s)
    finally:
        await pool.close()
    return result


def main() -> None:
    args = RunnerArgs.parse()
    write_result(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    main()
