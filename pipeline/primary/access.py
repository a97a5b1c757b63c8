"""The volumes parked at this interceptor: released to another one, or staged from one.

A migration (issue #18, ``pipeline.ops.migrate``) moves a volume between the interceptors
of a CG. What one interceptor keeps of a moving volume lives in its catalog
(``volumes.json``, an entry with ``access: inaccessible`` and a ``migration`` object), so
a restart comes back exactly where it stopped:

- *released* (``role: source``): the volume moved to ``peer``. It is not served (every
  NBD request gets ESHUTDOWN, a new client is refused at NBD_OPT_GO), never republished,
  not named in PROGRESS. Its image is kept until the migration is complete (``forget``),
  so an abort can take it back (``reclaim``).
- *staged* (``role: target``): being synchronized from ``peer``, exposed inaccessible,
  until ``adopt`` makes it this interceptor's (``optimized``), or ``unstage`` drops it.
- *moved* (``role: moved``): the migration is complete and the source's copy is gone; a
  tombstone without an image, so a restart does not create the volume again from
  ``[[serve.volumes]]`` (a CREATE in the log would empty it at every backup) and a client
  is told where it went. A migration back replaces it.

The single-writer rule, NVMe ANA's: a source releases (durably) before a target adopts,
and a source reclaims only after the target said its stage is gone. The coordinator
(``pipeline.ops.migrate``) keeps that order; this module keeps each side's half durable.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from connectors.image.image import Image
from pipeline.errors import MigrationError
from pipeline.fsutil import fsync_path

if TYPE_CHECKING:
    from pipeline.primary.volume import ConsistencyGroup, Volume, VolumeInfo

__all__ = ["ROLES", "Parked", "Parking"]

ROLES = ("source", "target", "moved")


@dataclass(frozen=True)
class Parked:
    """A volume here that this interceptor does not serve (see the module doc)."""

    info: VolumeInfo
    role: str
    peer: str
    migration: str
    #: source: the ts above every record it wrote for the volume (the target's clock floor)
    final_ts: int = 0

    def catalog_entry(self) -> dict[str, Any]:
        meta = {"role": self.role, "peer": self.peer, "id": self.migration,
                "final_ts": self.final_ts}  # fmt: skip
        return {**self.info.__dict__, "access": "inaccessible", "migration": meta}

    @staticmethod
    def from_entry(info: VolumeInfo, e: dict[str, Any]) -> Parked | None:
        m = e.get("migration")
        if m is None:
            return None
        ok = (
            isinstance(m, dict)
            and m.get("role") in ROLES
            and isinstance(m.get("peer"), str)
            and isinstance(m.get("id"), str)
            and type(m.get("final_ts")) is int
        )
        if not ok:
            raise MigrationError(
                f"volume {info.name}'s catalog entry has a damaged migration record {m!r}: "
                "re-run `lowmark migrate` for it, or restore the catalog from a snapshot"
            )
        return Parked(info, m["role"], m["peer"], m["id"], m["final_ts"])


class Parking:
    """The parked volumes of one ``ConsistencyGroup`` and the moves in and out of it."""

    def __init__(self, cg: ConsistencyGroup) -> None:
        self.cg = cg
        self.parked: dict[str, Parked] = {}
        #: released in this process: the Volume object, so a reclaim keeps its region log
        self._released: dict[str, Volume] = {}
        self._lock = threading.Lock()

    def get(self, name: str, role: str) -> Parked:
        p = self.parked.get(name)
        if p is None or p.role != role:
            what = "released to another interceptor" if role == "source" else "staged"
            raise MigrationError(f"volume {name} is not {what} at interceptor "
                                 f"{self.cg.interceptor.config.interceptor_id}")  # fmt: skip
        return p

    # ---------------------------------------------------------------- source

    def release(self, vol: Volume, peer: str, migration: str, final_ts: int) -> None:
        """The commit point of a source: from here the volume is ``peer``'s to adopt.
        Called with the volume's gate held (nothing of it in flight, all of it durable)."""
        cg = self.cg
        with self._lock, cg._lock:
            vol.access = "inaccessible"  # first: refuse before the catalog says so
            cg.volumes.pop(vol.name, None)
            self.parked[vol.name] = Parked(vol.info, "source", peer, migration, final_ts)
            try:
                cg._save_catalog()
            except BaseException:
                del self.parked[vol.name]
                cg.volumes[vol.name] = vol
                vol.access = "change"
                raise
            self._released[vol.name] = vol
            cg._name_tail_volumes()

    def reclaim(self, name: str) -> Volume:
        """Abort at the source: the volume is served here again (only once the target
        confirmed its stage is gone: ``pipeline.ops.migrate``)."""
        from pipeline.primary.volume import Volume

        cg = self.cg
        with self._lock, cg._lock:
            p = self.get(name, "source")
            vol = self._released.pop(name, None)
            if vol is None:
                vol = Volume(cg, p.info, Image(cg.site.image_path(p.info.volume_id)))
            vol.access = "optimized"
            cg.volumes[name] = vol
            del self.parked[name]
            cg._save_catalog()
            cg._name_tail_volumes()
        if vol.mode == "sync":
            cg.interceptor.cuts.start()
        if cg.entries is not None:
            cg.entries.changed(vol.info, cg.interceptor.clock.now())
        return vol

    def forget(self, name: str) -> None:
        """The migration is complete: the source's copy goes, a tombstone stays."""
        cg = self.cg
        with self._lock, cg._lock:
            p = self.get(name, "source")
            self.parked[name] = replace(p, role="moved")
            cg._save_catalog()
            vol = self._released.pop(name, None)
        if vol is not None:
            vol.image.close()
        self._remove_files(p.info.volume_id)

    def close(self) -> None:
        for vol in self._released.values():
            vol.image.close()
        self._released.clear()

    # ---------------------------------------------------------------- target

    def stage(self, info: VolumeInfo, peer: str, migration: str) -> Image:
        """A fresh, empty image for ``info`` (an older stage of it is dropped), parked as
        a target; the caller synchronizes it."""
        cg = self.cg
        with self._lock, cg._lock:
            if info.name in cg.volumes:
                raise MigrationError(
                    f"volume {info.name} is already served by interceptor "
                    f"{cg.interceptor.config.interceptor_id}: nothing to migrate here"
                )
            if info.name in self.parked and self.parked[info.name].role == "source":
                raise MigrationError(
                    f"volume {info.name} was released here to {self.parked[info.name].peer} "
                    "and that migration is not complete: finish it (re-run `lowmark "
                    "migrate` for it) before moving the volume back"
                )
            self._remove_files(info.volume_id)
            path = cg.site.image_path(info.volume_id)
            img = Image(path, create_size=info.size)
            img.sync()
            fsync_path(path.parent)
            self.parked[info.name] = Parked(info, "target", peer, migration)
            cg._save_catalog()
        return img

    def adopt(self, name: str, final_ts: int, access: dict[str, str]) -> Volume:
        """The commit point of a target: the volume is served here, ``optimized``, its
        clock above every ts the source gave it. The caller closed and synced the stage."""
        from pipeline.primary.volume import Volume

        cg = self.cg
        engine = cg.interceptor
        engine.clock.observe(final_ts)
        with self._lock, cg._lock:
            p = self.get(name, "target")
            info = replace(p.info)
            vol = Volume(cg, info, Image(cg.site.image_path(info.volume_id)))
            cg.volumes[name] = vol
            del self.parked[name]
            try:
                cg._save_catalog()
            except BaseException:
                cg.volumes.pop(name, None)
                self.parked[name] = p
                vol.image.close()
                raise
            cg._name_tail_volumes()
        if vol.mode == "sync":
            engine.cuts.start()
        if cg.entries is not None:
            cg.entries.changed(vol.info, engine.clock.now(), access=access)
        return vol

    def unstage(self, name: str) -> None:
        cg = self.cg
        with self._lock, cg._lock:
            p = self.parked.get(name)
            if p is None:
                return
            if p.role != "target":
                raise MigrationError(f"volume {name} is parked here as a {p.role}, not staged")
            del self.parked[name]
            cg._save_catalog()
        self._remove_files(p.info.volume_id)

    def _remove_files(self, volume_id: str) -> None:
        site = self.cg.site
        for path in (site.image_path(volume_id), site.region_log_path(volume_id),
                     site.activity_log_path(volume_id)):  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
