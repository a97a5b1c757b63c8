"""Reading what diverged: the three sources of ``resync_plan`` from Kafka and the disk.

Only reads: generation g's log (records above the cut), the old primary's dirty-region
log files (opened read-only, never through a ``RegionLog``: no thread, no rewrite) and
generation g + 1's log up to the offsets noted before the copy (the reverse log).

Where g's log is read from: its oldest retained offsets. A record with ts > C may lie
below the cut's ``base_offsets`` (W's offsets bound the records at or below W, not those
above it), and nothing recorded says how far below, so the whole retained log is read;
a partition whose low offset is above 0 may have lost such records to retention, which
is logged (the dirty-region log still covers what the old primary never replicated).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connectors.kafka.topics import CgTopics
from pipeline.errors import ApplyError, FailoverError, RecordError
from pipeline.logs import event
from pipeline.ops.replay import read_log
from pipeline.ops.restore import log_bounds
from pipeline.ops.resync_plan import Divergence, Source
from pipeline.primary.regions import (
    HEADER_BYTES,
    RegionGeometryError,
    decode_header,
    set_bits,
)
from pipeline.site import ACTIVITY_LOG_SUFFIX, REGION_LOG_SUFFIX, SiteDir
from schemas import codec
from schemas.records import LOG_RECORDS, LogRecord, VolumeChange, Write, Zero

log = logging.getLogger("lowmark.resync")


@dataclass
class ScanResult:
    #: g + 1's log: where the reverse log was read from, and to (the noted end)
    start1: dict[int, int]
    end1: dict[int, int]
    #: the highest ts found in g + 1's log up to end1 (0 when empty)
    max_ts1: int
    records_read: int


def touch_record(div: Divergence, rec: LogRecord, source: Source, above: int | None = None) -> None:
    """Fold one log record: its byte ranges (only extents with ts > ``above`` if given)."""
    if isinstance(rec, Write):
        for x in rec.extents:
            if above is None or x.ts > above:
                div.touch(rec.volume_id, x.offset, len(x.data), source)
    elif isinstance(rec, Zero):
        if above is None or rec.ts > above:
            div.touch(rec.volume_id, rec.offset, rec.length, source)
    elif isinstance(rec, VolumeChange) and (above is None or rec.ts > above):
        div.volume_changed(rec.volume_id, source)


def read_dirty_logs(div: Divergence, old: SiteDir) -> int:
    """Fold the old primary's dirty-region logs, the fine bitmaps and their activity logs
    (every region of an active extent may have diverged); the number of bits found."""
    found = 0
    rdir = old.regions_dir
    if not rdir.is_dir():
        return 0
    for path in sorted(rdir.iterdir()):
        suffix = next(
            (x for x in (REGION_LOG_SUFFIX, ACTIVITY_LOG_SUFFIX) if path.name.endswith(x)), ""
        )
        if not suffix:
            continue
        vid = path.name[: -len(suffix)]
        raw = path.read_bytes()
        try:
            rb, nregions = decode_header(raw[:HEADER_BYTES])
        except RegionGeometryError as exc:
            event(log, "dirty-region log damaged: its volume is copied whole",
                  level=logging.WARNING, volume=vid, path=str(path), error=str(exc))  # fmt: skip
            div.volume_changed(vid, Source.DIRTY)
            continue
        dirty = set_bits(raw[HEADER_BYTES:], nregions)
        div.touch_regions(vid, dirty, rb, Source.DIRTY)
        found += len(dirty)
    return found


def _records(
    kafka_conf: Mapping[str, Any], topic: str, start: Mapping[int, int], end: Mapping[int, int]
) -> Any:
    for msg in read_log(kafka_conf, topic, start, end):
        try:
            rec = codec.decode(msg.value() or b"", LOG_RECORDS)
        except RecordError as exc:
            raise ApplyError(
                f"record {topic}[{msg.partition()}]@{msg.offset()} is bad ({exc}): the regions "
                "it names are unknown, so the resync cannot know what diverged. Inspect it "
                "with `lowmark tail`"
            ) from None
        yield rec, msg.partition(), msg.offset()


def scan(
    kafka_conf: Mapping[str, Any],
    cg: str,
    generation: int,
    cut: int,
    base_offsets: Mapping[int, int],
    div: Divergence,
    old: SiteDir,
) -> ScanResult:
    """Fold all three sources into ``div``. ``generation`` is the new one (g + 1)."""
    read = 0
    bounds0 = log_bounds(kafka_conf, cg, generation - 1)
    lost = {p: lo for p, (lo, _hi) in bounds0.items() if lo > 0}
    if lost:
        event(log, "generation g's log is not retained from its start: records above the "
              "cut that retention deleted are not seen", level=logging.WARNING,
              generation=generation - 1, low_offsets=lost)  # fmt: skip
    start0 = {p: lo for p, (lo, _hi) in bounds0.items()}
    end0 = {p: hi for p, (_lo, hi) in bounds0.items()}
    for rec, p, off in _records(kafka_conf, CgTopics(cg, generation - 1).log, start0, end0):
        read += 1
        beyond = off >= base_offsets.get(p, 0)
        touch_record(div, rec, Source.ABOVE_CUT, None if beyond else cut)
    read_dirty_logs(div, old)
    bounds1 = log_bounds(kafka_conf, cg, generation)
    gone = {p: lo for p, (lo, _hi) in bounds1.items() if lo > 0}
    if gone:
        raise FailoverError(
            f"generation {generation}'s log is not retained from its start (low offsets "
            f"{gone}): what the new primary wrote since the cut is not known, so no delta "
            "is safe. Rebuild this site as a backup: move its data dir away and start "
            "`lowmark apply` on an empty one"
        )
    start1 = {p: lo for p, (lo, _hi) in bounds1.items()}
    end1 = {p: hi for p, (_lo, hi) in bounds1.items()}
    max_ts1 = 0
    for rec, _p, _off in _records(kafka_conf, CgTopics(cg, generation).log, start1, end1):
        read += 1
        touch_record(div, rec, Source.REVERSE_LOG)
        max_ts1 = max(max_ts1, *rec.timestamps())
    return ScanResult(start1, end1, max_ts1, read)
