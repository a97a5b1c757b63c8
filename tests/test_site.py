"""SiteDir, the one owner of a site directory's layout: tries to break it.

A missing or damaged catalog, a catalog naming an image that is gone, someone else's
``volumes.json``, foreign files in ``images/``, volume ids that would reach outside the
directory, snapshots half written; round trips through ImageSet, the snapshot store and a
restore copy; and a directory laid out by hand the way every earlier version did still
opens. No Kafka.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from connectors.image.image import Image
from pipeline.backup import snapshots as snapshot_store
from pipeline.backup.images import ImageSet
from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.errors import ApplyError, ConfigError, VolumeError
from pipeline.site import SiteDir, check_volume_id
from schemas import codec
from schemas.records import Checkpoint, VolumeChange, VolumeOp

SIZE = 1 << 16


def _old_layout(root: Path, volumes: dict[str, bytes]) -> None:
    """A site directory written by hand exactly as the code before SiteDir wrote it."""
    (root / "images").mkdir(parents=True)
    catalog = []
    for vid, data in volumes.items():
        (root / "images" / f"{vid}.img").write_bytes(data)
        catalog.append({"volume_id": vid, "name": vid, "size": len(data), "metadata": {}})
    (root / "volumes.json").write_bytes(orjson.dumps({"volumes": catalog}))


def _create(vid: str, size: int = SIZE, ts: int = 1) -> ApplyOp:
    rec = VolumeChange(VolumeOp.CREATE, vid, vid, size, {}, ts, "i", 0)
    return ApplyOp(OpKind.VOLUME_CHANGE, vid, ts, 0, 0, None, rec, "i", 0)


def _write(vid: str, offset: int, data: bytes, ts: int = 2) -> ApplyOp:
    return ApplyOp(OpKind.WRITE, vid, ts, offset, len(data), data, None, "i", 0)


def _checkpoint(w: int) -> bytes:
    return codec.encode(Checkpoint("dr", "cg", w, {}, (), 1))


# ---------------------------------------------------------------- the layout


def test_paths_are_the_layout_of_today(tmp_path: Path) -> None:
    site = SiteDir(tmp_path)
    assert site.image_path("vol1") == tmp_path / "images" / "vol1.img"
    assert site.deleted_path("vol1") == tmp_path / "images" / "vol1.deleted"
    assert site.catalog_path == tmp_path / "volumes.json"
    assert site.checkpoint_path == tmp_path / "checkpoint.avro"
    assert site.state_dir == tmp_path / "state"
    assert site.restore_manifest_path == tmp_path / "restore.json"
    assert site.snapshot(42).root == tmp_path / "snapshots" / f"{42:020d}"
    assert (
        site.snapshot(42).image_path("v")
        == tmp_path / "snapshots" / f"{42:020d}" / "images" / "v.img"
    )


@pytest.mark.parametrize(
    "bad", ["../x", "..", ".", "a/b", "/etc/passwd", "", ".hidden", "x\x00y", "a" * 129, 7, None]
)
def test_a_volume_id_with_path_characters_is_refused(tmp_path: Path, bad: object) -> None:
    site = SiteDir(tmp_path)
    with pytest.raises(VolumeError, match="invalid"):
        check_volume_id(bad)
    if isinstance(bad, str):
        with pytest.raises(VolumeError):
            site.image_path(bad)
        with pytest.raises(VolumeError):
            site.deleted_path(bad)


def test_a_catalog_naming_a_path_like_id_is_refused(tmp_path: Path) -> None:
    SiteDir(tmp_path).create()
    entry = {"volume_id": "../../outside", "name": "x", "size": SIZE}
    (tmp_path / "volumes.json").write_bytes(orjson.dumps({"volumes": [entry]}))
    with pytest.raises(ConfigError, match="not a lowmark volume catalog"):
        SiteDir(tmp_path).read_catalog()
    with pytest.raises(ConfigError):
        ImageSet(tmp_path)
    with pytest.raises(ConfigError):
        SiteDir(tmp_path).write_catalog([entry])


def test_a_volume_change_with_a_path_like_id_never_touches_the_filesystem(tmp_path: Path) -> None:
    with ImageSet(tmp_path / "site") as images, pytest.raises(ApplyError, match="invalid"):
        images.apply(_create("../escaped"))
    assert not (tmp_path / "escaped.img").exists()
    assert not (tmp_path / "site" / "escaped.img").exists()


# ---------------------------------------------------------------- the catalog


def test_a_missing_catalog_is_a_new_empty_site(tmp_path: Path) -> None:
    site = SiteDir(tmp_path / "new")
    assert site.read_catalog() == []
    assert not site.is_site()
    site.create()
    assert site.is_site() and site.read_catalog() == []
    with pytest.raises(FileNotFoundError):
        site.read_catalog(missing_ok=False)  # a snapshot pruned while read: not "empty"


def test_a_missing_catalog_does_not_adopt_images_on_disk(tmp_path: Path) -> None:
    # a crash between creating the first image and saving the catalog leaves this
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "orphan.img").write_bytes(b"x" * 512)
    with ImageSet(tmp_path) as images:
        assert images.images == {} and images.catalog == {}
    assert SiteDir(tmp_path).strays() == [tmp_path / "images" / "orphan.img"]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "not a lowmark volume catalog"),
        (b'{"vols": []}', "not a lowmark volume catalog"),
        (b'{"volumes": {"a": 1}}', "not a lowmark volume catalog"),
        (b'{"volumes": ["a"]}', "entry 0 is not an object"),
        (b'{"volumes": [{"volume_id": "a", "size": 512}]}', "has no name"),
        (b'{"volumes": [{"volume_id": "a", "name": "a", "size": "512"}]}', "size"),
        (b'{"volumes": [{"volume_id": "a", "name": "a", "size": -1}]}', "size"),
        (b'{"volumes": [{"volume_id": "a", "name": "a", "size": true}]}', "size"),
        (b'{"volumes": [{"volume_id": "a", "name": "a", "size": 1, "mode": "x"}]}', "mode"),
        (b'{"volumes": [{"volume_id": "a", "name": "a", "size": 1, "metadata": [1]}]}', "metadata"),
        (
            b'{"volumes": [{"volume_id": "a", "name": "a", "size": 1},'
            b' {"volume_id": "a", "name": "b", "size": 1}]}',
            "listed twice",
        ),
    ],
)
def test_a_corrupt_or_foreign_catalog_is_a_config_error(
    tmp_path: Path, body: bytes, match: str
) -> None:
    SiteDir(tmp_path).create()
    (tmp_path / "images" / "a.img").write_bytes(b"\0" * 512)
    (tmp_path / "volumes.json").write_bytes(body)
    with pytest.raises(ConfigError, match=match) as info:
        SiteDir(tmp_path).read_catalog()
    assert str(tmp_path / "volumes.json") in str(info.value)  # names the file
    with pytest.raises(ConfigError):
        ImageSet(tmp_path)


def test_a_catalog_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "volumes.json").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        SiteDir(tmp_path).read_catalog()


def test_a_catalog_naming_a_missing_image_is_a_volume_error(tmp_path: Path) -> None:
    _old_layout(tmp_path, {"a": b"1" * 512, "b": b"2" * 512})
    (tmp_path / "images" / "b.img").unlink()
    with pytest.raises(VolumeError, match=r"names volume 'b'.*missing.*restore"):
        SiteDir(tmp_path).read_catalog()
    with pytest.raises(VolumeError, match="missing"):
        ImageSet(tmp_path)
    # the check can be waived by whoever copies a snapshot (the copy itself then fails)
    assert [e["volume_id"] for e in SiteDir(tmp_path).read_catalog(require_images=False)] == [
        "a",
        "b",
    ]


def test_a_site_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        SiteDir(tmp_path / "f").create()


def test_catalog_round_trip_keeps_every_field(tmp_path: Path) -> None:
    site = SiteDir(tmp_path).create()
    entries = [
        {"volume_id": "db", "name": "db", "size": 4096, "mode": "sync", "metadata": {"k": "v"}},
        {"volume_id": "logs.1", "name": "logs.1", "size": 512, "metadata": {}},
        {"volume_id": "raw", "name": "raw", "size": 0, "mode": "async", "metadata": None},
    ]
    for e in entries:
        site.image_path(str(e["volume_id"])).write_bytes(b"")
    site.write_catalog(entries)
    assert site.read_catalog() == entries
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind


# ---------------------------------------------------------------- foreign files


def test_foreign_files_in_images_are_never_volumes(tmp_path: Path) -> None:
    _old_layout(tmp_path, {"a": b"a" * 512})
    img = tmp_path / "images"
    (img / "notes.txt").write_text("operator notes")
    (img / "evil.img").write_bytes(b"e" * 512)  # looks like an image, not in the catalog
    (img / "dir.img").mkdir()
    (img / "a.deleted").write_bytes(b"old")  # a backup's deleted copy: expected, not stray
    site = SiteDir(tmp_path)
    assert [e["volume_id"] for e in site.read_catalog()] == ["a"]
    assert site.strays() == [img / "dir.img", img / "evil.img", img / "notes.txt"]
    assert set(site.image_files()) == {"a", "evil"}  # what is on disk (verify reports it)
    with ImageSet(tmp_path) as images:
        assert set(images.images) == {"a"}
    # nor do they travel: a copy of the site holds the catalogued volumes only
    snapshot_store.copy_site(tmp_path, tmp_path.parent / "copy")
    copy = SiteDir(tmp_path.parent / "copy")
    assert sorted(p.name for p in copy.images_dir.iterdir()) == ["a.img"]
    assert copy.image_path("a").read_bytes() == b"a" * 512


# ---------------------------------------------------------------- round trips


def test_imageset_round_trip_create_write_delete(tmp_path: Path) -> None:
    with ImageSet(tmp_path, keep_deleted=True) as images:
        images.apply(_create("v1"))
        images.apply(_create("v2"))
        images.apply(_write("v1", 100, b"hello"))
        delete = VolumeChange(VolumeOp.DELETE, "v2", "v2", 0, {}, 3, "i", 0)
        images.apply(ApplyOp(OpKind.VOLUME_CHANGE, "v2", 3, 0, 0, None, delete, "i", 0))
    site = SiteDir(tmp_path)
    assert [e["volume_id"] for e in site.read_catalog()] == ["v1"]
    assert site.deleted_path("v2").exists() and not site.image_path("v2").exists()
    with ImageSet(tmp_path) as again:
        assert again.images["v1"].pread(100, 5) == b"hello"
        assert again.images["v1"].size == SIZE


def test_snapshot_round_trip_and_restore_copy(tmp_path: Path) -> None:
    data = tmp_path / "site"
    with ImageSet(data) as images:
        images.apply(_create("v1"))
        images.apply(_write("v1", 0, b"snap"))
        images.sync()
        path = snapshot_store.save(data, _checkpoint(7), images.images, images.catalog)
    site = SiteDir(data)
    assert path == site.snapshot(7).root
    assert [w for w, _ in site.snapshots()] == [7]
    assert snapshot_store.list_snapshots(data) == [(7, path)]
    snap = site.snapshot(7)
    assert [e["volume_id"] for e in snap.read_catalog()] == ["v1"]
    assert snap.image_path("v1").read_bytes()[:4] == b"snap"
    found = snapshot_store.newest_at_or_below(data, 100)
    assert found is not None and found[0].w == 7 and found[1] == path
    assert snapshot_store.newest_at_or_below(data, 6) is None
    snapshot_store.copy_site(path, tmp_path / "restored")
    with ImageSet(tmp_path / "restored") as restored:
        assert restored.images["v1"].pread(0, 4) == b"snap"


def test_half_written_and_foreign_snapshot_entries_are_not_snapshots(tmp_path: Path) -> None:
    site = SiteDir(tmp_path)
    site.snapshots_dir.mkdir(parents=True)
    (site.snapshots_dir / f"{5:020d}.partial").mkdir()  # a save that crashed
    (site.snapshots_dir / f"{5:020d}.partial" / "checkpoint.avro").write_bytes(_checkpoint(5))
    (site.snapshots_dir / f"{6:020d}").mkdir()  # no checkpoint: incomplete
    (site.snapshots_dir / "latest").mkdir()
    (site.snapshots_dir / "latest" / "checkpoint.avro").write_bytes(_checkpoint(9))
    assert site.snapshots() == []


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    data = tmp_path / "site"
    with ImageSet(data) as images:
        images.apply(_create("v"))
        for w in (3, 1, 2, 10):
            snapshot_store.save(data, _checkpoint(w), images.images, images.catalog)
    snapshot_store.prune(data, 2)
    assert [w for w, _ in SiteDir(data).snapshots()] == [3, 10]


def test_copy_of_a_snapshot_pruned_meanwhile_raises_file_not_found(tmp_path: Path) -> None:
    # restore retries on FileNotFoundError; an "empty" copy would be a wrong base
    SiteDir(tmp_path / "gone")  # never created
    with pytest.raises(FileNotFoundError):
        snapshot_store.copy_site(tmp_path / "gone", tmp_path / "to")
    _old_layout(tmp_path / "half", {"a": b"a" * 512})
    (tmp_path / "half" / "images" / "a.img").unlink()
    with pytest.raises(FileNotFoundError):
        snapshot_store.copy_site(tmp_path / "half", tmp_path / "to2")


# ---------------------------------------------------------------- today's site dirs


def test_an_existing_site_dir_of_todays_layout_still_opens(tmp_path: Path) -> None:
    _old_layout(tmp_path, {"vol1": b"\x01" * 1024, "vol-2.b": b"\x02" * 2048})
    (tmp_path / "checkpoint.avro").write_bytes(_checkpoint(4))
    snap = tmp_path / "snapshots" / f"{4:020d}"
    _old_layout(snap, {"vol1": b"\x01" * 1024})
    (snap / "checkpoint.avro").write_bytes(_checkpoint(4))
    site = SiteDir(tmp_path)
    assert site.is_site()
    assert [e["volume_id"] for e in site.read_catalog()] == ["vol1", "vol-2.b"]
    assert [(w, s.root) for w, s in site.snapshots()] == [(4, snap)]
    assert site.checkpoint_path.read_bytes() == _checkpoint(4)
    with ImageSet(tmp_path) as images:
        assert images.images["vol-2.b"].pread(0, 2) == b"\x02\x02"
        assert images.volumes()[0]["size"] == 2048


def test_a_primary_catalog_with_modes_opens_as_a_site(tmp_path: Path) -> None:
    # what ConsistencyGroup wrote (VolumeInfo.__dict__): mode and metadata, maybe None
    site = SiteDir(tmp_path).create()
    Image(site.image_path("db"), create_size=4096).close()
    entry = {"volume_id": "db", "name": "db", "size": 4096, "mode": "sync", "metadata": None}
    (tmp_path / "volumes.json").write_bytes(
        orjson.dumps({"volumes": [entry]}, option=orjson.OPT_INDENT_2)
    )
    assert site.read_catalog() == [entry]
    with ImageSet(tmp_path) as images:
        assert images.images["db"].size == 4096
    assert os.path.getsize(site.image_path("db")) == 4096
