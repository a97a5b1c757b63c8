"""``lowmark failover``: a backup site becomes the primary of the CG's next generation.

The steps, each recorded in the site's failover state (``failover_state``) so a re-run
after a crash continues where the last run stopped:

1. **plan**: take the site lock (a running applier of the site is asked to hand it over:
   ``pipeline.backup.pause``), read the roles and
   the site's checkpoint, choose the cut (the latest W, a marker or a ts; never below the
   site's checkpoint W). Without ``force`` the old primary must be reachable (it ticked
   within ``reachable_s``): it is fenced first (its transactional ids are taken, so its
   producer can commit nothing more), and the cut is the W that follows its last progress,
   so nothing it replicated is lost. With ``force`` (it cannot be reached) the cut is the
   latest W now and the fence runs alongside. The plan is saved before anything else.
2. **index** (alongside the commit): read the backlog (the old generation's log from the
   site's checkpoint offsets to the cut's, records with ts <= the cut) through the replay
   engine into a ``Backlog`` (``pipeline.backup.rollforward``). A paused site's stage
   (``pipeline.backup.staging``) is folded in first, unread, and the log is read only
   from where it ends. Reads can be served from here on: the cut's bytes are the index
   laid over the images.
3. **commit**: the roles of generation g+1 (``RolesStore.commit``, compare-and-set). Only
   after it does the failover write the images: losing the race leaves the site a
   consistent backup. Then the backlog's volume changes are applied (once) and the new
   generation's interceptor starts on the site's images (``ConsistencyGroup.open`` with
   generation g+1 and a clock floor at the cut): writes are accepted from here.
4. **roll forward** in the background while serving; a foreground write wins over the
   backlog's bytes of its range. Writes are acknowledged only once durable in the new
   generation's log while the roll-forward runs, so a re-run after a crash knows every
   acknowledged write: it rebuilds the index and drops the ranges that log holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.kafka.reading import BEGINNING, bounds
from connectors.kafka.topics import CgTopics, ensure_topics
from pipeline.backup import pause, staging
from pipeline.backup.checkpointer import decode_checkpoint
from pipeline.backup.images import ImageSet
from pipeline.backup.rollforward import DEFAULT_MAX_MEMORY_BYTES, Backlog, apply_volume_changes
from pipeline.errors import (
    FailoverError,
    LowmarkError,
    RecordError,
    RolesConflictError,
    SiteBusyError,
)
from pipeline.logs import event
from pipeline.ops import failover_state as fs
from pipeline.ops import restore as rs
from pipeline.ops.drill import choose_cut
from pipeline.ops.failover_state import Action, FailoverRecord, Phase
from pipeline.ops.replay import ReplayProgress, read_log, replay
from pipeline.primary.fencing import (
    Activity,
    fence_interceptors,
    interceptor_ids,
    progress_activity,
)
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir, SiteLock
from pipeline.timesource import REAL_TIME, TimeSource
from pipeline.topology.drain import request_drain
from pipeline.topology.roles import plan_failover
from pipeline.topology.store import RolesStore
from pipeline.watermark.publisher import WatermarkPublisher
from schemas import codec
from schemas.records import (
    LOG_RECORDS,
    CgRoles,
    Checkpoint,
    DrainRequest,
    ProgressKind,
    TransitionKind,
    Watermark,
    Write,
    Zero,
)
from schemas.ts import ts_physical_us

log = logging.getLogger("lowmark.failover")

EventFn = Callable[[str, Mapping[str, Any]], None]


@dataclass(frozen=True)
class FailoverConfig:
    cg: str
    site: str
    site_dir: Path
    interceptor_id: str = ""  # the new primary's interceptor (default: the site's name)
    at: int | None = None
    marker: str | None = None
    force: bool = False
    #: the old primary counts as reachable when its last progress is younger than this
    reachable_s: float = 10.0
    #: how long a reachable old primary's last progress gets to reach W after the fence
    stop_timeout_s: float = 15.0
    max_memory_bytes: int = 4 * DEFAULT_MAX_MEMORY_BYTES
    #: 0: roll forward as fast as the disk takes it; else bytes/s, leaving I/O to clients
    rollforward_rate_bytes_s: float = 0.0
    #: SWITCHOVER: planned; the old primary drains first (``pipeline.topology.drain``)
    kind: TransitionKind = TransitionKind.FAILOVER
    #: how long the old primary's interceptors get to drain (a switchover)
    drain_timeout_s: float = 30.0
    #: how long the site's running applier gets to hand the site over (0: refuse at once)
    handover_timeout_s: float = 15.0
    log_partitions: int = 4
    replication_factor: int | None = None
    engine_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def new_interceptor_id(self) -> str:
        return self.interceptor_id or self.site


def live_interceptors(
    activity: Mapping[str, Activity], now_us: int, reachable_s: float
) -> dict[str, Activity]:
    """The interceptors that reported within ``reachable_s`` and neither left nor were
    fenced: a primary that can still be asked to stop."""
    gone = (ProgressKind.LEAVE, ProgressKind.FENCE)
    return {
        iid: a
        for iid, a in activity.items()
        if a.kind not in gone and now_us - a.wall_us <= reachable_s * 1e6
    }


class Failover:
    """One run of ``lowmark failover`` (module docstring). Thread use: ``prepare`` and
    ``build_backlog`` in the caller's thread, ``commit`` may run in another."""

    def __init__(
        self,
        config: FailoverConfig,
        kafka_conf: Mapping[str, Any],
        time_source: TimeSource = REAL_TIME,
        on_event: EventFn | None = None,
    ) -> None:
        self.config = config
        self.kafka_conf = dict(kafka_conf)
        self.time = time_source
        self.site = SiteDir(Path(config.site_dir))
        self.roles_store = RolesStore(self.kafka_conf)
        self.record: FailoverRecord | None = None
        self.action: Action | None = None
        self.roles: CgRoles | None = None
        self.cg: ConsistencyGroup | None = None
        self.fenced: list[str] = []
        self._lock = SiteLock(self.site, f"failover of site {config.site}")
        self._on_event = on_event
        self._t0 = time_source.monotonic()
        self._record_lock = threading.Lock()
        #: the site's stage being folded into a backlog while the plan runs (``_fold_stage``)
        self._fold: staging.FoldInBackground | None = None
        #: the latest W and the log's bounds this run planned with (None: a plan from disk)
        self._planned_with: tuple[Watermark, dict[int, tuple[int, int]]] | None = None

    # ---------------------------------------------------------------- helpers

    def _event(self, what: str, **fields: Any) -> None:
        at_s = round(self.time.monotonic() - self._t0, 3)  # the run's timeline, in every line
        event(log, what, **{"cg": self.config.cg, "site": self.config.site, **fields, "at_s": at_s})
        if self._on_event is not None:
            self._on_event(what, fields)

    def _advance(self, phase: Phase) -> FailoverRecord:
        with self._record_lock:
            assert self.record is not None
            if self.record.phase < phase:
                self.record = self.record.at(phase, self.time.wall_us())
                fs.save(self.site.state_dir, self.record)
            return self.record

    def close(self) -> None:
        fold, self._fold = self._fold, None
        if fold is not None:  # folded but never used (nothing to roll forward, or a failure)
            with contextlib.suppress(Exception):
                backlog = fold.result()[2]
                if backlog is not None:
                    backlog.close()
        if self.cg is not None:
            self.cg.close()
            self.cg = None
        self._lock.release()

    # ---------------------------------------------------------------- 1. plan

    def prepare(self) -> FailoverRecord:
        """Lock the site, decide what this run does, plan a new failover if none is on."""
        c = self.config
        if not self.site.is_site():
            raise FailoverError(
                f"{self.site.root} is not a site's data dir (no images/ in it): pass the data "
                f"dir of site {c.site!r} ([apply] data_dir or --data-dir)"
            )
        self._take_site()
        self._fold_stage()  # in a thread, while the plan below waits on Kafka
        current = self.roles_store.latest(c.cg)
        decision = fs.decide(fs.load(self.site.state_dir), current, c.site)
        self.action = decision.action
        self._event("failover decided", action=decision.action.value, why=decision.why)
        if decision.record is not None:
            self.record = decision.record
            self.roles = current if decision.action is not Action.COMMIT else None
            return decision.record
        self.record = self._plan(current)
        fs.save(self.site.state_dir, self.record)
        self._event("failover planned", **fs.summary(self.record))
        return self.record

    def _take_site(self) -> None:
        """The site lock; a running applier of the site is asked to hand it over (it
        checkpoints, or marks its stage if paused, and exits)."""
        try:
            self._lock.acquire()
            return
        except SiteBusyError:
            if self.config.handover_timeout_s <= 0:
                raise
        t0 = self.time.monotonic()
        pause.set_control(self.site, pause.HANDOVER, True, f"{os.getpid()}\n")
        try:
            while True:
                try:
                    self._lock.acquire()
                    break
                except SiteBusyError as exc:
                    if self.time.monotonic() - t0 > self.config.handover_timeout_s:
                        raise SiteBusyError(
                            f"{exc}. (It did not hand the site over within "
                            f"{self.config.handover_timeout_s} s of being asked to: an applier "
                            "older than this version, or a process stuck in I/O.)"
                        ) from None
                self.time.sleep(0.01)
        finally:
            pause.set_control(self.site, pause.HANDOVER, False)
        self._event("site handed over", after_s=round(self.time.monotonic() - t0, 3))

    def _new_backlog(self) -> Backlog:
        return Backlog(max_memory_bytes=self.config.max_memory_bytes, spill_dir=self.site.state_dir)

    def _fold_stage(self) -> None:
        try:
            base = self.site.checkpoint_path.read_bytes()
        except OSError:
            return  # no checkpoint: _plan says so
        self._fold = staging.FoldInBackground(self.site, base, self._new_backlog).start()

    def _checkpoint(self) -> Checkpoint:
        c = self.config
        path = self.site.checkpoint_path
        try:
            ckpt = decode_checkpoint(path.read_bytes())
        except FileNotFoundError:
            raise FailoverError(
                f"site {c.site!r} has no checkpoint ({path} is missing), so nobody knows what "
                "its images hold: run its `lowmark apply` until it checkpoints, or restore"
            ) from None
        except RecordError as exc:
            raise FailoverError(f"the site's checkpoint {path} is unreadable: {exc}") from None
        if ckpt.cg != c.cg or ckpt.site != c.site:
            raise FailoverError(
                f"{path} is the checkpoint of site {ckpt.site!r} of CG {ckpt.cg!r}, not of "
                f"site {c.site!r} of CG {c.cg!r}: check --site, --cg and the data dir"
            )
        return ckpt

    def _plan(self, current: CgRoles | None) -> FailoverRecord:
        c = self.config
        gen = 0 if current is None else current.generation
        ckpt = self._checkpoint()
        ckpt_gen = getattr(ckpt, "generation", 0)
        if ckpt_gen != gen:
            raise FailoverError(
                f"site {c.site!r} checkpointed generation {ckpt_gen} but the CG is at "
                f"generation {gen}: let its applier catch up to generation {gen} first"
            )
        if c.kind is TransitionKind.SWITCHOVER and c.force:
            raise FailoverError("a switchover is planned: it cannot be forced; use failover")
        if not c.force:  # --force fences alongside the commit (``fence_all``)
            activity = progress_activity(self.kafka_conf, c.cg, gen)
            live = live_interceptors(activity, self.time.wall_us(), c.reachable_s)
            if c.kind is TransitionKind.SWITCHOVER and live:
                live = self._drain(gen, live)
            if not live:
                ages = {
                    iid: round((self.time.wall_us() - a.wall_us) / 1e6, 1)
                    for iid, a in activity.items()
                }
                raise FailoverError(
                    f"the primary of CG {c.cg} cannot be reached (its interceptors' last "
                    f"progress, seconds ago: {ages or 'none ever'}), so it cannot be asked to "
                    "stop. If it is down, run again with --force: the cut is then the latest "
                    "W, and writes it acknowledged after that W are lost"
                )
            self._fence(gen, sorted(live))
            self._await_final_w(gen, live)
            # and no W after the one read below: a sync write acknowledged by the old
            # generation is acknowledged by a W <= the cut
            self._fence_publisher(gen)
        wm = rs.latest_watermark(self.kafka_conf, c.cg, gen)
        cut = choose_cut(self.kafka_conf, c.cg, at=c.at, marker=c.marker, generation=gen, wm=wm)
        if cut.ts < ckpt.w:
            raise FailoverError(
                f"the cut {cut.ts} is below what site {c.site!r} already applied (W "
                f"{ckpt.w}): a failover cannot go back; choose a later cut, or use "
                "`lowmark drill` / `lowmark restore` for an older point in time"
            )
        log_bounds = rs.log_bounds(self.kafka_conf, c.cg, gen)
        self._planned_with = (wm, log_bounds)  # build_backlog needs both again
        base = rs.end_offsets(wm, log_bounds)
        # planned now only to check it: the commit plans again from the roles it finds
        plan_failover(
            current, c.cg, c.site, cut.ts, base, c.force, self.time.wall_us(), kind=c.kind
        )
        return FailoverRecord(
            cg=c.cg,
            site=c.site,
            generation=gen + 1,
            from_generation=gen,
            from_site="" if current is None else current.primary_site,
            cut_ts=cut.ts,
            how=cut.how,
            marker=cut.marker,
            published_w=cut.published_w,
            base_offsets=base,
            site_w=ckpt.w,
            site_offsets=dict(ckpt.log_offsets),
            forced=c.force,
            interceptor_id=c.new_interceptor_id,
            started_us=self.time.wall_us(),
        )

    def _drain(self, generation: int, live: Mapping[str, Activity]) -> dict[str, Activity]:
        """Ask the old primary to drain and wait until each live interceptor published its
        LEAVE after the request: their final S (everything they acknowledged is below it)."""
        c = self.config
        request_drain(self.kafka_conf, DrainRequest(c.cg, generation, c.site, self.time.wall_us()))
        self._event("drain requested", generation=generation, interceptors=sorted(live))
        deadline = self.time.monotonic() + c.drain_timeout_s
        while True:
            now = progress_activity(self.kafka_conf, c.cg, generation)
            left = {
                iid: a
                for iid, a in now.items()
                if iid in live and a.kind is ProgressKind.LEAVE and a.offset > live[iid].offset
            }
            if len(left) == len(live):
                self._event("old primary drained", final_s={k: a.s for k, a in left.items()})
                return left
            if self.time.monotonic() > deadline:
                raise FailoverError(
                    f"the old primary's interceptors {sorted(set(live) - set(left))} did not "
                    f"drain within {c.drain_timeout_s} s; nothing was changed (they may have "
                    "stopped taking writes: restart their `lowmark serve`). Check them, or "
                    "fail over (with --force if they cannot be reached)"
                )
            self.time.sleep(0.05)

    def _fence(self, generation: int, ids: list[str]) -> None:
        """Take the old interceptors' transactional ids: their producers commit no more."""
        self.fenced = fence_interceptors(self.kafka_conf, self.config.cg, generation, ids)
        self._event("old primary fenced", generation=generation, interceptors=self.fenced)

    def _fence_publisher(self, generation: int) -> Watermark | None:
        """Take the old generation's watermark publisher id: no W is published after the
        latest one, which this returns (a standby takes the id back only after
        ``takeover_after_s``, when every fenced interceptor knows it is fenced)."""
        publisher = WatermarkPublisher(self.kafka_conf, self.config.cg, generation=generation)
        try:
            floor = publisher.acquire()
        finally:
            publisher.release()
        self._event(
            "old watermark publisher fenced",
            generation=generation,
            final_w=None if floor is None else floor.w,
        )
        return floor

    def fence_all(self) -> None:
        """``--force``: fence the old generation's watermark publisher, then every
        interceptor it had (best effort: an unreachable cluster part is logged; the new
        generation is safe without it: nobody applies the old one past the cut). A W of
        the old generation above the cut means the old primary was still running: said
        loudly, with how far it got."""
        r = self._require()
        gen = r.from_generation
        try:
            floor = self._fence_publisher(gen)
            self._fence(gen, sorted(interceptor_ids(self.kafka_conf, self.config.cg, gen)))
        except LowmarkError as exc:
            self._event("fencing the old primary failed", level=logging.WARNING, error=str(exc))
            return
        if floor is not None and floor.w > r.cut_ts:
            self._event(
                "the old primary was still running when the cut was chosen: its writes "
                "acknowledged above the cut are not in the new generation",
                level=logging.WARNING,
                cut_ts=r.cut_ts,
                old_generation_w=floor.w,
                lost_s=round((ts_physical_us(floor.w) - ts_physical_us(r.cut_ts)) / 1e6, 3),
            )

    def _await_final_w(self, generation: int, live: Mapping[str, Activity]) -> None:
        """After the fence, wait until W reaches the last S of every fenced interceptor
        (or the S of a hold: an ended instance's unrepublished tail caps the cut there)."""
        c = self.config
        deadline = self.time.monotonic() + c.stop_timeout_s
        while True:
            wm = rs.latest_watermark(self.kafka_conf, c.cg, generation)
            w, target = wm.w, min([p.s for p in live.values()] + [h.s for h in wm.holds])
            if w >= target:
                return
            if self.time.monotonic() > deadline:
                raise FailoverError(
                    f"the fenced primary's last progress (S {target}) did not reach W within "
                    f"{c.stop_timeout_s} s (W is {w}): is `lowmark watermark` running? Run "
                    "again with --force to fail over to the current W"
                )
            self.time.sleep(0.05)

    # ---------------------------------------------------------------- 2. index

    def build_backlog(self, on_progress: Callable[[ReplayProgress], None] | None = None) -> Backlog:
        """The backlog from the site's checkpoint to the cut, minus the ranges the new
        generation's log already holds (a re-run after writes were accepted)."""
        r = self._require()
        staged, backlog = self._staged(r)
        old = CgTopics(r.cg, r.from_generation)
        if self._planned_with is not None:
            target, log_bounds = self._planned_with
        else:
            log_bounds = rs.log_bounds(self.kafka_conf, r.cg, r.from_generation)
            target = rs.latest_watermark(self.kafka_conf, r.cg, r.from_generation)
        from_w, offsets = r.site_w, r.site_offsets
        if staged is not None:  # a paused site's stage: only the log past it is read
            from_w, offsets = staged.w, staged.offsets
        start = {p: offsets.get(p, lo) for p, (lo, _hi) in log_bounds.items()}
        end = {p: r.base_offsets.get(p, hi) for p, (_lo, hi) in log_bounds.items()}
        # target: the old generation's latest W (the one the cut was chosen under, when this
        # run planned): its epochs judge zombie records, as for the applier
        result = replay(
            self.kafka_conf,
            old.log,
            backlog,
            from_w=from_w,
            to_ts=r.cut_ts,
            start_offsets=start,
            end_offsets=end,
            on_progress=on_progress,
            target=target,
        )
        dropped = 0
        if r.phase >= Phase.COMMITTED:
            for volume_id, offset, length in self._new_generation_ranges(r):
                dropped += backlog.index.drop(volume_id, offset, length)
        self._event(
            "backlog indexed",
            staged_ops=len(staged.rows) if staged else 0,
            staged_bytes=staged.bytes if staged else 0,
            records=result.progress.records_done,
            bytes_read=result.progress.bytes_read,
            extents=backlog.index.extent_count,
            bytes_indexed=backlog.bytes_left,
            volume_changes=len(backlog.volume_changes),
            dropped_by_new_generation=dropped,
        )
        return backlog

    def _staged(self, r: FailoverRecord) -> tuple[staging.Staged | None, Backlog]:
        """The site's stage folded into a new backlog, if it starts at the checkpoint this
        failover starts from and ends at or below the cut; else None and an empty backlog
        (the log is then read from the checkpoint on)."""
        fold, self._fold = self._fold, None
        if fold is None:
            self._fold_stage()
            fold, self._fold = self._fold, None
        staged, why, backlog = fold.result() if fold is not None else (None, "", None)
        if staged is not None and not r.site_w <= staged.w <= r.cut_ts:
            why = f"the stage reaches W={staged.w}, past the cut {r.cut_ts}"
            staged = None
        if staged is None:
            if backlog is not None:
                backlog.close()
            backlog = self._new_backlog()
            if why and why != "the site has no stage":
                self._event("stage not used", why=why)
        assert backlog is not None
        return staged, backlog

    def _new_generation_ranges(self, r: FailoverRecord) -> Iterator[tuple[str, int, int]]:
        """(volume, offset, length) of every write and zero in the new generation's log."""
        topic = CgTopics(r.cg, r.generation).log
        found = bounds(self.kafka_conf, topic)
        if not found:
            return
        start = {p: BEGINNING if lo == 0 else lo for p, (lo, _hi) in found.items()}
        end = {p: hi for p, (_lo, hi) in found.items()}
        for msg in read_log(self.kafka_conf, topic, start, end):
            try:
                rec = codec.decode(msg.value() or b"", LOG_RECORDS)
            except RecordError as exc:
                raise FailoverError(
                    f"record {topic}[{msg.partition()}]@{msg.offset()} of the new generation "
                    f"is bad ({exc}): the failover cannot tell which ranges clients wrote; "
                    "inspect it with `lowmark tail`"
                ) from None
            if isinstance(rec, Write):
                for x in rec.extents:
                    yield rec.volume_id, x.offset, len(x.data)
            elif isinstance(rec, Zero):
                yield rec.volume_id, rec.offset, rec.length

    # ---------------------------------------------------------------- 3. commit

    def commit(self) -> CgRoles:
        """Commit the new generation's roles (idempotent: a re-run finds them committed)."""
        r = self._require()
        c = self.config
        for _attempt in range(10):
            current = self.roles_store.latest(c.cg)
            if r.matches(current):
                assert current is not None
                self.roles = current
                break
            planned = plan_failover(
                current,
                c.cg,
                c.site,
                r.cut_ts,
                r.base_offsets,
                r.forced,
                self.time.wall_us(),
                kind=c.kind,
            )
            if planned.generation != r.generation:
                raise FailoverError(
                    f"CG {c.cg} is at generation {planned.generation - 1} now, not "
                    f"{r.from_generation}: another failover got there first; nothing was "
                    "changed at this site (`lowmark roles show`)"
                )
            try:
                expected = None if current is None else current.generation
                self.roles = self.roles_store.commit(c.cg, expected, planned)
                break
            except RolesConflictError as exc:
                if not exc.retriable:
                    raise FailoverError(f"{exc}; nothing was changed at this site") from None
                self.time.sleep(0.2)
        else:
            raise FailoverError("the roles' writer kept being taken over; run the failover again")
        self._advance(Phase.COMMITTED)
        self._event(
            "generation committed",
            generation=r.generation,
            primary=c.site,
            base_w=r.cut_ts,
            forced=r.forced,
        )
        return self.roles

    def apply_changes(self, backlog: Backlog) -> int:
        """The backlog's volume changes into the images, once (after the commit)."""
        r = self._require()
        if r.phase >= Phase.CHANGES_APPLIED or not backlog.volume_changes:
            self._advance(Phase.CHANGES_APPLIED)
            return 0
        with ImageSet(self.site) as images:
            n = apply_volume_changes(backlog, images)
            images.sync()
        self._advance(Phase.CHANGES_APPLIED)
        self._event("volume changes applied", changes=n)
        return n

    def prepare_topics(self) -> None:
        """Create the new generation's topics ahead of the commit (while the backlog is
        read): an uncommitted generation's topics are empty and harmless."""
        r = self._require()
        c = self.config
        ensure_topics(
            self.kafka_conf,
            c.cg,
            log_partitions=c.log_partitions,
            replication_factor=c.replication_factor,
            generation=r.generation,
        )

    def open_primary(self) -> ConsistencyGroup:
        """The new generation's interceptor over the site's images (after the commit)."""
        r = self._require()
        c = self.config
        self.cg = ConsistencyGroup.open(
            c.cg,
            self.site.root,
            self.kafka_conf,
            interceptor_id=r.interceptor_id,
            time_source=self.time,
            generation=r.generation,
            clock_floor_us=r.cut_ts,
            log_partitions=c.log_partitions,
            replication_factor=c.replication_factor,
            **dict(c.engine_options),
        )
        self._event(
            "new primary started",
            generation=r.generation,
            interceptor=r.interceptor_id,
            volumes=sorted(self.cg.volumes),
        )
        return self.cg

    # ---------------------------------------------------------------- 4. roll forward

    def rolled_forward(self) -> None:
        self._advance(Phase.ROLLED_FORWARD)
        # the images hold the stage now; an open backlog still reads its unlinked file
        staging.discard(self.site)
        pause.set_control(self.site, pause.PAUSED, False)
        self._event("rolled forward", generation=self._require().generation)

    def _require(self) -> FailoverRecord:
        if self.record is None:
            raise FailoverError("prepare() first")
        return self.record


@contextlib.contextmanager
def failover(
    config: FailoverConfig,
    kafka_conf: Mapping[str, Any],
    time_source: TimeSource = REAL_TIME,
    on_event: EventFn | None = None,
) -> Iterator[Failover]:
    f = Failover(config, kafka_conf, time_source, on_event)
    try:
        yield f
    finally:
        f.close()
