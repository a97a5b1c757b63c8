"""The product's image digest against oracles that share none of its code.

``content_digest`` claims to hash what a reader sees, not how the file is stored: a hole
and an allocated run of zeroes hash the same, the size counts, every byte counts. Tries
to break it with holes, allocated zeroes, sizes one byte apart, sparse files with data in
the middle of a hole, several allocated extents inside one 64 KiB digest block, data at
the very last byte, and random sequences of writes, zeroing and hole punching. The
oracles (``tests/oracles.py``) read the bytes plainly and hash them with hashlib.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.image.image import (
    DIGEST_BLOCK,
    Image,
    content_digest_bytes,
    content_digest_fd,
    data_extents,
    file_digest,
)
from tests.oracles import claimed_digest, read_image, reader_digest

KIB = 1024


def _sparse(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    """A file of ``size`` bytes that is a hole except where ``writes`` put data."""
    with path.open("wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return path


def _dense(path: Path, data: bytes) -> Path:
    """A file with every byte allocated, zeroes included."""
    path.write_bytes(data)
    return path


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _product(path: Path) -> set[str]:
    """Every way the product computes a file's digest; they must agree."""
    with Image(path) as img:
        via_image = img.content_digest()
    fd = os.open(path, os.O_RDONLY)
    try:
        via_fd = content_digest_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return {via_image, via_fd, file_digest(path), content_digest_bytes(read_image(path))}


def _digest(path: Path) -> str:
    ways = _product(path)
    assert len(ways) == 1, f"the product's digest functions disagree on {path.name}: {ways}"
    (d,) = ways
    return d


def test_a_hole_and_allocated_zeroes_hash_the_same(tmp_path: Path) -> None:
    size = 3 * DIGEST_BLOCK + 5 * KIB
    hole = _sparse(tmp_path / "hole.img", size, [])
    dense = _dense(tmp_path / "dense.img", bytes(size))
    assert _allocated(hole) == 0 and _allocated(dense) >= size, "the files are not what we think"
    assert read_image(hole) == read_image(dense)
    assert _digest(hole) == _digest(dense)


def test_the_same_data_sparse_or_dense_hashes_the_same(tmp_path: Path) -> None:
    size = 8 * DIGEST_BLOCK
    writes = [(100, b"a" * 300), (3 * DIGEST_BLOCK + 4 * KIB, b"b" * 9000), (size - 4, b"tail")]
    sparse = _sparse(tmp_path / "sparse.img", size, writes)
    model = bytearray(size)
    for offset, data in writes:
        model[offset : offset + len(data)] = data
    dense = _dense(tmp_path / "dense.img", bytes(model))
    assert _allocated(sparse) < size // 2, "the sparse file has no holes: the test says nothing"
    assert read_image(sparse) == read_image(dense) == bytes(model)
    assert _digest(sparse) == _digest(dense) == content_digest_bytes(model)


@pytest.mark.parametrize("size", [1, 511, DIGEST_BLOCK - 1, DIGEST_BLOCK, DIGEST_BLOCK + 1])
def test_size_counts_even_for_all_zero_images(tmp_path: Path, size: int) -> None:
    a = _sparse(tmp_path / "a.img", size, [])
    b = _sparse(tmp_path / "b.img", size + 1, [])
    assert reader_digest(read_image(a)) != reader_digest(read_image(b))
    assert _digest(a) != _digest(b), f"sizes {size} and {size + 1} hash the same"
    empty = _sparse(tmp_path / "empty.img", 0, [])
    assert _digest(empty) != _digest(a)


@pytest.mark.parametrize(
    "size", [4 * KIB, DIGEST_BLOCK, 2 * DIGEST_BLOCK + 1, 5 * DIGEST_BLOCK - 1, 1 << 20, 9 << 20]
)
def test_data_at_the_last_byte_counts(tmp_path: Path, size: int) -> None:
    zero = _sparse(tmp_path / "zero.img", size, [])
    last = _sparse(tmp_path / "last.img", size, [(size - 1, b"\x01")])
    other = _sparse(tmp_path / "other.img", size, [(size - 1, b"\x02")])
    assert read_image(last)[-1] == 1
    digests = {_digest(zero), _digest(last), _digest(other)}
    assert len(digests) == 3, "a change of the last byte is invisible to the digest"


def test_the_block_a_byte_lies_in_counts(tmp_path: Path) -> None:
    """The same non-zero block at another offset is another image."""
    size = 4 * DIGEST_BLOCK
    block = os.urandom(DIGEST_BLOCK)
    files = [_sparse(tmp_path / f"at{i}.img", size, [(i * DIGEST_BLOCK, block)]) for i in range(4)]
    shifted = _sparse(tmp_path / "shifted.img", size, [(1, block[:-1])])
    digests = [_digest(f) for f in [*files, shifted]]
    assert len(set(digests)) == len(digests)


def test_several_extents_inside_one_digest_block(tmp_path: Path) -> None:
    """Allocation boundaries inside a 64 KiB block: data, hole, data, hole."""
    size = 2 * DIGEST_BLOCK
    writes = [(0, b"x" * 4 * KIB), (16 * KIB, b"y" * 4 * KIB), (DIGEST_BLOCK - 8, b"z" * 16)]
    f = _sparse(tmp_path / "f.img", size, writes)
    fd = os.open(f, os.O_RDONLY)
    try:
        extents = data_extents(fd, size)
    finally:
        os.close(fd)
    assert len(extents) >= 3, f"expected separate extents, the file system gave {extents}"
    model = bytearray(size)
    for offset, data in writes:
        model[offset : offset + len(data)] = data
    assert _digest(f) == _digest(_dense(tmp_path / "d.img", bytes(model)))


def test_a_punched_hole_hashes_as_the_zeroes_it_reads(tmp_path: Path) -> None:
    size = 4 * DIGEST_BLOCK
    path = tmp_path / "img.img"
    with Image(path, create_size=size) as img:
        img.pwrite(0, os.urandom(size))
        img.zero(DIGEST_BLOCK // 2, 2 * DIGEST_BLOCK, punch=True)  # across block boundaries
        img.sync()
    data = read_image(path)
    start, end = DIGEST_BLOCK // 2, DIGEST_BLOCK // 2 + 2 * DIGEST_BLOCK
    assert data[start:end] == bytes(end - start)
    assert _digest(path) == _digest(_dense(tmp_path / "dense.img", data))


def test_a_zero_byte_is_not_a_hole_when_other_bytes_of_its_block_are_data(
    tmp_path: Path,
) -> None:
    size = DIGEST_BLOCK
    a = _sparse(tmp_path / "a.img", size, [(0, b"\x00\x01")])
    b = _sparse(tmp_path / "b.img", size, [(0, b"\x01\x00")])
    assert _digest(a) != _digest(b)


# ---- random images: the digest's equality is exactly the reader's equality -----------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero-write", "punch", "zero-range"]),
        st.integers(0, 6 * DIGEST_BLOCK),
        st.integers(1, 3 * DIGEST_BLOCK // 2),
        st.integers(0, 255),
    ),
    max_size=8,
)


def _build(path: Path, size: int, ops: list[tuple[str, int, int, int]]) -> bytes:
    """Apply ``ops`` to a sparse file through ``Image``; return the model of its bytes."""
    model = bytearray(size)
    with Image(path, create_size=size) as img:
        for kind, offset, length, byte in ops:
            offset = min(offset, size - 1)
            length = min(length, size - offset)
            if kind == "write":
                data = bytes([byte]) * length if byte else b"\x07" * length
            else:
                data = bytes(length)
            if kind in ("punch", "zero-range"):  # a hole, or zeroes kept allocated
                img.zero(offset, length, punch=kind == "punch")
            else:
                img.pwrite(offset, data)  # "zero-write": allocated zeroes
            model[offset : offset + length] = data
    return bytes(model)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 6 * DIGEST_BLOCK + 3),
    a_ops=OPS,
    b_ops=OPS,
    same_size=st.booleans(),
)
def test_digest_equal_exactly_when_the_bytes_read_are_equal(
    tmp_path: Path, size: int, a_ops: list, b_ops: list, same_size: bool
) -> None:
    a_path, b_path = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a_path, b_path):
        p.unlink(missing_ok=True)
    a = _build(a_path, size, a_ops)
    b = _build(b_path, size if same_size else size + 1, b_ops)
    assert read_image(a_path) == a and read_image(b_path) == b
    same_read = reader_digest(a) == reader_digest(b)
    assert (_digest(a_path) == _digest(b_path)) == same_read
    # the same bytes, written densely from the model: the same digest as the sparse file
    assert _digest(_dense(tmp_path / "a-dense.img", a)) == _digest(a_path)


def test_the_digest_is_the_documented_format(tmp_path: Path) -> None:
    """Checkpoints and manifests carry this digest and other tests check them with
    ``oracles.claimed_digest``: the product must compute exactly that format."""
    size = (5 << 20) + 100  # several MiB: a digest that stops early must show
    cases = {
        "hole": [],
        "first-byte": [(0, b"\x01")],
        "last-byte": [(size - 1, b"\x02")],
        "across-blocks": [(DIGEST_BLOCK - 10, b"z" * 20), (2 * DIGEST_BLOCK + 50, b"q" * 90)],
    }
    for name, writes in cases.items():
        f = _sparse(tmp_path / f"{name}.img", size, writes)
        assert _digest(f) == claimed_digest(read_image(f)), f"{name}: not the documented format"


def test_distinct_small_images_have_distinct_digests() -> None:
    """Every image of 3 bytes over {0, 1}, and sizes 0-3: the digest separates them all
    (no two distinct reader views collide, zero runs included)."""
    images = [bytes(bits) for n in range(4) for bits in itertools.product([0, 1], repeat=n)]
    digests = {content_digest_bytes(img): img for img in images}
    assert len(digests) == len(images)
    assert all(content_digest_bytes(img) == claimed_digest(img) for img in images)
