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
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from connectors.nbd.server import NbdServer, NbdServerConfig
from connectors.nbd.volume_export import VolumeExport
from pipeline.applier import Applier, ApplierConfig
from pipeline.config import LowmarkConfig, parse_hostport, parse_size
from pipeline.logs import event
from pipeline.metrics import serve_metrics
from pipeline.volume import ConsistencyGroup
from pipeline.watermark_service import WatermarkService, WatermarkServiceConfig

log = logging.getLogger("lowmark.services")


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        event(log, "stopping", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


# ---------------------------------------------------------------- serve


def open_primary(cfg: LowmarkConfig) -> ConsistencyGroup:
    s = cfg.serve
    cg = ConsistencyGroup.open(
        cfg.cg.name,
        Path(s.data_dir),
        cfg.kafka_conf(),
        interceptor_id=s.interceptor_id,
        tick_interval_s=s.tick_interval_ms / 1000,
        max_clock_skew_us=s.max_clock_skew_us,
        max_unreplicated_bytes=parse_size(s.max_unreplicated_bytes, "max_unreplicated_bytes"),
        replication_timeout_s=s.replication_timeout_s,
        log_partitions=cfg.cg.log_partitions,
        replication_factor=cfg.replication_factor,
    )
    for spec in s.volumes:
        if spec.name not in cg.volumes:
            cg.create_volume(spec.name, spec.size, mode=spec.mode)  # type: ignore[arg-type]
    return cg


def nbd_config(cfg: LowmarkConfig) -> NbdServerConfig:
    s = cfg.serve
    addr = parse_hostport(s.listen, "serve.listen")
    return NbdServerConfig(
        host=addr[0] if addr else None,
        port=addr[1] if addr else None,
        unix_path=s.unix_socket or None,
        tls_cert=s.tls_cert or None,
        tls_key=s.tls_key or None,
        tls_required=s.tls_required,
    )


def primary_metrics(cg: ConsistencyGroup, server: NbdServer | None) -> dict[str, Any]:
    m = dict(cg.interceptor.metrics())
    if server is not None:
        st = server.stats
        m.update(
            nbd_connections_open=st.connections_open,
            nbd_bytes_written=st.bytes_written,
            nbd_bytes_read=st.bytes_read,
            nbd_protocol_errors=st.protocol_errors,
        )
    m["volumes"] = len(cg.volumes)
    return m


def run_serve(cfg: LowmarkConfig, ready: threading.Event | None = None) -> None:
    cg = open_primary(cfg)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        asyncio.run(_serve_async(cfg, cg, stop, ready))
    finally:
        cg.close()  # publishes every stamped write and a final LEAVE progress


async def _serve_async(
    cfg: LowmarkConfig, cg: ConsistencyGroup, stop: threading.Event, ready: threading.Event | None
) -> None:
    exports = {name: VolumeExport(vol) for name, vol in cg.volumes.items()}
    server = NbdServer(exports, nbd_config(cfg))
    await server.start()
    if cfg.serve.metrics:
        serve_metrics(
            cfg.serve.metrics,
            "primary",
            lambda: primary_metrics(cg, server),
            {"cg": cfg.cg.name, "interceptor": cfg.serve.interceptor_id},
        )
    event(
        log,
        "serving",
        cg=cfg.cg.name,
        exports=sorted(exports),
        listen=cfg.serve.listen,
        unix_socket=cfg.serve.unix_socket,
    )
    if ready is not None:
        ready.set()
    while not stop.is_set() and cg.interceptor.failure is None:
        await asyncio.sleep(0.1)
    if cg.interceptor.failure is not None:
        event(
            log,
            "replication failed; stopping the NBD server",
            level=logging.ERROR,
            error=str(cg.interceptor.failure),
        )
    await server.close()


# ---------------------------------------------------------------- watermark


def make_watermark_service(cfg: LowmarkConfig) -> WatermarkService:
    return WatermarkService(
        WatermarkServiceConfig(
            cg=cfg.cg.name,
            liveness_timeout_s=cfg.watermark.liveness_timeout_s,
            log_partitions=cfg.cg.log_partitions,
            replication_factor=cfg.replication_factor,
        ),
        cfg.kafka_conf(),
    )


def run_watermark(cfg: LowmarkConfig) -> None:
    svc = make_watermark_service(cfg)
    _run_loop(svc, cfg.watermark.metrics, "watermark", {"cg": cfg.cg.name})


# ---------------------------------------------------------------- apply


def make_applier(cfg: LowmarkConfig, skip: frozenset[tuple[int, int]] = frozenset()) -> Applier:
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
            log_partitions=cfg.cg.log_partitions,
            replication_factor=cfg.replication_factor,
            skip=skip,
        ),
        cfg.kafka_conf(),
    )


def run_apply(cfg: LowmarkConfig, skip: frozenset[tuple[int, int]] = frozenset()) -> None:
    svc = make_applier(cfg, skip)
    _run_loop(svc, cfg.apply.metrics, "applier", {"cg": cfg.cg.name, "site": cfg.apply.site})


def _run_loop(svc: Any, metrics: str, name: str, labels: dict[str, str]) -> None:
    stop = threading.Event()
    _stop_on_signals(stop)
    svc.start()
    if metrics:
        serve_metrics(metrics, name, svc.metrics, labels)
    last_log = time.monotonic()
    try:
        while not stop.is_set():
            svc.step()
            if time.monotonic() - last_log >= 10:
                event(
                    log,
                    f"{name} status",
                    **{k: v for k, v in svc.metrics().items() if not isinstance(v, dict)},
                )
                last_log = time.monotonic()
    finally:
        with contextlib.suppress(Exception):
            svc.close()
