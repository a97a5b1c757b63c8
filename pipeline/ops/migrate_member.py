"""One interceptor's half of a volume migration: what ``lowmark serve`` does when asked.

``lowmark migrate`` (``pipeline.ops.migrate``) drives both sides over their admin sockets;
each request here is one idempotent step, so a coordinator killed anywhere can run again:

source                                  target
  hold     access ``change``: the          prepare   stage an empty image (inaccessible),
           volume's gate closed, writes               copy the source's, follow the log
           drained and durable, the                   (``pipeline.ops.migrate_sync``)
           final ts taken; a *lease*:      catch_up  wait until the log is read to its
           not renewed, it lapses and                 end (the source holds the volume)
           the volume is served again      activate  the commit point of the target:
  release  the commit point of the                    ``optimized`` here, clock above the
           source: ``inaccessible``,                  final ts, the entry in lowmark.config
           parked, clients disconnected    unstage   drop the stage (an abort)
  reclaim  an abort: served again
  forget   the migration is complete: the source's copy goes

State answers (``state``) say where the volume stands here: ``served`` (optimized),
``held`` (change), ``released``, ``staged`` (with the sync's phase), ``absent``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.kafka.admin import Admin
from connectors.kafka.reading import end_offsets
from pipeline.errors import MigrationError
from pipeline.logs import event
from pipeline.ops.migrate_sync import TargetSync
from pipeline.primary.volume import ConsistencyGroup, Mode, Volume, VolumeInfo, check_volume_name

__all__ = ["MigrationMember"]

log = logging.getLogger("lowmark.migrate")


@dataclass
class _Hold:
    migration: str
    peer: str
    final_ts: int
    since: float
    deadline: float


class MigrationMember:
    def __init__(self, cg: ConsistencyGroup) -> None:
        self.cg = cg
        self._engine = cg.interceptor
        self._now = cg.interceptor.time_source.monotonic
        self._holds: dict[str, _Hold] = {}
        self._syncs: dict[str, TargetSync] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.last_activation_ms: dict[str, float] = {}
        self._admin: Admin | None = None
        self._parts: list[int] = []
        self.stats = {"migrations_out": 0, "migrations_in": 0, "migration_holds": 0,
                      "migration_holds_lapsed": 0, "migration_last_hold_s": 0.0}  # fmt: skip
        self._lease = threading.Thread(target=self._lapse_loop, name="lowmark-migrate-lease",
                                       daemon=True)  # fmt: skip
        self._lease.start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            syncs, self._syncs = list(self._syncs.values()), {}
            holds, self._holds = dict(self._holds), {}
        for s in syncs:
            s.stop()
        for name in holds:  # a hold is a lease: it ends with the process anyway
            vol = self.cg.volumes.get(name)
            if vol is not None and vol.access == "change":
                vol.access = "optimized"
                vol.gate.release()

    # ---------------------------------------------------------------- state

    def state(self, name: str) -> dict[str, Any]:
        cg = self.cg
        iid = self._engine.config.interceptor_id
        out: dict[str, Any] = {"volume": name, "interceptor": iid}
        vol = cg.volumes.get(name)
        if vol is not None:
            hold = self._holds.get(name)
            out["state"] = "held" if vol.access == "change" else "served"
            out["access"] = vol.access
            out["info"] = _info_json(vol.info)
            out["image"] = str(vol.image.path)
            if hold is not None:
                out.update(migration=hold.migration, peer=hold.peer, final_ts=hold.final_ts)
            return out
        parked = cg.parking.parked.get(name)
        if parked is None or parked.role == "moved":
            return {**out, "state": "absent", "access": None}
        out.update(access="inaccessible", info=_info_json(parked.info), peer=parked.peer,
                   migration=parked.migration, final_ts=parked.final_ts,
                   image=str(cg.site.image_path(parked.info.volume_id)))  # fmt: skip
        if parked.role == "source":
            return {**out, "state": "released"}
        sync = self._syncs.get(name)
        phase = "stopped" if sync is None else sync.state.phase
        return {**out, "state": "staged", "sync": {**(sync.state.as_json() if sync else {}),
                                                   "phase": phase}}  # fmt: skip

    # ---------------------------------------------------------------- source

    def hold(self, name: str, peer: str, migration: str, lease_s: float) -> dict[str, Any]:
        """Quiesce the volume (writes parked, reads go on) and drain it to Kafka."""
        vol = self.cg.volume(name)
        timeout_s = self._engine.config.replication_timeout_s
        with self._lock:
            hold = self._holds.get(name)
            if hold is not None and hold.migration != migration:
                raise MigrationError(f"volume {name} is held for migration {hold.migration} "
                                     f"to {hold.peer}: finish or abort that one first")  # fmt: skip
            if hold is None:
                if vol.pit is not None:
                    raise MigrationError(f"volume {name} is being copied for a snapshot: "
                                         "migrate it once the copy is done")  # fmt: skip
                vol.access = "change"
                since = self._now()
                if not vol.gate.hold(timeout_s):
                    vol.access = "optimized"
                    raise MigrationError(f"writes to volume {name} did not drain within "
                                         f"{timeout_s:.0f} s; try again")  # fmt: skip
                hold = _Hold(migration, peer, 0, since, since + lease_s)
                self._holds[name] = hold
                self.stats["migration_holds"] += 1
            hold.deadline = self._now() + lease_s
        drained = self._now()
        try:
            vol.image.sync()
            synced = self._now()
            self._engine.barrier().wait(timeout_s)  # every record of it is in Kafka
        except BaseException:
            self._end_hold(name, vol)
            raise
        if not hold.final_ts:
            hold.final_ts = self._engine.clock.now()  # above every ts it ever gave the volume
        ms = {"drain": (drained - hold.since) * 1e3, "sync": (synced - drained) * 1e3,
              "kafka": (self._now() - synced) * 1e3}  # fmt: skip
        event(log, "migration: volume held", volume=name, to=peer, migration=migration,
              final_ts=hold.final_ts, ms={k: round(v, 1) for k, v in ms.items()})  # fmt: skip
        return {"final_ts": hold.final_ts, "held_s": self._now() - hold.since,
                "ms": ms}  # fmt: skip

    def release(self, name: str, peer: str, migration: str) -> dict[str, Any]:
        parked = self.cg.parking.parked.get(name)
        if parked is not None and parked.role == "source" and parked.migration == migration:
            return {"final_ts": parked.final_ts}  # done before
        with self._lock:
            hold = self._holds.get(name)
            if hold is None or hold.migration != migration:
                raise MigrationError(f"volume {name} is not held for migration {migration} "
                                     "(its lease lapsed?): hold it again")  # fmt: skip
            vol = self.cg.volume(name)
            self.cg.parking.release(vol, peer, migration, hold.final_ts)
            del self._holds[name]
        held = vol.gate.release()  # parked writes wake, find it inaccessible: ESHUTDOWN
        self.stats["migrations_out"] += 1
        self.stats["migration_last_hold_s"] = held
        event(log, "migration: volume released", volume=name, to=peer, migration=migration,
              held_s=round(held, 3))  # fmt: skip
        return {"final_ts": hold.final_ts, "held_s": held}

    def reclaim(self, name: str) -> Volume | None:
        """Abort at the source: a hold ends, a released volume is served again."""
        with self._lock:
            vol = self.cg.volumes.get(name)
            if vol is not None:
                if name in self._holds:
                    self._end_hold(name, vol)
                return None
        vol = self.cg.parking.reclaim(name)
        event(log, "migration: volume reclaimed", volume=name)
        return vol

    def forget(self, name: str, migration: str) -> None:
        parked = self.cg.parking.parked.get(name)
        if parked is None or parked.role != "source":
            return  # done before
        if parked.migration != migration:
            raise MigrationError(f"volume {name} was released by migration "
                                 f"{parked.migration}, not {migration}")  # fmt: skip
        self.cg.parking.forget(name)
        event(log, "migration: source copy removed", volume=name, migration=migration)

    def _end_hold(self, name: str, vol: Volume) -> None:
        self._holds.pop(name, None)
        if vol.access == "change":
            vol.access = "optimized"
        vol.gate.release()

    def _lapse_loop(self) -> None:
        while not self._closed.wait(0.1):
            with self._lock:
                for name, hold in list(self._holds.items()):
                    if self._now() < hold.deadline:
                        continue
                    vol = self.cg.volumes.get(name)
                    if vol is not None:
                        self._end_hold(name, vol)
                    self._holds.pop(name, None)
                    self.stats["migration_holds_lapsed"] += 1
                    event(log, "migration hold lapsed: the volume is served here again",
                          level=logging.WARNING, volume=name, migration=hold.migration)  # fmt: skip

    # ---------------------------------------------------------------- target

    def prepare(self, info: Mapping[str, Any], source_image: str, peer: str,
                migration: str) -> dict[str, Any]:  # fmt: skip
        name = check_volume_name(str(info["name"]))
        vol = self.cg.volumes.get(name)
        if vol is not None:
            raise MigrationError(f"volume {name} is already served here: nothing to prepare")
        mode: Mode = "sync" if info.get("mode") == "sync" else "async"
        vinfo = VolumeInfo(name, name, int(info["size"]), mode, dict(info.get("metadata") or {}))
        if mode == "sync":
            self.cg._check_sync_durable(name)
        with self._lock:
            old = self._syncs.pop(name, None)
        if old is not None:
            old.stop()
        if self.cg.entries is not None:
            self.cg.entries.writer.warm()  # not inside the cutover's pause
        img = self.cg.parking.stage(vinfo, peer, migration)
        sync = TargetSync(img, vinfo.volume_id, Path(source_image), self._engine.kafka_conf,
                          self._engine.topics.log, migration)  # fmt: skip
        with self._lock:
            self._syncs[name] = sync
        sync.start()
        self._log_ends()  # warms the admin client: the cutover's catch-up asks it again
        event(log, "migration: volume staged", volume=name, source=peer, migration=migration)
        return {"sync": sync.state.as_json()}

    def catch_up(self, name: str, migration: str, timeout_s: float,
                 held: bool = True) -> dict[str, Any]:  # fmt: skip
        """Wait until the stage's follower read the log to its end (high watermarks now).
        ``held``: the source holds the volume, so that end is final (the activation may
        rely on it); otherwise this only shortens the cutover's own catch-up."""
        sync = self._sync(name, migration)
        end = self._log_ends()
        deadline = time.monotonic() + timeout_s
        while True:
            st = sync.state
            if st.phase == "failed":
                raise MigrationError(f"the sync of volume {name} failed: {st.error}")
            if st.phase == "following" and all(st.positions.get(p, -1) >= o
                                               for p, o in end.items()):  # fmt: skip
                if held:
                    sync.caught_up_to = end  # the source holds: nothing more of it comes
                return {"sync": st.as_json()}
            if time.monotonic() > deadline:
                raise MigrationError(f"volume {name}'s sync is not at the log's end after "
                                     f"{timeout_s:.0f} s ({st.phase}); re-run later")  # fmt: skip
            time.sleep(0.005)

    def activate(self, name: str, migration: str, final_ts: int, source: str,
                 timeout_s: float) -> Volume | None:  # fmt: skip
        """The target's commit point; None when it was done before."""
        if name in self.cg.volumes and name not in self.cg.parking.parked:
            return None
        sync = self._sync(name, migration)
        t0 = self._now()
        # caught up under this hold: the source wrote nothing since (it released after)
        sync.finish(sync.caught_up_to or self._log_ends(), timeout_s)
        t1 = self._now()
        iid = self._engine.config.interceptor_id
        vol = self.cg.parking.adopt(name, final_ts, {source: "inaccessible", iid: "optimized"})
        self.last_activation_ms = {"finish": (t1 - t0) * 1e3, "adopt": (self._now() - t1) * 1e3}
        with self._lock:
            self._syncs.pop(name, None)
        self.stats["migrations_in"] += 1
        event(log, "migration: volume active here", volume=name, source=source,
              migration=migration, records_applied=sync.state.records_applied)  # fmt: skip
        return vol

    def unstage(self, name: str) -> None:
        if name in self.cg.volumes:
            raise MigrationError(
                f"volume {name} is already active at interceptor "
                f"{self._engine.config.interceptor_id}: the migration completed; to undo it, "
                "migrate the volume back"
            )
        with self._lock:
            sync = self._syncs.pop(name, None)
        if sync is not None:
            sync.stop()
        self.cg.parking.unstage(name)
        event(log, "migration: stage dropped", volume=name)

    def _sync(self, name: str, migration: str) -> TargetSync:
        sync = self._syncs.get(name)
        if sync is None or sync.migration != migration:
            raise MigrationError(f"volume {name} has no sync of migration {migration} running "
                                 "here (the target restarted?): prepare it again")  # fmt: skip
        return sync

    def _log_ends(self) -> dict[int, int]:
        """High watermarks (not the last stable offset: a record the source committed can
        lie above another producer's open transaction, and must still be read)."""
        conf, topic = self._engine.kafka_conf, self._engine.topics.log
        if self._admin is None:
            self._admin = Admin(conf)  # a new client's first request costs ~100 ms
            self._parts = sorted(end_offsets(conf, topic, 30))
        return self._admin.end_offsets(topic, self._parts, 30)

    def numbers(self) -> dict[str, Any]:
        return {**self.stats, "volumes_parked": len(self.cg.parking.parked),
                "migrations_syncing": len(self._syncs)}  # fmt: skip


def _info_json(info: VolumeInfo) -> dict[str, Any]:
    return {"name": info.name, "volume_id": info.volume_id, "size": info.size,
            "mode": info.mode, "metadata": dict(info.metadata or {})}  # fmt: skip
