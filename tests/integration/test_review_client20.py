"""Review of the client API and the `everruns` command line (session 20): bad input that ends in
a traceback or a misleading message instead of the one clear line the project promises ("an
operator mistake prints one line, never a traceback"; "every bad input gets a clear one-line
error").

Each test fails against the code it was written for and says why in its docstring. The tests
that need a control plane run the real one, in-process, on a fresh database.
Mended in the commit that adds this file (cli.py, client.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import everruns
from everruns import cli
from everruns.client import Client
from everruns.errors import EverrunsError, InvalidArgument
from everruns.server import ServerConfig, serve

pytestmark = pytest.mark.db

LIST = ("workflow", "list")
SRC = str(Path(everruns.__file__).resolve().parent.parent)  # for the CLI run as a subprocess


@pytest.fixture
async def address(database_url: str) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve, ServerConfig(database_url=database_url, grpc_port=0))
        yield info.address
        nursery.cancel_scope.cancel()


async def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `everruns ARGV` in a thread (it runs its own Trio loop), with ``env`` added to the
    environment for the call; return (code, out, err)."""
    capsys.readouterr()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        code = await trio.to_thread.run_sync(cli.main, list(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("everruns: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# JSON arguments read by the CLI


def test_input_file_that_is_not_utf8_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--input @FILE` / `--payload @FILE` naming a file that is not UTF-8 (a binary file, a
    Latin-1 export, a path mistyped onto the wrong file) ends the command with a
    UnicodeDecodeError traceback and exit 1 ("the operation failed"), before anything is sent:
    `_json_argument` only catches OSError around the read. It is bad input: one line, exit 2,
    as for a file that cannot be read or does not hold JSON."""
    binary = tmp_path / "order.json"
    binary.write_bytes(b'{"name": "caf\xe9"}')  # Latin-1, not UTF-8
    for argv in (
        ["--address", "127.0.0.1:1", "workflow", "start", "checkout", "--input", f"@{binary}"],
        ["--address", "127.0.0.1:1", "workflow", "signal", "w", "go", "--payload", f"@{binary}"],
    ):
        capsys.readouterr()
        try:
            code = cli.main(argv)
        except UnicodeDecodeError as exc:
            pytest.fail(f"`everruns {' '.join(argv)}` raised a traceback: {exc!r}")
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE, (code, err)
        assert str(binary) in _one_error_line(err)


def test_deeply_nested_json_argument_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--input` holding JSON nested deeper than Python's recursion limit (here 100,000 `[`,
    a truncated or hostile file) escapes `json.loads` as RecursionError, which
    `_json_argument` does not catch (only ValueError): a traceback and exit 1 instead of the
    one line and exit 2 of any other JSON it cannot take. The client's own encoder reports the
    same value as a PayloadError ("nested too deeply"); the CLI should say so too."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    argv = ["--address", "127.0.0.1:1", "workflow", "start", "checkout", "--input", f"@{deep}"]
    try:
        code = cli.main(argv)
    except RecursionError as exc:
        pytest.fail(f"`everruns workflow start --input @deep.json` raised a traceback: {exc!r}")
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, (code, err)
    _one_error_line(err)


# ---------------------------------------------------------------------------------------------
# TLS settings that do not match the control plane


async def test_a_tls_mismatch_is_not_reported_as_a_control_plane_that_is_not_running(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TLS setting that does not fit the control plane (EVERRUNS_TLS_CA naming the wrong CA,
    EVERRUNS_TLS=1 against a private certificate, or against a plaintext control plane) is
    reported by the CLI as `control plane at ADDR unreachable; is python -m everruns.server
    running?` — the one thing known to be false: the server is running and answered the
    TLS handshake. `Client` has the reason (ServerUnavailable: "[SSL:
    CERTIFICATE_VERIFY_FAILED] certificate verify failed" / "[SSL: WRONG_VERSION_NUMBER]"),
    but `cli._unreachable` throws it away whenever the message contains "unreachable". An
    operator following the hint restarts a healthy control plane instead of fixing the CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    wrong_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            tls_plane = await nursery.start(
                serve,
                ServerConfig(
                    database_url=database_url,
                    grpc_port=0,
                    tls_cert=str(cert_file),
                    tls_key=str(key_file),
                ),
            )
            plain_plane = await nursery.start(
                serve, ServerConfig(database_url=database_url, grpc_port=0)
            )
            cases = [
                (tls_plane.address, {"EVERRUNS_TLS_CA": str(wrong_ca)}),
                (tls_plane.address, {"EVERRUNS_TLS": "1"}),
                (plain_plane.address, {"EVERRUNS_TLS": "1"}),
            ]
            for where, env in cases:
                code, _out, err = await run_cli(
                    capsys, "--address", where, "workers", "list", env=env
                )
                line = _one_error_line(err)
                assert code == cli.EXIT_UNREACHABLE, (env, code, err)
                assert "running?" not in line and (
                    "certificate" in line.lower() or "ssl" in line.lower() or "tls" in line.lower()
                ), (env, line)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# --json and --timeout


async def test_json_start_wait_timeout_still_prints_the_started_run(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`everruns --json workflow start TYPE --wait --timeout S` that times out (exit 6) prints
    nothing on stdout, though the run was started: a script that reads the one JSON document
    gets none, and without `--id` it cannot learn the generated workflow id (only the prose
    on stderr holds it), so a retry starts a second run. The text form prints `started
    workflow ...` before waiting, the failed/cancelled outcome emits the document with its
    status, and `message send --timeout` emits one with `"timed_out": true`; only this path
    drops it."""
    with trio.fail_after(30):
        code, out, err = await run_cli(
            capsys,
            "--address",
            address,
            "--json",
            "workflow",
            "start",
            "nobody_serves_this",
            "--wait",
            "--timeout",
            "0",
        )
        assert code == cli.EXIT_TIMEOUT, (code, err)
        assert out.strip(), f"no JSON document on stdout; stderr: {err!r}"
        document = json.loads(out)
        assert document["workflow_id"] and document["run_id"] and document["created"] is True
        async with Client.connect(address) as client:
            described = await client.get_handle(document["workflow_id"]).describe()
        assert described.run_id == document["run_id"] and described.is_open


# ---------------------------------------------------------------------------------------------
# The client API: values of the wrong type or range


async def test_history_after_sequence_past_int64_is_refused_as_given(address: str) -> None:
    """`handle.history(after_sequence=2**63)` is sent unchecked; the wire's int64 wraps it, and
    the caller is told `after_sequence must not be negative, got -9223372036854775808` about
    a positive number it never passed (2**70 gives `malformed request: varint longer than ten
    bytes`). `history` checks `page_size` for exactly this reason (`_check_page_size`: "the
    wire ... wraps"); `after_sequence` needs the same check, naming the value given."""
    with trio.fail_after(20):
        async with Client.connect(address) as client:
            handle = await client.start_workflow("nobody_serves_this", workflow_id="h-1")
            with pytest.raises(InvalidArgument) as raised:
                await handle.history(after_sequence=2**63)
            message = str(raised.value)
            assert "negative" not in message and "-9223372036854775808" not in message, message


def _wrong_types(client: Client) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    handle = client.get_handle("typed-1")

    async def handle_of_none() -> Any:
        return client.get_handle(None)  # type: ignore[arg-type]

    return [
        # The docstring promises InvalidArgument for a bad timeout; a str gives
        # TypeError: '>=' not supported between instances of 'str' and 'int'.
        ("result(timeout='5')", lambda: handle.result(timeout="5")),  # type: ignore[arg-type]
        # AttributeError: 'int' object has no attribute 'encode' (from the wire encoder).
        (
            "get_handle(id, run_id=5).describe()",
            lambda: client.get_handle("typed-1", 5).describe(),  # type: ignore[arg-type]
        ),
        ("cancel(reason=5)", lambda: handle.cancel(5)),  # type: ignore[arg-type]
        # ValueError: invalid literal for int() with base 10: 'no' -- and "no" would mean yes.
        (
            "list_workers(include_stopped='no')",
            lambda: client.list_workers(include_stopped="no"),  # type: ignore[arg-type]
        ),
        # get_handle's docstring: "InvalidArgument: workflow_id is empty"; None makes a handle
        # to the workflow id "".
        ("get_handle(None)", handle_of_none),
    ]


async def test_client_arguments_of_the_wrong_type_are_invalid_arguments(address: str) -> None:
    """Values of the wrong type reach the wire encoder or a comparison and come out as
    TypeError/AttributeError/ValueError tracebacks whose text names none of the caller's
    arguments (`'int' object has no attribute 'encode'`, `invalid literal for int() with
    base 10: 'no'`), or are accepted and mean something else (`get_handle(None)` is a
    handle to the workflow id ""). Every other argument of these calls is checked before
    anything is sent and refused as InvalidArgument naming it; these should be too."""
    problems: list[str] = []
    with trio.fail_after(30):
        async with Client.connect(address) as client:
            await client.start_workflow("nobody_serves_this", workflow_id="typed-1")
            for label, call in _wrong_types(client):
                try:
                    with trio.fail_after(5):
                        await call()
                except InvalidArgument:
                    continue
                except Exception as exc:
                    problems.append(f"{label}: {type(exc).__name__}: {exc}")
                else:
                    problems.append(f"{label}: accepted")
    assert not problems, "\n".join(problems)


async def test_connect_with_a_tls_value_that_is_not_a_context_says_so(address: str) -> None:
    """`Client.connect(tls=...)` takes an SSLContext, True or None/False; any other truthy
    value (a path to a CA file, "yes" from a config file) is handed to the channel as a
    context, and the first call fails deep in asyncio with `AttributeError: 'str' object has
    no attribute 'wrap_bio'`, naming neither `tls` nor what it should be. The environment
    form of the same setting (EVERRUNS_TLS) refuses anything but an on/off value with one
    line; the argument should be refused at `connect` as clearly."""
    with trio.fail_after(20):
        with pytest.raises(EverrunsError, match="tls"):
            async with Client.connect(address, tls="yes") as client:  # type: ignore[arg-type]
                await client.list_workers()


# ---------------------------------------------------------------------------------------------
# The command line's output going to a reader that has left


async def test_output_into_a_closed_pipe_is_not_a_traceback(address: str) -> None:
    """`everruns --json workflow list | head -1` (or any reader that exits before the output
    is written) makes the CLI's `print` raise BrokenPipeError; nothing catches it, so the
    operator gets a Python traceback (and a second one, "Exception ignored ... BrokenPipeError",
    as the interpreter flushes stdout at exit). A command line should end quietly when its
    reader has gone."""
    with trio.fail_after(60):
        async with Client.connect(address) as client:
            await client.start_workflows([("nobody_serves_this", i) for i in range(3)])
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader has gone before anything is written
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
        try:
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "everruns", "--address", address, "--json", *LIST],
                    stdout=write_end,
                    stderr=subprocess.PIPE,
                    env=env,
                    timeout=40,
                    check=False,
                )
            )
        finally:
            os.close(write_end)
        err = done.stderr.decode(errors="replace")
        assert "Traceback" not in err and "BrokenPipeError" not in err, err
