"""The agent's HTTP/1.1 response parser and request builder, byte by byte (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.agent._http import HttpResponse, ResponseParser, build_request
from everruns.errors import EverrunsError, InvalidArgument


def feed_all(parser: ResponseParser, chunks: list[bytes]) -> HttpResponse | None:
    done = None
    for chunk in chunks:
        done = parser.feed(chunk) or done
    return done


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
    b'5;ext=1\r\n{"a":\r\n3\r\n 42\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n'
)
LENGTH = b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\nhello world"


@given(st.lists(st.integers(min_value=0, max_value=500), max_size=8))
def test_chunked_body_in_any_split(cuts: list[int]) -> None:
    response = feed_all(ResponseParser(), split(CHUNKED, cuts))
    assert response is not None
    assert response.status == 200 and response.reason == "OK"
    assert response.body == b'{"a": 42}'
    assert response.json() == {"a": 42}
    assert response.header("CONTENT-TYPE") == "application/json"


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_content_length_body_in_any_split(cuts: list[int]) -> None:
    response = feed_all(ResponseParser(), split(LENGTH + b"ignored trailing bytes", cuts))
    assert response is not None
    assert (response.status, response.body, response.text()) == (201, b"hello world", "hello world")


def test_body_until_the_connection_closes() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\npart one, ") is None
    assert parser.feed(b"part two") is None
    response = parser.eof()
    assert response.body == b"part one, part two"


def test_interim_responses_and_bodiless_statuses() -> None:
    response = ResponseParser().feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
    )
    assert response is not None and response.status == 204 and response.body == b""
    head = ResponseParser(head_request=True).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert head is not None and head.body == b""
    empty = ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert empty is not None and empty.body == b""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SMTP/1.0 200 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "not followed by CRLF"),
    ],
)
def test_malformed_responses_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(EverrunsError, match=message):
        ResponseParser().feed(data)


def test_size_limits_and_early_close() -> None:
    with pytest.raises(EverrunsError, match="larger than 10 bytes"):
        ResponseParser(max_body=10).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(EverrunsError, match="larger than 4 bytes"):
        ResponseParser(max_body=4).feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
    parser = ResponseParser(max_body=4)
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(EverrunsError, match="larger than 4 bytes"):
        parser.feed(b"hello")
    with pytest.raises(EverrunsError, match="headers are longer"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)
    cut = ResponseParser()
    cut.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(EverrunsError, match="in the middle of its body"):
        cut.eof()
    with pytest.raises(EverrunsError, match="in the middle of its headers"):
        ResponseParser().eof()


@given(
    st.sampled_from(["length", "chunked", "eof"]),
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=0, max_value=30),
    st.lists(st.integers(min_value=0, max_value=300), max_size=6),
)
def test_truncate_keeps_the_first_bytes_of_a_long_body(
    framing: str, size: int, max_body: int, cuts: list[int]
) -> None:
    body = bytes(range(65, 65 + size))
    if framing == "length":
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body
    elif framing == "chunked":
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:7], body[7:]) if c)
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    else:
        data = b"HTTP/1.1 200 OK\r\n\r\n" + body
    parser = ResponseParser(max_body=max_body, truncate=True)
    response = feed_all(parser, split(data, cuts))
    if response is None:
        assert framing == "eof" and size <= max_body
        response = parser.eof()
    assert response.body == body[:max_body]
    assert response.truncated is (size > max_body)


def test_truncate_does_not_wait_for_the_rest_of_a_huge_chunk() -> None:
    parser = ResponseParser(max_body=4, truncate=True)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n"
    assert parser.feed(head + b"abcd") is None  # four bytes could still be the whole body
    response = parser.feed(b"e")
    assert response is not None and (response.body, response.truncated) == (b"abcd", True)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n",
        b"HTTP/1.1 " + b"2" * 5000 + b" OK\r\n\r\n",
    ],
)
def test_numbers_int_cannot_read_are_a_malformed_response(data: bytes) -> None:
    with pytest.raises(EverrunsError, match="malformed"):
        ResponseParser().feed(data)


def test_json_errors_name_the_body() -> None:
    response = HttpResponse(502, "Bad Gateway", (), b"<html>oops</html>")
    with pytest.raises(EverrunsError, match="not JSON"):
        response.json()


def test_build_request() -> None:
    scheme, host, port, data = build_request(
        "POST",
        "https://api.example.com/v1/chat/completions?x=1",
        headers=[("Authorization", "Bearer k"), ("Accept", "application/json")],
        body=b"{}",
    )
    assert (scheme, host, port) == ("https", "api.example.com", 443)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions?x=1 HTTP/1.1"
    assert "Host: api.example.com" in lines
    assert "Connection: close" in lines and "Content-Length: 2" in lines
    assert "Authorization: Bearer k" in lines and "Accept: application/json" in lines
    assert "Accept: */*" not in lines
    assert body == b"{}"
    _, host, port, data = build_request("GET", "http://[::1]:8080")
    assert (host, port) == ("::1", 8080)
    assert b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n" in data and b"Content-Length" not in data


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("ftp://example.com/", []),
        ("http:///nohost", []),
        ("http://example.com:99999/", []),
        ("http://example.com/a b", []),
        ("http://example.com/", [("X-Evil", "a\r\nInjected: yes")]),
        ("http://example.com/", [("Bad:Name", "v")]),
    ],
)
def test_build_request_refuses_unsafe_input(url: str, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidArgument):
        build_request("GET", url, headers=headers)
