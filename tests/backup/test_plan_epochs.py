"""Zombie records in the planner: fenced epochs and departed instances (DESIGN invariant 5).

Tries to break: rejecting an older epoch only where a newer one is proven (in the same
partition, or by the member table as of given log offsets), keeping that evidence over a
restart, and rejecting a departed instance's records above its final S.
"""

from __future__ import annotations

from pipeline.backup.plan import AddOutcome, ApplyPlanner, OpKind
from schemas.records import Write, WriteExtent
from tests.backup.plan_logs import extent, ready_take, write, zero


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
