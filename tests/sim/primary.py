"""The simulated primary side: interceptors with their own clocks, and the oracle's
reference model of what is durable.

An interceptor here does what ``pipeline/primary/interceptor.py`` does, minus Kafka and
threads: each write is stamped by the real ``HybridClock`` (its wall clock is the simulated
time plus the interceptor's skew, and its reservation file a dict that survives crashes),
queued, and on a tick committed with one PROGRESS record in one transaction. A restart
fences the old instance, JOINs (its epoch is the JOIN's offset) and raises its clock above
every S reported before the JOIN, as the real one reads them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.primary.clock import HybridClock
from pipeline.watermark.state import JOIN_EPOCH_FROM_OFFSET, join_clock_floor, join_epoch
from schemas.records import (
    LogRecord,
    Progress,
    ProgressKind,
    VolumeChange,
    VolumeOp,
    Write,
    WriteExtent,
    Zero,
    ZeroKind,
)
from tests.sim.log import SimLog

IMAGE_SIZE = 96
MAX_SKEW_US = 500_000  # max_clock_skew: every wall clock lies within +-MAX_SKEW_US/2 of true
RESERVE_US = 200_000


class SimClock(HybridClock):
    """The real clock; its reservation file is a dict entry (the simulated disk)."""

    def __init__(self, wall: Callable[[], int], disk: dict[str, int], key: str) -> None:
        self._disk = disk
        super().__init__(
            wall, state_path=Path(key), reserve_us=RESERVE_US, max_clock_skew_us=MAX_SKEW_US
        )

    def _read_bound(self, path: Path) -> int:  # type: ignore[override]
        return self._disk.get(str(path), 0)

    def _write_bound(self, path: Path, bound: int) -> None:  # type: ignore[override]
        self._disk[str(path)] = bound


@dataclass(frozen=True, slots=True)
class RefOp:
    """A durable (committed, legitimate) operation, as the oracle applies it."""

    volume_id: str
    ts: int
    kind: str  # "write", "zero", "trim", "create", "resize"
    offset: int
    data: bytes  # write data; for zero/trim b"" and length in ``length``
    length: int


@dataclass(slots=True)
class Pending:
    volume_id: str
    ts: int
    kind: str
    offset: int
    data: bytes
    length: int


@dataclass
class Interceptor:
    iid: str
    volumes: list[str]
    partition_of: dict[str, int]
    skew_us: int
    disk: dict[str, int]
    now: Callable[[], int]  # the simulated true time, µs
    clock: SimClock | None = None
    epoch: int = -1
    alive: bool = False
    stalled: bool = False  # alive but not ticking (a paused process): gets fenced
    fenced: bool = False  # this instance can commit nothing more
    last_s: int = 0
    outbox: list[Pending] = field(default_factory=list)
    #: each created volume's size as this interceptor knows it, and as durable in the log
    sizes: dict[str, int] = field(default_factory=dict)
    durable_sizes: dict[str, int] = field(default_factory=dict)
    shrinks: bool = False
    issued: list[int] = field(default_factory=list)  # every ts issued, all instances
    unacked: list[int] = field(default_factory=list)  # writes waiting for commit wait
    #: every epoch this interceptor had, with the final S the fold recorded (oracle)
    epochs: list[int] = field(default_factory=list)

    def wall(self) -> int:
        return self.now() + self.skew_us

    # ---------------------------------------------------------------- lifecycle

    def start(self, log: SimLog) -> None:
        """Fence the older instance, JOIN, raise the clock floor (interceptor.start)."""
        self.clock = SimClock(self.wall, self.disk, f"/sim/{self.iid}.clock")
        self.fenced = False
        self.alive, self.stalled = True, False
        self.outbox = []
        s = self._issue()
        join = Progress(self.iid, JOIN_EPOCH_FROM_OFFSET, ProgressKind.JOIN, s, {}, self.wall())
        log.append_txn([], join, committed=True)
        offset = log.progress_offset_of_last()
        self.epoch = join_epoch(JOIN_EPOCH_FROM_OFFSET, offset)
        self.epochs.append(self.epoch)
        latest = log.watermarks[-1] if log.watermarks else None
        max_s, start = (latest.max_s, latest.progress_offset + 1) if latest else (0, 0)
        events = [rec for _, rec in log.visible_progress(start, offset)]
        self.clock.observe(join_clock_floor(max_s, events))
        self.last_s = s

    def crash(self) -> None:
        """Dies: its queued (async-acknowledged) writes were never replicated."""
        self.alive = False
        self.outbox = []
        self.unacked = []  # their clients get an error, never an ack
        self.sizes = dict(self.durable_sizes)

    def leave(self, log: SimLog, rng: random.Random) -> list[RefOp]:
        """Graceful stop: flush, then LEAVE with the last S."""
        out = self.tick(log, rng, abort_p=0.0, split=False)
        assert self.clock is not None and not self.outbox
        leave = Progress(self.iid, self.epoch, ProgressKind.LEAVE, self.last_s, {}, self.wall())
        log.append_txn([], leave, committed=True)
        self.alive = False
        self.unacked = []  # a stopped process acknowledges nothing more
        self.sizes = dict(self.durable_sizes)
        return out

    # ---------------------------------------------------------------- writes

    def _issue(self) -> int:
        assert self.clock is not None
        ts = self.clock.now()
        self.issued.append(ts)
        return ts

    def write(self, rng: random.Random, volume_id: str) -> Pending:
        if volume_id not in self.sizes:
            self.sizes[volume_id] = IMAGE_SIZE
            op = Pending(volume_id, self._issue(), "create", 0, b"", IMAGE_SIZE)
            self.outbox.append(op)
        size = self.sizes[volume_id]
        off = rng.randrange(size)
        r = rng.random()
        if r < 0.05:
            grow = not self.shrinks or rng.random() < 0.5
            size = rng.randint(size + 1, size + 64) if grow else rng.randint(16, size)
            self.sizes[volume_id] = size
            op = Pending(volume_id, self._issue(), "resize", 0, b"", size)
        elif r < 0.75:
            length = rng.randint(1, min(40, size - off))
            op = Pending(volume_id, self._issue(), "write", off, rng.randbytes(length), length)
        else:
            length = rng.randint(0, size - off)
            kind = "zero" if r < 0.88 else "trim"
            op = Pending(volume_id, self._issue(), kind, off, b"", length)
        self.outbox.append(op)
        self.unacked.append(op.ts)
        return op

    # ---------------------------------------------------------------- ticks

    def tick(
        self, log: SimLog, rng: random.Random, abort_p: float, split: bool = True
    ) -> list[RefOp]:
        """One transaction: a prefix of the outbox and PROGRESS(S); returns what became
        durable. An abort leaves the attempt in the log (invisible) and the same records
        go out again in a new transaction, as interceptor._transaction retries."""
        if not self.alive or self.stalled or self.fenced:
            return []
        assert self.clock is not None
        s = self.clock.now()
        n = len(self.outbox)
        if split and n > 1 and rng.random() < 0.2:
            n = rng.randrange(1, n)  # max_transaction_bytes: the rest waits, above S
        batch, rest = self.outbox[:n], self.outbox[n:]
        if rest:
            s = min(s, rest[0].ts - 1)
        s = max(s, self.last_s)
        records = self._encode(batch, rng)
        prog = Progress(self.iid, self.epoch, ProgressKind.PROGRESS, s, {}, self.wall())
        while rng.random() < abort_p:
            log.append_txn(records, prog, committed=False)  # aborted: the retry resends it
        log.append_txn(records, prog, committed=True)
        self.outbox = rest
        self.last_s = s
        for o in batch:
            if o.kind in ("create", "resize"):
                self.durable_sizes[o.volume_id] = o.length
        return [RefOp(o.volume_id, o.ts, o.kind, o.offset, o.data, o.length) for o in batch]

    def crash_mid_txn(self, log: SimLog, rng: random.Random) -> None:
        """Killed with a transaction open: Kafka aborts it (the new instance's fencing)."""
        if self.alive and not self.fenced and self.outbox and self.clock is not None:
            prog = Progress(self.iid, self.epoch, ProgressKind.PROGRESS, self.clock.now(), {}, 0)
            log.append_txn(self._encode(self.outbox, rng), prog, committed=False)
        self.crash()

    def _encode(self, batch: list[Pending], rng: random.Random) -> list[tuple[int, LogRecord]]:
        """Kafka records of a batch: per volume in ts order; several writes per Write record,
        large writes split into fragments, sometimes across records (outbox.encode_batch)."""
        out: list[tuple[int, LogRecord]] = []
        by_vol: dict[str, list[Pending]] = {}
        for op in batch:
            by_vol.setdefault(op.volume_id, []).append(op)
        vols = list(by_vol)
        rng.shuffle(vols)  # volumes commute: any order of their records is legitimate
        for vid in vols:
            p = self.partition_of[vid]
            extents: list[WriteExtent] = []

            def flush(p: int = p, vid: str = vid, extents: list[WriteExtent] = extents) -> None:
                if extents:
                    out.append((p, Write(vid, self.iid, self.epoch, tuple(extents))))
                    extents.clear()

            for op in by_vol[vid]:
                if op.kind == "write":
                    count = 1 if op.length < 4 or rng.random() < 0.6 else rng.randint(2, 3)
                    cuts = sorted(rng.sample(range(1, op.length), count - 1))
                    bounds = [0, *cuts, op.length]
                    for i in range(count):
                        frag = op.data[bounds[i] : bounds[i + 1]]
                        extents.append(
                            WriteExtent(op.ts, op.offset + bounds[i], op.length, i, count, frag)
                        )
                        if rng.random() < 0.3:
                            flush()
                    continue
                flush()
                if op.kind in ("create", "resize"):
                    vop = VolumeOp.CREATE if op.kind == "create" else VolumeOp.RESIZE
                    rec: LogRecord = VolumeChange(
                        vop, vid, vid, op.length, {}, op.ts, self.iid, self.epoch
                    )
                else:
                    zk = ZeroKind.ZERO if op.kind == "zero" else ZeroKind.TRIM
                    rec = Zero(vid, self.iid, self.epoch, op.ts, op.offset, op.length, zk)
                out.append((p, rec))
            flush()
        return out

    def ack_due(self) -> list[int]:
        """Writes whose commit wait is over (async mode: acked after the local write and
        commit wait); the ts of those acked now."""
        if not self.alive or self.stalled or self.clock is None:
            return []
        out = [ts for ts in self.unacked if self.clock.commit_wait_us(ts) == 0]
        if out:
            self.unacked = [ts for ts in self.unacked if ts not in out]
        return out


def reference_images(ops: list[RefOp], w: int, volumes: list[str]) -> dict[str, bytes]:
    """The oracle: the images after exactly the durable ops with ts <= w, per volume in ts
    order (volumes not yet created are absent)."""
    images: dict[str, bytearray] = {}
    for op in sorted((o for o in ops if o.ts <= w), key=lambda o: o.ts):
        apply_ref(images, op)
    return {v: bytes(images[v]) for v in volumes if v in images}


def apply_ref(images: dict[str, bytearray], op: RefOp) -> None:
    if op.kind == "create":
        images[op.volume_id] = bytearray(op.length)
    elif op.kind == "resize":
        img = images[op.volume_id]
        img.extend(bytes(max(0, op.length - len(img))))
        del img[op.length :]
    elif op.kind == "write":
        images[op.volume_id][op.offset : op.offset + op.length] = op.data
    else:
        images[op.volume_id][op.offset : op.offset + op.length] = bytes(op.length)
