"""Fragmented writes in the planner: a write split into fragments across records.

Tries to break: joining fragments that arrive in several records out of index order;
fragments that do not tile the write, repeat an index, belong to another write or leave
it short; a write still missing fragments when its W is taken (nothing may be taken then).
"""

from __future__ import annotations

import pytest

from pipeline.backup.plan import ApplyPlanner
from pipeline.errors import ApplierHaltedError
from schemas.records import WriteExtent
from tests.backup.plan_logs import extent, ready_take, write


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
