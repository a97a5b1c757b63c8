"""Sparse raw image files: the bytes of a volume, at the primary and at every backup.

An ``Image`` is a file descriptor plus a size. Writes are ``os.pwrite`` (the page cache
makes them microseconds), ``zero`` either punches a hole (a TRIM, or an NBD WRITE_ZEROES
that may trim) or keeps the range allocated (a ZERO: NBD_CMD_FLAG_NO_HOLE, or the volume
API's ``write_zeroes``), the same choice at the primary and at every backup, and ``sync`` is
``fdatasync``. ``content_digest`` hashes what a reader sees, not how it is stored: an
allocated all-zero region and a hole hash the same, so a primary and a backup compare
equal whatever their allocation history.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from connectors.image.allocation import Allocation
from pipeline.errors import VolumeError

_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
PUNCH_HOLE = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
ZERO_RANGE = _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not glibc/Linux: every zero writes zero bytes
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with a mode (os.posix_fallocate takes none). False when the filesystem
    does not support the mode, so the caller writes zero bytes instead; any other failure
    (ENOSPC for a ZERO_RANGE, EIO) raises, as a failed pwrite would."""
    if _fallocate is None:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(err)}")


class Image:
    """A raw image file opened for reading and writing."""

    def __init__(self, path: Path | str, *, create_size: int | None = None) -> None:
        self.path = Path(path)
        flags = os.O_RDWR | (os.O_CREAT if create_size is not None else 0)
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            raise VolumeError(
                f"image {self.path} does not exist; create the volume first"
            ) from None
        if create_size is not None and os.fstat(self.fd).st_size == 0 and create_size > 0:
            os.ftruncate(self.fd, create_size)
        self.size = os.fstat(self.fd).st_size
        self._allocation = Allocation.of_fd(self.fd)

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise VolumeError(
                f"range [{offset}, {offset + length}) is outside image {self.path.name} "
                f"of {self.size} bytes"
            )

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def pread(self, offset: int, length: int) -> bytes:
        out = os.pread(self.fd, length, offset)
        if len(out) < length:  # a sparse tail past EOF reads as zeroes
            out += bytes(length - len(out))
        return out

    def zero(self, offset: int, length: int, *, punch: bool) -> None:
        """Make [offset, offset+length) read as zeroes.

        ``punch``: deallocate it where the filesystem can (a TRIM record). Without it the
        range stays allocated (a ZERO record: the client asked for no hole, so a later
        write there must not fail for space): FALLOC_FL_ZERO_RANGE, which allocates a
        hole too. Either way, falls back to writing zero bytes. No default: every caller
        states the choice its record carries, so the primary and the backups agree.
        """
        if length == 0:
            return
        done = fallocate(self.fd, PUNCH_HOLE if punch else ZERO_RANGE, offset, length)
        self._allocation.punched(offset, length)  # a hole now, or unwritten extents
        if done:
            return
        end = offset + length
        while offset < end:
            n = min(_CHUNK, end - offset)
            self.pwrite(offset, _ZERO_CHUNK[:n])
            offset += n

    def resize(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size
        self._allocation = Allocation.of_fd(self.fd)  # a shrink drops data it remembered

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs of a prefix of the range (``allocation.fd_allocation``)."""
        return self._allocation.runs(offset, length, limit)

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of allocated regions, via SEEK_DATA/SEEK_HOLE."""
        return data_extents(self.fd, self.size)

    def content_digest(self) -> str:
        return content_digest_fd(self.fd, self.size)

    def first_data_at_or_after(self, offset: int) -> int | None:
        """The offset of the first non-zero byte at or after ``offset``; None: only zeros
        (holes are skipped, allocated regions read in 1 MiB steps)."""
        for start, length in self.data_extents():
            pos, end = max(start, offset), start + length
            while pos < end:
                chunk = os.pread(self.fd, min(1 << 20, end - pos), pos)
                stripped = chunk.lstrip(b"\0")
                if stripped:
                    return pos + len(chunk) - len(stripped)
                pos += len(chunk)
        return None


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            return [(0, size)]  # filesystem without SEEK_DATA: treat all as data
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= size:
            break
        extents.append((start, end - start))
        pos = end
    return extents


DIGEST_BLOCK = 64 << 10


def content_digest_fd(fd: int, size: int) -> str:
    """BLAKE2b over (size, and every non-zero 64 KiB block with its index).

    All-zero blocks are skipped whether allocated or not, so the digest depends only on
    what a reader of the image sees.
    """

    def read(offset: int, n: int) -> bytes:
        data = os.pread(fd, n, offset)
        return data + bytes(n - len(data)) if len(data) < n else data

    return _digest(size, data_extents(fd, size), read)


def content_digest_bytes(data: bytes | bytearray) -> str:
    """The same digest as ``content_digest_fd`` for an image held in memory (tests, tools)."""
    view = memoryview(data)
    return _digest(len(data), [(0, len(data))], lambda off, n: bytes(view[off : off + n]))


def _digest(
    size: int, extents: Iterable[tuple[int, int]], read: Callable[[int, int], bytes]
) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(b"lowmark-image-v1")
    h.update(size.to_bytes(8, "little"))
    zero_block = bytes(DIGEST_BLOCK)
    next_block = 0  # two extents may share a block: hash each block once
    for start, length in extents:
        # align to the digest block grid so allocation boundaries don't matter
        block = max(start - start % DIGEST_BLOCK, next_block)
        end = start + length
        while block < end:
            data = read(block, min(DIGEST_BLOCK, size - block))
            if data != zero_block[: len(data)]:
                h.update(block.to_bytes(8, "little"))
                h.update(data)
            block += DIGEST_BLOCK
        next_block = block
    return h.hexdigest()


def file_digest(path: Path | str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return content_digest_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
