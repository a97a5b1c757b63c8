"""Where a backup site's applied state is kept: its Checkpoint records.

A checkpoint lives in two places: a local file (read first at a restart: it is never older
than what this site wrote to Kafka) and the CG's compacted checkpoints topic, keyed by site
(what a replacement node, ``lowmark status`` and ``lowmark verify`` read). The applier
decides *when* to checkpoint (after fdatasync of the images it covers, invariant 4); this
module only reads and writes the records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import latest
from connectors.kafka.topics import CgTopics
from pipeline.errors import ApplyError, RecordError
from pipeline.fsutil import atomic_write
from schemas import codec
from schemas.records import Checkpoint


def decode_checkpoint(value: bytes) -> Checkpoint:
    return codec.decode(value, Checkpoint)


class Checkpointer:
    """Reads and writes the Checkpoint records of one site of one CG."""

    def __init__(
        self, cg: str, site: str, path: Path, kafka_conf: dict[str, Any], producer: Producer
    ) -> None:
        self.site = site
        self.path = path
        self.topics = CgTopics(cg)
        self.kafka_conf = kafka_conf
        #: shared with the applier's dead-letter copies (thread-safe; one connection)
        self.producer = producer

    def load(self) -> Checkpoint | None:
        """The site's latest checkpoint: the local file, else the topic's, else None."""
        if self.path.exists():
            try:
                return decode_checkpoint(self.path.read_bytes())
            except RecordError as exc:
                raise ApplyError(
                    f"local checkpoint {self.path} is unreadable ({exc}); move it "
                    "away to resume from the Kafka copy, or rebuild the site"
                ) from None
        site = self.site

        def mine(value: bytes) -> Checkpoint | None:
            rec = decode_checkpoint(value)
            return rec if rec.site == site else None

        best = latest(
            self.kafka_conf,
            self.topics.checkpoints,
            mine,
            lambda a, b: b is None or (a is not None and a.w >= b.w),
        )
        return best[0] if best and best[0] is not None else None

    def persist(self, rec: Checkpoint) -> bytes:
        """Local file first (atomically), then the compacted topic. Images already synced."""
        value = codec.encode(rec)
        atomic_write(self.path, value)
        self.producer.produce(
            self.topics.checkpoints, value, self.site, headers=codec.headers_for(rec)
        )
        self.producer.flush(30)
        return value
