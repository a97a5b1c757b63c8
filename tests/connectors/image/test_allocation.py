"""The SEEK_DATA / SEEK_HOLE walk (connectors/image/allocation.py), exhaustively against a
model file system, then once against the real one.

Tries to break: a run that calls data a hole (the one lie that loses data: a copy tool
skips it) or a hole data, a run past the range or of length zero, two neighbours with the
same state, a limit that is exceeded or that truncates a run instead of stopping after
whole ones, a range past the end of the file, a file system that cannot tell
(EINVAL: all data) or fails (EIO: raised, not guessed).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
from pathlib import Path

import pytest

from connectors.image.allocation import Allocation, allocation_runs, fd_allocation, with_data
from connectors.image.image import PUNCH_HOLE, fallocate

BLOCK = 2  # bytes per model block: small, so every offset inside a block is tried


def model_seek(blocks: tuple[bool, ...]):  # type: ignore[no-untyped-def]
    """lseek as Linux answers it for a file of ``blocks`` (True = data)."""
    size = len(blocks) * BLOCK

    def is_data(pos: int) -> bool:
        return pos < size and blocks[pos // BLOCK]

    def seek(pos: int, whence: int) -> int:
        if pos >= size:
            raise OSError(errno.ENXIO, "past the end")
        if whence == os.SEEK_DATA:
            for at in range(pos, size):
                if is_data(at):
                    return at
            raise OSError(errno.ENXIO, "no data after pos")
        assert whence == os.SEEK_HOLE
        for at in range(pos, size):
            if not is_data(at):
                return at
        return size  # the end of the file is a hole

    return seek, is_data


def check(blocks: tuple[bool, ...], offset: int, length: int, limit: int) -> None:
    seek, is_data = model_seek(blocks)
    runs = allocation_runs(seek, offset, length, limit)
    what = (blocks, offset, length, limit, runs)
    assert runs and len(runs) <= limit, what
    assert all(n > 0 for n, _ in runs), what
    assert all(a[1] != b[1] for a, b in itertools.pairwise(runs)), what
    total = sum(n for n, _ in runs)
    assert total <= length, what
    if len(runs) < limit:
        assert total == length, what
    pos = offset
    for n, hole in runs:
        for at in range(pos, pos + n):
            assert is_data(at) != hole, (*what, at)
        pos += n
    if limit > 1:
        # A limited walk stops after whole runs: the same runs as the full one.
        full = allocation_runs(seek, offset, length, 1 << 30)
        assert runs == full[: len(runs)], (what, full)


@pytest.mark.parametrize("nblocks", range(0, 6))
def test_every_file_range_and_limit(nblocks: int) -> None:
    checked = 0
    for blocks in itertools.product((False, True), repeat=nblocks):
        end = (nblocks + 1) * BLOCK  # one block past the end of the file too
        for offset in range(end):
            for length in range(1, end - offset + 1):
                for limit in (1, 2, 3, 1 << 30):
                    check(blocks, offset, length, limit)
                    checked += 1
    assert checked > 0


def test_a_file_system_that_cannot_tell_is_all_data() -> None:
    def seek(pos: int, whence: int) -> int:
        raise OSError(errno.EINVAL, "whence not supported")

    assert allocation_runs(seek, 10, 90, 5) == [(90, False)]


def test_a_failing_file_system_raises() -> None:
    def seek(pos: int, whence: int) -> int:
        raise OSError(errno.EIO, "disk gone")

    with pytest.raises(OSError) as caught:
        allocation_runs(seek, 0, 10, 5)
    assert caught.value.errno == errno.EIO


def test_a_seek_that_answers_backwards_never_loops_or_goes_back() -> None:
    answers = iter([3, 3])  # data at 3 (< pos 5 would be a bug); hole at 3 too

    def seek(pos: int, whence: int) -> int:
        return next(answers)

    assert allocation_runs(seek, 5, 10, 9) == [(10, False)]


def test_bad_arguments_raise() -> None:
    seek, _ = model_seek((True,))
    for offset, length, limit in ((0, 0, 1), (0, 2, 0)):
        with pytest.raises(ValueError):
            allocation_runs(seek, offset, length, limit)


def test_real_sparse_file(tmp_path: Path) -> None:
    """The same walk through os.lseek: what the model assumes, the kernel does."""
    chunk = 64 << 10
    pattern = [False, True, True, False, False, True, False, False]
    path = tmp_path / "sparse.img"
    with path.open("wb") as f:
        f.truncate(len(pattern) * chunk)
        for i, data in enumerate(pattern):
            if data:
                f.seek(i * chunk)
                f.write(b"\x01" * chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        runs = fd_allocation(fd, 0, len(pattern) * chunk + chunk, 100)
        tail = fd_allocation(fd, chunk + 100, chunk, 100)
    finally:
        os.close(fd)
    expect = [
        (chunk, True),
        (2 * chunk, False),
        (2 * chunk, True),
        (chunk, False),
        (3 * chunk, True),
    ]  # fmt: skip  (the last hole runs past the end of the file)
    assert runs == expect
    assert tail == [(chunk, False)]


# --- with_data: ranges a caller is about to write are data ------------------------------------


def test_with_data_every_layout_and_span() -> None:
    n = 5
    for blocks in itertools.product((False, True), repeat=n):
        seek, is_data = model_seek(blocks)
        runs = allocation_runs(seek, 0, n * BLOCK, 1 << 30)
        for s1, e1, s2, e2 in itertools.product(range(0, n * BLOCK + 2, 3), repeat=4):
            spans = [(s1, e1), (s2, e2)]  # overlapping, touching, empty and reversed ones too
            out = with_data(runs, 0, spans)
            assert sum(k for k, _ in out) == n * BLOCK
            assert all(k > 0 for k, _ in out)
            assert all(a[1] != b[1] for a, b in itertools.pairwise(out))
            pos = 0
            for k, hole in out:
                for at in range(pos, pos + k):
                    landing = any(s <= at < e for s, e in spans)
                    assert hole == (not is_data(at) and not landing), (blocks, spans, out, at)
                pos += k


def test_with_data_from_an_offset_and_without_spans() -> None:
    runs = [(4, True), (2, False), (4, True)]
    assert with_data(runs, 100, []) is runs
    assert with_data(runs, 100, [(0, 50), (200, 300)]) == runs
    assert with_data(runs, 100, [(98, 101), (108, 120)]) == [(1, False), (3, True), (2, False),
                                                            (2, True), (2, False)]  # fmt: skip


# --- Allocation: the walk with the longest data run remembered ---------------------------------


def test_remembered_runs_never_call_data_a_hole_under_writes_and_punches() -> None:
    rng = random.Random(23)
    n = 24
    for _ in range(300):
        blocks = [rng.random() < 0.5 for _ in range(n)]

        def seek(pos: int, whence: int, blocks: list[bool] = blocks) -> int:
            return model_seek(tuple(blocks))[0](pos, whence)  # the file as it is now

        alloc = Allocation(seek)
        for _ in range(40):
            roll = rng.random()
            a = rng.randrange(n)
            b = rng.randrange(a + 1, n + 1)
            if roll < 0.25:  # a write: holes become data, nothing to tell the walk
                blocks[a:b] = [True] * (b - a)
            elif roll < 0.4:  # a punch, told
                blocks[a:b] = [False] * (b - a)
                alloc.punched(a * BLOCK, (b - a) * BLOCK)
            else:
                offset = rng.randrange(n * BLOCK)
                length = rng.randrange(1, n * BLOCK - offset + 1)
                limit = rng.choice((1, 2, 5, 1 << 30))
                runs = alloc.runs(offset, length, limit)
                assert runs and len(runs) <= limit and all(k > 0 for k, _ in runs)
                assert sum(k for k, _ in runs) <= length
                if len(runs) < limit:
                    assert sum(k for k, _ in runs) == length
                pos = offset
                for k, hole in runs:
                    if hole:  # data may be called data from memory; a hole must be one
                        assert not any(blocks[b // BLOCK] for b in range(pos, pos + k))
                    pos += k


def test_a_dense_file_is_measured_once_until_a_punch(tmp_path: Path) -> None:
    size = 8 << 20
    path = tmp_path / "dense.img"
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDWR)
    try:
        alloc = Allocation.of_fd(fd)
        for offset in range(0, size, 256 << 10):  # a sequential copy's reads
            assert alloc.runs(offset, 256 << 10, 1024) == [(256 << 10, False)]
        assert alloc.hole_seeks == 1
        assert fallocate(fd, PUNCH_HOLE, 1 << 20, 1 << 20)
        alloc.punched(1 << 20, 1 << 20)
        assert alloc.runs(0, 4 << 20, 1024) == [(1 << 20, False), (1 << 20, True), (2 << 20, False)]
        assert alloc.runs(3 << 20, 1 << 20, 1024) == [(1 << 20, False)]
        assert alloc.hole_seeks <= 3
    finally:
        os.close(fd)
