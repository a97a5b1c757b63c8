"""Value checks of the record types (``schemas.records``): what ``check()`` refuses.

Every failure is a ``CorruptRecordError`` naming the record type and what is impossible
(README, "Impossible values"). Kept apart from the classes so the registry stays short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING

from pipeline.errors import CorruptRecordError

if TYPE_CHECKING:
    from schemas.records import WriteExtent

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def bad(rt: str, why: str) -> CorruptRecordError:
    return CorruptRecordError(f"impossible {rt} record: {why}")


def text(rt: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise bad(rt, f"{name} must be a non-empty string, got {value!r}")


def integer(rt: str, name: str, value: object, low: int = 0) -> None:
    if not isinstance(value, int) or not low <= value <= INT64_MAX:
        raise bad(rt, f"{name} must be an integer in [{low}, 2**63), got {value!r}")


def member(rt: str, name: str, value: object, enum: type[StrEnum]) -> None:
    if not isinstance(value, enum):
        raise bad(rt, f"unknown {name} {value!r}")


def offsets(rt: str, name: str, offsets: Mapping[int, int]) -> None:
    for p, off in offsets.items():
        if not isinstance(p, int) or not 0 <= p <= INT32_MAX:
            raise bad(rt, f"{name} has a negative or repeated partition {p}")
        if not isinstance(off, int) or not 0 <= off <= INT64_MAX:
            raise bad(rt, f"{name} partition {p} has offset {off}")


def volume_ids(rt: str, name: str, ids: Sequence[str]) -> None:
    if not isinstance(ids, tuple):
        raise bad(rt, f"{name} must be a tuple of volume ids, got {ids!r}")
    for v in ids:
        text(rt, name, v)
    if len(set(ids)) != len(ids):
        raise bad(rt, f"{name} lists a volume twice: {list(ids)}")


def check_extents(extents: Sequence[WriteExtent]) -> None:
    """A Write's extents: whole writes and fragments in ts order (README)."""
    rt = "Write"
    if not extents:
        raise bad(rt, "no extents")
    prev: WriteExtent | None = None
    run_bytes = 0  # bytes of the current write seen so far in this record
    run_from_start = False  # the current write's fragment 0 is in this record
    for i, e in enumerate(extents):
        ts, off, wlen = e.ts, e.offset, e.write_length
        idx, cnt, data = e.fragment_index, e.fragment_count, e.data
        if not isinstance(data, bytes | bytearray):
            raise bad(rt, f"extent {i} data must be bytes, got {type(data).__name__}")
        n = len(data)
        if not 0 <= ts <= INT64_MAX:
            raise bad(rt, f"extent {i} has ts {ts}")
        if not 0 <= off <= INT64_MAX - n:
            raise bad(rt, f"extent {i} has offset {off} (with {n} bytes)")
        if not 1 <= wlen <= INT64_MAX:
            raise bad(rt, f"extent {i} has write_length {wlen}")
        if not 1 <= cnt <= min(wlen, INT32_MAX) or not 0 <= idx < cnt:
            raise bad(rt, f"extent {i} is fragment {idx} of {cnt} of a {wlen}-byte write")
        if not 1 <= n <= wlen:
            raise bad(rt, f"extent {i} carries {n} bytes of a {wlen}-byte write")
        if prev is not None and ts == prev.ts:
            # Fragments of one write share its ts and are appended together, in order.
            if (
                wlen != prev.write_length
                or cnt != prev.fragment_count
                or idx != prev.fragment_index + 1
                or off != prev.offset + len(prev.data)
            ):
                raise bad(rt, f"extent {i} shares ts {ts} but does not continue extent {i - 1}")
            run_bytes += n
        else:
            if prev is not None:
                if ts < prev.ts:
                    raise bad(rt, f"extent {i} ts {ts} is below extent {i - 1} ts {prev.ts}")
                # Only the first write may start, and only the last may end, outside
                # this record: a write's fragments are never interleaved with another's.
                if prev.fragment_index != prev.fragment_count - 1:
                    raise bad(rt, f"the write before extent {i} stops before its last fragment")
                if idx != 0:
                    raise bad(rt, f"extent {i} starts a write at fragment {idx}, not 0")
            run_bytes = n
            run_from_start = idx == 0
        if run_bytes > wlen or (run_from_start and idx == cnt - 1 and run_bytes != wlen):
            raise bad(rt, f"the write ending at extent {i} has {run_bytes} of {wlen} bytes")
        prev = e
