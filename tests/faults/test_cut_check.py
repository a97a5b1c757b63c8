"""The cut oracle must catch what it claims to: each test builds a cut by hand, then
breaks it the way a faulty backup would (a lost acknowledged write, a torn or foreign
block, a write past the causal frontier) and expects the oracle to say so."""

from __future__ import annotations

import pytest

from tests.faults.cut_check import (
    ACK,
    BLOCK,
    ERR,
    PENDING,
    block_for,
    check_cut,
    make_block,
    missing_acked,
)

BLOCKS = 8


def images_after(writes: dict[int, list[tuple[int, int]]]) -> dict[int, bytes]:
    """Images after applying writes [(seq, dep)] of each volume, in the order given."""
    out = {}
    for v, ws in writes.items():
        img = bytearray(BLOCKS * BLOCK)
        for seq, dep in ws:
            b = block_for(seq, BLOCKS)
            img[b * BLOCK : (b + 1) * BLOCK] = make_block(v, seq, dep)
        out[v] = bytes(img)
    return out


def history(n: int, deps: dict[int, int] | None = None) -> list[tuple[int, int]]:
    return [(s, (deps or {}).get(s, 0)) for s in range(1, n + 1)]


def test_a_prefix_of_both_volumes_is_a_cut():
    # 20 writes wrap the 8-block ring twice: overwritten writes are not missing
    imgs = images_after({0: history(20, {20: 5}), 1: history(7, {7: 3})})
    answers = {0: [ACK] * 25, 1: [ACK] * 9}
    assert check_cut(imgs, answers) == []
    assert check_cut(images_after({0: [], 1: []}), {0: [], 1: []}) == []


def test_a_hole_of_an_acknowledged_write_is_not_a_cut():
    writes = history(12)
    imgs = images_after({0: [w for w in writes if w[0] != 10], 1: []})
    problems = check_cut(imgs, {0: [ACK] * 12, 1: []})
    assert any("acknowledged seq 10" in p for p in problems), problems
    # the same hole is fine when write 10 got an error reply
    assert check_cut(imgs, {0: [ACK] * 9 + [ERR] + [ACK] * 2, 1: []}) == []


def test_a_write_past_the_causal_frontier_is_caught():
    # volume 1's seq 4 was issued after volume 0's seq 6 was acknowledged; 0 holds only 5
    imgs = images_after({0: history(5), 1: history(4, {4: 6})})
    problems = check_cut(imgs, {0: [ACK] * 6, 1: [ACK] * 4})
    assert any("after volume 0's seq 6" in p for p in problems), problems


@pytest.mark.parametrize("damage", ["torn", "foreign", "misplaced", "future"])
def test_damaged_blocks_are_caught(damage):
    imgs = images_after({0: history(6), 1: history(3)})
    img = bytearray(imgs[0])
    if damage == "torn":  # half of seq 2's block is seq 3's
        img[BLOCK + 2048 : 2 * BLOCK] = make_block(0, 3, 0)[2048:]
    elif damage == "foreign":  # volume 1's bytes in volume 0
        img[0:BLOCK] = make_block(1, 1, 0)
    elif damage == "misplaced":  # seq 2 written at seq 1's block
        img[0:BLOCK] = make_block(0, 2, 0)
    imgs[0] = bytes(img)
    answers = {0: [ACK] * (5 if damage == "future" else 6), 1: [ACK] * 3}
    assert check_cut(imgs, answers), f"{damage} block passed as a cut"


def test_missing_acked_sees_only_the_newest_acknowledged_write_per_block():
    writes = history(11)  # seqs 1..11 on 8 blocks: 9, 10, 11 overwrite 1, 2, 3
    answers = {0: [ACK] * 8 + [ERR, PENDING, ACK]}
    assert missing_acked(images_after({0: writes}), answers) == []
    # the backup lost seq 11 (block 2 still holds 3) and seq 9 errored (block 0 holds 1)
    lost = images_after({0: [*writes[:8], writes[9]]})
    problems = missing_acked(lost, answers)
    assert problems == ["volume 0 block 2: acknowledged seq 11 missing (holds seq 3)"]
