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

Layout of an image directory (the same as a site's data dir, so the result can seed a
site): ``images/<volume id>.img`` and ``volumes.json`` (the catalog).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as CKafkaError

from connectors.image.image import Image
from pipeline.backup.plan import ApplyOp, ApplyPlanner, OpKind
from pipeline.errors import ApplyError, KafkaUnavailableError, RecordError, RestoreError
from pipeline.fsutil import atomic_write
from schemas import codec
from schemas.records import (
    LOG_RECORDS,
    LogRecord,
    Marker,
    VolumeChange,
    VolumeOp,
    VolumeRecord,
    Write,
)

_PARTITION_EOF = -191


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

    def __init__(self, from_w: int, to_ts: int) -> None:
        if to_ts < from_w:
            raise ApplyError(
                f"cannot replay backwards: the images are at {from_w}, the target is {to_ts}; "
                "restore an older base first"
            )
        self.from_w = from_w
        self.to_ts = to_ts
        self.markers: list[Marker] = []
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
        return _VolumePlan(planner, partition)

    def _note_epoch(self, record: LogRecord, partition: int, offset: int) -> None:
        key = (record.interceptor_id, record.epoch, partition)
        if key in self._facts:
            return
        self._facts[key] = offset
        for vol in self._volumes.values():
            if vol.partition == partition:
                vol.planner.note_epoch(key[0], key[1], {partition: offset})


# ---------------------------------------------------------------- images


class ImageSet:
    """The images of a CG in one directory, changed only through ``apply``."""

    def __init__(self, root: Path, *, keep_deleted: bool = False) -> None:
        self.root = Path(root)
        # a backup site keeps a deleted volume's bytes as <id>.deleted for the operator
        self.keep_deleted = keep_deleted
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.catalog: dict[str, dict[str, Any]] = {}
        self.images: dict[str, Image] = {}
        self._touched: set[str] = set()
        path = self.catalog_path
        if path.exists():
            try:
                vols = orjson.loads(path.read_bytes())["volumes"]
                self.catalog = {v["volume_id"]: v for v in vols}
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise ApplyError(f"volume catalog {path} is unreadable ({exc})") from None
        for vid in self.catalog:
            self.images[vid] = Image(self.image_path(vid))

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    @property
    def catalog_path(self) -> Path:
        return self.root / "volumes.json"

    def image_path(self, volume_id: str) -> Path:
        return self.image_dir / f"{volume_id}.img"

    def apply(self, op: ApplyOp) -> None:
        """Apply one op exactly as the applier does, so restore and backup agree byte for byte."""
        if op.kind is OpKind.VOLUME_CHANGE:
            assert isinstance(op.record, VolumeChange)
            self._volume_change(op.record)
            return
        if op.kind in (OpKind.MARKER, OpKind.SNAPSHOT):
            return
        img = self.images.get(op.volume_id or "")
        if img is None:
            raise ApplyError(
                f"{op.kind} at ts {op.ts} for volume {op.volume_id!r}, which the base images "
                "do not hold and the replayed log did not create; the base does not match "
                "this log (wrong site dir or CG?)"
            )
        if op.offset + op.length > img.size:
            raise ApplyError(
                f"{op.kind} at ts {op.ts} on volume {op.volume_id} [{op.offset}, "
                f"{op.offset + op.length}) extends past its {img.size} bytes; the base does "
                "not match this log"
            )
        if op.kind is OpKind.WRITE:
            assert op.data is not None
            img.pwrite(op.offset, op.data)
        else:  # zero / trim read as zeroes; a zero stays allocated, as at the primary
            img.zero(op.offset, op.length, punch=op.kind is OpKind.TRIM)
        self._touched.add(op.volume_id or "")

    def _volume_change(self, rec: VolumeChange) -> None:
        vid, op = rec.volume_id, rec.op
        if op is VolumeOp.DELETE:
            img = self.images.pop(vid, None)
            if img is not None:
                img.close()
                path = self.image_path(vid)
                if self.keep_deleted:
                    path.rename(path.with_suffix(".deleted"))
                else:
                    path.unlink(missing_ok=True)
            self.catalog.pop(vid, None)
            self._touched.discard(vid)
        else:
            img = self.images.get(vid)
            if img is None:
                img = self.images[vid] = Image(self.image_path(vid), create_size=rec.size)
            if img.size != rec.size:
                img.resize(rec.size)
            self.catalog[vid] = {
                "volume_id": vid,
                "name": rec.name,
                "size": rec.size,
                "metadata": dict(rec.metadata),
            }
            self._touched.add(vid)
        self.save_catalog()

    def save_catalog(self) -> None:
        body = orjson.dumps({"volumes": list(self.catalog.values())}, option=orjson.OPT_INDENT_2)
        atomic_write(self.catalog_path, body)

    def take_touched(self) -> list[Image]:
        """The images changed since the last call (to fdatasync before a checkpoint)."""
        touched = [img for vid in self._touched if (img := self.images.get(vid)) is not None]
        self._touched.clear()
        return touched

    def sync(self) -> None:
        for img in self.take_touched():
            img.sync()

    def volumes(self) -> list[dict[str, Any]]:
        """id, name, size and content digest of every volume, sorted by id."""
        out = []
        for vid, img in sorted(self.images.items()):
            info = self.catalog.get(vid, {})
            out.append(
                {
                    "volume_id": vid,
                    "name": info.get("name", vid),
                    "size": img.size,
                    "digest": img.content_digest(),
                }
            )
        return out

    def close(self) -> None:
        for img in self.images.values():
            img.close()
        self.images.clear()

    def __enter__(self) -> ImageSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- reading the log


def log_consumer(kafka_conf: Mapping[str, Any]) -> Consumer:
    """A read_committed consumer of our own (no group offsets are ever committed)."""
    return Consumer(
        {
            **kafka_conf,
            "group.id": f"lowmark-replay-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # a start offset that retention deleted must fail loudly, never skip records
            "auto.offset.reset": "error",
            # a partition at its end must not hold up the others for the default 500 ms
            "fetch.wait.max.ms": 50,
        }
    )


def read_range(
    kafka_conf: Mapping[str, Any],
    topic: str,
    start: Mapping[int, int],
    end: Mapping[int, int],
    stall_timeout_s: float = 30.0,
) -> Iterator[Any]:
    """Messages of ``topic`` with start[p] <= offset < end[p], in offset order per partition.

    Partitions interleave. Raises KafkaUnavailableError when no message arrives for
    ``stall_timeout_s`` (a long replay is fine, a stuck one is not).
    """
    todo = {p: s for p, s in start.items() if s < end.get(p, 0)}
    if not todo:
        return
    c = log_consumer(kafka_conf)
    try:
        c.assign([TopicPartition(topic, p, off) for p, off in todo.items()])
        last_progress = time.monotonic()
        while todo:
            msgs = c.consume(500, 0.2)
            if not msgs and time.monotonic() - last_progress > stall_timeout_s:
                raise KafkaUnavailableError(
                    f"reading {topic} stalled for {stall_timeout_s:.0f}s at partitions "
                    f"{sorted(todo)} (wanted up to {dict(end)}); check the brokers"
                )
            for msg in msgs:
                p = msg.partition()
                if p not in todo:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == _PARTITION_EOF:
                        # control records of transactions can end a partition below `end`
                        if msg.offset() >= end[p]:
                            del todo[p]
                        continue
                    if err.code() == CKafkaError._AUTO_OFFSET_RESET:
                        raise RestoreError(
                            f"{topic}[{p}] no longer holds offset {start[p]}: retention "
                            "deleted records this replay needs; restore from a newer base"
                        )
                    if err.retriable():
                        continue
                    raise KafkaUnavailableError(f"reading {topic}[{p}]: {err.str()}")
                last_progress = time.monotonic()
                if msg.offset() >= end[p]:
                    del todo[p]
                    continue
                yield msg
                if msg.offset() + 1 >= end[p]:
                    del todo[p]
    except KafkaException as exc:
        raise KafkaUnavailableError(f"reading {topic}: {exc}") from None
    finally:
        c.close()


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
    images: ImageSet,
    *,
    from_w: int,
    to_ts: int,
    start_offsets: Mapping[int, int],
    end_offsets: Mapping[int, int],
    on_progress: ProgressFn | None = None,
) -> ReplayResult:
    """Apply the records with from_w < ts <= to_ts of ``topic`` onto ``images``.

    Preconditions (the caller checks them; restore.py does): ``images`` hold exactly the
    records with ts <= from_w; every record with ts > from_w lies at or above
    ``start_offsets``; every record with ts <= to_ts lies below ``end_offsets`` (a
    published watermark's log_offsets, with to_ts <= that W). Images are fdatasynced
    before this returns.
    """
    plan = ReplayPlan(from_w, to_ts)
    prog = ReplayProgress(
        records_total=sum(max(0, end_offsets.get(p, 0) - s) for p, s in start_offsets.items())
    )
    if to_ts > from_w:
        for msg in read_range(kafka_conf, topic, start_offsets, end_offsets):
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
    return ReplayResult(from_w, to_ts, resume, plan.markers, prog)


def _apply(images: ImageSet, op: ApplyOp, prog: ReplayProgress) -> None:
    images.apply(op)
    prog.ops_applied += 1
    prog.bytes_applied += op.length if op.kind is OpKind.WRITE else 0
