"""A backup site's snapshot store: image copies at checkpoints, the base of restore/replay.

Layout, under the site's data dir::

    snapshots/<W, 20 digits>/checkpoint.avro   the Checkpoint record (Avro, as in Kafka)
    snapshots/<W, 20 digits>/volumes.json      the site's volume catalog at W
    snapshots/<W, 20 digits>/images/<id>.img   sparse copies of the images at exactly W

A snapshot directory is written under a temporary name and renamed into place, so one
that exists is complete. Copies are sparse (holes stay holes) and use reflinks where the
filesystem has them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson

from connectors.image.image import Image
from pipeline.fsutil import atomic_write
from schemas import codec
from schemas.records import Checkpoint


def store_dir(data_dir: Path) -> Path:
    return data_dir / "snapshots"


def copy_sparse(src: Path, dst: Path) -> None:
    # GNU cp keeps holes and reflinks when it can; fall back to a plain copy elsewhere
    try:
        subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        shutil.copyfile(src, dst)


def save(
    data_dir: Path,
    checkpoint_value: bytes,
    images: dict[str, Image],
    catalog: dict[str, dict[str, Any]],
) -> Path:
    """Copy the (already fdatasynced) images as the snapshot of this checkpoint."""
    rec = codec.decode(checkpoint_value, Checkpoint)
    final = store_dir(data_dir) / f"{rec.w:020d}"
    if final.exists():
        return final
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for vid, img in images.items():
        copy_sparse(img.path, tmp / "images" / f"{vid}.img")
        fd = os.open(tmp / "images" / f"{vid}.img", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    atomic_write(tmp / "volumes.json", orjson.dumps({"volumes": list(catalog.values())}))
    atomic_write(tmp / "checkpoint.avro", checkpoint_value)
    os.replace(tmp, final)
    return final


def list_snapshots(data_dir: Path) -> list[tuple[int, Path]]:
    """(W, path) of every complete snapshot, oldest first."""
    root = store_dir(data_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.name.isdigit() and (p / "checkpoint.avro").exists():
            out.append((int(p.name), p))
    return sorted(out)


def newest_at_or_below(data_dir: Path, ts: int) -> tuple[Checkpoint, Path] | None:
    """The newest snapshot whose W <= ts, with its checkpoint record."""
    for w, path in reversed(list_snapshots(data_dir)):
        if w <= ts:
            return codec.decode((path / "checkpoint.avro").read_bytes(), Checkpoint), path
    return None


def prune(data_dir: Path, keep: int) -> None:
    snaps = list_snapshots(data_dir)
    for _w, path in snaps[: max(0, len(snaps) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
