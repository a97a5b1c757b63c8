"""The exports of the NBD fuzz (``test_nbd_fuzz.py``) and the payloads that let them judge.

Every WRITE payload the fuzz sends describes itself (a tag, its length, a nonce its bytes
follow from), so :class:`RecordingExport` can tell a whole client payload from a partial or
corrupted one and records each write that is not whole, or lies past the end.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable
from typing import Any

from connectors.nbd.file_export import FileExport

EXPORT_SIZE = 4 << 20
BLOCK = 4096
TAG = b"FZ"
PAYLOAD_HEAD = struct.Struct(">2sIQ")  # tag, declared length, nonce


def make_payload(length: int, nonce: int) -> bytes:
    """A WRITE payload that says how long it is and which bytes follow."""
    assert length >= PAYLOAD_HEAD.size
    body = random.Random(nonce).randbytes(length - PAYLOAD_HEAD.size)
    return PAYLOAD_HEAD.pack(TAG, length, nonce) + body


def payload_problem(data: bytes) -> str | None:
    if len(data) < PAYLOAD_HEAD.size or data[:2] != TAG:
        return f"write of {len(data)} bytes without the fuzz tag"
    _, declared, nonce = PAYLOAD_HEAD.unpack_from(data)
    if declared != len(data):
        return f"write of {len(data)} bytes whose client sent {declared}"
    if data != make_payload(declared, nonce):
        return f"write of {len(data)} bytes with corrupted content (nonce {nonce})"
    return None


class RecordingExport:
    """Wraps a FileExport; records every write that is not a whole client payload.
    ``trim`` zeroes (so the model knows what a trimmed range reads back as).

    ``asynchronous`` makes the mutating calls coroutines that sometimes finish at once,
    sometimes yield or sleep a millisecond: the server's eager path, its task path and
    out-of-order replies all get exercised.
    """

    def __init__(self, inner: FileExport, check_payloads: bool, asynchronous: bool = False) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.description = inner.description
        self.read_only = inner.read_only
        self.can_multi_conn = True
        self.check_payloads = check_payloads
        self.violations: list[str] = []
        self.writes = 0
        self.asynchronous = asynchronous
        self._rng = random.Random(len(inner.name))
        self.extents = inner.extents  # structured reads get holes, BLOCK_STATUS the truth

    def _done(self, action: Callable[[], None]) -> Any:
        if not self.asynchronous:
            action()
            return None

        async def later() -> None:
            roll = self._rng.random()
            if roll < 0.3:
                await asyncio.sleep(0)
            elif roll < 0.4:
                await asyncio.sleep(0.001)
            action()

        return later()

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> Any:
        self.writes += 1
        if self.check_payloads:
            problem = payload_problem(data)
            if problem:
                self.violations.append(f"{problem} at offset {offset}")
        if offset + len(data) > self.size:
            self.violations.append(f"write past the end: {offset}+{len(data)}")
        return self._done(lambda: self.inner.write(offset, data, fua))

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> Any:
        return self._done(lambda: self.inner.write_zeroes(offset, length, fua, may_trim))

    def trim(self, offset: int, length: int, fua: bool) -> Any:
        return self._done(lambda: self.inner.write_zeroes(offset, length, fua, may_trim=True))

    def flush(self) -> Any:
        return self._done(self.inner.flush)
