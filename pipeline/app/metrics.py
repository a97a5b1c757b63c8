"""Prometheus ``/metrics`` for every service, from the service's own ``metrics()`` dict.

Each service already knows its numbers (W, RPO, lag, rates, errors); this module only
renders them, so the numbers an operator scrapes are the ones the code acts on. Every
numeric value becomes a gauge ``lowmark_<service>_<key>`` with the service's labels;
counters are exposed as gauges too (Prometheus' ``rate()`` works on them all the same).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pipeline.app.config import parse_hostport
from pipeline.errors import ConfigError

log = logging.getLogger("lowmark.metrics")


class ServiceCollector:
    """A prometheus_client collector (it only needs ``collect``). prometheus_client is
    imported when metrics are served: it costs ~0.1 s of start-up that ``lowmark failover``
    counts to its first read."""

    def __init__(
        self, service: str, source: Callable[[], Mapping[str, Any]], labels: Mapping[str, str]
    ) -> None:
        self.service = service
        self.source = source
        self.labels = dict(labels)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            values = self.source()
        except Exception as exc:
            log.warning("metrics source failed: %s", exc)
            values = {}
        names, vals = list(self.labels), list(self.labels.values())
        up = GaugeMetricFamily(
            f"lowmark_{self.service}_up", "1 while the service runs", labels=names
        )
        up.add_metric(vals, 1.0)
        yield up
        for key, value in sorted(values.items()):
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, dict):
                # per-partition or per-volume numbers: one sample per sub-key
                fam = GaugeMetricFamily(
                    f"lowmark_{self.service}_{key}", key, labels=[*names, "part"]
                )
                for sub, v in sorted(value.items()):
                    if isinstance(v, int | float):
                        fam.add_metric([*vals, str(sub)], float(v))
                yield fam
                continue
            if not isinstance(value, int | float):
                continue
            fam = GaugeMetricFamily(f"lowmark_{self.service}_{key}", key, labels=names)
            fam.add_metric(vals, float(value))
            yield fam


def serve_metrics(
    listen: str,
    service: str,
    source: Callable[[], Mapping[str, Any]],
    labels: Mapping[str, str],
) -> int | None:
    """Start the ``/metrics`` HTTP endpoint on ``listen`` (host:port); return the port."""
    addr = parse_hostport(listen, "metrics address")
    if addr is None:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(ServiceCollector(service, source, labels))
    try:
        server, _thread = start_http_server(addr[1], addr=addr[0], registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {listen}: {exc}; "
            "choose a free port in the metrics setting (host:port)"
        ) from None
    port = server.server_address[1]
    log.info("metrics at http://%s:%d/metrics", addr[0], port, extra={"service": service})
    return port
