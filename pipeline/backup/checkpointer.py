"""Where a backup site's applied state is kept: its Checkpoint records.

A checkpoint lives in two places: a local file (read first at a restart: it is never older
than what this site wrote to Kafka) and the compacted checkpoints topic of the generation
it is of (``CgTopics(cg, generation).checkpoints``), keyed by site (what a replacement
node, ``lowmark status`` and ``lowmark verify`` read). A checkpoint's ``generation`` says
whose log its offsets are of. The applier decides *when* to checkpoint (after fdatasync
of the images it covers, invariant 4); this module only reads and writes the records.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds, latest
from connectors.kafka.topics import CgTopics
from pipeline.errors import ApplyError, RecordError
from pipeline.fsutil import atomic_write
from schemas import codec
from schemas.records import Checkpoint


def decode_checkpoint(value: bytes) -> Checkpoint:
    return codec.decode(value, Checkpoint)


def topic_checkpoint(
    kafka_conf: dict[str, Any], cg: str, site: str, generation: int
) -> Checkpoint | None:
    """The newest checkpoint of ``site`` in generation ``generation``'s checkpoints topic
    (None: none, or no such topic: that generation never had one)."""
    topic = CgTopics(cg, generation).checkpoints
    if generation and bounds(kafka_conf, topic) is None:
        return None  # generation 0's topic always exists (ensure_topics); later ones may not

    def mine(value: bytes) -> Checkpoint | None:
        rec = decode_checkpoint(value)
        return rec if rec.site == site and rec.generation == generation else None

    best = latest(
        kafka_conf,
        topic,
        mine,
        lambda a, b: b is None or (a is not None and a.w >= b.w),
    )
    return best[0] if best and best[0] is not None else None


#: a site with less than this share of the retained log before its checkpoint is warned
#: about: the oldest records are the next retention deletes, and the site needs them
RETENTION_WARN_SHARE = 0.1


def retention_state(
    offsets: Mapping[int, int], log_bounds: Mapping[int, tuple[int, int]]
) -> tuple[str, float | None]:
    """Whether a site can still catch up from Kafka, from its checkpoint offsets and the
    log's (low, end) per partition:

    - ("lost", 0.0): some partition's log start is past the site's offset: records it still
      needs were deleted by retention;
    - ("near", share): retention is deleting (a log start above 0) and under
      ``RETENTION_WARN_SHARE`` of that partition's retained records lie before the site's
      offset: the next deletions take what it needs;
    - ("ok", share) otherwise.

    ``share``: the smallest share over partitions where retention has deleted (None: none).
    A site at a partition's end needs nothing more of it."""
    shares = []
    for p, (low, end) in log_bounds.items():
        at = max(0, offsets.get(p, 0))  # a negative offset: nothing read there yet
        if at < low:
            return "lost", 0.0
        if low > 0 and end > low and at < end:
            shares.append((at - low) / (end - low))
    share = min(shares) if shares else None
    if share is not None and share < RETENTION_WARN_SHARE:
        return "near", share
    return "ok", share


def retention_lost(
    offsets: Mapping[int, int], log_bounds: Mapping[int, tuple[int, int]]
) -> tuple[int, int, int] | None:
    """The first (partition, needed offset, log start) where retention deleted a record a
    reader starting at ``offsets`` needs (a partition not in ``offsets``: from 0); None."""
    for p, (low, _end) in sorted(log_bounds.items()):
        at = max(0, offsets.get(p, 0))
        if at < low:
            return p, at, low
    return None


def retention_lost_message(
    site: str, topic: str, partition: int, needed: int, low: int, fresh: bool = False
) -> str:
    what = "a new site starts at the log's beginning" if fresh else "its checkpoint is older"
    return (
        f"site {site} needs {topic}[{partition}] from offset {needed}, but retention deleted "
        f"the log up to offset {low} ({what}): it cannot catch up from Kafka. Rebuild it from "
        f"a peer site's checkpoint copy: lowmark apply --site {site} --bootstrap-from "
        "PEER_DATA_DIR (the peer needs [apply] snapshot_interval_s > 0), or raise the log's "
        "retention so this does not recur"
    )


class Checkpointer:
    """Reads and writes the Checkpoint records of one site of one CG."""

    def __init__(
        self, cg: str, site: str, path: Path, kafka_conf: dict[str, Any], producer: Producer
    ) -> None:
        self.cg = cg
        self.site = site
        self.path = path
        self.kafka_conf = kafka_conf
        #: shared with the applier's dead-letter copies (thread-safe; one connection)
        self.producer = producer

    def load(self, generation: int = 0) -> Checkpoint | None:
        """The site's latest checkpoint: the local file (it says its generation), else the
        newest of the checkpoints topics of ``generation`` (the CG's current one) and the
        ones before it, newest generation first; else None."""
        if self.path.exists():
            try:
                return decode_checkpoint(self.path.read_bytes())
            except RecordError as exc:
                raise ApplyError(
                    f"local checkpoint {self.path} is unreadable ({exc}); move it "
                    "away to resume from the Kafka copy, or rebuild the site"
                ) from None
        for g in range(generation, -1, -1):
            found = topic_checkpoint(self.kafka_conf, self.cg, self.site, g)
            if found is not None:
                return found
        return None

    def persist(self, rec: Checkpoint) -> bytes:
        """Local file first (atomically), then its generation's compacted topic. Images
        already synced."""
        value = codec.encode(rec)
        atomic_write(self.path, value)
        self.producer.produce(
            CgTopics(rec.cg, rec.generation).checkpoints,
            value,
            self.site,
            headers=codec.headers_for(rec),
        )
        self.producer.flush(30)
        return value
