"""The primary's named snapshots: a point-in-time copy of its volumes at a marker's ts.

``lowmark snapshot create`` is a marker with ``snapshot`` set (``pipeline.primary.markers``).
While a member holds writes for it (every write it admitted has taken effect, none is in
progress), ``begin`` starts one ``PitCopy`` per volume: from then on each write first
saves the bytes it overwrites into the copy (copy-before-write), and a thread copies the
rest. So the hold lasts one Kafka hop, whatever the volumes' size, and the copy is the
images exactly at the cap, which is the image at the marker's ts (nothing of this
interceptor lies between its cap and the marker's ts, and its clock jumps past that ts
before it resumes). With reflinks (XFS, btrfs) the copy is complete at once.

When the marker completes, ``confirm`` lets the copies finish, then seals the copy in the
site's store (``pipeline.snapshot_store``) and reports COPIED; when it aborts, ``cancel``
throws the copies away. A crash loses a copy in progress (its partial directory is
removed at the next start): the backups still take theirs from the Snapshot record, and
``lowmark snapshot list`` shows the primary without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connectors.image.image import file_digest
from pipeline.errors import SnapshotError
from pipeline.logs import event
from pipeline.primary.pit_copy import PitCopy
from pipeline.snapshot_store import SnapshotStore, check_snapshot_name
from schemas.ts import format_ts

if TYPE_CHECKING:
    from pipeline.primary.volume import ConsistencyGroup, Volume

log = logging.getLogger("lowmark.snapshots")

#: the copy's unit: a write into a chunk not yet copied first copies that chunk (64 KiB:
#: the first write there waits ~0.1 ms; the bitmap costs 16 MiB per TiB of volume)
COPY_CHUNK = 64 << 10

#: how long a finished copy waits for the emitter's RESUMED before it is dropped (s)
EMIT_WAIT_S = 120.0

#: (marker_id, name, ts, volumes, error) once a confirmed copy is sealed or failed
OnCopied = Callable[[str, str, int, tuple[str, ...], str], None]


@dataclass
class _Taking:
    marker_id: str
    name: str
    copies: dict[str, tuple[Volume, PitCopy]]
    catalog: list[dict[str, Any]]
    started: float
    emitter: str = ""
    ts: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    #: set once the emitter's RESUMED says the Snapshot record is durable (ok) or not
    decided: threading.Event = field(default_factory=threading.Event)
    emitted: bool = False
    thread: threading.Thread | None = None


class PrimarySnapshots:
    """The copies one interceptor's volumes take for named snapshots."""

    def __init__(self, cg: ConsistencyGroup, on_copied: OnCopied | None = None) -> None:
        self.cg = cg
        self.store = SnapshotStore(cg.site)
        self.on_copied = on_copied
        self._lock = threading.Lock()
        self._taking: dict[str, _Taking] = {}
        self.stats: dict[str, Any] = {
            "snapshots_begun": 0, "snapshots_sealed": 0, "snapshots_cancelled": 0,
            "snapshots_failed": 0, "snapshot_copy_bytes": 0, "snapshot_last_copy_s": 0.0,
        }  # fmt: skip
        for name in self.store.discard_partials():
            event(log, "removed a snapshot copy a crash cut short; the backups hold theirs",
                  logging.WARNING, snapshot=name)  # fmt: skip

    def begin(self, marker_id: str, name: str, emitter: str = "") -> tuple[str, ...]:
        """Start the copies of every volume; call while the CG's writes are held and
        drained. The volume ids copied."""
        check_snapshot_name(name)
        if self.store.get(name) is not None:
            raise SnapshotError(f"snapshot {name!r} exists here already: choose another name "
                                "or delete it first (`lowmark snapshot delete`)")  # fmt: skip
        with self._lock:
            if any(t.name == name for t in self._taking.values()):
                raise SnapshotError(f"snapshot {name!r} is being copied here already")
        partial = self.store.begin(name)
        copies: dict[str, tuple[Volume, PitCopy]] = {}
        try:
            for vol in sorted(self.cg.volumes.values(), key=lambda v: v.volume_id):
                with vol._lock:
                    pit = PitCopy(vol.image.fd, vol.size, partial.image_path(vol.volume_id),
                                  vol._lock, chunk=COPY_CHUNK)  # fmt: skip
                    vol.pit = pit
                copies[vol.volume_id] = (vol, pit)
        except BaseException:
            self._drop(copies)
            self.store.abort(name)
            raise
        catalog = [self._entry(v) for v, _ in copies.values()]
        with self._lock:
            self._taking[marker_id] = _Taking(marker_id, name, copies, catalog, time.monotonic(),
                                              emitter)  # fmt: skip
        self.stats["snapshots_begun"] += 1
        return tuple(copies)

    def confirm(self, marker_id: str, ts: int) -> None:
        """The marker completed at ``ts``: finish the copies in the background, then seal."""
        with self._lock:
            taking = self._taking.get(marker_id)
        if taking is None:
            return
        taking.ts = ts
        taking.thread = threading.Thread(target=self._finish, args=(taking,), daemon=True,
                                         name=f"lowmark-snapshot-{taking.name}")  # fmt: skip
        taking.thread.start()

    def on_resumed(self, marker_id: str, interceptor_id: str, ts: int, error: str) -> None:
        """A RESUMED read from the control topic: the emitter's says whether the Snapshot
        record is durable. Only then is a copy sealed: a copy no record names would be a
        snapshot no backup takes."""
        with self._lock:
            taking = self._taking.get(marker_id)
        if taking is None or interceptor_id != taking.emitter or taking.decided.is_set():
            return
        taking.emitted = bool(ts) and not error and (not taking.ts or ts == taking.ts)
        taking.decided.set()

    def cancel(self, marker_id: str) -> None:
        """The marker did not complete: no snapshot; the copies are thrown away."""
        with self._lock:
            taking = self._taking.pop(marker_id, None)
        if taking is None:
            return
        taking.stop.set()
        if taking.thread is not None:
            taking.thread.join()
        self._drop(taking.copies)
        self.store.abort(taking.name)
        self.stats["snapshots_cancelled"] += 1

    def close(self) -> None:
        """Stop every copy in progress (a copy not sealed is removed at the next start)."""
        for marker_id in list(self._taking):
            self.cancel(marker_id)

    def copying(self) -> list[dict[str, Any]]:
        """Copies in progress: name and progress, for status and metrics."""
        with self._lock:
            takings = list(self._taking.values())
        out = []
        for t in takings:
            done = sum(p.copied_bytes for _, p in t.copies.values())
            total = sum(p.total_bytes for _, p in t.copies.values())
            out.append({"name": t.name, "ts": t.ts, "copied_bytes": done, "total_bytes": total})
        return out

    def metrics(self) -> dict[str, Any]:
        return {**self.stats, "snapshots_copying": len(self._taking),
                "snapshots_held": len(self.store.entries())}  # fmt: skip

    # ---------------------------------------------------------------- the copy thread

    def _finish(self, taking: _Taking) -> None:
        error = ""
        try:
            rate = self.cg.interceptor.config.snapshot_copy_rate or None
            for _vol, pit in taking.copies.values():
                if not pit.run(taking.stop, rate):
                    return  # cancelled: ``cancel`` cleans up
            self._drop(taking.copies)
            if not self._emitted(taking):
                raise SnapshotError(
                    "the emitter did not confirm the Snapshot record, so no backup takes this "
                    "snapshot; its copy here is dropped"
                )
            digests = {vid: file_digest(pit.target) for vid, (_v, pit) in taking.copies.items()}
            iid = self.cg.interceptor.config.interceptor_id
            snap = self.store.commit(
                taking.name, taking.ts, cg=self.cg.name, taken_at="primary", site=iid,
                created_us=self.cg.interceptor.time_source.wall_us(), catalog=taking.catalog,
                digests=digests,
            )  # fmt: skip
            took = time.monotonic() - taking.started
            self.stats["snapshots_sealed"] += 1
            self.stats["snapshot_copy_bytes"] += snap.size
            self.stats["snapshot_last_copy_s"] = round(took, 6)
            event(log, "snapshot copied", snapshot=taking.name, ts=format_ts(taking.ts),
                  interceptor=iid, volumes=len(taking.copies), bytes=snap.size,
                  copy_ms=round(took * 1000, 3))  # fmt: skip
        except Exception as exc:  # a full disk, say: the backups still take theirs
            error = f"{type(exc).__name__}: {exc}"
            self.stats["snapshots_failed"] += 1
            self._drop(taking.copies)
            self.store.abort(taking.name)
            event(log, "snapshot copy failed here; the backups take theirs from the log. "
                  "Free space under the data dir for the next one", logging.ERROR,
                  snapshot=taking.name, error=error)  # fmt: skip
        with self._lock:
            self._taking.pop(taking.marker_id, None)
        if self.on_copied is not None:
            self.on_copied(taking.marker_id, taking.name, taking.ts, tuple(taking.copies), error)

    def _emitted(self, taking: _Taking) -> bool:
        """Wait (the copy is done) for the emitter's word on the Snapshot record."""
        while not taking.decided.wait(0.1):
            if taking.stop.is_set() or time.monotonic() - taking.started > EMIT_WAIT_S:
                return False
        return taking.emitted

    @staticmethod
    def _drop(copies: dict[str, tuple[Volume, PitCopy]]) -> None:
        for vol, pit in copies.values():
            with vol._lock:
                if vol.pit is pit:
                    vol.pit = None
            if not pit.done:
                pit.abort()

    @staticmethod
    def _entry(vol: Volume) -> dict[str, Any]:
        info = vol.info
        return {"volume_id": info.volume_id, "name": info.name, "size": vol.size,
                "metadata": dict(info.metadata or {}), "mode": info.mode}  # fmt: skip


__all__ = ["PrimarySnapshots"]
