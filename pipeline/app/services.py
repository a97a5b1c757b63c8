"""The three long-lived services, as the CLI and the systemd units run them.

- ``serve``: a primary's interceptor plus its NBD server (one export per volume);
- ``watermark``: the CG's watermark service;
- ``apply``: one backup site's applier.

Each logs structured lines, exposes ``/metrics`` when configured, stops cleanly on
SIGINT/SIGTERM (a primary flushes and publishes its final progress before it exits), and
turns operating errors into a one-line message that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from connectors.kafka.config import cluster_tried
from connectors.nbd.server import Export, NbdServer
from pipeline.app.admin import AdminServer, default_admin_socket
from pipeline.app.config import LowmarkConfig, parse_size
from pipeline.app.metrics import serve_metrics
from pipeline.app.progress import ProgressBar
from pipeline.app.runtime import nbd_config, primary_metrics, stop_on_signals
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.backup.bootstrap import BootstrapResult, bootstrap_site, needs_bootstrap
from pipeline.errors import (
    ApplierHaltedError,
    FencedError,
    LowmarkError,
    RetentionLostError,
    WatermarkHaltedError,
)
from pipeline.fault_streak import FaultStreak
from pipeline.logs import event
from pipeline.ops.marker_schedule import MarkerSchedule, ScheduleConfig
from pipeline.ops.migrate_member import MigrationMember
from pipeline.primary.nbd_volume import VolumeExport, parked_export
from pipeline.primary.volume import ConsistencyGroup, Volume
from pipeline.timesource import REAL_TIME, TimeSource, wall_us
from pipeline.topology.catalog import TopologyWriter, lowmark_version, this_host
from pipeline.topology.roles import Serving, serving_generation
from pipeline.topology.store import RolesStore
from pipeline.watermark.generations import GenerationalWatermark
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas.records import SiteEntry

log = logging.getLogger("lowmark.services")

#: the longest a service waits before it tries a step again after a retriable error
_MAX_BACKOFF_S = 5.0
#: a running service logs its metrics this often
_STATUS_EVERY_S = 10.0
#: how long the clients of a volume migrated away may take to leave by themselves
_LEAVE_GRACE_S = 2.0


# ---------------------------------------------------------------- serve


def primary_serving(cfg: LowmarkConfig) -> Serving:
    """The generation (and clock floor) this primary runs, from the CG's roles; a
    ``RolesError`` saying what to do when serve.site is not the CG's primary."""
    roles = RolesStore(cfg.kafka_conf()).latest(cfg.cg.name)
    return serving_generation(roles, cfg.cg.name, cfg.serve.site)


def open_primary(
    cfg: LowmarkConfig, time_source: TimeSource = REAL_TIME, serving: Serving | None = None
) -> ConsistencyGroup:
    """The CG's primary per the config, in the generation the roles give it (``serving``,
    default: ``primary_serving(cfg)``, which refuses a site that is not the primary)."""
    s = cfg.serve
    serving = primary_serving(cfg) if serving is None else serving
    cg = ConsistencyGroup.open(
        cfg.cg.name,
        Path(s.data_dir),
        cfg.kafka_conf(),
        interceptor_id=s.interceptor_id,
        time_source=time_source,
        tick_interval_s=s.tick_interval_ms / 1000,
        max_clock_skew_us=s.max_clock_skew_us,
        max_unreplicated_bytes=parse_size(s.max_unreplicated_bytes, "max_unreplicated_bytes"),
        replication_timeout_s=s.replication_timeout_s,
        log_partitions=cfg.cg.log_partitions,
        replication_factor=cfg.replication_factor,
        generation=serving.generation,
        clock_floor_us=serving.clock_floor,
        generation_check_s=s.generation_check_s,
        region_bytes=parse_size(s.region_bytes, "region_bytes"),
        region_extent_bytes=parse_size(s.region_extent_bytes, "region_extent_bytes"),
        snapshot_copy_rate=parse_size(s.snapshot_copy_rate, "snapshot_copy_rate"),
        allow_single_copy_sync=s.allow_single_copy_sync,
    )
    for spec in s.volumes:
        parked = cg.parking.parked.get(spec.name)
        if parked is not None:  # migrated away (or on its way): never created again here
            event(log, "configured volume is parked here, not served", level=logging.WARNING,
                  volume=spec.name, role=parked.role, peer=parked.peer,
                  hint="remove it from [[serve.volumes]] once it lives elsewhere")  # fmt: skip
        elif spec.name not in cg.volumes:
            cg.create_volume(spec.name, spec.size, mode=spec.mode)  # type: ignore[arg-type]
    return cg


def run_serve(
    cfg: LowmarkConfig,
    ready: threading.Event | None = None,
    time_source: TimeSource = REAL_TIME,
) -> None:
    cg = open_primary(cfg, time_source)  # refuses a site that is not the CG's primary
    if cfg.serve.site:
        register_site(cfg, "primary", cfg.serve.site, cfg.serve.data_dir, cfg.serve.metrics)
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        asyncio.run(_serve_async(cfg, cg, stop, ready))
    finally:
        cg.close()  # publishes every stamped write and a final LEAVE progress
    if isinstance(cg.interceptor.failure, FencedError):
        # not the primary any more (a failover, or another instance took over): say so
        # and exit non-zero, so nobody takes this stop for a clean one
        raise cg.interceptor.failure


async def _serve_async(
    cfg: LowmarkConfig, cg: ConsistencyGroup, stop: threading.Event, ready: threading.Event | None
) -> None:
    exports: dict[str, Export] = {name: VolumeExport(vol) for name, vol in cg.volumes.items()}
    server = NbdServer(exports, nbd_config(cfg))
    served = ServedExports(server, cg)
    for name in cg.parking.parked:
        served.park(name)
    await server.start()

    def export_new(vol: Volume) -> None:
        if vol.name not in server.exports:
            server.add_export(vol.name, VolumeExport(vol))

    migrations = MigrationMember(cg)
    admin = None
    if cfg.serve.admin_socket:
        path = admin_socket_path(cfg)
        admin = AdminServer(cg, path, export_new, served, migrations)
        await admin.start()
    if cfg.serve.metrics:
        serve_metrics(
            cfg.serve.metrics,
            "primary",
            lambda: {**primary_metrics(cg, server), **migrations.numbers()},
            {"cg": cfg.cg.name, "interceptor": cfg.serve.interceptor_id},
        )
    event(
        log,
        "serving",
        cg=cfg.cg.name,
        generation=cg.interceptor.config.generation,
        site=cfg.serve.site,
        exports=sorted(server.exports),
        listen=cfg.serve.listen,
        unix_socket=cfg.serve.unix_socket,
    )
    if ready is not None:
        ready.set()
    try:
        while not stop.is_set() and cg.interceptor.failure is None:
            await asyncio.sleep(0.1)
        if cg.interceptor.failure is not None:
            event(
                log,
                "replication failed; stopping the NBD server",
                level=logging.ERROR,
                error=str(cg.interceptor.failure),
            )
        if admin is not None:
            await admin.close()
        await server.close()
    finally:
        await asyncio.to_thread(migrations.close)


class ServedExports:
    """The NBD server's side of a migration step (``pipeline.app.admin.Exports``)."""

    def __init__(self, server: NbdServer, cg: ConsistencyGroup) -> None:
        self.server, self.cg = server, cg
        self._tasks: set[asyncio.Future[int]] = set()

    def serve(self, vol: Volume) -> None:
        self.server.add_export(vol.name, VolumeExport(vol))

    def park(self, name: str) -> None:
        p = self.cg.parking.parked.get(name)
        if p is not None:
            iid = self.cg.interceptor.config.interceptor_id
            self.server.add_export(name, parked_export(name, p.info.size, iid, p.role, p.peer))

    def drop(self, name: str) -> None:
        self.server.exports.pop(name, None)

    async def disconnect(self, name: str) -> int:
        """The volume's clients, told ESHUTDOWN, are given a moment to leave, then closed:
        in the background, so the release (inside the cutover's pause) does not wait."""
        export = self.server.exports.get(name)
        if export is None:
            return 0
        n = self.server.connections_of(export)
        task = asyncio.ensure_future(self.server.disconnect(export, grace_s=_LEAVE_GRACE_S))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return n


def admin_socket_path(cfg: LowmarkConfig) -> Path:
    s = cfg.serve.admin_socket
    return default_admin_socket(cfg.serve.data_dir) if s == "auto" else Path(s)


# ---------------------------------------------------------------- watermark


def make_watermark_service(
    cfg: LowmarkConfig,
    skip_progress: frozenset[int] = frozenset(),
    time_source: TimeSource = REAL_TIME,
    generation: int = 0,
) -> WatermarkService:
    return WatermarkService(
        WatermarkServiceConfig(
            cg=cfg.cg.name,
            liveness_timeout_s=cfg.watermark.liveness_timeout_s,
            log_partitions=cfg.cg.log_partitions,
            replication_factor=cfg.replication_factor,
            skip_progress=skip_progress,
            generation=generation,
        ),
        cfg.kafka_conf(),
        time_source,
    )


def make_generational_watermark(
    cfg: LowmarkConfig,
    skip_progress: frozenset[int] = frozenset(),
    time_source: TimeSource = REAL_TIME,
) -> GenerationalWatermark:
    """The watermark service of the generation the roles name, moving on with them.

    ``skip_progress`` names offsets of the progress topic of the generation it starts in;
    a later generation's topic is another log, so they are not skipped there.
    """
    store = RolesStore(cfg.kafka_conf(), timeout_s=5.0)
    first: list[int] = []

    def make(generation: int) -> WatermarkService:
        first.append(generation)
        skip = skip_progress if first[0] == generation else frozenset()
        return make_watermark_service(cfg, skip, time_source, generation)

    return GenerationalWatermark(cfg.cg.name, make, lambda: store.latest(cfg.cg.name), time_source)


def run_watermark(
    cfg: LowmarkConfig,
    skip_progress: frozenset[int] = frozenset(),
    time_source: TimeSource = REAL_TIME,
    stop: threading.Event | None = None,
) -> None:
    """Run the watermark service of the roles' generation until SIGINT/SIGTERM (or
    ``stop``); it moves to a newer generation once the roles name one."""
    svc = make_generational_watermark(cfg, skip_progress, time_source)
    schedule = None
    if cfg.markers.interval_s > 0:  # markers on a schedule, by the active instance only
        m = cfg.markers
        schedule = MarkerSchedule(
            ScheduleConfig(m.interval_s, m.name, m.pre_hook, m.post_hook, m.timeout_s),
            cfg.kafka_conf(), cfg.cg.name, lambda: svc.metrics().get("active") == 1,
            lambda: max(svc.generation, 0), time_source.wall_us,
        )  # fmt: skip
        schedule.start()
    try:
        _run_loop(svc, cfg.watermark.metrics, "watermark", {"cg": cfg.cg.name}, time_source,
                  stop, extra=schedule.stats if schedule else None,
                  tried=kafka_tried(cfg))  # fmt: skip
    finally:
        if schedule is not None:
            schedule.close()


# ---------------------------------------------------------------- apply


def make_applier(
    cfg: LowmarkConfig,
    skip: frozenset[tuple[int, int]] = frozenset(),
    time_source: TimeSource = REAL_TIME,
) -> Applier:
    a = cfg.apply
    return Applier(
        ApplierConfig(
            cg=cfg.cg.name,
            site=a.site,
            data_dir=Path(a.data_dir),
            checkpoint_interval_s=a.checkpoint_interval_s,
            max_pending_bytes=parse_size(a.max_pending_bytes, "max_pending_bytes"),
            snapshot_interval_s=a.snapshot_interval_s,
            snapshots_kept=a.snapshots_kept,
            digest_interval_s=a.digest_interval_s or None,
            named_keep_last=cfg.snapshots.keep_last,
            named_max_age_s=cfg.snapshots.max_age_s,
            log_partitions=cfg.cg.log_partitions,
            replication_factor=cfg.replication_factor,
            skip=skip,
        ),
        cfg.kafka_conf(),
        time_source,
    )


def run_apply(
    cfg: LowmarkConfig,
    skip: frozenset[tuple[int, int]] = frozenset(),
    time_source: TimeSource = REAL_TIME,
    bootstrap_from: Path | None = None,
) -> None:
    if bootstrap_from is not None:
        prepare_from_peer(cfg, bootstrap_from)
    register_site(cfg, "backup", cfg.apply.site, cfg.apply.data_dir, cfg.apply.metrics)
    svc = make_applier(cfg, skip, time_source)
    labels = {"cg": cfg.cg.name, "site": cfg.apply.site}
    stop = threading.Event()
    stop_on_signals(stop)
    # a site that became the CG's primary stops applying: a clean exit (status 0), so a
    # supervisor does not restart it into the same answer
    svc.on_finish = stop.set
    _run_loop(svc, cfg.apply.metrics, "applier", labels, time_source, stop,
              tried=kafka_tried(cfg))  # fmt: skip
    if svc.finished is not None:
        event(log, "applier finished", cg=cfg.cg.name, site=cfg.apply.site, why=svc.finished)


def register_site(cfg: LowmarkConfig, kind: str, site: str, data_dir: str, metrics: str) -> None:
    """This site's ``SiteEntry`` in ``lowmark.config`` (best effort: a failure is logged,
    the next start registers again)."""
    writer = TopologyWriter(cfg.kafka_conf(), cfg.replication_factor)
    writer.register_site(SiteEntry(cfg.cg.name, site, kind, this_host(),
                                   str(Path(data_dir).resolve()), metrics, lowmark_version(),
                                   wall_us()))  # fmt: skip
    writer.close()


def kafka_tried(cfg: LowmarkConfig) -> str:
    """The cluster a service reaches, as an operator would check it (no secrets)."""
    return cluster_tried(cfg.kafka_conf())


def prepare_from_peer(cfg: LowmarkConfig, source: Path) -> BootstrapResult | None:
    """``--bootstrap-from``: rebuild the site from the peer's checkpoint copy when it
    needs one (new, emptied, interrupted, or past retention); else leave it as it is."""
    a = cfg.apply
    why = needs_bootstrap(Path(a.data_dir), cfg.cg.name, cfg.kafka_conf())
    if why is None:
        event(log, "bootstrap not needed: the site resumes from its own checkpoint",
              site=a.site, source=str(source))  # fmt: skip
        return None
    event(log, "bootstrapping the site from a peer", site=a.site, source=str(source), why=why)

    bars: dict[str, ProgressBar] = {}  # on a terminal: a bar per volume, beside the log lines

    def progress(volume: str, done: int, total: int) -> None:
        event(log, "bootstrap progress", volume=volume, done_bytes=done, total_bytes=total)
        if sys.stderr.isatty():
            for other in [v for v in bars if v != volume]:
                bars.pop(other).close()
            bar = bars.setdefault(volume, ProgressBar(f"bootstrap {volume}", quiet_s=0.0))
            bar.show(done, total)

    try:
        return bootstrap_site(Path(a.data_dir), cg=cfg.cg.name, site=a.site, source=source,
                              kafka_conf=cfg.kafka_conf(), progress=progress)  # fmt: skip
    finally:
        for bar in bars.values():
            bar.close()


def _retry_wait(name: str, exc: LowmarkError, backoff_s: float, stop: threading.Event,
                streak: FaultStreak, tried: str) -> float:  # fmt: skip
    """Note a retriable error (said as ``streak`` decides) and wait, doubling, bounded;
    the new backoff. ``tried``: what the service was reaching, for the operator."""
    if not exc.retriable:
        raise exc
    backoff_s = min(_MAX_BACKOFF_S, max(0.05, backoff_s * 2))
    said = streak.failed(str(exc))
    if said is not None:
        event(log, f"{name}: passing fault, retrying until it clears", level=logging.WARNING,
              tried=tried, retry_every_s=_MAX_BACKOFF_S, **said)  # fmt: skip
    stop.wait(backoff_s)
    return backoff_s


def _cleared(name: str, streak: FaultStreak) -> None:
    ended = streak.succeeded()
    if ended is not None:
        event(log, f"{name}: the fault cleared", **ended)


def _start_with_retries(svc: Any, name: str, stop: threading.Event, streak: FaultStreak,
                        tried: str) -> None:  # fmt: skip
    """A service started while the cluster elects (or restarts) waits for it."""
    backoff_s = 0.0
    while not stop.is_set():
        try:
            svc.start()
            _cleared(name, streak)
            return
        except LowmarkError as exc:
            # half-started: drop its clients; an applier must not checkpoint here
            with contextlib.suppress(Exception):
                if isinstance(svc, Applier):
                    svc.close(checkpoint=False)
                else:
                    svc.close()
            backoff_s = _retry_wait(name, exc, backoff_s, stop, streak, tried)


# What a service must not go past without the operator: it stays up, halted, so /metrics
# (``halted 1``, ``retention_lost 1``) and the alerts on them say so, instead of exiting
# into a supervisor that restarts it into the same answer or a target that is merely down.
_HALTS = (ApplierHaltedError, WatermarkHaltedError, RetentionLostError)
_HALTED_SAID_EVERY_S = 60.0


def _halted_numbers(exc: LowmarkError) -> dict[str, Any]:
    """What a service that halted before it started exports (it has no other numbers)."""
    return {"halted": 1, "retention_lost": int(isinstance(exc, RetentionLostError))}


def _stay_halted(name: str, exc: LowmarkError, stop: threading.Event) -> None:
    """Serve /metrics and say why, once a minute, until stopped (then exit 2 as before)."""
    while True:
        event(log, f"{name} halted: it stays up so /metrics and `lowmark status` show it "
              "until it is stopped; the error says what to do", logging.ERROR,
              error=str(exc))  # fmt: skip
        if stop.wait(_HALTED_SAID_EVERY_S):
            return


def _run_loop(
    svc: Any,
    metrics: str,
    name: str,
    labels: dict[str, str],
    time_source: TimeSource = REAL_TIME,
    stop: threading.Event | None = None,
    extra: dict[str, Any] | None = None,
    tried: str = "",
) -> None:
    """Start ``svc`` and step it until SIGINT/SIGTERM (or ``stop``, when given, is set).
    ``extra``: more numbers for its /metrics and status lines (read live); ``tried``:
    what it reaches (the Kafka cluster), named when a passing fault is said.

    Retry waits are ``stop.wait`` (a signal must end them); the status line every
    ``_STATUS_EVERY_S`` follows ``time_source.monotonic``.
    """
    if stop is None:
        stop = threading.Event()
        stop_on_signals(stop)
    now = time_source.monotonic
    streak = FaultStreak(now)
    try:
        _start_with_retries(svc, name, stop, streak, tried)
    except _HALTS as exc:  # a site retention left behind refuses to start: say so, up
        if not metrics:
            raise
        serve_metrics(metrics, name, functools.partial(_halted_numbers, exc), labels)
        _stay_halted(name, exc, stop)
        raise

    def numbers() -> dict[str, Any]:
        return {**svc.metrics(), **(extra or {})}

    if metrics:
        serve_metrics(metrics, name, numbers, labels)
    last_log = now()
    backoff_s = 0.0
    try:
        while not stop.is_set():
            try:
                svc.step()
                backoff_s = 0.0
                _cleared(name, streak)
            except _HALTS as exc:
                if not metrics:
                    raise
                _stay_halted(name, exc, stop)
                raise
            except LowmarkError as exc:
                # a routine fault (an election, a broker restart): ride it out
                backoff_s = _retry_wait(name, exc, backoff_s, stop, streak, tried)
            if now() - last_log >= _STATUS_EVERY_S:
                event(
                    log,
                    f"{name} status",
                    **{k: v for k, v in numbers().items() if not isinstance(v, dict)},
                )
                last_log = now()
    finally:
        with contextlib.suppress(Exception):
            svc.close()
