"""The oracle of the broker-fault tests: what blocks the workload writes, and whether a
backup image set is a causal cut of them, or misses an acknowledged write.

Each volume is written by one client, one write at a time, seq 1, 2, ...; write ``seq``
goes to block ``(seq - 1) % blocks`` and says, in its own bytes, its volume, its seq and
``dep``: the newest seq of the *other* volume acknowledged before it was issued. So the
images alone tell which write each block holds, and the history of answers tells which
writes were acknowledged. Written apart from the product, with nothing but ``hashlib``.

A set of images is a cut (invariant 1) when, for each volume with newest write ``m``:

- every block holds a whole write of this volume aimed at that block (none torn) and
  none newer than ``m``;
- no acknowledged write aimed at a block, newer than what the block holds and not newer
  than ``m``, is missing (writes are issued one after the other, so the cut is a prefix
  of them; writes answered with an error may be in it or not);
- a write holding ``dep = d`` implies the other volume's newest write is at least ``d``
  (write b issued after write a was acknowledged: a cut that holds b holds a).
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Mapping, Sequence

BLOCK = 4096
_HEAD = struct.Struct(">4sIQQ")  # magic, volume index, seq, dep
_MAGIC = b"LMNF"

#: answers to a write: acknowledged, error reply, no answer within the deadline, none yet
ACK, ERR, HANG, PENDING = "ack", "err", "hang", "pending"


def block_for(seq: int, blocks: int) -> int:
    return (seq - 1) % blocks


def make_block(volume: int, seq: int, dep: int) -> bytes:
    head = _HEAD.pack(_MAGIC, volume, seq, dep)
    fill = hashlib.sha256(head).digest() * (BLOCK // 32)
    return head + fill[: BLOCK - len(head)]


def decode(image: bytes, volume: int) -> tuple[list[tuple[int, int]], list[str]]:
    """[(seq, dep)] per block ((0, 0): never written) and the problems seen: blocks that
    are neither zero nor one whole write of this volume aimed at them."""
    blocks = len(image) // BLOCK
    out: list[tuple[int, int]] = []
    problems: list[str] = []
    for b in range(blocks):
        raw = image[b * BLOCK : (b + 1) * BLOCK]
        if raw.count(0) == BLOCK:
            out.append((0, 0))
            continue
        magic, vol, seq, dep = _HEAD.unpack_from(raw)
        if magic != _MAGIC or vol != volume or seq < 1 or raw != make_block(vol, seq, dep):
            problems.append(f"volume {volume} block {b}: not a whole write of this volume "
                            f"(head {raw[:24].hex()})")  # fmt: skip
            out.append((0, 0))
            continue
        if block_for(seq, blocks) != b:
            problems.append(f"volume {volume} block {b} holds seq {seq}, aimed elsewhere")
        out.append((seq, dep))
    return out, problems


def check_cut(images: Mapping[int, bytes], answers: Mapping[int, Sequence[str]]) -> list[str]:
    """Why ``images`` ({volume index: bytes}, two volumes) is not a causal cut of the
    writes whose answers ``answers[v][seq - 1]`` gives; [] when it is one."""
    problems: list[str] = []
    held: dict[int, list[tuple[int, int]]] = {}
    for v, image in images.items():
        held[v], bad = decode(image, v)
        problems += bad
    return problems + check_held(held, answers)


def ack_index(said: Sequence[str], blocks: int) -> list[list[int]]:
    """The acknowledged seqs aimed at each block, ascending."""
    out: list[list[int]] = [[] for _ in range(blocks)]
    for s, answer in enumerate(said, start=1):
        if answer == ACK:
            out[block_for(s, blocks)].append(s)
    return out


def check_held(
    held: Mapping[int, Sequence[tuple[int, int]]],
    answers: Mapping[int, Sequence[str]],
    index: Mapping[int, list[list[int]]] | None = None,
) -> list[str]:
    """``check_cut`` of images already decoded (``decode``) to [(seq, dep)] per block;
    ``index``: ``ack_index`` of each volume's answers, when many cuts share them."""
    problems: list[str] = []
    newest: dict[int, int] = {}
    deps: dict[int, int] = {}
    for v, blocks_held in held.items():
        blocks = len(blocks_held)
        m = max((s for s, _ in blocks_held), default=0)
        newest[v], deps[v] = m, max((d for _, d in blocks_held), default=0)
        said = answers[v]
        if m > len(said):
            problems.append(f"volume {v} holds seq {m}, but only {len(said)} were issued")
            continue
        acked = index[v] if index is not None else ack_index(said, blocks)
        for b, (seq, _dep) in enumerate(blocks_held):
            # the newest acknowledged write to b not newer than m must be the one held,
            # or older than it
            at = bisect.bisect_right(acked[b], m)
            if at and acked[b][at - 1] > seq:
                problems.append(f"volume {v} block {b} holds seq {seq} but acknowledged "
                                f"seq {acked[b][at - 1]} <= the newest held ({m}) is "
                                "missing")  # fmt: skip
    for v in held:
        for o in held:
            if o != v and newest[o] < deps[v]:
                problems.append(f"volume {v} holds a write issued after volume {o}'s seq "
                                f"{deps[v]} was acknowledged, but volume {o} holds only up "
                                f"to seq {newest[o]}")  # fmt: skip
    return problems


def missing_acked(images: Mapping[int, bytes], answers: Mapping[int, Sequence[str]]) -> list[str]:
    """The acknowledged writes the images miss, each the newest acknowledged write to its
    block (older ones were overwritten by the workload itself)."""
    problems: list[str] = []
    for v, image in images.items():
        held, bad = decode(image, v)
        problems += bad
        blocks = len(held)
        said = answers[v]
        last_acked: dict[int, int] = {}
        for s, answer in enumerate(said, start=1):
            if answer == ACK:
                last_acked[block_for(s, blocks)] = s
        for b, s in sorted(last_acked.items()):
            if held[b][0] < s:
                problems.append(f"volume {v} block {b}: acknowledged seq {s} missing "
                                f"(holds seq {held[b][0]})")  # fmt: skip
    return problems
