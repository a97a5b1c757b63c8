"""Where a sparse file holds data: a SEEK_DATA / SEEK_HOLE walk turned into runs.

``allocation_runs`` is pure over an injected ``seek`` (``os.lseek`` of one fd in
production, a model in the tests), so every answer a file system can give is tested
without I/O. The walk follows nbdkit's file plugin: SEEK_DATA from the position finds
the end of a hole (ENXIO: no data up to the end of the file, so the rest is a hole),
SEEK_HOLE from there the end of the data. A file system that cannot tell (EINVAL,
EOPNOTSUPP for the whence values) reports everything as data, which is always true.

The answer is a snapshot of what the file system knew at each ``lseek``: a write whose
``pwrite`` has returned is data from then on (its pages are in the page cache), so a
caller that answers only after the writes it must account for have returned never calls
their range a hole. A range written concurrently with the walk may be either.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable

#: (position, whence) -> position, as ``os.lseek`` of one descriptor
Seek = Callable[[int, int], int]
_CANNOT_TELL = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


def allocation_runs(seek: Seek, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
    """``(length, is_hole)`` runs covering a prefix of ``[offset, offset + length)``, at
    most ``limit`` of them (the whole range when the limit is not reached), each nonzero,
    holes and data alternating."""
    if limit < 1 or length <= 0:
        raise ValueError(f"allocation_runs needs limit >= 1 and length > 0, not {limit}, {length}")
    end = offset + length
    runs: list[tuple[int, bool]] = []
    pos = offset
    while pos < end and len(runs) < limit:
        try:
            data = seek(pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                data = end  # no data from pos on; past the end of the file reads zeroes too
            elif exc.errno in _CANNOT_TELL:
                runs.append((end - pos, False))
                break
            else:
                raise
        # A position before pos would be a file system bug; never step backwards.
        data = min(max(data, pos), end)
        if data > pos:
            runs.append((data - pos, True))
            pos = data
            if pos >= end or len(runs) >= limit:
                break
        try:
            hole = seek(pos, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno not in _CANNOT_TELL and exc.errno != errno.ENXIO:
                raise
            hole = end
        # SEEK_HOLE never answers at or before data it just found; if it did, call it data.
        hole = end if hole <= pos else min(hole, end)
        runs.append((hole - pos, False))
        pos = hole
    return runs


def with_data(
    runs: list[tuple[int, bool]], offset: int, spans: Iterable[tuple[int, int]]
) -> list[tuple[int, bool]]:
    """``runs`` (from ``offset``) with every byte inside one of ``spans`` (start, end)
    called data: what a caller uses for writes it has accepted but not yet made, so a
    range about to be written is never reported a hole. Neighbours with the same state
    are merged; the runs cover the same bytes as before."""
    end = offset + sum(n for n, _ in runs)
    cuts = sorted(
        (max(s, offset), min(e, end)) for s, e in spans if s < e and s < end and e > offset
    )
    if not cuts:
        return runs
    out: list[tuple[int, bool]] = []

    def add(n: int, hole: bool) -> None:
        if n <= 0:
            return
        if out and out[-1][1] == hole:
            out[-1] = (out[-1][0] + n, hole)
        else:
            out.append((n, hole))

    pos = offset
    for n, hole in runs:
        stop = pos + n
        if not hole:
            add(n, False)
        else:
            at = pos
            for s, e in cuts:
                if e <= at or s >= stop:
                    continue
                add(max(s, at) - at, True)
                add(min(e, stop) - max(s, at), False)
                at = max(at, min(e, stop))
            add(stop - at, True)
        pos = stop
    return out


class Allocation:
    """The walk of one file, remembering the longest data run a SEEK_HOLE measured.

    SEEK_HOLE inside a long run of data costs time in proportion to the run on some file
    systems (tmpfs walks its page cache: 0.85 ms for 64 MiB, 55 ms for a dense 4 GiB
    file), and a structured READ asks on every request. A range inside the remembered run
    is answered without a syscall. Remembering data is always safe: writes only turn
    holes into data, and ``punched`` trims the run where a hole may have appeared (a
    punch or a zeroed range). A run remembered by a walk racing a punch in another thread
    may call a fresh hole data, which the protocol allows and a read answers with the
    zeroes it finds; a hole is never remembered, so nothing here calls data a hole.
    """

    def __init__(self, seek: Seek) -> None:
        self._seek = seek
        self._data = (0, 0)  # [start, stop) known to be data
        self.hole_seeks = 0  # SEEK_HOLE calls made, for tests and benchmarks

    @classmethod
    def of_fd(cls, fd: int) -> Allocation:
        return cls(lambda pos, whence: os.lseek(fd, pos, whence))

    def runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """As ``allocation_runs``."""
        start, stop = self._data
        head: list[tuple[int, bool]] = []
        if start <= offset < stop:
            n = min(stop - offset, length)
            if n == length or limit == 1:
                return [(n, False)]
            head = [(n, False)]
            offset, length = offset + n, length - n
        found: list[tuple[int, int]] = []

        def seek(pos: int, whence: int) -> int:
            at = self._seek(pos, whence)
            if whence == os.SEEK_HOLE:
                self.hole_seeks += 1
                if at > pos:
                    found.append((pos, at))  # pos is data: SEEK_DATA said so just before
            return at

        tail = allocation_runs(seek, offset, length, limit)
        if found:
            longest = max(found, key=lambda run: run[1] - run[0])
            if longest[1] - longest[0] >= stop - start:
                self._data = longest
        if head and tail and not tail[0][1]:  # the file grew data right after the run
            return [(head[0][0] + tail[0][0], False), *tail[1:]]
        # Whole runs only: cut at the limit, so fewer than ``limit`` still means all of it.
        return (head + tail)[:limit]

    def punched(self, offset: int, length: int) -> None:
        """[offset, offset + length) may be a hole now: keep the larger side of the run."""
        start, stop = self._data
        end = offset + length
        if end <= start or offset >= stop:
            return
        left, right = (start, min(offset, stop)), (max(end, start), stop)
        keep = max(left, right, key=lambda run: run[1] - run[0])
        self._data = keep if keep[1] > keep[0] else (0, 0)


def fd_allocation(fd: int, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
    """``allocation_runs`` of an open file. ``lseek`` moves the descriptor's shared file
    position, which no ``pread``/``pwrite`` on it uses, so it is safe under concurrent I/O."""
    return allocation_runs(lambda pos, whence: os.lseek(fd, pos, whence), offset, length, limit)
