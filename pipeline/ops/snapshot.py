"""``lowmark snapshot``: named point-in-time copies of every volume of a CG, at every site.

``create`` is a marker with ``snapshot`` set (``pipeline.ops.marker``): the interceptors
begin copy-before-write copies of their volumes while they hold writes, the emitter writes
a Snapshot record at the marker's ts, and every backup copies its images when its applier
reaches that record (``pipeline.backup.named``). ``catalog`` says which snapshots exist
and where: the control topic's steps (each interceptor's COPIED) for the primary, each
site's latest checkpoint (``Checkpoint.snapshots``) for the backups. ``restore`` copies a
site's snapshot out, checking every image against the digest its manifest recorded;
``serve`` exports one read-only over NBD (``lowmark serve-snapshot``).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from connectors.image.image import file_digest
from connectors.kafka.reading import bounds, iter_range
from connectors.kafka.topics import CgTopics
from pipeline.errors import RecordError, SnapshotError
from pipeline.fsutil import atomic_write
from pipeline.ops.marker import Coordinator, MarkerOptions, MarkerResult
from pipeline.ops.status import checkpoints_upto
from pipeline.site import SiteDir
from pipeline.snapshot_store import NamedSnapshot, SnapshotStore, check_snapshot_name
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.control import MarkerPhase, MarkerStep
from schemas.ts import format_ts


@dataclass
class SnapshotView:
    """One snapshot as the CG knows it: its ts and size, and who holds a copy."""

    name: str
    ts: int
    size: int = 0
    #: site (a backup's name, or ``primary:<interceptor>``) -> "held", or why not
    presence: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ts": self.ts, "time": format_ts(self.ts),
                "size": self.size, "presence": dict(self.presence)}  # fmt: skip


def create(
    kafka_conf: Mapping[str, Any], cg: str, opts: MarkerOptions, *, check_name: bool = True
) -> MarkerResult:
    """Take snapshot ``opts.name`` across the CG; ``MarkerError`` if it was not emitted."""
    check_snapshot_name(opts.name)
    if check_name:
        known = {v.name: v for v in catalog(kafka_conf, cg)}
        if opts.name in known:
            raise SnapshotError(
                f"snapshot {opts.name!r} exists already (ts {format_ts(known[opts.name].ts)}): "
                "choose another name, or delete it first"
            )
    with Coordinator(kafka_conf, cg) as coordinator:
        return coordinator.take(dataclasses.replace(opts, snapshot=True))


def _control_steps(kafka_conf: Mapping[str, Any], topic: str) -> list[MarkerPhase]:
    found = bounds(dict(kafka_conf), topic)
    if not found or 0 not in found or found[0][1] <= found[0][0]:
        return []
    low, end = found[0]
    steps = []
    for msg in iter_range(dict(kafka_conf), topic, 0, low, end, timeout_s=30):
        try:
            steps.append(codec.decode(msg.value() or b"", MarkerPhase))
        except RecordError:
            continue
    return steps


def catalog(kafka_conf: Mapping[str, Any], cg: str) -> list[SnapshotView]:
    """Every snapshot the control topic (within its retention) or a site's checkpoint
    knows, oldest first, with its presence at the primary's interceptors and each site."""
    roles = RolesStore(dict(kafka_conf)).latest(cg)
    generation = 0 if roles is None else roles.generation
    views: dict[str, SnapshotView] = {}
    for g in range(generation + 1):
        steps = _control_steps(kafka_conf, CgTopics(cg, g).control)
        snapshot_ids = {s.marker_id for s in steps if s.step is MarkerStep.QUIESCE and s.snapshot}
        emitter = {s.marker_id: s.emitter for s in steps if s.step is MarkerStep.QUIESCE}
        members = {s.marker_id: s.members for s in steps if s.step is MarkerStep.QUIESCE}
        emitted: dict[str, str] = {}  # marker id -> name
        for s in steps:
            if s.marker_id not in snapshot_ids:
                continue
            if (s.step is MarkerStep.RESUMED and s.ts and not s.error
                    and emitter.get(s.marker_id) == s.interceptor_id):  # fmt: skip
                emitted[s.marker_id] = s.name
                view = views.setdefault(s.name, SnapshotView(s.name, s.ts))
                for iid in members.get(s.marker_id, ()):
                    view.presence.setdefault(f"primary:{iid}", "copying")
        for s in steps:
            if s.step is MarkerStep.COPIED and s.marker_id in emitted:
                view = views[emitted[s.marker_id]]
                view.presence[f"primary:{s.interceptor_id}"] = (
                    f"failed: {s.error}" if s.error else "held"
                )
    for site, ck in sorted(checkpoints_upto(dict(kafka_conf), cg, generation).items()):
        held = {h.name: h for h in ck.snapshots}
        for h in held.values():
            view = views.setdefault(h.name, SnapshotView(h.name, h.ts))
            view.size = view.size or h.size
        for view in views.values():
            if view.name in held:
                view.presence[site] = "held"
            elif view.ts <= ck.w:
                view.presence[site] = "absent"  # passed its ts without it (or pruned)
            else:
                view.presence[site] = f"pending (site at {format_ts(ck.w)})"
    return sorted(views.values(), key=lambda v: (v.ts, v.name))


def local(site_dir: Path, name: str) -> NamedSnapshot:
    """Snapshot ``name`` in the store of the site at ``site_dir``."""
    snap = SnapshotStore(SiteDir(site_dir)).get(name)
    if snap is None:
        have = [s.name for s in SnapshotStore(SiteDir(site_dir)).entries()]
        raise SnapshotError(
            f"no snapshot {name!r} at {site_dir}; it holds {have or 'none'}. `lowmark "
            "snapshot list` shows which sites hold it"
        )
    return snap


def verify(snap: NamedSnapshot) -> dict[str, str]:
    """Per volume: "" when its image matches the manifest's digest, else what differs."""
    out = {}
    for vid, info in sorted(snap.volumes.items()):
        path = snap.dir.image_path(vid)
        if not path.exists():
            out[vid] = "image missing"
            continue
        got = file_digest(path)
        want = info.get("digest", "")
        out[vid] = "" if not want or got == want else f"digest {got} != manifest {want}"
    return out


def restore(site_dir: Path, name: str, to_dir: Path) -> dict[str, Any]:
    """Copy snapshot ``name`` of the site at ``site_dir`` into ``to_dir`` (new or empty),
    verified against its manifest; the restore manifest written there."""
    snap = local(site_dir, name)
    bad = {v: why for v, why in verify(snap).items() if why}
    if bad:
        raise SnapshotError(
            f"snapshot {name!r} at {site_dir} does not match its manifest: {bad}. Restore "
            "it from another site (`lowmark snapshot list`), or by replay: `lowmark restore "
            f"--at {snap.ts}`"
        )
    to_dir = Path(to_dir)
    if to_dir.exists() and any(to_dir.iterdir()):
        raise SnapshotError(f"{to_dir} is not empty: give a new or empty directory")
    target = SiteDir(to_dir).create()
    entries = snap.dir.read_catalog()
    for e in entries:
        shutil.copyfile(snap.dir.image_path(e["volume_id"]), target.image_path(e["volume_id"]))
    target.write_catalog(entries)
    base = {"kind": "named-snapshot", "site": snap.site, "taken_at": snap.taken_at}
    volumes = [{"volume_id": v, **i} for v, i in sorted(snap.volumes.items())]
    manifest = {"cg": snap.cg, "w": snap.ts, "w_time": format_ts(snap.ts), "exact": True,
                "snapshot": snap.name, "base": base, "volumes": volumes}  # fmt: skip
    atomic_write(target.restore_manifest_path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return manifest


__all__ = ["SnapshotView", "catalog", "create", "local", "restore", "verify"]
