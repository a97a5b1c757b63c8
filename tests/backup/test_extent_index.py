"""ExtentIndex against a model: per volume a bytearray of the newest bytes and a "known"
bitmap of which bytes the index holds. Tries to break: overlapping and adjacent inserts,
zeroes over writes and back, drops that split extents, take_some in the middle of a run."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.backup.extent_index import ExtentIndex, Piece, Spilled, Zeroes, _Starts

SIZE = 256
VOLUMES = ("a", "b")

offsets = st.integers(0, SIZE - 1)


def piece_bytes(piece: Piece, length: int, spill: bytes) -> bytes:
    if isinstance(piece, memoryview):
        assert len(piece) == length
        return bytes(piece)
    if isinstance(piece, Spilled):
        return spill[piece.pos : piece.pos + length]
    assert isinstance(piece, Zeroes)
    return bytes(length)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.load = _Starts.LOAD
        _Starts.LOAD = 2  # short lists: splits and emptied lists on every run
        self.index = ExtentIndex()
        self.model = {v: bytearray(SIZE) for v in VOLUMES}
        self.known = {v: [False] * SIZE for v in VOLUMES}
        self.punch = {v: [False] * SIZE for v in VOLUMES}
        # the "image": what take_some rolled forward so far (unknown bytes: never written)
        self.image = {v: bytearray(SIZE) for v in VOLUMES}
        self.truth = {v: bytearray(SIZE) for v in VOLUMES}  # image overlaid with the index
        self.spill = bytearray()
        self.counter = 0

    def _span(self, offset: int, length: int) -> int:
        return min(length, SIZE - offset)

    def _fill(self, n: int) -> bytes:
        self.counter += 1
        return bytes((self.counter * 7 + i) % 251 + 1 for i in range(n))

    @rule(vol=st.sampled_from(VOLUMES), offset=offsets, length=st.integers(1, 64))
    def add_write(self, vol: str, offset: int, length: int) -> None:
        length = self._span(offset, length)
        data = self._fill(length)
        self.index.add_write(vol, offset, data)
        self._note(vol, offset, data, punch=False)

    @rule(vol=st.sampled_from(VOLUMES), offset=offsets, length=st.integers(1, 64))
    def add_spilled(self, vol: str, offset: int, length: int) -> None:
        length = self._span(offset, length)
        data = self._fill(length)
        pos = len(self.spill)
        self.spill += data
        self.index.add_spilled(vol, offset, length, pos)
        self._note(vol, offset, data, punch=False)

    @rule(
        vol=st.sampled_from(VOLUMES), offset=offsets, length=st.integers(1, 96), punch=st.booleans()
    )
    def add_zero(self, vol: str, offset: int, length: int, punch: bool) -> None:
        length = self._span(offset, length)
        self.index.add_zero(vol, offset, length, punch=punch)
        self._note(vol, offset, bytes(length), punch=punch)

    @rule(vol=st.sampled_from(VOLUMES), offset=offsets, length=st.integers(1, 96))
    def drop(self, vol: str, offset: int, length: int) -> None:
        length = self._span(offset, length)
        expected = sum(self.known[vol][offset : offset + length])
        assert self.index.drop(vol, offset, length) == expected
        data = self._fill(length)  # the foreground write that won the range
        for i in range(length):
            self.known[vol][offset + i] = False
        self.image[vol][offset : offset + length] = data
        self.truth[vol][offset : offset + length] = data

    @rule(vol=st.sampled_from(VOLUMES), offset=offsets)
    def drop_from(self, vol: str, offset: int) -> None:
        expected = sum(self.known[vol][offset:])
        assert self.index.drop_from(vol, offset) == expected
        for i in range(offset, SIZE):
            self.known[vol][i] = False
            self.truth[vol][i] = self.image[vol][i]

    @rule(max_bytes=st.integers(0, 200))
    def take_some(self, max_bytes: int) -> None:
        before = self.index.bytes_indexed
        taken = self.index.take_some(max_bytes)
        assert sum(e.length for e in taken) == before - self.index.bytes_indexed
        if before:
            assert taken
        self._apply(taken)

    def _apply(self, taken: list) -> None:  # type: ignore[type-arg]
        seen: dict[str, list[tuple[int, int]]] = {}
        for e in taken:
            for s, n in seen.get(e.volume_id, []):  # extents never overlap
                assert e.offset + e.length <= s or s + n <= e.offset
            seen.setdefault(e.volume_id, []).append((e.offset, e.length))
            data = piece_bytes(e.piece, e.length, bytes(self.spill))
            for i in range(e.length):
                assert self.known[e.volume_id][e.offset + i]
                if isinstance(e.piece, Zeroes):
                    assert e.piece.punch == self.punch[e.volume_id][e.offset + i]
                self.known[e.volume_id][e.offset + i] = False
            self.image[e.volume_id][e.offset : e.offset + e.length] = data

    def _note(self, vol: str, offset: int, data: bytes, *, punch: bool) -> None:
        for i, b in enumerate(data):
            self.known[vol][offset + i] = True
            self.punch[vol][offset + i] = punch
            self.model[vol][offset + i] = b
            self.truth[vol][offset + i] = b

    @rule(vol=st.sampled_from(VOLUMES), offset=offsets, length=st.integers(0, SIZE))
    def lookup(self, vol: str, offset: int, length: int) -> None:
        length = self._span(offset, length)
        segs = self.index.lookup(vol, offset, length)
        pos = offset
        for s, n, piece in segs:
            assert s == pos and n > 0
            pos += n
            if piece is None:
                assert not any(self.known[vol][s : s + n])
                got = bytes(self.image[vol][s : s + n])
            else:
                assert all(self.known[vol][s : s + n])
                got = piece_bytes(piece, n, bytes(self.spill))
            assert got == bytes(self.truth[vol][s : s + n])
        assert pos == offset + length
        # no two adjacent None segments: every gap is one segment
        assert all(not (a[2] is None and b[2] is None) for a, b in itertools.pairwise(segs))

    @invariant()
    def totals(self) -> None:
        known = sum(sum(k) for k in self.known.values())
        assert self.index.bytes_indexed == known
        assert self.index.volumes() == sorted(v for v in VOLUMES if any(self.known[v]))
        count = 0
        for vol in VOLUMES:
            ext = self.index.extents(vol)
            count += len(ext)
            for e, f in itertools.pairwise(ext):
                assert e.offset + e.length <= f.offset  # sorted, non-overlapping
        assert self.index.extent_count == count == len(self.index)

    @precondition(lambda self: True)
    @rule()
    def roll_all_forward(self) -> None:
        """take_some until empty: the image then equals the model, the index is empty."""
        while self.index.extent_count:
            self._apply(self.index.take_some(37))
        assert self.index.bytes_indexed == 0 and self.index.resident_bytes == 0
        for vol in VOLUMES:
            assert self.image[vol] == self.truth[vol]

    def teardown(self) -> None:
        try:
            self.roll_all_forward()
        finally:
            _Starts.LOAD = self.load


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_insert_keeps_a_reference_and_slices_without_copying() -> None:
    buf = bytearray(b"x" * 64)
    index = ExtentIndex()
    index.add_write("v", 0, buf)
    index.add_write("v", 16, b"y" * 16)
    head = index.lookup("v", 0, 8)[0][2]
    assert isinstance(head, memoryview) and head.obj is buf
    buf[0] = ord("z")  # by reference: the caller's buffer is what the index serves
    assert bytes(head)[:1] == b"z"
    assert index.resident_bytes == 64 and index.extent_count == 3


def test_empty_and_out_of_range() -> None:
    index = ExtentIndex()
    assert index.lookup("v", 10, 0) == []
    assert index.lookup("v", 10, 5) == [(10, 5, None)]
    assert index.take_some(100) == []
    assert index.drop("v", 0, 10) == 0
    with pytest.raises(ValueError):
        index.add_zero("v", -1, 4)
    index.add_zero("v", 0, 0)
    assert index.extent_count == 0 and index.volumes() == []


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from("arp"), st.integers(0, 60)), max_size=200),
    queries=st.lists(st.tuples(st.integers(-2, 62), st.integers(-2, 62)), max_size=20),
    load=st.integers(1, 4),
)
def test_starts_against_a_sorted_list(
    ops: list[tuple[str, int]], queries: list[tuple[int, int]], load: int
) -> None:
    saved, _Starts.LOAD = _Starts.LOAD, load
    try:
        starts, model = _Starts(), set()
        for what, x in ops:
            if what == "a" and x not in model:
                starts.add(x)
                model.add(x)
            elif what == "r" and x in model:
                starts.remove(x)
                model.discard(x)
            elif what == "p" and model:
                assert starts.pop() == max(model)
                model.discard(max(model))
            assert list(starts) == sorted(model) and len(starts) == len(model)
            assert all(len(lst) <= 2 * load and lst for lst in starts.lists)
            assert starts.maxes == [lst[-1] for lst in starts.lists]
        for lo, hi in queries:
            assert starts.between(lo, hi) == sorted(e for e in model if lo < e < hi)
            below = [e for e in model if e <= lo]
            assert starts.floor(lo) == (max(below) if below else None)
            assert starts.around(lo, hi) == (starts.floor(lo), starts.between(lo, hi))
    finally:
        _Starts.LOAD = saved
