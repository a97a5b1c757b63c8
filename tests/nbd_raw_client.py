"""A tiny, strict raw-socket NBD client and small helpers shared by the NBD fuzz and the
targeted raw-socket tests (``tests/connectors/nbd/test_nbd_fuzz.py``, ``test_nbd_raw_cases.py``).

The client checks every magic and cookie itself, so a server that answers wrongly fails
the test at the reply, not later.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from connectors.nbd import protocol as p


class Closed(Exception):
    """The server closed the connection."""


class Client:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending: dict[bytes, tuple[int, int]] = {}  # cookie -> (cmd, length)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Closed(str(exc)) from None

    def recvn(self, n: int) -> bytes:
        chunks = []
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
        self.send(
            struct.pack(">IHH8sQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
        )
        return cookie

    def reply(self) -> tuple[bytes, int, bytes]:
        magic, err, cookie = p.SIMPLE_REPLY.unpack(self.recvn(16))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        assert cookie in self.pending, f"reply for unknown cookie {cookie.hex()}"
        cmd, length = self.pending.pop(cookie)
        data = self.recvn(length) if cmd == p.CMD_READ and err == 0 else b""
        return cookie, err, data

    def call(
        self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> tuple[int, bytes]:
        cookie = self.request(cmd, offset, length, flags, payload)
        got, err, data = self.reply()
        assert got == cookie
        return err, data


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
