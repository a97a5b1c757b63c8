"""A failover cut in the simulation: the replay plan and roll-forward backlog from a site's
checkpoint to a published W, overlaid on the checkpoint's images, must read as the oracle
at that W before, during and after the roll-forward, with foreground writes winning.

``ReplayPlan`` gets the records of the range as the replay engine reads them (per partition
in offset order, partitions interleaved at random); its ops go into a ``Backlog``
(``ExtentIndex``); ``RollForward.step`` writes it into the images in small batches while
reads go through ``RollForwardExport`` and foreground writes through it.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable

from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.backup.rollforward import Backlog, RollForward, RollForwardExport
from pipeline.ops.replay import ReplayPlan
from schemas.records import Watermark
from tests.sim.backup import Checkpoint
from tests.sim.log import Entry, SimLog


class Images:
    """An ``ImageSink`` over in-memory images (what ``ImageSet.apply`` does to the bytes)."""

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = {v: bytearray(b) for v, b in images.items()}

    def apply(self, op: ApplyOp) -> None:
        vid = op.volume_id or ""
        if op.kind is OpKind.VOLUME_CHANGE:
            img = self.images.setdefault(vid, bytearray())
            img.extend(bytes(max(0, op.length - len(img))))
            del img[op.length :]
        elif op.kind is OpKind.WRITE:
            assert op.data is not None
            self.images[vid][op.offset : op.offset + op.length] = op.data
        elif op.kind in (OpKind.ZERO, OpKind.TRIM):
            self.images[vid][op.offset : op.offset + op.length] = bytes(op.length)

    def sync(self) -> None:
        pass


class VolumeExport:
    """The inner export of one volume (FileExport's contract: writes land before returning)."""

    def __init__(self, images: Images, vid: str) -> None:
        self.images, self.vid = images, vid
        self.name, self.description = vid, ""
        self.read_only, self.can_multi_conn = False, False

    @property
    def size(self) -> int:
        return len(self.images.images[self.vid])

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.images.images[self.vid][offset : offset + length])

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None:
        self.images.images[self.vid][offset : offset + len(data)] = data
        return None

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Awaitable[None] | None:
        return self.write(offset, bytes(length), fua)

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        return self.write(offset, bytes(length), fua)

    def flush(self) -> Awaitable[None] | None:
        return None


def interleave(rng: random.Random, per_part: dict[int, list[Entry]]) -> list[tuple[int, Entry]]:
    """Every partition's entries in order, partitions interleaved at random."""
    queues = {p: list(es) for p, es in per_part.items() if es}
    out = []
    while queues:
        p = rng.choice(sorted(queues))
        out.append((p, queues[p].pop(0)))
        if not queues[p]:
            del queues[p]
    return out


def failover_cut(
    rng: random.Random,
    log: SimLog,
    ckpt: Checkpoint,
    wm: Watermark,
    expected: dict[str, bytes],
    target: Watermark | None = None,
) -> str | None:
    """Run the cut; None when every read and the final images equal ``expected``, else
    what differed. ``target``: the W whose epochs judge zombies (the failover reads the
    latest W of the generation; default ``wm``)."""
    plan = ReplayPlan(ckpt.w, wm.w, target or wm)
    backlog = Backlog()
    for p, e in interleave(rng, log.committed_records(ckpt.offsets, dict(wm.log_offsets))):
        assert e.record is not None
        backlog.add_all(plan.add(e.record, p, e.offset))
    backlog.add_all(plan.finish())
    images = Images(ckpt.images)
    for op in backlog.volume_changes:  # apply_volume_changes, before serving
        images.apply(op)
    if sorted(images.images) != sorted(expected):
        return (
            f"volumes {sorted(images.images)} after the volume changes, expected {sorted(expected)}"
        )
    exports = {v: RollForwardExport(VolumeExport(images, v), backlog, v) for v in expected}
    want = {v: bytearray(b) for v, b in expected.items()}
    worker = RollForward(backlog, images, batch_bytes=rng.choice([1, 16, 64, 1 << 20]))
    for step in range(10_000):
        for _ in range(rng.randint(0, 3) if expected else 0):  # clients' reads and writes
            vid = rng.choice(sorted(expected))
            size = len(want[vid])
            if not size:
                continue
            off = rng.randrange(size)
            n = rng.randint(1, size - off)
            if rng.random() < 0.7:
                got = exports[vid].pread(off, n)
                if got != bytes(want[vid][off : off + n]):
                    return f"read of {vid} [{off}, {off + n}) at roll-forward step {step} differs"
            else:
                data = rng.randbytes(n)
                exports[vid].write(off, data, False)
                want[vid][off : off + n] = data
        if not worker.step():
            break
    for vid in sorted(want):
        if images.images[vid] != want[vid]:
            return f"image of {vid} after the roll-forward differs from the oracle"
    return None
