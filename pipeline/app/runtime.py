"""What the foreground commands share (serve, apply, watermark, failover, drill): stopping on
SIGINT/SIGTERM, the NBD server's config and a primary's numbers.

Kept apart from ``services`` so that ``lowmark failover``, which counts its time to the
first read from its start, does not import the long-lived services it never runs.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from connectors.nbd.server import NbdServer, NbdServerConfig
from pipeline.app.config import LowmarkConfig, parse_hostport
from pipeline.logs import event

if TYPE_CHECKING:
    from pipeline.primary.volume import ConsistencyGroup

log = logging.getLogger("lowmark.services")


def stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        event(log, "stopping", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


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
    if cg.regions is not None:
        m.update(cg.regions.metrics())
    if cg.markers is not None:
        m.update(cg.markers.metrics())
    if cg.snapshots is not None:
        m.update(cg.snapshots.metrics())
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
