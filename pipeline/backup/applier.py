"""The backup applier of one site: consume the log and W, apply ts <= W, checkpoint.

The ordering brain is the pure ``ApplyPlanner``; this module is its I/O:

1. resume from the site's checkpoint (local file first, else the compacted checkpoints
   topics of the current generation and the ones before it, else the beginning of
   generation 0's log): seek every log partition of the checkpoint's generation to its
   replay offsets; records with ts <= checkpoint W are skipped (all were applied);
2. read the log (read_committed) and the watermark topic in order; for each W that is
   higher than the applied one, once the log position of every partition has reached W's
   offsets, apply every complete op with ts <= W, per volume in ts order;
3. every ``checkpoint_interval_s``: fdatasync touched images, then write the checkpoint (W,
   replay offsets, per-volume digests) atomically to a local file and to Kafka, and only
   then commit consumer offsets. A crash anywhere replays at most (W_ckpt, W_applied],
   which re-applied in order lands on the same bytes (writes are blind overwrites);
4. a record that fails to decode halts the applier: a raw copy goes to the dead-letter
   topic, nothing after it is applied, and the error says how to skip it;
5. it follows the CG's generations (``follow``, ``generations``) and holds the site's
   lock (``SiteLock``) from start to close, so a failover cannot touch its images.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

from connectors.image.image import Image
from connectors.kafka.config import cluster_tried
from connectors.kafka.consumer import Consumer
from connectors.kafka.deadletter import deadletter_headers
from connectors.kafka.errors import OFFSET_GONE, PARTITION_EOF, as_error
from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds
from connectors.kafka.settings import ApplierSettings
from connectors.kafka.topics import CgTopics
from pipeline.backup import snapshots as snapshot_store
from pipeline.backup.applier_config import ApplierConfig, ApplierStats
from pipeline.backup.applier_numbers import ApplierNumbers
from pipeline.backup.backlog import Backlog
from pipeline.backup.bootstrap import check_not_half_bootstrapped
from pipeline.backup.checkpointer import Checkpointer, retention_lost, retention_lost_message
from pipeline.backup.follow import FollowGenerations
from pipeline.backup.generations import Action, Cut, RolesPoll
from pipeline.backup.images import ImageSet
from pipeline.backup.named import Retention, SiteSnapshots
from pipeline.backup.pause import PauseAndHandOver
from pipeline.backup.plan import ApplyOp, ApplyPlanner
from pipeline.errors import (
    ApplierHaltedError,
    ApplyError,
    KafkaError,
    LowmarkError,
    RecordError,
    RetentionLostError,
)
from pipeline.fault_streak import FaultStreak
from pipeline.logs import event
from pipeline.site import SiteDir, SiteLock
from pipeline.timesource import REAL_TIME, TimeSource
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.records import (
    LOG_RECORDS,
    CgRecord,
    Checkpoint,
    Snapshot,
    VolumeChange,
    VolumeDigest,
    Watermark,
)  # fmt: skip

log = logging.getLogger("lowmark.applier")

#: markers and snapshots applied, kept for inspection: the newest this many (older ones
#: are dropped and counted in ``markers_dropped``); they grow with the log otherwise
MAX_MARKERS = 1024
#: published Ws read but not applied yet. More pile up only while applying stalls (or
#: after a restart far behind); past this many the oldest but one is dropped (counted in
#: ``targets_dropped``): any later W is a cut too, applying it covers the dropped one
MAX_TARGETS = 4096


class Applier(Backlog, FollowGenerations, PauseAndHandOver, ApplierNumbers):
    def __init__(
        self,
        config: ApplierConfig,
        kafka_conf: dict[str, Any],
        time_source: TimeSource = REAL_TIME,
    ) -> None:
        self.config = config.validate()
        self._now = time_source.monotonic  # intervals: checkpoints, digests, snapshots, logs
        self._sleep = time_source.sleep
        self._wall_us = time_source.wall_us  # what a checkpoint says, RPO
        self.kafka_conf = dict(kafka_conf)
        self.generation = 0  # whose log this site applies (its checkpoint's), and its topics
        self.topics = CgTopics(config.cg)
        self.site: ImageSet = None  # type: ignore[assignment]  # opened by start()
        self.stats = ApplierStats(started_mono=self._now())
        self.applied_w = 0
        self.checkpoint_w = 0
        self.halted: ApplierHaltedError | None = None
        self.markers: deque[CgRecord] = deque(maxlen=MAX_MARKERS)
        self.named = SiteSnapshots(config.data_dir, cg=config.cg, site=config.site,
                                   retention=Retention(config.named_keep_last,
                                                       config.named_max_age_s),
                                   wall_us=self._wall_us)  # fmt: skip
        self._targets: list[Watermark] = []  # watermarks not yet applied, ascending
        self._max_seen_w = 0
        self._last_checkpoint = self._now()
        self._reread: dict[int, int] | None = None
        #: partition -> (offset of its bad record, the error a halt raises)
        self._blocked: dict[int, tuple[int, ApplierHaltedError]] = {}
        self._last_snapshot = 0.0
        self._last_digest = 0.0
        self._bg: tuple[threading.Thread, dict[str, Any]] | None = None
        self._consumer_faults = FaultStreak(self._now, remind_s=10.0)  # said, not per event
        self._wm_end_at_start = 0
        self._wm_read_to = 0
        self._restart_floor = 0
        #: the W whose ops were applied ahead of applied_w (``_apply_early``; 0: none),
        #: kept in a file so a restart knows the images may hold writes up to it
        self._ahead_path = SiteDir(config.data_dir).state_dir / "applied_ahead"
        self._early_w = 0
        self.planner = ApplyPlanner(0, config.max_pending_bytes)
        self._log: Consumer | None = None
        self._wm: Consumer | None = None
        self._producer: Producer | None = None
        self.checkpointer: Checkpointer = None  # type: ignore[assignment]  # made by start()
        self.lock = SiteLock(config.data_dir, f"applier of site {config.site}")
        roles_store = RolesStore(self.kafka_conf, timeout_s=5.0)
        self.roles = RolesPoll(lambda: roles_store.latest(config.cg), self._now)
        #: where the current generation ends, once the roles name the next one
        self._cut: Cut | None = None
        self._cut_wm_end = 0  # the watermark topic's end when the cut was learnt
        self._next_wm_end = 0  # the next generation's, when the site may hold some of it
        self._refused: ApplyError | None = None
        self.finished: str | None = None  # why it stopped on its own (the site is primary)
        self.on_finish: Any = None  # called once when ``finished`` is set

    # ---------------------------------------------------------------- paths & state

    @property
    def checkpoint_path(self) -> Path:
        return SiteDir(self.config.data_dir).checkpoint_path

    def image_path(self, volume_id: str) -> Path:
        return SiteDir(self.config.data_dir).image_path(volume_id)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.lock.acquire()  # before anything touches the images; close() releases it
        check_not_half_bootstrapped(self.config.data_dir, self.config.site)
        if self._ahead_path.exists():
            self._early_w = int(self._ahead_path.read_text() or 0)
        if SiteDir(self.config.data_dir).resync_dir.exists():  # its images are half synced
            raise ApplyError(f"site {self.config.site} is resyncing: run `lowmark failback` again")
        settings = ApplierSettings(self.kafka_conf, self.config.cg, self.config.site)
        self._producer = Producer(settings.producer())
        self.checkpointer = Checkpointer(
            self.config.cg, self.config.site, self.checkpoint_path, self.kafka_conf, self._producer
        )
        offsets, decision = self._resume_point()
        if decision.action is Action.STOP_PRIMARY:
            self._finish(decision.reason)
            return
        if decision.action is Action.REFUSE:
            raise ApplyError(decision.reason)
        self.site = ImageSet(self.config.data_dir, keep_deleted=True)
        self._open_generation(self.generation, offsets)
        # Before a crash this site may have applied up to any W published so far, beyond its
        # checkpoint; replaying from the checkpoint then re-applies onto those bytes. Until it
        # has passed every W published before this start, its images are not a cut of any
        # W, so it must not checkpoint (or snapshot) them.
        assert self._wm is not None
        self._wm_end_at_start = self._wm.watermark_offsets(self.topics.watermark, 0)[1]
        self._restart_floor = self.applied_w
        event(
            log,
            "applier started",
            cg=self.config.cg,
            site=self.config.site,
            generation=self.generation,
            w=self.applied_w,
            offsets=self.planner.positions(),
        )
        if decision.cut is not None:
            self._learn_cut(decision.cut)
        self.roles.start(f"lowmark-roles-{self.config.site}")  # reads off the apply loop

    def close(self, checkpoint: bool = True) -> None:
        self.roles.stop()
        self._finish_background_checkpoint(wait=True)
        if self.paused:
            self._close_stage()  # the checkpoint stays the images' cut
        elif checkpoint and self.halted is None and self._log is not None and self.may_checkpoint():
            self.checkpoint()
        if self.site is not None:
            self.site.close()
        self.lock.release()  # before the consumers' goodbyes: a failover waits for it
        self._close_consumers()
        if self._producer is not None:
            self._producer.flush(5)
        self._producer = None

    def _close_consumers(self) -> None:
        for c in (self._log, self._wm):
            if c is not None:
                c.close()
        self._log = self._wm = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set() and self.finished is None:
            self.step()

    # ---------------------------------------------------------------- one step

    def step(self, poll_timeout_s: float = 0.02) -> None:
        if self.halted is not None:
            raise self.halted
        if self._refused is not None:
            raise self._refused
        if self.finished is not None:
            return
        self._finish_background_checkpoint()
        self._follow_roles()
        self._control()
        if self.finished is not None:
            return
        # over budget with no W known, nothing could be applied or freed by reading on:
        # wait for a W instead of dropping what was read (Backlog)
        held = self.planner.over_budget() and not self._targets
        got = (0 if held else self._read_log(0)) + self._read_watermarks(0)
        applied = self._apply_ready()
        if self.planner.over_budget():
            applied = self._apply_early() or applied
            if self.planner.over_budget() and self._targets:
                self._spill()
        if (
            self.applied_w > self.checkpoint_w
            and self._now() - self._last_checkpoint >= self.config.checkpoint_interval_s
            and self.may_checkpoint()
        ):
            self._checkpoint_due()
        if not got and not applied:
            # idle: wait for what unblocks us next (log records for a known W, else a new W)
            # without a fixed sleep; a consume(n, timeout) would wait the whole timeout
            if self._targets:
                self._read_log(poll_timeout_s)
            else:
                self._read_watermarks(poll_timeout_s)

    def may_checkpoint(self) -> bool:
        """Whether the images are a cut: every W published before start has been passed."""
        if self._cut is not None and self._next_wm_end:
            return False  # they may hold the next generation's records (follow.py)
        return self._wm_read_to >= self._wm_end_at_start and self.applied_w >= self._restart_floor

    def _read_watermarks(self, timeout_s: float = 0) -> int:
        assert self._wm is not None
        msgs = self._wm.consume(100, 0)
        if not msgs and timeout_s > 0:
            first = self._wm.poll(timeout_s)
            msgs = [first] if first is not None else []
        for msg in msgs:
            if msg.error():
                if msg.error().code() == PARTITION_EOF:
                    self._wm_read_to = max(self._wm_read_to, msg.offset())
                continue
            self._wm_read_to = max(self._wm_read_to, msg.offset() + 1)
            try:
                rec = codec.decode(msg.value(), Watermark)
            except RecordError as exc:
                # a bad W can only hold the backup back; never apply on it
                event(
                    log,
                    "unreadable watermark skipped",
                    level=logging.ERROR,
                    offset=msg.offset(),
                    error=str(exc),
                )
                continue
            self.stats.watermarks_seen += 1
            if msg.offset() < self._wm_end_at_start:
                self._restart_floor = max(self._restart_floor, rec.w)
            for m in rec.members:
                self.planner.note_epoch(m.interceptor_id, m.epoch, rec.log_offsets)
            for d in rec.departed:
                self.planner.note_departed(d.interceptor_id, d.epoch, d.s)
            if self._cut is not None and not self._cut.covers(rec):
                continue  # not inside the failover cut: never a target (its epochs count)
            if rec.w > self._max_seen_w:  # consumers ignore a lower W
                self._max_seen_w = rec.w
                if len(self._targets) >= MAX_TARGETS:
                    del self._targets[1]  # keep the next to apply; the newest covers it
                    self.stats.targets_dropped += 1
                self._targets.append(rec)
        return len(msgs)

    def _read_log(self, timeout_s: float) -> int:
        assert self._log is not None
        msgs = self._log.consume(2000, 0)
        if not msgs and timeout_s > 0:
            first = self._log.poll(timeout_s)
            msgs = [first] if first is not None else []
        for msg in msgs:
            p = msg.partition()
            if msg.error():
                if msg.error().code() == PARTITION_EOF:
                    # at the end: everything committed below this offset has been read
                    self.planner.note_position(p, msg.offset())
                    continue
                # an error event carries no record: the rest of this batch is still to be
                # read (raising here lost it, and a later EOF would have skipped it)
                self._consumer_error(msg.error())
                continue
            off = msg.offset()
            if self._cut is not None and self._cut.beyond(p, off):
                self._beyond_cut(p, off)
                continue
            if self.planner.is_blocked(p, off):
                # at or behind a bad record (same fetch batch, or re-read after a spill): not
                # consumed, not counted. It does prove everything before it was read, and the
                # position stops at the bad record (note_position clamps there)
                self.planner.note_position(p, off)
                continue
            value = msg.value() or b""
            if (ended := self._consumer_faults.succeeded()) is not None:
                event(log, "kafka consumer errors over: records arrive again", **ended)
            self.stats.records_read += 1
            self.stats.bytes_read += len(value)
            try:
                dec = codec.decode(value, LOG_RECORDS)
            except RecordError as exc:
                if (p, off) in self.config.skip:
                    event(
                        log,
                        "bad record skipped by operator",
                        level=logging.WARNING,
                        partition=p,
                        offset=off,
                        error=str(exc),
                    )
                    self.stats.skipped_bad += 1
                    self.planner.note_position(p, off + 1)
                    continue
                self._block(msg, exc)
                continue
            try:
                self.planner.add(dec, p, off)
            except ApplierHaltedError:
                if self._halt_past_cut():
                    return len(msgs)  # the rest of this batch is re-read, with the cut
                raise
            self.planner.note_position(p, off + 1)
        return len(msgs)

    def _consumer_error(self, err: Any) -> None:
        """A consumer error event (broker down, leader moving): count it, log it now and then;
        librdkafka retries on its own, and the positions stay where the records left them."""
        self.stats.consumer_errors += 1
        exc = as_error(err, f"reading {self.topics.log}")
        if exc.code == OFFSET_GONE:
            # records still to be (re-)read were deleted under this site (a spill's re-read
            # after retention passed it): nothing it could apply from here is a cut
            lost = retention_lost(
                self.planner.positions(), bounds(self.kafka_conf, self.topics.log) or {}
            )
            p, at, low = lost if lost is not None else (-1, -1, -1)
            raise RetentionLostError(
                retention_lost_message(self.config.site, self.topics.log, p, at, low)
            )
        if (said := self._consumer_faults.failed(str(exc))) is not None:
            event(log, "kafka consumer error; retrying",
                  logging.WARNING if exc.retriable else logging.ERROR,
                  tried=cluster_tried(self.kafka_conf), **said)  # fmt: skip

    def _apply_ready(self) -> bool:
        applied = False
        while self._targets:
            target = self._targets[0]
            required = target.log_offsets
            if not self.planner.ready(target.w, required):
                blocker = self.planner.blocked_by(required)
                if blocker is not None:
                    self._halt(blocker[0])
                return applied
            self._targets.pop(0)
            if target.w <= self.applied_w:
                continue
            try:
                ops = self.planner.take(target.w)
            except ApplierHaltedError:
                if self._halt_past_cut():  # pending records past the cut: re-read them
                    if self._cut is not None and target.w <= self._cut.base_w:
                        self._targets.insert(0, target)
                    return applied
                raise
            for op in ops:
                self._apply(op)
            self.applied_w = target.w
            applied = True
        if self._cut is not None and not self._targets and not self.paused:
            applied = self._apply_cut() or applied
        return applied

    # ---------------------------------------------------------------- applying

    def _apply(self, op: ApplyOp) -> None:
        if isinstance(op.record, Snapshot):  # the images are at its ts: copy them now
            self.named.take(op.record, self.catalog, staged=self._stage is not None,
                            ahead=self._early_w > op.ts)  # fmt: skip
        if isinstance(op.record, CgRecord):
            if len(self.markers) == self.markers.maxlen:
                self.stats.markers_dropped += 1
            self.markers.append(op.record)
            return
        try:
            (self._stage or self.site).apply(op)  # the rules restore and replay use
        except ApplyError as exc:
            self.halted = ApplierHaltedError(
                f"CG {self.config.cg} site {self.config.site}: {exc}. The log does not match "
                "this site's images: rebuild the site from a checkpoint (replacement backup)"
            )
            raise self.halted from None
        if isinstance(op.record, VolumeChange):
            rec = op.record
            event(log, "volume change applied", volume=op.volume_id, op=rec.op, size=rec.size)
            return
        self.stats.applied_ops += 1
        self.stats.applied_bytes += op.length

    @property
    def images(self) -> dict[str, Image]:
        return self.site.images

    @property
    def catalog(self) -> dict[str, dict[str, Any]]:
        return self.site.catalog

    # ---------------------------------------------------------------- checkpoint

    def _checkpoint_due(self) -> None:
        """A periodic checkpoint: in the background unless it needs stable images."""
        if self.paused:
            return self._stage_mark()  # the images stay at the checkpoint's cut
        interval = self.config.digest_interval_s
        wants_digests = (
            self.config.compute_digests
            and interval is not None
            and self._now() - self._last_digest >= interval
        )
        wants_snapshot = (
            self.config.snapshot_interval_s > 0
            and self._now() - self._last_snapshot >= self.config.snapshot_interval_s
        )
        if wants_digests or wants_snapshot:
            self.checkpoint(digests=None)  # both read the images: they must not move
        elif self._bg is None:
            self._checkpoint_background()

    def _checkpoint_background(self) -> None:
        """fdatasync + write the checkpoint off the apply loop (it took 30-160 ms a second).

        The record is captured now, at ``applied_w``; the images may move on while the
        worker syncs them, which only makes them hold more than the checkpoint says, the
        case a restart already handles (it re-applies from the checkpoint and does not
        checkpoint again below what was published before it started).
        """
        rec = self._checkpoint_record(digests=False)
        images = self.site.take_touched()
        self._last_checkpoint = self._now()
        result: dict[str, Any] = {"rec": rec}

        def work() -> None:
            try:
                for img in images:
                    img.sync()
            except OSError as exc:
                # not retried: after a failed fdatasync Linux may drop the dirty pages and
                # report the next one clean, so a later checkpoint would be ahead of its data
                result["sync_error"] = exc
                return
            try:
                result["value"] = self.checkpointer.persist(rec)
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=work, name="lowmark-checkpoint", daemon=True)
        self._bg = (thread, result)
        thread.start()

    def _finish_background_checkpoint(self, wait: bool = False) -> None:
        if self._bg is None:
            return
        thread, result = self._bg
        if wait:
            thread.join()
        if thread.is_alive():
            return
        self._bg = None
        if "sync_error" in result:
            raise ApplyError(
                f"fdatasync of site {self.config.site}'s images failed ({result['sync_error']}): "
                f"what was applied since checkpoint W {self.checkpoint_w} may not be on disk, "
                "and no later checkpoint may claim it. Check the disk (dmesg), then restart "
                "the applier: it re-applies everything after that checkpoint"
            )
        if "error" in result:
            event(
                log,
                "background checkpoint failed; will retry",
                level=logging.ERROR,
                error=repr(result["error"]),
            )
            return
        self._checkpoint_written(result["rec"])

    def checkpoint(self, digests: bool | None = True) -> Checkpoint:
        """fdatasync, then record the applied state durably, then commit offsets.

        ``digests=None``: include per-volume digests only if ``digest_interval_s`` passed.
        """
        if self.paused:
            raise ApplyError(
                f"site {self.config.site} is paused: its images stay at W={self.checkpoint_w}"
                " until `lowmark resume`"
            )
        if not self.may_checkpoint():
            raise ApplyError(
                f"site {self.config.site} has not yet re-applied up to W={self._restart_floor} "
                "(published before it restarted): its images are not a cut yet"
            )
        self._finish_background_checkpoint(wait=True)
        if digests is None:
            interval = self.config.digest_interval_s
            digests = interval is not None and self._now() - self._last_digest >= interval
        digests = digests and self.config.compute_digests
        if digests:
            self._last_digest = self._now()
        self.site.sync()
        rec = self._checkpoint_record(digests)
        value = self.checkpointer.persist(rec)
        self._last_checkpoint = self._now()
        self._checkpoint_written(rec)
        interval = self.config.snapshot_interval_s
        if interval > 0 and self._now() - self._last_snapshot >= interval and self.applied_w:
            snapshot_store.save(self.config.data_dir, value, self.images, self.catalog)
            snapshot_store.prune(self.config.data_dir, self.config.snapshots_kept)
            self._last_snapshot = self._now()
        return rec

    def _checkpoint_record(self, digests: bool) -> Checkpoint:
        return Checkpoint(
            self.config.site,
            self.config.cg,
            self.applied_w,
            self.planner.checkpoint_offsets(),
            tuple(
                VolumeDigest(vid, img.size, img.content_digest() if digests else "")
                for vid, img in sorted(self.images.items())
            ),
            self._wall_us(),
            self.generation,
            self.named.held(),
        )

    def _checkpoint_written(self, rec: Checkpoint) -> None:
        """Only now are consumer offsets committed (advisory: the checkpoint is the truth)."""
        assert self._log is not None
        offsets = {p: o for p, o in rec.log_offsets.items() if o >= 0}
        try:
            self._log.commit(self.topics.log, offsets, asynchronous=True)
        except KafkaError as exc:
            log.warning("offset commit failed: %s", exc)
        self.checkpoint_w = max(self.checkpoint_w, rec.w)
        if self._early_w and self.checkpoint_w >= self._early_w:
            self._ahead_path.unlink(missing_ok=True)  # a cut again: nothing is ahead of it
            self._early_w = 0
        self.stats.checkpoints += 1
        self.stats.last_checkpoint_us = rec.written_us

    # ---------------------------------------------------------------- bad input

    def _block(self, msg: Any, exc: LowmarkError) -> None:
        """Dead-letter a bad record and consume nothing at or after it in its partition.

        Watermarks that do not need the partition past it are still applied (their records
        all lie before it); the first one that does halts the CG. Other partitions go on.
        """
        assert self._producer is not None and self._log is not None
        p, off = msg.partition(), msg.offset()
        self._log.pause(self.topics.log, [p])  # saves fetching; fetched ones drop by offset
        if p in self._blocked:
            return  # met again after a re-read: already dead-lettered
        self.planner.block(p, off)
        headers = deadletter_headers(self.topics.log, p, off, exc, self.config.site)
        try:
            self._producer.produce(self.topics.deadletter, msg.value(), msg.key(), headers)
            self._producer.flush(30)
        except KafkaError as dl:  # blocked all the same; the record stays in the log
            event(log, "dead-letter copy not written", level=logging.ERROR, error=str(dl))
        self._blocked[p] = (
            off,
            ApplierHaltedError(
                f"CG {self.config.cg} site {self.config.site}: record {self.topics.log}[{p}]@{off} "
                f"is bad ({type(exc).__name__}: {exc}); nothing at or after it is applied. A "
                f"copy is in {self.topics.deadletter}. Fix the producer, or skip it explicitly "
                f"with `lowmark apply --skip {p}:{off}` (logged)."
            ),
        )
        event(
            log,
            "bad record: partition blocked, dead-letter copy written",
            level=logging.ERROR,
            partition=p,
            offset=off,
            error=str(exc),
        )

    def _halt(self, partition: int) -> None:
        """Checkpoint what was applied before the bad record, then stop the CG. Its offsets
        stop at the bad record, so a restart without ``--skip`` halts at it again."""
        off, error = self._blocked[partition]
        if self.applied_w > self.checkpoint_w and self.may_checkpoint():
            self.checkpoint()
        self.halted = error
        event(
            log,
            "applier halted on a bad record",
            level=logging.ERROR,
            partition=partition,
            offset=off,
        )
        raise self.halted
