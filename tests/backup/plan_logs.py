"""Generated apply logs for the planner's tests, with the ops and images they must yield.

- Record builders (:func:`extent`, :func:`write`, :func:`zero`, :func:`marker`): the dicts
  the codec decodes a log record to.
- :func:`make_log`: several volumes over several partitions, writes batched several to a
  Kafka record and split into fragments across records, zeros, trims, volume changes,
  markers and snapshots, interceptor restarts (new epochs) and zombie records from fenced
  epochs; :class:`Log` holds the records per partition with every legitimate op in ts
  order, and the log offsets a W needs.
- :func:`image_at` / :func:`apply_to` / :func:`expected_ops`: what applying the log up to a
  W must give; :func:`ready_take`: ``ready`` then ``take``.
"""

from __future__ import annotations

import dataclasses
import random

from pipeline.backup.plan import ApplyOp, ApplyPlanner, OpKind
from schemas.records import (
    LogRecord,
    Marker,
    Snapshot,
    VolumeChange,
    VolumeOp,
    Write,
    WriteExtent,
    Zero,
    ZeroKind,
)

IMAGE_SIZE = 64


def extent(
    ts: int, offset: int, data: bytes, index: int = 0, count: int = 1, length: int | None = None
) -> WriteExtent:
    return WriteExtent(ts, offset, len(data) if length is None else length, index, count, data)


def write(vol: str, *extents: WriteExtent, iid: str = "i0", epoch: int = 0) -> Write:
    return Write(vol, iid, epoch, tuple(extents))


def zero(
    vol: str,
    ts: int,
    offset: int,
    length: int,
    kind: ZeroKind = ZeroKind.ZERO,
    iid: str = "i0",
    epoch: int = 0,
) -> Zero:
    return Zero(vol, iid, epoch, ts, offset, length, kind)


def marker(name: str, ts: int, iid: str = "i0", epoch: int = 0) -> Marker:
    return Marker(name, ts, iid, epoch, 0)


@dataclasses.dataclass
class Rec:
    partition: int
    offset: int
    record: LogRecord
    zombie: bool
    min_ts: int
    max_ts: int


@dataclasses.dataclass
class Log:
    parts: list[list[Rec]]
    ops: list[ApplyOp]  # every legitimate op, ts ascending (ts are unique across the CG)
    volumes: list[str]

    @property
    def max_ts(self) -> int:
        return self.ops[-1].ts

    def required_offsets(self, w: int, rng: random.Random | None = None) -> dict[int, int]:
        """A valid log_offsets for W: every legitimate record with ts <= w lies below it.

        Tight (just past the last such record) unless rng asks for some slack, as a
        service reading end offsets later would give.
        """
        out = {}
        for p, recs in enumerate(self.parts):
            end = 0
            for r in recs:
                if not r.zombie and r.min_ts <= w:
                    end = r.offset + 1
            if rng is not None and recs and rng.random() < 0.5:
                later = [r.offset + 1 for r in recs if r.offset + 1 >= end]
                end = rng.choice(later) if later else end
            out[p] = end
        return out


def make_log(rng: random.Random, n_vol: int, n_part: int, steps: int) -> Log:
    iids = ["i0", "i1"]
    epoch = {i: rng.randrange(3) for i in iids}
    vols = [f"v{k}" for k in range(n_vol)]
    part_of = {v: rng.randrange(n_part) for v in vols}
    owner = {v: rng.choice(iids) for v in vols}
    parts: list[list[Rec]] = [[] for _ in range(n_part)]
    next_off = [rng.randrange(3) for _ in range(n_part)]
    ops: list[ApplyOp] = []
    batch: dict[str, list[WriteExtent]] = {v: [] for v in vols}
    batch_epoch: dict[str, int] = {}
    newest_in_part: dict[tuple[str, int], int] = {}  # (iid, partition) -> epoch seen there
    ts = rng.randrange(1, 50)

    def emit(p: int, rec: LogRecord, tss: list[int], zombie: bool = False) -> None:
        parts[p].append(Rec(p, next_off[p], rec, zombie, min(tss), max(tss)))
        next_off[p] += 1 + (rng.random() < 0.2)  # gaps, as transaction markers leave
        if not zombie:
            key = (rec.interceptor_id, p)
            newest_in_part[key] = max(newest_in_part.get(key, -1), rec.epoch)

    def flush(v: str) -> None:
        if batch[v]:
            rec = write(v, *batch[v], iid=owner[v], epoch=batch_epoch[v])
            emit(part_of[v], rec, [x.ts for x in batch[v]])
            batch[v] = []

    last_ts: dict[str | None, int] = {}

    def tick(key: str | None) -> int:
        """The next ts for a volume (or for CG-wide records: None); volumes may share one."""
        nonlocal ts
        if last_ts.get(key, -1) >= ts or rng.random() < 0.7:
            ts += rng.randint(1, 3)
        last_ts[key] = ts
        return ts

    for v in vols:
        t = tick(v)
        rec = VolumeChange(VolumeOp.CREATE, v, v, IMAGE_SIZE, {}, t, owner[v], epoch[owner[v]])
        emit(part_of[v], rec, [t])
        ops.append(
            ApplyOp(OpKind.VOLUME_CHANGE, v, t, 0, IMAGE_SIZE, None, rec, owner[v], epoch[owner[v]])
        )

    for _ in range(steps):
        r = rng.random()
        v = rng.choice(vols)
        iid, e = owner[v], epoch[owner[v]]
        if r < 0.45:
            t = tick(v)
            off = rng.randrange(IMAGE_SIZE)
            length = rng.randint(1, min(24, IMAGE_SIZE - off))
            data = rng.randbytes(length)
            count = 1 if length == 1 or rng.random() < 0.5 else rng.randint(2, min(4, length))
            cuts = sorted(rng.sample(range(1, length), count - 1)) if count > 1 else []
            bounds = [0, *cuts, length]
            order = list(range(count))
            if rng.random() < 0.3:
                rng.shuffle(order)  # the planner must not rely on arrival order
            batch_epoch[v] = e
            for i in order:
                frag = data[bounds[i] : bounds[i + 1]]
                batch[v].append(extent(t, off + bounds[i], frag, i, count, length))
                if rng.random() < 0.3:
                    flush(v)
                    batch_epoch[v] = e
            ops.append(ApplyOp(OpKind.WRITE, v, t, off, length, data, None, iid, e))
            if rng.random() < 0.4:
                flush(v)
        elif r < 0.58:
            flush(v)
            t = tick(v)
            off = rng.randrange(IMAGE_SIZE)
            length = rng.randint(0, IMAGE_SIZE - off)
            kind = rng.choice([ZeroKind.ZERO, ZeroKind.TRIM])
            emit(part_of[v], zero(v, t, off, length, kind, iid, e), [t])
            ops.append(ApplyOp(OpKind(kind.lower()), v, t, off, length, None, None, iid, e))
        elif r < 0.66:
            t = tick(None)
            iid = rng.choice(iids)
            cg_rec: Marker | Snapshot = marker(f"m{t}", t, iid, epoch[iid])
            kind_of = OpKind.MARKER
            if rng.random() < 0.5:
                cg_rec = Snapshot(f"m{t}", t, tuple(vols), iid, epoch[iid])
                kind_of = OpKind.SNAPSHOT
            emit(rng.randrange(n_part), cg_rec, [t])
            ops.append(ApplyOp(kind_of, None, t, 0, 0, None, cg_rec, iid, epoch[iid]))
        elif r < 0.70:
            flush(v)
            t = tick(v)
            rec = VolumeChange(VolumeOp.RESIZE, v, v, IMAGE_SIZE, {"k": "x"}, t, iid, e)
            emit(part_of[v], rec, [t])
            ops.append(ApplyOp(OpKind.VOLUME_CHANGE, v, t, 0, IMAGE_SIZE, None, rec, iid, e))
        elif r < 0.75:
            # restart: the old instance's records are all out before the new one writes
            for u in vols:
                if owner[u] == iid:
                    flush(u)
            epoch[iid] += rng.randint(1, 3)
        elif r < 0.82:
            # a zombie: an older epoch after the newer one already showed in this partition
            cands = [(i, p, ep) for (i, p), ep in newest_in_part.items() if ep > 0]
            if cands:
                zi, p, ep = rng.choice(cands)
                old = rng.randrange(ep)
                zts = rng.randrange(0, ts + 30)
                zv = rng.choice([u for u in vols if part_of[u] == p] or vols)
                if rng.random() < 0.5:
                    rec = write(zv, extent(zts, 0, b"Z" * 8), iid=zi, epoch=old)
                    emit(p, rec, [zts], zombie=True)
                else:
                    rec0 = zero(zv, zts, 0, IMAGE_SIZE, ZeroKind.ZERO, zi, old)
                    emit(p, rec0, [zts], zombie=True)
        else:
            flush(v)
    for v in vols:
        flush(v)
    # take()'s documented order: ts, then volume ops before CG-wide ones, then volume id
    ops.sort(key=lambda op: (op.ts, op.volume_id is None, op.volume_id or ""))
    return Log(parts, ops, vols)


def image_at(log: Log, w: int) -> dict[str, bytearray]:
    images = {v: bytearray(IMAGE_SIZE) for v in log.volumes}
    for op in log.ops:
        if op.ts > w:
            break
        apply_to(images, op)
    return images


def apply_to(images: dict[str, bytearray], op: ApplyOp) -> None:
    if op.kind is OpKind.WRITE:
        assert op.data is not None and op.volume_id is not None
        images[op.volume_id][op.offset : op.offset + op.length] = op.data
    elif op.kind in (OpKind.ZERO, OpKind.TRIM):
        assert op.volume_id is not None
        images[op.volume_id][op.offset : op.offset + op.length] = bytes(op.length)


def expected_ops(log: Log, after: int, upto: int) -> list[ApplyOp]:
    return [op for op in log.ops if after < op.ts <= upto]


def ready_take(p: ApplyPlanner, w: int, offsets: dict[int, int] | None = None) -> list[ApplyOp]:
    assert p.ready(w, offsets or {})
    return p.take(w)
