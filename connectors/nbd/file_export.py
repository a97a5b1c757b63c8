"""A plain raw file served over NBD, with no replication.

Used by the tests and by the benchmark's "replication off" mode: it is what the NBD
server costs on its own. Every method completes synchronously and returns None, the
server's fast path. Promises, per call (the nbdkit plugin contract):

- ``write``: the bytes are in the page cache when it returns; with ``fua`` they are on
  stable storage (fdatasync).
- ``write_zeroes``: the range reads back as zeroes. ``may_trim`` lets it punch a hole;
  without it the range stays allocated (FALLOC_FL_ZERO_RANGE, falling back to writing
  zeroes).
- ``trim``: advisory; punches a hole when the filesystem can, else does nothing. The
  range's content afterwards is unspecified by NBD (here: zeroes or the old data).
- ``flush``: every write that returned before it is on stable storage (fdatasync).
- ``extents`` (BLOCK_STATUS, and the holes of a structured READ): the file's holes by
  SEEK_DATA / SEEK_HOLE as HOLE|ZERO, the rest data. Every call here is synchronous on
  the loop, so every write answered before the request is in the file and is data.
  A range zeroed without a hole (FALLOC_FL_ZERO_RANGE: unwritten extents) may be
  reported as a hole by file systems that treat unwritten extents so; it reads as
  zeroes, which is what a client acts on.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from connectors.image.allocation import Allocation
from connectors.nbd.protocol import STATE_HOLE, STATE_ZERO
from pipeline.errors import VolumeError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = bytes(1 << 20)
_HOLE = STATE_HOLE | STATE_ZERO

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def _falloc(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with a mode (os.posix_fallocate has none). False when the
    filesystem does not support the mode; other failures raise OSError."""
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(err)}")


class FileExport:
    """A raw image file as an NBD export (see the module docstring for its promises)."""

    description: str
    can_multi_conn: bool

    def __init__(
        self, path: str | Path, name: str, read_only: bool = False, description: str = ""
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.read_only = read_only
        self.description = description or f"raw file {self.path.name}"
        # One fd serves every connection, so a flush on one connection covers writes
        # completed on all of them: multi-conn is safe.
        self.can_multi_conn = True
        try:
            self._fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        except FileNotFoundError:
            raise VolumeError(f"image {self.path} does not exist; create it first") from None
        self.size = os.fstat(self._fd).st_size
        self._allocation = Allocation.of_fd(self._fd)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            # Only possible if someone truncated the file under us.
            raise OSError(
                errno.EIO,
                f"short read of {self.path}: {len(data)} of {length} bytes at {offset}; "
                "was the image truncated while served?",
            )
        return data

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._pwrite_all(offset, data)
        if fua:
            os.fdatasync(self._fd)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        if may_trim:
            done = _falloc(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        else:
            done = _falloc(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if not done:
            self._write_zero_bytes(offset, length)
        self._allocation.punched(offset, length)
        if fua:
            os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        _falloc(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        self._allocation.punched(offset, length)
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        runs = self._allocation.runs(offset, length, limit)
        if len(runs) == 1:  # a read inside one run: every structured READ asks
            return [(runs[0][0], _HOLE if runs[0][1] else 0)]
        return [(n, _HOLE if hole else 0) for n, hole in runs]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pwrite_all(self, offset: int, data: bytes | memoryview) -> None:
        done = os.pwrite(self._fd, data, offset)
        if done == len(data):  # the usual case, without a memoryview
            return
        view = memoryview(data)[done:]
        offset += done
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeroes = memoryview(_ZERO_CHUNK)
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self._pwrite_all(offset, zeroes[:n])
            offset += n
