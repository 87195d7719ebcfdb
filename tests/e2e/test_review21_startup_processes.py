"""Review 21, process start-up: two control planes on one embedded PostgreSQL data directory.

Every process started here is stopped however the test ends (`run_module` of
test_process_lifecycle: SIGTERM, then SIGKILL, of its process group), and whatever PostgreSQL
is left on the test's own data directory is stopped in `finally`."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from .harness import free_port
from .test_process_lifecycle import _stop_embedded, run_module


async def test_stopping_one_of_two_control_planes_on_one_data_dir_leaves_the_other_serving(
    tmp_path: Path,
) -> None:
    """Defect: a second control plane started on the same EVERRUNS_DATA_DIR (another
    GRPC_ADDRESS: control planes are stateless replicas over one database) reuses the embedded
    PostgreSQL the first one started (`started_by_us=False`, `_adopt_orphan`: "the first one
    stops it") and does not watch it. When the first control plane is stopped cleanly
    (SIGTERM), it stops that PostgreSQL under the second one, and nothing ever starts it
    again: the second control plane keeps running, looks healthy, and answers every call
    UNAVAILABLE for good.

    Expected: the surviving control plane serves again within seconds (it takes the
    embedded PostgreSQL over and starts it again, as it does when its own postmaster dies),
    or, failing that, exits non-zero so that a supervisor restarts it; never a live process
    that can do nothing."""
    from everruns.client import Client
    from everruns.errors import EverrunsError

    data_dir = tmp_path / "pg"
    first_address = f"127.0.0.1:{free_port()}"
    second_address = f"127.0.0.1:{free_port()}"
    common = {"EVERRUNS_DATA_DIR": str(data_dir), "EVERRUNS_RECLAIM_INTERVAL": "0.5"}
    try:
        with trio.fail_after(150):
            async with run_module(
                "everruns.server", {**common, "GRPC_ADDRESS": first_address}
            ) as first:
                await first.wait_for(f"listening on {first_address}", timeout=60)
                async with run_module(
                    "everruns.server", {**common, "GRPC_ADDRESS": second_address}
                ) as second:
                    await second.wait_for(f"listening on {second_address}", timeout=60)
                    await second.wait_for("connection pool warm", timeout=15)

                    first.signal(signal.SIGTERM)
                    assert await first.wait(timeout=40) == 0, first.text[-3000:]

                    probes = 0

                    async def starts_a_workflow() -> bool:
                        nonlocal probes
                        probes += 1
                        with trio.move_on_after(3):
                            try:
                                await client.start_workflow(
                                    "never_served", None, workflow_id=f"probe-{probes}"
                                )
                            except EverrunsError:
                                return False
                            return True
                        return False

                    served = False
                    async with Client.connect(second_address) as client:
                        with trio.move_on_after(30):
                            while second.process.returncode is None:
                                if await starts_a_workflow():
                                    served = True
                                    break
                                await trio.sleep(1.0)
                    exited = second.process.returncode
                    assert served or (exited is not None and exited != 0), (
                        "after the first control plane stopped the embedded PostgreSQL, the "
                        "second one on the same data directory still runs but cannot serve "
                        f"({probes} StartWorkflow probes over 30 s failed):\n"
                        f"{second.text[-3000:]}"
                    )
    finally:
        await _stop_embedded(data_dir)


async def test_sigterm_during_migrate_stops_its_embedded_postgres_and_says_so(
    tmp_path: Path,
) -> None:
    """Defect: `python -m everruns.server migrate` installs no signal handling (only the
    serving path runs `_watch_signals`), so a SIGTERM while it runs (a deploy job's timeout, a
    container stopped during its init step) kills it by the default action: exit -15, and the
    embedded PostgreSQL it has just started (in its own session) is left running, owned by
    nobody, until some later control plane happens to take it over.

    Expected: it stops within seconds, having stopped the embedded PostgreSQL it started, and
    says whether the migrations were applied: exit 1 and one line if the signal cut them short
    (a deploy job must not go on with an old schema), exit 0 if they were done first."""
    from .test_process_lifecycle import _postmasters_on

    data_dir = tmp_path / "pg"
    extra = {"EVERRUNS_DATA_DIR": str(data_dir), "GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}
    try:
        with trio.fail_after(120):
            async with run_module("everruns.server", extra, "migrate") as migrate:
                await migrate.wait_for("embedded PostgreSQL (started)", timeout=90)
                migrate.signal(signal.SIGTERM)
                code = await migrate.wait(timeout=40)
            left = _postmasters_on(data_dir)
            assert code in (0, 1) and not left, (
                f"SIGTERM during `migrate`: exit {code}, PostgreSQL processes {left} still run "
                f"on {data_dir}:\n{migrate.text[-3000:]}"
            )
            said = "migrations applied" if code == 0 else "stopped by a signal before"
            assert said in migrate.text, migrate.text[-3000:]
    finally:
        await _stop_embedded(data_dir)
