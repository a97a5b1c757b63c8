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


def fd_allocation(fd: int, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
    """``allocation_runs`` of an open file. ``lseek`` moves the descriptor's shared file
    position, which no ``pread``/``pwrite`` on it uses, so it is safe under concurrent I/O."""
    return allocation_runs(lambda pos, whence: os.lseek(fd, pos, whence), offset, length, limit)
