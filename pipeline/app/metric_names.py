"""The metric catalogue: how a service's number becomes a Prometheus metric.

Services keep their numbers in plain dicts with short keys (``rpo_s``, ``applied_ops``,
``w``); this module is the one place that says what each key *is* — a counter or a gauge,
its unit — and names it by Prometheus' conventions: base units in the name (``_seconds``,
``_bytes``), ``_total`` on counters and on nothing else, ``_per_second`` for rates, and
hybrid-logical-clock positions as ``_timestamp_seconds`` (the physical part, Unix seconds:
the packed 64-bit ts does not survive a float64, and a wall time is what a graph and
``time() - x`` want). ``lowmark_<service>_`` prefixes every name.

A key the catalogue does not know is still exported, as a gauge named by the unit rules,
and :func:`metric` says so (``known=False``): the suite scrapes every service and fails
on an unknown key, so a new number is classified where it is added, not guessed at by a
dashboard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from schemas.ts import ts_physical_us

Kind = Literal["counter", "gauge"]

# Keys that only grow while a service runs (reset on restart, as Prometheus expects).
# fmt: off
COUNTERS = frozenset({
    "acks", "activity_evicted", "applied_bytes", "applied_early", "applied_ops", "beyond_cut",
    "blocked_s", "bytes", "bytes_read", "checkpoints", "consumer_errors", "control_errors",
    "events", "fenced", "gate_held_s", "gate_held_writes", "gate_holds", "generation_switches",
    "ignored", "markers_aborted", "markers_dropped", "markers_emitted", "markers_quiesced",
    "markers_self_resumed", "migration_holds", "migration_holds_lapsed", "migrations_in",
    "migrations_out", "nbd_bytes_read", "nbd_bytes_written", "nbd_protocol_errors",
    "pending_dropped", "publish_failures", "published", "records", "records_read",
    "region_background_fsyncs", "region_cleared", "region_fsyncs", "region_marks",
    "region_marks_new", "region_page_writes", "republished_bytes", "republished_regions",
    "roles_errors", "roles_poll_errors", "scheduled_marker_failures", "scheduled_markers",
    "snapshot_copy_bytes", "snapshot_name_conflicts", "snapshots_already_held",
    "snapshots_begun", "snapshots_cancelled", "snapshots_failed", "snapshots_missed",
    "snapshots_pruned", "snapshots_sealed", "snapshots_taken", "takeovers", "targets_dropped",
    "ticks", "transactions", "txn_retries"
})
# fmt: on

# Keys that go up and down (or are set once): state, sizes, rates, ages, flags.
# fmt: off
GAUGES = frozenset({
    "active", "activity_extent_bytes", "activity_extents", "apply_bytes_per_s", "bytes_copied",
    "bytes_left", "bytes_planned", "cut_rpo_s", "durable_seq", "epoch", "failed",
    "fenced_by_generation", "foreground_bytes_per_s", "generation", "halted", "holds",
    "kafka_trouble", "lag_records", "last_commit_ms", "limit_bytes_per_s", "lost_declared",
    "marker_holding", "marker_last_hold_s", "marker_last_step_lag_s", "marker_max_hold_s",
    "members", "migration_last_hold_s", "migrations_syncing", "nbd_connections_open",
    "paused", "pending_bytes", "progress_offset",
    "region_bytes", "region_dirty", "region_marks_per_fsync",
    "retained_share_before_checkpoint", "retention_lost", "rpo_s", "snapshot_last_copy_s",
    "snapshots_copying", "snapshots_held", "staged_bytes", "staged_ops", "unreplicated_bytes",
    "volumes", "volumes_parked"
})
# fmt: on

# Hybrid-logical-clock positions: exported as the physical part, in Unix seconds.
TIMESTAMPS = {
    "w": "w",
    "published_w": "published_w",
    "applied_w": "applied_w",
    "checkpoint_w": "checkpoint_w",
    "target_w": "target_w",
    "staged_w": "staged_w",
    "cut_w": "cut_w",
    "cut_ts": "cut",
    "w_seen": "w_seen",
    "s": "progress",
    "max_s": "max_progress",
    "held_at_s": "held_at",
    "last_marker_ts": "last_marker",
    "marker_last_ts": "marker_last",
    "snapshot_last_ts": "snapshot_last",
}

# Keys whose names would read wrong under the rules (a gauge that ends in ``_total``).
RENAMES = {
    "rollforward_bytes_total": "rollforward_bytes_planned",
}

# Families of keys built from a prefix (failover timings, roll-forward progress).
PREFIXED_GAUGES = ("failover_", "rollforward_")

HELP = {
    "rpo_s": "Age of the applied or published W: how much a failover now would lose",
    "w": "The CG's low-water mark W (physical time of its ts)",
    "applied_w": "W this site's images hold (physical time of its ts)",
    "checkpoint_w": "W of the last durable checkpoint (physical time of its ts)",
    "unreplicated_bytes": "Bytes written here that Kafka has not acknowledged",
    "pending_bytes": "Bytes read from the log and waiting for W",
    "halted": "1 while the service stopped on something it must not apply (a dead letter)",
    "fenced_by_generation": "1 once a newer generation replaced this primary",
    "lost_declared": "Interceptors the watermark service declared lost",
    "retention_lost": "1 when records this site needs were deleted by the log's retention",
    "retained_share_before_checkpoint": "Share of the retained log before this site's "
    "checkpoint, where retention deletes (near 0: the next deletions take records it needs)",
    "kafka_trouble": "1 while the service cannot reach Kafka",
    "active": "1 while this instance publishes W; 0 while it stands by",
    "bytes_left": "Bytes a resync still has to copy",
}


@dataclass(frozen=True)
class Metric:
    name: str  # the full Prometheus name, without ``_total`` (the client adds it)
    kind: Kind
    help: str
    known: bool
    timestamp: bool = False  # an HLC ts: export its physical part in seconds
    scale: float = 1.0

    def value(self, raw: float) -> float:
        if self.timestamp:
            return ts_physical_us(int(raw)) / 1e6 if raw > 0 else 0.0
        return float(raw) * self.scale


def _units(key: str) -> tuple[str, float]:
    """Rename a key's unit suffix to the base unit Prometheus wants, with the scale."""
    if key.endswith("_per_s"):
        return key[: -len("_per_s")] + "_per_second", 1.0
    if key.endswith("_ms"):
        return key[: -len("_ms")] + "_seconds", 1e-3
    if key.endswith("_s"):
        return key[: -len("_s")] + "_seconds", 1.0
    return key, 1.0


def metric(service: str, key: str) -> Metric:
    """The metric a service's number ``key`` is exported as (pure: no registry)."""
    prefix = f"lowmark_{service}_"
    help_ = HELP.get(key, key.replace("_", " "))
    if key in TIMESTAMPS:
        return Metric(f"{prefix}{TIMESTAMPS[key]}_timestamp_seconds", "gauge", help_, True,
                      timestamp=True)  # fmt: skip
    base, scale = _units(RENAMES.get(key, key))
    if key in COUNTERS:
        return Metric(prefix + base, "counter", help_, True, scale=scale)
    known = key in GAUGES or key in RENAMES or key.startswith(PREFIXED_GAUGES)
    return Metric(prefix + base, "gauge", help_, known, scale=scale)


def exported_name(m: Metric) -> str:
    """The name a scrape shows (counters carry ``_total``)."""
    return m.name + "_total" if m.kind == "counter" else m.name


def from_scrape(
    service: str, scraped: Mapping[str, float], keys: Iterable[str]
) -> dict[str, float]:
    """A scrape read back into the service's own keys and units, for the keys present
    (timestamps stay Unix seconds: the HLC's logical part is not in a scrape)."""
    out = {}
    for key in keys:
        m = metric(service, key)
        if (v := scraped.get(exported_name(m))) is not None:
            out[key] = v if m.timestamp else v / m.scale
    return out


__all__ = ["COUNTERS", "GAUGES", "TIMESTAMPS", "Metric", "exported_name", "from_scrape", "metric"]
