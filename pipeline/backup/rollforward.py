"""Roll-forward with reads: a backup site serves its images while it catches up to a cut.

The backlog (the ops the pure ``ApplyPlanner`` yields for ts <= the target cut, in its
order) is folded into an ``ExtentIndex`` before serving: it keeps only the newest bytes of
every range, so rolling forward is writing the index's extents to the images in any order
(FAILOVER design, item 3).

- ``Backlog``: the index, its spill file, the volume changes and the one lock.
- ``RollForwardExport``: an NBD ``Export`` over a site image; reads merge the index with the
  image, writes drop the range from the index first (the write wins).
- ``RollForward``: the background worker that writes the index's extents into the images.

The rule that keeps a foreground write and the roll-forward apart: **a range is either in
the index or in the image, never in between, as seen under ``Backlog.lock``.** The worker
takes a batch of extents out of the index and writes them into the images inside one
critical section; a foreground write drops its range from the index and writes the inner
export inside the same lock. So a foreground write either comes after the worker's write
of that range (and overwrites it), or its drop came first and the worker never sees the
range again: a roll-forward write can never land on a foreground write. A read holds the
lock for its index lookup and its image read, so it never sees an extent that was taken
but not yet written. A batch is small (``batch_bytes``, 1 MiB by default: a pwrite into the
page cache), which bounds what a foreground request waits for.

Volume changes (create, resize, delete) are collected apart and applied *before* serving:
an export's size is fixed when it is served, and a resize or delete decides which ranges
exist at all. Folding them into the index as they come keeps the result equal to applying
the backlog in order: a shrink drops the index beyond the new size (those bytes were cut
off; a later grow reads them as zeroes, which applying the changes in order to the image
gives), a delete drops the whole volume (a recreate starts from zeroes).

A crash during roll-forward restarts cleanly: the index is rebuilt from the same ops, the
ranges written in the foreground since then are dropped from it (the caller knows them:
they are the new generation's log), and rolling forward again writes the same newest bytes
over whatever the crashed run had written, which is idempotent. The volume changes are
not applied again once serving began (the caller records that phase durably): a shrink and
a grow re-applied would zero the foreground writes beyond the smaller size.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, Protocol

from connectors.nbd.server import Export
from pipeline.backup.extent_index import Extent, ExtentIndex, Piece, Spilled, Zeroes
from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.errors import ApplyError
from schemas.records import VolumeChange, VolumeOp

DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_BATCH_BYTES = 1024 * 1024


class Backlog:
    """The backlog of a roll-forward: index, spill file, volume changes, the shared lock.

    ``max_memory_bytes`` bounds the write data the index keeps in memory; beyond it a new
    write's data is appended to a spill file in ``spill_dir`` and the index keeps its
    position. (Memory is counted per indexed byte: a buffer partly overwritten stays
    allocated while any slice of it is indexed.)
    """

    def __init__(
        self, *, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES, spill_dir: Path | None = None
    ) -> None:
        self.index = ExtentIndex()
        self.lock = threading.Lock()
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = spill_dir
        self.volume_changes: list[ApplyOp] = []
        self.ops_added = 0
        self.bytes_added = 0  # write data and zeroed lengths, as fed (before overwrites)
        self.spilled_bytes = 0
        self.dropped_by_writes = 0  # index bytes forgotten because a foreground write won
        self._spill_fd = -1
        self._spill_path: Path | None = None
        self._spill_end = 0
        self._spill_owned = True

    # -- building ------------------------------------------------------------------------

    def add(self, op: ApplyOp) -> None:
        """Fold one planner op in; feed them in the planner's order."""
        with self.lock:
            self._add(op)

    def add_all(self, ops: Iterable[ApplyOp]) -> None:
        """Fold many ops in under one hold of the lock (building, before serving)."""
        with self.lock:
            for op in ops:
                self._add(op)

    # an ``ImageSink``: the replay engine folds the backlog in as it would apply it
    apply = add

    def sync(self) -> None:
        """Nothing to make durable: the index is rebuilt from the log after a crash."""

    def add_spilled(self, volume_id: str, offset: int, length: int, pos: int) -> None:
        """Fold in a write whose data already lies in the spill file at ``pos``."""
        with self.lock:
            self.ops_added += 1
            self.bytes_added += length
            self.spilled_bytes += length
            self.index.add_spilled(volume_id, offset, length, pos)

    def adopt_spill(self, path: Path) -> None:
        """Use an existing file (a paused site's stage) as the spill file: ``add_spilled``
        points into it, new spills append to it, ``close`` leaves it (its owner deletes it)."""
        assert self._spill_fd < 0, "adopt a spill file before anything spills"
        self._spill_fd = os.open(path, os.O_RDWR | os.O_APPEND)
        self._spill_path = path
        self._spill_end = os.fstat(self._spill_fd).st_size
        self._spill_owned = False

    def _add(self, op: ApplyOp) -> None:
        self.ops_added += 1
        vid = op.volume_id or ""
        if op.kind is OpKind.WRITE:
            assert op.data is not None
            self.bytes_added += len(op.data)
            if self.index.resident_bytes + len(op.data) > self.max_memory_bytes:
                self.index.add_spilled(vid, op.offset, len(op.data), self._spill(op.data))
            else:
                self.index.add_write(vid, op.offset, op.data)
        elif op.kind in (OpKind.ZERO, OpKind.TRIM):
            self.bytes_added += op.length
            self.index.add_zero(vid, op.offset, op.length, punch=op.kind is OpKind.TRIM)
        elif op.kind is OpKind.VOLUME_CHANGE:
            rec = op.record
            assert isinstance(rec, VolumeChange)
            if rec.op is VolumeOp.DELETE:
                self.index.drop_volume(rec.volume_id)
            else:
                self.index.drop_from(rec.volume_id, rec.size)
            self.volume_changes.append(op)
        # markers and snapshots change no image

    def _spill(self, data: bytes) -> int:
        if self._spill_fd < 0:
            if self.spill_dir is None:
                raise ApplyError(
                    f"the roll-forward backlog exceeds its memory budget of "
                    f"{self.max_memory_bytes} bytes and has no spill directory; give it one "
                    "or raise the budget"
                )
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill_path = self.spill_dir / f"rollforward-{os.getpid()}-{id(self):x}.spill"
            self._spill_fd = os.open(
                self._spill_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600
            )
        pos = self._spill_end
        view = memoryview(data)
        while view:
            view = view[os.write(self._spill_fd, view) :]
        self._spill_end += len(data)
        self.spilled_bytes += len(data)
        return pos

    # -- reading -------------------------------------------------------------------------

    def piece_bytes(self, piece: Piece, length: int) -> bytes | memoryview:
        """The bytes of an indexed piece (reads the spill file for a spilled one)."""
        if isinstance(piece, memoryview):
            return piece
        if isinstance(piece, Zeroes):
            return bytes(length)
        assert isinstance(piece, Spilled)
        data = os.pread(self._spill_fd, length, piece.pos)
        if len(data) != length:
            raise ApplyError(
                f"short read of the roll-forward spill file {self._spill_path}: {len(data)} "
                f"of {length} bytes at {piece.pos}; was it truncated or deleted?"
            )
        return data

    def overlay(self, volume_id: str, offset: int, base: bytes) -> bytes:
        """``base`` (the image's bytes at ``offset``) with the indexed ranges laid over it.
        Call with ``lock`` held."""
        segs = self.index.lookup(volume_id, offset, len(base))
        if all(piece is None for _, _, piece in segs):
            return base
        out = bytearray(base)
        for start, length, piece in segs:
            if piece is not None:
                rel = start - offset
                out[rel : rel + length] = self.piece_bytes(piece, length)
        return bytes(out)

    @property
    def bytes_left(self) -> int:
        return self.index.bytes_indexed

    def close(self) -> None:
        """Close the spill file; delete it unless it was adopted."""
        if self._spill_fd >= 0:
            os.close(self._spill_fd)
            self._spill_fd = -1
            if self._spill_path is not None and self._spill_owned:
                self._spill_path.unlink(missing_ok=True)


class RollForwardExport:
    """An NBD export of one volume during roll-forward (module docstring for the rule).

    ``images``: where the worker writes. Given, a foreground write first rolls forward the
    indexed bytes it overlaps (the image then holds the cut's bytes there) and only then
    drops them. That matters for an inner export that writes its image after returning
    (``VolumeExport`` under Kafka backpressure waits in a thread): a read of the range
    before the write lands then sees the cut's bytes, never the image's older ones. Without
    it the inner export must write its image before it returns, as ``FileExport`` does.
    """

    def __init__(
        self, inner: Export, backlog: Backlog, volume_id: str, *, images: ImageSink | None = None
    ) -> None:
        self.inner = inner
        self.backlog = backlog
        self.volume_id = volume_id
        self.images = images
        self.name = inner.name
        self.description = inner.description
        self.read_only = inner.read_only
        self.can_multi_conn = inner.can_multi_conn
        self.reads_from_index = 0  # reads that touched an indexed range

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        backlog = self.backlog
        with backlog.lock:
            base = self.inner.pread(offset, length)
            if not backlog.index.bytes_indexed:
                return base
            out = backlog.overlay(self.volume_id, offset, base)
        if out is not base:
            self.reads_from_index += 1
        return out

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None:
        with self.backlog.lock:
            self._drop(offset, len(data))
            return self.inner.write(offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Awaitable[None] | None:
        with self.backlog.lock:
            self._drop(offset, length)
            return self.inner.write_zeroes(offset, length, fua, may_trim)

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        with self.backlog.lock:
            self._drop(offset, length)
            return self.inner.trim(offset, length, fua)

    def flush(self) -> Awaitable[None] | None:
        # fdatasync is per file, so the inner export's flush also covers what the worker
        # wrote through its own descriptor of the same image
        return self.inner.flush()

    def _drop(self, offset: int, length: int) -> None:
        backlog = self.backlog
        if self.images is not None and backlog.index.covers_any(self.volume_id, offset, length):
            for start, n, piece in backlog.index.lookup(self.volume_id, offset, length):
                if piece is not None:
                    extent = Extent(self.volume_id, start, n, piece)
                    self.images.apply(extent_op(backlog, extent))
        backlog.dropped_by_writes += backlog.index.drop(self.volume_id, offset, length)


class ImageSink(Protocol):
    """Where the worker writes extents: ``ImageSet`` is one."""

    def apply(self, op: ApplyOp) -> None: ...

    def sync(self) -> None: ...


class RollForward:
    """Writes the backlog's extents into the images in the background until none is left."""

    def __init__(
        self,
        backlog: Backlog,
        images: ImageSink,
        *,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        rate_bytes_s: float = 0.0,
    ) -> None:
        self.backlog = backlog
        self.images = images
        self.batch_bytes = batch_bytes
        #: 0: as fast as the disk takes it; else leave the rest to the clients' I/O
        self.rate_bytes_s = rate_bytes_s
        self.done = threading.Event()  # set once the index is empty and the images synced
        self.ended = threading.Event()  # set when run() returns: done, stopped or failed
        self.error: BaseException | None = None
        self.bytes_total = backlog.bytes_left
        self.bytes_done = 0
        self.extents_done = 0
        self.batches = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._finished: float | None = None

    def step(self) -> int:
        """Roll one batch forward; the bytes written (0: nothing left)."""
        backlog = self.backlog
        with backlog.lock:
            batch = backlog.index.take_some(self.batch_bytes)
            for extent in batch:
                self.images.apply(extent_op(backlog, extent))
        n = sum(e.length for e in batch)
        self.bytes_done += n
        self.extents_done += len(batch)
        self.batches += bool(batch)
        return n

    def run(self) -> None:
        """Roll everything forward in this thread (``start`` runs it in the background)."""
        self._started = self._started or time.monotonic()
        try:
            while not self._stop.is_set():
                if not self.step():
                    self.images.sync()
                    self._finished = time.monotonic()
                    self.done.set()
                    return
                # let a waiting foreground request have the lock; keep to the rate
                time.sleep(self._pause())
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.ended.set()

    def _pause(self) -> float:
        if self.rate_bytes_s <= 0:
            return 0.0
        due = self._started + self.bytes_done / self.rate_bytes_s
        return max(0.0, due - time.monotonic())

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self.run, name="roll-forward", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the worker to stop after the batch in progress, without waiting for it."""
        self._stop.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the batch in progress and wait; the rest stays in the index."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Whether everything was rolled forward; returns early if the worker stopped or
        failed (see ``error``)."""
        self.ended.wait(timeout_s)
        return self.done.is_set()

    @property
    def bytes_left(self) -> int:
        return self.backlog.bytes_left

    def metrics(self) -> dict[str, Any]:
        end = self._finished or time.monotonic()
        elapsed = end - self._started if self._started else 0.0
        return {
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "bytes_left": self.bytes_left,
            "extents_left": self.backlog.index.extent_count,
            "extents_done": self.extents_done,
            "batches": self.batches,
            "spilled_bytes": self.backlog.spilled_bytes,
            "dropped_by_writes": self.backlog.dropped_by_writes,
            "progress": 1.0 - self.bytes_left / self.bytes_total if self.bytes_total else 1.0,
            "elapsed_s": elapsed,
            "done": self.done.is_set(),
            "error": repr(self.error) if self.error else None,
        }


def extent_op(backlog: Backlog, extent: Extent) -> ApplyOp:
    """The op that writes an extent into the images (ts 0: it carries no log position)."""
    piece = extent.piece
    if isinstance(piece, Zeroes):
        kind, data = (OpKind.TRIM if piece.punch else OpKind.ZERO), None
    else:
        kind, data = OpKind.WRITE, bytes(backlog.piece_bytes(piece, extent.length))
    return ApplyOp(
        kind, extent.volume_id, 0, extent.offset, extent.length, data, None, "rollforward", 0
    )


def apply_volume_changes(backlog: Backlog, images: ImageSink) -> int:
    """Apply the backlog's volume changes, in order, before serving; how many. Once only:
    after a restart that follows serving, skip it (module docstring)."""
    for op in backlog.volume_changes:
        images.apply(op)
    return len(backlog.volume_changes)
