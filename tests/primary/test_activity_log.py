"""The activity log over the fine bitmap (``pipeline.primary.regions.ActivityLog``), pure.

Tries to break: a write that may be acknowledged (its extent's bit durable) whose region a
crash would forget: an extent evicted while a write on it is pending, or before the fine
flush carrying its writes' bits is durable, with marks landing between a flush's start and
its end; a resize that leaves an extent past the end; an idle extent never evicted.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.primary.regions import PAGE_BYTES, ActivityLog, DirtyRegions, set_bits

RB = 4096
EB = 4 * RB
SIZE = 64 * RB


class Disk:
    """A bitmap file as a crash leaves it: the pages of every flush that ended synced."""

    def __init__(self, bits: bytes) -> None:
        self.image = bytearray(bits)
        self.flush: tuple[int, dict[int, bytes]] | None = None

    def begin(self, bitmap) -> None:
        if self.flush is None:
            self.flush = bitmap.begin_flush()

    def end(self, bitmap) -> None:
        if self.flush is not None:
            gen, pages = self.flush
            for page, data in pages.items():
                self.image[page * PAGE_BYTES : page * PAGE_BYTES + len(data)] = data
            bitmap.end_flush(gen, synced=True)
            self.flush = None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("mark"), st.integers(0, 63 * RB), st.integers(1, 3 * RB)),
        st.tuples(st.just("assign"), st.integers(0, 30)),
        st.tuples(st.just("release"), st.integers(0, 30)),
        st.tuples(st.just("durable"), st.integers(0, 5)),
        st.tuples(st.sampled_from(["fine_begin", "fine_end", "al_begin", "al_end"]), st.just(0)),
        st.tuples(st.sampled_from(["fine_sync", "al_sync"]), st.just(0)),  # begin, then end
        st.tuples(st.sampled_from(["clear", "evict"]), st.just(0)),
        st.tuples(st.just("time"), st.integers(0, 3)),
    ),
    max_size=150,
)


def _run(program: list[tuple], keep: float) -> None:
    """After every step: each region of a write whose extent was durable (it may have been
    acknowledged) that is pending or whose record is not durable in Kafka is in what a
    crash leaves: the fine bits on disk, or a region of an extent on disk."""
    fine, al = DirtyRegions(RB, SIZE), ActivityLog(EB, SIZE)
    fine_disk, al_disk = Disk(bytes(fine.bitmap)), Disk(bytes(al.bitmap))
    live: list[tuple[object, object]] = []
    unsafe: dict[int, int] = {}  # region -> highest seq of an acknowledgeable write on it
    durable_seq, next_seq, now = 0, 1, 0.0
    for op, a, *rest in program:
        if op == "mark":
            if a + rest[0] > SIZE:
                continue
            m = fine.mark(a, rest[0])
            live.append((m, al.mark(a, rest[0], m.gen)))
        elif op in ("assign", "release") and live:
            m, e = live.pop(a % len(live))
            acked = e.gen <= al.durable_gen  # type: ignore[attr-defined]
            if op == "assign":
                fine.assign(m.regions, next_seq, now)  # type: ignore[attr-defined]
                if acked:
                    unsafe.update(dict.fromkeys(m.regions, next_seq))  # type: ignore[attr-defined]
                next_seq += 1
            else:
                fine.release(m.regions, touched=False)  # type: ignore[attr-defined]
            al.done(e.regions, now)  # type: ignore[attr-defined]
        elif op == "durable":
            durable_seq = min(next_seq - 1, durable_seq + a)
        elif op == "fine_begin":
            fine_disk.begin(fine)
        elif op == "fine_end":
            fine_disk.end(fine)
        elif op == "al_begin":
            al_disk.begin(al)
        elif op == "al_end":
            al_disk.end(al)
        elif op in ("fine_sync", "al_sync"):
            disk, bits = (fine_disk, fine) if op == "fine_sync" else (al_disk, al)
            disk.begin(bits)
            disk.end(bits)
        elif op == "clear":
            fine.clear(durable_seq, now, keep)
        elif op == "evict":
            al.evict(now, keep, fine.durable_gen)
        elif op == "time":
            now += a
        acked_live = {
            r
            for m, e in live
            if e.gen <= al.durable_gen  # type: ignore[attr-defined]
            for r in m.regions  # type: ignore[attr-defined]
        }
        at_risk = acked_live | {r for r, s in unsafe.items() if s > durable_seq}
        kept = set(set_bits(bytes(fine_disk.image), fine.nregions))
        for ext in set_bits(bytes(al_disk.image), al.nregions):
            kept.update(range(ext * EB // RB, (ext + 1) * EB // RB))
        assert at_risk <= kept, f"a crash now forgets {sorted(at_risk - kept)} (after {op})"
        assert set_bits(bytes(al.bitmap), al.nregions) == al.active()


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([0.0, 1.5]))
def test_model_a_crash_never_forgets_a_region_an_acknowledged_write_may_differ_in(program, keep):
    _run(program, keep)


KINDS = ["mark"] * 4 + ["assign"] * 3 + ["release", "durable", "fine_begin", "fine_end"]
KINDS += ["al_begin", "al_end", "fine_sync", "al_sync", "clear", "evict", "evict", "time"]


@pytest.mark.parametrize("block", range(4))
def test_model_seeded_walks(block):
    """The same model on 2,000 seeded random walks (hypothesis shrinks, these cover)."""
    for seed in range(block * 500, (block + 1) * 500):
        rng = random.Random(seed)
        program: list[tuple] = []
        for _ in range(rng.randrange(10, 80)):
            kind = rng.choice(KINDS)
            if kind == "mark":
                program.append((kind, rng.randrange(0, 63) * RB + rng.choice([0, 100]),
                                rng.randrange(1, 3 * RB)))  # fmt: skip
            else:
                program.append((kind, rng.randrange(0, 4)))
        _run(program, rng.choice([0.0, 1.5]))


def test_an_idle_extent_goes_once_its_fine_bits_are_durable_and_a_busy_one_stays():
    fine, al = DirtyRegions(RB, SIZE), ActivityLog(EB, SIZE)
    m = fine.mark(0, RB)
    e = al.mark(0, RB, m.gen)
    assert e.new == 1 and al.sync_wanted and al.active() == [0]
    assert al.mark(RB, RB, fine.mark(RB, RB).gen).new == 0  # the same extent: no new bit
    al.done(e.regions, 1.0)
    assert al.evict(10.0, 0.0, fine.durable_gen) == 0, "evicted with a write pending"
    al.done(range(0, 1), 1.0)
    assert al.evict(10.0, 0.0, fine.durable_gen) == 0, "evicted before its fine bits are durable"
    gen, _pages = fine.begin_flush()
    fine.end_flush(gen, synced=True)
    assert al.evict(1.5, 1.0, fine.durable_gen) == 0, "evicted inside the keep window"
    assert al.evict(2.0, 1.0, fine.durable_gen) == 1 and al.active() == []
    # a resize drops extents past the end, and a late done() on one is harmless
    e2 = al.mark(SIZE - RB, RB, 0)
    al.resize(SIZE // 2)
    assert al.active() == [] and al.nregions == SIZE // 2 // EB
    al.done(e2.regions, 3.0)
