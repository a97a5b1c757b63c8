"""The planner's ordering and readiness rules, each on its own (DESIGN invariants 1 and 4).

Tries to break: the per-volume prefix and the deterministic order of ``take``; ``take``
before ``ready``; records already applied on a replay, and records straddling applied W;
ts going back or repeating within a volume, and a volume changing partition; a record
below W found above its log offsets (watermark safety); the pending-bytes budget, its
drop and the re-read after it.
"""

from __future__ import annotations

import pytest

from pipeline.backup.plan import PENDING_OVERHEAD_BYTES, AddOutcome, ApplyPlanner, OpKind
from pipeline.errors import ApplierHaltedError, ApplyError
from schemas.records import ZeroKind
from tests.backup.plan_logs import extent, marker, ready_take, write, zero


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
