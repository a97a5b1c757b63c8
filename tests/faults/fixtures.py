"""The proxied 3-node cluster of the broker-fault tests (a pytest plugin: tests/conftest.py
names it, so every test module shares one cluster per session).

Three brokers, RF 3 and min.insync.replicas 2 (the Kafka replication tests' setup); each
broker's CLIENT listener advertises the port of its fault proxy, so lowmark reaches the
brokers only through ``ProxySet`` while they replicate to each other directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from connectors.embedded_kafka.cluster import KafkaCluster
from connectors.embedded_kafka.procs import free_port
from connectors.kafka.config import KafkaConnection
from tests.conftest import session_cluster
from tests.faults.proxy import ProxySet

NODES = 3


@dataclass
class ProxiedCluster:
    cluster: KafkaCluster
    proxies: ProxySet

    @property
    def bootstrap(self) -> str:
        """Through the proxies: what lowmark is given."""
        return self.cluster.client_bootstrap_servers

    def conf(self, client_id: str = "lowmark-test") -> dict[str, Any]:
        return KafkaConnection(self.bootstrap, client_id=client_id).librdkafka()

    def restore(self) -> None:
        """Every proxy healed, every broker running and not stopped."""
        self.proxies.heal()
        for node, pid in self.cluster.node_pids.items():
            if pid is None:
                self.cluster.start_node(node, timeout_s=90)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def _ports() -> list[int]:
    ports: list[int] = []
    while len(ports) < 2 * NODES:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture(scope="session")
def _proxied3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedCluster]:
    ports = _ports()
    # node: (broker's CLIENT listener, its proxy = what the broker advertises)
    listeners = {n: (ports[2 * n - 2], ports[2 * n - 1]) for n in range(1, NODES + 1)}
    routes = {n: (adv, listen) for n, (listen, adv) in listeners.items()}
    with ProxySet(routes) as proxies:
        clusters = session_cluster(
            tmp_path_factory, NODES, name="proxied3", client_listeners=listeners,
            extra_broker_props={"min.insync.replicas": "2"},
        )  # fmt: skip
        try:
            yield ProxiedCluster(next(clusters), proxies)
        finally:
            proxies.heal()
            clusters.close()  # the generator's finally: the cluster stopped


@pytest.fixture
def proxied3(_proxied3: ProxiedCluster) -> ProxiedCluster:
    """The session's proxied cluster, healed and with every broker running."""
    _proxied3.restore()
    return _proxied3
