"""A replacement backup site, built from a peer site's checkpoint copy (``--bootstrap-from``).

The peer's snapshot store (``[apply] snapshot_interval_s``) holds, per checkpoint it
copied, a site directory at exactly that W with its Checkpoint record. Bootstrapping copies
the newest such entry into this site's directory (sparse; a reflink where the filesystem
has them), rewrites the checkpoint as this site's, and the applier then reads the log from
the checkpoint's offsets: what it reads from Kafka is the records after the peer's
checkpoint, not the whole log. The peer keeps applying meanwhile: an entry in its store
never changes once it exists (one pruned while it is copied is retried with a newer one).

Crash safety: ``state/bootstrap`` is written before anything is removed or copied and
removed after the local checkpoint file is in place; while it exists the applier refuses
to start (the images are neither the old site's nor the peer's cut), and running the
bootstrap again starts over. The local checkpoint is written last, after the images are
fsynced (invariant 4), and it takes precedence over any older checkpoint of this site in
Kafka.

The named snapshots the peer's checkpoint says it held (``Checkpoint.snapshots``) are
copied too, so the new site holds the same ones; a later one it takes from the log itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.kafka.reading import bounds
from connectors.kafka.topics import CgTopics
from pipeline.backup.checkpointer import decode_checkpoint, retention_lost
from pipeline.backup.snapshots import copy_site
from pipeline.errors import ApplyError, RecordError
from pipeline.fsutil import atomic_write, fsync_path
from pipeline.logs import event
from pipeline.site import SiteDir, SiteLock
from pipeline.snapshot_store import MANIFEST, SnapshotStore
from schemas import codec
from schemas.records import Checkpoint, SnapshotHeld

log = logging.getLogger("lowmark.bootstrap")

BOOTSTRAP_MARK = "bootstrap"
#: a peer's store entry pruned while it is copied: try the next newest this many times
_ATTEMPTS = 3


@dataclass(frozen=True)
class BootstrapResult:
    source: Path
    w: int
    generation: int
    log_offsets: dict[int, int]
    volumes: int
    bytes_copied: int
    snapshots: tuple[str, ...]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "source": str(self.source)}


def bootstrap_mark(data_dir: Path) -> Path:
    return SiteDir(data_dir).state_dir / BOOTSTRAP_MARK


def check_not_half_bootstrapped(data_dir: Path, site: str) -> None:
    """Refuse a site whose bootstrap was interrupted (its images are nobody's cut)."""
    mark = bootstrap_mark(data_dir)
    if mark.exists():
        raise ApplyError(
            f"site {site}'s bootstrap from {mark.read_text().strip() or 'a peer'} was "
            f"interrupted ({mark} exists): run `lowmark apply --site {site} --bootstrap-from "
            "PEER_DATA_DIR` again; it starts over"
        )


def needs_bootstrap(data_dir: Path, cg: str, kafka_conf: Mapping[str, Any]) -> str | None:
    """Why ``data_dir`` must be rebuilt from a peer before its applier can run (None: it
    need not): an interrupted bootstrap, no local checkpoint (a new or wiped site), or a
    checkpoint whose log offsets retention deleted."""
    target = SiteDir(data_dir)
    if bootstrap_mark(data_dir).exists():
        return "an earlier bootstrap was interrupted"
    if not target.checkpoint_path.is_file():
        return "it has no checkpoint (a new or emptied site)"
    try:
        ckpt = decode_checkpoint(target.checkpoint_path.read_bytes())
    except RecordError as exc:
        return f"its checkpoint is unreadable ({exc})"
    if ckpt.cg != cg:
        raise ApplyError(f"{data_dir} is a site of CG {ckpt.cg!r}, not {cg!r}")
    topic = CgTopics(cg, ckpt.generation).log
    lost = retention_lost(ckpt.log_offsets, bounds(dict(kafka_conf), topic) or {})
    if lost is not None:
        return f"retention deleted {topic}[{lost[0]}] up to {lost[2]}, past its checkpoint"
    return None


def source_entry(source: Path) -> list[SiteDir]:
    """The peer store entries to try, newest first: ``source`` is a peer's data dir (its
    snapshot store) or one entry of such a store (a dir with a checkpoint.avro)."""
    src = SiteDir(source)
    if not src.root.is_dir():
        raise ApplyError(f"--bootstrap-from {source}: no such directory")
    if src.checkpoint_path.is_file() and src.root.parent.name == "snapshots":
        return [src]
    entries = [snap for _w, snap in reversed(src.snapshots())]
    if not entries:
        raise ApplyError(
            f"--bootstrap-from {source}: it holds no checkpoint copy (no {src.snapshots_dir} "
            "entries). Run the peer's applier with [apply] snapshot_interval_s > 0 (for "
            "example 60) and try again once it has taken one"
        )
    return entries


def bootstrap_site(
    data_dir: Path,
    *,
    cg: str,
    site: str,
    source: Path,
    kafka_conf: Mapping[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
) -> BootstrapResult:
    """Replace ``data_dir``'s images and checkpoint with the peer's newest checkpoint copy
    whose log offsets Kafka still holds; the caller starts the applier after."""
    started = time.monotonic()
    target = SiteDir(data_dir)
    target.root.mkdir(parents=True, exist_ok=True)
    with SiteLock(target, "bootstrap").acquire():
        last: Exception | None = None
        for entry in source_entry(source)[:_ATTEMPTS]:
            try:
                ckpt = _usable(entry, cg, kafka_conf)
                return _copy(entry, ckpt, target, site, source, started, progress)
            except FileNotFoundError as exc:  # pruned by the peer meanwhile: the next
                last = exc
                continue
        raise ApplyError(
            f"--bootstrap-from {source}: its checkpoint copies kept disappearing while being "
            f"copied ({last}); make the peer keep more ([apply] snapshots_kept) and retry"
        )


def _usable(entry: SiteDir, cg: str, kafka_conf: Mapping[str, Any]) -> Checkpoint:
    try:
        ckpt = decode_checkpoint(entry.checkpoint_path.read_bytes())
    except RecordError as exc:
        raise ApplyError(f"{entry.checkpoint_path} is not a checkpoint record ({exc})") from None
    if ckpt.cg != cg:
        raise ApplyError(
            f"{entry.root} is a copy of CG {ckpt.cg!r}, not {cg!r}: point --bootstrap-from "
            "at a site of this CG"
        )
    topic = CgTopics(cg, ckpt.generation).log
    lost = retention_lost(ckpt.log_offsets, bounds(dict(kafka_conf), topic) or {})
    if lost is not None:
        p, at, low = lost
        raise ApplyError(
            f"the peer's newest checkpoint copy ({entry.root}, W={ckpt.w}) needs {topic}[{p}] "
            f"from offset {at}, but retention deleted up to {low}: it is too old to catch up "
            "from either. Let the peer take a newer one (it copies one every "
            "snapshot_interval_s) or choose a peer whose copy is newer"
        )
    return ckpt


def _copy(
    entry: SiteDir,
    ckpt: Checkpoint,
    target: SiteDir,
    site: str,
    source: Path,
    started: float,
    progress: Callable[[str, int, int], None] | None,
) -> BootstrapResult:
    mark = bootstrap_mark(target.root)
    target.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(mark, f"{entry.root}\n".encode())
    # the old local checkpoint goes first: from here on nothing claims the images are a cut
    target.checkpoint_path.unlink(missing_ok=True)
    shutil.rmtree(target.images_dir, ignore_errors=True)
    target.catalog_path.unlink(missing_ok=True)
    catalog = entry.read_catalog(require_images=False, missing_ok=False)
    total = sum(int(e["size"]) for e in catalog)
    event(log, "bootstrap: copying the peer's checkpoint copy", source=str(entry.root),
          w=ckpt.w, generation=ckpt.generation, volumes=len(catalog), bytes=total)  # fmt: skip
    copy_site(entry.root, target.root)
    done = 0
    for e in catalog:
        fsync_path(target.image_path(e["volume_id"]))
        done += int(e["size"])
        if progress is not None:
            progress(e["name"], done, total)
    held = _copy_named(SiteDir(entry.root.parent.parent), target, ckpt)
    mine = dataclasses.replace(ckpt, site=site, snapshots=held)
    fsync_path(target.images_dir)
    atomic_write(target.checkpoint_path, codec.encode(mine))  # last: the commit point
    mark.unlink()
    fsync_path(target.state_dir)
    result = BootstrapResult(source, ckpt.w, ckpt.generation, dict(ckpt.log_offsets),
                             len(catalog), total, tuple(s.name for s in held),
                             round(time.monotonic() - started, 3))  # fmt: skip
    event(log, "bootstrap done", **result.as_dict())
    return result


def _copy_named(peer: SiteDir, target: SiteDir, ckpt: Checkpoint) -> tuple[SnapshotHeld, ...]:
    """Copy the named snapshots the checkpoint says the peer held; the ones copied."""
    src, dst = SnapshotStore(peer), SnapshotStore(target)
    dst.root.mkdir(parents=True, exist_ok=True)
    held = []
    for snap in ckpt.snapshots:
        have = src.get(snap.name)
        if have is None or have.ts != snap.ts:
            continue  # deleted at the peer since: this site holds one snapshot fewer
        if dst.get(snap.name) is None:
            partial = dst.partial_path(snap.name)
            shutil.rmtree(partial, ignore_errors=True)
            copy_site(have.path, partial)
            shutil.copyfile(have.path / MANIFEST, partial / MANIFEST)
            os.replace(partial, dst.path(snap.name))
        held.append(snap)
    return tuple(held)
