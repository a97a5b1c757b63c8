"""Point-in-time restore and replay: the checks around the replay engine.

A restore at TS is only offered when it is exact:

- TS <= the latest published W. A cut above W is not known to be complete (a record with
  ts <= TS may still be on its way), so it is refused, not approximated.
- The base (the newest snapshot of the site with W <= TS, else empty images at the log's
  very start) must still be followed by every record it needs: each partition's low
  offset (retention) must be at or below the base's replay offsets. Otherwise the error
  names the oldest point that is still restorable.

The result directory has the layout of a site's data dir (``images/``, ``volumes.json``)
plus ``restore.json``, written last: a directory with it is complete, and ``replay``
continues from its cut and offsets.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from connectors.kafka.reading import bounds, iter_range
from connectors.kafka.topics import CgTopics
from pipeline.backup import snapshots as snapshot_store
from pipeline.backup.images import ImageSet
from pipeline.errors import ConfigError, RecordError, RestoreError
from pipeline.fsutil import atomic_write
from pipeline.ops.replay import ProgressFn, ReplayResult, replay
from pipeline.site import RESTORE_MANIFEST, SiteDir
from pipeline.timesource import wall_us
from pipeline.topology.roles import base_of, generation_at
from pipeline.topology.store import RolesStore
from pipeline.watermark.publisher import latest_watermark as published_watermark
from schemas import codec
from schemas.records import CgRoles, Checkpoint, Marker, Snapshot, Watermark
from schemas.ts import format_ts

MANIFEST = RESTORE_MANIFEST
MANIFEST_FORMAT = 1


# ---------------------------------------------------------------- what Kafka holds


def log_bounds(
    kafka_conf: Mapping[str, Any], cg: str, generation: int = 0
) -> dict[int, tuple[int, int]]:
    """(low, read_committed end) of every partition of the log of the CG's generation."""
    topic = CgTopics(cg, generation).log
    found = bounds(kafka_conf, topic)
    if found is None:
        raise ConfigError(
            f"consistency group {cg} has no log topic {topic}; check --cg and bootstrap.servers"
        )
    return found


def latest_watermark(kafka_conf: Mapping[str, Any], cg: str, generation: int = 0) -> Watermark:
    best = published_watermark(dict(kafka_conf), cg, generation=generation)
    if best is None:
        raise RestoreError(
            f"consistency group {cg} has no published watermark yet, so no cut is known to "
            "be complete; start `lowmark watermark` and retry"
        )
    return best


def find_marker(
    kafka_conf: Mapping[str, Any],
    cg: str,
    name: str,
    generation: int | None = None,
    kind: type[Marker] | type[Snapshot] = Marker,
) -> tuple[Any, int]:
    """The newest ``kind`` record (a Marker, or a Snapshot) named ``name`` in the retained
    log, and how many have it.

    ``generation`` None: every generation's log, the newest first (a marker is in the
    generation whose primary emitted it)."""
    if generation is None:
        roles = RolesStore(dict(kafka_conf)).latest(cg)
        newest = 0 if roles is None else roles.generation
        for g in range(newest, 0, -1):
            try:
                return find_marker(kafka_conf, cg, name, g, kind)
            except (RestoreError, ConfigError):
                continue  # not in this generation (or its log is gone)
        generation = 0
    topic = CgTopics(cg, generation).log
    found: list[Any] = []
    for p, (low, high) in log_bounds(kafka_conf, cg, generation).items():
        for msg in iter_range(dict(kafka_conf), topic, p, low, high, timeout_s=120):
            header = dict(msg.headers() or []).get("type")
            if header not in (None, kind.TYPE.encode()):
                continue  # the plain-text type header saves decoding every write
            try:
                rec = codec.decode(msg.value() or b"", kind)
            except RecordError:
                continue
            if rec.name == name:
                found.append(rec)
    if not found:
        what = kind.TYPE.lower()
        raise RestoreError(
            f"no {what} named {name!r} in the retained log of {cg}; list them with "
            f"`lowmark tail --no-follow --type {kind.TYPE} --cg {cg}`"
        )
    return max(found, key=lambda r: r.ts), len(found)


# ---------------------------------------------------------------- the base


class BaseKind(StrEnum):
    """Where a restore's images start (``restore.json`` base.kind)."""

    SNAPSHOT = "snapshot"  # a copy from the site's snapshot store
    LOG_START = "log-start"  # empty images, the whole log replayed
    GENERATION_START = "generation-start"  # the previous generation restored to the cut
    REPLAY = "replay"  # images already in the directory (``replay_range``)


@dataclass(frozen=True)
class Base:
    """Images holding exactly the records with ts <= w, and where to replay from."""

    kind: BaseKind
    w: int
    offsets: dict[int, int]
    path: Path | None = None
    site: str | None = None


@dataclass(frozen=True)
class SnapshotInfo:
    w: int
    offsets: dict[int, int]
    path: Path
    site: str
    generation: int = 0  # whose log ``offsets`` are of


def site_snapshots(site_dir: Path | None, site: str | None = None) -> list[SnapshotInfo]:
    """The complete snapshots of a site's store, oldest first."""
    if site_dir is None:
        return []
    out = []
    for w, snap in SiteDir(Path(site_dir)).snapshots():
        path = snap.root
        try:
            ck = codec.decode(snap.checkpoint_path.read_bytes(), Checkpoint)
        except (OSError, RecordError):
            continue  # pruned while we looked, or damaged: not a base
        if site is not None and ck.site != site:
            raise RestoreError(
                f"the snapshot store in {site_dir} belongs to site {ck.site!r}, not "
                f"{site!r}; pass that site's data dir with --site-dir"
            )
        out.append(SnapshotInfo(w, dict(ck.log_offsets), path, ck.site, ck.generation))
    return out


def _in_retention(offsets: Mapping[int, int], low: Mapping[int, int]) -> bool:
    return all(offsets.get(p, 0) >= lo for p, lo in low.items())


def oldest_restorable(snapshots: list[SnapshotInfo], low: Mapping[int, int]) -> int | None:
    """The lowest ts that can still be restored exactly, None when none can."""
    if all(lo == 0 for lo in low.values()):
        return 0
    ok = [s.w for s in snapshots if _in_retention(s.offsets, low)]
    return min(ok) if ok else None


def choose_base(
    snapshots: list[SnapshotInfo], ts: int, low: Mapping[int, int], *, use_snapshots: bool = True
) -> Base:
    """Pure: the newest snapshot with W <= ts, else the log's start; checked against retention."""
    below = [s for s in snapshots if s.w <= ts] if use_snapshots else []
    if below:
        snap = max(below, key=lambda s: s.w)
        if _in_retention(snap.offsets, low):
            return Base(BaseKind.SNAPSHOT, snap.w, dict(snap.offsets), snap.path, snap.site)
        why = (
            f"the newest snapshot at or below it (W {snap.w}) needs log offsets "
            f"{_fmt_offsets(snap.offsets)}, but retention has deleted up to {_fmt_offsets(low)}"
        )
    elif all(lo == 0 for lo in low.values()):
        return Base(BaseKind.LOG_START, 0, {p: 0 for p in low})
    else:
        why = (
            "no snapshot of the site lies at or below it, and the log no longer starts at "
            f"offset 0 (retention has deleted up to {_fmt_offsets(low)})"
        )
    oldest = oldest_restorable(snapshots if use_snapshots else [], low)
    where = (
        f"the oldest restorable point is ts {oldest} ({format_ts(oldest)})"
        if oldest is not None
        else "nothing is restorable from this log"
        + (" and site" if use_snapshots and snapshots else "; pass a site with --site-dir")
    )
    raise RestoreError(f"cannot restore ts {ts} ({format_ts(ts)}) exactly: {why}; {where}")


def _fmt_offsets(offsets: Mapping[int, int]) -> str:
    return "{" + ", ".join(f"{p}: {o}" for p, o in sorted(offsets.items())) + "}"


def check_below_w(ts: int, wm: Watermark) -> None:
    if ts > wm.w:
        raise RestoreError(
            f"ts {ts} ({format_ts(ts)}) is above the latest published W {wm.w} "
            f"({format_ts(wm.w)}): a cut above W is not known to be complete. Choose a ts "
            "at or below W, or wait until W passes it"
        )


def end_offsets(wm: Watermark, bounds: Mapping[int, tuple[int, int]]) -> dict[int, int]:
    # every record with ts <= W lies below W's offsets; a partition W does not name is
    # read to its current end
    from_w = wm.log_offsets
    return {p: from_w.get(p, high) for p, (_low, high) in bounds.items()}


# ---------------------------------------------------------------- restore


@dataclass
class Outcome:
    manifest: dict[str, Any]
    result: ReplayResult
    notes: list[str] = field(default_factory=list)


def restore(
    kafka_conf: Mapping[str, Any],
    cg: str,
    ts: int,
    to_dir: Path,
    *,
    site_dir: Path | None = None,
    site: str | None = None,
    use_snapshots: bool = True,
    marker: str | None = None,
    on_progress: ProgressFn | None = None,
) -> Outcome:
    """Build the CG's images at exactly the cut ``ts`` in ``to_dir`` (new or empty).

    After failovers the cut lies in one generation (``generation_at``): its base is a
    snapshot of that generation, else the previous generation restored to the cut the
    generation started from (recursively) and its log replayed from its start."""
    to_dir = Path(to_dir)
    if to_dir.exists() and any(to_dir.iterdir()):
        raise RestoreError(f"{to_dir} is not empty; restore into a new directory")
    roles = RolesStore(dict(kafka_conf)).latest(cg)
    generation = generation_at(roles, ts)
    wm = latest_watermark(kafka_conf, cg, generation)
    check_below_w(ts, wm)
    try:
        base, result, volumes = _restore_into(
            kafka_conf, cg, ts, to_dir, generation, roles, site_dir, site, use_snapshots,
            on_progress,
        )  # fmt: skip
    except BaseException:
        _empty(to_dir)  # it was new or empty: leave no half copy that looks like a restore
        raise
    manifest = _manifest(cg, ts, base, result, volumes, wm, marker)
    manifest["generation"] = generation
    atomic_write(
        SiteDir(to_dir).restore_manifest_path,
        orjson.dumps(manifest, option=orjson.OPT_INDENT_2),
    )
    return Outcome(manifest, result)


def _generation_end(
    roles: CgRoles | None, generation: int, wm: Watermark, bounds: Mapping[int, tuple[int, int]]
) -> dict[int, int]:
    """Where ``generation``'s records of a cut end: its W's offsets, or, for the
    generation the latest failover left, the cut's own offsets (what the appliers read)."""
    if roles is not None and generation == roles.generation - 1 and roles.base_offsets:
        return {p: roles.base_offsets.get(p, hi) for p, (_lo, hi) in bounds.items()}
    return end_offsets(wm, bounds)


def _restore_into(
    kafka_conf: Mapping[str, Any],
    cg: str,
    ts: int,
    to_dir: Path,
    generation: int,
    roles: CgRoles | None,
    site_dir: Path | None,
    site: str | None,
    use_snapshots: bool,
    on_progress: ProgressFn | None,
) -> tuple[Base, ReplayResult, list[dict[str, Any]]]:
    wm = latest_watermark(kafka_conf, cg, generation)
    bounds = log_bounds(kafka_conf, cg, generation)
    low = {p: lo for p, (lo, _hi) in bounds.items()}
    snaps = [s for s in site_snapshots(site_dir, site) if s.generation == generation]
    base = None
    if generation > 0 and not (use_snapshots and any(s.w <= ts for s in snaps)):
        # this generation's start: the previous one restored to its cut
        base_w = base_of(roles, generation)
        _restore_into(
            kafka_conf, cg, base_w, to_dir, generation - 1, roles, site_dir, site,
            use_snapshots, on_progress,
        )  # fmt: skip
        if any(lo > 0 for lo in low.values()):
            raise RestoreError(
                f"cannot restore ts {ts} ({format_ts(ts)}) exactly: generation {generation}'s "
                f"log no longer starts at offset 0 (retention has deleted up to "
                f"{_fmt_offsets(low)}) and no snapshot of it lies at or below ts"
            )
        base = Base(BaseKind.GENERATION_START, base_w, {p: 0 for p in bounds})
    for _attempt in range(3):  # a running applier may prune the chosen snapshot meanwhile
        if base is not None:
            break
        base = choose_base(snaps, ts, low, use_snapshots=use_snapshots)
        try:
            _prepare(to_dir, base)
        except FileNotFoundError:
            base = None
    if base is None:
        raise RestoreError(
            f"the snapshots of {site_dir} kept disappearing while being copied (pruned by "
            "the site's applier?); retry, or raise [apply] snapshots_kept"
        )
    start = {p: base.offsets.get(p, 0) for p in bounds}
    with ImageSet(to_dir) as images:
        result = replay(
            kafka_conf,
            CgTopics(cg, generation).log,
            images,
            from_w=base.w,
            to_ts=ts,
            start_offsets=start,
            end_offsets=_generation_end(roles, generation, wm, bounds),
            on_progress=on_progress,
            target=wm,
        )
        return base, result, images.volumes()


def _prepare(to_dir: Path, base: Base) -> None:
    """Empty ``to_dir`` and put the base images there."""
    _empty(to_dir)
    SiteDir(to_dir).create()
    if base.kind is not BaseKind.SNAPSHOT:
        return
    assert base.path is not None
    snapshot_store.copy_site(base.path, to_dir)


def _empty(path: Path) -> None:
    """Remove what is inside ``path`` (it may be a mount point: keep the directory)."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _manifest(
    cg: str,
    ts: int,
    base: Base,
    result: ReplayResult,
    volumes: list[dict[str, Any]],
    wm: Watermark,
    marker: str | None,
) -> dict[str, Any]:
    prog = result.progress
    return {
        "format": MANIFEST_FORMAT,
        "cg": cg,
        "w": ts,  # the images hold exactly the records with ts <= w
        "w_time": format_ts(ts),
        "exact": True,
        "marker": marker,
        "base": {
            "kind": base.kind,
            "w": base.w,
            "site": base.site,
            "path": str(base.path) if base.path else None,
        },
        # where a replay continuing from w starts reading (every ts > w lies at or above)
        "log_offsets": {str(p): o for p, o in sorted(result.resume_offsets.items())},
        "published_w": wm.w,
        "records_read": prog.records_done,
        "ops_applied": prog.ops_applied,
        "bytes_applied": prog.bytes_applied,
        "volumes": volumes,
        "created_us": wall_us(),
    }


def read_manifest(images_dir: Path) -> dict[str, Any] | None:
    path = SiteDir(Path(images_dir)).restore_manifest_path
    if not path.exists():
        return None
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise RestoreError(f"{path} is unreadable ({exc}); restore a fresh copy") from None


# ---------------------------------------------------------------- replay onto a copy


def replay_range(
    kafka_conf: Mapping[str, Any],
    cg: str,
    images_dir: Path,
    from_ts: int,
    to_ts: int,
    *,
    on_progress: ProgressFn | None = None,
) -> Outcome:
    """Apply the records with from_ts < ts <= to_ts onto the images in ``images_dir``.

    Where reading starts: the directory's ``restore.json`` offsets when its cut is at or
    below from_ts (every record after that cut lies at or above them), else the log's very
    start, which must still be retained. ``restore.json`` is rewritten for the new cut.
    """
    images_dir = Path(images_dir)
    if not SiteDir(images_dir).is_site():
        raise RestoreError(
            f"{images_dir} holds no images/ directory; give a directory made by "
            "`lowmark restore --to` (or a site's data dir copy)"
        )
    if to_ts < from_ts:
        raise RestoreError(f"--to-ts {to_ts} is below --from-ts {from_ts}")
    wm = latest_watermark(kafka_conf, cg)
    check_below_w(to_ts, wm)
    bounds = log_bounds(kafka_conf, cg)
    low = {p: lo for p, (lo, _hi) in bounds.items()}
    old = read_manifest(images_dir)
    if old is not None and old.get("cg") not in (None, cg):
        raise RestoreError(f"{images_dir} holds CG {old['cg']}, not {cg}")
    old_w = old["w"] if old is not None and old.get("exact", True) else None
    # re-applying a suffix in order lands on the same bytes (blind writes), so images at
    # old_w in [from_ts, to_ts] end exactly at to_ts; below from_ts the gap is never applied
    exact = old_w is not None and from_ts <= old_w <= to_ts
    notes = []
    if not exact:
        held = "an unknown state" if old_w is None else f"the cut at ts {old_w}"
        notes.append(
            f"the images hold {held}, not a cut in [--from-ts, --to-ts]: the result is that "
            f"state plus the records in ({from_ts}, {to_ts}], a drill, not a consistent cut"
        )
    if old is not None and old_w is not None and old_w <= from_ts:
        start = {p: int(old["log_offsets"].get(str(p), 0)) for p in bounds}
    else:
        start = {p: 0 for p in bounds}
    if not _in_retention(start, low):
        raise RestoreError(
            f"replaying from ts {from_ts} needs log offsets {_fmt_offsets(start)}, but "
            f"retention has deleted up to {_fmt_offsets(low)}; restore a newer base with "
            "`lowmark restore --at` and replay from its cut"
        )
    with ImageSet(images_dir) as images:
        result = replay(
            kafka_conf,
            CgTopics(cg).log,
            images,
            from_w=from_ts,
            to_ts=to_ts,
            start_offsets=start,
            end_offsets=end_offsets(wm, bounds),
            on_progress=on_progress,
            target=wm,
        )
        volumes = images.volumes()
    base = Base(BaseKind.REPLAY, from_ts, start, images_dir)
    manifest = _manifest(cg, to_ts, base, result, volumes, wm, None)
    manifest["base"]["restored_w"] = old_w
    if not exact:
        manifest["w"] = manifest["w_time"] = None
        manifest["exact"] = False
    atomic_write(
        SiteDir(images_dir).restore_manifest_path,
        orjson.dumps(manifest, option=orjson.OPT_INDENT_2),
    )
    return Outcome(manifest, result, notes)
