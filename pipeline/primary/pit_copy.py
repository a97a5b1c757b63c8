"""A point-in-time copy of one sparse raw image, taken while writes continue.

Why copy-before-write: a marker holds a volume's writes for one Kafka hop, and a snapshot
taken at that marker must not stretch the hold to the minutes a full copy of the image
takes. So constructing a ``PitCopy`` (begin) only freezes the image logically; from then
on every write into the image first calls ``before_write``, which saves the old contents
of any chunk in its range not yet copied into the target, and then the write proceeds (an
LVM snapshot's copy-before-write, with the whole copy as the exception store). A
background copier (``copy_step`` / ``run``) copies the other chunks. Writes are never held
for the copy: at worst a write waits for the copy of the chunks it touches.

Where the filesystem shares extents (btrfs, xfs with reflink) an FICLONE makes the copy
complete at once; ext4 cannot, hence the rest.

Holes stay holes: a chunk that is a hole at begin is never copied (the new target already
reads as zeroes there) and all-zero 64 KiB runs inside a data chunk are skipped, so the
copy takes no more disk than the image did.

Locking: the caller's per-volume ``lock`` serializes the image's writes; ``before_write``
runs under it, and ``copy_step`` takes it per chunk, so a chunk is read either before a
write into it or, by ``before_write``, in its place, never while one runs. An inner lock
guards the target fd's life, so ``abort`` may come from any thread, holding ``lock`` or not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

from connectors.image.image import data_extents
from pipeline.errors import VolumeError

_FICLONE = 0x40049409
ZERO_RUN = 64 << 10
_ZEROS = bytes(ZERO_RUN)


def _try_reflink(target_fd: int, source_fd: int) -> bool:
    try:
        fcntl.ioctl(target_fd, _FICLONE, source_fd)
    except OSError:  # EOPNOTSUPP, EXDEV, EINVAL...: no shared extents here, copy instead
        return False
    return True


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space or delete old snapshots, then take it again"
    if exc.errno == errno.ENOENT:
        return "its directory does not exist: create it, then take the snapshot again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "lowmark may not write there: fix the permissions or choose another directory"
    if exc.errno == errno.EIO:
        return "the disk failed: check it (dmesg) before trusting any copy on it"
    return "remove the cause named above, then take the snapshot again"


class PitCopy:
    """Copy of the image behind ``source_fd`` as it is when this object is made."""

    def __init__(
        self, source_fd: int, size: int, target: Path, lock: threading.Lock, *, chunk: int = 1 << 20
    ) -> None:
        if chunk <= 0 or size < 0:
            raise VolumeError(f"point-in-time copy needs chunk > 0 and size >= 0: {chunk}, {size}")
        self.target = Path(target)
        self.size = size
        self.chunk = chunk
        self._src = source_fd
        self._lock = lock
        self._io = threading.Lock()
        self._aborted = False
        self._synced = False
        self._cursor = 0
        n_chunks = -(-size // chunk)
        # 1 = holds data at begin and not yet in the target; only ever goes 1 -> 0
        self._pending = bytearray(n_chunks)
        try:
            self._fd = os.open(
                self.target, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise VolumeError(
                f"cannot create point-in-time copy {self.target}: {exc.strerror}; {_hint(exc)}"
            ) from exc
        try:
            self.reflinked = _try_reflink(self._fd, source_fd)
            os.ftruncate(self._fd, size)
            for offset, length in data_extents(source_fd, size):
                first, last = offset // chunk, (offset + length - 1) // chunk
                self._pending[first : last + 1] = b"\x01" * (last - first + 1)
        except OSError as exc:
            self.abort()
            raise VolumeError(
                f"cannot begin point-in-time copy {self.target}: {exc.strerror}; {_hint(exc)}"
            ) from exc
        self._remaining = self._pending.count(1)
        self.total_bytes = self._remaining * chunk
        if n_chunks and self._pending[-1]:
            self.total_bytes -= n_chunks * chunk - size  # the last chunk is short
        self.cow_chunks = 0  # chunks before_write had to save: writes that waited for the copy
        if self.reflinked:
            self._pending[:] = bytes(n_chunks)
            self._remaining = 0
        self.copied_bytes = self.total_bytes if self.reflinked else 0
        self.done = self._remaining == 0

    def before_write(self, offset: int, length: int) -> None:
        """Save the old contents of [offset, offset+length) before the caller overwrites it.

        The caller holds ``lock``. If this raises, the chunk stays uncopied: the caller
        either refuses the write or aborts the copy (after which the write may proceed)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise VolumeError(
                f"write [{offset}, {offset + length}) is outside the image of {self.size} "
                f"bytes being copied to {self.target.name}; resizes must wait for the copy"
            )
        if length == 0 or self.done or self._aborted:
            return
        last = (offset + length - 1) // self.chunk
        i = self._pending.find(1, offset // self.chunk, last + 1)
        while i != -1:
            if self._copy_chunk(i):
                self.cow_chunks += 1
            i = self._pending.find(1, i + 1, last + 1)

    def copy_step(self, max_chunks: int = 8) -> bool:
        """Copy up to ``max_chunks`` chunks; True when nothing is left (done, or aborted)."""
        for _ in range(max_chunks):
            if self.done or self._aborted:
                break
            # read outside the lock: a chunk only leaves the pending set, and _copy_chunk
            # looks again under it; chunks behind the cursor are never pending again
            i = self._pending.find(1, self._cursor)
            if i == -1:
                break
            with self._lock:
                self._copy_chunk(i)
            self._cursor = i + 1
            # threading.Lock is not fair: re-taking it at once could keep a woken writer
            # waiting for many chunks; yield so it gets the lock between two of ours
            time.sleep(0)
        return self.done or self._aborted

    def run(self, stop: threading.Event, rate_bytes_s: float | None = None) -> bool:
        """Copy until done or ``stop``; then ``finish``. True if the copy is complete."""
        if rate_bytes_s is not None and rate_bytes_s <= 0:
            raise VolumeError(f"copy rate must be positive bytes/s, not {rate_bytes_s}")
        step = 8
        if rate_bytes_s is not None:  # steps of ~0.1 s keep the rate smooth and stop prompt
            step = max(1, min(8, int(rate_bytes_s * 0.1) // self.chunk))
        start, base = time.monotonic(), self.copied_bytes
        while not stop.is_set() and not self.copy_step(step):
            if rate_bytes_s is not None:
                ahead = (self.copied_bytes - base) / rate_bytes_s - (time.monotonic() - start)
                if ahead > 0 and stop.wait(ahead):
                    break
        if not self.done or self._aborted:
            return False
        self.finish()
        return True

    def finish(self) -> None:
        """Make the complete copy durable (its data and its name) and close it."""
        if self._synced:
            return
        if not self.done:
            raise VolumeError(
                f"point-in-time copy {self.target} is not complete ({self._remaining} chunks "
                "left): run copy_step until it returns True before finish"
            )
        with self._io:
            if self._aborted:
                raise VolumeError(f"point-in-time copy {self.target} was aborted; begin again")
            if self._synced:
                return
            try:
                os.fsync(self._fd)
                dir_fd = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                raise VolumeError(
                    f"cannot make point-in-time copy {self.target} durable: {exc.strerror}; "
                    f"{_hint(exc)}"
                ) from exc
            os.close(self._fd)
            self._fd = -1
            self._synced = True

    def abort(self) -> None:
        """Stop the copy and delete the target; later calls of the others do nothing."""
        with self._io:
            self._aborted = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            try:
                self.target.unlink(missing_ok=True)
            except OSError as exc:
                raise VolumeError(
                    f"cannot delete aborted point-in-time copy {self.target}: {exc.strerror}; "
                    "delete it by hand"
                ) from exc

    def _copy_chunk(self, i: int) -> bool:
        """Copy chunk ``i`` if still pending; the caller holds ``lock``. True if it copied."""
        with self._io:
            if self._aborted or not self._pending[i]:
                return False
            start = i * self.chunk
            n = min(self.chunk, self.size - start)
            try:
                self._write_nonzero(start, self._read(start, n))
            except OSError as exc:
                raise VolumeError(
                    f"point-in-time copy {self.target}: cannot save bytes [{start}, "
                    f"{start + n}): {exc.strerror}; {_hint(exc)} (or abort the copy)"
                ) from exc
            self._remaining -= 1
            self.copied_bytes += n
            self.done = self._remaining == 0
            self._pending[i] = 0  # last: copy_step, seeing no chunk pending, may trust done
            return True

    def _read(self, offset: int, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            data = os.pread(self._src, n, offset)
            if not data:  # cannot happen while the size is fixed; reads as zeroes if it does
                parts.append(bytes(n))
                break
            parts.append(data)
            offset += len(data)
            n -= len(data)
        return b"".join(parts)

    def _write_nonzero(self, start: int, data: bytes) -> None:
        """pwrite ``data`` at ``start`` except its all-zero 64 KiB runs (on the image's grid,
        so a hole in the image is a hole in the copy)."""
        view = memoryview(data)
        pos, run = 0, -1  # run: where the pending nonzero run began, -1 if none
        while pos < len(data):
            nxt = min(len(data), (start + pos) // ZERO_RUN * ZERO_RUN + ZERO_RUN - start)
            if data[pos:nxt] == _ZEROS[: nxt - pos]:
                if run >= 0:
                    self._pwrite(view[run:pos], start + run)
                    run = -1
            elif run < 0:
                run = pos
            pos = nxt
        if run >= 0:
            self._pwrite(view[run:], start + run)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n
