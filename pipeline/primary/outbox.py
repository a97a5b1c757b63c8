"""The interceptor's outbox entries and their encoding into log records.

Pure functions of a tick's batch: the tick thread (``pipeline.primary.interceptor``) hands a batch
here and produces what comes back in one transaction with its PROGRESS record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas import codec
from schemas.records import LogRecord, Progress, Write, WriteExtent

if TYPE_CHECKING:
    from pipeline.primary.interceptor import Interceptor


class Ticket:
    """Tells when a submitted record (and everything before it) is durable in Kafka."""

    __slots__ = ("_engine", "seq", "ts")

    def __init__(self, engine: Interceptor, seq: int, ts: int) -> None:
        self._engine = engine
        self.seq = seq
        self.ts = ts

    def done(self) -> bool:
        return self._engine.durable_seq >= self.seq or self._engine.failure is not None

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until durable; ``ReplicationError`` / ``FencedError`` when it cannot be."""
        self._engine.wait_durable(self.seq, timeout_s)

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        """Call ``fn(None)`` once durable or ``fn(exc)`` on failure, from the tick thread."""
        self._engine.on_durable(self.seq, fn)


#: (key, value, headers) of one Kafka message
Message = tuple[str, bytes, list[tuple[str, bytes]]]


@dataclass
class Entry:
    """One outbox entry: a write's data, or any other log record, complete."""

    seq: int
    volume_id: str  # "" for CG-wide records (markers, snapshots): their Kafka key
    ts: int
    offset: int
    data: bytes | None  # a write's data (None for a record)
    record: LogRecord | None = None  # every other entry: the record, as it is encoded


def entry_bytes(e: Entry) -> int:
    """What an entry counts against the outbox bounds (its data plus a header's worth)."""
    return (len(e.data) if e.data is not None else 0) + 64


def encode_batch(
    batch: list[Entry],
    *,
    interceptor_id: str,
    epoch: int,
    fragment_bytes: int,
    max_record_bytes: int,
) -> list[Message]:
    """Log records in per-volume ts order; consecutive writes of a volume coalesce.

    A write larger than ``fragment_bytes`` is cut into fragments sharing its ts, so a
    record never exceeds ``max_record_bytes`` (Kafka's message size limit). Entries that
    carry a record are encoded as they are, whatever their type.
    """
    out: list[Message] = []
    by_volume: dict[str, list[Entry]] = {}
    for e in batch:
        by_volume.setdefault(e.volume_id, []).append(e)
    frag = fragment_bytes
    for volume_id, entries in by_volume.items():
        entries.sort(key=lambda e: e.ts)
        extents: list[WriteExtent] = []
        size = 0
        for e in entries:
            if e.record is not None:
                if extents:
                    out.append(_write_record(interceptor_id, epoch, volume_id, extents))
                    extents, size = [], 0
                out.append((e.volume_id, codec.encode(e.record), codec.headers_for(e.record)))
                continue
            data = e.data or b""
            count = max(1, -(-len(data) // frag))
            for i in range(count):
                piece = data[i * frag : (i + 1) * frag]
                if size + len(piece) + 64 > max_record_bytes and extents:
                    out.append(_write_record(interceptor_id, epoch, volume_id, extents))
                    extents, size = [], 0
                extents.append(WriteExtent(e.ts, e.offset + i * frag, len(data), i, count, piece))
                size += len(piece) + 64
        if extents:
            out.append(_write_record(interceptor_id, epoch, volume_id, extents))
    return out


def _write_record(
    interceptor_id: str, epoch: int, volume_id: str, extents: list[WriteExtent]
) -> Message:
    rec = Write(volume_id, interceptor_id, epoch, tuple(extents))
    return volume_id, codec.encode(rec), codec.headers_for(rec)


def progress_message(progress: Progress) -> Message:
    """The progress topic's message of ``progress`` (keyed by its interceptor id)."""
    return progress.interceptor_id, codec.encode(progress), codec.headers_for(progress)
