"""A migration target's synchronization of one volume: bulk copy, then the CG's log.

Why the image ends up exactly the source's (``pipeline.ops.migrate`` says when it stops):

1. ``start``: every log partition's read_committed end, read *before* the copy begins. A
   record below it is committed, so its write took effect on the source's image before
   (the interceptor writes the image, then stamps and queues the record, then commits it).
2. The bulk copy reads the source's image while it is live (data runs only; an all-zero
   chunk stays a hole). A block may be read before or after a concurrent write: either
   way that write's record lies at or above ``start`` and step 3 applies it again.
3. The follower reads every partition from ``start`` (read_committed) and applies the
   volume's records in ts order through ``ReplayPlan``, the applier's planner (fragments,
   epochs, impossible values), so a record it cannot validate stops the sync, never
   reaches the image. Re-applying a write the copy already had is an overwrite with the
   same bytes; the last write of a block is applied last.

``finish(end)`` waits until the follower's position reached ``end`` in every partition
(the high watermarks read after the source held the volume: every record the source wrote
for it lies below them), then the image is fdatasynced.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.image.allocation import fd_allocation
from connectors.image.image import Image
from connectors.kafka.consumer import Consumer
from connectors.kafka.errors import PARTITION_EOF, as_error
from connectors.kafka.reading import end_offsets
from connectors.kafka.settings import ToolSettings
from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.errors import LowmarkError, MigrationError, RecordError
from pipeline.logs import event
from pipeline.ops.replay import ReplayPlan
from schemas import codec
from schemas.records import LOG_RECORDS, VolumeChange, VolumeOp
from schemas.ts import MAX_TS

__all__ = ["SyncState", "TargetSync"]

log = logging.getLogger("lowmark.migrate")
_CHUNK = 8 << 20


@dataclass
class SyncState:
    phase: str = "starting"  # starting, copying, following, finished, failed, stopped
    copied_bytes: int = 0
    total_bytes: int = 0
    records_applied: int = 0
    error: str = ""
    positions: dict[int, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "copied_bytes": self.copied_bytes,
                "total_bytes": self.total_bytes, "records_applied": self.records_applied,
                "error": self.error,
                "positions": {str(p): o for p, o in self.positions.items()}}  # fmt: skip


class TargetSync:
    """Synchronizes ``image`` (a staged volume) from ``source_image`` and the log."""

    def __init__(self, image: Image, volume_id: str, source_image: Path,
                 kafka_conf: Mapping[str, Any], log_topic: str,
                 migration: str) -> None:  # fmt: skip
        self.image = image
        self.volume_id = volume_id
        self.source_image = source_image
        self.kafka_conf = dict(kafka_conf)
        self.topic = log_topic
        self.migration = migration
        self.state = SyncState(total_bytes=image.size)
        self._in_kernel = True  # copy_file_range until the kernel says it cannot
        #: the log ends a catch-up reached while the source held the volume
        self.caught_up_to: dict[int, int] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._key = volume_id.encode()
        self._thread = threading.Thread(target=self._run, name=f"lowmark-migrate-{volume_id}",
                                        daemon=True)  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.state.phase not in ("finished", "failed"):
            self.state.phase = "stopped"
        self.image.close()

    def finish(self, end: Mapping[int, int], timeout_s: float) -> SyncState:
        """Wait until every partition was read to ``end``; then stop and fdatasync."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.state
            if st.phase == "failed":
                raise MigrationError(f"the sync of volume {self.volume_id} failed: {st.error}")
            if st.phase == "following" and all(
                st.positions.get(p, -1) >= o for p, o in end.items()
            ):
                break
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"the sync of volume {self.volume_id} did not reach the log's end {dict(end)}"
                    f" within {timeout_s:.0f} s (at {st.positions}, {st.phase}); check the "
                    "brokers, then re-run `lowmark migrate` (or --abort it)"
                )
            time.sleep(0.005)
        self._stop.set()
        self._thread.join(30)
        self.image.sync()
        self.image.close()
        self.state.phase = "finished"
        return self.state

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            start = end_offsets(self.kafka_conf, self.topic, 30)
            if not start:
                raise MigrationError(f"the CG's log {self.topic} does not exist")
            self.state.phase = "copying"
            self._copy()
            self.state.phase = "following"
            self._follow(start)
        except (LowmarkError, OSError) as exc:
            self.state.error = str(exc)
            self.state.phase = "failed"
            event(log, "migration sync failed", level=logging.ERROR, volume=self.volume_id,
                  migration=self.migration, error=str(exc))  # fmt: skip

    def _copy(self) -> None:
        try:
            fd = os.open(self.source_image, os.O_RDONLY)
        except OSError as exc:
            raise MigrationError(
                f"cannot read the source image {self.source_image} ({exc}): the target "
                "reads it directly (same host or shared storage)"
            ) from None
        try:
            size = min(os.fstat(fd).st_size, self.image.size)
            pos = 0
            while pos < size and not self._stop.is_set():
                for n, hole in fd_allocation(fd, pos, size - pos, 256):
                    if not hole:
                        self._copy_run(fd, pos, n)
                    pos += n
                    self.state.copied_bytes = pos
        finally:
            os.close(fd)

    def _copy_run(self, fd: int, offset: int, length: int) -> None:
        """One data run, in the kernel (copy_file_range: no bytes through Python, a
        reflink where the file system shares extents), in steps the stop can cut."""
        end = offset + length
        while offset < end and not self._stop.is_set():
            n = min(_CHUNK, end - offset)
            done = self._copy_range(fd, offset, n)
            if done <= 0:  # the source shrank under us: the log brings what follows
                return
            offset += done
            self.state.copied_bytes = offset

    def _copy_range(self, fd: int, offset: int, n: int) -> int:
        if self._in_kernel:
            try:
                return os.copy_file_range(fd, self.image.fd, n, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self._in_kernel = False  # across file systems (or none has it): by hand
        data = os.pread(fd, n, offset)
        if data.count(0) != len(data):
            self.image.pwrite(offset, data)
        return len(data)

    def _follow(self, start: Mapping[int, int]) -> None:
        plan = ReplayPlan(0, MAX_TS)
        c = Consumer(ToolSettings(self.kafka_conf).follower())
        try:
            c.assign(self.topic, dict(start))
            self.state.positions = dict(start)
            while not self._stop.is_set():
                first = c.poll(0.01)
                msgs = [] if first is None else [first, *c.consume(500, 0)]
                for msg in msgs:
                    self._take(plan, msg)
        finally:
            c.close()

    def _take(self, plan: ReplayPlan, msg: Any) -> None:
        p = msg.partition()
        err = msg.error()
        if err is not None:
            if err.code() == PARTITION_EOF:
                self.state.positions[p] = max(self.state.positions.get(p, 0), msg.offset())
                return
            exc = as_error(err, f"reading {self.topic}[{p}]")
            if exc.retriable:
                return
            raise exc
        self.state.positions[p] = msg.offset() + 1
        if msg.key() != self._key:
            return
        try:
            rec = codec.decode(msg.value() or b"", LOG_RECORDS)
        except RecordError as exc:
            raise MigrationError(
                f"record {self.topic}[{p}]@{msg.offset()} of volume {self.volume_id} is bad "
                f"({type(exc).__name__}: {exc}); nothing after it was applied to the stage. "
                "Abort the migration (`lowmark migrate --abort`) and inspect the record"
            ) from None
        for op in plan.add(rec, p, msg.offset()):
            self._apply(op)

    def _apply(self, op: ApplyOp) -> None:
        if op.volume_id != self.volume_id:
            return
        if op.kind is OpKind.VOLUME_CHANGE:
            assert isinstance(op.record, VolumeChange)
            if op.record.op is not VolumeOp.RESIZE:
                raise MigrationError(
                    f"volume {self.volume_id} was {op.record.op.value}d at the source while it "
                    "was being migrated; abort the migration (`lowmark migrate --abort`)"
                )
            self.image.resize(op.record.size)
            return
        if op.kind in (OpKind.MARKER, OpKind.SNAPSHOT):
            return
        if op.offset + op.length > self.image.size:
            raise MigrationError(f"{op.kind} at ts {op.ts} lies past volume {self.volume_id}'s "
                                 f"{self.image.size} bytes; abort the migration")  # fmt: skip
        if op.kind is OpKind.WRITE:
            assert op.data is not None
            self.image.pwrite(op.offset, op.data)
        else:
            self.image.zero(op.offset, op.length, punch=op.kind is OpKind.TRIM)
        self.state.records_applied += 1
