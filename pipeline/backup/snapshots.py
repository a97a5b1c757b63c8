"""A backup site's snapshot store: image copies at checkpoints, the base of restore/replay.

Each snapshot is itself a site directory (``SiteDir.snapshot(w)``, see
``pipeline.site`` for the layout): its ``checkpoint.avro`` is the Checkpoint record
(Avro, as in Kafka), its ``volumes.json`` the site's catalog at W, and its ``images/`` sparse
copies of the images at exactly W.

A snapshot directory is written under a temporary name and renamed into place, so one
that exists is complete. Copies are sparse (holes stay holes) and use reflinks where the
filesystem has them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from connectors.image.image import Image
from pipeline.fsutil import atomic_write, fsync_path
from pipeline.site import SiteDir
from pipeline.snapshot_store import copy_sparse
from schemas import codec
from schemas.records import Checkpoint


def store_dir(data_dir: Path) -> Path:
    return SiteDir(data_dir).snapshots_dir


def save(
    data_dir: Path,
    checkpoint_value: bytes,
    images: dict[str, Image],
    catalog: dict[str, dict[str, Any]],
) -> Path:
    """Copy the (already fdatasynced) images as the snapshot of this checkpoint."""
    rec = codec.decode(checkpoint_value, Checkpoint)
    final = SiteDir(data_dir).snapshot(rec.w)
    if final.root.exists():
        return final.root
    tmp = SiteDir(final.root.with_name(final.root.name + ".partial"))
    shutil.rmtree(tmp.root, ignore_errors=True)
    tmp.create()
    for vid, img in images.items():
        copy_sparse(img.path, tmp.image_path(vid))
        fsync_path(tmp.image_path(vid))
    tmp.write_catalog(catalog.values())
    atomic_write(tmp.checkpoint_path, checkpoint_value)  # last: it marks the entry complete
    os.replace(tmp.root, final.root)
    return final.root


def copy_site(src: Path, dst: Path) -> None:
    """Copy a site directory's catalog and its catalogued images into ``dst`` (made here).

    Files the catalog does not name are left behind (``SiteDir.strays``). A source that
    disappears meanwhile (a snapshot pruned while it is copied) raises FileNotFoundError.
    """
    source, target = SiteDir(src), SiteDir(dst).create()
    entries = source.read_catalog(require_images=False, missing_ok=False)
    for e in entries:
        copy_sparse(source.image_path(e["volume_id"]), target.image_path(e["volume_id"]))
    target.write_catalog(entries)


def list_snapshots(data_dir: Path) -> list[tuple[int, Path]]:
    """(W, path) of every complete snapshot, oldest first."""
    return [(w, snap.root) for w, snap in SiteDir(data_dir).snapshots()]


def newest_at_or_below(data_dir: Path, ts: int) -> tuple[Checkpoint, Path] | None:
    """The newest snapshot whose W <= ts, with its checkpoint record."""
    for w, snap in reversed(SiteDir(data_dir).snapshots()):
        if w <= ts:
            return codec.decode(snap.checkpoint_path.read_bytes(), Checkpoint), snap.root
    return None


def prune(data_dir: Path, keep: int) -> None:
    snaps = SiteDir(data_dir).snapshots()
    for _w, snap in snaps[: max(0, len(snaps) - keep)]:
        shutil.rmtree(snap.root, ignore_errors=True)
