"""A paused site's stage (``pipeline.backup.staging``): what a failover or a resume reads back.

Tries to break: ops after the last mark that show up after a crash, a stage laid over the
wrong checkpoint, a data file cut short, a database that is not one, a stage never marked,
overwrites and volume changes that fold to other bytes than applying in order, and a
backlog that reads the stage's data before a client asks (it must index positions only).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from pipeline.backup import staging
from pipeline.backup.plan import OpKind
from pipeline.backup.rollforward import Backlog, RollForward, apply_volume_changes
from pipeline.site import SiteDir
from schemas.records import VolumeOp
from tests.backup.test_rollforward import (
    SIZE,
    VOLS,
    MemImages,
    apply_model,
    change,
    make_backlog_ops,
    op,
)

BASE = b"checkpoint-bytes-1"


def _site(tmp_path: Path) -> SiteDir:
    return SiteDir(tmp_path / "site").create()


def _roll(staged: staging.Staged, base: dict[str, bytearray]) -> dict[str, bytearray]:
    """What a resume does with an accepted stage: the images after it."""
    backlog = Backlog()
    try:
        staging.fold_into(staged, backlog)
        sink = MemImages(base)
        apply_volume_changes(backlog, sink)
        RollForward(backlog, sink, batch_bytes=333).run()
        return sink.images
    finally:
        backlog.close()


@pytest.mark.parametrize("seed", range(30))
def test_a_crash_keeps_exactly_the_ops_up_to_the_last_mark(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    site = _site(tmp_path)
    base = {v: bytearray(rng.randbytes(SIZE)) for v in VOLS}
    ops = make_backlog_ops(rng, 300)
    if rng.random() < 0.5:  # a resize folded into the order, as the planner hands it out
        at = rng.randrange(len(ops))
        ops.insert(at, change(VolumeOp.RESIZE, "v1", ops[at].ts, SIZE // 2))
        ops.insert(at + 1, change(VolumeOp.RESIZE, "v1", ops[at].ts, SIZE))
    stage = staging.Stage(site, BASE)
    model = {v: bytearray(b) for v, b in base.items()}
    at_mark = {v: bytearray(b) for v, b in base.items()}
    marked_w = None
    for i, o in enumerate(ops):
        stage.apply(o)
        apply_model(model, o)
        if rng.random() < 0.05:
            stage.mark(o.ts, {0: i, 1: 2 * i})
            at_mark, marked_w = {v: bytearray(b) for v, b in model.items()}, o.ts
    # crash: no mark, no close (the rows since the last mark were only in memory)
    staged, why = staging.load(site, BASE)
    if marked_w is None:
        assert staged is None and why == "the stage was never marked"
        return
    assert staged is not None, why
    assert staged.w == marked_w
    assert _roll(staged, base) == at_mark


def test_a_marked_stage_round_trips_its_offsets_and_resumes_appending(tmp_path: Path) -> None:
    site = _site(tmp_path)
    stage = staging.Stage(site, BASE)
    stage.apply(op(OpKind.WRITE, "v0", 1, 0, 4, b"abcd"))
    stage.mark(7, {0: 11, 3: 42})
    stage.apply(op(OpKind.WRITE, "v0", 2, 2, 4, b"WXYZ"))
    stage.apply(op(OpKind.MARKER, None, 3, 0, 0))  # type: ignore[arg-type]  # no image change
    stage.mark(9, {0: 12, 3: 43})
    stage.close()
    staged, why = staging.load(site, BASE)
    assert staged is not None, why
    assert (staged.w, staged.offsets, len(staged.rows), staged.bytes) == (9, {0: 12, 3: 43}, 2, 8)
    got = _roll(staged, {"v0": bytearray(8), "v1": bytearray(8)})
    assert bytes(got["v0"]) == b"abWXYZ\0\0"


def test_folding_reads_none_of_the_data(tmp_path: Path) -> None:
    """The failover's first read must not wait for the backlog: the index holds positions."""
    site = _site(tmp_path)
    stage = staging.Stage(site, BASE)
    for i in range(64):
        stage.apply(op(OpKind.WRITE, "v0", i + 1, i * 4096, 4096, bytes([i]) * 4096))
    stage.mark(64, {})
    stage.close()
    staged, _ = staging.load(site, BASE)
    assert staged is not None
    backlog = Backlog(max_memory_bytes=0)  # anything held in memory would be over budget
    try:
        staging.fold_into(staged, backlog)
        assert backlog.index.resident_bytes == 0 and backlog.bytes_left == 64 * 4096
        with backlog.lock:
            got = backlog.overlay("v0", 5 * 4096, bytes(4096))
        assert got == bytes([5]) * 4096
    finally:
        backlog.close()
    assert staged.data_path.exists(), "closing the backlog deleted the stage it adopted"


def _marked(site: SiteDir) -> None:
    stage = staging.Stage(site, BASE)
    stage.apply(op(OpKind.WRITE, "v0", 1, 0, 4096, b"x" * 4096))
    stage.apply(op(OpKind.ZERO, "v1", 2, 0, 512))
    stage.mark(2, {0: 1})
    stage.close()


def test_a_stage_over_another_checkpoint_is_refused(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _marked(site)
    staged, why = staging.load(site, b"checkpoint-bytes-2")
    assert staged is None and "another checkpoint" in why
    assert staging.load(site, BASE)[0] is not None


def test_a_data_file_cut_short_is_refused(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _marked(site)
    data = staging.stage_dir(site) / staging.DATA
    with open(data, "r+b") as f:
        f.truncate(4095)
    staged, why = staging.load(site, BASE)
    assert staged is None and "short (4095 of 4096 bytes)" in why


def test_a_damaged_database_is_refused_not_raised(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _marked(site)
    db = staging.stage_dir(site) / staging.OPS
    db.write_bytes(b"not a database" * 100)
    staged, why = staging.load(site, BASE)
    assert staged is None and "unreadable" in why


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE ops SET kind = 'resize' WHERE kind = 'zero'",
        "UPDATE ops SET pos = NULL WHERE kind = 'write'",
        "UPDATE ops SET length = -1 WHERE kind = 'zero'",
        'INSERT INTO ops (kind, volume_id, "offset", length, record) '
        "VALUES ('volume_change', 'v0', 0, 0, X'00')",
    ],
)
def test_an_op_it_cannot_be_sure_of_is_refused(tmp_path: Path, sql: str) -> None:
    site = _site(tmp_path)
    _marked(site)
    with sqlite3.connect(staging.stage_dir(site) / staging.OPS) as db:
        db.execute(sql)
    staged, why = staging.load(site, BASE)
    assert staged is None and why.startswith("the stage holds"), why


def test_a_new_stage_and_discard_remove_the_old_one(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _marked(site)
    stage = staging.Stage(site, BASE)  # a new pause starts over
    assert staging.load(site, BASE) == (None, "the stage was never marked")
    stage.close()
    assert staging.discard(site) and not staging.discard(site)
    assert staging.load(site, BASE) == (None, "the site has no stage")


def test_naming_a_sites_volumes_for_serving_reads_no_image(tmp_path: Path, monkeypatch) -> None:
    """The failover names its exports before serving: a digest there read every allocated
    byte of every image first (0.24 s per GiB; minutes for a full large volume)."""
    from connectors.image.image import Image
    from pipeline.backup.images import ImageSet

    with ImageSet(tmp_path / "site") as images:
        images.apply(change(VolumeOp.CREATE, "v0", 1, SIZE))
        images.apply(op(OpKind.WRITE, "v0", 2, 0, 4, b"data"))

        def no_reading(self: Image) -> str:
            raise AssertionError("read the whole image")

        monkeypatch.setattr(Image, "content_digest", no_reading)
        assert images.volumes(digests=False) == [
            {"volume_id": "v0", "name": "v0", "size": SIZE, "digest": ""}
        ]
        with pytest.raises(AssertionError, match="read the whole image"):
            images.volumes()


def test_folding_in_the_background_gives_the_same_backlog_and_hands_on_errors(
    tmp_path: Path,
) -> None:
    site = _site(tmp_path)
    _marked(site)
    staged, _why, backlog = staging.FoldInBackground(site, BASE, Backlog).start().result()
    assert staged is not None and backlog is not None
    assert staged.w == 2 and backlog.bytes_left == 4096 + 512
    backlog.close()
    assert staging.FoldInBackground(site, b"other", Backlog).start().result()[:2] == (
        None,
        "the stage starts from another checkpoint than the site's",
    )

    def broken() -> Backlog:
        raise OSError("no space for a spill file")

    with pytest.raises(OSError, match="no space"):
        staging.FoldInBackground(site, BASE, broken).start().result()
