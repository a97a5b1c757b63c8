"""The replay engine shared by restore, replay and verify: images at W + log -> images at TS.

Given images that hold exactly the records with ts <= W (a snapshot, a restored copy, or
empty images at the start of the log) and the log from offsets at or below the first
record with ts > W, ``replay`` applies every record with W < ts <= TS, per volume in ts
order, and leaves images that hold exactly the records with ts <= TS.

Why it is safe to apply while reading (no global sort, bounded memory): a volume's
records sit in one partition in ts order (ARCHITECTURE, "Per-volume order") and
different volumes commute. So each volume gets its own ``ApplyPlanner`` (the applier's
ordering and fragment-assembly brain, with its checks), and after each record the
volume's ops up to the last *complete* ts it has read are taken and applied at once.
One planner per volume, not per partition, because a planner has one applied W: in a
shared partition, a volume created later by another interceptor may bring a ts below
one already taken for its neighbour. Epoch facts (an interceptor's new epoch first seen
at an offset) are shared by every planner of a partition, so a zombie record of one
volume is caught by evidence from another, as in the applier.

The images are an ``ImageSet`` (``pipeline.backup.images``) over a directory with a site's
layout (``pipeline.site``), so the result can seed a site; or any ``ImageSink``, such as a
failover's ``Backlog``, which folds the ops into an extent index instead of writing them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka.errors import OFFSET_GONE
from connectors.kafka.reading import read_range
from connectors.kafka.settings import ToolSettings
from pipeline.backup.plan import ApplyOp, ApplyPlanner, OpKind
from pipeline.backup.rollforward import ImageSink
from pipeline.errors import ApplyError, KafkaError, RecordError, RestoreError
from schemas import codec
from schemas.records import (
    LOG_RECORDS,
    LogRecord,
    Marker,
    VolumeRecord,
    Watermark,
    Write,
)

#: markers a replay reports: the newest this many of its range
MAX_MARKERS = 1024


# ---------------------------------------------------------------- pure planning


def record_ts_range(record: LogRecord) -> tuple[int, int]:
    """(lowest, highest) ts in a decoded log record."""
    tss = record.timestamps()
    return min(tss), max(tss)


def _complete_through(record: VolumeRecord) -> int:
    """Every op of this record's volume with ts <= the result has been read in full.

    A Write may end with a fragment whose siblings come in the next record; that write is
    not complete yet, but everything before its ts is (per-volume ts order).
    """
    if not isinstance(record, Write):
        return max(record.timestamps())
    last = record.extents[-1]
    if last.fragment_index == last.fragment_count - 1:
        return last.ts
    return last.ts - 1


@dataclass
class _VolumePlan:
    planner: ApplyPlanner
    partition: int
    done: bool = False  # every op with ts <= to_ts is taken; later records are not needed


class ReplayPlan:
    """Pure: decoded log records in (per partition, offset order) -> ops to apply now.

    ``from_w``: the images hold exactly the records with ts <= from_w. ``to_ts``: the cut
    to reach. Feed every record of the read range with ``add``; apply the returned ops in
    order; call ``finish`` once every partition was read to its end offset.
    """

    def __init__(self, from_w: int, to_ts: int, target: Watermark | None = None) -> None:
        if to_ts < from_w:
            raise ApplyError(
                f"cannot replay backwards: the images are at {from_w}, the target is {to_ts}; "
                "restore an older base first"
            )
        self.from_w = from_w
        self.to_ts = to_ts
        # the W replayed to (or a later one): its members and departed instances prove
        # records of older epochs stale, as they do for the applier that reads it
        self.target = target
        # the newest MAX_MARKERS of the range (a long range holds any number); older ones
        # are dropped and counted
        self.markers: deque[Marker] = deque(maxlen=MAX_MARKERS)
        self.markers_dropped = 0
        self._volumes: dict[str, _VolumePlan] = {}
        # epoch facts (interceptor, epoch, partition, first offset), shared per partition
        self._facts: dict[tuple[str, int, int], int] = {}
        # per partition: the first offset holding a record with a ts > to_ts (resume point)
        self._first_after: dict[int, int] = {}

    def add(self, record: LogRecord, partition: int, offset: int) -> list[ApplyOp]:
        low, high = record_ts_range(record)
        if high > self.to_ts and partition not in self._first_after:
            self._first_after[partition] = offset
        self._note_epoch(record, partition, offset)
        if not isinstance(record, VolumeRecord):
            if isinstance(record, Marker) and self.from_w < record.ts <= self.to_ts:
                self.markers_dropped += len(self.markers) == self.markers.maxlen
                self.markers.append(record)
            return []  # CG-wide records change no image
        vid = record.volume_id
        vol = self._volumes.get(vid)
        if vol is None:
            vol = self._volumes[vid] = self._new_volume(partition)
        if vol.done and low > self.to_ts:
            return []
        vol.planner.add(record, partition, offset)
        w = min(_complete_through(record), self.to_ts)
        if w <= vol.planner.applied_w:
            return []
        ops = vol.planner.take(w)
        vol.done = w >= self.to_ts
        return ops

    def finish(self) -> list[ApplyOp]:
        """Ops still pending at the end of the read range (raises if a write is incomplete)."""
        ops: list[ApplyOp] = []
        for vol in self._volumes.values():
            ops.extend(vol.planner.take(self.to_ts))
        return ops

    def resume_offsets(self, end_offsets: Mapping[int, int]) -> dict[int, int]:
        """Per partition, where a later replay from ``to_ts`` must start reading."""
        return {p: self._first_after.get(p, end) for p, end in end_offsets.items()}

    def _new_volume(self, partition: int) -> _VolumePlan:
        evidence = [(iid, e, p, off) for (iid, e, p), off in self._facts.items()]
        planner = ApplyPlanner(self.from_w, max_pending_bytes=1 << 62, epoch_evidence=evidence)
        # take() refuses a w it was not told is fully read; per-volume completeness is
        # tracked here instead (_complete_through), so every w up to to_ts is allowed
        planner.ready(self.to_ts, {})
        if self.target is not None:
            for m in self.target.members:
                planner.note_epoch(m.interceptor_id, m.epoch, self.target.log_offsets)
            for d in self.target.departed:
                planner.note_departed(d.interceptor_id, d.epoch, d.s)
        return _VolumePlan(planner, partition)

    def _note_epoch(self, record: LogRecord, partition: int, offset: int) -> None:
        key = (record.interceptor_id, record.epoch, partition)
        if key in self._facts:
            return
        self._facts[key] = offset
        for vol in self._volumes.values():
            if vol.partition == partition:
                vol.planner.note_epoch(key[0], key[1], {partition: offset})


# ---------------------------------------------------------------- reading the log


def read_log(
    kafka_conf: Mapping[str, Any],
    topic: str,
    start: Mapping[int, int],
    end: Mapping[int, int],
    stall_timeout_s: float = 30.0,
) -> Iterator[Any]:
    """Messages of the log with start[p] <= offset < end[p] (``reading.read_range``);
    a start offset retention deleted is a ``RestoreError``, never a silent skip."""
    settings = ToolSettings(kafka_conf).log_reader()
    try:
        yield from read_range(settings, topic, start, end, stall_timeout_s=stall_timeout_s)
    except KafkaError as exc:
        if exc.code != OFFSET_GONE:
            raise
        raise RestoreError(f"{exc}; restore from a newer base") from None


# ---------------------------------------------------------------- the engine


@dataclass
class ReplayProgress:
    records_done: int = 0
    records_total: int = 0  # offsets in the range (an upper bound: includes txn markers)
    bytes_read: int = 0
    ops_applied: int = 0
    bytes_applied: int = 0
    started_mono: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ReplayResult:
    from_w: int
    to_ts: int
    #: per partition: where a replay continuing from to_ts must start reading
    resume_offsets: dict[int, int]
    markers: list[Marker]
    progress: ReplayProgress


ProgressFn = Callable[[ReplayProgress], None]


def replay(
    kafka_conf: Mapping[str, Any],
    topic: str,
    images: ImageSink,
    *,
    from_w: int,
    to_ts: int,
    start_offsets: Mapping[int, int],
    end_offsets: Mapping[int, int],
    on_progress: ProgressFn | None = None,
    target: Watermark | None = None,
) -> ReplayResult:
    """Apply the records with from_w < ts <= to_ts of ``topic`` onto ``images``.

    Preconditions (the caller checks them; restore.py does): ``images`` hold exactly the
    records with ts <= from_w; every record with ts > from_w lies at or above
    ``start_offsets``; every record with ts <= to_ts lies below ``end_offsets`` (a
    published watermark's log_offsets, with to_ts <= that W). Images are fdatasynced
    before this returns. ``target``: that watermark: its epochs judge zombie records.
    """
    plan = ReplayPlan(from_w, to_ts, target)
    prog = ReplayProgress(
        records_total=sum(max(0, end_offsets.get(p, 0) - s) for p, s in start_offsets.items())
    )
    if to_ts > from_w:
        for msg in read_log(kafka_conf, topic, start_offsets, end_offsets):
            value = msg.value() or b""
            prog.records_done += 1
            prog.bytes_read += len(value)
            try:
                dec = codec.decode(value, LOG_RECORDS)
            except RecordError as exc:
                raise ApplyError(
                    f"record {topic}[{msg.partition()}]@{msg.offset()} is bad "
                    f"({type(exc).__name__}: {exc}); nothing after it was applied, so the "
                    "images are incomplete. Inspect it with `lowmark tail` or kcat"
                ) from None
            for op in plan.add(dec, msg.partition(), msg.offset()):
                _apply(images, op, prog)
            if on_progress is not None and prog.records_done % 256 == 0:
                on_progress(prog)
        for op in plan.finish():
            _apply(images, op, prog)
        resume = plan.resume_offsets(dict(end_offsets))
    else:  # nothing read: whatever lies past the start is still to come
        resume = dict(start_offsets)
    images.sync()
    if on_progress is not None:
        on_progress(prog)
    return ReplayResult(from_w, to_ts, resume, list(plan.markers), prog)


def _apply(images: ImageSink, op: ApplyOp, prog: ReplayProgress) -> None:
    images.apply(op)
    prog.ops_applied += 1
    prog.bytes_applied += op.length if op.kind is OpKind.WRITE else 0
