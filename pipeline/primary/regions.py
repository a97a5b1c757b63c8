"""The pure part of the dirty-region log: which regions a write marks, when one may be cleared.

A volume is cut into regions of ``region_bytes`` (a power of two, default 64 KiB). The
interceptor keeps, per volume, a bitmap of the regions whose bytes in the primary image may
differ from what is durable in Kafka (DRBD's activity log is the anchor). ``DirtyRegions``
is that bitmap plus what decides its bits; ``pipeline.primary.region_log`` writes it to a
file and fsyncs it. The rules, each a test in ``tests/primary/test_regions.py``:

- **mark before the local write.** ``mark`` sets the bits of every region a write touches
  and counts the write as *pending* on each. A bit that was not set before belongs to the
  next flush generation (``gen``): the write may be acknowledged once a flush of that
  generation was fsynced (``durable_gen >= Marked.gen``). A region already set costs
  nothing: its generation is already durable, or is the one the write waits for anyway.
- **clear once durable in Kafka.** ``assign`` gives the pending write its record's seq;
  ``clear(durable_seq)`` drops a region only when no write on it is pending, every seq it
  was assigned is <= durable_seq, and it is not *held*. Clearing needs no fsync: a region
  left dirty on disk only costs a republish after a crash. A region in use stays dirty for
  a keep window after its last write (as DRBD's activity log keeps hot extents), bounded
  by a count, so a hot region's next write costs nothing.
- **held regions** are those found dirty at start (a crash left them) and those of a failed
  local write (the image may hold bytes no record carries): nothing clears them until
  ``republished`` gives them the seq of the record that carries their current contents.
- **pages.** The bitmap is written in whole pages (``PAGE_BYTES``); every page written
  carries every bit that is set in memory, so a bit that was fsynced set is in every later
  version of its page until it is cleared (a torn write mixes two versions that both
  carry it).
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

DEFAULT_REGION_BYTES = 64 * 1024
MIN_REGION_BYTES = 4096
MAX_REGION_BYTES = 64 << 20
PAGE_BYTES = 4096
#: the file starts with one header page; the bitmap follows, page aligned
HEADER_BYTES = PAGE_BYTES
MAGIC = b"LMREGN01"
_HEADER = struct.Struct(">8sQQ")  # magic, region_bytes, nregions


class RegionGeometryError(ValueError):
    """A region size, or a bitmap file's header, that the log cannot use."""


def check_region_bytes(region_bytes: int) -> int:
    if (
        isinstance(region_bytes, bool)
        or not isinstance(region_bytes, int)
        or not MIN_REGION_BYTES <= region_bytes <= MAX_REGION_BYTES
        or region_bytes & (region_bytes - 1)
    ):
        raise RegionGeometryError(
            f"region_bytes {region_bytes!r} must be a power of two between "
            f"{MIN_REGION_BYTES} and {MAX_REGION_BYTES}"
        )
    return region_bytes


def region_count(size: int, region_bytes: int) -> int:
    return -(-size // region_bytes)


def region_span(offset: int, length: int, region_bytes: int) -> range:
    """The regions ``[offset, offset + length)`` touches (empty for length 0)."""
    if offset < 0 or length <= 0:
        if offset < 0 or length < 0:
            raise ValueError(f"range ({offset}, {length}) is negative")
        return range(0)
    return range(offset // region_bytes, (offset + length - 1) // region_bytes + 1)


def runs(regions: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs of adjacent regions as (first, count), in order."""
    first = prev = -2
    for r in sorted(set(regions)):
        if r != prev + 1:
            if prev >= 0:
                yield first, prev - first + 1
            first = r
        prev = r
    if prev >= 0:
        yield first, prev - first + 1


def byte_ranges(
    regions: Iterable[int], region_bytes: int, size: int, max_bytes: int = 1 << 20
) -> list[tuple[int, int]]:
    """The bytes of ``regions`` inside a volume of ``size`` as (offset, length), adjacent
    regions coalesced into ranges of at most ``max_bytes`` (a multiple of region_bytes)."""
    step = max(1, max_bytes // region_bytes)
    out = []
    for first, count in runs(regions):
        for r in range(first, first + count, step):
            start = r * region_bytes
            end = min(size, (min(r + step, first + count)) * region_bytes)
            if end > start:
                out.append((start, end - start))
    return out


def regions_of_ranges(ranges: Iterable[tuple[int, int]], region_bytes: int) -> set[int]:
    out: set[int] = set()
    for offset, length in ranges:
        out.update(region_span(offset, length, region_bytes))
    return out


# ---------------------------------------------------------------- the file's bytes


def bitmap_len(nregions: int) -> int:
    """Bytes of the bitmap of ``nregions`` regions, rounded up to whole pages."""
    nbytes = -(-nregions // 8)
    return max(PAGE_BYTES, -(-nbytes // PAGE_BYTES) * PAGE_BYTES)


def encode_header(region_bytes: int, nregions: int) -> bytes:
    return _HEADER.pack(MAGIC, region_bytes, nregions).ljust(HEADER_BYTES, b"\0")


def decode_header(raw: bytes) -> tuple[int, int]:
    """(region_bytes, nregions) of a bitmap file's first page; ``RegionGeometryError``."""
    if len(raw) < _HEADER.size:
        raise RegionGeometryError(f"header is {len(raw)} bytes, shorter than {_HEADER.size}")
    magic, region_bytes, nregions = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise RegionGeometryError(f"magic {magic!r} is not {MAGIC!r}")
    check_region_bytes(region_bytes)
    return region_bytes, nregions


def set_bits(bitmap: bytes, nregions: int) -> list[int]:
    """The regions whose bit is set (bits past ``nregions`` are ignored)."""
    out = []
    for i, byte in enumerate(bitmap[: -(-nregions // 8)]):
        if byte:
            for bit in range(8):
                if byte >> bit & 1 and i * 8 + bit < nregions:
                    out.append(i * 8 + bit)
    return out


# ---------------------------------------------------------------- the state


class _Region:
    __slots__ = ("held", "last_seq", "last_use", "pending", "set_gen")

    def __init__(self, set_gen: int, held: bool) -> None:
        self.pending = 0  # writes marked, not yet assigned or released
        self.last_seq = 0  # the highest seq of a record covering it
        self.last_use = 0.0  # when a write last got a seq on it (the keep window)
        self.set_gen = set_gen  # the flush generation whose fsync makes the bit durable
        self.held = held  # not cleared until republished


class Marked(NamedTuple):
    """What ``mark`` did: the regions of the write, and the flush generation the write
    waits for (durable once ``durable_gen >= gen``); ``new`` bits it set. (A tuple: one is
    made per write, and a frozen dataclass costs three times as much to build.)"""

    regions: range
    gen: int
    new: int


class PagedBits:
    """A bitmap written in whole pages, with flush generations: a bit set now joins ``gen``;
    ``begin_flush`` closes it, ``end_flush(synced=True)`` makes it durable."""

    def __init__(self, region_bytes: int, size: int) -> None:
        self.region_bytes = check_region_bytes(region_bytes)
        self.size = size
        self.nregions = region_count(size, region_bytes)
        self.bitmap = bytearray(bitmap_len(self.nregions))
        self._pages: set[int] = set()  # pages changed since the last begin_flush
        #: the generation a bit set now joins; begin_flush closes it and opens the next
        self.gen = 1
        self.durable_gen = 0
        #: a new bit waits for a flush (marks with gen > durable_gen exist)
        self.sync_wanted = False

    def _bit_on(self, region: int) -> None:
        self.bitmap[region >> 3] |= 1 << (region & 7)
        self._pages.add((region >> 3) // PAGE_BYTES)

    def _bit_off(self, region: int) -> None:
        self.bitmap[region >> 3] &= ~(1 << (region & 7)) & 0xFF
        self._pages.add((region >> 3) // PAGE_BYTES)

    def begin_flush(self) -> tuple[int, dict[int, bytes]]:
        """Close the current generation: (its number, the changed pages' bytes now)."""
        gen = self.gen
        self.gen += 1
        self.sync_wanted = False
        pages = {p: bytes(self.bitmap[p * PAGE_BYTES : (p + 1) * PAGE_BYTES]) for p in self._pages}
        self._pages.clear()
        return gen, pages

    def end_flush(self, gen: int, synced: bool) -> None:
        """The pages of ``gen`` are written; ``synced``: and fdatasynced."""
        if synced:
            self.durable_gen = max(self.durable_gen, gen)

    def pending_pages(self) -> bool:
        return bool(self._pages)

    def _resize_bits(self, size: int) -> None:
        self.size = size
        self.nregions = region_count(size, self.region_bytes)
        need = bitmap_len(self.nregions)
        if need > len(self.bitmap):
            self.bitmap.extend(bytes(need - len(self.bitmap)))
        else:
            del self.bitmap[need:]
            tail = self.nregions & 7
            if tail and self.nregions >> 3 < len(self.bitmap):
                self.bitmap[self.nregions >> 3] &= (1 << tail) - 1
        self._pages = {p for p in self._pages if p * PAGE_BYTES < len(self.bitmap)}


class DirtyRegions(PagedBits):
    """One volume's dirty bitmap and the rules that set and clear its bits. Not thread-safe
    (``region_log`` calls it under its lock)."""

    def __init__(self, region_bytes: int, size: int) -> None:
        super().__init__(region_bytes, size)
        self._dirty: dict[int, _Region] = {}
        self._heap: list[tuple[int, int]] = []  # (seq, region): a clear candidate from seq on
        #: (last_use, region) of regions whose records are durable, oldest first: cleared
        #: once older than the keep window (or when too many are dirty)
        self._cooling: deque[tuple[float, int]] = deque()

    # -- the bits

    def is_dirty(self, region: int) -> bool:
        return region in self._dirty

    def dirty(self) -> list[int]:
        return sorted(self._dirty)

    def held(self) -> list[int]:
        return sorted(r for r, st in self._dirty.items() if st.held)

    def __len__(self) -> int:
        return len(self._dirty)

    def _set(self, region: int, held: bool) -> _Region:
        st = _Region(self.gen, held)
        self._dirty[region] = st
        self._bit_on(region)
        return st

    def _unset(self, region: int) -> None:
        del self._dirty[region]
        self._bit_off(region)

    # -- a write's life

    def mark(self, offset: int, length: int) -> Marked:
        """Before the local write: its regions dirty, the write pending on each."""
        regions = region_span(offset, length, self.region_bytes)
        if regions and regions[-1] >= self.nregions:
            raise ValueError(f"range ({offset}, {length}) is past the volume's {self.size} bytes")
        need, new, dirty = 0, 0, self._dirty
        for r in regions:
            st = dirty.get(r)
            if st is None:
                st = self._set(r, held=False)
                new += 1
            st.pending += 1
            if st.set_gen > need:
                need = st.set_gen
        if need > self.durable_gen:
            self.sync_wanted = True
        return Marked(regions, need, new)

    def assign(self, regions: range, seq: int, now: float = 0.0) -> None:
        """The write's record got ``seq`` (at ``now``): its regions clear once seq is
        durable and the keep window since ``now`` has passed."""
        dirty, heap = self._dirty, self._heap
        for r in regions:
            st = dirty[r]
            st.pending -= 1
            if seq > st.last_seq:
                st.last_seq = seq
            if now > st.last_use:
                st.last_use = now
            heapq.heappush(heap, (st.last_seq, r))

    def release(self, regions: range, touched: bool) -> None:
        """The write will have no record. ``touched``: the image may hold some of its bytes,
        so its regions stay dirty until a republish carries them (held)."""
        for r in regions:
            st = self._dirty[r]
            st.pending -= 1
            if touched:
                st.held = True
            else:
                heapq.heappush(self._heap, (st.last_seq, r))

    def hold(self, regions: Iterable[int]) -> None:
        """Regions found dirty at start: set (durable: they came from the file), held."""
        for r in regions:
            if r >= self.nregions:
                continue
            st = self._dirty.get(r) or self._set(r, held=True)
            st.held = True
            st.set_gen = 0

    def republished(self, regions: range, seq: int) -> None:
        """Record ``seq`` carries the current contents of ``regions``: they clear with it."""
        for r in regions:
            st = self._dirty.get(r)
            if st is None:
                continue
            st.held = False
            st.last_seq = max(st.last_seq, seq)
            heapq.heappush(self._heap, (st.last_seq, r))

    def clear(
        self, durable_seq: int, now: float = 0.0, keep_s: float = 0.0, max_dirty: int = 0
    ) -> int:
        """Drop every region whose records are all durable (seq <= durable_seq), none
        pending, not held, and not used for ``keep_s`` before ``now`` (DRBD's activity
        log idea: a region in use stays dirty, so its next write costs no fsync), unless
        more than ``max_dirty`` (0: no bound) are dirty. Returns how many were cleared."""
        heap, cooling = self._heap, self._cooling
        while heap and heap[0][0] <= durable_seq:
            _seq, r = heapq.heappop(heap)
            st = self._dirty.get(r)
            if st is None or st.pending or st.held or st.last_seq > durable_seq:
                continue  # a later write, or a stale entry: a later entry decides
            cooling.append((st.last_use, r))
        cleared = 0
        while cooling and (
            cooling[0][0] <= now - keep_s or (max_dirty and len(self._dirty) > max_dirty)
        ):
            used, r = cooling.popleft()
            st = self._dirty.get(r)
            if st is None or st.pending or st.held or st.last_seq > durable_seq:
                continue  # written again: its next durable seq queues it again
            if st.last_use > used:
                continue  # used again since: a later entry of the queue stands for it
            self._unset(r)
            cleared += 1
        return cleared

    def resize(self, size: int) -> None:
        """The volume's new size: regions past it are dropped (their records come before
        the RESIZE in the volume's order), new ones are clean."""
        for r in [r for r in self._dirty if r >= region_count(size, self.region_bytes)]:
            self._unset(r)
        self._resize_bits(size)


class _Extent:
    __slots__ = ("fine_gen", "last_use", "pending", "set_gen")

    def __init__(self, set_gen: int) -> None:
        self.pending = 0  # writes marked, not yet assigned or released
        self.last_use = 0.0
        self.set_gen = set_gen
        #: the fine bitmap's generation that carries every fine bit its writes set
        self.fine_gen = 0


class ActivityLog(PagedBits):
    """DRBD's activity log over a ``DirtyRegions``: the extents (default 4 MiB) written
    lately. A write waits only for its *extent's* bit to be durable; the fine bitmap's bits
    are set in memory and flushed in the background. So a write to an active extent costs
    no fsync, however scattered the writes inside it.

    After a crash the regions that may differ from Kafka are the fine bitmap's bits on disk
    plus every region of the extents on disk (the fine bits set since the last fine flush
    are not on disk; their extent is). An extent is dropped (``evict``) only once no write
    on it is pending and the fine flush carrying its writes' bits is durable, and only after
    ``keep_s`` idle (a hot extent stays: its next write is free). What it costs: a crash
    republishes the active extents whole. Not thread-safe (``region_log``'s lock)."""

    def __init__(self, extent_bytes: int, size: int) -> None:
        super().__init__(extent_bytes, size)
        self._active: dict[int, _Extent] = {}

    def __len__(self) -> int:
        return len(self._active)

    def active(self) -> list[int]:
        return sorted(self._active)

    def mark(self, offset: int, length: int, fine_gen: int) -> Marked:
        """Before the local write (after the fine bitmap's mark, whose flush generation is
        ``fine_gen``): its extents active, the write pending on each."""
        extents = region_span(offset, length, self.region_bytes)
        if extents and extents[-1] >= self.nregions:
            raise ValueError(f"range ({offset}, {length}) is past the volume's {self.size} bytes")
        need, new, active = 0, 0, self._active
        for e in extents:
            st = active.get(e)
            if st is None:
                st = active[e] = _Extent(self.gen)
                self._bit_on(e)
                new += 1
            st.pending += 1
            if fine_gen > st.fine_gen:
                st.fine_gen = fine_gen
            if st.set_gen > need:
                need = st.set_gen
        if need > self.durable_gen:
            self.sync_wanted = True
        return Marked(extents, need, new)

    def done(self, extents: range, now: float) -> None:
        """The write's local part is over (its record queued, or none will come)."""
        for e in extents:
            st = self._active.get(e)
            if st is not None:  # None: a resize dropped it
                st.pending -= 1
                if now > st.last_use:
                    st.last_use = now

    def evict(self, now: float, keep_s: float, fine_durable_gen: int) -> int:
        """Drop the extents idle for ``keep_s`` whose fine bits are durable; how many."""
        gone = [
            e
            for e, st in self._active.items()
            if not st.pending and st.fine_gen <= fine_durable_gen and st.last_use <= now - keep_s
        ]
        for e in gone:
            del self._active[e]
            self._bit_off(e)
        return len(gone)

    def resize(self, size: int) -> None:
        """Extents past the new size go (the fine bitmap dropped their regions)."""
        for e in [e for e in self._active if e >= region_count(size, self.region_bytes)]:
            del self._active[e]
            self._bit_off(e)
        self._resize_bits(size)
