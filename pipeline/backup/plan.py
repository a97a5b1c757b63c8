"""Pure apply planning: which log records a backup applies, in which order, and where
it must re-read from after a restart. No I/O; the applier feeds decoded records in.

What the planner relies on (ARCHITECTURE, "Per-volume order"): a volume's records are
in one log partition, in ts order, so the records of a volume with ts <= W form a prefix
of that volume's records. Different volumes commute, so ``take(w)`` only has to keep
per-volume order; it sorts by ``(ts, volume)`` anyway so every run emits the same list.
CG-wide records (Marker, Snapshot) come after every volume op of the same ts: a snapshot
sees exactly the records with ts <= its ts.

What it checks, and halts on (``ApplierHaltedError``: the log is not what lowmark wrote):
a volume's ts going backwards, two operations of a volume sharing a ts, a volume moving
to another partition, fragments that are duplicated, disagree or do not tile their write,
a write whose fragments never completed, a record with ts <= W lying at or above that
W's ``log_offsets`` (watermark safety broken), offsets going backwards in a partition.
A planner that raised is not used again: the applier halts, or restarts from its
checkpoint with a new planner.

Epoch fencing, on top of Kafka transactions (Jepsen found fenced producers' writes
surfacing): a record of interceptor I with epoch e is stale, and is rejected, when a
newer epoch e' of I is known to start at or below the record's offset in its partition.
Within one partition every record an old instance committed precedes the first record of
the new one (the new instance's init_transactions fenced the old one before it wrote), so
this never rejects a legitimate record, while a plain "newest epoch seen" rule would: the
consumer reads partitions at different speeds, and an old instance's committed records in
one partition are often read after the new instance's records in another. Evidence comes
from log records (the offset where e' was first seen) and from ``note_epoch`` (the
watermark's member table, bounded by that watermark's ``log_offsets``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

from pipeline.backup.plan_types import (
    CG_OP_KINDS,
    PENDING_OVERHEAD_BYTES,
    ZERO_OP_KINDS,
    AddOutcome,
    ApplyOp,
    OpKind,
    PlannerStats,
    Source,
    _halt,
    _op,
    _Pending,
    _Volume,
    _where_list,
)
from pipeline.errors import ApplierHaltedError, ApplyError
from schemas.records import (
    CgRecord,
    LogRecord,
    VolumeChange,
    Write,
    Zero,
)

__all__ = ["PENDING_OVERHEAD_BYTES", "AddOutcome", "ApplyOp", "ApplyPlanner", "OpKind",
           "PlannerStats"]  # fmt: skip


class ApplyPlanner:
    """Collects decoded log records and hands out whole ops with ts <= W, in order."""

    def __init__(
        self,
        applied_w: int = 0,
        max_pending_bytes: int = 256 << 20,
        epoch_evidence: Iterable[tuple[str, int, int, int]] = (),
    ) -> None:
        self.applied_w = applied_w
        self.max_pending_bytes = max_pending_bytes
        self.stats = PlannerStats()
        self._volumes: dict[str, _Volume] = {}
        self._cg_ops: list[_Pending] = []
        # partition -> {offset: pending items referencing that record}; keys are inserted
        # in increasing offset order, so the first key is the earliest pending record
        self._refs: dict[int, dict[int, int]] = {}
        self._positions: dict[int, int] = {}
        self._last_added: dict[int, int] = {}
        self._pending_bytes = 0
        # interceptor -> partition -> epoch -> lowest offset from which it is known current
        self._epochs: dict[str, dict[int, dict[int, int]]] = {}
        self._max_epoch: dict[tuple[str, int], int] = {}
        # what ready() verified: take(w) needs every record with ts <= w to have been read
        self._ready_w = applied_w
        self._bound: tuple[int, dict[int, int]] | None = None  # (w, log_offsets)
        self._departed: dict[tuple[str, int], int] = {}  # (interceptor, epoch) -> final S
        #: volume -> the highest ts take_early() handed out above applied_w
        self._early: dict[str, int] = {}
        # partition -> offset of a record that could not be decoded: nothing at or after it
        # is taken in, and the position never passes it (invariant 5)
        self._blocked: dict[int, int] = {}
        for iid, epoch, partition, offset in epoch_evidence:
            self._note(iid, epoch, partition, offset)

    # ---- input -------------------------------------------------------------------------

    def add(self, record: LogRecord, partition: int, offset: int) -> AddOutcome:
        """Take in one decoded log record read at (partition, offset)."""
        if self.is_blocked(partition, offset):
            return AddOutcome.BLOCKED
        last = self._last_added.get(partition)
        if last is not None and offset <= last:
            raise ApplyError(
                f"log record at partition {partition} offset {offset} arrived after offset "
                f"{last}; the consumer went back without drop_pending(). Restart the applier "
                "from its checkpoint"
            )
        self._last_added[partition] = offset
        self._positions[partition] = max(self._positions.get(partition, 0), offset + 1)
        where = (partition, offset)
        if not isinstance(record, LogRecord):
            raise _halt(where, f"has type {type(record).__name__}, which the log never holds")
        try:
            iid, epoch = record.interceptor_id, record.epoch
            tss = record.timestamps()
        except (AttributeError, TypeError) as e:
            raise _halt(where, f"lacks field {e}") from None
        if not tss:
            raise _halt(where, "is a Write without extents")
        if any(b < a for a, b in itertools.pairwise(tss)):
            raise _halt(where, f"has extents out of ts order {tss}")

        self._note(iid, epoch, partition, offset)
        if self._is_stale(iid, epoch, partition, offset) or self._after_departure(
            iid, epoch, tss[-1]
        ):
            self.stats.rejected_stale_epoch += 1
            return AddOutcome.REJECTED_STALE_EPOCH
        self._check_bound(where, tss[0])
        if tss[-1] <= self.applied_w:
            self.stats.skipped += len(tss)
            return AddOutcome.SKIPPED_APPLIED

        try:
            self._accept(record, iid, epoch, where)
        except (AttributeError, TypeError) as e:
            raise _halt(where, f"lacks a field or has one of the wrong type ({e!r})") from None
        return AddOutcome.ACCEPTED

    def note_position(self, partition: int, next_offset: int) -> None:
        """The consumer's position: the offset of the next record it will read.

        Never past a blocked record: what lies after it was not consumed.
        """
        next_offset = min(next_offset, self._blocked.get(partition, next_offset))
        self._positions[partition] = max(self._positions.get(partition, 0), next_offset)

    def block(self, partition: int, offset: int) -> None:
        """The record at (partition, offset) is bad, and was read in order: consume nothing
        at or after it, and count everything before it as read.

        Records of the partition already taken in lie before it (a consumer reads in
        order), so what is pending stays valid. A W whose log_offsets need the partition
        past ``offset`` is never ``ready``; ``blocked_by`` names the block so the applier
        can halt. Lifted only by a new planner, i.e. a restart with an explicit skip.
        """
        refs = self._refs.get(partition, {})
        if any(off >= offset for off in refs):
            raise ApplyError(
                f"block({partition}, {offset}) behind records already taken in; the consumer "
                "read out of order. Restart the applier from its checkpoint"
            )
        self._blocked[partition] = min(offset, self._blocked.get(partition, offset))
        # the consumer delivered it, so it read everything before it: a gap just below is
        # a transaction marker, and no partition-EOF comes while the partition is paused
        self._positions[partition] = self._blocked[partition]

    def positions(self) -> dict[int, int]:
        """Per partition, the offset of the next record the consumer will read."""
        return dict(self._positions)

    def is_blocked(self, partition: int, offset: int) -> bool:
        """Whether (partition, offset) lies at or after a blocked record."""
        at = self._blocked.get(partition)
        return at is not None and offset >= at

    def blocked_by(self, required_offsets: Mapping[int, int]) -> tuple[int, int] | None:
        """The (partition, offset) of a block that keeps a W with these log_offsets from
        ever being ready, or None."""
        for partition, offset in sorted(self._blocked.items()):
            if required_offsets.get(partition, 0) > offset:
                return partition, offset
        return None

    def note_epoch(self, interceptor_id: str, epoch: int, log_offsets: Mapping[int, int]) -> None:
        """A watermark's member table says ``interceptor_id`` is at ``epoch``.

        ``log_offsets``: that same watermark's log_offsets. The member joined before the
        watermark was computed, so every record an older instance committed lies below
        them; an older-epoch record at or above them is from a zombie.
        """
        for partition, offset in log_offsets.items():
            self._note(interceptor_id, epoch, partition, offset)

    def note_departed(self, interceptor_id: str, epoch: int, final_s: int) -> None:
        """A watermark says this instance left or was fenced with final S ``final_s``.

        Its committed records all have ts <= final_s (each committed with a progress S at
        or below it), so one above it is from a zombie Kafka's fencing did not stop.
        """
        self._departed[(interceptor_id, epoch)] = final_s

    # ---- output ------------------------------------------------------------------------

    def ready(self, w: int, required_offsets: Mapping[int, int]) -> bool:
        """Whether every partition's position reached ``required_offsets`` (W's log_offsets).

        When it has, every record with ts <= w has been read, so ``take(w)`` may run; the
        planner remembers that, and the bound, to catch records that break it later.
        """
        ok = all(self._positions.get(p, 0) >= off for p, off in required_offsets.items())
        if ok:
            self._ready_w = max(self._ready_w, w)
            if self._bound is None or w >= self._bound[0]:
                self._bound = (w, dict(required_offsets))
        return ok

    def take(self, w: int) -> list[ApplyOp]:
        """Every op with ts <= w not yet taken, in (ts, volume) order; then applied_w = w.

        A w at or below applied_w returns nothing (a consumer may see an old W again).
        """
        if w <= self.applied_w:
            return []
        if w > self._ready_w:
            raise ApplyError(
                f"take({w}) before ready({w}, log_offsets) was true (verified up to "
                f"{self._ready_w}); records with ts <= {w} may still be unread. Read up to "
                "the watermark's log_offsets first"
            )
        taken: list[_Pending] = []
        counts: list[tuple[_Volume, int]] = []
        for vid, vol in self._volumes.items():
            n = 0
            for item in vol.queue:
                if item.ts > w:
                    break
                if item.op is None:
                    raise ApplierHaltedError(
                        f"write of volume {vid!r} at ts {item.ts} <= W {w} has fragments "
                        f"{sorted(item.parts)} of {item.fragment_count}; every fragment "
                        "commits in one transaction, so the log is not what lowmark wrote. "
                        "Halt and inspect the records at " + _where_list(item.sources)
                    )
                taken.append(item)
                n += 1
            if n:
                counts.append((vol, n))
        cg_taken = [c for c in self._cg_ops if c.ts <= w]
        taken.extend(cg_taken)
        # judged again with what is known now: a zombie read before the W that proves it
        # stale (its departure, a newer epoch below it) is dropped here, never applied
        stale = {id(i) for i in taken if self._stale_now(i)}
        for item in taken:
            if id(item) in stale:
                continue
            for src in item.sources:
                self._check_bound(src, item.ts)
        # checks done: from here on nothing raises, so a failed take changes nothing
        for vol, n in counts:
            for _ in range(n):
                vol.queue.popleft()
        if cg_taken:
            self._cg_ops = [c for c in self._cg_ops if c.ts > w]
        self._early = {v: t for v, t in self._early.items() if t > w}
        for item in taken:
            self._release(item)
        self.applied_w = w
        if stale:
            self.stats.rejected_stale_epoch += len(stale)
            taken = [i for i in taken if id(i) not in stale]
        # CG-wide ops after the volume ops of their ts; the source breaks remaining ties
        taken.sort(key=lambda i: (i.ts, i.volume_id is None, i.volume_id or "", i.sources[0]))
        ops = [item.op for item in taken if item.op is not None]
        self.stats.applied_ops += len(ops)
        self.stats.applied_bytes += sum(len(op.data) for op in ops if op.data is not None)
        return ops

    def take_early(self, w: int, required_offsets: Mapping[int, int]) -> list[ApplyOp]:
        """Ahead of ``ready(w)``: per volume, the whole ops at the head of its queue with
        ts <= w (a W record read, its log offsets not yet reached), so a backlog larger
        than the memory budget streams through instead of being dropped and re-read.

        A volume's records with ts <= w are a prefix of its records (per-volume order),
        so this is what ``take(w)`` would hand out for that volume; staleness is judged
        with what is known now, as ``take`` does (everything before a record in its
        partition has been read). applied_w stays: the images are no cut until ``take(w)``
        (the caller must not checkpoint or expose them before). CG-wide ops never go early.
        """
        if w <= self.applied_w:
            return []
        taken: list[_Pending] = []
        counts: list[tuple[_Volume, int]] = []
        for vol in self._volumes.values():
            n = 0
            for item in vol.queue:
                if item.ts > w or item.op is None:
                    break  # a write still collecting fragments waits, and all after it
                taken.append(item)
                n += 1
            if n:
                counts.append((vol, n))
        stale = {id(i) for i in taken if self._stale_now(i)}
        for item in taken:
            if id(item) in stale:
                continue
            for where in item.sources:
                end = required_offsets.get(where[0])
                if end is not None and where[1] >= end:
                    raise _halt(where, f"has ts {item.ts} <= W {w} but lies at or above that "
                                f"watermark's log offset {end}: a record appeared after W was "
                                "published (watermark safety broken)")  # fmt: skip
        for vol, n in counts:
            for _ in range(n):
                vol.queue.popleft()
        for item in taken:
            self._release(item)
            # a drop re-reads from the earliest pending record, which may lie before these
            # (another fragment's record): what is re-read up to here is skipped, never
            # taken twice or left half-collected
            assert item.volume_id is not None
            self._early[item.volume_id] = max(self._early.get(item.volume_id, -1), item.ts)
        self.stats.rejected_stale_epoch += len(stale)
        out = sorted((i for i in taken if id(i) not in stale),
                     key=lambda i: (i.ts, i.volume_id or "", i.sources[0]))  # fmt: skip
        ops = [i.op for i in out if i.op is not None]
        self.stats.applied_ops += len(ops)
        self.stats.applied_bytes += sum(len(op.data) for op in ops if op.data is not None)
        self.stats.taken_early += len(ops)
        return ops

    def checkpoint_offsets(self) -> dict[int, int]:
        """Per partition: the earliest record still pending, or else the position.

        Re-reading from here and skipping ts <= applied_w reproduces everything pending.
        """
        out = dict(self._positions)
        for partition, refs in self._refs.items():
            if refs:
                out[partition] = next(iter(refs))
        return out

    def epoch_evidence(self) -> list[tuple[str, int, int, int]]:
        """(interceptor_id, epoch, partition, offset) facts for the next planner's constructor.

        Keep them with the checkpoint: a restarted planner re-reads only from the
        checkpoint offsets, so without them a zombie record after that point whose
        evidence lies before it would be accepted.
        """
        return sorted(
            (iid, epoch, p, off)
            for iid, parts in self._epochs.items()
            for p, epochs in parts.items()
            for epoch, off in epochs.items()
        )

    def pending_bytes(self) -> int:
        return self._pending_bytes

    def over_budget(self) -> bool:
        return self._pending_bytes > self.max_pending_bytes

    def drop_pending(self) -> dict[int, int]:
        """Forget every pending record; return, per partition, where to seek to re-read.

        All of them have ts > applied_w. The positions move back to the returned offsets,
        so ``ready()`` is false until the consumer has re-read them.
        """
        reread = self.checkpoint_offsets()
        self.stats.dropped += sum(len(refs) for refs in self._refs.values())
        for vol in self._volumes.values():
            vol.queue.clear()
            vol.last_ts = None  # everything > applied_w comes again, in order
        self._cg_ops.clear()
        self._refs.clear()
        self._pending_bytes = 0
        self._positions = dict(reread)
        self._last_added = {p: off - 1 for p, off in reread.items()}
        self._ready_w = self.applied_w
        return reread

    # ---- internals ---------------------------------------------------------------------

    def _accept(self, record: LogRecord, iid: str, epoch: int, where: Source) -> None:
        match record:
            case Write():
                self._add_write(record, iid, epoch, where)
            case Zero(kind=kind):
                op_kind = ZERO_OP_KINDS.get(kind)
                if op_kind is None:
                    raise _halt(where, f"has zero kind {kind!r}")
                op = _op(
                    op_kind,
                    record.volume_id,
                    record.ts,
                    iid,
                    epoch,
                    offset=record.offset,
                    length=record.length,
                )
                self._add_volume_op(where, op)
            case VolumeChange():
                op = _op(
                    OpKind.VOLUME_CHANGE,
                    record.volume_id,
                    record.ts,
                    iid,
                    epoch,
                    length=record.size,
                    record=record,
                )
                self._add_volume_op(where, op)
            case CgRecord() if type(record) in CG_OP_KINDS:
                op = _op(CG_OP_KINDS[type(record)], None, record.ts, iid, epoch, record=record)
                self._cg_ops.append(self._pending_of(op, where))
            case _:
                raise _halt(where, f"has type {record.TYPE}, which this planner cannot apply")

    def _add_write(self, record: Write, iid: str, epoch: int, where: Source) -> None:
        vid = record.volume_id
        for x in record.extents:
            ts = x.ts
            if ts <= self.applied_w or ts <= self._early.get(vid, -1):
                self.stats.skipped += 1  # applied, or taken early (a re-read after a drop)
                continue
            offset, length, data = x.offset, x.write_length, x.data
            index, count = x.fragment_index, x.fragment_count
            if not (0 <= index < count) or offset < 0 or length < 0:
                raise _halt(
                    where,
                    f"has an impossible extent (ts {ts}, offset {offset}, write_length "
                    f"{length}, fragment {index} of {count})",
                )
            if count == 1:
                if len(data) != length:
                    raise _halt(where, f"has a write of {len(data)} bytes, declared {length}")
                op = _op(OpKind.WRITE, vid, ts, iid, epoch, offset=offset, length=length, data=data)
                self._add_volume_op(where, op)
                continue
            vol = self._volume(vid, where)
            item = vol.queue[-1] if vol.queue and vol.last_ts == ts else None
            if item is None:
                self._check_order(vol, vid, ts, where)
                item = _Pending(
                    ts,
                    vid,
                    [],
                    0,
                    write_length=length,
                    fragment_count=count,
                    interceptor_id=iid,
                    epoch=epoch,
                )
                vol.queue.append(item)
                vol.last_ts = ts
            elif item.op is not None or (length, count, iid, epoch) != (
                item.write_length,
                item.fragment_count,
                item.interceptor_id,
                item.epoch,
            ):
                raise _halt(
                    where,
                    f"has a fragment of volume {vid!r} ts {ts} that does not belong to the "
                    "operation already at that ts (two operations share a ts, or fragments "
                    "disagree on write_length/fragment_count/epoch)",
                )
            if index in item.parts:
                raise _halt(where, f"repeats fragment {index} of volume {vid!r} ts {ts}")
            item.parts[index] = (offset, data)
            self._charge(item, where, len(data))
            if len(item.parts) == count:
                item.op = self._join_fragments(vid, item, where)

    def _join_fragments(self, vid: str, item: _Pending, where: Source) -> ApplyOp:
        start = item.parts[0][0]
        cursor = start
        for i in range(item.fragment_count):
            offset, data = item.parts[i]
            if offset != cursor:
                raise _halt(
                    where,
                    f"completes write of volume {vid!r} ts {item.ts} whose fragment {i} "
                    f"starts at {offset}, not {cursor}: fragments must tile the write",
                )
            cursor += len(data)
        if cursor - start != item.write_length:
            raise _halt(
                where,
                f"completes write of volume {vid!r} ts {item.ts} with {cursor - start} "
                f"bytes, declared {item.write_length}",
            )
        data = b"".join(item.parts[i][1] for i in range(item.fragment_count))
        item.parts = {}
        return _op(
            OpKind.WRITE,
            vid,
            item.ts,
            item.interceptor_id,
            item.epoch,
            offset=start,
            length=item.write_length,
            data=data,
        )

    def _add_volume_op(self, where: Source, op: ApplyOp) -> None:
        assert op.volume_id is not None
        if op.ts <= self._early.get(op.volume_id, -1):
            self.stats.skipped += 1  # re-read after a drop: taken early already
            return
        vol = self._volume(op.volume_id, where)
        self._check_order(vol, op.volume_id, op.ts, where)
        if op.offset < 0 or op.length < 0:
            raise _halt(where, f"has a negative offset or length ({op.offset}, {op.length})")
        vol.queue.append(self._pending_of(op, where))
        vol.last_ts = op.ts

    def _pending_of(self, op: ApplyOp, where: Source) -> _Pending:
        item = _Pending(op.ts, op.volume_id, [], 0, op=op)
        self._charge(item, where, len(op.data) if op.data is not None else 0)
        return item

    def _volume(self, vid: str, where: Source) -> _Volume:
        vol = self._volumes.get(vid)
        if vol is None:
            vol = self._volumes[vid] = _Volume(where[0])
        elif vol.partition != where[0]:
            raise _halt(
                where,
                f"is of volume {vid!r}, whose records were in partition {vol.partition}; "
                "a volume's records must stay in one partition (was the log topic's "
                "partition count changed?)",
            )
        return vol

    def _check_order(self, vol: _Volume, vid: str, ts: int, where: Source) -> None:
        last, tail = vol.last_ts, (vol.queue[-1] if vol.queue else None)
        if last is not None and ts <= last:
            what = "repeats ts" if ts == last else "goes back in ts"
            raise _halt(where, f"{what}: volume {vid!r} ts {ts} after ts {last}")
        if tail is not None and tail.op is None:
            raise _halt(
                where,
                f"brings volume {vid!r} ts {ts} while the write at ts {tail.ts} still lacks "
                f"fragments (has {sorted(tail.parts)} of {tail.fragment_count})",
            )

    def _charge(self, item: _Pending, where: Source, nbytes: int) -> None:
        if not item.sources or item.sources[-1] != where:
            item.sources.append(where)
            refs = self._refs.setdefault(where[0], {})
            refs[where[1]] = refs.get(where[1], 0) + 1
        charge = nbytes + PENDING_OVERHEAD_BYTES
        item.charge += charge
        self._pending_bytes += charge

    def _release(self, item: _Pending) -> None:
        self._pending_bytes -= item.charge
        for partition, offset in item.sources:
            refs = self._refs[partition]
            if refs[offset] == 1:
                del refs[offset]
            else:
                refs[offset] -= 1

    def _note(self, iid: str, epoch: int, partition: int, offset: int) -> None:
        epochs = self._epochs.setdefault(iid, {}).setdefault(partition, {})
        if offset < epochs.get(epoch, offset + 1):
            epochs[epoch] = offset
        key = (iid, partition)
        self._max_epoch[key] = max(self._max_epoch.get(key, epoch), epoch)

    def _after_departure(self, iid: str, epoch: int, max_ts: int) -> bool:
        final_s = self._departed.get((iid, epoch))
        return final_s is not None and max_ts > final_s

    def _stale_now(self, item: _Pending) -> bool:
        op = item.op
        if op is None or not item.sources:
            return False
        partition, offset = item.sources[0]
        return self._after_departure(op.interceptor_id, op.epoch, op.ts) or self._is_stale(
            op.interceptor_id, op.epoch, partition, offset
        )

    def _is_stale(self, iid: str, epoch: int, partition: int, offset: int) -> bool:
        if epoch >= self._max_epoch.get((iid, partition), epoch):
            return False  # the common case: no newer epoch known at all
        epochs = self._epochs[iid][partition]
        return any(e > epoch and start <= offset for e, start in epochs.items())

    def _check_bound(self, where: Source, ts: int) -> None:
        if self._bound is None:
            return
        w, offsets = self._bound
        end = offsets.get(where[0])
        if ts <= w and end is not None and where[1] >= end:
            raise _halt(
                where,
                f"has ts {ts} <= W {w} but lies at or above that watermark's log offset "
                f"{end}: a record appeared after W was published (watermark safety broken)",
            )
