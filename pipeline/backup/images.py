"""The images of a CG in one site directory, changed only through ``ImageSet.apply``.

One implementation of "apply an op to the images", shared by the backup applier and by
restore / replay / verify (``pipeline.ops``), so a restore and a backup agree byte for
byte. Where the files live is ``SiteDir``'s business (``pipeline.site``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.image.image import Image
from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.errors import ApplyError, VolumeError
from pipeline.fsutil import fsync_path
from pipeline.site import SiteDir
from schemas.records import VolumeChange, VolumeOp


class ImageSet:
    """The catalogued images of a site directory, open for applying ops."""

    def __init__(self, root: Path | SiteDir, *, keep_deleted: bool = False) -> None:
        self.site = root if isinstance(root, SiteDir) else SiteDir(Path(root))
        self.root = self.site.root
        # a backup site keeps a deleted volume's bytes as <id>.deleted for the operator
        self.keep_deleted = keep_deleted
        self.site.create()
        self.catalog: dict[str, dict[str, Any]] = {
            e["volume_id"]: dict(e) for e in self.site.read_catalog()
        }
        self.images: dict[str, Image] = {}
        self._touched: set[str] = set()
        for vid in self.catalog:
            self.images[vid] = Image(self.site.image_path(vid))

    @property
    def image_dir(self) -> Path:
        return self.site.images_dir

    @property
    def catalog_path(self) -> Path:
        return self.site.catalog_path

    def image_path(self, volume_id: str) -> Path:
        return self.site.image_path(volume_id)

    def apply(self, op: ApplyOp) -> None:
        """Apply one op exactly as the applier does, so restore and backup agree byte for byte."""
        if op.kind is OpKind.VOLUME_CHANGE:
            assert isinstance(op.record, VolumeChange)
            self._volume_change(op.record)
            return
        if op.kind in (OpKind.MARKER, OpKind.SNAPSHOT):
            return
        img = self.images.get(op.volume_id or "")
        if img is None:
            raise ApplyError(
                f"{op.kind} at ts {op.ts} for volume {op.volume_id!r}, which the base images "
                "do not hold and the replayed log did not create; the base does not match "
                "this log (wrong site dir or CG?)"
            )
        if op.offset + op.length > img.size:
            raise ApplyError(
                f"{op.kind} at ts {op.ts} on volume {op.volume_id} [{op.offset}, "
                f"{op.offset + op.length}) extends past its {img.size} bytes; the base does "
                "not match this log"
            )
        if op.kind is OpKind.WRITE:
            assert op.data is not None
            img.pwrite(op.offset, op.data)
        else:  # zero / trim read as zeroes; a zero stays allocated, as at the primary
            img.zero(op.offset, op.length, punch=op.kind is OpKind.TRIM)
        self._touched.add(op.volume_id or "")

    def _volume_change(self, rec: VolumeChange) -> None:
        vid, op = rec.volume_id, rec.op
        try:
            path = self.site.image_path(vid)
        except VolumeError as exc:  # a path-like id must never reach the filesystem
            raise ApplyError(f"volume change at ts {rec.ts}: {exc}") from None
        if op is VolumeOp.DELETE:
            img = self.images.pop(vid, None)
            if img is not None:
                img.close()
                if self.keep_deleted:
                    gone = self.site.deleted_path(vid)
                    path.rename(gone)
                    if gone.parent != path.parent:
                        fsync_path(gone.parent)
                else:
                    path.unlink(missing_ok=True)
                # the name change is durable before the catalog stops naming the volume
                fsync_path(path.parent)
            self.catalog.pop(vid, None)
            self._touched.discard(vid)
        else:
            img = self.images.get(vid)
            if img is None:
                img = self.images[vid] = Image(path, create_size=rec.size)
                img.sync()
                # the new file and its name are durable before the catalog names it
                fsync_path(path.parent)
            if img.size != rec.size:
                img.resize(rec.size)
                img.sync()  # the size the catalog is about to state
            self.catalog[vid] = {
                "volume_id": vid,
                "name": rec.name,
                "size": rec.size,
                "metadata": dict(rec.metadata),
            }
            self._touched.add(vid)
        self.save_catalog()

    def save_catalog(self) -> None:
        self.site.write_catalog(self.catalog.values())

    def take_touched(self) -> list[Image]:
        """The images changed since the last call (to fdatasync before a checkpoint)."""
        touched = [img for vid in self._touched if (img := self.images.get(vid)) is not None]
        self._touched.clear()
        return touched

    def sync(self) -> None:
        for img in self.take_touched():
            img.sync()

    def volumes(self, digests: bool = True) -> list[dict[str, Any]]:
        """id, name, size and content digest of every volume, sorted by id. A digest reads
        every allocated byte: ``digests=False`` leaves it out (``"digest": ""``)."""
        out = []
        for vid, img in sorted(self.images.items()):
            info = self.catalog.get(vid, {})
            out.append(
                {
                    "volume_id": vid,
                    "name": info.get("name", vid),
                    "size": img.size,
                    "digest": img.content_digest() if digests else "",
                }
            )
        return out

    def close(self) -> None:
        for img in self.images.values():
            img.close()
        self.images.clear()

    def __enter__(self) -> ImageSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
