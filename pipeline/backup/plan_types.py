"""The apply planner's types: ops, outcomes, counters and its pending items (``plan``).

Kept apart from ``plan`` (which re-exports the public ones) so that module stays short.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.errors import ApplierHaltedError
from schemas.records import CgRecord, Marker, Snapshot, VolumeChange, ZeroKind


class OpKind(StrEnum):
    """What an ``ApplyOp`` does to the images."""

    WRITE = "write"
    ZERO = "zero"  # reads as zeros, stays allocated
    TRIM = "trim"  # reads as zeros, may be deallocated
    VOLUME_CHANGE = "volume_change"
    MARKER = "marker"  # CG-wide: changes no image
    SNAPSHOT = "snapshot"  # CG-wide: changes no image


#: the op kind of a CG-wide record; a new CG-wide record type adds its line here
CG_OP_KINDS: dict[type[CgRecord], OpKind] = {Marker: OpKind.MARKER, Snapshot: OpKind.SNAPSHOT}
#: the op kind of a Zero's kind
ZERO_OP_KINDS = {ZeroKind.ZERO: OpKind.ZERO, ZeroKind.TRIM: OpKind.TRIM}

#: bytes charged per pending operation or fragment on top of its data, so a backlog of
#: tiny records (zeros, markers) is bounded too
PENDING_OVERHEAD_BYTES = 64


class AddOutcome(StrEnum):
    ACCEPTED = "accepted"  # something of the record is pending
    SKIPPED_APPLIED = "skipped_applied"  # every ts <= applied_w: already in the images
    REJECTED_STALE_EPOCH = "rejected_stale_epoch"  # from a fenced instance; never applied
    BLOCKED = "blocked"  # at or after a bad record of its partition: not even looked at


@dataclass(frozen=True, slots=True)
class ApplyOp:
    """One whole, applicable operation."""

    kind: OpKind
    volume_id: str | None  # None for CG-wide ops (marker, snapshot)
    ts: int
    offset: int
    length: int
    data: bytes | None  # a whole write's data, fragments joined in index order
    record: VolumeChange | CgRecord | None  # the source record of volume_change/marker/snapshot
    interceptor_id: str
    epoch: int


@dataclass
class PlannerStats:
    applied_ops: int = 0
    applied_bytes: int = 0  # write data bytes handed out by take()
    skipped: int = 0  # ops/extents with ts <= applied_w (replay); re-reads count again
    rejected_stale_epoch: int = 0  # records
    dropped: int = 0  # pending records forgotten by drop_pending()
    taken_early: int = 0  # ops handed out by take_early() ahead of their W being ready


Source = tuple[int, int]  # (partition, offset) of a Kafka record


@dataclass(slots=True)
class _Pending:
    """A pending op, or a write whose fragments are still arriving."""

    ts: int
    volume_id: str | None
    sources: list[Source]
    charge: int  # bytes counted in pending_bytes
    op: ApplyOp | None = None  # set once complete
    # fragment collection (op is None until all have arrived)
    write_length: int = 0
    fragment_count: int = 0
    interceptor_id: str = ""
    epoch: int = 0
    parts: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # index -> (offset, data)


@dataclass(slots=True)
class _Volume:
    partition: int
    last_ts: int | None = None  # ts of the latest accepted op (ordering check)
    queue: deque[_Pending] = field(default_factory=deque)  # ts order

def _op(
    kind: OpKind,
    volume_id: str | None,
    ts: int,
    iid: str,
    epoch: int,
    *,
    offset: int = 0,
    length: int = 0,
    data: bytes | None = None,
    record: VolumeChange | CgRecord | None = None,
) -> ApplyOp:
    return ApplyOp(kind, volume_id, ts, offset, length, data, record, iid, epoch)


def _where_list(sources: list[Source]) -> str:
    return ", ".join(f"partition {p} offset {o}" for p, o in sources)


def _halt(where: Source, what: str) -> ApplierHaltedError:
    return ApplierHaltedError(
        f"log record at partition {where[0]} offset {where[1]} {what}; the log is not what "
        "lowmark wrote: halt, inspect the record (kcat -o <offset>) and its dead-letter copy"
    )
