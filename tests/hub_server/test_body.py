"""RequestBody: HTTP/1.1 body framing (RFC 9112 section 6-7) and limits counted while reading."""

from __future__ import annotations

import io
from email.message import Message

import pytest

from hf_optim.hub_server.body import LengthRequired, RequestBody
from hf_optim.hub_server.storage import BadRequest, PayloadTooLarge


def headers(**values: str | list[str]) -> Message:
    message = Message()
    for name, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            message[name.replace("_", "-")] = v
    return message


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


class EndlessChunks(io.RawIOBase):
    """A client sending 1 MiB chunks forever; counts the bytes the server pulled from it."""

    def __init__(self) -> None:
        self.served = 0
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if not self._pending:
            block = b"a" * (1 << 20)
            self._pending = b"%x\r\n%b\r\n" % (len(block), block)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self.served += n
        return n


def test_content_length_and_chunked_bodies_read_back_exactly() -> None:
    data = b'{"a": 1}\nsecond line\n'
    body = RequestBody(
        io.BytesIO(data + b"NEXT REQUEST"), headers(Content_Length=str(len(data))), "POST", 100
    )
    assert body.readline() == b'{"a": 1}\n'
    assert body.read() == b"second line\n"
    assert body.read() == b""
    stream = io.BytesIO(chunked(b'{"a"', b": 1}\nsec", b"ond line\n") + b"NEXT")
    body = RequestBody(stream, headers(Transfer_Encoding="chunked"), "PUT", 100)
    assert body.readline() == b'{"a": 1}\n'
    assert body.read() == b"second line\n"
    assert stream.read() == b"NEXT"  # the next request on the connection is left untouched


@pytest.mark.parametrize(
    "values",
    [
        {"Content_Length": "-1"},
        {"Content_Length": "+5"},
        {"Content_Length": "0x10"},
        {"Content_Length": " "},
        {"Content_Length": ["1", "2"]},
        {"Content_Length": "1, 2"},
        {"Content_Length": "3", "Transfer_Encoding": "chunked"},
        {"Transfer_Encoding": "gzip"},
        {"Transfer_Encoding": "chunked, gzip"},
    ],
)
def test_bad_framing_is_a_bad_request(values: dict) -> None:
    with pytest.raises(BadRequest):
        RequestBody(io.BytesIO(b"abc"), headers(**values), "POST", 100)


def test_repeated_equal_lengths_are_one_length() -> None:
    body = RequestBody(io.BytesIO(b"abc"), headers(Content_Length=["3", "3"]), "POST", 100)
    assert body.read() == b"abc"


def test_body_carrying_methods_need_a_length() -> None:
    with pytest.raises(LengthRequired):
        RequestBody(io.BytesIO(b""), headers(), "POST", 100)
    with pytest.raises(LengthRequired):
        RequestBody(io.BytesIO(b""), headers(), "PUT", 100)
    for method in ("GET", "HEAD", "DELETE"):
        assert RequestBody(io.BytesIO(b"junk"), headers(), method, 100).read() == b""


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    stream = io.BytesIO(b"x" * 200)
    with pytest.raises(PayloadTooLarge):
        RequestBody(stream, headers(Content_Length="200"), "POST", 100)
    assert stream.tell() == 0
    body = RequestBody(stream, headers(Content_Length="200"), "POST", 1000)
    with pytest.raises(PayloadTooLarge):
        body.set_limit(199)
    assert stream.tell() == 0


def test_endless_chunked_body_is_refused_after_the_limit() -> None:
    client = EndlessChunks()
    body = RequestBody(io.BufferedReader(client), headers(Transfer_Encoding="chunked"), "POST", 16 << 20)
    with pytest.raises(PayloadTooLarge):
        body.read()
    assert (
        client.served <= (16 << 20) + (1 << 20) + 65536
    )  # the limit, one chunk and read-ahead; never 300 MB
    client = EndlessChunks()
    body = RequestBody(io.BufferedReader(client), headers(Transfer_Encoding="chunked"), "POST", 16 << 20)
    with pytest.raises(PayloadTooLarge):
        while body.readline():
            pass  # one endless line: the line buffer is bounded by the limit too
    assert client.served <= (16 << 20) + (1 << 20) + 65536


def test_a_chunk_announced_beyond_the_limit_is_refused_unread() -> None:
    stream = io.BytesIO(b"%x\r\n" % (1 << 30) + b"a" * 100)
    body = RequestBody(stream, headers(Transfer_Encoding="chunked"), "POST", 1000)
    with pytest.raises(PayloadTooLarge):
        body.read(10)
    assert stream.read() == b"a" * 100


@pytest.mark.parametrize(
    "raw",
    [
        b"zz\r\nab\r\n0\r\n\r\n",
        b"-2\r\nab\r\n0\r\n\r\n",
        b"2\r\nabXX0\r\n\r\n",
        b"5\r\nab",
        b"",
        b"2;x=1\r\nab\r\n",
    ],
)
def test_malformed_chunked_bodies(raw: bytes) -> None:
    body = RequestBody(io.BytesIO(raw), headers(Transfer_Encoding="chunked"), "POST", 1000)
    with pytest.raises(BadRequest):
        body.read()


def test_short_content_length_body_is_a_bad_request() -> None:
    body = RequestBody(io.BytesIO(b"abc"), headers(Content_Length="10"), "POST", 1000)
    with pytest.raises(BadRequest, match="ended before"):
        body.read()


def test_drain_reads_small_leftovers_only() -> None:
    stream = io.BytesIO(b"x" * 10 + b"NEXT")
    assert RequestBody(stream, headers(Content_Length="10"), "POST", 1000).drain(100)
    assert stream.read() == b"NEXT"
    assert not RequestBody(io.BytesIO(b"x" * 10), headers(Content_Length="10"), "POST", 1000).drain(5)
    assert not RequestBody(
        io.BytesIO(chunked(b"ab")), headers(Transfer_Encoding="chunked"), "POST", 1000
    ).drain(5)
