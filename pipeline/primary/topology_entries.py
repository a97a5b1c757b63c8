"""What a primary tells ``lowmark.config`` about its volumes (``VolumeEntry``).

An entry is published after the volume change it describes is durable in the CG's log, so
the model never shows a volume the log does not have yet; and every volume's entry again
when the primary opens, which mends an entry a crash or a broker fault kept from being
sent. An entry's ts orders it (with the generation): a change's is its record's, a
re-publish takes a fresh one from the interceptor's clock, so a restart never re-publishes
an older state over a newer one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.topology.catalog import TopologyWriter
from schemas.records import VolumeEntry

if TYPE_CHECKING:
    from pipeline.primary.volume import ConsistencyGroup, VolumeInfo

__all__ = ["VolumeEntries"]


class VolumeEntries:
    def __init__(self, cg: ConsistencyGroup) -> None:
        self.cg = cg
        engine = cg.interceptor
        self.writer = TopologyWriter(engine.kafka_conf, engine.config.replication_factor)

    def entry(
        self, info: VolumeInfo, ts: int, deleted: bool = False,
        access: dict[str, str] | None = None,
    ) -> VolumeEntry:  # fmt: skip
        """``access``: every interceptor's state of the volume (a migration's cutover
        names the source ``inaccessible`` in the same entry); default: this one's only."""
        engine = self.cg.interceptor
        iid = engine.config.interceptor_id
        return VolumeEntry(
            engine.config.cg, info.volume_id, info.name, info.size, info.mode,
            dict(info.metadata or {}), deleted, engine.config.generation, iid, ts,
            engine.time_source.wall_us(), {**(access or {}), iid: "optimized"},
        )  # fmt: skip

    def changed(
        self, info: VolumeInfo, ts: int, deleted: bool = False,
        access: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.writer.publish_volume(self.entry(info, ts, deleted, access))

    def publish_all(self) -> None:
        for vol in list(self.cg.volumes.values()):
            self.changed(vol.info, self.cg.interceptor.clock.now())

    def close(self) -> None:
        self.writer.close()
