"""Broker crashes in the 3-node cluster, under continuous acks=all idempotent produce.

Tries to break: an acknowledged message lost or duplicated when the leader of a partition
is killed with SIGKILL; producing stalling for good instead of failing over; the killed
broker not rejoining the ISR after a restart on its own ports and data; per-partition order;
nodes restarted one at a time after two of three died (the controller quorum was lost).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Producer

from connectors.embedded_kafka.cluster import KafkaCluster
from tests.kafka_helpers import (
    admin,
    consume_all,
    create_topic,
    isr,
    kill_broker,
    produce_many,
    restart_broker,
    wait_for,
)

pytestmark = pytest.mark.kafka3

PARTITIONS = 3
MAX_MESSAGES = 200_000  # bounds the run even if a wait below misbehaves
RATE_PER_S = 2_000


class ContinuousProducer:
    """Produces 0, 1, 2, ... as fast as RATE_PER_S allows, recording every delivery."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = Producer({
            "bootstrap.servers": bootstrap,
            "acks": "all",  # acknowledged = on every in-sync replica (>= min.insync.replicas)
            "enable.idempotence": True,  # retries after the failover must not duplicate
            "linger.ms": 5,
            "delivery.timeout.ms": 120_000,  # outlast fencing + leader election
        })
        self.acked: dict[int, int] = {}  # value -> partition
        self.per_partition: Counter[int] = Counter()
        self.errors: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        with self._lock:
            if err is not None:
                self.errors.append(str(err))
            else:
                self.acked[int(msg.value())] = msg.partition()
                self.per_partition[msg.partition()] += 1

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and self.sent < MAX_MESSAGES:
            try:
                self.producer.produce(self.topic, key=str(self.sent % 31),
                                      value=str(self.sent), on_delivery=self._on_delivery)
            except BufferError:
                self.producer.poll(0.1)
                continue
            self.sent += 1
            self.producer.poll(0)
            ahead = self.sent / RATE_PER_S - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        self.producer.flush(120)

    def start(self) -> ContinuousProducer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(150)
        assert not self._thread.is_alive(), "the producer did not finish flushing"

    def snapshot(self) -> Counter[int]:
        with self._lock:
            return Counter(self.per_partition)


def _leader(cluster: KafkaCluster, topic: str, partition: int) -> int:
    md = admin(cluster.bootstrap_servers).list_topics(topic, timeout=10)
    return md.topics[topic].partitions[partition].leader


def test_killed_leader_loses_no_acknowledged_message(kafka3: KafkaCluster, topic: str) -> None:
    bootstrap = kafka3.bootstrap_servers
    create_topic(bootstrap, topic, partitions=PARTITIONS, rf=3,
                 config={"min.insync.replicas": "2"})
    producer = ContinuousProducer(bootstrap, topic).start()
    try:
        wait_for(lambda: sum(producer.snapshot().values()) >= 2_000, 30,
                 "2000 acks before the kill")
        victim = _leader(kafka3, topic, 0)
        kill_broker(kafka3, victim)
        at_kill = producer.snapshot()

        # Every partition, including those the victim led, keeps taking acks=all writes.
        wait_for(lambda: all(producer.snapshot()[p] >= at_kill[p] + 500
                             for p in range(PARTITIONS)),
                 45, "every partition to take 500 more acks after the kill")
        wait_for(lambda: all(len(r) == 2 for r in isr(bootstrap, topic).values()), 30,
                 f"the ISR to drop killed broker {victim}")
        assert all(victim not in r for r in isr(bootstrap, topic).values())

        restart_broker(kafka3, victim)
        wait_for(lambda: all(r == [1, 2, 3] for r in isr(bootstrap, topic).values()), 45,
                 f"restarted broker {victim} to rejoin every ISR")
        after = producer.snapshot()
        wait_for(lambda: sum(producer.snapshot().values()) >= sum(after.values()) + 1_000, 30,
                 "1000 more acks after the rejoin")
    finally:
        producer.stop()

    assert producer.errors == [], f"deliveries failed: {producer.errors[:3]}"
    assert len(producer.acked) == producer.sent, "every produced message must be acknowledged"
    records = consume_all(bootstrap, topic, timeout=60)
    values = [int(r.value) for r in records]
    assert len(values) == len(set(values)), "a message was duplicated"
    assert set(values) == set(producer.acked), "an acknowledged message was lost"
    for p in range(PARTITIONS):
        in_partition = [int(r.value) for r in sorted(records, key=lambda r: r.offset)
                        if r.partition == p]
        assert in_partition == sorted(in_partition), f"partition {p} is out of order"
        assert all(producer.acked[v] == p for v in in_partition)


def test_quorum_comes_back_when_dead_nodes_restart_one_at_a_time(
    kafka3: KafkaCluster, topic: str
) -> None:
    bootstrap = kafka3.bootstrap_servers
    create_topic(bootstrap, topic, partitions=1, rf=3, config={"min.insync.replicas": "2"})
    survivor = kafka3.controller_leader() or kafka3.node_ids[0]
    dead = [n for n in kafka3.node_ids if n != survivor]
    for node in dead:
        kill_broker(kafka3, node)
    assert kafka3.node_pids[survivor] is not None
    # The first restart must succeed while the other node is still down: 2 of 3 voters
    # make a quorum again.
    restart_broker(kafka3, dead[0], timeout_s=90)
    assert kafka3.controller_leader() is not None
    restart_broker(kafka3, dead[1], timeout_s=90)
    assert all(pid is not None for pid in kafka3.node_pids.values())
    wait_for(lambda: isr(bootstrap, topic)[0] == [1, 2, 3], 45, "the ISR to be whole again")
    acked = produce_many(bootstrap, topic, [(b"k", str(i)) for i in range(100)],
                         config={"acks": "all"})
    assert len(acked) == 100
    assert [int(r.value) for r in consume_all(bootstrap, topic, timeout=30)] == list(range(100))
