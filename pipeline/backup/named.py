"""A backup site's named snapshots: the copy each Snapshot record asks for, at its ts.

The applier hands every Snapshot op here in the planner's order: after every op with
ts <= the snapshot's ts and before any above it, so the site's images are exactly the
primary's at that ts while the copy is taken. The applier waits for the copy (it applies
nothing meanwhile): the images must not move under it. With reflinks (XFS, btrfs) that is
instant; elsewhere it is a sparse copy at disk speed, which only delays this site's
apply (its RPO), never the primary.

Crash safety, with the checkpoint (``Checkpoint.snapshots`` lists the complete ones):

- a crash during the copy leaves a partial copy, removed at the next start; the applier
  restarts from a checkpoint below the snapshot's ts (no checkpoint is written while the
  copy runs: it is on the apply thread), re-applies up to it, the images are at its ts
  again, and the copy is taken anew;
- a crash after the copy and before a checkpoint covers it: the record is applied again,
  finds the complete copy with the same ts, and keeps it: exactly one copy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.image.image import file_digest
from pipeline.errors import SnapshotError
from pipeline.logs import event
from pipeline.site import SiteDir
from pipeline.snapshot_store import SnapshotStore, retention_victims
from schemas.checkpoint import SnapshotHeld
from schemas.records import Snapshot
from schemas.ts import format_ts

log = logging.getLogger("lowmark.snapshots")


@dataclass(frozen=True)
class Retention:
    """Which named snapshots a site keeps: the newest ``keep_last`` (0: any number),
    none older than ``max_age_s`` (0: any age). The newest is always kept."""

    keep_last: int = 0
    max_age_s: float = 0.0


class SiteSnapshots:
    """The named snapshots of one backup site, kept by its applier."""

    def __init__(
        self,
        data_dir: Path,
        *,
        cg: str,
        site: str,
        retention: Retention = Retention(),
        wall_us: Any = None,
    ) -> None:
        self.site_dir = SiteDir(data_dir)
        self.store = SnapshotStore(self.site_dir)
        self.cg, self.site, self.retention = cg, site, retention
        self._wall_us = wall_us or (lambda: time.time_ns() // 1000)
        self.stats: dict[str, Any] = {
            "snapshots_taken": 0, "snapshots_already_held": 0, "snapshots_missed": 0,
            "snapshots_pruned": 0, "snapshot_name_conflicts": 0, "snapshot_last_ts": 0,
            "snapshot_last_copy_s": 0.0,
        }  # fmt: skip
        for name in self.store.discard_partials():
            event(log, "removed an unfinished snapshot copy (a crash cut it short); it is "
                  "taken again when its record is applied", logging.WARNING, snapshot=name,
                  site=site)  # fmt: skip

    def take(
        self, rec: Snapshot, catalog: dict[str, dict[str, Any]], staged: bool, ahead: bool = False
    ) -> None:
        """Copy every volume the record names, now (the images are at ``rec.ts``, unless
        ``staged`` or ``ahead``: a catch-up applied later writes early, then no copy)."""
        held = self.store.get(rec.name)
        if held is not None:
            if held.ts == rec.ts:
                self.stats["snapshots_already_held"] += 1  # re-applied after a restart
                return
            self.stats["snapshot_name_conflicts"] += 1
            event(log, "a Snapshot record reuses the name of a snapshot this site holds at "
                  "another ts; the one held is kept. Delete it if the new one is wanted",
                  logging.ERROR, snapshot=rec.name, held_ts=format_ts(held.ts),
                  record_ts=format_ts(rec.ts), site=self.site)  # fmt: skip
            return
        if ahead:
            self.stats["snapshots_missed"] += 1
            event(log, "site catching up a backlog: writes after the snapshot's ts were "
                  "applied early, no copy taken here; restore it by replay (`lowmark restore "
                  "--snapshot`) while the log holds it", logging.WARNING, snapshot=rec.name,
                  site=self.site)  # fmt: skip
            return
        if staged:
            self.stats["snapshots_missed"] += 1
            event(log, "site paused: its images are not at the snapshot's ts, no copy taken "
                  "here; restore it by replay (`lowmark restore --snapshot`) while the log "
                  "holds it", logging.WARNING, snapshot=rec.name, site=self.site)  # fmt: skip
            return
        wanted = set(rec.volume_ids) or set(catalog)
        missing = sorted(wanted - set(catalog))
        if missing:
            event(log, "the snapshot names volumes this site does not have; copied the rest",
                  logging.WARNING, snapshot=rec.name, missing=missing)  # fmt: skip
        entries = [catalog[v] for v in sorted(wanted & set(catalog))]
        started = time.monotonic()
        try:
            snap = self.store.copy_images(
                rec.name, rec.ts, self.site_dir, entries, file_digest, cg=self.cg,
                taken_at="backup", site=self.site, created_us=self._wall_us(),
            )  # fmt: skip
        except OSError as exc:
            raise SnapshotError(
                f"site {self.site}: cannot copy snapshot {rec.name!r} ({exc}). Free space "
                f"under {self.store.root} or delete old snapshots; the applier retries from "
                "its checkpoint when restarted"
            ) from exc
        took = time.monotonic() - started
        self.stats["snapshots_taken"] += 1
        self.stats["snapshot_last_ts"] = rec.ts
        self.stats["snapshot_last_copy_s"] = round(took, 6)
        event(log, "snapshot taken", snapshot=rec.name, ts=format_ts(rec.ts), site=self.site,
              volumes=len(entries), bytes=snap.size, copy_ms=round(took * 1000, 3))  # fmt: skip
        self.prune()

    def prune(self) -> list[str]:
        doomed = retention_victims(self.store.entries(), keep_last=self.retention.keep_last,
                                   max_age_s=self.retention.max_age_s,
                                   now_us=self._wall_us())  # fmt: skip
        for name in doomed:
            self.store.delete(name)
            self.stats["snapshots_pruned"] += 1
            event(log, "snapshot removed by retention", snapshot=name, site=self.site)
        return doomed

    def held(self) -> tuple[SnapshotHeld, ...]:
        return tuple(SnapshotHeld(s.name, s.ts, s.size) for s in self.store.entries())

    def metrics(self) -> dict[str, Any]:
        return {**self.stats, "snapshots_held": len(self.store.entries())}


__all__ = ["Retention", "SiteSnapshots"]
