"""The resync's catch-up sink (no Kafka): tries to break the rule that a replayed op on a
region the copy did not stage first gets the old primary's bytes there (the cut), that a
staged region is never overwritten from the old primary, and that a volume change on a
DELTA volume makes the volume's install whole."""

from __future__ import annotations

from pipeline.backup.images import ImageSet
from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.ops.resync import _StageSink
from pipeline.ops.resync_plan import Mode, ResyncPlan, VolumePlan
from pipeline.site import SiteDir
from schemas.records import VolumeChange, VolumeOp

RB = 4096
SIZE = 8 * RB


def _site(root, fill: int) -> SiteDir:
    site = SiteDir(root).create()
    site.write_catalog([{"volume_id": "a", "name": "a", "size": SIZE}])
    site.image_path("a").write_bytes(bytes([fill]) * SIZE)
    return site


def _write(offset: int, data: bytes, ts: int = 10) -> ApplyOp:
    return ApplyOp(OpKind.WRITE, "a", ts, offset, len(data), data, None, "n", 1)


def _sink(tmp_path) -> tuple[_StageSink, ImageSet]:
    old = _site(tmp_path / "old", 0x11)  # the old primary: the cut outside the divergence
    stage_dir = _site(tmp_path / "stage", 0x00)
    stage_dir.image_path("a").write_bytes(bytes(SIZE))
    stage = ImageSet(stage_dir)
    stage.images["a"].pwrite(RB, b"\x22" * RB)  # region 1 was copied from the new primary
    plan = ResyncPlan(RB, 0.5, (VolumePlan("a", Mode.DELTA, SIZE, ((RB, RB),), RB, ""),))
    return _StageSink(stage, old, plan), stage


def test_an_op_outside_the_copy_is_laid_over_the_old_primarys_bytes(tmp_path):
    sink, stage = _sink(tmp_path)
    sink.apply(_write(3 * RB + 100, b"\x33" * 10))  # region 3: not copied
    sink.apply(_write(RB + 5, b"\x44" * 3))  # region 1: copied, kept
    sink.sync()
    img = stage.images["a"]
    assert img.pread(3 * RB, RB) == b"\x11" * 100 + b"\x33" * 10 + b"\x11" * (RB - 110)
    assert img.pread(RB, RB) == b"\x22" * 5 + b"\x44" * 3 + b"\x22" * (RB - 8)
    assert sink.filled == {"a": {3}} and sink.filled_bytes == RB
    sink.apply(_write(3 * RB, b"\x55"))  # filled once only: the earlier op stays
    assert img.pread(3 * RB + 100, 10) == b"\x33" * 10
    stage.close()


def test_a_volume_change_on_a_delta_volume_fills_it_whole(tmp_path):
    sink, stage = _sink(tmp_path)
    rec = VolumeChange(VolumeOp.RESIZE, "a", "a", 2 * SIZE, {}, 20, "n", 1)
    sink.apply(ApplyOp(OpKind.VOLUME_CHANGE, "a", 20, 0, 0, None, rec, "n", 1))
    assert "a" in sink.whole
    img = stage.images["a"]
    assert img.size == 2 * SIZE
    assert img.pread(0, RB) == b"\x11" * RB and img.pread(RB, RB) == b"\x22" * RB
    assert img.pread(SIZE, RB) == bytes(RB)
    stage.close()
