"""The control plane's message limit relies on grpclib's private parts: `_recv_capped` in
everruns._aio.grpc reads a message as `grpclib.server.Stream.recv_message` does, from the
attributes that method uses. This test fails loudly when the grpclib installed is not the one
it was written against (grpclib is pinned; an upgrade must re-read those functions and update
`_recv_capped` and the digests below). The behaviour itself is tested against a real server in
tests/integration/test_message_limit.py."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import grpclib.protocol
import grpclib.server
import grpclib.stream
import pytest

from everruns._aio import grpc

# What `_recv_capped` copies or relies on, as read in grpclib 0.4.9.
COPIED: list[tuple[Callable[..., Any], str]] = [
    (
        grpclib.stream.recv_message,
        "12b332050fce1fd5d1d1ad50363fb46408be3182982d4b6f4fa1265050cd3285",
    ),
    (
        grpclib.server.Stream.recv_message,
        "fbfe65d02d8e8b713252b20dbe3170d63df3924627c5b936ddc505e03123762f",
    ),
    (
        grpclib.server.Stream.__init__,
        "78866f62006256a53d9185ca672ae6022dd5d7b24d4e7466935f8cf8ae6b5dcb",
    ),
    (
        grpclib.protocol.Stream.recv_data,
        "13eee2d6c7f3ae24e437a50c8e3e9731a39a458f221b9cfc915ba92cb92b8331",
    ),
]


@pytest.mark.parametrize("function, digest", COPIED, ids=lambda f: getattr(f, "__qualname__", ""))
def test_grpclib_reads_messages_as_recv_capped_copies_it(
    function: Callable[..., Any], digest: str
) -> None:
    source = inspect.getsource(function)
    assert hashlib.sha256(source.encode()).hexdigest() == digest, (
        f"grpclib's {function.__module__}.{function.__qualname__} changed: re-read it and "
        "update everruns._aio.grpc._recv_capped (and this digest) to match"
    )


def test_the_private_attributes_recv_capped_uses_are_still_there() -> None:
    init = inspect.getsource(grpclib.server.Stream.__init__)
    for name in ("self._stream", "self._codec", "self._recv_type", "self._dispatch"):
        assert f"{name} =" in init, name
    assert grpclib.server.Stream._messages_received == 0
    used = inspect.getsource(grpc._recv_capped)
    for name in ("messages_received", "last_message_received", "recv_data"):
        assert name in used
        assert name in inspect.getsource(grpclib.server.Stream.recv_message) + inspect.getsource(
            grpclib.stream.recv_message
        )
