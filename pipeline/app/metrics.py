"""Prometheus ``/metrics`` for every service, from the service's own ``metrics()`` dict.

Each service already knows its numbers (W, RPO, lag, rates, errors); this module only
renders them, so the numbers an operator scrapes are the ones the code acts on. The
catalogue (:mod:`pipeline.app.metric_names`) says which key is a counter and which a
gauge and names each by Prometheus' conventions; this module only builds the families.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pipeline.app.config import parse_hostport
from pipeline.app.metric_names import metric
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
        self._warned: set[str] = set()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
            m = metric(self.service, key)
            samples = value if isinstance(value, dict) else {None: value}
            numeric = [(sub, v) for sub, v in samples.items() if isinstance(v, int | float)]
            if not numeric and not isinstance(value, dict):
                continue  # a phase name, an error text: the log and `status` say those
            if not m.known and key not in self._warned:
                self._warned.add(key)
                log.warning("metric %s is not in the catalogue; exported as a gauge", key)
            family = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
            # per-partition or per-volume numbers: one sample per sub-key
            fam = family(m.name, m.help, labels=[*names, "part"] if isinstance(value, dict)
                         else names)  # fmt: skip
            for sub, v in sorted(numeric, key=lambda kv: str(kv[0])):
                fam.add_metric(vals if sub is None else [*vals, str(sub)], m.value(float(v)))
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
