"""The pure dirty-region rules (``pipeline.primary.regions``).

Tries to break: a write whose region is not set (or not in a durable generation) when it
may be acknowledged, a region cleared while a write on it is pending or its record is not
durable, a held region cleared before its republish, region arithmetic off by one at
boundaries, a bitmap page that drops a set bit.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.primary.regions import (
    PAGE_BYTES,
    DirtyRegions,
    RegionGeometryError,
    bitmap_len,
    byte_ranges,
    check_region_bytes,
    decode_header,
    encode_header,
    region_span,
    regions_of_ranges,
    runs,
    set_bits,
)

RB = 4096


def test_region_span_boundaries():
    assert region_span(0, 0, RB) == range(0)
    assert region_span(0, 1, RB) == range(0, 1)
    assert region_span(0, RB, RB) == range(0, 1)
    assert region_span(RB - 1, 2, RB) == range(0, 2)
    assert region_span(RB, RB, RB) == range(1, 2)
    assert region_span(10, 3 * RB, RB) == range(0, 4)
    with pytest.raises(ValueError):
        region_span(-1, 1, RB)


@pytest.mark.parametrize("bad", [0, 1000, 4095, 3 * 4096, 128 << 20, True, "64KiB"])
def test_region_bytes_must_be_a_power_of_two_in_bounds(bad):
    with pytest.raises(RegionGeometryError):
        check_region_bytes(bad)


def test_runs_and_byte_ranges_coalesce_and_clip():
    assert list(runs([5, 1, 2, 3, 7, 8])) == [(1, 3), (5, 1), (7, 2)]
    assert list(runs([])) == []
    # the last region is clipped to the size; chunks at most max_bytes
    assert byte_ranges([0, 1, 2, 3], RB, 3 * RB + 100, max_bytes=2 * RB) == [
        (0, 2 * RB),
        (2 * RB, RB + 100),
    ]
    assert byte_ranges([9], RB, 4 * RB) == []  # past the end: nothing


def test_header_round_trip_and_refusals():
    assert decode_header(encode_header(65536, 1234)) == (65536, 1234)
    with pytest.raises(RegionGeometryError):
        decode_header(b"NOTMAGIC" + bytes(4088))
    with pytest.raises(RegionGeometryError):
        decode_header(b"short")


def test_a_mark_waits_for_the_next_flush_and_an_already_set_region_costs_nothing():
    d = DirtyRegions(RB, 100 * RB)
    m1 = d.mark(0, 10)
    assert m1.new == 1 and m1.gen > d.durable_gen and d.sync_wanted
    m2 = d.mark(5, 10)  # same region, same generation: waits for the same flush
    assert m2.new == 0 and m2.gen == m1.gen
    gen, pages = d.begin_flush()
    assert gen == m1.gen and set(pages) == {0}
    m3 = d.mark(RB * 3, 1)  # a new bit while the flush runs: the next generation
    assert m3.gen == gen + 1
    d.end_flush(gen, synced=True)
    assert m1.gen <= d.durable_gen < m3.gen
    m4 = d.mark(0, RB)  # set and durable: free
    assert m4.new == 0 and m4.gen <= d.durable_gen


def test_written_but_not_synced_is_not_durable():
    d = DirtyRegions(RB, 10 * RB)
    m = d.mark(0, 1)
    gen, _pages = d.begin_flush()
    d.end_flush(gen, synced=False)  # a clear-only write-out: no fsync
    assert m.gen > d.durable_gen


def test_clear_needs_no_pending_write_and_every_seq_durable():
    d = DirtyRegions(RB, 10 * RB)
    a = d.mark(0, RB)
    b = d.mark(100, 10)  # same region 0
    d.assign(a.regions, 5)
    assert d.clear(10) == 0, "b is still pending on region 0"
    d.assign(b.regions, 7)
    assert d.clear(6) == 0, "seq 7 is not durable"
    assert d.clear(7) == 1 and not d.is_dirty(0)


def test_a_released_untouched_write_clears_and_a_touched_one_is_held():
    d = DirtyRegions(RB, 10 * RB)
    m = d.mark(0, 1)
    d.release(m.regions, touched=False)
    assert d.clear(0) == 1
    m = d.mark(RB, 1)
    d.release(m.regions, touched=True)
    assert d.clear(10**9) == 0 and d.held() == [1]
    d.republished(range(1, 2), 3)
    assert d.clear(2) == 0 and d.clear(3) == 1


def test_held_regions_wait_for_their_republish():
    d = DirtyRegions(RB, 10 * RB)
    d.hold([2, 3, 50])  # 50 is past the volume: ignored
    assert d.held() == [2, 3]
    m = d.mark(2 * RB, 1)  # a new write on a held region: free, and does not release it
    assert m.new == 0 and m.gen <= d.durable_gen
    d.assign(m.regions, 1)
    assert d.clear(100) == 0
    d.republished(range(2, 4), 9)
    assert d.clear(8) == 0 and d.clear(9) == 2


def test_a_region_in_use_stays_dirty_for_the_keep_window_within_the_bound():
    d = DirtyRegions(RB, 100 * RB)
    for r in range(5):
        m = d.mark(r * RB, 1)
        d.assign(m.regions, r + 1, now=10.0 + r)
    assert d.clear(5, now=11.0, keep_s=2.0) == 0, "all used within the window"
    assert d.clear(5, now=12.5, keep_s=2.0) == 1  # region 0 (used at 10.0)
    m = d.mark(RB, 1)  # region 1 is written again: free, and its window starts over
    assert m.new == 0
    d.assign(m.regions, 6, now=12.6)
    assert d.clear(6, now=14.1, keep_s=2.0) == 1  # region 2 (12.0); not 1 (12.6)
    assert d.dirty() == [1, 3, 4]
    assert d.clear(6, now=14.1, keep_s=2.0, max_dirty=1) == 2  # the bound: oldest first
    assert d.dirty() == [1]


def test_resize_drops_regions_past_the_end_and_grows_clean():
    d = DirtyRegions(RB, 10 * RB)
    d.hold([1, 9])
    d.resize(5 * RB)
    assert d.dirty() == [1]
    d.resize(PAGE_BYTES * 8 * RB * 2)  # two bitmap pages
    assert len(d.bitmap) == 2 * PAGE_BYTES and d.dirty() == [1]
    with pytest.raises(ValueError):
        d.mark(d.size, 1)


# ---------------------------------------------------------------- the model


ops = st.lists(
    st.one_of(
        st.tuples(st.just("mark"), st.integers(0, 63 * RB), st.integers(1, 3 * RB)),
        st.tuples(st.just("assign"), st.integers(0, 30), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 30), st.booleans()),
        st.tuples(st.just("durable"), st.integers(0, 5), st.just(False)),
        st.tuples(st.just("flush"), st.booleans(), st.just(False)),
        st.tuples(st.just("clear"), st.just(0), st.just(False)),
        st.tuples(st.just("time"), st.integers(0, 3), st.just(False)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([0.0, 1.5]), st.sampled_from([0, 3]))
def test_model_no_region_is_ever_clean_while_it_may_differ_from_kafka(program, keep_s, cap):
    """Random interleavings of marks, record seqs, releases, flushes (synced or not),
    Kafka durability and clears. After every step:

    - every region with a write that is pending, or whose record is not durable, or that
      a touched failure left, is set in the bitmap;
    - a mark counted durable has every region set in the last *synced* bitmap image;
    - the bitmap bytes and the dirty set agree.
    """
    size = 64 * RB
    d = DirtyRegions(RB, size)
    live: list[tuple[range, object]] = []  # marked, not yet ended
    unsafe: dict[int, int] = {}  # region -> highest seq whose record is not yet durable
    held: set[int] = set()
    pending: dict[int, int] = {}
    durable_seq = 0
    next_seq = 1
    now = 0.0
    synced_image = bytes(d.bitmap)
    for op, a, b in program:
        if op == "mark":
            if a + b > size:
                continue
            m = d.mark(a, b)
            live.append((m.regions, m))
            for r in m.regions:
                pending[r] = pending.get(r, 0) + 1
        elif op in ("assign", "release") and live:
            regions, _m = live.pop(a % len(live))
            for r in regions:
                pending[r] -= 1
            if op == "assign":
                d.assign(regions, next_seq, now)
                for r in regions:
                    unsafe[r] = next_seq
                next_seq += 1
            else:
                d.release(regions, touched=b)
                if b:
                    held.update(regions)
        elif op == "durable":
            durable_seq = min(next_seq - 1, durable_seq + a)
        elif op == "flush":
            gen, _pages = d.begin_flush()
            d.end_flush(gen, synced=a)
            if a:
                synced_image = bytes(d.bitmap)
        elif op == "clear":
            d.clear(durable_seq, now, keep_s, cap)
        elif op == "time":
            now += a
        must = {r for r, n in pending.items() if n} | held
        must |= {r for r, s in unsafe.items() if s > durable_seq}
        assert must <= set(d.dirty()), f"clean but may differ from Kafka: {must - set(d.dirty())}"
        assert set_bits(bytes(d.bitmap), d.nregions) == d.dirty()
        for regions, m in live:
            if m.gen <= d.durable_gen:  # type: ignore[attr-defined]
                on_disk = set(set_bits(synced_image, d.nregions))
                assert set(regions) <= on_disk, "a durable mark is not in the synced bitmap"


@given(st.sets(st.integers(0, 10_000), max_size=50), st.sampled_from([4096, 65536, 1 << 20]))
def test_byte_ranges_cover_exactly_the_regions(regions, rb):
    size = 10_001 * rb - 7
    ranges = byte_ranges(regions, rb, size, max_bytes=4 * rb)
    assert regions_of_ranges(ranges, rb) == {r for r in regions if r * rb < size}
    assert all(n <= 4 * rb for _o, n in ranges)


def test_bitmap_len_is_whole_pages():
    assert bitmap_len(1) == PAGE_BYTES
    assert bitmap_len(PAGE_BYTES * 8) == PAGE_BYTES
    assert bitmap_len(PAGE_BYTES * 8 + 1) == 2 * PAGE_BYTES
