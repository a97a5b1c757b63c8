"""The primary-side volume API: a consistency group of sparse raw images whose writes replicate.

    with ConsistencyGroup.open("cg1", data_dir, kafka_conf, interceptor_id="host-a") as cg:
        vol = cg.create_volume("db", 1 << 30, mode="sync")
        vol.write(0, b"hello")        # local pwrite, stamped, replicated
        vol.flush()                   # fdatasync + every earlier record durable in Kafka

Ordering: a volume's lock covers stamping the ts, the local write and queuing its record,
so overlapping writes get timestamps in the order the image saw them (the lock is per
volume, stricter than per extent; a pwrite into the page cache takes microseconds).

Promises, per mode (``flush`` is the same in both):

- write / write_zeroes / trim return: async, after the local write; sync, acknowledged
  once the image is fdatasynced (else a power cut could lose it here, and the restart's
  republish of its region would take it from the backups too) and the write is inside a
  published cut: W >= ts (durable in Kafka is not enough:
  another interceptor of the CG can hold W below it, for good if it dies before it is
  fenced; so a sync CG needs `lowmark watermark` running, see ``pipeline.primary.cut_follower``).
- failure to replicate: async, later writes block at the backpressure bound and ``flush``
  raises; sync, the call itself raises ``ReplicationError`` (never a silent ack), also
  when no W covers it within ``replication_timeout_s``.
- flush returns (both): the image is fdatasynced and every earlier record is durable in
  Kafka (not necessarily inside a cut yet).
- once the interceptor is fenced (a newer generation of the CG exists, or its
  transactional id was taken), nothing is acknowledged any more: writes, sync waits and
  flushes raise ``FencedError`` (``pipeline.primary.generation_watch``).
- ``ConsistencyGroup.open(..., generation=g, clock_floor_us=base_w)`` runs generation g
  (its own topics; every ts above base_w), as a failover's new primary does.
- write_zeroes keeps the range allocated (FALLOC_FL_ZERO_RANGE); trim may deallocate it
  (punches a hole). Both read back as zeroes, at the primary and at every backup.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from connectors.image.image import Image
from connectors.kafka.admin import Admin
from pipeline.errors import ConfigError, VolumeError, VolumeMovedError
from pipeline.fsutil import fsync_path
from pipeline.primary.access import Parked, Parking
from pipeline.primary.gate import WriteGate, WriteHeld
from pipeline.primary.interceptor import Interceptor, InterceptorConfig, Ticket
from pipeline.primary.marker_member import MarkerMember
from pipeline.primary.pit_copy import PitCopy
from pipeline.primary.pit_snapshots import PrimarySnapshots
from pipeline.primary.region_log import NO_MARK, Mark, RegionLog, VolumeRegions
from pipeline.primary.republish import republish
from pipeline.primary.topology_entries import VolumeEntries
from pipeline.site import SiteDir, check_volume_id
from pipeline.timesource import REAL_TIME, TimeSource
from schemas.records import VolumeChange, VolumeOp, Zero, ZeroKind

log = logging.getLogger("lowmark.volume")

Mode = Literal["async", "sync"]


def check_volume_name(name: str) -> str:
    # a primary's volume id is its name, and an id names a file of the site directory
    try:
        return check_volume_id(name)
    except VolumeError:
        raise VolumeError(
            f"volume name {name!r} is invalid: 1-128 of letters, digits, '.', '-', '_'"
        ) from None


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    name: str
    size: int
    mode: Mode = "async"
    metadata: dict[str, str] | None = None


class Volume:
    """One replicated volume. Thread-safe."""

    def __init__(self, cg: ConsistencyGroup, info: VolumeInfo, image: Image) -> None:
        self._cg = cg
        self.info = info
        self.image = image
        self._lock = threading.Lock()
        #: a named snapshot's copy in progress: a write saves what it overwrites there first
        self.pit: PitCopy | None = None
        #: the volume's dirty-region log (None: the log is off)
        self.regions: VolumeRegions | None = (
            cg.regions.open_volume(info.volume_id, info.size) if cg.regions else None
        )
        #: its access state here (NVMe ANA's): only ``optimized`` takes writes; ``change``
        #: while a migration's cutover holds ``gate``; ``inaccessible`` once it moved away
        self.access = "optimized"
        #: where a migration's cutover holds this volume's writes (the CG's gate is a marker's)
        self.gate = WriteGate(cg.interceptor.time_source.monotonic, "a migration's cutover")

    @property
    def volume_id(self) -> str:
        return self.info.volume_id

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def mode(self) -> Mode:
        return self.info.mode

    # -- non-blocking forms: local effect now, a ticket for durability (the NBD server's path)

    def mark(self, offset: int, length: int) -> Mark:
        """Claim the range's regions in the dirty-region log, before its local write.

        Hand the mark to ``submit_write`` / ``submit_zero`` once ``mark.durable`` (the NBD
        export waits through ``add_done_callback``); they end it. ``NO_MARK`` when there is
        nothing to mark (the log is off, or the range is empty)."""
        if self.regions is None or length == 0:
            return NO_MARK
        self.image.check_range(offset, length)
        return self.regions.mark(offset, length)

    def _marked(self, offset: int, length: int, mark: Mark | None) -> Mark:
        """The caller's mark, or one taken and waited for here (the blocking API)."""
        if mark is not None:
            return mark
        mark = self.mark(offset, length)
        try:
            mark.wait(self._cg.interceptor.config.replication_timeout_s)
        except BaseException:
            mark.release(touched=False)
            raise
        return mark

    def submit_write(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        commit_wait: bool = True,
        mark: Mark | None = None,
        gate_wait: bool = True,
    ) -> Ticket:
        """Write locally now; the ticket tells when it is durable in Kafka.

        ``commit_wait=False``: the caller waits ``clock.commit_wait_us(ticket.ts)`` itself
        before acknowledging (the NBD server sleeps asynchronously instead of blocking).
        ``mark``: the range's durable ``Volume.mark`` (without one this call marks and
        waits for the mark's fsync); it is ended here, also on failure.
        ``gate_wait=False``: raise ``WriteHeld`` (touching nothing, the mark kept) instead of
        waiting while a marker holds the CG's writes (``pipeline.primary.gate``).
        """
        data = bytes(data)
        self.image.check_range(offset, len(data))
        engine = self._cg.interceptor
        if not data:  # nothing takes effect, nothing to replicate
            return engine.barrier()
        mark = self._marked(offset, len(data), mark)
        touched = False
        try:
            engine.wait_for_space(len(data))
            with self._cg.admitted(gate_wait), self.admitted(gate_wait), self._lock:
                self.check_writable()
                token, ts = engine.stamp()
                try:
                    touched = True
                    if self.pit is not None:
                        self.pit.before_write(offset, len(data))
                    self.image.pwrite(offset, data)
                except OSError:
                    engine.abandon(token)
                    raise
                ticket = engine.append(token, self.volume_id, ts, offset, data)
                mark.assign(ticket.seq)
        except WriteHeld:
            raise  # nothing touched: the caller retries with the same mark
        except BaseException:
            mark.release(touched)
            raise
        if commit_wait:
            engine.clock.commit_wait(ts)
        return ticket

    def submit_zero(
        self,
        offset: int,
        length: int,
        *,
        trim: bool = False,
        commit_wait: bool = True,
        mark: Mark | None = None,
        gate_wait: bool = True,
    ) -> Ticket:
        """Make the range read as zeroes now; the ticket tells when it is durable in Kafka.

        ``trim``: it may be deallocated (a TRIM record; NBD TRIM, or WRITE_ZEROES without
        NO_HOLE). Otherwise it stays allocated (a ZERO record), here and at every backup.
        ``mark`` and ``gate_wait`` as for ``submit_write``.
        """
        self.image.check_range(offset, length)
        engine = self._cg.interceptor
        if length == 0:
            return engine.barrier()
        mark = self._marked(offset, length, mark)
        touched = False
        try:
            with self._cg.admitted(gate_wait), self.admitted(gate_wait), self._lock:
                self.check_writable()
                token, ts = engine.stamp()
                try:
                    touched = True
                    if self.pit is not None:
                        self.pit.before_write(offset, length)
                    # the record below carries the same choice, so the backups allocate alike
                    self.image.zero(offset, length, punch=trim)
                except OSError:
                    engine.abandon(token)
                    raise
                kind = ZeroKind.TRIM if trim else ZeroKind.ZERO
                iid, epoch = engine.origin
                rec = Zero(self.volume_id, iid, epoch, ts, offset, length, kind)
                ticket = engine.append_record(token, rec)
                mark.assign(ticket.seq)
        except WriteHeld:
            raise
        except BaseException:
            mark.release(touched)
            raise
        if commit_wait:
            engine.clock.commit_wait(ts)
        return ticket

    def admitted(self, wait: bool) -> AbstractContextManager[None]:
        """Inside this volume's gate (a migration's cutover holds it), as
        ``ConsistencyGroup.admitted`` is the CG's."""
        return self.gate.admitted(wait, self._cg.interceptor.config.replication_timeout_s)

    def check_writable(self) -> None:
        """Writes only where the volume is ``optimized``: never two writers of one volume.
        Checked inside the gate, so a write parked through a cutover is refused after it."""
        if self.access != "optimized":
            raise self.moved()

    def check_readable(self) -> None:
        if self.access == "inaccessible":
            raise self.moved()

    def moved(self) -> VolumeMovedError:
        iid = self._cg.interceptor.config.interceptor_id
        return VolumeMovedError(
            f"volume {self.name} is {self.access} at interceptor {iid}: it was migrated "
            "away or is being cut over; reconnect to the interceptor serving it now "
            "(`lowmark status` shows its access states)"
        )

    def submit_flush(self) -> Ticket:
        self.image.sync()
        return self._cg.interceptor.barrier()

    # -- blocking forms (the Python API)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``; returns its ts. Sync mode waits for a cut (W >= ts)."""
        return self._acknowledge(self.submit_write(offset, data))

    def write_zeroes(self, offset: int, length: int) -> int:
        return self._acknowledge(self.submit_zero(offset, length))

    def trim(self, offset: int, length: int) -> int:
        return self._acknowledge(self.submit_zero(offset, length, trim=True))

    def _acknowledge(self, ticket: Ticket) -> int:
        """Sync mode: durable in Kafka, then inside a published cut, both within one
        ``replication_timeout_s`` (the caller's bound on an acknowledgement)."""
        if self.mode == "sync":
            engine = self._cg.interceptor
            now = engine.time_source.monotonic
            deadline = now() + engine.config.replication_timeout_s
            self.image.sync()  # while the record is on its way (see the module doc)
            ticket.wait()
            engine.wait_covered(ticket.ts, max(0.0, deadline - now()))
        # a fenced interceptor (a newer generation exists) acknowledges nothing
        self._cg.interceptor.admit_ack()
        return ticket.ts

    def flush(self, timeout_s: float | None = None) -> None:
        self.submit_flush().wait(timeout_s)

    def pread(self, offset: int, length: int) -> bytes:
        self.image.check_range(offset, length)
        self.check_readable()
        return self.image.pread(offset, length)


class ConsistencyGroup:
    """The primary site's view of a CG: its volumes and the interceptor replicating them."""

    def __init__(self, data_dir: Path, interceptor: Interceptor) -> None:
        self.data_dir = data_dir
        self.site = SiteDir(data_dir)
        self.interceptor = interceptor
        self.volumes: dict[str, Volume] = {}
        self._lock = threading.Lock()
        #: where a marker holds new writes (``pipeline.primary.markers``)
        self.gate = WriteGate(interceptor.time_source.monotonic)
        self.markers: MarkerMember | None = None
        self.snapshots: PrimarySnapshots | None = None
        #: this primary's word on its volumes in ``lowmark.config`` (None: not published)
        self.entries: VolumeEntries | None = None
        #: volumes released to another interceptor or staged from one (a migration)
        self.parking = Parking(self)
        self._images_synced_seq = 0
        region_bytes = interceptor.config.region_bytes
        #: the volumes' dirty-region logs (None: off, ``InterceptorConfig.region_bytes`` 0)
        self.regions: RegionLog | None = (
            RegionLog(
                self.site,
                region_bytes,
                self._synced_seq,
                extent_bytes=interceptor.config.region_extent_bytes,
                keep_s=interceptor.config.region_keep_s,
                max_dirty_bytes=interceptor.config.region_keep_max_bytes,
                time_source=interceptor.time_source,
            )
            if region_bytes
            else None
        )

    def _synced_seq(self) -> int:
        """The interceptor's durable seq, once every image holds the writes up to it on
        disk: what the dirty-region log may clear. A region cleared while its write was
        only in the page cache is, after a power cut, neither in the image nor republished
        at the restart, and the backups keep bytes the primary lost (found by
        tests/fsloss/test_primary_loss.py). Read before the fdatasync: a write's pwrite
        precedes its record's seq, so the sync covers every write up to it."""
        seq = self.interceptor.durable_seq
        if seq > self._images_synced_seq:
            for vol in list(self.volumes.values()):
                vol.image.sync()  # an EIO fails the region log: nothing is cleared after it
            self._images_synced_seq = seq
        return self._images_synced_seq

    @property
    def name(self) -> str:
        return self.interceptor.config.cg

    @classmethod
    def open(
        cls,
        cg: str,
        data_dir: Path | str,
        kafka_conf: dict[str, Any],
        *,
        interceptor_id: str = "primary",
        time_source: TimeSource = REAL_TIME,
        **engine_options: Any,
    ) -> ConsistencyGroup:
        """Open (or create) the CG's primary state in ``data_dir`` and join the CG."""
        data_dir = Path(data_dir)
        site = SiteDir(data_dir).create()
        config = InterceptorConfig(
            cg=cg, interceptor_id=interceptor_id, state_dir=site.state_dir, **engine_options
        )
        self = cls(data_dir, Interceptor(config, kafka_conf, time_source=time_source))
        try:
            for info, parked in self._load_catalog():
                if parked is not None:  # not served here: no image open, no region log
                    self.parking.parked[info.name] = parked
                else:
                    self.volumes[info.name] = Volume(self, info, Image(self._image_path(info)))
            self._name_tail_volumes()
            self.interceptor.start()
        except BaseException:
            if self.regions is not None:
                self.regions.crash()  # nothing was cleared: the dirty regions stay for later
            raise
        if self.regions is not None:
            self.regions.start()
        # before any new write: the tail of a crashed instance gets the first ts's of this one
        try:
            republish(self)
        except BaseException:
            # stopped as a dead process would be: nothing more published, every dirty
            # region kept for the next open's republish, no thread left running here
            self.interceptor.crash()
            if self.regions is not None:
                self.regions.crash()
            for vol in self.volumes.values():
                vol.image.close()
            raise
        sync = sorted(v.name for v in self.volumes.values() if v.mode == "sync")
        if sync:
            try:
                self._check_sync_durable(", ".join(sync))
            except BaseException:
                self.close()
                raise
            # warm before the first sync write, which would otherwise pay the set-up
            self.interceptor.cuts.start()
        if config.topology:
            self.entries = VolumeEntries(self)
            self.entries.publish_all()
        if config.markers:
            self.snapshots = PrimarySnapshots(self)
            self.markers = MarkerMember(self.interceptor, self.gate, self.snapshots)
            self.markers.start()
        return self

    def __enter__(self) -> ConsistencyGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.markers is not None:
            self.markers.close()  # first: a hold it has is released, nothing is left waiting
        if self.snapshots is not None:
            self.snapshots.close()
        self.interceptor.close()
        if self.entries is not None:
            self.entries.close()
        if self.regions is not None:
            # after the drain: every region whose records reached Kafka is cleared
            self.regions.close()
        for vol in self.volumes.values():
            vol.image.sync()
            vol.image.close()
        self.parking.close()

    def volume(self, name: str) -> Volume:
        try:
            return self.volumes[name]
        except KeyError:
            raise VolumeError(
                f"no volume {name!r} in consistency group {self.name}; have: {sorted(self.volumes)}"
            ) from None

    def create_volume(
        self,
        name: str,
        size: int,
        *,
        mode: Mode = "async",
        metadata: dict[str, str] | None = None,
    ) -> Volume:
        """Create a sparse volume and announce it in the log (backups create it too)."""
        check_volume_name(name)
        if size <= 0 or size % 512:
            raise VolumeError(f"volume size {size} must be a positive multiple of 512")
        if mode not in ("async", "sync"):
            raise ConfigError(f"volume mode {mode!r} must be 'async' or 'sync'")
        if mode == "sync":
            self._check_sync_durable(name)
        with self._lock:
            parked = self.parking.parked.get(name)
            if parked is not None:
                raise VolumeError(
                    f"volume {name} is parked here ({parked.role} of a migration with "
                    f"{parked.peer}): it is not created again; `lowmark volume list` says "
                    "where it is, `lowmark migrate` moves it back"
                )
            if name in self.volumes:
                existing = self.volumes[name]
                if existing.size != size:
                    raise VolumeError(
                        f"volume {name} exists with size {existing.size}, not {size}; "
                        "use resize_volume"
                    )
                return existing
            info = VolumeInfo(name, name, size, mode, dict(metadata or {}))
            path = self._image_path(info)
            vol = Volume(self, info, Image(path, create_size=size))
            vol.image.sync()  # the file, its size and its name, before the catalog names it
            fsync_path(path.parent)
            self.volumes[name] = vol
            self._save_catalog()
            self._name_tail_volumes()
        if mode == "sync":
            self.interceptor.cuts.start()
        self._announce(vol, VolumeOp.CREATE)
        return vol

    def resize_volume(self, name: str, size: int) -> Volume:
        """Grow or shrink a volume; a shrink that would cut off data is refused (trim the
        tail first: nothing the client wrote is ever dropped by a resize)."""
        vol = self.volume(name)
        if size <= 0 or size % 512:
            raise VolumeError(f"volume size {size} must be a positive multiple of 512")
        with vol._lock:
            if vol.pit is not None:
                raise VolumeError(f"volume {name} is being copied for a snapshot: resize it "
                                  "once the copy is done (`lowmark snapshot list`)")  # fmt: skip
            if size < vol.size:
                at = vol.image.first_data_at_or_after(size)
                if at is not None:
                    raise VolumeError(
                        f"volume {name} holds data at offset {at}, beyond the new size {size}: "
                        f"nothing was changed. Trim or zero [{size}, {vol.size}) first (NBD "
                        f"TRIM, blkdiscard), or resize to at least {at // 512 * 512 + 512}"
                    )
            vol.image.resize(size)
            vol.image.sync()  # the size the catalog is about to state
            vol.info = replace(vol.info, size=size)
            if vol.regions is not None:
                vol.regions.resize(size)
        with self._lock:
            self._save_catalog()
        self._announce(vol, VolumeOp.RESIZE)
        return vol

    def _check_sync_durable(self, what: str) -> None:
        """A sync acknowledgement promises the write survives a broker loss: refuse a log
        topic where an acks=all write can be on one broker only."""
        engine = self.interceptor
        if engine.config.allow_single_copy_sync:
            return
        topic = engine.topics.log
        replicas, min_isr = Admin(engine.kafka_conf).durability(topic, 30)
        if replicas < 2 or min_isr < 2:
            raise ConfigError(
                f"sync volume {what} refused: the log topic {topic} has replication factor "
                f"{replicas} and min.insync.replicas {min_isr}, so an acknowledged sync write "
                "can be on one broker only and a broker loss loses it. Use a cluster of 3 "
                "brokers ([cg] replication_factor 3 gives min.insync.replicas 2), make the "
                "volume async, or, on a development cluster, set [serve] "
                "allow_single_copy_sync = true"
            )

    def _name_tail_volumes(self) -> None:
        """Every PROGRESS names the async volumes (an unreplicated tail is possible there)."""
        ids = (v.volume_id for v in self.volumes.values() if v.mode == "async")
        self.interceptor.tail_volumes = tuple(sorted(ids))

    def _announce(self, vol: Volume, op: VolumeOp) -> None:
        engine = self.interceptor
        with self.admitted(True), vol._lock:
            token, ts = engine.stamp()
            iid, epoch = engine.origin
            meta = dict(vol.info.metadata or {})
            rec = VolumeChange(op, vol.volume_id, vol.name, vol.size, meta, ts, iid, epoch)
            ticket = engine.append_record(token, rec)
        ticket.wait()
        if self.entries is not None:  # after the log has it: the model never runs ahead
            self.entries.changed(vol.info, ts, deleted=op is VolumeOp.DELETE)

    def flush(self, timeout_s: float | None = None) -> None:
        """fdatasync every image; wait until every record so far is durable in Kafka."""
        for vol in self.volumes.values():
            vol.image.sync()
        self.interceptor.barrier().wait(timeout_s)

    def admitted(self, wait: bool) -> AbstractContextManager[None]:
        """Inside the write gate (``pipeline.primary.gate``): a marker's hold waits for
        this to end. ``wait=False``: ``WriteHeld`` at once while the gate is held."""
        return self.gate.admitted(wait, self.interceptor.config.replication_timeout_s)

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold every volume's lock: no write takes effect while inside."""
        vols = sorted(self.volumes.values(), key=lambda v: v.name)
        for v in vols:
            v._lock.acquire()
        try:
            yield
        finally:
            for v in reversed(vols):
                v._lock.release()

    # -- catalog: which volumes this primary holds

    def _image_path(self, info: VolumeInfo) -> Path:
        return self.site.image_path(info.volume_id)

    def _load_catalog(self) -> list[tuple[VolumeInfo, Parked | None]]:
        out = []
        for e in self.site.read_catalog(with_tombstones=True):
            mode: Mode = "sync" if e.get("mode") == "sync" else "async"
            info = VolumeInfo(e["volume_id"], e["name"], e["size"], mode, e.get("metadata"))
            out.append((info, Parked.from_entry(info, dict(e))))
        return out

    def _save_catalog(self) -> None:
        entries = [v.info.__dict__ for v in self.volumes.values()]
        entries += [p.catalog_entry() for p in self.parking.parked.values()]
        self.site.write_catalog(entries)
