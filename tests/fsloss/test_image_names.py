"""An image the catalog names survives a power cut (issue 16 item 2, found by reading).

``ImageSet`` created ``images/<id>.img`` and then wrote the catalog (atomic_write: its own
file and the site root fsynced), but never fsynced ``images/``: after a power cut the
catalog named a volume whose image file was gone, and the site refused to open. The same
for a deleted volume's rename to ``<id>.deleted``: it could come back under its old name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.backup.images import ImageSet
from pipeline.backup.plan import ApplyOp, OpKind
from schemas.records import VolumeChange, VolumeOp
from tests.fsloss.shim import FsLoss

SEEDS = 8


def _change(op: VolumeOp, vid: str, ts: int) -> ApplyOp:
    rec = VolumeChange(op, vid, vid, 4096 if op is VolumeOp.CREATE else 0, {}, ts, "i", 0)
    return ApplyOp(OpKind.VOLUME_CHANGE, vid, ts, 0, 0, None, rec, "i", 0)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_a_catalogued_image_survives_a_power_cut(tmp_path: Path, seed: int) -> None:
    ImageSet(tmp_path).close()  # the site directory exists before the power can go
    loss = FsLoss(tmp_path, seed).install()
    try:
        images = ImageSet(tmp_path)
        images.apply(_change(VolumeOp.CREATE, "v", 1))
        loss.crash()
    finally:
        loss.uninstall()
    with ImageSet(tmp_path) as again:  # raises if the catalog names a missing image
        assert list(again.catalog) == ["v"]
        assert again.images["v"].size == 4096


@pytest.mark.parametrize("seed", range(SEEDS))
def test_a_deleted_volume_stays_deleted_after_a_power_cut(tmp_path: Path, seed: int) -> None:
    with ImageSet(tmp_path) as images:
        images.apply(_change(VolumeOp.CREATE, "v", 1))
    loss = FsLoss(tmp_path, seed).install()
    try:
        images = ImageSet(tmp_path, keep_deleted=True)
        images.apply(_change(VolumeOp.DELETE, "v", 2))
        loss.crash()
    finally:
        loss.uninstall()
    with ImageSet(tmp_path) as again:
        assert again.catalog == {}
    assert not (tmp_path / "images" / "v.img").exists(), "the deleted image came back"
