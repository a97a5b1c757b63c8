"""The extent index of a roll-forward: per volume, the newest bytes of every byte range the
backlog changes. Pure: no I/O, no clock, nothing injected.

Because the index keeps only the newest bytes per byte range (a later addition replaces
what it overlaps), rolling forward is writing its extents to the images in any order, and
a read is answered from it for the indexed ranges and from the image for the rest
(FAILOVER design, item 3).

Per volume the extents are non-overlapping half-open ranges ``[start, end)``, each with a
*piece*, where its bytes are:

- a ``memoryview`` of a write's data (a slice of the caller's buffer: inserting never
  copies; cutting an extent slices the view, which copies nothing either);
- ``ZERO`` or ``TRIM`` (``Zeroes``): the range reads as zeroes; rolling it forward keeps
  the range allocated (ZERO) or punches it (TRIM), as the record said;
- ``Spilled(pos)``: the bytes are in the caller's spill file from ``pos`` on.

The starts are kept sorted in ``_Starts``, a list of short sorted lists (at most
``2 * _Starts.LOAD`` each) found by ``bisect`` over their last elements: an insert or delete
moves at most one short list, where one plain sorted ``list`` pays a memmove of the whole
list per insert (for the 262k extents of a 1 GiB backlog of random 4 KiB writes, ~30 s of
inserts). ``sortedcontainers.SortedList`` is the same structure, but its generic range
iteration cost more than the index's whole insert; this one offers just the three queries
the index needs. Every operation is O(log n + k) for the k extents it touches (plus moving
one short list).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Zeroes:
    """A range that reads as zeroes; ``punch``: roll it forward as a TRIM (deallocate)."""

    punch: bool


ZERO: Final = Zeroes(punch=False)
TRIM: Final = Zeroes(punch=True)


@dataclass(frozen=True, slots=True)
class Spilled:
    """The range's bytes are in the spill file, the first of them at ``pos``."""

    pos: int


Piece = memoryview | Zeroes | Spilled


@dataclass(frozen=True, slots=True)
class Extent:
    """One indexed range of a volume and where its newest bytes are."""

    volume_id: str
    offset: int
    length: int
    piece: Piece


Segment = tuple[int, int, Piece | None]  # (offset, length, piece); None: not indexed


def cut(piece: Piece, delta: int, length: int) -> Piece:
    """The piece of the sub-range that starts ``delta`` bytes into ``piece``'s range."""
    if isinstance(piece, memoryview):
        return piece[delta : delta + length]
    if isinstance(piece, Spilled):
        return Spilled(piece.pos + delta)
    return piece


class _Starts:
    """A sorted set of ints as short sorted lists (module docstring); no duplicates are
    ever added (extents never share a start)."""

    LOAD = 256  # a list splits beyond 2 * LOAD elements

    __slots__ = ("lists", "maxes", "size")

    def __init__(self) -> None:
        self.lists: list[list[int]] = []
        self.maxes: list[int] = []  # maxes[i] == lists[i][-1]; no list is ever empty
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        for lst in self.lists:
            yield from lst

    def add(self, x: int) -> None:
        self.size += 1
        maxes = self.maxes
        if not maxes:
            self.lists.append([x])
            maxes.append(x)
            return
        i = bisect_left(maxes, x)
        if i == len(maxes):  # beyond every element: the last list grows
            i -= 1
            self.lists[i].append(x)
            maxes[i] = x
        else:
            insort(self.lists[i], x)
        lst = self.lists[i]
        if len(lst) > 2 * self.LOAD:
            half = len(lst) // 2
            self.lists[i : i + 1] = [lst[:half], lst[half:]]
            maxes[i : i + 1] = [lst[half - 1], lst[-1]]

    def remove(self, x: int) -> None:
        i = bisect_left(self.maxes, x)
        lst = self.lists[i]
        j = bisect_left(lst, x)
        assert lst[j] == x
        self._delete(i, j)

    def pop(self) -> int:
        """Remove and return the greatest element."""
        x = self.lists[-1][-1]
        self._delete(len(self.lists) - 1, len(self.lists[-1]) - 1)
        return x

    def floor(self, x: int) -> int | None:
        """The greatest element <= x, if any."""
        i = bisect_left(self.maxes, x)
        if i < len(self.maxes):
            lst = self.lists[i]
            j = bisect_right(lst, x)
            if j:
                return lst[j - 1]
        return self.maxes[i - 1] if i else None

    def between(self, lo: int, hi: int) -> list[int]:
        """The elements e with lo < e < hi, ascending."""
        maxes, lists = self.maxes, self.lists
        i = bisect_right(maxes, lo)  # the first list holding an element > lo
        out: list[int] = []
        j = bisect_right(lists[i], lo) if i < len(maxes) else 0
        while i < len(maxes):
            lst = lists[i]
            k = bisect_left(lst, hi, j)
            out.extend(lst[j:k])
            if k < len(lst):  # lst[k] >= hi: done
                break
            i, j = i + 1, 0
        return out

    def around(self, lo: int, hi: int) -> tuple[int | None, list[int]]:
        """``(floor(lo), between(lo, hi))`` in one descent: what an insert needs."""
        maxes, lists = self.maxes, self.lists
        i = bisect_left(maxes, lo)  # the first list whose greatest element is >= lo
        if i == len(maxes):
            return (maxes[-1] if maxes else None), []
        lst = lists[i]
        j = bisect_right(lst, lo)
        floor = lst[j - 1] if j else (maxes[i - 1] if i else None)
        if j < len(lst) and lst[j] >= hi:  # the usual insert: nothing starts inside
            return floor, []
        out: list[int] = []
        while True:
            k = bisect_left(lst, hi, j)
            out.extend(lst[j:k])
            i += 1
            if k < len(lst) or i == len(maxes):
                return floor, out
            lst, j = lists[i], 0

    def _delete(self, i: int, j: int) -> None:
        self.size -= 1
        lst = self.lists[i]
        del lst[j]
        if not lst:
            del self.lists[i]
            del self.maxes[i]
        else:
            self.maxes[i] = lst[-1]  # merging short neighbours back is not worth its code


class _Volume:
    """One volume's extents: sorted starts, and start -> (end, piece)."""

    __slots__ = ("extents", "starts")

    def __init__(self) -> None:
        self.starts = _Starts()
        self.extents: dict[int, tuple[int, Piece]] = {}

    def overlapping(self, offset: int, end: int) -> list[int]:
        """The starts of the extents overlapping ``[offset, end)``, ascending."""
        first, inside = self.starts.around(offset, end)
        # the one extent that may start at or before offset and reach into the range
        if first is not None and self.extents[first][0] > offset:
            return [first, *inside]
        return inside


class ExtentIndex:
    """Volume -> non-overlapping extents -> the newest bytes (module docstring)."""

    def __init__(self) -> None:
        self._volumes: dict[str, _Volume] = {}
        self.bytes_indexed = 0  # total length of the extents, zeroes included
        self.resident_bytes = 0  # total length of the extents whose piece is a memoryview
        self.extent_count = 0

    # -- changes -------------------------------------------------------------------------

    def add_write(self, volume_id: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """``data`` is the newest content of ``[offset, offset+len(data))``; kept by reference."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._add(volume_id, offset, len(view), view)

    def add_zero(self, volume_id: str, offset: int, length: int, *, punch: bool = False) -> None:
        """``[offset, offset+length)`` reads as zeroes; ``punch``: it was a TRIM."""
        self._add(volume_id, offset, length, TRIM if punch else ZERO)

    def add_spilled(self, volume_id: str, offset: int, length: int, pos: int) -> None:
        """The newest content of the range is in the spill file at ``pos``."""
        self._add(volume_id, offset, length, Spilled(pos))

    def drop(self, volume_id: str, offset: int, length: int) -> int:
        """Forget ``[offset, offset+length)`` (a foreground write won it); the bytes forgotten."""
        vol = self._volumes.get(volume_id)
        if vol is None or length <= 0:
            return 0
        dropped = self._carve(vol, offset, offset + length)
        self._forget_if_empty(volume_id, vol)
        return dropped

    def drop_from(self, volume_id: str, offset: int) -> int:
        """Forget everything at or after ``offset`` (the volume shrank); the bytes forgotten."""
        vol = self._volumes.get(volume_id)
        if vol is None or not vol.extents:
            return 0
        last = vol.starts.maxes[-1]
        return self.drop(volume_id, offset, max(0, vol.extents[last][0] - offset))

    def drop_volume(self, volume_id: str) -> int:
        """Forget every extent of the volume (it was deleted); the bytes forgotten."""
        return self.drop_from(volume_id, 0)

    def take_some(self, max_bytes: int) -> list[Extent]:
        """Remove and return extents of about ``max_bytes`` in all (at least one, if any),
        volume by volume: the next batch to roll forward. Each volume's batch is taken from
        its highest offsets (a SortedList pops its tail fastest) and handed out ascending."""
        out: list[Extent] = []
        budget = max_bytes
        for vid in list(self._volumes):
            vol = self._volumes[vid]
            starts = vol.starts
            batch: list[Extent] = []
            while starts and (budget > 0 or not (out or batch)):
                start = starts.pop()
                end, piece = vol.extents.pop(start)
                self._account(end - start, piece, -1)
                batch.append(Extent(vid, start, end - start, piece))
                budget -= end - start
            batch.reverse()
            out.extend(batch)
            self._forget_if_empty(vid, vol)
            if budget <= 0:
                break
        return out

    # -- reads ---------------------------------------------------------------------------

    def lookup(self, volume_id: str, offset: int, length: int) -> list[Segment]:
        """Segments tiling ``[offset, offset+length)`` in order: (offset, length, piece), with
        piece None where nothing is indexed (read the image there)."""
        end = offset + length
        vol = self._volumes.get(volume_id)
        if vol is None or length <= 0:
            return [(offset, length, None)] if length > 0 else []
        out: list[Segment] = []
        pos = offset
        for start in vol.overlapping(offset, end):
            e_end, piece = vol.extents[start]
            if start > pos:
                out.append((pos, start - pos, None))
                pos = start
            seg_end = min(e_end, end)
            out.append((pos, seg_end - pos, cut(piece, pos - start, seg_end - pos)))
            pos = seg_end
        if pos < end:
            out.append((pos, end - pos, None))
        return out

    def covers_any(self, volume_id: str, offset: int, length: int) -> bool:
        """Whether any byte of the range is indexed."""
        vol = self._volumes.get(volume_id)
        return vol is not None and bool(vol.overlapping(offset, offset + length))

    def volumes(self) -> list[str]:
        """The volumes with at least one extent, sorted."""
        return sorted(self._volumes)

    def extents(self, volume_id: str) -> list[Extent]:
        """Every extent of the volume, ascending (for tests and diagnostics)."""
        vol = self._volumes.get(volume_id)
        if vol is None:
            return []
        return [Extent(volume_id, s, vol.extents[s][0] - s, vol.extents[s][1]) for s in vol.starts]

    def __len__(self) -> int:
        return self.extent_count

    # -- internals -----------------------------------------------------------------------

    def _add(self, volume_id: str, offset: int, length: int, piece: Piece) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"extent [{offset}, {offset + length}) of {volume_id!r} is negative")
        if length == 0:
            return
        vol = self._volumes.get(volume_id)
        if vol is None:
            vol = self._volumes[volume_id] = _Volume()
        end = offset + length
        self._carve(vol, offset, end)
        self._put(vol, offset, end, piece)

    def _carve(self, vol: _Volume, offset: int, end: int) -> int:
        """Remove ``[offset, end)`` from the volume's extents, keeping what sticks out of it
        on either side; the bytes removed."""
        removed = 0
        for start in vol.overlapping(offset, end):
            e_end, piece = vol.extents[start]
            if start < offset:  # the head that precedes the carved range stays, shortened
                vol.extents[start] = (offset, cut(piece, 0, offset - start))
                self._account(e_end - offset, piece, -1)
                self.extent_count += 1  # the extent itself stays
            else:
                self._remove(vol, start)
            if e_end > end:  # and so does the tail that follows it
                self._put(vol, end, e_end, cut(piece, end - start, e_end - end))
            removed += min(e_end, end) - max(start, offset)
        return removed

    def _put(self, vol: _Volume, start: int, end: int, piece: Piece) -> None:
        vol.starts.add(start)
        vol.extents[start] = (end, piece)
        self._account(end - start, piece, +1)

    def _remove(self, vol: _Volume, start: int) -> None:
        vol.starts.remove(start)
        end, piece = vol.extents.pop(start)
        self._account(end - start, piece, -1)

    def _account(self, length: int, piece: Piece, sign: int) -> None:
        self.extent_count += sign
        self.bytes_indexed += sign * length
        if isinstance(piece, memoryview):
            self.resident_bytes += sign * length

    def _forget_if_empty(self, volume_id: str, vol: _Volume) -> None:
        if not vol.extents:
            self._volumes.pop(volume_id, None)
