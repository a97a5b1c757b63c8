"""What configures a site's applier (``ApplierConfig``) and what it counts (``ApplierStats``).

Kept apart from ``applier`` (which re-exports both) so that module stays short.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

__all__ = ["ApplierConfig", "ApplierStats"]


@dataclass(frozen=True)
class ApplierConfig:
    cg: str
    site: str
    data_dir: Path
    checkpoint_interval_s: float = 1.0
    max_pending_bytes: int = 256 << 20
    log_partitions: int = 4
    replication_factor: int | None = None
    #: (partition, offset) of bad records the operator chose to skip (logged, counted)
    skip: frozenset[tuple[int, int]] = frozenset()
    #: per-volume content digests cost a read of every allocated byte (seconds per GiB),
    #: during which nothing is applied: a checkpoint carries them only this often (None:
    #: only at explicit checkpoints, e.g. ``lowmark verify``; 0: at every checkpoint).
    #: Without them a checkpoint's digests are "".
    digest_interval_s: float | None = None
    #: False: never compute digests (tests that compare the images themselves)
    compute_digests: bool = True
    #: copy the images into the site's snapshot store at a checkpoint this often (0: never);
    #: restore and replay start from the newest snapshot at or below the wanted cut
    snapshot_interval_s: float = 0.0
    snapshots_kept: int = 4
    #: named snapshots (``lowmark snapshot``) kept: the newest N (0: any number), none
    #: older than max_age_s (0: any age); the same rule at every site keeps the same ones
    named_keep_last: int = 0
    named_max_age_s: float = 0.0

    def validate(self) -> ApplierConfig:
        if not self.site or "/" in self.site:
            raise ConfigError(f"site name {self.site!r} is invalid")
        if self.checkpoint_interval_s <= 0:
            raise ConfigError("checkpoint_interval_s must be positive")
        if self.named_keep_last < 0 or self.named_max_age_s < 0:
            raise ConfigError("snapshot retention (keep_last, max_age_s) must not be negative")
        return self


@dataclass
class ApplierStats:
    applied_ops: int = 0
    applied_bytes: int = 0
    checkpoints: int = 0
    skipped_bad: int = 0
    records_read: int = 0
    #: ops applied ahead of their W being readable to its offsets (a backlog over budget)
    applied_early: int = 0
    bytes_read: int = 0
    watermarks_seen: int = 0
    consumer_errors: int = 0
    last_checkpoint_us: int = 0
    markers_dropped: int = 0
    targets_dropped: int = 0
    generation_switches: int = 0
    #: records of a generation at or above its failover cut: dropped unread, never applied
    beyond_cut: int = 0
    started_mono: float = 0.0
