"""The planner's blocks on bad records (invariant 5), against a model, many seeds.

Tries to break: a valid record delivered in the same batch after a bad one being taken in;
a partition-EOF event, a later position or a spill (drop_pending) moving the position or the
checkpoint offsets past a bad record; a W whose records all lie before the bad record not
being applied; a block in one partition stalling another; a transaction marker just below
a bad record leaving the position short of it. And each kind of malformed record halts
the planner at once, naming where it lies.
"""

from __future__ import annotations

import random

import pytest

from pipeline.backup.plan import AddOutcome, ApplyPlanner
from pipeline.errors import ApplierHaltedError
from schemas.records import LogRecord, Progress, ProgressKind, Write, Zero, ZeroKind
from tests.backup.plan_logs import extent, write, zero

SEEDS = range(300)


def _log(rng: random.Random, partition: int, n: int) -> list[tuple[int, Write | None]]:
    """(offset, record or None for a gap: a transaction marker) of one partition."""
    out: list[tuple[int, Write | None]] = []
    off = 0
    for i in range(n):
        if rng.random() < 0.2:
            off += 1  # a commit marker occupies an offset and is never delivered
        ts = 1000 * (i + 1) + partition
        out.append((off, write(f"v{partition}", extent(ts, 0, bytes([i % 256]) * 8))))
        off += 1
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_nothing_at_or_after_a_block_is_consumed(seed: int) -> None:
    rng = random.Random(seed)
    logs = {p: _log(rng, p, rng.randrange(3, 25)) for p in (0, 1)}
    bad = {
        p: rng.choice(logs[p])[0] for p in (0, 1) if rng.random() < 0.7
    }  # partition -> offset of its bad record
    planner = ApplyPlanner(0)
    cursor = dict.fromkeys(logs, 0)
    taken: set[tuple[int, int]] = set()
    while any(cursor[p] < len(logs[p]) for p in logs):
        # one fetch batch: a run of records of random partitions, then maybe an EOF
        for _ in range(rng.randrange(1, 12)):
            p = rng.choice([q for q in logs if cursor[q] < len(logs[q])] or [0])
            if cursor[p] >= len(logs[p]):
                continue
            off, rec = logs[p][cursor[p]]
            cursor[p] += 1
            if planner.is_blocked(p, off):
                planner.note_position(p, off)  # the applier's filter: at or behind a bad one
                continue
            if bad.get(p) == off:
                planner.block(p, off)
                continue
            assert rec is not None
            outcome = planner.add(rec, p, off)
            assert outcome is not AddOutcome.BLOCKED
            taken.add((p, off))
        ended = [p for p in logs if cursor[p] == len(logs[p])]
        if ended and rng.random() < 0.5:  # partition EOF: its offset is the end of the log
            p = rng.choice(ended)
            planner.note_position(p, logs[p][-1][0] + 1 + rng.randrange(2))
        if rng.random() < 0.1:
            planner.drop_pending()  # a spill re-reads from the checkpoint offsets
            for p in logs:
                at = planner.checkpoint_offsets().get(p, 0)
                cursor[p] = next((i for i, (o, _r) in enumerate(logs[p]) if o >= at), len(logs[p]))
                taken = {(q, o) for q, o in taken if q != p or o < at}

        for p, off in bad.items():
            if planner.is_blocked(p, off):
                assert planner.positions()[p] <= off, "the position passed the bad record"
                assert planner.checkpoint_offsets()[p] <= off
                assert not any(q == p and o >= off for q, o in taken), "taken in after a block"
    for p, off in bad.items():
        assert planner.is_blocked(p, off), "a bad record the consumer read was not blocked"
        assert planner.positions()[p] == off, "read to the end, yet short of the bad record"
    # a W whose records all lie before every bad record is applied ...
    first_bad_ts = [
        rec.extents[0].ts for p, off in bad.items() for o, rec in logs[p] if o > off
    ]
    required = {p: bad.get(p, logs[p][-1][0] + 1) for p in logs}
    w = min(first_bad_ts, default=10**9) - 1
    assert planner.ready(w, required) and planner.blocked_by(required) is None
    applied = planner.take(w)
    assert all(op.ts <= w for op in applied)
    # ... and one that needs any partition past its bad record is never ready, and says why
    for p, off in bad.items():
        beyond = dict(required)
        beyond[p] = off + 1
        assert not planner.ready(w + 1, beyond)
        assert planner.blocked_by(beyond) == (p, off) or planner.blocked_by(beyond) in {
            (q, bad[q]) for q in bad
        }


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
