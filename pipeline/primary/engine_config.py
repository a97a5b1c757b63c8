"""The interceptor's settings (``InterceptorConfig``), apart from the engine that uses them.

``generation`` and ``clock_floor_us`` are what a failover hands the new primary
(``ConsistencyGroup.open(..., generation=g, clock_floor_us=base_w)``): the CG generation
whose topics and transactional ids the interceptor uses (``CgTopics(cg, generation)``),
and the cut that generation starts from. ``clock_floor_us`` is a ts (the roles'
``base_w``), not a plain microsecond count: every ts the interceptor stamps is above it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.primary.regions import check_region_bytes

MiB = 1 << 20


@dataclass(frozen=True)
class InterceptorConfig:
    cg: str
    interceptor_id: str
    state_dir: Path
    tick_interval_s: float = 0.01
    max_clock_skew_us: int = 0
    #: a large write is cut into fragments of at most this many bytes (one ts each write)
    fragment_bytes: int = 512 * 1024
    #: a Write record coalesces one volume's writes of a tick up to this size
    max_record_bytes: int = 900 * 1024
    max_unreplicated_bytes: int = 256 * MiB
    #: one tick's transaction carries at most this much; the rest goes in the next one at
    #: once, so S keeps moving and sync writes don't wait behind one huge commit
    max_transaction_bytes: int = 16 * MiB
    replication_timeout_s: float = 30.0
    log_partitions: int = 4
    replication_factor: int | None = None
    #: Kafka compression of log batches; block data often compresses and lz4 costs little
    #: (measured: random data gains nothing either way, bench/nbd.py)
    compression: str = "lz4"
    #: the CG generation this interceptor writes (0: the names every CG had before)
    generation: int = 0
    #: a ts (the generation's base_w): every ts stamped is above it
    clock_floor_us: int = 0
    #: how often the roles are read; a newer generation fences this interceptor
    generation_check_s: float = 1.0
    #: the dirty-region log's granularity (a power of two, 4 KiB..64 MiB); 0 turns the log
    #: off, and then a crash loses the async writes acknowledged after the last tick
    region_bytes: int = 64 * 1024
    #: the activity log's extent over the regions (DRBD's 4 MiB): a write waits only for
    #: its extent's bit, the regions' bitmap follows in the background; a crash then
    #: republishes the active extents whole. 0 (or <= region_bytes): writes wait for their
    #: regions' bits, a crash republishes exactly the dirty regions
    region_extent_bytes: int = 4 << 20
    #: a region stays dirty this long after its last write, so a hot region's next write
    #: needs no fsync (DRBD's activity log); a crash republishes it, which is all it costs
    region_keep_s: float = 2.0
    #: per volume, at most this many bytes of regions are kept dirty for the keep window
    #: (bounds the republish after a crash beyond what is not yet in Kafka)
    region_keep_max_bytes: int = 1 << 30
    #: a named snapshot's background copy at most this fast, bytes/s (0: unlimited), so
    #: the copy does not starve the volumes' own I/O
    snapshot_copy_rate: int = 0
    #: take part in the CG's markers (``pipeline.primary.marker_member``): a consumer of
    #: the control topic and a thread; off, a ``lowmark marker`` naming this interceptor
    #: aborts for want of its answer
    markers: bool = True
    #: let a sync volume run on a log topic with a single copy (replication factor 1 or
    #: min.insync.replicas 1: a development cluster); its acknowledgement then survives no
    #: broker loss. Default: ``LOWMARK_SERVE_ALLOW_SINGLE_COPY_SYNC`` (the [serve] key's
    #: variable), else off
    allow_single_copy_sync: bool = field(
        default_factory=lambda: os.environ.get("LOWMARK_SERVE_ALLOW_SINGLE_COPY_SYNC", "")
        .lower() in ("1", "true", "yes")
    )
    #: publish each volume's entry to ``lowmark.config`` (``pipeline.topology.catalog``)
    topology: bool = True

    def validate(self) -> InterceptorConfig:
        if not self.interceptor_id or "/" in self.interceptor_id:
            raise ConfigError(f"interceptor id {self.interceptor_id!r} is invalid")
        if not 0.0005 <= self.tick_interval_s <= 10:
            raise ConfigError("tick_interval_s must be between 0.0005 and 10 seconds")
        if self.fragment_bytes > self.max_record_bytes - 1024:
            raise ConfigError("fragment_bytes must leave room for a record header")
        if self.max_record_bytes > 1_000_000 - 4096:
            raise ConfigError(
                "max_record_bytes must stay below Kafka's default message.max.bytes (1 MB)"
            )
        if self.max_unreplicated_bytes < 4 * self.max_record_bytes:
            raise ConfigError("max_unreplicated_bytes is too small to batch anything")
        for name in ("generation", "clock_floor_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if not 0.01 <= self.generation_check_s <= 60:
            raise ConfigError(
                "generation_check_s must be between 0.01 and 60 seconds: it bounds how long "
                "a primary that lost its role keeps acknowledging writes"
            )
        if self.region_bytes:
            try:
                check_region_bytes(self.region_bytes)
                if self.region_extent_bytes:
                    check_region_bytes(self.region_extent_bytes)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return self
