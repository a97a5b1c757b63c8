"""The dirty-region log's files and its group commit: a write's regions are on disk before
the write is acknowledged.

One file per volume, ``SiteDir.region_log_path(volume_id)`` (``state/regions/<id>.dirty``):
a header page (magic, region_bytes, region count) and the bitmap
(``pipeline.primary.regions``). The header is written once, atomically (``atomic_write``:
a new file, or a rewrite when the volume is resized or region_bytes changed); after that
only whole bitmap pages are written in place, each carrying every bit set in memory.

The fsync discipline (``tests/primary/test_region_log.py`` crashes between every step):

- a write calls ``VolumeRegions.mark`` before its local write. A region already dirty and
  durable costs nothing (``Mark.durable`` at once). A new bit joins the current flush
  generation; one writer thread writes the changed pages and fdatasyncs the file, then
  completes every mark of that generation: all writes that arrived while the previous
  fdatasync ran share the next one (group commit).
- the write is acknowledged only once its ``Mark`` is durable (the volume and the NBD
  export wait for it; the NBD event loop through a callback, never blocking).
- every ``clear_interval_s`` the thread clears the regions whose records are durable in
  Kafka (the interceptor's ``durable_seq``) and writes their pages without an fsync: a
  clear lost in a crash only makes the next start republish the region.
- a failed write or fdatasync fails every mark waiting for it (``RegionLogError``: the
  write is refused, never acknowledged unmarked) and every later mark that needs a new bit.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ReplicationError
from pipeline.fsutil import atomic_write
from pipeline.logs import event
from pipeline.primary.regions import (
    HEADER_BYTES,
    PAGE_BYTES,
    ActivityLog,
    DirtyRegions,
    Marked,
    PagedBits,
    RegionGeometryError,
    byte_ranges,
    decode_header,
    encode_header,
    regions_of_ranges,
    set_bits,
)
from pipeline.site import SiteDir
from pipeline.timesource import REAL_TIME, TimeSource

log = logging.getLogger("lowmark.regions")

Callback = Callable[[BaseException | None], None]


class RegionLogError(ReplicationError):
    """The dirty-region log cannot record a region: the write it guards is refused."""


class FileOps:
    """The two calls the fsync discipline rests on (a test swaps them for a crashable fake)."""

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)


OS_FILES = FileOps()


class Mark:
    """A write's claim on its regions: durable (the ack may go) or waiting for an fsync.

    The write's owner ends it exactly once: ``assign(seq)`` once its record is queued, or
    ``release(touched)`` when it will have none."""

    __slots__ = ("_ended", "_vol", "extents", "marked")

    def __init__(
        self, vol: VolumeRegions | None, marked: Marked | None, extents: Marked | None = None
    ) -> None:
        self._vol = vol
        self.marked = marked
        #: the activity log's mark (what the write waits for), None without one
        self.extents = extents
        self._ended = False

    @property
    def gen(self) -> int:
        """The flush generation of the write's waiting level that makes it durable."""
        waits = self.extents or self.marked
        return 0 if waits is None else waits.gen

    @property
    def durable(self) -> bool:
        return self._vol is None or self._vol.is_durable(self)

    def wait(self, timeout_s: float | None = None) -> None:
        if self._vol is not None:
            self._vol.log.wait(self, timeout_s)

    def add_done_callback(self, fn: Callback) -> None:
        """``fn(None)`` once durable, ``fn(exc)`` on failure (maybe from the writer thread)."""
        if self._vol is None:
            fn(None)
        else:
            self._vol.log.on_durable(self, fn)

    def assign(self, seq: int) -> None:
        if self._vol is not None and self.marked is not None and not self._ended:
            self._ended = True
            self._vol.log.assign(self._vol, self, seq)

    def release(self, touched: bool) -> None:
        if self._vol is not None and self.marked is not None and not self._ended:
            self._ended = True
            self._vol.log.release(self._vol, self, touched)


#: the mark of a volume without a region log: durable, ends as nothing
NO_MARK = Mark(None, None)


class VolumeRegions:
    """One volume's bitmap and its file."""

    def __init__(
        self,
        log_: RegionLog,
        volume_id: str,
        path: Path,
        state: DirtyRegions,
        al: ActivityLog | None = None,
        al_path: Path | None = None,
    ) -> None:
        self.log = log_
        self.volume_id = volume_id
        self.path = path
        self.state = state
        self.fd = -1
        #: the coarse level a write waits for (None: it waits for its fine bits)
        self.al = al
        self.al_path = al_path
        self.al_fd = -1
        self.loaded = False  # set by open_volume: the file existed before this instance
        self.failure: RegionLogError | None = None
        #: held while the file is written (the writer thread's cycle, a resize's rewrite);
        #: taken before the log's lock, never after it
        self.io = threading.Lock()

    @property
    def waited(self) -> PagedBits:
        """The bitmap a write's mark waits for: the activity log, or the fine bitmap."""
        return self.al if self.al is not None else self.state

    def is_durable(self, mark: Mark) -> bool:
        return mark.gen <= self.waited.durable_gen

    def mark(self, offset: int, length: int) -> Mark:
        return self.log.mark(self, offset, length)

    def held_ranges(self, max_bytes: int = 1 << 20) -> list[tuple[int, int]]:
        with self.log.lock:
            held = self.state.held()
            return byte_ranges(held, self.state.region_bytes, self.state.size, max_bytes)

    def republished(self, offset: int, length: int, seq: int) -> None:
        with self.log.lock:
            span = range(
                offset // self.state.region_bytes, -(-(offset + length) // self.state.region_bytes)
            )
            self.state.republished(span, seq)

    def resize(self, size: int) -> None:
        self.log.resize(self, size)

    def _rewrite(self) -> None:
        """Write header and bitmap atomically and reopen, the fine bitmap first (caller
        holds the log's lock): an extent leaves the activity log's file only after the
        fine bits of its regions are in theirs."""
        self.fd = _rewrite(self.path, self.state, self.fd)
        if self.al is not None and self.al_path is not None:
            self.al_fd = _rewrite(self.al_path, self.al, self.al_fd)

    def close_files(self) -> None:
        for fd in (self.fd, self.al_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.al_fd = -1


def _rewrite(path: Path, bits: PagedBits, fd: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, encode_header(bits.region_bytes, bits.nregions) + bytes(bits.bitmap))
    bits.begin_flush()  # everything is in the new file
    bits.end_flush(bits.gen - 1, synced=True)
    if fd >= 0:
        os.close(fd)
    return os.open(path, os.O_RDWR)


class RegionLog:
    """The dirty-region logs of one interceptor's volumes and their writer thread."""

    def __init__(
        self,
        site: SiteDir,
        region_bytes: int,
        durable_seq: Callable[[], int],
        *,
        extent_bytes: int = 0,
        clear_interval_s: float = 0.05,
        keep_s: float = 0.0,
        max_dirty_bytes: int = 0,
        files: FileOps = OS_FILES,
        time_source: TimeSource = REAL_TIME,
    ) -> None:
        self.site = site
        self.region_bytes = region_bytes
        #: the activity log's extent (0: none, a write waits for its fine bits)
        self.extent_bytes = extent_bytes if extent_bytes > region_bytes else 0
        self.durable_seq = durable_seq
        self.clear_interval_s = clear_interval_s
        #: a region stays dirty this long after its last write (its next write is free)...
        self.keep_s = keep_s
        #: ...unless a volume has more dirty regions than this (0: no bound)
        self.max_dirty = max_dirty_bytes // region_bytes if max_dirty_bytes else 0
        self.files = files
        self.time_source = time_source
        self.lock = threading.Lock()
        self._cv = threading.Condition(self.lock)
        self._volumes: dict[str, VolumeRegions] = {}
        self._waiters: dict[str, list[tuple[int, Callback]]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats: dict[str, int] = {
            "region_marks": 0,  # writes that marked at least one region
            "region_marks_new": 0,  # of them, those that set a bit (and waited for an fsync)
            "region_fsyncs": 0,  # of the bitmap writes wait for
            "region_background_fsyncs": 0,  # of the fine bitmap, under an activity log
            "activity_evicted": 0,
            "region_page_writes": 0,
            "region_cleared": 0,
            "republished_bytes": 0,
            "republished_regions": 0,
        }

    # ---------------------------------------------------------------- volumes

    def open_volume(self, volume_id: str, size: int) -> VolumeRegions:
        """The volume's log, loaded: the regions a crash left dirty are held (republish
        them: the fine bitmap's bits and every region of the activity log's extents); a
        file with another region size or volume size is rewritten to this one."""
        path = self.site.region_log_path(volume_id)
        al_path = self.site.activity_log_path(volume_id)
        state = DirtyRegions(self.region_bytes, size)
        al = ActivityLog(self.extent_bytes, size) if self.extent_bytes else None
        vol = VolumeRegions(self, volume_id, path, state, al, al_path if al else None)
        found, found_al = self._load(path), self._load(al_path)
        # the log was on disk before: it knows every region an earlier instance left dirty
        vol.loaded = bool(found[0] or found_al[0])
        with self.lock:
            dirty = [(r * rb, rb) for rb, _n, bits in (found, found_al) if rb for r in bits]
            state.hold(regions_of_ranges(dirty, self.region_bytes))
            if dirty:
                event(
                    log,
                    "dirty regions found at start: an earlier instance stopped with "
                    "writes not durable in Kafka; they will be republished",
                    level=logging.WARNING,
                    volume=volume_id,
                    regions=len(state),
                    region_bytes=self.region_bytes,
                )
            same = found[:2] == (state.region_bytes, state.nregions)
            if same and not found_al[2]:
                vol.fd = os.open(path, os.O_RDWR)
            else:  # first the fine bits (with the extents' regions), then the extents go
                vol.fd = _rewrite(path, state, vol.fd)
            if al is not None:
                vol.al_fd = _rewrite(al_path, al, vol.al_fd)
            elif found_al[0]:
                al_path.unlink()  # the activity log was turned off: its extents are held
            self._volumes[volume_id] = vol
        return vol

    def _load(self, path: Path) -> tuple[int, int, list[int]]:
        """(region_bytes, nregions, set bits) of a bitmap file; (0, 0, []) when absent."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return 0, 0, []
        try:
            rb, nregions = decode_header(raw[:HEADER_BYTES])
        except RegionGeometryError as exc:
            raise RegionLogError(
                f"dirty-region log {path} is damaged ({exc}): the regions its volume wrote "
                "but had not replicated are unknown. Resync that volume's backups, then "
                "move the file aside and start again"
            ) from None
        return rb, nregions, set_bits(raw[HEADER_BYTES:], nregions)

    def resize(self, vol: VolumeRegions, size: int) -> None:
        with vol.io, self.lock:
            vol.state.resize(size)
            if vol.al is not None:
                vol.al.resize(size)
            vol._rewrite()
        self._complete(vol)

    def dirty_regions(self) -> int:
        with self.lock:
            return sum(len(v.state) for v in self._volumes.values())

    # ---------------------------------------------------------------- marks

    def mark(self, vol: VolumeRegions, offset: int, length: int) -> Mark:
        with self.lock:
            marked = vol.state.mark(offset, length)
            extents = None if vol.al is None else vol.al.mark(offset, length, marked.gen)
            mark = Mark(vol, marked, extents)
            self.stats["region_marks"] += 1
            if (extents or marked).new:
                self.stats["region_marks_new"] += 1
            waited = vol.waited
            if vol.failure is not None and mark.gen > waited.durable_gen:
                self._end(vol, mark, None, touched=False)
                mark._ended = True
                raise vol.failure
            if waited.sync_wanted:
                self._cv.notify_all()
        return mark

    def assign(self, vol: VolumeRegions, mark: Mark, seq: int) -> None:
        with self.lock:
            self._end(vol, mark, seq)

    def release(self, vol: VolumeRegions, mark: Mark, touched: bool) -> None:
        with self.lock:
            self._end(vol, mark, None, touched)

    def _end(self, vol: VolumeRegions, mark: Mark, seq: int | None, touched: bool = False) -> None:
        assert mark.marked is not None
        now = self.time_source.monotonic()
        if seq is None:
            vol.state.release(mark.marked.regions, touched)
        else:
            vol.state.assign(mark.marked.regions, seq, now)
        if vol.al is not None and mark.extents is not None:
            vol.al.done(mark.extents.regions, now)

    def on_durable(self, mark: Mark, fn: Callback) -> None:
        vol = mark._vol
        assert vol is not None
        with self.lock:
            if mark.gen > vol.waited.durable_gen:
                if vol.failure is None:
                    self._waiters.setdefault(vol.volume_id, []).append((mark.gen, fn))
                    return
                ready: BaseException | None = vol.failure
            else:
                ready = None
        fn(ready)

    def wait(self, mark: Mark, timeout_s: float | None) -> None:
        vol = mark._vol
        assert vol is not None
        deadline = None if timeout_s is None else self.time_source.monotonic() + timeout_s
        with self.lock:
            while mark.gen > vol.waited.durable_gen:
                if vol.failure is not None:
                    raise vol.failure
                remaining = None if deadline is None else deadline - self.time_source.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RegionLogError(
                        f"the dirty-region log of volume {vol.volume_id} was not fsynced "
                        f"within {timeout_s}s; check the state directory's disk"
                    )
                self._cv.wait(remaining)

    # ---------------------------------------------------------------- the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lowmark-regions", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after a last clear and flush (a clean stop leaves only the
        regions whose records are not durable, none after a drained interceptor)."""
        self._halt()
        self._cycle(clear=True, final=True)
        with self.lock:
            for vol in self._volumes.values():
                vol.close_files()

    def crash(self) -> None:
        """Stop without writing anything more (tests: a process that dies); a mark still
        waiting fails, as its process would never have acknowledged it."""
        self._halt()
        self._fail_all(RegionLogError("the dirty-region log was stopped"), quiet=True)
        with self.lock:
            for vol in self._volumes.values():
                vol.close_files()

    def _halt(self) -> None:
        with self.lock:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        now = self.time_source.monotonic
        next_clear = now() + self.clear_interval_s
        while True:
            with self.lock:
                while not self._stop and not any(
                    v.waited.sync_wanted for v in self._volumes.values()
                ):
                    remaining = next_clear - now()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                if self._stop:
                    return
            clear = now() >= next_clear
            if clear:
                next_clear = now() + self.clear_interval_s
            try:
                self._cycle(clear)
            except Exception:  # a bug: fail the waiting marks rather than hang them
                log.exception("dirty-region log thread failed")
                self._fail_all(RegionLogError("the dirty-region log thread failed"))
                return

    def _cycle(self, clear: bool, final: bool = False) -> None:
        """One group commit: clear what Kafka holds, write changed pages, fdatasync the
        files with marks waiting, complete those marks. Per volume under its ``io`` lock,
        so a resize's rewrite never interleaves with a page write of an older snapshot.
        Under an activity log the fine bitmap is flushed on clear cycles only, before the
        extents it lets go are written out of the activity log."""
        durable_seq = self.durable_seq() if clear else 0
        now = self.time_source.monotonic()
        keep_s = 0.0 if final else self.keep_s  # a clean stop keeps nothing it need not
        with self.lock:
            volumes = list(self._volumes.values())
        for vol in volumes:
            with vol.io:
                with self.lock:
                    if vol.fd < 0 or vol.failure is not None:
                        continue
                    if clear:
                        cleared = vol.state.clear(durable_seq, now, keep_s, self.max_dirty)
                        self.stats["region_cleared"] += cleared
                al = vol.al
                if al is None:
                    ok = self._flush(vol, vol.state, vol.fd, vol.state.sync_wanted or final)
                else:
                    ok = True
                    if clear or final:  # the fine bits, durable before their extents go
                        ok = self._flush(vol, vol.state, vol.fd, True, background=True)
                        if ok:
                            with self.lock:
                                evicted = al.evict(now, keep_s, vol.state.durable_gen)
                            self.stats["activity_evicted"] += evicted
                    ok = ok and self._flush(vol, al, vol.al_fd, al.sync_wanted or final)
            if ok:
                self._complete(vol)

    def _flush(
        self, vol: VolumeRegions, bits: PagedBits, fd: int, sync: bool, background: bool = False
    ) -> bool:
        """Write ``bits``' changed pages to ``fd`` (and fdatasync it with ``sync``); False
        when that failed (the volume's marks are failed). The caller holds ``vol.io``."""
        with self.lock:
            if not (sync or bits.pending_pages()):
                return True
            gen, pages = bits.begin_flush()
        try:
            for page, data in sorted(pages.items()):
                self.files.pwrite(fd, data, HEADER_BYTES + page * PAGE_BYTES)
                self.stats["region_page_writes"] += 1
            if sync:
                self.files.fdatasync(fd)
                self.stats["region_background_fsyncs" if background else "region_fsyncs"] += 1
        except OSError as exc:
            self._fail(
                vol,
                RegionLogError(
                    f"cannot write the dirty-region log of {vol.path}: {exc}; writes to "
                    f"volume {vol.volume_id} are refused until it is fixed and the "
                    "service restarted"
                ),
            )
            return False
        with self.lock:
            bits.end_flush(gen, synced=sync)
        return True

    def _complete(self, vol: VolumeRegions) -> None:
        """Call back every mark of ``vol`` whose generation is durable now."""
        with self.lock:
            waiting = self._waiters.get(vol.volume_id, [])
            done = vol.waited.durable_gen
            fire = [fn for g, fn in waiting if g <= done]
            self._waiters[vol.volume_id] = [(g, fn) for g, fn in waiting if g > done]
            self._cv.notify_all()
        for fn in fire:
            fn(None)

    def _fail(self, vol: VolumeRegions, exc: RegionLogError, quiet: bool = False) -> None:
        with self.lock:
            vol.failure = exc
            waiting = self._waiters.pop(vol.volume_id, [])
            self._cv.notify_all()
        if not quiet:
            event(log, "dirty-region log failed", level=logging.ERROR, error=str(exc))
        for _g, fn in waiting:
            fn(exc)

    def _fail_all(self, exc: RegionLogError, quiet: bool = False) -> None:
        for vol in list(self._volumes.values()):
            self._fail(vol, exc, quiet)

    # ---------------------------------------------------------------- numbers

    def metrics(self) -> dict[str, Any]:
        with self.lock:
            dirty = sum(len(v.state) for v in self._volumes.values())
        marks = self.stats["region_marks_new"]
        fsyncs = self.stats["region_fsyncs"]
        with self.lock:
            active = sum(len(v.al) for v in self._volumes.values() if v.al is not None)
        return {
            **self.stats,
            "region_dirty": dirty,
            "region_bytes": self.region_bytes,
            "activity_extents": active,
            "activity_extent_bytes": self.extent_bytes,
            "region_marks_per_fsync": marks / fsyncs if fsyncs else 0.0,
        }
