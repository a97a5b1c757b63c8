"""The fault proxy against a real client and the real proxied 3-node cluster.

Tries to break: a client that reaches a broker around the proxy (then no fault would
touch it), a partition that lets bytes through, a blackhole that loses or reorders bytes
(messages corrupt or missing after heal), a delay that is not applied, a reset that
leaves the connection open, and a proxy fault that costs the brokers their quorum.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Producer

from tests.faults.fixtures import ProxiedCluster
from tests.kafka_helpers import admin, consume_all, create_topic, isr, partition_leader

pytestmark = pytest.mark.kafka3


class Sender:
    """A producer through the proxies that records what was delivered, and when."""

    def __init__(self, pc: ProxiedCluster, topic: str, timeout_ms: int = 30000) -> None:
        self.topic = topic
        self.delivered: list[bytes] = []
        self.errors: list[str] = []
        self.producer = Producer({
            "bootstrap.servers": pc.bootstrap, "acks": "all", "enable.idempotence": True,
            "linger.ms": 0, "message.timeout.ms": timeout_ms,
            "socket.connection.setup.timeout.ms": 1000, "reconnect.backoff.max.ms": 200,
        })  # fmt: skip

    def _done(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))
        else:
            self.delivered.append(msg.value())

    def send(self, value: bytes) -> None:
        self.producer.produce(self.topic, value=value, partition=0, on_delivery=self._done)
        self.producer.poll(0)

    def round_trip(self, value: bytes, timeout_s: float = 30) -> float:
        started = time.monotonic()
        self.send(value)
        assert self.producer.flush(timeout_s) == 0, f"{value!r} not delivered in {timeout_s} s"
        return time.monotonic() - started

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.producer.poll(0.05)


def _topic(pc: ProxiedCluster, name: str) -> tuple[str, int]:
    create_topic(pc.cluster.bootstrap_servers, name, partitions=1, rf=3,
                 config={"min.insync.replicas": "2"})  # fmt: skip
    return name, partition_leader(pc.cluster.bootstrap_servers, name, 0)


def test_clients_see_only_the_proxies(proxied3, topic):
    name, leader = _topic(proxied3, topic)
    via_proxy = admin(proxied3.bootstrap).list_topics(timeout=10).brokers
    proxy_ports = {n: p.listen_port for n, p in proxied3.proxies.proxies.items()}
    assert {n: b.port for n, b in via_proxy.items()} == proxy_ports
    before = proxied3.proxies.stats(leader).bytes_up
    s = Sender(proxied3, name)
    for i in range(50):
        s.send(b"m%03d" % i + bytes(1000))
    assert s.producer.flush(30) == 0 and not s.errors, s.errors
    assert proxied3.proxies.stats(leader).bytes_up - before > 50_000, "produce bypassed the proxy"
    got = [r.value for r in consume_all(proxied3.bootstrap, name, 50, timeout=30)]
    assert got == [b"m%03d" % i + bytes(1000) for i in range(50)]


@pytest.mark.parametrize("how", ["refuse", "blackhole"])
def test_a_partition_stops_the_leader_and_heals_without_loss(proxied3, topic, how):
    name, leader = _topic(proxied3, topic)
    s = Sender(proxied3, name)
    s.round_trip(b"warm")
    resets = proxied3.proxies.stats(leader).resets
    proxied3.proxies.partition(leader, how)
    try:
        for i in range(20):
            s.send(b"p%02d" % i)
        s.wait(3.0)
        assert s.delivered == [b"warm"], f"{how}: delivered through a partition: {s.delivered}"
        # the brokers still see each other: the leader keeps its place and its ISR
        assert partition_leader(proxied3.cluster.bootstrap_servers, name, 0) == leader
        assert isr(proxied3.cluster.bootstrap_servers, name)[0] == [1, 2, 3]
        if how == "blackhole":
            assert proxied3.proxies.stats(leader).resets == resets, "a blackhole reset"
        else:
            assert proxied3.proxies.stats(leader).resets > resets, "refuse kept connections"
    finally:
        proxied3.proxies.heal(leader)
    assert s.producer.flush(30) == 0 and not s.errors, s.errors
    assert s.delivered == [b"warm"] + [b"p%02d" % i for i in range(20)]
    got = [r.value for r in consume_all(proxied3.bootstrap, name, 21, timeout=30)]
    assert got == s.delivered


def test_delay_is_added_to_every_round_trip(proxied3, topic):
    name, leader = _topic(proxied3, topic)
    s = Sender(proxied3, name)
    s.round_trip(b"warm")
    fast = min(s.round_trip(b"f%d" % i) for i in range(3))
    proxied3.proxies.delay(leader, 0.4)
    try:
        slow = min(s.round_trip(b"s%d" % i) for i in range(3))
    finally:
        proxied3.proxies.heal(leader)
    # request and reply each wait 0.4 s
    assert slow >= 0.8 > fast, f"round trip {fast:.3f} s, delayed {slow:.3f} s"
    assert s.round_trip(b"after") < 0.8


def test_reset_cuts_live_connections_and_clients_reconnect(proxied3, topic):
    name, leader = _topic(proxied3, topic)
    s = Sender(proxied3, name)
    s.round_trip(b"warm")
    accepted = proxied3.proxies.stats(leader).accepted
    assert proxied3.proxies.reset(leader) >= 1
    s.round_trip(b"after", timeout_s=20)
    assert proxied3.proxies.stats(leader).accepted > accepted, "no reconnect after a reset"
    assert s.delivered == [b"warm", b"after"] and not s.errors
