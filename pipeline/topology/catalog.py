"""The topology in Kafka: read it (``read_topology``), publish to it (``TopologyWriter``).

The primary publishes a ``VolumeEntry`` after each volume change is durable in the CG's
log (and all of them when it opens, which repairs an entry a crash kept from being sent);
every site's service registers its ``SiteEntry`` when it starts. A publish never holds up
the data path: it is sent in the background, and a failure is counted and logged, and
mended at the next change or start. The entries describe; the CG's log decides: a backup
applies a volume change where the log has it, in order with the writes.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds, read_range
from connectors.kafka.settings import TopologySettings
from connectors.kafka.topics import CONFIG_TOPIC, ensure_config_topic, site_key, volume_key
from pipeline.errors import KafkaError
from pipeline.logs import event
from pipeline.topology.model import Topology, fold
from schemas import codec
from schemas.records import SiteEntry, VolumeEntry

__all__ = ["TopologyWriter", "lowmark_version", "read_topology", "this_host"]

log = logging.getLogger("lowmark.topology")


def lowmark_version() -> str:
    try:
        return metadata.version("lowmark")
    except metadata.PackageNotFoundError:
        return "dev"


def this_host() -> str:
    return socket.gethostname()


def read_topology(conf: Mapping[str, Any], cg: str, timeout_s: float = 30.0) -> Topology:
    """The committed topology of ``cg``: one bounded read of ``lowmark.config``."""
    b = bounds(dict(conf), CONFIG_TOPIC, timeout_s)
    if b is None or 0 not in b or b[0][1] <= b[0][0]:
        return Topology(cg)
    low, end = b[0]
    msgs = read_range(TopologySettings(dict(conf)).reader(), CONFIG_TOPIC, {0: low}, {0: end},
                      stall_timeout_s=timeout_s, timeout_s=timeout_s)  # fmt: skip
    topo = fold(cg, ((m.offset(), (m.key() or b"").decode(errors="replace"), m.value())
                     for m in msgs))  # fmt: skip
    for r in topo.rejected:
        event(log, "a topology record cannot be trusted; it changes nothing. Find its writer "
              "(kcat -C -t lowmark.config -o OFFSET -c 1 -f '%k %h')", logging.WARNING,
              cg=cg, offset=r.offset, key=r.key, why=r.why)  # fmt: skip
    return topo


class TopologyWriter:
    """Sends volume and site entries to ``lowmark.config`` in the background."""

    def __init__(self, conf: Mapping[str, Any], replication_factor: int | None = None) -> None:
        self.conf = dict(conf)
        self.replication_factor = replication_factor
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self.stats = {"sent": 0, "failed": 0}

    def _ready(self) -> Producer:
        with self._lock:
            if self._producer is None:
                ensure_config_topic(self.conf, replication_factor=self.replication_factor)
                self._producer = Producer(TopologySettings(self.conf).entries_producer())
            return self._producer

    def warm(self) -> None:
        """Create the producer (and the topic) now, not at a first publish that someone
        waits for (a migration's cutover publishes inside its I/O pause)."""
        try:
            self._ready()
        except KafkaError as exc:
            self._failed("(warm-up)", str(exc))

    def publish_volume(self, entry: VolumeEntry) -> None:
        self._send(volume_key(entry.cg, entry.volume_id), entry)

    def register_site(self, entry: SiteEntry) -> None:
        self._send(site_key(entry.cg, entry.site), entry)

    def _send(self, key: str, rec: VolumeEntry | SiteEntry) -> None:
        try:
            p = self._ready()
            p.produce(CONFIG_TOPIC, codec.encode(rec), key, headers=codec.headers_for(rec),
                      on_delivery=self._delivered)  # fmt: skip
            p.poll(0)
        except KafkaError as exc:
            self._failed(key, str(exc))

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed((msg.key() or b"").decode(errors="replace"), str(err))
        else:
            self.stats["sent"] += 1

    def _failed(self, key: str, why: str) -> None:
        self.stats["failed"] += 1
        event(log, "cannot publish a topology entry; it is sent again at the next change "
              "or start", logging.WARNING, key=key, error=why)  # fmt: skip

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait for what was sent; whether all of it was delivered (or failed)."""
        p = self._producer
        return p is None or p.flush(timeout_s) == 0

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._producer = None
