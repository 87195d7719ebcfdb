"""Configuration mistakes caught at start, naming the setting (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from everruns.domain.address import parse_address
from everruns.errors import ConfigError
from everruns.server import database
from everruns.server.config import ServerConfig
from everruns.store import embedded
from everruns.worker.config import WorkerConfig


def test_grpc_address_with_a_url_scheme_is_refused() -> None:
    # `GRPC_ADDRESS=http://127.0.0.1:9001` (how many gRPC tools spell it) must be refused as
    # "not host:port"; it is accepted with the host "http://127.0.0.1", so the worker, the
    # client and the CLI later report an unreachable control plane instead of a bad setting.
    for value in ("http://127.0.0.1:9001", "grpc://localhost:9001"):
        with pytest.raises(ConfigError, match="GRPC_ADDRESS"):
            parse_address(value)
        with pytest.raises(ConfigError, match="GRPC_ADDRESS"):
            WorkerConfig.from_env({"GRPC_ADDRESS": value})


@pytest.mark.parametrize(
    "url",
    [
        # libpq/asyncpg multi-host (fail-over) form: asyncpg connects with it
        "postgresql://postgres@127.0.0.1:5432,127.0.0.1:5432/postgres",
        # the local-socket / PGHOST form: asyncpg connects with it too
        "postgresql:///everruns",
    ],
)
def test_valid_postgresql_urls_are_accepted(url: str) -> None:
    assert ServerConfig.from_env({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize("token", ["secret\n", "sécret"])
def test_an_auth_token_that_cannot_be_sent_is_a_config_error(token: str) -> None:
    # A token no HTTP/2 header can carry (a trailing newline from a secret file, non-ASCII)
    # makes every call fail with a bare ValueError "Invalid metadata value": it must be refused
    # at start, naming EVERRUNS_AUTH_TOKEN, on the control plane and on the worker.
    with pytest.raises(ConfigError, match="EVERRUNS_AUTH_TOKEN"):
        ServerConfig.from_env({"EVERRUNS_AUTH_TOKEN": token})
    with pytest.raises(ConfigError, match="EVERRUNS_AUTH_TOKEN"):
        WorkerConfig.from_env({"EVERRUNS_AUTH_TOKEN": token})


class _Started(Exception):
    pass


async def test_data_dir_with_tilde_is_the_same_directory_the_demo_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # embedded.default_data_dir expands `~` in EVERRUNS_DATA_DIR (the demo uses it), but the
    # control plane passes config.data_dir to embedded.start unexpanded: `~/pg` from an env
    # file becomes ./~/pg under the working directory, another cluster than the demo's.
    env = {"EVERRUNS_DATA_DIR": "~/everruns-edge/pg"}
    seen: list[Path] = []

    def fake_start(data_dir: Path, **_: object) -> None:
        seen.append(Path(data_dir))
        raise _Started

    monkeypatch.setattr(embedded, "start", fake_start)
    with trio.fail_after(10):
        with pytest.raises(_Started):
            async with database.open_database(ServerConfig.from_env(env)):
                pass
    assert seen == [embedded.default_data_dir(env)]
