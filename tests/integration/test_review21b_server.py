"""Review 21b (server/store side): failing tests for defects in today's fixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from everruns._aio import pg

pytestmark = pytest.mark.db


async def test_stale_pgsslrootcert_blocks_a_connection_that_never_reads_it(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: `check_tls_files` (called by `wait_until_ready`, so by every control plane's
    start-up, the embedded one's included) refuses a PGSSLROOTCERT / sslrootcert that cannot
    be read whatever the sslmode. But below sslmode=require neither asyncpg nor libpq reads a
    root certificate (the default mode, prefer, never verifies): a URL such as the embedded
    server's (no sslmode) connected before today, with a stale PGSSLROOTCERT in the
    environment, and now the control plane refuses to start.

    Expected: a URL whose sslmode (the default prefer, allow) never reads the root
    certificate or CRL connects as asyncpg does; only require/verify-* check those files."""
    missing = tmp_path / "gone" / "root.crt"
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.setenv("PGSSLROOTCERT", str(missing))
    with trio.fail_after(20):
        # asyncpg itself connects: it never opens the file below sslmode=require.
        async with pg.connect(database_url) as conn:
            assert await conn.fetchval("SELECT 1") == 1
        await pg.wait_until_ready(database_url, budget=10)
        await pg.wait_until_ready(f"{database_url}?sslmode=prefer&sslcrl={missing}", budget=10)


def test_mask_url_leaves_a_password_holding_question_mark_and_equals_in_clear() -> None:
    """Defect (regression of 917e056): `embedded.mask_url` now ends the user info at the first
    '?' unless the first query parameter's *name* holds an '@'. A password holding an
    unescaped '?' followed by '=' (``bob:se?cr=et@host``) makes the '@' fall in that
    parameter's value, so nothing is masked and the password is printed in clear; at 46f8cae
    (cut at the last '@') it was masked. `everruns demo` prints DATABASE_URL through
    `mask_url` without validating it first (demo.py `_postgres`).

    Expected: ``postgresql://bob:***@db.example.com/app`` (no part of the password shown)."""
    from everruns.store import embedded

    masked = embedded.mask_url("postgresql://bob:se?cr=et@db.example.com/app")
    assert "se?cr=et" not in masked and "cr=et" not in masked, masked
    assert masked == "postgresql://bob:***@db.example.com/app"


async def test_an_undelivered_poll_reply_holding_a_half_open_probe_frees_its_slot(
    database_url: str, pool: pg.Pool
) -> None:
    """Defect: a PollTasks reply whose caller gave up on it (a cancel notice crossed it) is
    given back (`UndeliveredTasks` -> `Engine.give_back_undelivered` -> `Store.unclaim`).
    When it handed out the probe of a half-open breaker, the task goes back to the queue but
    its probe slot is never freed: `unclaim` clears ``claimed_at`` and never calls
    `release_probe`, so ``probes_in_flight`` stays at half_open_max_probes (1) with no probe
    out. Every later claim of the key is refused a slot (`_admit_probes` unclaims it again),
    and no verdict ever comes: the breaker is wedged half-open for good.

    Expected: the given-back probe frees its slot (as a released or cancelled probe does),
    so the next poll hands a task of the key out again."""
    from everruns._aio.loop import run_aio
    from everruns._proto.everruns import v1 as pb
    from tests.integration.test_breaker_probes_and_drain import _breaker, _breaker_due_to_probe
    from tests.integration.test_engine import plane
    from tests.integration.test_review21_undelivered import crossed

    with trio.fail_after(40):
        async with plane(database_url) as p:
            await _breaker_due_to_probe(p, pool)
            poll = pb.PollTasksRequest(
                worker_id="w1", max_tasks=1, activity_types=["dep"], wait_s=1
            )
            route = "/everruns.v1.WorkerService/PollTasks"
            dropped = await run_aio(crossed, p.channel.raw, route, poll, pb.PollTasksResponse)
            assert len(dropped.tasks) == 1  # the probe, in the reply the worker dropped
            await trio.sleep(1.0)  # the give-back has run
            status = await pool.fetchval(
                "SELECT status FROM durable_task_queue WHERE id = $1",
                __import__("uuid").UUID(dropped.tasks[0].task_id),
            )
            assert status == "pending"  # given back
            nxt = await p.poll(act=["dep"], wait=1)
            assert len(nxt) == 1, (
                f"no task of the key handed out again; breaker (state, probes) = "
                f"{await _breaker(pool)}"
            )


def test_a_password_holding_question_mark_is_refused_not_read_as_host_and_port() -> None:
    """Defect (regression of 917e056, '@' in query values accepted): `_misplaced_at` treats
    an '@' after '?' as a query value's whenever the parameter *name* before '=' holds none.
    A password holding an unescaped '?' and then '=' (``admin:2024?x=y@db.example.com``)
    therefore passes: the URL is read as host "admin", port 2024, query ``x=y@db...``, and
    the start-up log line (`open_database`: ``mask_url``) prints the password in clear. At
    46f8cae it was refused with the one-line "percent-encode '/', '?', '#' and '@'" error.

    Expected: ConfigError naming the percent-encoding, as before (libpq scans the user info
    up to an '@' or '/', so it too reads ``admin:2024?x=y`` as user name and password, never
    as host and port)."""
    from everruns.errors import ConfigError
    from everruns.server.config import validate_database_url

    with pytest.raises(ConfigError, match="percent-encode"):
        validate_database_url("postgresql://admin:2024?x=y@db.example.com/app")
