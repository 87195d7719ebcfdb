"""grpclib bridged into Trio: serve Trio service implementations, call services from Trio.

Server side: `serve_services` takes objects whose async methods are Trio functions named like
the generated service bases' methods (`start_workflow(request) -> reply`; server streams take a
`send` function as second argument), and runs a grpclib server on the asyncio loop's thread that
calls them as tasks of a Trio nursery (`AioLoop.run_trio`). Everruns errors raised by a method
become gRPC statuses with their message; anything else becomes INTERNAL with a short message (the
traceback stays in the server log).
Authentication (bearer token, constant-time comparison) happens here, before any method runs.
Every message a method receives is checked against the message limit from its 5-byte prefix
before its body is read (`_recv_capped`): grpclib itself would buffer whatever length a peer
declares.

Client side: `open_channel` and `RpcChannel.unary/stream` call generated stubs from Trio and map
gRPC statuses back onto everruns errors. No engine logic here.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar, cast

import grpclib.const
import grpclib.exceptions
import grpclib.server
import h2.exceptions
import trio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.protocol import H2Protocol

from everruns._aio.loop import AioLoop, CallAbandoned, call_in_loop, current_aio_loop, run_aio
from everruns._aio.wire import FastCodec, WireError
from everruns.domain.address import switch_from_env
from everruns.domain.budget import field_bytes
from everruns.errors import (
    AlreadyExists,
    ConcurrencyConflict,
    ConfigError,
    DatabaseError,
    DatabaseUnavailable,
    EverrunsError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PayloadError,
    ResourceExhausted,
    RpcError,
    ServerTimeout,
    ServerUnavailable,
    StaleLease,
)

__all__ = [
    "CALLS_ROUTE",
    "CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "CallStream",
    "RpcChannel",
    "Undelivered",
    "client_tls",
    "client_tls_from_env",
    "error_for_status",
    "open_channel",
    "serve_services",
    "server_tls",
    "status_for",
    "unary_route",
]

log = logging.getLogger("everruns.rpc")

# The HPACK coder under h2 logs every header it encodes or decodes at DEBUG, the bearer token
# (`authorization`) included: a program that logs at DEBUG would write the token in clear.
_hpack_log = logging.getLogger("hpack")
_hpack_log.setLevel(max(_hpack_log.level, logging.INFO))

Reply = TypeVar("Reply")
Send = Callable[[Any], Awaitable[None]]


class Undelivered(Protocol):
    """What a server does with a reply its caller never takes: one that was made while the
    caller gave up on its call (a cancel notice on the call stream crossed it, or the Trio
    method returned in spite of the cancellation), or that could not be sent."""

    def handed(self, reply: Any) -> Sequence[Any]:
        """What ``reply`` hands its caller that must not be lost with it (claimed tasks);
        empty: nothing. Called on the asyncio thread for every reply: cheap, no I/O."""
        ...

    async def give_back(self, handed: Sequence[Any]) -> None:
        """Take back what `handed` returned for a reply its caller never took (a Trio
        function, run in the methods' nursery; bounded)."""
        ...


class _GiveBack:
    """A server's `Undelivered` (or none), bound to the loop and the nursery its methods run
    in; used on the asyncio thread."""

    def __init__(self, undelivered: Undelivered | None, aio: AioLoop, nursery: trio.Nursery):
        self._undelivered = undelivered
        self._aio = aio
        self._nursery = nursery

    def handed(self, reply: Any) -> Sequence[Any]:
        """What ``reply`` hands out (`Undelivered.handed`); empty without an `Undelivered`."""
        return () if self._undelivered is None else self._undelivered.handed(reply)

    def orphaned(self, reply: Any) -> None:
        """``reply`` reaches nobody: give back what it hands out."""
        self.soon(self.handed(reply))

    def soon(self, handed: Sequence[Any]) -> None:
        """Start the give-back of ``handed`` in the methods' nursery, unless the server is
        already gone (its callers' connections then drop, and the control plane releases what
        they held)."""
        undelivered = self._undelivered
        if not handed or undelivered is None:
            return
        nursery = self._nursery

        def start() -> None:  # on the Trio thread
            try:
                nursery.start_soon(undelivered.give_back, handed)
            except RuntimeError:  # the nursery has closed: the server is stopping
                log.debug(
                    "server stopping: %d undelivered item(s) left to the release", len(handed)
                )

        try:
            self._aio.token.run_sync_soon(start)
        except trio.RunFinishedError:
            pass


# everruns error -> gRPC status, most specific first.
_STATUS_OF: Sequence[tuple[type[BaseException], Status]] = (
    (NotFound, Status.NOT_FOUND),
    (AlreadyExists, Status.ALREADY_EXISTS),
    (StaleLease, Status.FAILED_PRECONDITION),
    (ConcurrencyConflict, Status.ABORTED),
    (FailedPrecondition, Status.FAILED_PRECONDITION),
    (ResourceExhausted, Status.RESOURCE_EXHAUSTED),
    (InvalidArgument, Status.INVALID_ARGUMENT),
    (PayloadError, Status.INVALID_ARGUMENT),
    (DatabaseUnavailable, Status.UNAVAILABLE),
    (DatabaseError, Status.INTERNAL),
)

# gRPC status -> everruns error raised at the client.
_ERROR_OF: Mapping[Status, type[EverrunsError]] = {
    Status.NOT_FOUND: NotFound,
    Status.ALREADY_EXISTS: AlreadyExists,
    Status.FAILED_PRECONDITION: FailedPrecondition,
    Status.ABORTED: ConcurrencyConflict,
    Status.RESOURCE_EXHAUSTED: ResourceExhausted,
    Status.INVALID_ARGUMENT: InvalidArgument,
}


def status_for(exc: BaseException) -> Status:
    """The gRPC status an everruns error is sent as."""
    for kind, status in _STATUS_OF:
        if isinstance(exc, kind):
            return status
    return Status.INTERNAL if not isinstance(exc, EverrunsError) else Status.UNAVAILABLE


MAX_ERROR_MESSAGE = 2000
"""Characters of an error message sent to a caller. It travels in a trailer (HPACK): an
error quoting a huge value (a 100 kB run id) would pass the caller's header-list limit, and
the caller would tear down the whole connection, failing every other call on it."""


def capped(message: str) -> str:
    """``message``, cut to `MAX_ERROR_MESSAGE` characters (saying how long it was)."""
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return f"{message[: MAX_ERROR_MESSAGE - 40]}... ({len(message)} characters in all)"


def _to_grpc_error(exc: BaseException, route: str) -> grpclib.exceptions.GRPCError:
    if isinstance(exc, EverrunsError) and not isinstance(exc, RpcError):
        status = status_for(exc)
        if status is Status.UNAVAILABLE:
            log.warning("%s: %s", route, exc)
        return grpclib.exceptions.GRPCError(status, capped(str(exc)))
    log.error("%s failed", route, exc_info=exc)
    return grpclib.exceptions.GRPCError(
        Status.INTERNAL, capped(f"internal error in {route}: {type(exc).__name__}: {exc}")
    )


def _bearer(token: str | None) -> dict[str, str] | None:
    """The metadata a caller sends: its bearer token, if it has one."""
    return {"authorization": f"Bearer {token}"} if token else None


def _bearer_ok(metadata: Any, token: str | None) -> bool:
    if token is None:
        return True
    got = str(metadata.get("authorization", "")) if metadata is not None else ""
    expected = f"Bearer {token}"
    return hmac.compare_digest(got.encode(), expected.encode())


def _verdict(exc: Exception, route: str) -> grpclib.exceptions.GRPCError:
    """The gRPC error a method's exception (not a GRPCError) ends its call with."""
    if isinstance(exc, CallAbandoned):
        return grpclib.exceptions.GRPCError(
            Status.UNAVAILABLE, "the control plane is shutting down"
        )
    return _to_grpc_error(exc, route)


_UNAUTHENTICATED = "missing or wrong bearer token; set EVERRUNS_AUTH_TOKEN to the server's token"

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest message a server reads unless told otherwise (EVERRUNS_MAX_MESSAGE_BYTES)."""

MAX_MESSAGE_HEADER = "everruns-max-message-bytes"
"""The call stream's initial metadata: the server's message limit, so that a caller refuses a
call over it itself instead of sending it (the server would end the stream, and every call on
it, since the refused message's call id is in the part it does not read)."""

_PREFIX = struct.Struct(">?I")  # gRPC's message prefix: compressed flag, length


def _over_limit(what: str, size: int, limit: int) -> grpclib.exceptions.GRPCError:
    return grpclib.exceptions.GRPCError(
        Status.RESOURCE_EXHAUSTED,
        f"{what} of {size} bytes is over the control plane's limit of {limit} bytes "
        "(EVERRUNS_MAX_MESSAGE_BYTES)",
    )


async def _recv_capped(
    stream: grpclib.server.Stream[Any, Any], limit: int, what: str
) -> Any | None:
    """`grpclib.server.Stream.recv_message`, refusing a message over ``limit`` bytes from its
    prefix, before its body is read: grpclib reads any declared length in full, acknowledging
    it as it comes (HTTP/2 flow control bounds only what is unread).

    Otherwise as grpclib does it (`grpclib.stream.recv_message` and the server stream's
    method, private attributes included: tests/unit/test_grpc_message_limit.py fails if they
    change): the dispatch of the received message to grpclib's event listeners, and the
    stream's and the connection's counts.

    Returns:
        The message, or None when the caller has ended its side of the stream.

    Raises:
        GRPCError: RESOURCE_EXHAUSTED, the message is over ``limit``; the stream is not read
            further.
    """
    h2_stream = stream._stream
    meta = await h2_stream.recv_data(5)
    if not meta:
        return None
    compressed, size = _PREFIX.unpack(meta)
    if compressed:
        raise NotImplementedError("Compression not implemented")
    if size > limit:
        raise _over_limit(what, size, limit)
    data = await h2_stream.recv_data(size)
    assert len(data) == size, f"{len(data)} != {size}"
    message = stream._codec.decode(data, stream._recv_type)
    (message,) = await stream._dispatch.recv_message(message)
    stream._messages_received += 1
    connection = h2_stream.connection
    connection.messages_received += 1
    connection.last_message_received = time.monotonic()
    return message


def _wrap_handler(
    route: str,
    handler: grpclib.const.Handler,
    impl: Callable[..., Awaitable[Any]],
    token: str | None,
    aio: AioLoop,
    nursery: trio.Nursery,
    give_back: _GiveBack,
    max_message: int,
) -> grpclib.const.Handler:
    streaming = handler.cardinality is grpclib.const.Cardinality.UNARY_STREAM
    what = f"{route.rpartition('/')[2]} request"

    async def serve_one(stream: grpclib.server.Stream[Any, Any]) -> None:  # runs on asyncio
        if not _bearer_ok(stream.metadata, token):
            raise grpclib.exceptions.GRPCError(Status.UNAUTHENTICATED, _UNAUTHENTICATED)
        request = await _recv_capped(stream, max_message, what)
        if request is None:
            raise grpclib.exceptions.GRPCError(Status.INVALID_ARGUMENT, "empty request")
        try:
            if streaming:

                async def send(message: Any) -> None:  # runs on Trio
                    await aio.run_aio(stream.send_message, message)

                await aio.run_trio(nursery, impl, request, send)
            else:
                reply = await aio.run_trio(nursery, impl, request, orphan=give_back.orphaned)
                try:
                    await stream.send_message(reply)
                except (
                    h2.exceptions.StreamClosedError,
                    grpclib.exceptions.StreamTerminatedError,
                    asyncio.CancelledError,  # the stream was reset while the reply waited
                ):
                    give_back.orphaned(reply)
                    raise
        except grpclib.exceptions.GRPCError:
            raise
        except (h2.exceptions.StreamClosedError, grpclib.exceptions.StreamTerminatedError):
            log.debug("%s: the client went away before the reply", route)
        except Exception as exc:
            raise _verdict(exc, route) from exc

    return grpclib.const.Handler(
        serve_one, handler.cardinality, handler.request_type, handler.reply_type
    )


# A unary method reachable over the call stream: its Trio implementation, request and reply
# types.
_Target = tuple[Callable[..., Awaitable[Any]], type[Any], type[Any]]

CALLS_ROUTE = "/everruns.v1.CallService/Calls"
_CALL_MESSAGE = "call-stream message"
MAX_CALLS_IN_FLIGHT = 1000  # per call stream, as HTTP/2 bounds a connection's unary calls
_ANSWERED_KEPT = 64  # per call stream: the latest answered calls a cancel notice may cross


def _calls_handler(
    targets: Mapping[str, _Target],
    token: str | None,
    aio: AioLoop,
    nursery: trio.Nursery,
    give_back: _GiveBack,
    max_message: int,
    codec: FastCodec,
) -> grpclib.const.Handler:
    """The handler of `CallService.Calls`: each `Call` runs the unary method it names, as a
    unary call of that method would, and is answered by a `CallReply` as it finishes.

    A cancel notice stops a call still running; one that crosses a reply already made (the
    caller gave up on it, and drops the reply when it comes) has ``give_back`` take back
    what the reply handed out. So do a reply the method made in spite of the cancellation and
    one that could not be sent."""
    from everruns._proto.everruns import v1 as pb

    async def run(call: Any) -> tuple[Any, Sequence[Any]]:
        """The `CallReply` of one call (its method's reply, or the status it failed with),
        and what the reply hands out (`Undelivered.handed`)."""
        handed: Sequence[Any] = ()
        try:
            target = targets.get(call.route)
            if target is None:
                raise grpclib.exceptions.GRPCError(
                    Status.UNIMPLEMENTED, f"{call.route} cannot be called over Calls"
                )
            impl, request_type, reply_type = target
            try:
                request = codec.decode(call.request, request_type)
            except Exception as exc:
                raise grpclib.exceptions.GRPCError(
                    Status.INVALID_ARGUMENT, f"{call.route}: malformed request: {exc}"
                ) from exc
            reply = await aio.run_trio(nursery, impl, request, orphan=give_back.orphaned)
            handed = give_back.handed(reply)
            return pb.CallReply(id=call.id, reply=codec.encode(reply, reply_type)), handed
        except Exception as exc:  # a reply that cannot be encoded fails as INTERNAL too
            give_back.soon(handed)  # the failure goes instead of the reply
            error = (
                exc if isinstance(exc, grpclib.exceptions.GRPCError) else _verdict(exc, call.route)
            )
            failed = pb.CallReply(id=call.id, status=error.status.name, message=error.message or "")
            return failed, ()

    async def serve_calls(stream: grpclib.server.Stream[Any, Any]) -> None:  # runs on asyncio
        if not _bearer_ok(stream.metadata, token):
            raise grpclib.exceptions.GRPCError(Status.UNAUTHENTICATED, _UNAUTHENTICATED)
        # The caller waits for it before its first call, and learns the message limit.
        await stream.send_initial_metadata(metadata={MAX_MESSAGE_HEADER: str(max_message)})
        answering: set[asyncio.Task[None]] = set()  # every call not yet answered
        cancellable: dict[int, asyncio.Task[None]] = {}  # those still running their method
        # What the latest replies handed out, by call id, until a cancel notice that crossed
        # one of them (its caller drops it) has it given back. The most recent ones only
        # (`_ANSWERED_KEPT`): such a notice was sent before the reply arrived, so it comes a
        # moment after the reply left.
        answered: dict[int, Sequence[Any]] = {}
        sending = asyncio.Lock()  # one message at a time: a large one is several frames

        async def send(out: Any) -> None:
            async with sending:
                await stream.send_message(out)

        def uncancellable(call_id: int, task: object) -> None:
            if cancellable.get(call_id) is task:  # not a later call that reused the id
                del cancellable[call_id]

        async def answer(call: Any) -> None:
            out, handed = await run(call)
            # From here a cancel notice no longer reaches it: a reply cut off midway would
            # garble every message after it.
            uncancellable(call.id, asyncio.current_task())
            if handed:
                answered.pop(call.id, None)  # kept last
                answered[call.id] = handed
                if len(answered) > _ANSWERED_KEPT:
                    del answered[next(iter(answered))]
            try:
                await send(out)
            except (
                h2.exceptions.StreamClosedError,
                grpclib.exceptions.StreamTerminatedError,
                asyncio.CancelledError,  # the stream was reset (or ended) while the reply waited
            ) as exc:
                if answered.get(call.id) is handed:
                    give_back.soon(answered.pop(call.id))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.debug("%s: the client went away before the reply", call.route)

        def forget(call_id: int, task: asyncio.Task[None]) -> None:
            answering.discard(task)
            counted.discard(task)
            uncancellable(call_id, task)

        # The calls that count against MAX_CALLS_IN_FLIGHT: those in `answering` but the ones
        # cancelled. The caller frees a call's place as it sends the cancel notice, and its next
        # call may follow in the same read, before the cancelled task has ended.
        counted: set[asyncio.Task[None]] = set()
        try:
            # A message over the limit ends the stream: its call id is in the part not read.
            while (call := await _recv_capped(stream, max_message, _CALL_MESSAGE)) is not None:
                if call.cancel:
                    task = cancellable.get(call.id)
                    if task is not None:
                        task.cancel()
                        counted.discard(task)
                    else:  # answered already: the caller drops the reply when it comes
                        give_back.soon(answered.pop(call.id, ()))
                elif call.id in cancellable:
                    raise grpclib.exceptions.GRPCError(
                        Status.INVALID_ARGUMENT, f"call id {call.id} is already in flight"
                    )
                elif len(counted) >= MAX_CALLS_IN_FLIGHT:
                    await send(
                        pb.CallReply(
                            id=call.id,
                            status=Status.RESOURCE_EXHAUSTED.name,
                            message=f"more than {MAX_CALLS_IN_FLIGHT} calls in flight on one "
                            "call stream",
                        )
                    )
                else:
                    task = asyncio.ensure_future(answer(call))
                    answering.add(task)
                    counted.add(task)
                    cancellable[call.id] = task
                    task.add_done_callback(partial(forget, call.id))
            # The caller has sent its last call: answer those still running, then end.
            while answering:
                await asyncio.wait(set(answering))
        finally:
            for task in answering:
                task.cancel()
            if answering:
                await asyncio.wait(set(answering))

    return grpclib.const.Handler(
        serve_calls, grpclib.const.Cardinality.STREAM_STREAM, pb.Call, pb.CallReply
    )


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS context for serving gRPC (HTTP/2 over TLS) with a PEM certificate and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])
    return context


def client_tls(ca_file: str | None = None) -> ssl.SSLContext:
    """A TLS context for calling a control plane; trusts ``ca_file`` (else the system CAs)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    return context


def client_tls_from_env(env: Mapping[str, str]) -> ssl.SSLContext | None:
    """The TLS context callers of a control plane use, from the environment.

    ``EVERRUNS_TLS_CA`` names a PEM file of certificates to trust (for a private CA);
    ``EVERRUNS_TLS`` on (1/true/yes/on) uses TLS with the system's CAs. Neither: plaintext.

    Raises:
        ConfigError: ``EVERRUNS_TLS_CA`` does not name a readable certificate file, or
            ``EVERRUNS_TLS`` is not an on/off value (refused rather than read as plaintext).
    """
    # Read first, so that a mistyped switch is refused whatever else is set.
    use_tls = switch_from_env(env, "EVERRUNS_TLS", default=False)
    ca_file = env.get("EVERRUNS_TLS_CA") or None
    if ca_file is not None:
        try:
            return client_tls(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"EVERRUNS_TLS_CA={ca_file!r} cannot be used: {exc}") from exc
    return client_tls(None) if use_tls else None


class _Servable:
    """A grpclib servable built from a generated base's routes and a Trio implementation."""

    def __init__(self, mapping: dict[str, grpclib.const.Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._mapping


class _CorkedTransport:
    """An asyncio transport whose writes within one step of the event loop go out together.

    grpclib writes every HTTP/2 frame as soon as it is made: a unary response is three sends
    (headers, message, trailers) and a received message adds window updates. Each send to a
    waiting peer costs a wake-up of that peer, and on a small virtual machine that wake-up is
    the dearest part of a small call. Here the frames of one step are joined and sent by a
    callback scheduled for right after it.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: Sequence[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _corked(protocol: H2Protocol, opened: set[asyncio.BaseTransport] | None = None) -> H2Protocol:
    """``protocol``, writing through a `_CorkedTransport`; while its connection is open, its
    transport is in ``opened`` (when given)."""
    made, lost = protocol.connection_made, protocol.connection_lost
    mine: list[asyncio.BaseTransport] = []

    def connection_made(transport: asyncio.BaseTransport) -> None:
        if opened is not None:
            mine.append(transport)
            opened.add(transport)
        made(cast(asyncio.BaseTransport, _CorkedTransport(cast(asyncio.Transport, transport))))

    def connection_lost(exc: BaseException | None) -> None:
        if opened is not None:
            opened.difference_update(mine)
        lost(exc)

    protocol.connection_made = connection_made  # type: ignore[method-assign]
    protocol.connection_lost = connection_lost  # type: ignore[method-assign]
    return protocol


class _Server(grpclib.server.Server):
    """grpclib's server, writing corked, whose `close` also closes the connections it has open.

    grpclib's own `close` stops listening and cancels the running methods but leaves
    connections open, so a client with a call in flight would wait for its own timeout; closing
    them tells it at once that the server is gone.
    """

    def __init__(
        self,
        servables: list[Any],
        calls: Callable[[FastCodec], grpclib.const.Handler] | None = None,
    ) -> None:
        # Made here, on the loop's thread: a codec's first making imports (wire.py).
        codec = FastCodec()
        if calls is not None:
            servables = [*servables, _Servable({CALLS_ROUTE: calls(codec)})]
        super().__init__(servables, codec=codec)
        self._open: set[asyncio.BaseTransport] = set()

    def _protocol_factory(self) -> H2Protocol:
        return _corked(super()._protocol_factory(), self._open)

    def close(self) -> None:
        super().close()
        for transport in list(self._open):
            transport.close()


CONNECT_TIMEOUT = 5.0
"""Seconds a new connection has to come up: connected (TLS included) and answered by the peer's
first HTTP/2 frame, which a control plane sends at once. A peer that accepts connections but
stays silent (a hung process, a listener that is not a control plane, an address black-holed
behind a proxy) fails a call after this long rather than after the call's own deadline."""


class _NoHandshake(ConnectionError):
    """A new connection was not up (answered at the HTTP/2 level) within its deadline."""


def _greeting(protocol: H2Protocol) -> asyncio.Future[bool]:
    """A future that becomes True when the first bytes from the peer have been processed on
    ``protocol``'s connection (an HTTP/2 server's first frame is its SETTINGS), or False when
    the connection is lost before."""
    greeted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    received, lost = protocol.data_received, protocol.connection_lost

    def data_received(data: bytes) -> None:
        received(data)
        if not greeted.done():
            greeted.set_result(True)

    def connection_lost(exc: BaseException | None) -> None:
        if not greeted.done():
            greeted.set_result(False)
        lost(exc)

    protocol.data_received = data_received  # type: ignore[method-assign]
    protocol.connection_lost = connection_lost  # type: ignore[method-assign]
    return greeted


class _Channel(Channel):
    """grpclib's channel, writing corked, whose connections must come up within
    ``connect_timeout`` seconds (`CONNECT_TIMEOUT`) or fail with `_NoHandshake`."""

    def __init__(self, *args: Any, connect_timeout: float = CONNECT_TIMEOUT, **kwargs: Any) -> None:
        self.fast_codec = FastCodec()
        self._connect_timeout = connect_timeout
        self._greeted: asyncio.Future[bool] | None = None
        super().__init__(*args, codec=self.fast_codec, **kwargs)

    def _protocol_factory(self) -> H2Protocol:
        protocol = _corked(super()._protocol_factory())
        # One connection is made at a time (grpclib holds its connect lock around this).
        self._greeted = _greeting(protocol)
        return protocol

    async def _create_connection(self) -> H2Protocol:
        self._greeted = None
        protocol: H2Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                protocol = await super()._create_connection()
                greeted = self._greeted
                if greeted is not None and not await greeted:
                    raise ConnectionResetError(
                        f"the peer at {self._host}:{self._port} closed the connection without "
                        "answering"
                    )
        except BaseException as exc:
            if protocol is not None:
                protocol.processor.close("not answered")  # closes the transport too
            if isinstance(exc, TimeoutError):
                raise _NoHandshake(
                    f"no answer from the control plane at {self._host}:{self._port} within "
                    f"{self._connect_timeout:g} s of connecting (it accepted the connection, "
                    "or the connection attempt hung)"
                ) from None
            raise
        return protocol


def _method_name(handler: grpclib.const.Handler) -> str:
    """The snake_case name of a generated base's method for ``handler``'s route ("/pkg.Service/
    MethodName"): the name of the Trio method that implements it, and of the stub's method."""
    return str(handler.func.__name__.split("__rpc_", 1)[-1])


def _implementation(route: str, handler: grpclib.const.Handler, impl: Any) -> Any:
    name = _method_name(handler)
    method = getattr(impl, name, None)
    if method is None:
        raise TypeError(f"{type(impl).__name__} does not implement {route} ({name})")
    return method


def _servable(
    base: Any,
    impl: Any,
    token: str | None,
    aio: AioLoop,
    nursery: trio.Nursery,
    give_back: _GiveBack,
    max_message: int,
) -> _Servable:
    return _Servable(
        {
            route: _wrap_handler(
                route,
                handler,
                _implementation(route, handler, impl),
                token,
                aio,
                nursery,
                give_back,
                max_message,
            )
            for route, handler in base.__mapping__().items()
        }
    )


def _unary_targets(services: Sequence[tuple[Any, Any]]) -> dict[str, _Target]:
    """The unary methods of ``services``, by route."""
    return {
        route: (_implementation(route, handler, impl), handler.request_type, handler.reply_type)
        for base, impl in services
        for route, handler in base.__mapping__().items()
        if handler.cardinality is grpclib.const.Cardinality.UNARY_UNARY
    }


async def serve_services(
    services: Sequence[tuple[Any, Any]],
    host: str,
    port: int,
    *,
    auth_token: str | None = None,
    tls: ssl.SSLContext | None = None,
    closing: trio.Event | None = None,
    calls: bool = True,
    undelivered: Undelivered | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``(generated_base_instance, trio_impl)`` pairs on ``host:port`` until cancelled.

    With ``calls``, `CallService.Calls` is served too: every unary method of the pairs can be
    called over it. Reports the bound port (the real one when ``port`` is 0) through
    ``task_status``. On the way out ``closing`` is set before connections are closed, so
    handlers can tell a server shutdown from a client that went away. ``undelivered`` takes
    back what a reply its caller never takes handed out. A message over ``max_message_bytes``
    is refused (RESOURCE_EXHAUSTED) before its body is read.
    """
    aio = current_aio_loop()
    # The methods' Trio tasks run in a nursery of their own, shielded from the cancellation that
    # stops the server: they are cancelled by the server's close, after `closing` is set, so a
    # method cut short by a shutdown can tell it from a client that went away.
    methods_scope = trio.CancelScope(shield=True)
    async with trio.open_nursery() as nursery:
        handlers: trio.Nursery = await nursery.start(_host_methods, methods_scope)
        give_back = _GiveBack(undelivered, aio, handlers)
        try:
            servables = [
                _servable(base, impl, auth_token, aio, handlers, give_back, max_message_bytes)
                for base, impl in services
            ]
            targets = _unary_targets(services)
            server = await call_in_loop(
                partial(
                    _Server,
                    servables,
                    partial(
                        _calls_handler,
                        targets,
                        auth_token,
                        aio,
                        handlers,
                        give_back,
                        max_message_bytes,
                    )
                    if calls
                    else None,
                )
            )
            try:
                await run_aio(partial(server.start, host, port, ssl=tls, reuse_address=True))
            except OSError as exc:
                raise ServerUnavailable(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from exc
            try:
                sockets = getattr(server._server, "sockets", None) or ()
                bound = sockets[0].getsockname()[1] if sockets else port
                task_status.started(bound)
                await trio.sleep_forever()
            finally:
                if closing is not None:
                    closing.set()
                with trio.move_on_after(5, shield=True):
                    await call_in_loop(server.close)
                    await run_aio(server.wait_closed)
        finally:
            methods_scope.cancel()


async def _host_methods(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[trio.Nursery]
) -> None:
    with scope:
        async with trio.open_nursery() as methods:
            task_status.started(methods)
            await trio.sleep_forever()


def _error_for(status: Status, message: str, what: str) -> EverrunsError:
    if status is Status.UNAVAILABLE:
        return ServerUnavailable(f"{what}: control plane unavailable: {message}")
    if status is Status.UNAUTHENTICATED:
        return RpcError(message, status=status.name)
    kind = _ERROR_OF.get(status)
    if kind is not None:
        return kind(message)
    return RpcError(f"{what}: {status.name}: {message}", status=status.name)


def _status_named(name: str) -> Status:
    return Status.__members__.get(name, Status.UNKNOWN)


def error_for_status(status_name: str, message: str, what: str) -> EverrunsError:
    """The everruns error for a gRPC status named in a reply (a refused item of a batch)."""
    status = _status_named(status_name)
    return _error_for(status, message or status.name, what)


def _to_everruns_error(
    exc: BaseException, what: str, timeout: float | None = None
) -> EverrunsError:
    if isinstance(exc, grpclib.exceptions.GRPCError):
        return _error_for(exc.status, exc.message or exc.status.name, what)
    if isinstance(exc, _NoHandshake):
        return ServerTimeout(f"{what}: {exc}")
    if isinstance(exc, TimeoutError):  # the call's own deadline; str(TimeoutError()) is ""
        within = f" within {timeout:g} s" if timeout is not None else " in time"
        return ServerTimeout(f"{what}: no answer from the control plane{within}")
    if isinstance(
        exc, (OSError, grpclib.exceptions.StreamTerminatedError, h2.exceptions.StreamClosedError)
    ):
        return ServerUnavailable(f"{what}: control plane unreachable: {exc}")
    return RpcError(f"{what}: {type(exc).__name__}: {exc}")


# What a call can fail with below the everruns errors: a reply that does not decode (WireError)
# and an HTTP/2 stream closed under a write (h2's StreamClosedError) included.
_CALL_ERRORS = (
    grpclib.exceptions.GRPCError,
    grpclib.exceptions.StreamTerminatedError,
    grpclib.exceptions.ProtocolError,
    h2.exceptions.StreamClosedError,
    WireError,
    OSError,
)


class _Unsupported(Exception):
    """The control plane does not serve `CallService.Calls`: the call was not run."""


_CALL_FIELDS = 16  # the most a `Call`'s id and flags take


class _Opened:
    """One open `Calls` stream: the grpclib stream, its write lock and its writes in flight."""

    __slots__ = ("limit", "sending", "stream", "writes")

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream = stream
        self.limit = limit  # the control plane's message limit (0: not said)
        self.sending = asyncio.Lock()  # one message at a time: a large one is several frames
        self.writes: set[asyncio.Task[None]] = set()


class CallStream:
    """The caller's end of `CallService.Calls`: unary calls sent as messages of one stream,
    opened at the first call and again after it breaks. An asyncio object: `RpcChannel` uses
    it from Trio through `run_aio`; asyncio code (the benchmark's simulated workers) may call
    it directly, with the codec ``channel`` was made with."""

    def __init__(
        self, channel: Channel, metadata: Mapping[str, str] | None, codec: FastCodec
    ) -> None:
        self._channel = channel
        self._metadata = metadata
        self._codec = codec
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._opened: _Opened | None = None
        self._opening = asyncio.Lock()
        # Calls beyond the control plane's limit per stream wait here, as unary calls beyond
        # HTTP/2's limit of streams wait for one.
        self._slots = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._readers: set[asyncio.Task[None]] = set()
        self._closed = False
        self.unsupported = False

    async def call(
        self, route: str, request: Any, reply_type: type[Any], timeout: float | None
    ) -> Any:
        """Run the unary method at ``route`` over the stream and return its reply.

        Raises:
            _Unsupported: the control plane has no `Calls`; the call was not run.
            GRPCError: the method's verdict, as the unary call would have raised it;
                RESOURCE_EXHAUSTED, unsent, for a request over the control plane's message
                limit (which it tells as the stream opens).
            StreamTerminatedError, OSError: the stream broke; the call may or may not have run.
            TimeoutError: no reply within ``timeout`` (opening the stream included); a call
                already sent is cancelled at the server.
        """
        message = self._codec.encode(request, type(request))
        async with asyncio.timeout(timeout), self._slots:
            opened = self._opened or await self._open()
            if opened.limit:
                # Refused here rather than ending the stream, and the other calls on it.
                size = field_bytes(len(message)) + field_bytes(len(route)) + _CALL_FIELDS
                if size > opened.limit:
                    raise _over_limit(f"{route.rpartition('/')[2]} request", size, opened.limit)
            call_id = next(self._ids)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending[call_id] = future
            try:
                self._write(opened, call_id, route, message)
                reply = await future
            except asyncio.CancelledError:
                unanswered = self._pending.pop(call_id, None) is not None
                # A reply that came as the caller gave up is dropped all the same: the control
                # plane hears of it as of any call given up on, and takes back what the reply
                # handed out (claimed tasks) instead of leaving it to its stale rule.
                dropped = future.done() and not future.cancelled() and not future.exception()
                if (unanswered or dropped) and self._opened is opened:
                    # Written after the call itself (one lock, taken in turn).
                    self._write(opened, call_id, "", b"", cancel=True)
                raise
            finally:
                self._pending.pop(call_id, None)
        if reply.status:
            raise grpclib.exceptions.GRPCError(_status_named(reply.status), reply.message or None)
        return self._codec.decode(reply.reply, reply_type)

    async def message_limit(self) -> int:
        """The control plane's message limit as the stream said when it opened (opening it
        now if it is not open); 0: not said.

        Raises:
            _Unsupported, StreamTerminatedError, GRPCError, OSError: as `call` for opening.
        """
        opened = self._opened or await self._open()
        return opened.limit

    def close(self) -> None:
        """Stop using the stream: calls in flight fail, later calls are refused."""
        self._closed = True
        for reader in list(self._readers):
            reader.cancel()

    async def _open(self) -> _Opened:
        from everruns._proto.everruns import v1 as pb

        async with self._opening:
            if self._opened is not None:
                return self._opened
            if self._closed:
                raise grpclib.exceptions.StreamTerminatedError("the channel is closed")
            stream = self._channel.request(
                CALLS_ROUTE,
                grpclib.const.Cardinality.STREAM_STREAM,
                pb.Call,
                pb.CallReply,
                metadata=self._metadata,
            )
            await stream.__aenter__()
            try:
                await stream.send_request()
                # The control plane answers the opening at once. One without `Calls` answers
                # UNIMPLEMENTED in headers alone (no content type) and resets the stream;
                # grpclib reports either first, so the headers decide.
                try:
                    await stream.recv_initial_metadata()
                except (
                    grpclib.exceptions.GRPCError,
                    grpclib.exceptions.StreamTerminatedError,
                ) as exc:
                    headers = dict(getattr(stream._stream, "headers", None) or ())
                    if headers.get("grpc-status") == str(Status.UNIMPLEMENTED.value):
                        self.unsupported = True
                        raise _Unsupported(headers.get("grpc-message", "")) from exc
                    raise
            except BaseException as exc:
                await stream.__aexit__(type(exc), exc, None)
                raise
            initial: Mapping[str, Any] = stream.initial_metadata or {}
            said = str(initial.get(MAX_MESSAGE_HEADER) or "")
            opened = self._opened = _Opened(stream, int(said) if said.isdigit() else 0)
            reader = asyncio.ensure_future(self._read(opened))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
            return opened

    def _write(
        self, opened: _Opened, call_id: int, route: str, request: bytes, *, cancel: bool = False
    ) -> None:
        """Send a `Call` whole, in its turn, whatever happens to the caller meanwhile; if it
        cannot be sent, the call fails with why."""
        from everruns._proto.everruns import v1 as pb

        async def write() -> None:
            async with opened.sending:
                await opened.stream.send_message(
                    pb.Call(id=call_id, route=route, request=request, cancel=cancel)
                )

        def written(task: asyncio.Task[None]) -> None:
            opened.writes.discard(task)
            error = None if task.cancelled() else task.exception()
            if error is not None:
                log.debug("call stream: sending call %d failed: %s", call_id, error)
                future = None if cancel else self._pending.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_exception(error)

        task = asyncio.ensure_future(write())
        opened.writes.add(task)
        task.add_done_callback(written)

    async def _read(self, opened: _Opened) -> None:
        error: BaseException = grpclib.exceptions.StreamTerminatedError(
            "the control plane ended the call stream"
        )
        try:
            while (reply := await opened.stream.recv_message()) is not None:
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except asyncio.CancelledError:
            error = grpclib.exceptions.StreamTerminatedError("the channel is closed")
            raise
        except (grpclib.exceptions.GRPCError, grpclib.exceptions.StreamTerminatedError) as exc:
            error = exc
        except Exception as exc:  # anything else breaks the stream as a broken connection does
            error = grpclib.exceptions.StreamTerminatedError(f"the call stream broke: {exc!r}")
        finally:
            if self._opened is opened:
                self._opened = None
            pending = list(self._pending.values())
            self._pending.clear()
            for future in pending:
                if not future.done():
                    future.set_exception(error)
            for write in opened.writes:
                write.cancel()  # a write stuck on flow control would never end
            ended = ConnectionError("the call stream ended")
            await asyncio.shield(opened.stream.__aexit__(type(ended), ended, None))


_ROUTES: dict[tuple[type[Any], str], tuple[str, grpclib.const.Handler] | None] = {}


def _route_of(method: Callable[..., Any]) -> tuple[str, grpclib.const.Handler] | None:
    """The route and handler (cardinality, request and reply types) of a generated stub
    method, read from its service's generated base; None if it is not one."""
    stub = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    key = (type(stub), name)
    if key not in _ROUTES:
        from everruns._proto.everruns import v1 as pb

        base = getattr(pb, type(stub).__name__.removesuffix("Stub") + "Base", None)
        mapping = base().__mapping__() if isinstance(base, type) else {}
        _ROUTES[key] = next(
            ((route, h) for route, h in mapping.items() if _method_name(h) == name), None
        )
    return _ROUTES[key]


def unary_route(method: Callable[..., Any]) -> tuple[str, type[Any]] | None:
    """The route and reply type of a generated unary stub method (None: not one), as
    `CallStream.call` takes them."""
    found = _route_of(method)
    if found is None or found[1].cardinality is not grpclib.const.Cardinality.UNARY_UNARY:
        return None
    return found[0], found[1].reply_type


class RpcChannel:
    """A gRPC channel usable from Trio; carries the bearer token when one is configured.

    Unary calls go over `CallService.Calls` (one long-lived stream, a message each way per
    call) when ``calls`` is given and the control plane serves it, else as unary calls.
    """

    def __init__(
        self,
        channel: Channel,
        address: str,
        auth_token: str | None,
        calls: CallStream | None = None,
    ) -> None:
        self._channel = channel
        self.address = address
        self._metadata = _bearer(auth_token)
        self._calls = calls

    @property
    def raw(self) -> Channel:
        """The grpclib channel (give it to generated stubs)."""
        return self._channel

    async def message_limit(self) -> int:
        """The largest message the control plane reads, as its call stream says when it opens
        (opened here if it is not yet); 0: not known (no call stream, an older control plane,
        or the stream cannot be opened now: the next call will say why)."""
        calls = self._calls
        if calls is None or calls.unsupported:
            return 0
        # Bounded: a control plane that takes the connection but never opens the stream
        # must not hold the caller past a connection's own timeout.
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                return await run_aio(calls.message_limit)
            except (_Unsupported, *_CALL_ERRORS):
                return 0
        return 0

    async def unary(
        self,
        method: Callable[..., Awaitable[Reply]],
        request: Any,
        *,
        timeout: float | None = None,
    ) -> Reply:
        """Call a unary stub method (e.g. ``stub.start_workflow``) and return its reply.

        Raises:
            ServerTimeout: the connection was not up within its `CONNECT_TIMEOUT`, or the call
                got no reply within ``timeout``.
            ServerUnavailable: no control plane answered.
            InvalidArgument: a text field of ``request`` cannot be encoded as UTF-8 (a lone
                surrogate); nothing was sent.
            NotFound, InvalidArgument, FailedPrecondition, ...: the server's verdict.
        """
        calls = self._calls
        route = unary_route(method) if calls is not None and not calls.unsupported else None
        try:
            if calls is not None and route is not None:
                try:
                    reply: Reply = await run_aio(calls.call, route[0], request, route[1], timeout)
                except _Unsupported:
                    pass  # not run: the unary call below runs it
                else:
                    return reply
            reply = await run_aio(
                partial(method, request, timeout=timeout, metadata=self._metadata)
            )
        except _CALL_ERRORS as exc:
            raise _to_everruns_error(exc, getattr(method, "__name__", "call"), timeout) from exc
        except UnicodeEncodeError as exc:
            # A text field UTF-8 cannot carry (a lone surrogate); nothing was sent.
            raise InvalidArgument(
                f"{getattr(method, '__name__', 'call')}: a text field of the request cannot be "
                f"sent as UTF-8: {exc}"
            ) from exc
        return reply

    async def stream(
        self, method: Callable[..., AsyncIterator[Reply]], request: Any
    ) -> AsyncIterator[Reply]:
        """Iterate a server-streaming stub method's replies (e.g. ``stub.stream_cancellations``).

        Each receive is its own bridged call, and the stream is closed, shielded, when
        iteration ends.

        Raises:
            ServerUnavailable: the stream could not be opened or broke.
        """
        route, reply_type = _stream_route(method)
        what = getattr(method, "__name__", "stream")
        cm = await call_in_loop(
            partial(
                self._channel.request,
                route,
                grpclib.const.Cardinality.UNARY_STREAM,
                type(request),
                reply_type,
                metadata=self._metadata,
            )
        )
        try:
            stream = await run_aio(cm.__aenter__)
        except _CALL_ERRORS as exc:
            raise _to_everruns_error(exc, what) from exc
        try:
            try:
                await run_aio(partial(stream.send_message, request, end=True))
                while True:
                    reply = await run_aio(stream.recv_message)
                    if reply is None:
                        return
                    yield reply
            except _CALL_ERRORS as exc:
                raise _to_everruns_error(exc, what) from exc
        finally:
            with trio.move_on_after(2, shield=True):
                try:
                    await run_aio(stream.cancel)
                except Exception:  # the stream is already gone; nothing to close
                    pass
                try:
                    await run_aio(cm.__aexit__, None, None, None)
                except Exception:
                    pass


def _stream_route(method: Callable[..., Any]) -> tuple[str, type[Any]]:
    """The route and reply type of a generated server-streaming stub method."""
    found = _route_of(method)
    if found is None or found[1].cardinality is not grpclib.const.Cardinality.UNARY_STREAM:
        raise TypeError(f"{getattr(method, '__name__', method)!r} is not a server-streaming method")
    return found[0], found[1].reply_type


def _open(
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    auth_token: str | None,
    call_stream: bool,
    connect_timeout: float,
) -> tuple[_Channel, CallStream | None]:
    channel = _Channel(host, port, ssl=tls, connect_timeout=connect_timeout)
    calls = CallStream(channel, _bearer(auth_token), channel.fast_codec) if call_stream else None
    return channel, calls


def _close(channel: _Channel, calls: CallStream | None) -> None:
    if calls is not None:
        calls.close()
    channel.close()


@asynccontextmanager
async def open_channel(
    host: str,
    port: int,
    *,
    auth_token: str | None = None,
    tls: ssl.SSLContext | None = None,
    call_stream: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[RpcChannel]:
    """Open a channel to ``host:port`` for the block (connections are made lazily).

    With ``call_stream``, its unary calls go over `CallService.Calls` where the control plane
    serves it. A connection not up within ``connect_timeout`` seconds (connected and answered
    at the HTTP/2 level) fails the calls waiting for it with `ServerTimeout`.
    """
    channel, calls = await call_in_loop(
        partial(_open, host, port, tls, auth_token, call_stream, connect_timeout)
    )
    try:
        yield RpcChannel(channel, f"{host}:{port}", auth_token, calls)
    finally:
        with trio.move_on_after(2, shield=True):
            await call_in_loop(_close, channel, calls)
