"""Restart republishes the tail: the dirty regions a crashed instance left, sent again.

An interceptor that stopped without draining (kill -9, a crash, power loss with its disk
intact) may have acknowledged async writes whose records never reached Kafka. Their
regions are still set in the volume's dirty-region log (``pipeline.primary.region_log``:
set durably before the write was acknowledged, cleared only once its record was durable).
So at start, before the first new write is taken, every such region's *current* contents
are read from the image and queued as an ordinary ``Write`` record with a fresh ts.

Why a plain Write and not a record type of its own: a backup must apply it exactly as an
overwrite at its ts, which is what the planner, the applier, replay and restore already do
with a Write; a new type would need the same handling in each of them and nothing more.
Why it is correct: the ts is stamped under the volume's lock, where the bytes are read, so
the record says "after every record up to this ts, these bytes are the image's" like any
write; the clock's reservation puts it above every ts the crashed instance issued, and it
is queued before any new write, so below every ts this instance gives a client write.
Republishing a region that was in fact replicated costs bytes, never correctness.

A republished region is cleared like a written one, once its record is durable; a crash
during the republish leaves it set for the next start. The first PROGRESS committed with
(or after) the last republished record lists the volumes in ``resynced_volumes``: W may
then pass the crashed instance's S, jumping straight above that PROGRESS's S
(``pipeline.watermark.state``, holds), so no cut holds effects of the tail without it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.logs import event

if TYPE_CHECKING:
    from pipeline.primary.volume import ConsistencyGroup, Volume

log = logging.getLogger("lowmark.republish")

#: one queued record carries at most this many bytes (adjacent regions coalesce)
CHUNK_BYTES = 1 << 20


def _knows_tail(vol: Volume) -> bool:
    return vol.regions is not None and vol.regions.loaded


def republish(cg: ConsistencyGroup) -> int:
    """Queue the held regions of every volume of ``cg``; the bytes queued."""
    if cg.regions is None:
        return 0
    engine = cg.interceptor
    total = 0
    for vol in sorted(cg.volumes.values(), key=lambda v: v.name):
        regions = vol.regions
        if regions is None:
            continue
        ranges = regions.held_ranges(CHUNK_BYTES)
        if not ranges:
            continue
        nbytes = 0
        first_ts = last_ts = 0
        for offset, length in ranges:
            engine.wait_for_space(length)
            with vol._lock:
                end = min(offset + length, vol.size)
                if end <= offset:
                    continue
                token, ts = engine.stamp()
                data = vol.image.pread(offset, end - offset)
                ticket = engine.append(token, vol.volume_id, ts, offset, data)
                regions.republished(offset, end - offset, ticket.seq)
            nbytes += len(data)
            first_ts = first_ts or ts
            last_ts = ts
        cg.regions.stats["republished_bytes"] += nbytes
        cg.regions.stats["republished_regions"] += sum(
            -(-n // regions.state.region_bytes) for _o, n in ranges
        )
        event(
            log,
            "republished the dirty regions of an earlier instance",
            level=logging.WARNING,
            cg=cg.name,
            interceptor=engine.config.interceptor_id,
            volume=vol.volume_id,
            ranges=len(ranges),
            bytes=nbytes,
            first_ts=first_ts,
            last_ts=last_ts,
        )
        total += nbytes
    # the next PROGRESS after these records says so: the watermark lifts the holds that
    # earlier instances' tails of these volumes put on W (a log created just now knows
    # nothing of an earlier instance's writes: another disk, or the log was off)
    known_ids = {v.volume_id for v in cg.volumes.values() if _knows_tail(v)}
    # a volume parked here (released by a migration, moved away, or staged) has no tail:
    # a source releases only after every record of it is durable, a stage takes no write;
    # an instance killed right after a release still named it in its last PROGRESS, and
    # its hold would otherwise never lift (found by tests/system/test_migrate_kills.py)
    known_ids |= {p.info.volume_id for p in cg.parking.parked.values()}
    known = tuple(sorted(known_ids))
    if known:
        engine.resynced(engine.barrier().seq, known)
    if total:
        engine.urgent()
    return total
