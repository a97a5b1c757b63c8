"""``ApplyPlanner.take_early``: a backlog over budget streams through per volume, tried
against the model of ``test_plan_model``.

The driver, over budget with a W known, first takes each volume's ops with ts <= that W
early and applies them; only then drops and re-reads. After every take(w), the early ops
since the previous take plus take(w)'s are exactly the log's ops in (applied_w, w], per
volume in order, and the images equal the log applied to w, whatever the interleaving,
the budget, the re-reads and the crashes (which keep whatever reached the images).

Tries to break: an early op of a volume that overtakes one of its own not yet complete
(fragments) or not yet read; a CG-wide op taken early (a snapshot must see exactly its
ts); a zombie taken early; a record with ts <= W at or above W's offsets let through; a
tiny budget that a W's records exceed many times over stalling instead of converging.
"""

from __future__ import annotations

import random

import pytest

from pipeline.backup.plan import ApplyOp, ApplyPlanner, OpKind
from pipeline.errors import ApplierHaltedError
from tests.backup.plan_logs import apply_to, expected_ops, extent, image_at, make_log, write
from tests.backup.test_plan_model import Driver


class EarlyDriver(Driver):
    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.early: list = []
        self.early_total = 0
        self.rng = random.Random(0)

    def read(self, p: int, n: int) -> None:
        recs = self.log.parts[p]
        for _ in range(n):
            if self.cursor[p] >= len(recs):
                return
            r = recs[self.cursor[p]]
            self.planner.add(r.record, p, r.offset)
            self.cursor[p] += 1
            nxt = recs[self.cursor[p]].offset if self.cursor[p] < len(recs) else r.offset + 1
            self.planner.note_position(p, nxt)
            if self.planner.over_budget():
                w = self.published_w
                ops = self.planner.take_early(w, self.log.required_offsets(w, self.rng))
                for op in ops:
                    assert op.kind not in (OpKind.MARKER, OpKind.SNAPSHOT), op
                    assert op.ts <= w
                    apply_to(self.images, op)
                self.early.extend(ops)
                self.early_total += len(ops)
                if self.planner.over_budget():
                    self.drop()
                    return

    def apply(self, rng: random.Random | None = None) -> bool:
        w = self.published_w
        if not self.planner.ready(w, self.log.required_offsets(w, rng)):
            return False
        before = self.planner.applied_w
        ops = self.planner.take(w)
        got = [*self.early, *ops]
        self.early = []
        if w > before:
            # exactly the log's ops, per volume in order: nothing lost, nothing twice (a
            # re-read after a drop skips what was taken early), nothing foreign
            want = expected_ops(self.log, before, w)
            for v in {*self.log.volumes, None}:
                assert [id_of(o) for o in got if o.volume_id == v] == [
                    id_of(o) for o in want if o.volume_id == v
                ], v
            assert len(got) == len(want)
            for op in ops:
                apply_to(self.images, op)
            assert self.images == image_at(self.log, w)
            self.takes += 1
        return True

    def checkpoint(self) -> None:
        if not self.early:  # the applier holds checkpoints while ops were taken early
            super().checkpoint()

    def crash(self) -> None:
        self.early = []  # re-read from the checkpoint: what it hands out again is expected
        super().crash()


def id_of(op: ApplyOp) -> tuple:  # type: ignore[type-arg]
    return (op.volume_id, op.ts, op.kind, op.offset, op.length, op.data)


def simulate(seed: int, steps: int) -> EarlyDriver:
    rng = random.Random(seed)
    log = make_log(rng, rng.randint(1, 5), rng.randint(1, 4), steps)
    d = EarlyDriver(log, rng.choice([200, 500, 2000, 1 << 30]))
    d.rng = rng
    for _ in range(steps * 4):
        r = rng.random()
        if r < 0.45:
            d.read(rng.randrange(len(log.parts)), rng.randint(1, 8))
        elif r < 0.65:
            d.publish(rng.randint(0, 30))
        elif r < 0.85:
            d.apply(rng)
        elif r < 0.9:
            d.checkpoint()
        elif r < 0.95:
            d.crash()
        else:
            d.drop()
    d.drain()
    return d


def test_early_takes_converge_to_the_log_at_every_w_many_seeds() -> None:
    early = takes = 0
    for seed in range(400):
        d = simulate(seed, 80)
        early += d.early_total
        takes += d.takes
    assert early > 1000 and takes > 600, (early, takes)  # both paths were exercised


@pytest.mark.torture
def test_early_takes_torture() -> None:
    for seed in range(200_000, 201_000):
        simulate(seed, 400)


def test_one_w_over_many_budgets_streams_through_without_a_re_read() -> None:
    """The stall the drop-and-re-read had: one W covering far more than the budget."""
    p = ApplyPlanner(0, max_pending_bytes=1000)
    rng = random.Random(3)
    early: list[ApplyOp] = []
    size = 100
    image = bytearray(size)
    for offset, ts in enumerate(range(1, 401)):
        data = rng.randbytes(10)
        at = rng.randrange(size - 10)
        p.add(write("v", extent(ts, at, data)), 0, offset)
        image[at : at + 10] = data
        p.note_position(0, offset + 1)
        if p.over_budget():
            early += p.take_early(400, {0: 400})
            assert not p.over_budget()  # freed without dropping anything
    assert p.stats.dropped == 0 and len(early) > 300
    rest = p.take(400) if p.ready(400, {0: 400}) else []
    got = bytearray(size)
    for op in [*early, *rest]:
        apply_to({"v": got}, op)
    assert got == image and p.applied_w == 400


def test_an_unfinished_write_holds_back_its_volume_only() -> None:
    p = ApplyPlanner(0)
    p.add(write("a", extent(5, 0, b"xx", 0, 2, 4)), 0, 0)  # fragment 0 of 2
    p.add(write("b", extent(7, 0, b"zz")), 1, 0)
    ops = p.take_early(10, {0: 5, 1: 5})
    assert [(o.volume_id, o.ts) for o in ops] == [("b", 7)]  # a waits for its fragment
    p.add(write("a", extent(5, 2, b"ww", 1, 2, 4)), 0, 1)
    p.add(write("a", extent(6, 8, b"yy")), 0, 2)
    assert [(o.volume_id, o.ts) for o in p.take_early(10, {0: 5, 1: 5})] == [("a", 5), ("a", 6)]
    assert p.take_early(4, {0: 5, 1: 5}) == []  # nothing at or below applied_w... or w


def test_a_record_at_or_above_ws_offsets_halts_an_early_take() -> None:
    p = ApplyPlanner(0)
    p.add(write("a", extent(5, 0, b"xx")), 0, 7)
    with pytest.raises(ApplierHaltedError, match="watermark safety"):
        p.take_early(10, {0: 7})
