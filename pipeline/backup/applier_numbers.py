"""What a site's applier exposes: its lag, retention state and metrics (``ApplierNumbers``).

A mixin of ``Applier``, kept apart so that module keeps to applying; the attributes it
reads are the applier's.
"""

from __future__ import annotations

from typing import Any

from pipeline.backup.checkpointer import retention_state
from pipeline.errors import KafkaError
from schemas.ts import ts_physical_us

__all__ = ["ApplierNumbers"]


class ApplierNumbers:
    """Mixin of ``Applier``."""

    _log: Any
    planner: Any
    topics: Any
    stats: Any
    applied_w: int
    checkpoint_w: int
    _max_seen_w: int
    halted: Any
    markers: Any
    generation: int
    roles: Any
    named: Any
    _now: Any
    _wall_us: Any

    def pause_metrics(self) -> dict[str, Any]:
        raise NotImplementedError

    def lag(self) -> dict[int, int]:
        """Records between this site's position and the log's end, per partition."""
        assert self._log is not None
        out = {}
        for p, pos in self.planner.positions().items():
            try:
                _low, high = self._log.watermark_offsets(self.topics.log, p, cached=True)
            except KafkaError:
                continue
            out[p] = max(0, high - pos)
        return out

    def retention(self) -> tuple[str, float | None]:
        """``retention_state`` of this site's replay offsets against the log's bounds."""
        assert self._log is not None
        log_bounds = {}
        for p in self.planner.positions():
            try:
                log_bounds[p] = self._log.watermark_offsets(self.topics.log, p, cached=True)
            except KafkaError:
                continue
        return retention_state(self.planner.checkpoint_offsets(), log_bounds)

    def metrics(self) -> dict[str, Any]:
        w = self.applied_w
        retention, share = self.retention() if self._log is not None else ("ok", None)
        elapsed = max(1e-9, self._now() - self.stats.started_mono)
        return {
            "applied_w": w,
            "checkpoint_w": self.checkpoint_w,
            "target_w": self._max_seen_w,
            "rpo_s": (self._wall_us() - ts_physical_us(w)) / 1e6 if w > 0 else None,
            "applied_ops": self.stats.applied_ops,
            "applied_bytes": self.stats.applied_bytes,
            "apply_bytes_per_s": self.stats.applied_bytes / elapsed,
            "pending_bytes": self.planner.pending_bytes(),
            "records_read": self.stats.records_read,
            "bytes_read": self.stats.bytes_read,
            # ops applied ahead of their W over the memory budget (a backlog caught up)
            "applied_early": self.stats.applied_early,
            "pending_dropped": self.planner.stats.dropped,
            "checkpoints": self.stats.checkpoints,
            "halted": self.halted is not None,
            "consumer_errors": self.stats.consumer_errors,
            "markers_dropped": self.stats.markers_dropped,
            "last_marker_ts": max((m.ts for m in self.markers if m.TYPE == "Marker"), default=0),
            "targets_dropped": self.stats.targets_dropped,
            "generation": self.generation,
            "generation_switches": self.stats.generation_switches,
            "beyond_cut": self.stats.beyond_cut,
            "roles_poll_errors": self.roles.errors,
            # 1: records this site still needs were deleted; it cannot catch up from Kafka
            "retention_lost": retention == "lost",
            "retained_share_before_checkpoint": share,
            # per partition: records between this site's position and the log's end
            "lag_records": self.lag() if self._log is not None else {},
            **self.pause_metrics(),
            **self.named.metrics(),
        }
