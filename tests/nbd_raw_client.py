"""A tiny, strict raw-socket NBD client and small helpers shared by the NBD fuzz and the
targeted raw-socket tests (``tests/connectors/nbd/test_nbd_fuzz.py``, ``test_nbd_raw_cases.py``).

The client checks every magic and cookie itself, so a server that answers wrongly fails
the test at the reply, not later. Structured replies (``structured_reply``) are checked
as the protocol bounds them: known types, lengths that fit, DONE last, content chunks
inside the request and not overlapping.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from connectors.nbd import protocol as p


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Structured:
    """One structured reply, every chunk of it checked on the way in."""

    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)  # flags, type, payload
    data: dict[int, bytes] = field(default_factory=dict)  # OFFSET_DATA by offset
    holes: dict[int, int] = field(default_factory=dict)  # OFFSET_HOLE offset -> size
    errors: list[tuple[int, str, int | None]] = field(default_factory=list)  # code, msg, at
    status: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)

    def content(self, offset: int, length: int) -> bytes:
        """The read's bytes from its content chunks; every byte must be covered."""
        out = bytearray(length)
        seen = 0
        for at, data in self.data.items():
            out[at - offset : at - offset + len(data)] = data
            seen += len(data)
        seen += sum(self.holes.values())
        assert seen == length, f"content chunks cover {seen} of {length} bytes"
        return bytes(out)


_CHUNK = struct.Struct(">IHH8sI")
_KNOWN_TYPES = {
    p.REPLY_TYPE_NONE, p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE,
    p.REPLY_TYPE_BLOCK_STATUS, p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET,
}  # fmt: skip


class Client:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending: dict[bytes, tuple[int, int]] = {}  # cookie -> (cmd, length)
        self.offsets: dict[bytes, int] = {}  # cookie -> offset, to bound content chunks
        self.structured_on = False  # NBD_OPT_STRUCTURED_REPLY acknowledged
        self._head = b""  # bytes read ahead to tell a simple reply from a chunk

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Closed(str(exc)) from None

    def recvn(self, n: int) -> bytes:
        chunks = []
        if self._head:
            head, self._head = self._head[:n], self._head[n:]
            chunks.append(head)
            n -= len(head)
        while n:
            try:
                chunk = self.sock.recv(min(n, 1 << 20))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"EOF with {n} bytes still expected")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def expect_closed(self) -> None:
        """The server must close without sending anything more."""
        try:
            extra = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError("server kept the connection open") from None
        assert extra == b"", f"server sent {extra[:40]!r} instead of closing"

    # handshake

    def greet(self, flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> None:
        greeting = self.recvn(18)
        assert greeting == p.GREETING, greeting
        self.send(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = p.OPTION_REPLY_HEADER.unpack(self.recvn(20))
        assert magic == p.OPTION_REPLY_MAGIC, hex(magic)
        return option, rtype, self.recvn(length)

    def option_replies(self, option: int) -> list[tuple[int, bytes]]:
        """Every reply to ``option`` up to its ACK or first error: (type, data)."""
        out = []
        while True:
            opt, rtype, data = self.option_reply()
            assert opt == option, (opt, option)
            out.append((rtype, data))
            if rtype == p.REP_ACK or rtype & (1 << 31):
                return out

    def structured(self) -> int:
        """NBD_OPT_STRUCTURED_REPLY; the reply type."""
        self.option(p.OPT_STRUCTURED_REPLY)
        ((rtype, _),) = self.option_replies(p.OPT_STRUCTURED_REPLY)
        self.structured_on = self.structured_on or rtype == p.REP_ACK
        return rtype

    def meta(
        self, option: int, name: str, queries: list[str] | list[bytes]
    ) -> list[tuple[int, bytes]]:
        """LIST/SET_META_CONTEXT; the replies as (type, data)."""
        self.option(option, meta_payload(name, queries))
        return self.option_replies(option)

    def go(self, name: str, option: int = p.OPT_GO) -> tuple[int, int]:
        raw = name.encode()
        self.option(option, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, 3))
        size = tflags = -1
        while True:
            opt, rtype, data = self.option_reply()
            assert opt == option
            if rtype == p.REP_ACK:
                return size, tflags
            assert rtype == p.REP_INFO, f"GO {name!r} answered {rtype:#x} {data!r}"
            (info,) = struct.unpack_from(">H", data)
            if info == p.INFO_EXPORT:
                _, size, tflags = struct.unpack(">HQH", data)

    # transmission

    def request(
        self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> bytes:
        cookie = os.urandom(8)
        self.pending[cookie] = (cmd, length)
        self.offsets[cookie] = offset
        self.send(
            struct.pack(">IHH8sQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
        )
        return cookie

    def structured_reply(self) -> tuple[bytes, Structured]:
        """Chunks up to the one flagged DONE (all for one cookie: this server never
        interleaves the chunks of two replies). Content chunks must stay inside the
        request's range (its offset as ``request`` recorded it) without overlapping."""
        assert self.structured_on, "a structured reply without NBD_OPT_STRUCTURED_REPLY"
        reply = Structured()
        cookie = b""
        spans: list[tuple[int, int]] = []
        offset = length = 0
        while True:
            magic, flags, rtype, got, n = _CHUNK.unpack(self.recvn(_CHUNK.size))
            assert magic == p.STRUCTURED_REPLY_MAGIC, f"chunk magic {magic:#x}"
            assert got in self.pending, f"chunk for unknown cookie {got.hex()}"
            assert not cookie or got == cookie, "chunks of two replies interleaved"
            if not cookie:
                offset, length = self.offsets.get(got, 0), self.pending[got][1]
            cookie = got
            assert rtype in _KNOWN_TYPES, f"unknown chunk type {rtype:#x}"
            payload = self.recvn(n)
            reply.chunks.append((flags, rtype, payload))
            self._check_chunk(reply, rtype, payload, offset, length, spans)
            if flags & p.REPLY_FLAG_DONE:
                self.pending.pop(cookie)
                self.offsets.pop(cookie, None)
                return cookie, reply
            assert rtype != p.REPLY_TYPE_NONE, "NONE chunk without DONE"

    @staticmethod
    def _check_chunk(
        reply: Structured, rtype: int, payload: bytes, offset: int, length: int,
        spans: list[tuple[int, int]],
    ) -> None:  # fmt: skip
        if rtype == p.REPLY_TYPE_NONE:
            assert payload == b""
        elif rtype in (p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE):
            if rtype == p.REPLY_TYPE_OFFSET_DATA:
                assert len(payload) >= 9, len(payload)
                (at,) = struct.unpack_from(">Q", payload)
                size = len(payload) - 8
                reply.data[at] = payload[8:]
            else:
                assert len(payload) == 12, len(payload)
                at, size = struct.unpack(">QI", payload)
                assert size > 0, "empty hole"
                reply.holes[at] = size
            assert offset <= at and at + size <= offset + length, (at, size, offset, length)
            assert all(at + size <= s or e <= at for s, e in spans), "overlapping content"
            spans.append((at, at + size))
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
            assert len(payload) >= 12 and (len(payload) - 4) % 8 == 0, len(payload)
            (ctx,) = struct.unpack_from(">I", payload)
            pairs = list(struct.iter_unpack(">II", payload[4:]))
            assert all(n > 0 for n, _ in pairs), pairs
            reply.status.append((ctx, pairs))
        else:
            code, mlen = struct.unpack_from(">IH", payload)
            assert code != 0
            extra = 8 if rtype == p.REPLY_TYPE_ERROR_OFFSET else 0
            assert len(payload) == 6 + mlen + extra, (len(payload), mlen)
            message = payload[6 : 6 + mlen].decode()
            at = struct.unpack_from(">Q", payload, 6 + mlen)[0] if extra else None
            reply.errors.append((code, message, at))

    def scall(
        self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> Structured:
        """One request answered with a structured reply."""
        cookie = self.request(cmd, offset, length, flags, payload)
        got, reply = self.structured_reply()
        assert got == cookie
        return reply

    def reply(self) -> tuple[bytes, int, bytes]:
        """The next reply, simple or structured: (cookie, error, read data). A READ of a
        structured connection must get chunks (the protocol forbids a simple reply)."""
        head = self.recvn(4)
        if struct.unpack(">I", head)[0] == p.STRUCTURED_REPLY_MAGIC:
            self._head = head
            offsets = dict(self.offsets)
            pending = dict(self.pending)
            cookie, got = self.structured_reply()
            cmd, length = pending[cookie]
            err = got.errors[0][0] if got.errors else 0
            ok_read = cmd == p.CMD_READ and not err
            return cookie, err, got.content(offsets.get(cookie, 0), length) if ok_read else b""
        magic, err, cookie = p.SIMPLE_REPLY.unpack(head + self.recvn(12))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        assert cookie in self.pending, f"reply for unknown cookie {cookie.hex()}"
        cmd, length = self.pending.pop(cookie)
        self.offsets.pop(cookie, None)
        assert not (self.structured_on and cmd == p.CMD_READ), "simple reply to a READ"
        data = self.recvn(length) if cmd == p.CMD_READ and err == 0 else b""
        return cookie, err, data

    def call(
        self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> tuple[int, bytes]:
        cookie = self.request(cmd, offset, length, flags, payload)
        got, err, data = self.reply()
        assert got == cookie
        return err, data


def meta_payload(name: str, queries: list[str] | list[bytes]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        q = query.encode() if isinstance(query, str) else query
        out += struct.pack(">I", len(q)) + q
    return out


@contextmanager
def collect_errors(logger: str) -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def wait_for(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    """Poll ``condition`` until it holds; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)
