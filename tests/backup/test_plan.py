"""Tries to break the apply planner (DESIGN invariants 1, 4 and 5).

Generated logs: several volumes over several partitions, writes batched several to a
Kafka record and split into fragments across records, zeros, trims, volume changes,
markers and snapshots, interceptor restarts (new epochs) and zombie records from fenced
epochs. A consumer reads partitions in random interleavings, W moves in random steps,
the planner drops its backlog (budget) and re-reads, and "crashes" (a new planner from
checkpoint_offsets + applied_w, re-reading from there) while the images keep whatever
was applied. After every take(w) the ops must be exactly the log's ops in (applied_w, w]
in order, and the images must equal the images built by applying every legitimate
record with ts <= w directly in ts order. Plus: each halt condition on its own.
"""

from __future__ import annotations

import bisect
import dataclasses
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pipeline.backup.plan import (
    PENDING_OVERHEAD_BYTES,
    AddOutcome,
    ApplyOp,
    ApplyPlanner,
    OpKind,
)
from pipeline.errors import ApplierHaltedError, ApplyError
from schemas.records import (
    LogRecord,
    Marker,
    Progress,
    ProgressKind,
    Snapshot,
    VolumeChange,
    VolumeOp,
    Write,
    WriteExtent,
    Zero,
    ZeroKind,
)

IMAGE_SIZE = 64


# ---- record builders -------------------------------------------------------------------


def extent(
    ts: int, offset: int, data: bytes, index: int = 0, count: int = 1, length: int | None = None
) -> WriteExtent:
    return WriteExtent(ts, offset, len(data) if length is None else length, index, count, data)


def write(vol: str, *extents: WriteExtent, iid: str = "i0", epoch: int = 0) -> Write:
    return Write(vol, iid, epoch, tuple(extents))


def zero(
    vol: str,
    ts: int,
    offset: int,
    length: int,
    kind: ZeroKind = ZeroKind.ZERO,
    iid: str = "i0",
    epoch: int = 0,
) -> Zero:
    return Zero(vol, iid, epoch, ts, offset, length, kind)


def marker(name: str, ts: int, iid: str = "i0", epoch: int = 0) -> Marker:
    return Marker(name, ts, iid, epoch, 0)


# ---- a generated log with its expected ops ----------------------------------------------


@dataclasses.dataclass
class Rec:
    partition: int
    offset: int
    record: LogRecord
    zombie: bool
    min_ts: int
    max_ts: int


@dataclasses.dataclass
class Log:
    parts: list[list[Rec]]
    ops: list[ApplyOp]  # every legitimate op, ts ascending (ts are unique across the CG)
    volumes: list[str]

    @property
    def max_ts(self) -> int:
        return self.ops[-1].ts

    def required_offsets(self, w: int, rng: random.Random | None = None) -> dict[int, int]:
        """A valid log_offsets for W: every legitimate record with ts <= w lies below it.

        Tight (just past the last such record) unless rng asks for some slack, as a
        service reading end offsets later would give.
        """
        out = {}
        for p, recs in enumerate(self.parts):
            end = 0
            for r in recs:
                if not r.zombie and r.min_ts <= w:
                    end = r.offset + 1
            if rng is not None and recs and rng.random() < 0.5:
                later = [r.offset + 1 for r in recs if r.offset + 1 >= end]
                end = rng.choice(later) if later else end
            out[p] = end
        return out


def make_log(rng: random.Random, n_vol: int, n_part: int, steps: int) -> Log:
    iids = ["i0", "i1"]
    epoch = {i: rng.randrange(3) for i in iids}
    vols = [f"v{k}" for k in range(n_vol)]
    part_of = {v: rng.randrange(n_part) for v in vols}
    owner = {v: rng.choice(iids) for v in vols}
    parts: list[list[Rec]] = [[] for _ in range(n_part)]
    next_off = [rng.randrange(3) for _ in range(n_part)]
    ops: list[ApplyOp] = []
    batch: dict[str, list[WriteExtent]] = {v: [] for v in vols}
    batch_epoch: dict[str, int] = {}
    newest_in_part: dict[tuple[str, int], int] = {}  # (iid, partition) -> epoch seen there
    ts = rng.randrange(1, 50)

    def emit(p: int, rec: LogRecord, tss: list[int], zombie: bool = False) -> None:
        parts[p].append(Rec(p, next_off[p], rec, zombie, min(tss), max(tss)))
        next_off[p] += 1 + (rng.random() < 0.2)  # gaps, as transaction markers leave
        if not zombie:
            key = (rec.interceptor_id, p)
            newest_in_part[key] = max(newest_in_part.get(key, -1), rec.epoch)

    def flush(v: str) -> None:
        if batch[v]:
            rec = write(v, *batch[v], iid=owner[v], epoch=batch_epoch[v])
            emit(part_of[v], rec, [x.ts for x in batch[v]])
            batch[v] = []

    last_ts: dict[str | None, int] = {}

    def tick(key: str | None) -> int:
        """The next ts for a volume (or for CG-wide records: None); volumes may share one."""
        nonlocal ts
        if last_ts.get(key, -1) >= ts or rng.random() < 0.7:
            ts += rng.randint(1, 3)
        last_ts[key] = ts
        return ts

    for v in vols:
        t = tick(v)
        rec = VolumeChange(VolumeOp.CREATE, v, v, IMAGE_SIZE, {}, t, owner[v], epoch[owner[v]])
        emit(part_of[v], rec, [t])
        ops.append(
            ApplyOp(OpKind.VOLUME_CHANGE, v, t, 0, IMAGE_SIZE, None, rec, owner[v], epoch[owner[v]])
        )

    for _ in range(steps):
        r = rng.random()
        v = rng.choice(vols)
        iid, e = owner[v], epoch[owner[v]]
        if r < 0.45:
            t = tick(v)
            off = rng.randrange(IMAGE_SIZE)
            length = rng.randint(1, min(24, IMAGE_SIZE - off))
            data = rng.randbytes(length)
            count = 1 if length == 1 or rng.random() < 0.5 else rng.randint(2, min(4, length))
            cuts = sorted(rng.sample(range(1, length), count - 1)) if count > 1 else []
            bounds = [0, *cuts, length]
            order = list(range(count))
            if rng.random() < 0.3:
                rng.shuffle(order)  # the planner must not rely on arrival order
            batch_epoch[v] = e
            for i in order:
                frag = data[bounds[i] : bounds[i + 1]]
                batch[v].append(extent(t, off + bounds[i], frag, i, count, length))
                if rng.random() < 0.3:
                    flush(v)
                    batch_epoch[v] = e
            ops.append(ApplyOp(OpKind.WRITE, v, t, off, length, data, None, iid, e))
            if rng.random() < 0.4:
                flush(v)
        elif r < 0.58:
            flush(v)
            t = tick(v)
            off = rng.randrange(IMAGE_SIZE)
            length = rng.randint(0, IMAGE_SIZE - off)
            kind = rng.choice([ZeroKind.ZERO, ZeroKind.TRIM])
            emit(part_of[v], zero(v, t, off, length, kind, iid, e), [t])
            ops.append(ApplyOp(OpKind(kind.lower()), v, t, off, length, None, None, iid, e))
        elif r < 0.66:
            t = tick(None)
            iid = rng.choice(iids)
            cg_rec: Marker | Snapshot = marker(f"m{t}", t, iid, epoch[iid])
            kind_of = OpKind.MARKER
            if rng.random() < 0.5:
                cg_rec = Snapshot(f"m{t}", t, tuple(vols), iid, epoch[iid])
                kind_of = OpKind.SNAPSHOT
            emit(rng.randrange(n_part), cg_rec, [t])
            ops.append(ApplyOp(kind_of, None, t, 0, 0, None, cg_rec, iid, epoch[iid]))
        elif r < 0.70:
            flush(v)
            t = tick(v)
            rec = VolumeChange(VolumeOp.RESIZE, v, v, IMAGE_SIZE, {"k": "x"}, t, iid, e)
            emit(part_of[v], rec, [t])
            ops.append(ApplyOp(OpKind.VOLUME_CHANGE, v, t, 0, IMAGE_SIZE, None, rec, iid, e))
        elif r < 0.75:
            # restart: the old instance's records are all out before the new one writes
            for u in vols:
                if owner[u] == iid:
                    flush(u)
            epoch[iid] += rng.randint(1, 3)
        elif r < 0.82:
            # a zombie: an older epoch after the newer one already showed in this partition
            cands = [(i, p, ep) for (i, p), ep in newest_in_part.items() if ep > 0]
            if cands:
                i, p, ep = rng.choice(cands)
                old = rng.randrange(ep)
                zts = rng.randrange(0, ts + 30)
                zv = rng.choice([u for u in vols if part_of[u] == p] or vols)
                if rng.random() < 0.5:
                    rec = write(zv, extent(zts, 0, b"Z" * 8), iid=i, epoch=old)
                    emit(p, rec, [zts], zombie=True)
                else:
                    emit(p, zero(zv, zts, 0, IMAGE_SIZE, ZeroKind.ZERO, i, old), [zts], zombie=True)
        else:
            flush(v)
    for v in vols:
        flush(v)
    # take()'s documented order: ts, then volume ops before CG-wide ones, then volume id
    ops.sort(key=lambda op: (op.ts, op.volume_id is None, op.volume_id or ""))
    return Log(parts, ops, vols)


def image_at(log: Log, w: int) -> dict[str, bytearray]:
    images = {v: bytearray(IMAGE_SIZE) for v in log.volumes}
    for op in log.ops:
        if op.ts > w:
            break
        apply_to(images, op)
    return images


def apply_to(images: dict[str, bytearray], op: ApplyOp) -> None:
    if op.kind is OpKind.WRITE:
        assert op.data is not None and op.volume_id is not None
        images[op.volume_id][op.offset : op.offset + op.length] = op.data
    elif op.kind in (OpKind.ZERO, OpKind.TRIM):
        assert op.volume_id is not None
        images[op.volume_id][op.offset : op.offset + op.length] = bytes(op.length)


def expected_ops(log: Log, after: int, upto: int) -> list[ApplyOp]:
    return [op for op in log.ops if after < op.ts <= upto]


# ---- the consumer / applier around the planner -----------------------------------------


class Driver:
    """What the applier does, with the choices left to the caller (rng or hypothesis)."""

    def __init__(self, log: Log, budget: int) -> None:
        self.log = log
        self.budget = budget
        self.planner = ApplyPlanner(max_pending_bytes=budget)
        self.cursor = [0] * len(log.parts)
        self.images = {v: bytearray(IMAGE_SIZE) for v in log.volumes}
        self.published_w = 0
        self.high_w = 0  # highest W applied to the images (survives crashes)
        self.ckpt: tuple[int, dict[int, int], list] = (0, {}, [])
        self.takes = 0

    def read(self, p: int, n: int) -> None:
        recs = self.log.parts[p]
        for _ in range(n):
            if self.cursor[p] >= len(recs):
                return
            r = recs[self.cursor[p]]
            applied = self.planner.applied_w
            out = self.planner.add(r.record, p, r.offset)
            if r.zombie:
                assert out is AddOutcome.REJECTED_STALE_EPOCH, r
            elif r.max_ts <= applied:
                assert out is AddOutcome.SKIPPED_APPLIED, r
            else:
                assert out is AddOutcome.ACCEPTED, r
            self.cursor[p] += 1
            nxt = recs[self.cursor[p]].offset if self.cursor[p] < len(recs) else r.offset + 1
            self.planner.note_position(p, nxt)
            if self.planner.over_budget():
                self.drop()
                return

    def publish(self, dw: int) -> None:
        self.published_w = min(self.published_w + dw, self.log.max_ts + 2)

    def apply(self, rng: random.Random | None = None) -> bool:
        w = self.published_w
        if not self.planner.ready(w, self.log.required_offsets(w, rng)):
            return False
        before = self.planner.applied_w
        ops = self.planner.take(w)
        if w <= before:
            assert ops == []
            return True
        assert ops == expected_ops(self.log, before, w)
        for op in ops:
            apply_to(self.images, op)
        assert w >= self.high_w  # the applier never goes back: W never decreases
        self.high_w = w
        assert self.images == image_at(self.log, w)
        self.takes += 1
        return True

    def seek(self, offsets: dict[int, int]) -> None:
        for p, recs in enumerate(self.log.parts):
            off = offsets.get(p, 0)
            self.cursor[p] = bisect.bisect_left([r.offset for r in recs], off)

    def drop(self) -> None:
        positions = self.planner.checkpoint_offsets()
        offsets = self.planner.drop_pending()
        assert self.planner.pending_bytes() == 0 and not self.planner.over_budget()
        for p, off in offsets.items():
            assert off <= positions[p]
        self.seek(offsets)

    def checkpoint(self) -> None:
        p = self.planner
        self.ckpt = (p.applied_w, p.checkpoint_offsets(), p.epoch_evidence())

    def crash(self) -> None:
        w, offsets, evidence = self.ckpt
        self.planner = ApplyPlanner(w, self.budget, evidence)
        self.seek(offsets)
        for p, off in offsets.items():
            self.planner.note_position(p, off)  # where the consumer was told to start

    def drain(self) -> None:
        """Read everything (ignoring the budget) and apply the last W."""
        self.planner.max_pending_bytes = 1 << 40
        for p in range(len(self.log.parts)):
            self.read(p, 10**9)
        self.published_w = self.log.max_ts + 2
        assert self.apply()
        assert self.images == image_at(self.log, self.log.max_ts)
        assert self.planner.pending_bytes() == 0
        ckpt = self.planner.checkpoint_offsets()
        for p, recs in enumerate(self.log.parts):
            if recs:
                assert ckpt[p] == recs[-1].offset + 1  # nothing pending: the position


class PlannerMachine(RuleBasedStateMachine):
    @initialize(
        seed=st.integers(0, 2**32 - 1),
        n_vol=st.integers(1, 4),
        n_part=st.integers(1, 3),
        steps=st.integers(5, 60),
        budget=st.sampled_from([1 << 30, 400, 1200]),
    )
    def setup(self, seed: int, n_vol: int, n_part: int, steps: int, budget: int) -> None:
        self.rng = random.Random(seed)
        self.d = Driver(make_log(self.rng, n_vol, n_part, steps), budget)

    @rule(p=st.integers(0, 2), n=st.integers(1, 6))
    def read(self, p: int, n: int) -> None:
        self.d.read(p % len(self.d.log.parts), n)

    @rule(dw=st.integers(0, 12))
    def publish(self, dw: int) -> None:
        self.d.publish(dw)

    @rule()
    def apply(self) -> None:
        self.d.apply(self.rng)

    @rule()
    def drop(self) -> None:
        self.d.drop()

    @rule()
    def checkpoint(self) -> None:
        self.d.checkpoint()

    @rule()
    def crash(self) -> None:
        self.d.crash()

    @invariant()
    def bookkeeping(self) -> None:
        p = self.d.planner
        assert p.pending_bytes() >= 0
        assert p.over_budget() == (p.pending_bytes() > p.max_pending_bytes)
        for part, off in p.checkpoint_offsets().items():
            recs = self.d.log.parts[part]
            pos = recs[self.d.cursor[part]].offset if self.d.cursor[part] < len(recs) else None
            assert pos is None or off <= pos

    def teardown(self) -> None:
        if hasattr(self, "d"):
            self.d.drain()


PlannerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_planner_machine = PlannerMachine.TestCase


def simulate(seed: int, steps: int) -> Driver:
    rng = random.Random(seed)
    log = make_log(rng, rng.randint(1, 5), rng.randint(1, 4), steps)
    d = Driver(log, rng.choice([1 << 30, 1 << 30, 500, 2000]))
    for _ in range(steps * 4):
        r = rng.random()
        if r < 0.45:
            d.read(rng.randrange(len(log.parts)), rng.randint(1, 8))
        elif r < 0.65:
            d.publish(rng.randint(0, 10))
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


def test_simulation_many_seeds() -> None:
    takes = 0
    for seed in range(300):
        takes += simulate(seed, 80).takes
    assert takes > 600  # the runs applied many times, not only in the final drain


@pytest.mark.torture
def test_simulation_torture() -> None:
    for seed in range(100_000, 101_000):
        simulate(seed, 400)


@pytest.mark.torture
def test_planner_machine_torture() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        PlannerMachine,
        settings=settings(max_examples=2000, stateful_step_count=150, deadline=None),
    )


# ---- each rule on its own -----------------------------------------------------------------


def ready_take(p: ApplyPlanner, w: int, offsets: dict[int, int] | None = None) -> list[ApplyOp]:
    assert p.ready(w, offsets or {})
    return p.take(w)


def test_per_volume_prefix_and_deterministic_order() -> None:
    p = ApplyPlanner()
    p.add(write("b", extent(10, 0, b"b1"), extent(30, 0, b"b3")), 0, 0)
    p.add(marker("m", 20), 1, 0)
    p.add(write("a", extent(20, 0, b"a2")), 1, 1)
    p.add(zero("a", 40, 0, 4, ZeroKind.TRIM), 1, 2)
    ops = ready_take(p, 25)
    assert [(o.kind, o.volume_id, o.ts) for o in ops] == [
        (OpKind.WRITE, "b", 10),
        (OpKind.WRITE, "a", 20),
        (OpKind.MARKER, None, 20),  # after every volume op of its ts
    ]
    assert p.checkpoint_offsets() == {0: 0, 1: 2}  # b's record still holds ts 30
    ops = ready_take(p, 100)
    assert [(o.kind, o.volume_id, o.ts, o.data) for o in ops] == [
        (OpKind.WRITE, "b", 30, b"b3"),
        (OpKind.TRIM, "a", 40, None),
    ]
    assert p.checkpoint_offsets() == {0: 1, 1: 3}
    assert p.stats.applied_ops == 5 and p.stats.applied_bytes == 6
    assert p.take(50) == [] and p.applied_w == 100  # an old W changes nothing


def test_take_before_ready_refuses() -> None:
    p = ApplyPlanner()
    p.add(write("a", extent(10, 0, b"x")), 0, 5)
    assert not p.ready(10, {0: 7})
    with pytest.raises(ApplyError, match="before ready"):
        p.take(10)
    p.note_position(0, 7)
    assert [o.ts for o in ready_take(p, 10, {0: 7})] == [10]


def test_skip_applied_on_replay_and_straddling_records() -> None:
    p = ApplyPlanner(applied_w=20)
    assert (
        p.add(write("a", extent(5, 0, b"x"), extent(20, 0, b"y")), 0, 0)
        is AddOutcome.SKIPPED_APPLIED
    )
    assert (
        p.add(write("a", extent(15, 0, b"x"), extent(25, 1, b"z")), 0, 1)
        is AddOutcome.ACCEPTED
    )
    assert p.add(zero("a", 3, 0, 1), 0, 2) is AddOutcome.SKIPPED_APPLIED  # no order error
    assert p.stats.skipped == 4
    assert [(o.ts, o.offset) for o in ready_take(p, 30)] == [(25, 1)]


def test_out_of_order_and_shared_ts_halt() -> None:
    p = ApplyPlanner()
    p.add(write("a", extent(10, 0, b"x")), 0, 0)
    with pytest.raises(ApplierHaltedError, match="goes back in ts"):
        p.add(zero("a", 9, 0, 1), 0, 1)
    with pytest.raises(ApplierHaltedError, match="repeats ts"):
        p.add(zero("a", 10, 0, 1), 0, 2)
    with pytest.raises(ApplierHaltedError, match="out of ts order"):
        p.add(write("b", extent(12, 0, b"x"), extent(11, 0, b"y")), 0, 3)
    p.add(zero("b", 5, 0, 1), 0, 4)  # other volumes are not ordered against a
    with pytest.raises(ApplierHaltedError, match="stay in one partition"):
        p.add(zero("b", 50, 0, 1), 1, 0)
    with pytest.raises(ApplyError, match="went back"):
        p.add(zero("c", 50, 0, 1), 0, 4)


def test_fragments_join_across_records_in_index_order() -> None:
    p = ApplyPlanner()
    p.add(write("a", extent(7, 0, b"x"), extent(10, 106, b"EF", 2, 3, 8)), 0, 0)
    assert [o.ts for o in ready_take(p, 8)] == [7]
    p.add(write("b", extent(9, 0, b"q")), 0, 1)
    p.add(write("a", extent(10, 100, b"ABCD", 0, 3, 8)), 0, 2)
    assert p.checkpoint_offsets() == {0: 0}
    p.add(write("a", extent(10, 104, b"??", 1, 3, 8)), 0, 3)
    (op,) = [o for o in ready_take(p, 10) if o.volume_id == "a"]
    assert (op.offset, op.length, op.data) == (100, 8, b"ABCD??EF")
    assert p.checkpoint_offsets() == {0: 4}


def test_fragment_tiling_gap() -> None:
    # index 2 claims offset 104 but index 1 ends at 106
    p = ApplyPlanner()
    p.add(write("a", extent(10, 100, b"ABCD", 0, 3, 6)), 0, 0)
    p.add(write("a", extent(10, 104, b"EF", 1, 3, 6)), 0, 1)
    with pytest.raises(ApplierHaltedError, match="must tile"):
        p.add(write("a", extent(10, 104, b"", 2, 3, 6)), 0, 2)


@pytest.mark.parametrize(
    ("extents", "match"),
    [
        ([extent(10, 0, b"ab", 0, 2, 4), extent(10, 2, b"cd", 0, 2, 4)], "repeats fragment 0"),
        ([extent(10, 0, b"ab", 0, 2, 4), extent(10, 2, b"cd", 1, 2, 5)], "does not belong"),
        ([extent(10, 0, b"ab", 0, 2, 4), extent(10, 2, b"cd", 1, 3, 4)], "does not belong"),
        ([extent(10, 0, b"ab", 0, 2, 4), extent(10, 3, b"c", 1, 2, 4)], "must tile"),
        (
            [extent(10, 0, b"ab", 0, 2, 5), extent(10, 2, b"cd", 1, 2, 5)],
            "with 4 bytes, declared 5",
        ),
        ([extent(10, 0, b"ab", 0, 2, 4), extent(11, 2, b"cd")], "still lacks fragments"),
        ([extent(10, 0, b"ab", 2, 2, 4)], "impossible extent"),
        ([extent(10, 0, b"abc", 0, 1, 2)], "3 bytes, declared 2"),
        ([extent(10, 0, b"ab"), extent(10, 2, b"ab", 1, 2, 4)], "does not belong"),
    ],
)
def test_fragment_errors(extents: list[WriteExtent], match: str) -> None:
    p = ApplyPlanner()
    with pytest.raises(ApplierHaltedError, match=match):
        for k, x in enumerate(extents):
            p.add(write("a", x), 0, k)


def test_missing_fragments_at_take_halt() -> None:
    p = ApplyPlanner()
    p.add(write("a", extent(10, 0, b"ab", 0, 2, 4)), 0, 0)
    p.add(write("b", extent(5, 0, b"z")), 0, 1)
    with pytest.raises(ApplierHaltedError, match=r"has fragments \[0\] of 2"):
        ready_take(p, 10)
    # nothing was taken by the failed call
    assert p.applied_w == 0 and p.checkpoint_offsets() == {0: 0}


def test_stale_epochs_are_rejected_only_when_proven() -> None:
    p = ApplyPlanner()
    # the new instance (epoch 9) shows up in partition 1 first ...
    assert (
        p.add(write("a", extent(50, 0, b"new"), iid="x", epoch=9), 1, 0)
        is AddOutcome.ACCEPTED
    )
    # ... while its predecessor's committed records in partition 0 are read later: legit
    assert (
        p.add(write("b", extent(40, 0, b"old"), iid="x", epoch=5), 0, 0)
        is AddOutcome.ACCEPTED
    )
    assert (
        p.add(write("b", extent(45, 0, b"new"), iid="x", epoch=9), 0, 1)
        is AddOutcome.ACCEPTED
    )
    # an epoch-5 record after an epoch-9 one in the same partition: a zombie
    out = p.add(write("b", extent(46, 0, b"zzz"), iid="x", epoch=5), 0, 2)
    assert out is AddOutcome.REJECTED_STALE_EPOCH and p.stats.rejected_stale_epoch == 1
    # the member table: y is at epoch 3 as of log offsets {0: 10, 1: 10}
    p.note_epoch("y", 3, {0: 10, 1: 10})
    assert p.add(zero("c", 47, 0, 1, iid="y", epoch=2), 0, 9) is AddOutcome.ACCEPTED
    assert (
        p.add(zero("c", 48, 0, 1, iid="y", epoch=2), 0, 10)
        is AddOutcome.REJECTED_STALE_EPOCH
    )
    assert p.add(zero("c", 49, 0, 1, iid="y", epoch=3), 0, 11) is AddOutcome.ACCEPTED
    ops = ready_take(p, 100)
    assert [o.data for o in ops if o.kind is OpKind.WRITE] == [b"old", b"new", b"new"]
    assert [o.ts for o in ops if o.kind is OpKind.ZERO] == [47, 49]
    # the evidence survives a restart through epoch_evidence()
    q = ApplyPlanner(100, epoch_evidence=p.epoch_evidence())
    assert (
        q.add(zero("c", 200, 0, 1, iid="x", epoch=5), 0, 12)
        is AddOutcome.REJECTED_STALE_EPOCH
    )
    assert q.add(zero("d", 200, 0, 1, iid="x", epoch=5), 2, 0) is AddOutcome.ACCEPTED


def test_record_below_w_above_its_log_offsets_halts() -> None:
    p = ApplyPlanner()
    p.add(write("a", extent(10, 0, b"x")), 0, 0)
    p.note_position(0, 3)
    assert [o.ts for o in ready_take(p, 20, {0: 3})] == [10]
    with pytest.raises(ApplierHaltedError, match="watermark safety broken"):
        p.add(zero("b", 15, 0, 1), 0, 3)
    q = ApplyPlanner()
    q.add(write("a", extent(10, 0, b"x")), 0, 0)
    q.add(write("b", extent(15, 0, b"x")), 0, 5)  # read before the W arrived
    q.note_position(0, 6)
    with pytest.raises(ApplierHaltedError, match="watermark safety broken"):
        ready_take(q, 20, {0: 3})
    assert q.applied_w == 0


def test_budget_drop_and_reread() -> None:
    p = ApplyPlanner(max_pending_bytes=3 * (100 + PENDING_OVERHEAD_BYTES))
    recs = [
        (0, 0, write("a", extent(10, 0, bytes(100)))),
        (1, 0, write("b", extent(11, 0, bytes(100)))),
        (0, 1, write("a", extent(12, 0, bytes(100)))),
        (1, 4, write("b", extent(13, 0, bytes(100)))),
    ]
    for k, (part, off, rec) in enumerate(recs):
        p.add(rec, part, off)
        assert p.pending_bytes() == (k + 1) * (100 + PENDING_OVERHEAD_BYTES)
        assert p.over_budget() == (k == 3)
    p.note_position(1, 6)
    assert p.ready(13, {0: 2, 1: 5})
    assert p.drop_pending() == {0: 0, 1: 0}
    assert p.pending_bytes() == 0 and p.stats.dropped == 4
    with pytest.raises(ApplyError, match="before ready"):
        p.take(13)  # must re-read first
    assert not p.ready(13, {0: 2, 1: 5})
    for part, off, rec in recs:
        p.add(rec, part, off)
    assert p.ready(13, {0: 2, 1: 5})
    assert [o.ts for o in p.take(11)] == [10, 11]
    assert p.checkpoint_offsets() == {0: 1, 1: 4}
    assert p.drop_pending() == {0: 1, 1: 4}
    assert p.checkpoint_offsets() == {0: 1, 1: 4}


@pytest.mark.parametrize(
    "record",
    [
        Progress("a", 0, ProgressKind.PROGRESS, 1, {}, 0),  # not a log record at all
        write("v"),  # a Write without extents
        Zero("v", "a", 0, 1, 0, None, ZeroKind.ZERO),  # type: ignore[arg-type]  # no length
        zero("v", 1, 0, 1, kind="FOO"),  # type: ignore[arg-type]
        zero("v", 1, -1, 1),
        # (a record lacking a field, e.g. a Marker without ts, can no longer be built)
    ],
)
def test_bad_records_halt(record: LogRecord) -> None:
    # the codec refuses all of these; the planner must not trust its input either
    with pytest.raises(ApplierHaltedError, match="partition 0 offset 0"):
        ApplyPlanner().add(record, 0, 0)


def test_departed_instance_records_above_its_final_s_are_rejected():
    """A zombie that Kafka's fencing missed: its epoch is not stale (nobody replaced it),
    but it left (or was fenced) with final S, so a record above S cannot be legitimate."""
    planner = ApplyPlanner()

    def write(ts: int, off: int) -> Write:
        return Write("v", "x", 7, (WriteExtent(ts, off, 1, 0, 1, b"z"),))

    planner.note_departed("x", 7, 100)
    assert planner.add(write(100, 0), 0, 0) == AddOutcome.ACCEPTED
    assert planner.add(write(101, 1), 0, 1) == AddOutcome.REJECTED_STALE_EPOCH
    planner.note_position(0, 2)
    assert planner.ready(200, {0: 2})
    assert [op.ts for op in planner.take(200)] == [100]
    assert planner.stats.rejected_stale_epoch == 1
