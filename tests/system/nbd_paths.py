"""NBD clients with several paths to one volume, as a multipath initiator has: a request
answered ESHUTDOWN, a connection closed, or an export refused at NBD_OPT_GO sends the
client to the next path, where it sends the request again.

``PathWriter`` writes numbered blocks (each block's bytes name its block and seq) and
records, per request, the path, the send and reply times and the outcome, so a test can
tell which writes were acknowledged where, how long the client waited across a
cutover, and whether two paths ever accepted writes at once.
"""

from __future__ import annotations

import itertools
import struct
import threading
import time
from dataclasses import dataclass, field

from connectors.nbd import protocol as p
from tests.nbd_raw_client import Client, Closed

BS = 4096


def block_bytes(block: int, seq: int) -> bytes:
    return struct.pack(">QQ", block, seq) * (BS // 16)


def decode_block(data: bytes) -> tuple[int, int] | None:
    """(block, seq) of a block written by a PathWriter; None for zeroes."""
    if not any(data):
        return None
    block, seq = struct.unpack_from(">QQ", data)
    assert data == block_bytes(block, seq), "a torn or foreign block"
    return block, seq


@dataclass
class Sent:
    block: int
    seq: int
    path: int
    sent: float
    replied: float = 0.0
    outcome: str = ""  # ok, eshutdown, closed, error <n>


@dataclass
class PathWriter:
    """Writes blocks ``blocks`` round-robin, QD1, over whichever path accepts them."""

    ports: list[int]
    volume: str
    blocks: range
    pinned: int | None = None  # only this path (a checker's writer), else failover to the next
    log: list[Sent] = field(default_factory=list)
    reconnects: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _client: Client | None = None
    _path: int = 0

    def start(self) -> PathWriter:
        self._path = self.pinned or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        if self._client is not None:
            self._client.close()

    def acked(self) -> dict[int, int]:
        """block -> seq of its last acknowledged write."""
        out: dict[int, int] = {}
        for s in self.log:
            if s.outcome == "ok":
                out[s.block] = s.seq
        return out

    def in_doubt(self) -> dict[int, set[int]]:
        """block -> seqs written after its last ack whose answer never came (may be there)."""
        out: dict[int, set[int]] = {}
        last = self.acked()
        for s in self.log:
            if s.outcome == "closed" and s.seq > last.get(s.block, -1):
                out.setdefault(s.block, set()).add(s.seq)
        return out

    def max_gap_s(self) -> float:
        """The longest time between two acknowledgements: the pause the client saw."""
        times = [s.replied for s in self.log if s.outcome == "ok"]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def _connect(self) -> Client | None:
        port = self.ports[self._path]
        try:
            c = Client(port, timeout=10)
            c.greet()
            c.go(self.volume)
            return c
        except (OSError, Closed, AssertionError):
            return None

    def _next_path(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.reconnects += 1
        if self.pinned is None:
            self._path = (self._path + 1) % len(self.ports)
        time.sleep(0.005)

    def put(self, block: int, seq: int) -> None:
        """Write ``block`` as ``seq``, over whichever path takes it; returns once acked."""
        while not self._stop.is_set():
            if self._client is None:
                self._client = self._connect()
                if self._client is None:
                    self._next_path()
                    continue
            s = Sent(block, seq, self._path, time.monotonic())
            self.log.append(s)
            try:
                data = block_bytes(block, seq)
                err, _ = self._client.call(p.CMD_WRITE, block * BS, BS, 0, data)
            except (OSError, Closed, AssertionError):  # a timeout is an OSError
                s.replied, s.outcome = time.monotonic(), "closed"
                self._next_path()
                continue  # the same seq again, elsewhere
            s.replied = time.monotonic()
            if err == 0:
                s.outcome = "ok"
                return
            s.outcome = "eshutdown" if err == p.ESHUTDOWN else f"error {err}"
            self._next_path()

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            self.put(self.blocks[seq % len(self.blocks)], seq)
            seq += 1
