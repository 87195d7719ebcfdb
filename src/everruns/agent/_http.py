"""A minimal HTTP/1.1 client on Trio streams, for the LLM provider and the ``http_get`` tool.

One request per connection (``Connection: close``), over `trio.open_tcp_stream` or
`trio.open_ssl_over_tcp_stream`; responses framed by ``Content-Length``, chunked transfer
encoding, or the end of the connection. The response parser (`ResponseParser`) is pure — bytes
in, an `HttpResponse` out — so every framing corner is tested without sockets. It does not follow
redirects, use proxies, pool connections or decompress bodies (it never asks for compression),
and it sets no timeouts: callers wrap requests in ``trio.fail_after``. Errors are
`EverrunsError` (worth retrying: the network or the peer misbehaved) or `InvalidArgument` (the
request itself is wrong).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from everruns.errors import EverrunsError, InvalidArgument

__all__ = ["DEFAULT_MAX_BODY", "HttpResponse", "ResponseParser", "build_request", "request"]

DEFAULT_MAX_BODY = 16 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
USER_AGENT = "everruns-agent/0.1"


@attrs.frozen
class HttpResponse:
    """A complete HTTP response.

    Attributes:
        status: the status code, e.g. 200.
        reason: the reason phrase.
        headers: header (lower-cased name, value) pairs in arrival order.
        body: the body, de-chunked.
        truncated: the body is only the first bytes of a longer one (see `ResponseParser`).
    """

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    truncated: bool = False

    def header(self, name: str) -> str | None:
        """Return the last value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        found = None
        for key, value in self.headers:
            if key == wanted:
                found = value
        return found

    def text(self) -> str:
        """Return the body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """Return the body parsed as JSON.

        Raises:
            EverrunsError: the body is not JSON.
        """
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise EverrunsError(
                f"the HTTP {self.status} response is not JSON: {self.text()[:200]!r}"
            ) from exc


def _malformed(detail: str) -> EverrunsError:
    return EverrunsError(f"malformed HTTP response: {detail}")


def _decimal(text: str) -> int | None:
    """Return ``text`` as a non-negative decimal number, or None when it is not one."""
    # str.isdigit alone accepts digits int() refuses ('²'); int() also refuses more than
    # sys.get_int_max_str_digits() digits.
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:
        return None


class ResponseParser:
    """Incremental parser of one HTTP/1.1 response: `feed` bytes until it returns the response.

    Args:
        max_body: the largest body accepted, in bytes.
        head_request: the request was HEAD (the response has no body whatever it says).
        truncate: a longer body is cut to its first ``max_body`` bytes (the response is
            complete as soon as they have arrived, marked ``truncated``) instead of refused.
    """

    def __init__(
        self,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        head_request: bool = False,
        truncate: bool = False,
    ) -> None:
        self._buffer = bytearray()
        self._max_body = max_body
        self._head_request = head_request
        self._truncate = truncate
        self._truncated = False
        self._status = 0
        self._reason = ""
        self._headers: tuple[tuple[str, str], ...] = ()
        self._state = "head"  # head | length | chunk-size | chunk-data | trailers | eof | done
        self._remaining = 0
        self._body = bytearray()

    def feed(self, data: bytes | bytearray) -> HttpResponse | None:
        """Add received bytes; return the response once it is complete, else None.

        Raises:
            EverrunsError: the bytes are not a valid HTTP/1.1 response, or the body is too big
                (and ``truncate`` is false).
        """
        if self._state == "done":
            return None  # bytes after a complete response are ignored (we sent Connection: close)
        self._buffer += data
        while True:
            progressed, finished = self._step()
            if finished or self._truncated:
                self._state = "done"
                return self._response()
            if not progressed:
                return None

    def eof(self) -> HttpResponse:
        """The peer closed the connection: return the response if that completes it.

        Raises:
            EverrunsError: the connection closed before the response was complete.
        """
        if self._state == "eof":
            self._append_body(bytes(self._buffer))
            self._buffer.clear()
            self._state = "done"
            return self._response()
        if self._state == "done":
            raise _malformed("the response was already complete")
        where = "its headers" if self._state == "head" else "its body"
        raise EverrunsError(f"the server closed the connection in the middle of {where}")

    # -------------------------------------------------------------------------- internals

    def _response(self) -> HttpResponse:
        return HttpResponse(
            self._status, self._reason, self._headers, bytes(self._body), self._truncated
        )

    def _over_limit(self, size: int) -> bool:
        """Whether a body of ``size`` bytes is over the bound (raises unless ``truncate``)."""
        if size <= self._max_body:
            return False
        if not self._truncate:
            raise EverrunsError(f"the HTTP response body is larger than {self._max_body} bytes")
        return True

    def _append_body(self, data: bytes | bytearray) -> None:
        if self._over_limit(len(self._body) + len(data)):
            data = data[: self._max_body - len(self._body)]
            self._truncated = True
        self._body += data

    def _step(self) -> tuple[bool, bool]:
        """Advance the state machine once; return (made progress, response complete)."""
        if self._state == "head":
            return self._parse_head()
        if self._state == "length":
            take = min(self._remaining, len(self._buffer))
            self._append_body(bytes(self._buffer[:take]))
            del self._buffer[:take]
            self._remaining -= take
            return take > 0, self._remaining == 0
        if self._state == "chunk-size":
            line = self._line()
            if line is None:
                return False, False
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _malformed(f"bad chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise _malformed("negative chunk size")
            if size == 0:
                self._state = "trailers"
            else:
                self._over_limit(len(self._body) + size)  # raises unless truncating
                self._remaining = size
                self._state = "chunk-data"
            return True, False
        if self._state == "chunk-data":
            room = self._max_body - len(self._body)
            if self._remaining > room and self._truncate:
                # The chunk ends past the bound: keep what fits without buffering the rest.
                if len(self._buffer) <= room:
                    return False, False
                self._append_body(self._buffer)
                return True, True
            if len(self._buffer) < self._remaining + 2:
                return False, False
            if self._buffer[self._remaining : self._remaining + 2] != b"\r\n":
                raise _malformed("a chunk is not followed by CRLF")
            self._append_body(bytes(self._buffer[: self._remaining]))
            del self._buffer[: self._remaining + 2]
            self._state = "chunk-size"
            return True, False
        if self._state == "trailers":
            line = self._line()
            if line is None:
                return False, False
            return True, line == b""
        # "eof": everything until the peer closes is the body; `eof()` completes it.
        if self._over_limit(len(self._body) + len(self._buffer)):
            self._append_body(self._buffer)
            return True, True
        return False, False

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise _malformed("a line is too long")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _parse_head(self) -> tuple[bool, bool]:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise _malformed(f"the headers are longer than {MAX_HEAD_BYTES} bytes")
            return False, False
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        status = _decimal(parts[1]) if len(parts) >= 2 else None
        if status is None or not parts[0].startswith("HTTP/1."):
            raise _malformed(f"bad status line {status_line[:80]!r}")
        headers: list[tuple[str, str]] = []
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _malformed(f"bad header line {line[:80]!r}")
            headers.append((name.lower(), value.strip()))
        if 100 <= status < 200:
            return True, False  # an interim response (100 Continue): the real one follows
        self._status = status
        self._reason = parts[2] if len(parts) > 2 else ""
        self._headers = tuple(headers)
        lookup = dict(headers)
        if self._head_request or status in (204, 304):
            return True, True
        encoding = lookup.get("transfer-encoding", "").lower()
        if encoding:
            if encoding.split(",")[-1].strip() != "chunked":
                raise _malformed(f"unsupported transfer-encoding {encoding!r}")
            self._state = "chunk-size"
            return True, False
        if "content-length" in lookup:
            text = lookup["content-length"]
            length = _decimal(text)
            if length is None:
                raise _malformed(f"bad content-length {text[:80]!r}")
            self._over_limit(length)  # raises unless truncating
            self._remaining = length
            self._state = "length"
            return True, length == 0
        self._state = "eof"
        return True, False


def _check_header(name: str, value: str) -> None:
    if any(c in name for c in "\r\n:") or any(c in value for c in "\r\n"):
        raise InvalidArgument(f"HTTP header {name!r} contains a line break or a colon")


def build_request(
    method: str, url: str, *, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
) -> tuple[str, str, int, bytes]:
    """Return ``(scheme, host, port, request bytes)`` for one request.

    Raises:
        InvalidArgument: the URL is not http(s)://host[:port]/..., or a header is unsafe.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a malformed [IPv6] host
        raise InvalidArgument(f"URL {url[:200]!r} has a malformed host: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(f"URL {url!r} must be http:// or https:// with a host name")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidArgument(f"URL {url!r} has a bad port") from exc
    host = parts.hostname
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header += f":{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(c in target for c in " \r\n"):
        raise InvalidArgument(f"URL {url!r} contains spaces or line breaks")
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host_header}",
        f"User-Agent: {USER_AGENT}",
        "Connection: close",
    ]
    names = set()
    for name, value in headers:
        _check_header(name, value)
        names.add(name.lower())
        lines.append(f"{name}: {value}")
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    if "accept" not in names:
        lines.append("Accept: */*")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return parts.scheme, host, port, data


async def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    max_body: int = DEFAULT_MAX_BODY,
    truncate: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """Send one HTTP/1.1 request and return the complete response (any status).

    Args:
        method: e.g. ``"GET"`` or ``"POST"``.
        url: ``http://`` or ``https://`` URL.
        headers: extra request headers.
        body: the request body.
        max_body: the largest response body accepted.
        truncate: return the first ``max_body`` bytes of a longer body (the response is
            ``truncated``; the rest is not read) instead of raising.
        ssl_context: for https (default: the system's default verification).

    Returns:
        The response.

    Raises:
        InvalidArgument: the URL or a header is unusable.
        EverrunsError: the host could not be reached, the connection broke, or the response
            was malformed or too large (and ``truncate`` is false).

    Cancellation closes the connection at once.
    """
    scheme, host, port, data = build_request(
        method, url, headers=(headers or {}).items(), body=body
    )
    try:
        stream: trio.abc.Stream
        if scheme == "https":
            stream = await trio.open_ssl_over_tcp_stream(
                host,
                port,
                ssl_context=ssl_context or ssl.create_default_context(),
                https_compatible=True,
            )
        else:
            stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise EverrunsError(f"cannot connect to {host}:{port}: {exc}") from exc
    parser = ResponseParser(max_body=max_body, head_request=method == "HEAD", truncate=truncate)
    try:
        await stream.send_all(data)
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return parser.eof()
            done = parser.feed(chunk)
            if done is not None:
                return done
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise EverrunsError(f"the connection to {host}:{port} broke: {exc}") from exc
    finally:
        await trio.aclose_forcefully(stream)
