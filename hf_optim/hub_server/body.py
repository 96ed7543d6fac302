"""Request bodies of the local Hub: framing checks and a size limit counted while reading.

A body is framed by ``Content-Length`` or ``Transfer-Encoding: chunked`` (HTTP/1.1). Framing errors are the
client's (400: malformed or negative length, both framings, unknown transfer coding; 411: a POST or PUT with
no framing at all). The limit is checked before reading when the length is declared and while reading
otherwise, so an oversized chunked body is refused (413) after at most ``limit`` bytes, never buffered whole.
"""

from __future__ import annotations

import io
import re
from email.message import Message

from hf_optim.hub_server.records import BadRequest, HubError, PayloadTooLarge

__all__ = ["BODY_METHODS", "LengthRequired", "RequestBody"]

_LENGTH_RE = re.compile(r"[0-9]{1,19}")
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_LINE_LIMIT = 65536
BODY_METHODS = ("POST", "PUT")  # a body-carrying request must say how long its body is


class LengthRequired(HubError):
    status = 411


def _length_values(headers: Message) -> list[str]:
    """Every Content-Length value (repeated headers and comma-separated lists included)."""
    return [v.strip() for value in headers.get_all("Content-Length") or () for v in value.split(",")]


class RequestBody:
    """Reader of one request's body; ``limit`` bytes at most (``set_limit`` changes it before reading)."""

    def __init__(self, rfile: io.BufferedIOBase, headers: Message, method: str, limit: int) -> None:
        self._rfile = rfile
        encoding = ",".join(headers.get_all("Transfer-Encoding") or ()).strip().lower()
        lengths = _length_values(headers)
        if encoding and encoding != "chunked":
            raise BadRequest(f"Unsupported Transfer-Encoding {encoding[:40]!r}: only 'chunked' is accepted.")
        self._chunked = encoding == "chunked"
        if self._chunked and lengths:
            raise BadRequest("A request cannot have both Content-Length and Transfer-Encoding.")
        if any(not _LENGTH_RE.fullmatch(v) for v in lengths) or len(set(lengths)) > 1:
            raise BadRequest("Invalid Content-Length header: expected one non-negative integer.")
        if not self._chunked and not lengths and method in BODY_METHODS:
            raise LengthRequired(f"{method} requests need a Content-Length header or a chunked body.")
        self._remaining: int | None = None if self._chunked else int(lengths[0]) if lengths else 0
        self._chunk_left = 0
        self._eof = not self._chunked and self._remaining == 0
        self._buf = bytearray()
        self._consumed = 0
        self._limit = limit
        self.set_limit(limit)

    @property
    def unread(self) -> int | None:
        """Bytes left to read (None: unknown, chunked)."""
        return None if self._chunked and not self._eof else (self._remaining or 0)

    def set_limit(self, limit: int) -> None:
        """Refuse (413) a body longer than ``limit`` bytes: at once if its length is declared, else on reading."""
        self._limit = limit
        total = self._consumed + (self._remaining or 0)
        if not self._chunked and total > limit:
            raise PayloadTooLarge(f"Request body of {total} bytes exceeds {limit} bytes.")

    def _count(self, n: int) -> None:
        self._consumed += n
        if self._consumed > self._limit:
            raise PayloadTooLarge(f"Request body exceeds {self._limit} bytes.")

    def _raw(self, n: int) -> bytes:
        if self._eof:
            return b""
        if not self._chunked:
            assert self._remaining is not None
            data = self._rfile.read(min(n, self._remaining))
            if not data:
                raise BadRequest("Request body ended before Content-Length bytes.")
            self._remaining -= len(data)
            self._eof = self._remaining == 0
            self._count(len(data))
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(_LINE_LIMIT).split(b";")[0].strip()
            if not _CHUNK_SIZE_RE.fullmatch(line):
                raise BadRequest("Malformed chunked request body.")
            size = int(line, 16)
            if size == 0:
                for _ in range(100):  # trailers, up to the empty line
                    if self._rfile.readline(_LINE_LIMIT) in (b"\r\n", b"\n", b""):
                        break
                else:
                    raise BadRequest("Too many trailers after a chunked request body.")
                self._eof = True
                return b""
            if self._consumed + size > self._limit:
                raise PayloadTooLarge(f"Request body exceeds {self._limit} bytes.")
            self._chunk_left = size
        data = self._rfile.read(min(n, self._chunk_left))
        if not data:
            raise BadRequest("Chunked request body ended early.")
        self._chunk_left -= len(data)
        self._count(len(data))
        if self._chunk_left == 0 and self._rfile.readline(3).strip():
            raise BadRequest("Malformed chunked request body: no CRLF after a chunk.")
        return data

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (everything if n < 0); b"" at the end."""
        if n < 0:
            out = bytearray(self._buf)
            self._buf.clear()
            while chunk := self._raw(1 << 20):
                out += chunk
            return bytes(out)
        if self._buf:
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data
        return self._raw(n)

    def readline(self) -> bytes:
        """Next line including its ``\\n`` (b"" at the end)."""
        if not self._chunked and not self._buf:
            if self._eof:
                return b""
            assert self._remaining is not None
            line = self._rfile.readline(self._remaining)
            if not line:
                raise BadRequest("Request body ended before Content-Length bytes.")
            self._remaining -= len(line)
            self._eof = self._remaining == 0
            self._count(len(line))
            return line
        while b"\n" not in self._buf:
            chunk = self._raw(1 << 16)
            if not chunk:
                break
            self._buf += chunk
        idx = self._buf.find(b"\n")
        end = len(self._buf) if idx < 0 else idx + 1
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line

    def drain(self, max_bytes: int) -> bool:
        """Read what is left if it is at most ``max_bytes``; False if the connection must be closed instead."""
        unread = self.unread
        if unread is None or unread > max_bytes:
            return False
        while self._raw(1 << 16):
            pass
        return True
