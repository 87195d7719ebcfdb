"""grpclib bridged into Trio: serve Trio service implementations, call services from Trio.

Server side: `serve_services` takes objects whose async methods are Trio functions named like
the generated service bases' methods (`start_workflow(request) -> reply`; server streams take a
`send` function as second argument), and runs a grpclib server on the asyncio loop's thread that
calls them as tasks of a Trio nursery (`AioLoop.run_trio`). Everruns errors raised by a method
become gRPC statuses with their message; anything else becomes INTERNAL with a short message (the
traceback stays in the server log).
Authentication (bearer token, constant-time comparison) happens here, before any method runs.

Client side: `open_channel` and `RpcChannel.unary/stream` call generated stubs from Trio and map
gRPC statuses back onto everruns errors. No engine logic here.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar, cast

import grpclib.const
import grpclib.exceptions
import grpclib.server
import h2.exceptions
import trio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.protocol import H2Protocol

from everruns._aio.loop import AioLoop, CallAbandoned, call_in_loop, current_aio_loop, run_aio
from everruns._aio.wire import FastCodec
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
    ServerUnavailable,
    StaleLease,
)

__all__ = [
    "RpcChannel",
    "client_tls",
    "client_tls_from_env",
    "error_for_status",
    "open_channel",
    "serve_services",
    "server_tls",
    "status_for",
]

log = logging.getLogger("everruns.rpc")

Reply = TypeVar("Reply")
Send = Callable[[Any], Awaitable[None]]

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


def _to_grpc_error(exc: BaseException, route: str) -> grpclib.exceptions.GRPCError:
    if isinstance(exc, EverrunsError) and not isinstance(exc, RpcError):
        status = status_for(exc)
        if status is Status.UNAVAILABLE:
            log.warning("%s: %s", route, exc)
        return grpclib.exceptions.GRPCError(status, str(exc))
    log.error("%s failed", route, exc_info=exc)
    return grpclib.exceptions.GRPCError(
        Status.INTERNAL, f"internal error in {route}: {type(exc).__name__}: {exc}"
    )


def _bearer_ok(metadata: Any, token: str | None) -> bool:
    if token is None:
        return True
    got = str(metadata.get("authorization", "")) if metadata is not None else ""
    expected = f"Bearer {token}"
    return hmac.compare_digest(got.encode(), expected.encode())


def _wrap_handler(
    route: str,
    handler: grpclib.const.Handler,
    impl: Callable[..., Awaitable[Any]],
    token: str | None,
    aio: AioLoop,
    nursery: trio.Nursery,
) -> grpclib.const.Handler:
    streaming = handler.cardinality is grpclib.const.Cardinality.UNARY_STREAM

    async def serve_one(stream: grpclib.server.Stream[Any, Any]) -> None:  # runs on asyncio
        if not _bearer_ok(stream.metadata, token):
            raise grpclib.exceptions.GRPCError(
                Status.UNAUTHENTICATED,
                "missing or wrong bearer token; set EVERRUNS_AUTH_TOKEN to the server's token",
            )
        request = await stream.recv_message()
        if request is None:
            raise grpclib.exceptions.GRPCError(Status.INVALID_ARGUMENT, "empty request")
        try:
            if streaming:

                async def send(message: Any) -> None:  # runs on Trio
                    await aio.run_aio(stream.send_message, message)

                await aio.run_trio(nursery, impl, request, send)
            else:
                reply = await aio.run_trio(nursery, impl, request)
                await stream.send_message(reply)
        except grpclib.exceptions.GRPCError:
            raise
        except CallAbandoned as exc:
            raise grpclib.exceptions.GRPCError(
                Status.UNAVAILABLE, "the control plane is shutting down"
            ) from exc
        except (h2.exceptions.StreamClosedError, grpclib.exceptions.StreamTerminatedError):
            log.debug("%s: the client went away before the reply", route)
        except Exception as exc:
            raise _to_grpc_error(exc, route) from exc

    return grpclib.const.Handler(
        serve_one, handler.cardinality, handler.request_type, handler.reply_type
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
    ``EVERRUNS_TLS=1`` uses TLS with the system's CAs. Neither: plaintext.

    Raises:
        ConfigError: ``EVERRUNS_TLS_CA`` does not name a readable certificate file.
    """
    ca_file = env.get("EVERRUNS_TLS_CA") or None
    if ca_file is not None:
        try:
            return client_tls(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"EVERRUNS_TLS_CA={ca_file!r} cannot be used: {exc}") from exc
    if env.get("EVERRUNS_TLS", "").lower() in ("1", "true", "yes"):
        return client_tls(None)
    return None


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Made here, on the loop's thread: a codec's first making imports (wire.py).
        super().__init__(*args, codec=FastCodec(), **kwargs)
        self._open: set[asyncio.BaseTransport] = set()

    def _protocol_factory(self) -> H2Protocol:
        return _corked(super()._protocol_factory(), self._open)

    def close(self) -> None:
        super().close()
        for transport in list(self._open):
            transport.close()


class _Channel(Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, codec=FastCodec(), **kwargs)

    def _protocol_factory(self) -> H2Protocol:
        return _corked(super()._protocol_factory())


def _servable(
    base: Any, impl: Any, token: str | None, aio: AioLoop, nursery: trio.Nursery
) -> _Servable:
    mapping: dict[str, grpclib.const.Handler] = {}
    for route, handler in base.__mapping__().items():
        # Routes are "/pkg.Service/MethodName"; the Trio method is its snake_case name, the
        # same name the generated base gives it.
        name = handler.func.__name__.split("__rpc_", 1)[-1]
        method = getattr(impl, name, None)
        if method is None:
            raise TypeError(f"{type(impl).__name__} does not implement {route} ({name})")
        mapping[route] = _wrap_handler(route, handler, method, token, aio, nursery)
    return _Servable(mapping)


async def serve_services(
    services: Sequence[tuple[Any, Any]],
    host: str,
    port: int,
    *,
    auth_token: str | None = None,
    tls: ssl.SSLContext | None = None,
    closing: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``(generated_base_instance, trio_impl)`` pairs on ``host:port`` until cancelled.

    Reports the bound port (the real one when ``port`` is 0) through ``task_status``. On the
    way out ``closing`` is set before connections are closed, so handlers can tell a server
    shutdown from a client that went away.
    """
    aio = current_aio_loop()
    # The methods' Trio tasks run in a nursery of their own, shielded from the cancellation that
    # stops the server: they are cancelled by the server's close, after `closing` is set, so a
    # method cut short by a shutdown can tell it from a client that went away.
    methods_scope = trio.CancelScope(shield=True)
    async with trio.open_nursery() as nursery:
        handlers: trio.Nursery = await nursery.start(_host_methods, methods_scope)
        try:
            servables = [
                _servable(base, impl, auth_token, aio, handlers) for base, impl in services
            ]
            server = await call_in_loop(partial(_Server, servables))
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


def error_for_status(status_name: str, message: str, what: str) -> EverrunsError:
    """The everruns error for a gRPC status named in a reply (a refused item of a batch)."""
    status = Status.__members__.get(status_name, Status.UNKNOWN)
    return _error_for(status, message or status.name, what)


def _to_everruns_error(exc: BaseException, what: str) -> EverrunsError:
    if isinstance(exc, grpclib.exceptions.GRPCError):
        return _error_for(exc.status, exc.message or exc.status.name, what)
    if isinstance(exc, (OSError, grpclib.exceptions.StreamTerminatedError)):
        return ServerUnavailable(f"{what}: control plane unreachable: {exc}")
    return RpcError(f"{what}: {type(exc).__name__}: {exc}")


_CALL_ERRORS = (
    grpclib.exceptions.GRPCError,
    grpclib.exceptions.StreamTerminatedError,
    grpclib.exceptions.ProtocolError,
    OSError,
)


class RpcChannel:
    """A gRPC channel usable from Trio; carries the bearer token when one is configured."""

    def __init__(self, channel: Channel, address: str, auth_token: str | None) -> None:
        self._channel = channel
        self.address = address
        self._metadata = {"authorization": f"Bearer {auth_token}"} if auth_token else None

    @property
    def raw(self) -> Channel:
        """The grpclib channel (give it to generated stubs)."""
        return self._channel

    async def unary(
        self,
        method: Callable[..., Awaitable[Reply]],
        request: Any,
        *,
        timeout: float | None = None,
    ) -> Reply:
        """Call a unary stub method (e.g. ``stub.start_workflow``) and return its reply.

        Raises:
            ServerUnavailable: no control plane answered.
            NotFound, InvalidArgument, FailedPrecondition, ...: the server's verdict.
        """
        try:
            reply: Reply = await run_aio(
                partial(method, request, timeout=timeout, metadata=self._metadata)
            )
        except _CALL_ERRORS as exc:
            raise _to_everruns_error(exc, getattr(method, "__name__", "call")) from exc
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


_STREAM_ROUTES: dict[str, tuple[str, type[Any]]] = {}


def _stream_route(method: Callable[..., Any]) -> tuple[str, type[Any]]:
    """The route and reply type of a generated server-streaming stub method."""
    name = getattr(method, "__name__", "")
    found = _STREAM_ROUTES.get(name)
    if found is None:
        from everruns._proto.everruns import v1 as pb

        routes = {
            "stream_cancellations": (
                "/everruns.v1.WorkerService/StreamCancellations",
                pb.Cancellation,
            )
        }
        found = routes.get(name)
        if found is None:
            raise TypeError(f"{name!r} is not a known server-streaming method")
        _STREAM_ROUTES[name] = found
    return found


@asynccontextmanager
async def open_channel(
    host: str, port: int, *, auth_token: str | None = None, tls: ssl.SSLContext | None = None
) -> AsyncIterator[RpcChannel]:
    """Open a channel to ``host:port`` for the block (connections are made lazily)."""
    channel = await call_in_loop(partial(_Channel, host, port, ssl=tls))
    try:
        yield RpcChannel(channel, f"{host}:{port}", auth_token)
    finally:
        with trio.move_on_after(2, shield=True):
            await call_in_loop(channel.close)
