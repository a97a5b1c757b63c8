"""Failback after an unplanned failover: the delta resync of the old primary's data dir.

``resync`` makes the old primary P (generation g) a consistent backup of generation g + 1
whose primary is N, copying only what diverged (``resync_plan``, read by ``resync_scan``)
from N's images (a directory: N's data dir, or a shared mount of it). Every phase is
recorded in P's ``state/resync/`` (``SiteDir.resync_dir``), so a ``kill -9`` at any instant
and a re-run continue where it stopped; while that directory exists the site is not a
backup (``lowmark apply`` refuses it) and its images still hold P's old state:

1. **plan**: note g + 1's log end offsets E0, fold the divergence (g's records above the
   cut, P's dirty-region log, g + 1's log up to E0), plan per volume, move a checkpoint P
   may hold aside, create the stage (a site-layout directory ``stage/``: the planned
   volumes' sparse images at N's sizes). ``plan.json`` is written last.
2. **copy** the planned ranges from N's images into the stage, never into P's images, at
   the configured rate (``resync_rate``), progress persisted after each piece (the stage's
   bytes fdatasynced first). FULL volumes start with a *snapshot* of N's image: a reflink
   clone (FICLONE: one instant of the source, no bytes read, no space used) when the
   filesystem can; otherwise the pieces are copied like a delta's. The copy is fuzzy (N
   keeps writing), the next two steps make it a cut.
3. **W1**: a published W of g + 1 at or above every ts N could have stamped before the
   copy ended (the wall clock at its end plus ``clock_skew_us``, and the highest ts the
   reverse log held at E0). Saved in ``w1.avro``.
4. **catch up**: replay g + 1's log from its start to W1 (``ops.replay``: the applier's
   planner) onto the stage. Every byte g + 1 wrote at ts <= W1 ends as its last such write;
   every other copied byte is N's byte at the cut (no write above W1 had happened when it
   was read). A region a replayed op touches that was not copied is first filled from P's
   image, which holds the cut there (it did not diverge). ``replayed.json``: done.
5. **install**: ``install.json`` (fsynced) names what is written: per volume the staged
   ranges (DELTA: copied and filled regions) or the whole image (FULL, or a volume the
   catch-up created or resized); the images are written and fdatasynced, the catalog
   replaced, P's dirty-region logs dropped (their regions were copied), then the checkpoint
   (generation g + 1, W1, the replay's resume offsets) is written, and ``state/resync/``
   removed. Re-running an install writes the same bytes (the stage is final).

It only reads N's images and Kafka: no other site pauses, and N keeps serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from connectors.image.image import Image, data_extents
from connectors.kafka.topics import CgTopics
from pipeline.backup.images import ImageSet
from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.errors import FailoverError, LowmarkError, RestoreError
from pipeline.fsutil import atomic_write, fsync_path
from pipeline.logs import event
from pipeline.ops.failback import last_move_from
from pipeline.ops.replay import replay
from pipeline.ops.restore import end_offsets, latest_watermark, log_bounds
from pipeline.ops.resync_plan import (
    DEFAULT_FULL_COPY_THRESHOLD,
    DEFAULT_REGION_BYTES,
    Divergence,
    Mode,
    ResyncPlan,
    VolumePlan,
    plan_resync,
)
from pipeline.ops.resync_rate import (
    ForegroundMeter,
    Progress,
    TokenBucket,
    log_growth_sampler,
    target_rate,
)
from pipeline.ops.resync_scan import scan
from pipeline.primary.regions import region_span
from pipeline.site import SiteDir, SiteLock
from pipeline.timesource import wall_us
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.records import CgRoles, Checkpoint, TransitionKind, VolumeDigest, Watermark
from schemas.ts import make_ts

log = logging.getLogger("lowmark.resync")

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


@dataclass(frozen=True)
class ResyncConfig:
    region_bytes: int = DEFAULT_REGION_BYTES
    full_copy_threshold: float = DEFAULT_FULL_COPY_THRESHOLD
    max_rate: int = 0  # bytes/s, 0: unlimited
    min_rate: int = 0
    #: N's clock may be this far ahead of ours: W1 waits for our clock plus this
    clock_skew_us: int = 100_000
    w1_timeout_s: float = 120.0
    progress_interval_s: float = 1.0
    #: try a reflink clone for FULL volumes (tests turn it off to count bytes read)
    reflink: bool = True


@dataclass(frozen=True)
class ResyncResult:
    plan: ResyncPlan
    checkpoint: Checkpoint
    bytes_copied: int  # planned bytes copied, over every run
    bytes_read: int  # bytes read from N's images in this run
    bytes_filled: int  # bytes filled from P's own images before a replayed op
    reflinked: tuple[str, ...]
    #: the site was a backup of this generation already (a finished resync re-run)
    already: bool = False


def _finished(sdir: SiteDir, files: _Files, generation: int) -> Checkpoint | None:
    if files.root.exists() or not sdir.checkpoint_path.exists():
        return None
    ckpt = codec.decode(sdir.checkpoint_path.read_bytes(), (Checkpoint,))
    return ckpt if ckpt.generation >= generation else None


class _Files:
    """The paths of ``state/resync/`` (only this module knows them)."""

    def __init__(self, site: SiteDir) -> None:
        self.root = site.resync_dir
        self.plan = self.root / "plan.json"
        self.progress = self.root / "progress.json"
        self.stage = SiteDir(self.root / "stage")
        self.w1 = self.root / "w1.avro"
        self.replayed = self.root / "replayed.json"
        self.install = self.root / "install.json"
        self.old_checkpoint = self.root / "checkpoint.before-resync.avro"
        self.finished = site.state_dir / "resync.finished"


def in_progress(site_dir: Path | SiteDir) -> dict[str, Any] | None:
    """The persisted progress of an unfinished resync of the site ({} before any), or None."""
    files = _Files(site_dir if isinstance(site_dir, SiteDir) else SiteDir(Path(site_dir)))
    if not files.root.is_dir():
        return None
    try:
        return dict(orjson.loads(files.progress.read_bytes()))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def resync(
    kafka_conf: Mapping[str, Any],
    cg: str,
    site: str,
    site_dir: Path,
    source_dir: Path,
    config: ResyncConfig = ResyncConfig(),
    *,
    on_line: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
    progress: Progress | None = None,
    foreground: Callable[[], tuple[int, float]] | None = None,
) -> ResyncResult:
    """Make the old primary ``site`` (data dir ``site_dir``) a backup of the generation that
    failed over away from it, copying from the new primary's data dir ``source_dir``.
    ``on_line``: each progress line (at least every ``progress_interval_s`` while copying);
    ``progress``: updated in place (a metrics endpoint reads it); ``foreground``: samples
    of N's writes for ``min_rate`` (default: the growth of generation g + 1's log)."""
    roles = RolesStore(dict(kafka_conf)).latest(cg)
    _check_roles(roles, cg, site)
    assert roles is not None
    sdir, src = SiteDir(Path(site_dir)), SiteDir(Path(source_dir))
    if not sdir.is_site():
        raise FailoverError(f"{site_dir} is not a site's data dir (no images/ in it)")
    if not src.is_site():
        raise FailoverError(f"--source-dir {source_dir} is not a site's data dir (no images/)")
    if sdir.root.resolve() == src.root.resolve():
        raise FailoverError("--source-dir is the old primary's own data dir: give the new one's")
    files = _Files(sdir)
    with SiteLock(sdir, f"resync of site {site}"):
        done = _finished(sdir, files, roles.generation)
        if done is not None:  # a run that was killed after its last step: nothing to do
            empty = ResyncPlan(config.region_bytes, config.full_copy_threshold, ())
            return ResyncResult(empty, done, 0, 0, 0, (), already=True)
        run = _Run(kafka_conf, cg, site, roles, sdir, src, files, config, on_line, sleep, now)
        run.foreground = foreground or log_growth_sampler(
            kafka_conf, CgTopics(cg, roles.generation).log
        )
        if progress is not None:
            progress.started_mono = now()
            run.progress = progress
        return run.go()


def _check_roles(roles: CgRoles | None, cg: str, site: str) -> None:
    _roles, last = last_move_from(roles, cg, site)
    if last.kind is not TransitionKind.FAILOVER:
        raise FailoverError(
            f"CG {cg}'s last change was a {last.kind.value.lower()}: its old primary drained "
            "and holds the cut, so it needs no copy: run `lowmark failback` without --source-dir"
        )


class _Run:
    def __init__(
        self,
        kafka_conf: Mapping[str, Any],
        cg: str,
        site: str,
        roles: CgRoles,
        sdir: SiteDir,
        src: SiteDir,
        files: _Files,
        config: ResyncConfig,
        on_line: Callable[[str], None] | None,
        sleep: Callable[[float], None],
        now: Callable[[], float],
    ) -> None:
        self.kafka_conf, self.cg, self.site, self.roles = kafka_conf, cg, site, roles
        self.sdir, self.src, self.files, self.config = sdir, src, files, config
        self.on_line, self.sleep, self.now = on_line, sleep, now
        self.generation = roles.generation
        self.progress = Progress(started_mono=now())
        self._last_report = -1e9
        self.filled = 0
        self.reflinked: list[str] = []
        self.foreground: Callable[[], tuple[int, float]] | None = None
        self._sampled_at = -1e9

    # ---------------------------------------------------------------- phases

    def go(self) -> ResyncResult:
        doc = self._load_or_plan()
        plan = ResyncPlan(
            doc["region_bytes"],
            doc["full_copy_threshold"],
            tuple(VolumePlan.from_json(v) for v in doc["volumes"]),
        )
        self.progress.bytes_planned = plan.planned_bytes
        if not self.files.install.exists():
            done = self._copy(plan, doc)
            wm = self._w1(doc)
            replayed = self._catch_up(plan, doc, wm)
            install = self._journal(plan, replayed, done)
        else:
            install = orjson.loads(self.files.install.read_bytes())
            self.progress.bytes_done = self.progress.bytes_planned
        ckpt = self._install(install)
        # one rename ends the resync (a crash in a recursive delete must not leave a
        # half-deleted state that a re-run would take for an earlier phase)
        os.replace(self.files.root, self.files.finished)
        fsync_path(self.sdir.state_dir)
        shutil.rmtree(self.files.finished)
        self._report("done", force=True)
        return ResyncResult(
            plan, ckpt, install["bytes_copied"], self.progress.bytes_read, self.filled,
            tuple(self.reflinked),
        )  # fmt: skip

    def _load_or_plan(self) -> dict[str, Any]:
        f = self.files
        if f.finished.exists():  # a finished resync whose delete was cut short
            shutil.rmtree(f.finished)
        if f.plan.exists():
            doc: dict[str, Any] = orjson.loads(f.plan.read_bytes())
            if (doc["cg"], doc["generation"]) != (self.cg, self.generation):
                raise FailoverError(
                    f"{f.root} holds an unfinished resync of CG {doc['cg']} generation "
                    f"{doc['generation']}, not {self.cg} generation {self.generation}: the "
                    "roles moved on; move that directory away and run the failback again"
                )
            event(log, "resuming an unfinished resync (its plan is kept; options that "
                  "change the plan do not apply to it)", plan=str(f.plan))  # fmt: skip
            return doc
        f.root.mkdir(parents=True, exist_ok=True)
        fsync_path(self.sdir.state_dir)  # from here on, the site is not a backup
        if self.sdir.checkpoint_path.exists():
            os.replace(self.sdir.checkpoint_path, f.old_checkpoint)
            fsync_path(self.sdir.root)
        self._report("plan", force=True)
        div = Divergence(self.config.region_bytes)
        found = scan(
            self.kafka_conf, self.cg, self.generation, self.roles.base_w,
            self.roles.base_offsets, div, self.sdir,
        )  # fmt: skip
        old = {e["volume_id"]: e["size"] for e in self.sdir.read_catalog()}
        new_entries = {e["volume_id"]: e for e in self.src.read_catalog()}
        plan = plan_resync(
            div, old, {v: e["size"] for v, e in new_entries.items()},
            full_copy_threshold=self.config.full_copy_threshold,
        )  # fmt: skip
        if f.stage.root.exists():
            shutil.rmtree(f.stage.root)
        f.stage.create()
        entries = []
        for vp in plan.volumes:
            if vp.mode is Mode.DROP:
                continue
            entries.append(new_entries[vp.volume_id])
            Image(f.stage.image_path(vp.volume_id), create_size=vp.size).close()
        f.stage.write_catalog(entries)
        doc = {
            "cg": self.cg,
            "site": self.site,
            "generation": self.generation,
            "cut": self.roles.base_w,
            "start1": {str(p): o for p, o in found.start1.items()},
            "end1": {str(p): o for p, o in found.end1.items()},
            "max_ts1": found.max_ts1,
            "region_bytes": plan.region_bytes,
            "full_copy_threshold": plan.full_copy_threshold,
            "source_dir": str(self.src.root),
            "volumes": [v.to_json() for v in plan.volumes],
        }
        atomic_write(f.plan, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return doc

    def _copy(self, plan: ResyncPlan, doc: dict[str, Any]) -> dict[str, int]:
        """Copy every planned range not yet copied; per volume, how many are."""
        f = self.files
        try:
            done: dict[str, int] = orjson.loads(f.progress.read_bytes()).get("ranges_done", {})
        except FileNotFoundError:
            done = {}
        rate = target_rate(self.config.max_rate, self.config.min_rate)
        bucket = TokenBucket(rate, self.now())
        self.progress.limit_bps = rate
        meter = ForegroundMeter() if self.config.max_rate else None
        self.progress.bytes_done = sum(
            n for vp in plan.volumes for _o, n in vp.ranges[: done.get(vp.volume_id, 0)]
        )
        self._report("copy", force=True)
        for vp in plan.volumes:
            start = done.get(vp.volume_id, 0)
            if vp.mode is Mode.DROP or start >= len(vp.ranges):
                continue
            source = self.src.image_path(vp.volume_id)
            with Image(f.stage.image_path(vp.volume_id)) as stage:
                if vp.mode is Mode.FULL and start == 0 and self._reflink(source, stage):
                    self.reflinked.append(vp.volume_id)
                    self.progress.bytes_done += vp.planned_bytes
                    done[vp.volume_id] = len(vp.ranges)
                    self._save_progress(done)
                    continue
                fd = _open_source(source)
                try:
                    for i in range(start, len(vp.ranges)):
                        offset, length = vp.ranges[i]
                        self._retarget(bucket, meter)
                        self._throttle(bucket.take(length, self.now()))
                        data = _pread(fd, offset, length)
                        self.progress.bytes_read += length
                        if data.count(0) != len(data):
                            stage.pwrite(offset, data)
                        stage.sync()
                        done[vp.volume_id] = i + 1
                        self.progress.bytes_done += length
                        self._save_progress(done)
                finally:
                    if fd >= 0:
                        os.close(fd)
        return done

    def _retarget(self, bucket: TokenBucket, meter: ForegroundMeter | None) -> None:
        """Every progress interval, the copy's rate from N's foreground writes (``min_rate``
        is what it keeps however busy N is); a failed sample keeps the last rate."""
        now = self.now()
        if meter is None or self.foreground is None:
            return
        if now - self._sampled_at < self.config.progress_interval_s:
            return
        self._sampled_at = now
        try:
            offsets, mean = self.foreground()
        except LowmarkError as exc:
            event(log, "foreground sample failed; rate unchanged", level=logging.WARNING,
                  error=str(exc))  # fmt: skip
            return
        self.progress.foreground_bps = meter.observe(now, offsets, mean)
        cfg = self.config
        self.progress.limit_bps = target_rate(cfg.max_rate, cfg.min_rate, meter.bps)
        bucket.set_rate(self.progress.limit_bps, now)

    def _throttle(self, wait_s: float) -> None:
        """Sleep as the bucket says, a progress line at least every interval meanwhile."""
        while wait_s > 0:
            step = min(wait_s, self.config.progress_interval_s / 2)
            self.sleep(step)
            wait_s -= step
            self._report("copy")

    def _reflink(self, source: Path, stage: Image) -> bool:
        if not self.config.reflink:
            return False
        try:
            fd = os.open(source, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.ioctl(stage.fd, FICLONE, fd)
        except OSError:
            return False
        finally:
            os.close(fd)
        stage.size = os.fstat(stage.fd).st_size
        stage.sync()
        return True

    def _w1(self, doc: dict[str, Any]) -> Watermark:
        f = self.files
        if f.w1.exists():
            saved = codec.decode(f.w1.read_bytes(), (Watermark,))
            assert isinstance(saved, Watermark)
            return saved
        # every byte read was written by a stamp before now (on N's clock, within the skew)
        floor = max(make_ts(wall_us() + self.config.clock_skew_us), doc["max_ts1"])
        self._report("await W1", force=True)
        deadline = self.now() + self.config.w1_timeout_s
        wm: Watermark | None = None
        while True:
            try:
                wm = latest_watermark(self.kafka_conf, self.cg, self.generation)
            except RestoreError:
                wm = None
            if wm is not None and wm.w >= floor:
                break
            if self.now() > deadline:
                raise FailoverError(
                    f"no W of generation {self.generation} reached {floor} within "
                    f"{self.config.w1_timeout_s} s (is `lowmark watermark` running for the new "
                    "primary?); the copy is kept: run the failback again to continue"
                )
            self._report("await W1")
            self.sleep(0.05)
        atomic_write(f.w1, codec.encode(wm))
        return wm

    def _catch_up(self, plan: ResyncPlan, doc: dict[str, Any], wm: Watermark) -> dict[str, Any]:
        f = self.files
        if f.replayed.exists():
            return dict(orjson.loads(f.replayed.read_bytes()))
        self._report("catch up", force=True)
        topic = CgTopics(self.cg, self.generation).log
        bounds = log_bounds(self.kafka_conf, self.cg, self.generation)
        start = {int(p): o for p, o in doc["start1"].items()}
        start.update({p: 0 for p in bounds if p not in start})
        with ImageSet(f.stage) as stage:
            sink = _StageSink(stage, self.sdir, plan)
            result = replay(
                self.kafka_conf, topic, sink, from_w=self.roles.base_w, to_ts=wm.w,
                start_offsets=start, end_offsets=end_offsets(wm, bounds), target=wm,
                on_progress=lambda _p: self._report("catch up"),
            )  # fmt: skip
        self.filled = sink.filled_bytes
        out = {
            "w": wm.w,
            "resume_offsets": {str(p): o for p, o in result.resume_offsets.items()},
            "filled": {v: sorted(r) for v, r in sink.filled.items()},
            "whole": sorted(sink.whole),
        }
        atomic_write(f.replayed, orjson.dumps(out))
        return out

    def _journal(
        self, plan: ResyncPlan, replayed: dict[str, Any], done: dict[str, int]
    ) -> dict[str, Any]:
        rb = plan.region_bytes
        stage_cat = {e["volume_id"]: e for e in self.files.stage.read_catalog()}
        vols = []
        for vid, entry in sorted(stage_cat.items()):
            vp = plan.volume(vid)
            if vp is None or vp.mode is not Mode.DELTA or vid in replayed["whole"]:
                vols.append({"volume_id": vid, "whole": True, "ranges": []})
                continue
            ranges = {r for o, n in vp.ranges for r in region_span(o, n, rb)}
            ranges.update(replayed["filled"].get(vid, ()))
            spans = [(r * rb, min(entry["size"], (r + 1) * rb) - r * rb) for r in sorted(ranges)]
            vols.append({"volume_id": vid, "whole": False, "ranges": spans})
        install = {
            "w": replayed["w"],
            "resume_offsets": replayed["resume_offsets"],
            "volumes": vols,
            "catalog": list(stage_cat.values()),
            "bytes_copied": sum(
                n for vp in plan.volumes for _o, n in vp.ranges[: done.get(vp.volume_id, 0)]
            ),
        }
        atomic_write(self.files.install, orjson.dumps(install))
        return install

    def _install(self, install: dict[str, Any]) -> Checkpoint:
        self._report("install", force=True)
        f, sdir = self.files, self.sdir
        keep = set()
        for v in install["volumes"]:
            vid = v["volume_id"]
            keep.add(vid)
            staged = f.stage.image_path(vid)
            if v["whole"]:
                _copy_whole(staged, sdir.image_path(vid))
                continue
            with Image(staged) as src, Image(sdir.image_path(vid)) as dst:
                for offset, length in v["ranges"]:
                    dst.pwrite(offset, src.pread(offset, length))
                dst.sync()
        for e in sdir.read_catalog(require_images=False):
            if e["volume_id"] not in keep:
                sdir.image_path(e["volume_id"]).unlink(missing_ok=True)
        sdir.write_catalog(install["catalog"])
        if sdir.regions_dir.is_dir():  # their regions are in the plan: copied or caught up
            shutil.rmtree(sdir.regions_dir)
        fsync_path(sdir.images_dir)
        with ImageSet(sdir) as images:
            digests = tuple(
                VolumeDigest(v["volume_id"], v["size"], v["digest"])
                for v in images.volumes(digests=False)
            )
        offsets = {int(p): o for p, o in install["resume_offsets"].items()}
        ckpt = Checkpoint(
            self.site, self.cg, install["w"], offsets, digests, wall_us(), self.generation
        )
        atomic_write(sdir.checkpoint_path, codec.encode(ckpt))
        return ckpt

    # ---------------------------------------------------------------- progress

    def _save_progress(self, done: dict[str, int]) -> None:
        doc = self.progress.to_json(self.now())
        doc["ranges_done"] = done
        atomic_write(self.files.progress, orjson.dumps(doc))
        self._report("copy")

    def _report(self, phase: str, force: bool = False) -> None:
        self.progress.phase = phase
        now = self.now()
        if not force and now - self._last_report < self.config.progress_interval_s:
            return
        self._last_report = now
        if self.on_line is not None:
            self.on_line(self.progress.line(now))
        if phase != "copy" and self.files.root.is_dir():  # copy saves its own, with ranges
            doc = self.progress.to_json(now)
            with contextlib.suppress(FileNotFoundError, KeyError):
                doc["ranges_done"] = orjson.loads(self.files.progress.read_bytes())["ranges_done"]
            atomic_write(self.files.progress, orjson.dumps(doc))


class _StageSink:
    """The catch-up replay's images: the stage, each DELTA region filled from P's own image
    (which holds the cut there) before an op first touches a byte the copy did not stage."""

    def __init__(self, stage: ImageSet, old: SiteDir, plan: ResyncPlan) -> None:
        self.stage, self.old, self.plan = stage, old, plan
        self.rb = plan.region_bytes
        self.staged: dict[str, set[int]] = {}
        for vp in plan.volumes:
            if vp.mode is Mode.DELTA:
                self.staged[vp.volume_id] = {
                    r for o, n in vp.ranges for r in region_span(o, n, self.rb)
                }
        self.filled: dict[str, set[int]] = {}
        self.whole: set[str] = set()
        self.filled_bytes = 0

    def apply(self, op: ApplyOp) -> None:
        vid = op.volume_id or ""
        if vid in self.staged and vid not in self.whole:
            if op.kind is OpKind.VOLUME_CHANGE:
                self._fill_whole(vid)
            elif op.kind in (OpKind.WRITE, OpKind.ZERO, OpKind.TRIM):
                self._fill(vid, region_span(op.offset, op.length, self.rb))
        self.stage.apply(op)

    def sync(self) -> None:
        self.stage.sync()

    def _fill(self, vid: str, regions: range | list[int]) -> None:
        staged, filled = self.staged[vid], self.filled.setdefault(vid, set())
        todo = [r for r in regions if r not in staged and r not in filled]
        if not todo:
            return
        dst = self.stage.images[vid]
        with Image(self.old.image_path(vid)) as src:
            for r in todo:
                offset = r * self.rb
                length = max(0, min(src.size, offset + self.rb) - offset)
                if length:
                    dst.pwrite(offset, src.pread(offset, length))
                    self.filled_bytes += length
                filled.add(r)
        self.stage._touched.add(vid)

    def _fill_whole(self, vid: str) -> None:
        with Image(self.old.image_path(vid)) as src:
            regions = {
                r for o, n in data_extents(src.fd, src.size) for r in region_span(o, n, self.rb)
            }
        self._fill(vid, sorted(regions))
        self.whole.add(vid)


# ---------------------------------------------------------------- files


def _open_source(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # deleted at N since the plan: the catch-up deletes it too
        return -1


def _pread(fd: int, offset: int, length: int) -> bytes:
    if fd < 0:
        return bytes(length)
    out = os.pread(fd, length, offset)
    return out + bytes(length - len(out))


def _copy_whole(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (holes kept): a new file renamed into place."""
    tmp = dst.with_name(dst.name + ".resync")
    with Image(src) as s, Image(tmp, create_size=0) as d:
        os.ftruncate(d.fd, 0)
        os.ftruncate(d.fd, s.size)
        for offset, length in data_extents(s.fd, s.size):
            for o in range(offset, offset + length, 1 << 20):
                d.pwrite(o, s.pread(o, min(1 << 20, offset + length - o)))
        d.sync()
    os.replace(tmp, dst)
