"""Point-in-time copies of an image while writes continue (``pipeline.primary.pit_copy``).

Tries to break: a write racing the background copier into a chunk not yet copied (the
copy would hold the new bytes, not the ones at begin), writes straddling chunk boundaries,
the short last chunk, length-0 writes and writes over the whole image, hole punches and
zero writes, holes at begin that the copy fills (it must stay sparse), a failed save that
marks its chunk copied anyway, the real FICLONE, and abort / finish / progress at the
edges. Each racing run is seeded; a copy without before_write must differ, so the
comparison is not vacuous.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.image.image import Image, data_extents
from pipeline.errors import VolumeError
from pipeline.primary import pit_copy
from pipeline.primary.pit_copy import PitCopy

K64 = 64 << 10
REAL_TRY_REFLINK = pit_copy._try_reflink
INVERT = bytes(255 - b for b in range(256))  # bytes.translate table: every byte changes


@pytest.fixture(autouse=True)
def no_reflink(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise copy-before-write even where tmp is btrfs or xfs (here it is ext4)."""
    monkeypatch.setattr(pit_copy, "_try_reflink", lambda target_fd, source_fd: False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def grid_blocks(extents: list[tuple[int, int]]) -> set[int]:
    """The 64 KiB grid blocks the extents touch."""
    return {b for off, n in extents for b in range(off // K64, (off + n - 1) // K64 + 1)}


def make_image(path: Path, rng: random.Random, size: int, extents: int = 8) -> Image:
    """A sparse image: random data extents, a few of them allocated zeroes, holes between."""
    img = Image(path, create_size=size)
    for _ in range(extents):
        off = rng.randrange(size)
        n = rng.randint(1, min(size - off, 600_000))
        img.pwrite(off, rng.randbytes(n) if rng.random() < 0.8 else bytes(n))
    if rng.random() < 0.5:  # data up to the last byte, in the short last chunk
        n = rng.randint(1, 200_000)
        img.pwrite(size - n, rng.randbytes(n))
    return img


def begin(img: Image, tmp_path: Path, chunk: int) -> tuple[PitCopy, threading.Lock, bytes]:
    lock = threading.Lock()
    with lock:
        before = img.pread(0, img.size)
        copy = PitCopy(img.fd, img.size, tmp_path / "copy.img", lock, chunk=chunk)
    return copy, lock, before


def write(img: Image, copy: PitCopy | None, lock: threading.Lock, off: int, data: bytes) -> None:
    with lock:
        if copy is not None:
            copy.before_write(off, len(data))
        img.pwrite(off, data)


def copy_all(copy: PitCopy) -> None:
    while not copy.copy_step(3):
        pass
    copy.finish()


def random_range(rng: random.Random, size: int, chunk: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.01:
        return 0, size  # the whole image
    if r < 0.1:
        return rng.randrange(size + 1), 0
    if r < 0.35:  # straddles one chunk boundary, or several
        edge = rng.randrange(1, -(-size // chunk)) * chunk
        off = edge - rng.randint(1, min(edge, 2 * chunk))
        return off, min(size - off, edge - off + rng.randint(1, 2 * chunk))
    if r < 0.45:  # inside the last (short) chunk, to the end
        last = (size - 1) // chunk * chunk
        off = rng.randrange(last, size)
        return off, size - off
    off = rng.randrange(size)
    return off, rng.randint(1, min(size - off, 2 * chunk))


def writer(img: Image, copy: PitCopy, lock: threading.Lock, seed: int, ops: int) -> None:
    rng = random.Random(seed)
    for _ in range(ops):
        off, n = random_range(rng, img.size, copy.chunk)
        kind = rng.random()
        data = rng.randbytes(n) if kind < 0.5 else bytes(n)
        with lock:
            copy.before_write(off, n)
            if kind < 0.5 or kind >= 0.85:
                img.pwrite(off, data)  # random bytes, or zeroes written as bytes
            else:
                img.zero(off, n, punch=kind < 0.7)
        time.sleep(0)  # let the copier in between writes, as a real workload's gaps do


class Race:
    """Begin a copy of a random image, then writers and the copier race. The first write
    lands in data at begin before the copier starts, so a copy-before-write is certain."""

    def __init__(self, tmp_path: Path, seed: int, *, bypass_first: bool = False) -> None:
        rng = random.Random(seed)
        chunk = rng.choice([K64, 48 << 10, 100_000, 1 << 17])
        self.img = make_image(tmp_path / "image.img", rng, rng.randint(2 << 20, 4 << 20))
        self.extents = self.img.data_extents()
        self.copy, lock, self.before = begin(self.img, tmp_path, chunk)
        off, n = rng.choice(self.extents)
        first = self.before[off : off + min(n, K64)].translate(INVERT)
        write(self.img, None if bypass_first else self.copy, lock, off, first)
        steps = rng.choice([1, 2, 8])
        threads = [threading.Thread(target=self._copier, args=(steps,))]
        threads += [
            threading.Thread(target=writer, args=(self.img, self.copy, lock, seed * 100 + t, 25))
            for t in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.copy.finish()
        self.after = self.img.pread(0, self.img.size)
        self.img.close()
        self.target = tmp_path / "copy.img"

    def _copier(self, steps: int) -> None:
        while not self.copy.copy_step(steps):
            pass


@pytest.mark.parametrize("seed", range(50))
def test_racing_writes_leave_the_copy_as_the_image_was_at_begin(tmp_path: Path, seed: int) -> None:
    race = Race(tmp_path, seed)
    copy = race.copy
    assert copy.done and copy.copied_bytes == copy.total_bytes > 0
    assert copy.cow_chunks >= 1
    assert race.after != race.before  # the writers did change it
    assert os.path.getsize(race.target) == len(race.before)
    assert sha(race.target.read_bytes()) == sha(race.before)
    # sparse: the copy holds data only in 64 KiB blocks that held data at begin
    fd = os.open(race.target, os.O_RDONLY)
    try:
        copied = data_extents(fd, len(race.before))
    finally:
        os.close(fd)
    assert grid_blocks(copied) <= grid_blocks(race.extents)


@pytest.mark.parametrize("seed", range(10))
def test_a_write_that_skips_before_write_breaks_the_copy(tmp_path: Path, seed: int) -> None:
    """The mutation: the same race with one write not saved first. The copy must differ,
    or the test above would pass whatever before_write did."""
    race = Race(tmp_path, seed, bypass_first=True)
    assert race.copy.done
    assert sha(race.target.read_bytes()) != sha(race.before)


# ---- the edges, one at a time ---------------------------------------------------------------


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Image]:
    """An image all data, 5 chunks of 64 KiB and a short sixth of 777 bytes."""
    img = Image(tmp_path / "image.img", create_size=5 * K64 + 777)
    img.pwrite(0, random.Random(7).randbytes(img.size))
    yield img
    img.close()


def test_a_write_straddling_a_chunk_boundary_saves_both_chunks(full: Image, tmp_path: Path) -> None:
    copy, lock, before = begin(full, tmp_path, K64)
    write(full, copy, lock, 2 * K64 - 10, b"\xab" * 20)
    assert copy.cow_chunks == 2 and copy.copied_bytes == 2 * K64
    write(full, copy, lock, 2 * K64 - 5, b"\xcd" * 10)  # both saved already: nothing more
    assert copy.cow_chunks == 2
    copy_all(copy)
    assert (tmp_path / "copy.img").read_bytes() == before


def test_the_short_last_chunk(full: Image, tmp_path: Path) -> None:
    copy, lock, before = begin(full, tmp_path, K64)
    assert copy.total_bytes == full.size
    write(full, copy, lock, full.size - 1, b"\x00")
    assert copy.copied_bytes == 777
    copy_all(copy)
    assert copy.copied_bytes == copy.total_bytes
    assert (tmp_path / "copy.img").read_bytes() == before


def test_a_length_zero_write_copies_nothing(full: Image, tmp_path: Path) -> None:
    copy, lock, _ = begin(full, tmp_path, K64)
    with lock:
        for off in (0, K64, full.size - 1, full.size):
            copy.before_write(off, 0)
    assert copy.copied_bytes == 0 and copy.cow_chunks == 0
    with lock, pytest.raises(VolumeError, match="outside the image"):
        copy.before_write(full.size - 1, 2)
    with lock, pytest.raises(VolumeError, match="outside the image"):
        copy.before_write(-1, 1)


def test_a_write_over_the_whole_image_completes_the_copy(full: Image, tmp_path: Path) -> None:
    copy, lock, before = begin(full, tmp_path, K64)
    write(full, copy, lock, 0, bytes(full.size))
    assert copy.done and copy.cow_chunks == 6 and copy.copied_bytes == copy.total_bytes
    assert copy.copy_step()
    copy.finish()
    copy.finish()  # idempotent
    assert (tmp_path / "copy.img").read_bytes() == before


def test_holes_at_begin_stay_holes(tmp_path: Path) -> None:
    """A mostly-hole image: the copy allocates what the image did, however the writers
    fill the holes and zero the data, and allocated zeroes at begin are not copied."""
    size = 8 << 20
    img = Image(tmp_path / "image.img", create_size=size)
    img.pwrite(3 * K64, random.Random(1).randbytes(2 * K64))
    img.pwrite(50 * K64 + 100, random.Random(2).randbytes(1000))
    img.pwrite(90 * K64, bytes(4 * K64))  # allocated, all zero
    copy, lock, before = begin(img, tmp_path, 1 << 20)
    assert copy.total_bytes == 3 << 20  # data in chunks 0, 3 and 5 (allocated zeroes)
    write(img, copy, lock, 6 << 20, b"\xff" * (2 << 20))  # into holes: nothing to save
    assert copy.cow_chunks == 0
    with lock:
        copy.before_write(0, size)
        img.zero(0, size, punch=True)
    assert copy.cow_chunks == 3 and copy.done
    copy.finish()
    target = tmp_path / "copy.img"
    assert target.read_bytes() == before
    assert os.stat(target).st_blocks * 512 <= 3 * K64 + 4096  # 2 runs of data, 1 holding 1000 bytes
    img.close()


def test_a_failed_save_leaves_the_chunk_to_copy(
    full: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy, lock, before = begin(full, tmp_path, K64)
    real_pwrite, full_disk = copy._pwrite, [True]

    def pwrite(view: memoryview, offset: int) -> None:
        if full_disk:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_pwrite(view, offset)

    monkeypatch.setattr(copy, "_pwrite", pwrite)
    with lock, pytest.raises(VolumeError, match="disk is full: free space"):
        copy.before_write(K64, 1)
    assert copy.copied_bytes == 0 and not copy.done
    full_disk.clear()
    write(full, copy, lock, K64, b"x")  # space freed: the retry saves it
    copy_all(copy)
    assert (tmp_path / "copy.img").read_bytes() == before


def test_a_target_that_cannot_be_created(full: Image, tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="does not exist: create it"):
        PitCopy(full.fd, full.size, tmp_path / "no" / "copy.img", threading.Lock())


def test_abort_removes_the_target_and_stops_everything(full: Image, tmp_path: Path) -> None:
    copy, lock, _ = begin(full, tmp_path, K64)
    write(full, copy, lock, 0, b"x")
    assert not copy.copy_step(1)
    copy.abort()
    assert not (tmp_path / "copy.img").exists()
    write(full, copy, lock, 4 * K64, b"y")  # before_write after abort: nothing, no error
    assert copy.copy_step() and not copy.done
    assert not copy.run(threading.Event())
    with pytest.raises(VolumeError, match="not complete"):
        copy.finish()
    copy.abort()  # idempotent


def test_abort_after_finish_deletes_the_copy(full: Image, tmp_path: Path) -> None:
    copy, _, _ = begin(full, tmp_path, K64)
    assert copy.run(threading.Event())
    copy.abort()
    assert not (tmp_path / "copy.img").exists()


def test_run_stops_when_told(full: Image, tmp_path: Path) -> None:
    copy, _, _ = begin(full, tmp_path, K64)
    stop = threading.Event()
    stop.set()
    assert not copy.run(stop) and not copy.done and copy.copied_bytes == 0
    with pytest.raises(VolumeError, match="not complete"):
        copy.finish()
    copy.abort()


def test_run_at_a_rate(full: Image, tmp_path: Path) -> None:
    copy, _, before = begin(full, tmp_path, K64)
    with pytest.raises(VolumeError, match="positive"):
        copy.run(threading.Event(), rate_bytes_s=0)
    started = time.monotonic()
    # 2 MiB/s: steps of 3 chunks, a wait of 3 * 64 KiB / 2 MiB/s after the first
    assert copy.run(threading.Event(), rate_bytes_s=2 << 20)
    assert 0.09 <= time.monotonic() - started < 2
    assert copy.copied_bytes == copy.total_bytes == full.size
    assert (tmp_path / "copy.img").read_bytes() == before


def test_a_reflink_completes_the_copy_at_once(
    full: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where FICLONE works (btrfs, xfs), simulated here: nothing to copy, no write waits."""

    def clone(target_fd: int, source_fd: int) -> bool:
        os.pwrite(target_fd, os.pread(source_fd, full.size, 0), 0)
        return True

    monkeypatch.setattr(pit_copy, "_try_reflink", clone)
    copy, lock, before = begin(full, tmp_path, K64)
    assert copy.reflinked and copy.done and copy.copied_bytes == copy.total_bytes
    write(full, copy, lock, 0, bytes(full.size))
    assert copy.cow_chunks == 0 and copy.copy_step()
    copy.finish()
    assert (tmp_path / "copy.img").read_bytes() == before


def test_the_real_reflink_attempt(
    full: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FICLONE as the filesystem under tmp answers it (ext4: refused, so the copy runs)."""
    monkeypatch.setattr(pit_copy, "_try_reflink", REAL_TRY_REFLINK)
    copy, lock, before = begin(full, tmp_path, K64)
    assert copy.done == copy.reflinked
    write(full, copy, lock, K64, b"z" * K64)
    copy_all(copy)
    assert (tmp_path / "copy.img").read_bytes() == before
