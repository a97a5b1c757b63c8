"""The fsync-loss shim itself: it must lose exactly what a power cut may lose.

Tries to break: unsynced data that survives, synced data that is lost, a rename or create
without a directory fsync that survives (or one with it that is lost), an unlink that
cannot come back, a tear that is all or nothing, a crash point that lets the op through or
lets the dead life write on, a seed that does not replay the same loss.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from connectors.image.image import Image
from pipeline.fsutil import atomic_write, fsync_path
from tests.fsloss.shim import SECTOR, FsLoss


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_unsynced_writes_are_lost_synced_ones_kept(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with FsLoss(root, seed=1) as fs:
        write_file(root / "a", b"A" * 4096, sync=True)
        fsync_path(root)
        write_file(root / "a", b"B" * 1000, sync=False)  # overwrites part, never synced
        write_file(root / "b", b"C" * 10, sync=True)  # synced data, name never synced
        assert (root / "a").read_bytes()[:1000] == b"B" * 1000  # the page cache has it
        report = fs.crash()
    assert (root / "a").read_bytes() == b"A" * 4096
    assert not (root / "b").exists(), "a create without a directory fsync survived"
    assert report.dropped == 1 and report.names_undone == 1


def test_extending_write_and_truncate_roll_back(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with FsLoss(root, seed=2) as fs:
        write_file(root / "a", b"x" * 100, sync=True)
        fsync_path(root)
        fd = os.open(root / "a", os.O_RDWR)
        os.pwrite(fd, b"y" * 50, 80)  # extends to 130
        os.ftruncate(fd, 20)
        os.ftruncate(fd, 5000)
        os.close(fd)
        fs.crash()
    assert (root / "a").read_bytes() == b"x" * 100


def test_atomic_write_survives_a_rename_without_dir_fsync_does_not(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with FsLoss(root, seed=3) as fs:
        atomic_write(root / "ckpt", b"one")
        atomic_write(root / "ckpt", b"two")
        fs.crash()
        assert (root / "ckpt").read_bytes() == b"two"
        # the same steps without the final directory fsync
        tmp = root / "ckpt.tmp"
        write_file(tmp, b"three", sync=True)
        os.replace(tmp, root / "ckpt")
        assert (root / "ckpt").read_bytes() == b"three"
        report = fs.crash()
    assert (root / "ckpt").read_bytes() == b"two", "a rename without dir fsync survived"
    assert not tmp.exists()  # its create was covered by no directory fsync either
    assert report.names_undone == 2


def test_unlink_without_dir_fsync_comes_back(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with FsLoss(root, seed=4) as fs:
        atomic_write(root / "f", b"keep")
        os.unlink(root / "f")
        assert not (root / "f").exists()
        fs.crash()
        assert (root / "f").read_bytes() == b"keep"
        os.unlink(root / "f")
        fsync_path(root)
        fs.crash()
    assert not (root / "f").exists()


def test_keep_share_keeps_some_and_a_tear_lands_some_sectors(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    new = bytes(range(256)) * 32  # 8 KiB = 16 sectors, each distinct from zero
    with FsLoss(root, seed=5, keep_share=1.0, tear=True) as fs:
        write_file(root / "a", bytes(len(new)), sync=True)
        fsync_path(root)
        write_file(root / "a", new, sync=False)
        report = fs.crash()
    got = (root / "a").read_bytes()
    assert report.torn == 1
    landed = [got[s : s + SECTOR] == new[s : s + SECTOR] for s in range(0, len(new), SECTOR)]
    untouched = [got[s : s + SECTOR] == bytes(SECTOR) for s in range(0, len(new), SECTOR)]
    assert all(a or b for a, b in zip(landed, untouched, strict=True)), "a sector tore inside"
    assert any(landed) and any(untouched), "the tear was all or nothing"


def test_same_seed_same_loss(tmp_path):
    def run(root: Path) -> bytes:
        root.mkdir()
        with FsLoss(root, seed=77, keep_share=0.5, tear=True) as fs:
            write_file(root / "a", bytes(64 << 10), sync=True)
            fsync_path(root)
            fd = os.open(root / "a", os.O_RDWR)
            for i in range(40):
                os.pwrite(fd, bytes([i + 1]) * 1536, (i * 1531) % (60 << 10))
            os.close(fd)
            fs.crash()
        return (root / "a").read_bytes()

    a, b = run(tmp_path / "x"), run(tmp_path / "y")
    assert a == b
    assert a != bytes(64 << 10), "keep_share 0.5 kept nothing: the test proves nothing"


def test_crash_point_refuses_the_op_and_the_dead_life(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with FsLoss(root, seed=6, crash_at=3) as fs:
        fd = os.open(root / "a", os.O_RDWR | os.O_CREAT, 0o644)  # op 1
        os.pwrite(fd, b"1", 0)  # op 2
        with pytest.raises(OSError) as exc:
            os.fsync(fd)  # op 3: the power cut, the fsync never happened
        assert exc.value.errno == errno.EIO and fs.cut.is_set()
        with pytest.raises(OSError):
            os.pwrite(fd, b"2", 0)  # the dead life writes nothing
        fs.crash()
        with pytest.raises(OSError):
            os.pwrite(fd, b"3", 0)  # nor after the restart
        os.close(fd)
        assert not (root / "a").exists()
        write_file(root / "b", b"ok", sync=True)  # the next life works
        fsync_path(root)
        fs.crash()
    assert (root / "b").read_bytes() == b"ok"


def test_image_zero_is_journalled(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with FsLoss(root, seed=8) as fs:
        img = Image(root / "v.img", create_size=1 << 20)
        img.pwrite(0, b"z" * 8192)
        img.sync()
        fsync_path(root)
        img.zero(0, 8192, punch=True)
        assert img.pread(0, 8192) == bytes(8192)
        img.close()
        fs.crash()
    assert (root / "v.img").read_bytes()[:8192] == b"z" * 8192


def test_paths_outside_root_are_not_touched(tmp_path):
    root, other = tmp_path / "d", tmp_path / "o"
    root.mkdir()
    other.mkdir()
    with FsLoss(root, seed=9) as fs:
        write_file(other / "a", b"outside", sync=False)
        fs.crash()
    assert (other / "a").read_bytes() == b"outside"
