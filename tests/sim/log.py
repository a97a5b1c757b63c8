"""The simulated Kafka of the deterministic simulation: log partitions, the progress topic,
the watermark topic, with Kafka's promises and nothing more.

- A transaction is appended atomically (contiguous offsets per partition, then one offset
  for its commit marker). An aborted one leaves its records in the log, invisible to a
  read_committed reader (``Entry.committed`` is False), exactly as Kafka keeps them.
- Order is kept within a partition, never across: readers pick partitions in any order.
- The watermark topic is the list of committed Watermark records; a reader that restarts
  after compaction sees only the latest.

Every record that reaches a partition is tagged with what the oracle needs (zombie or not,
which W proves it a zombie) without the code under test ever seeing the tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.records import LogRecord, Progress, Watermark


@dataclass(slots=True)
class Entry:
    """One offset of a log partition: a record (committed or aborted) or a commit marker."""

    offset: int
    record: LogRecord | None  # None: a transaction marker (occupies an offset, no record)
    committed: bool
    zombie: bool = False
    #: for a zombie: the index in the watermark topic of the W that proves it stale
    proof_w: int = -1
    corrupt: bool = False  # committed bytes that do not decode (record is None)


@dataclass(slots=True)
class SimLog:
    partitions: int
    parts: list[list[Entry]] = field(default_factory=list)
    #: the progress topic (one partition): (record, committed) per offset
    progress: list[tuple[Progress, bool]] = field(default_factory=list)
    watermarks: list[Watermark] = field(default_factory=list)
    #: per partition, the offsets of the corrupt records, in order (the per-step check
    #: reads these instead of scanning the whole log)
    bad: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parts = [[] for _ in range(self.partitions)]
        self.bad = [[] for _ in range(self.partitions)]

    def end(self, p: int) -> int:
        return len(self.parts[p])

    def ends(self) -> dict[int, int]:
        return {p: len(self.parts[p]) for p in range(self.partitions)}

    def append_txn(
        self,
        records: list[tuple[int, LogRecord]],
        progress: Progress | None,
        *,
        committed: bool,
        zombie: bool = False,
        proof_w: int = -1,
    ) -> list[tuple[int, int]]:
        """Append one transaction; returns the (partition, offset) of each record."""
        where = []
        touched: set[int] = set()
        for p, rec in records:
            part = self.parts[p]
            part.append(Entry(len(part), rec, committed, zombie, proof_w))
            where.append((p, len(part) - 1))
            touched.add(p)
        for p in sorted(touched):
            part = self.parts[p]
            part.append(Entry(len(part), None, False))  # the commit/abort marker
        if progress is not None:
            self.progress.append((progress, committed))
        return where

    def append_corrupt(self, p: int) -> int:
        """A committed record that does not decode (another producer's bytes, a bit flip)."""
        part = self.parts[p]
        part.append(Entry(len(part), None, True, corrupt=True))
        part.append(Entry(len(part), None, False))
        self.bad[p].append(len(part) - 2)
        return len(part) - 2

    def progress_offset_of_last(self) -> int:
        return len(self.progress) - 1

    def visible_progress(self, start: int, end: int) -> list[tuple[int, Progress]]:
        """Committed progress records with start <= offset < end, in offset order."""
        return [(off, rec) for off, (rec, ok) in enumerate(self.progress[start:end], start) if ok]

    def committed_records(
        self, start: dict[int, int], end: dict[int, int]
    ) -> dict[int, list[Entry]]:
        """Per partition, the committed records with start[p] <= offset < end[p]."""
        out: dict[int, list[Entry]] = {}
        for p in range(self.partitions):
            lo, hi = start.get(p, 0), end.get(p, 0)
            out[p] = [e for e in self.parts[p][lo:hi] if e.committed and e.record is not None]
        return out
