"""Small, bounded helpers for tests that talk to a real Kafka cluster.

Every wait here has a deadline and fails with what it was waiting for; nothing loops
forever. Tests import them as ``from kafka_helpers import ...`` (conftest.py puts tests/
on sys.path).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.embedded_kafka.cluster import KafkaCluster

# the tool checks live in prereqs.py (one helper for every test file); kept importable here
from tests.prereqs import require_tool, require_tools, strict_mode, unavailable  # noqa: F401

T = TypeVar("T")


@dataclass(frozen=True)
class ExternalKafka:
    """A cluster the tests did not start (LOWMARK_TEST_BOOTSTRAP, testcontainers)."""

    bootstrap_servers: str
    what: str = "external"


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = field(default=())


def unique(prefix: str = "t") -> str:
    """A name unique to this call, valid as a Kafka topic and as a lowmark CG name."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", prefix).strip("-_")[:40] or "t"
    return f"{clean}-{uuid.uuid4().hex[:10]}"


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    """Poll ``predicate`` until it returns a truthy value; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: T = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} "
                                 f"(last value: {last!r})")
        time.sleep(every_s)
        last = predicate()
    return last


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    rf: int = 1,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 30,
) -> str:
    """Create ``name`` and wait until every partition has a leader in the metadata."""
    client = admin(bootstrap)  # must outlive the futures, or they fail with _DESTROY
    futures = client.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=rf,
                  config=dict(config or {}))],
        operation_timeout=timeout_s, request_timeout=timeout_s,
    )
    futures[name].result(timeout=timeout_s)
    wait_for(lambda: _all_led(bootstrap, name, partitions), timeout_s,
             f"topic {name} to have a leader for each of its {partitions} partitions")
    return name


def _all_led(bootstrap: str, topic: str, partitions: int) -> bool:
    md = admin(bootstrap).list_topics(topic, timeout=5).topics.get(topic)
    return bool(md and not md.error and len(md.partitions) == partitions
                and all(p.leader >= 0 for p in md.partitions.values()))


def isr(bootstrap: str, topic: str) -> dict[int, list[int]]:
    """In-sync replicas of each partition of ``topic``, as the cluster reports them."""
    md = admin(bootstrap).list_topics(topic, timeout=10).topics[topic]
    return {p: sorted(pm.isrs) for p, pm in md.partitions.items()}


def produce_many(
    bootstrap: str,
    topic: str,
    messages: Iterable[tuple[bytes | str | None, bytes | str]],
    config: Mapping[str, Any] | None = None,
    timeout_s: float = 60,
) -> list[Record]:
    """Produce ``(key, value)`` pairs, flush, and return what was acknowledged.

    Raises if any message failed or was not acknowledged within ``timeout_s``.
    """
    acked: list[Record] = []
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            acked.append(Record(msg.topic(), msg.partition(), msg.offset(),
                                msg.key(), msg.value()))

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "enable.idempotence": True, **dict(config or {})})
    count = 0
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
        producer.poll(0)
        count += 1
    left = producer.flush(timeout_s)
    if errors or left:
        raise AssertionError(f"producing {count} messages to {topic}: {len(errors)} failed "
                             f"(first: {errors[:1]}), {left} not acknowledged in {timeout_s} s")
    return acked


def consume_all(
    bootstrap: str,
    topic: str,
    n: int | None = None,
    timeout: float = 30,
    isolation: str = "read_committed",
) -> list[Record]:
    """Read ``topic`` from the beginning of every partition.

    With ``n``: until ``n`` records arrived (fewer only if ``timeout`` passes; the caller
    asserts the count). Without: until the end offsets seen at the start are reached.
    """
    parts = admin(bootstrap).list_topics(topic, timeout=10).topics[topic].partitions
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("consume-all"),
                         "enable.auto.commit": False, "isolation.level": isolation,
                         "enable.partition.eof": True})
    try:
        tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts]
        ends = {} if n is not None else {
            tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        consumer.assign(tps)
        out: list[Record] = []
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if n is not None and len(out) >= n:
                break
            if n is None and len(done) == len(tps):
                break
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    if n is None and msg.offset() >= ends.get(msg.partition(), 0):
                        done.add(msg.partition())
                    continue
                raise KafkaException(msg.error())
            out.append(Record(msg.topic(), msg.partition(), msg.offset(), msg.key(),
                              msg.value(), tuple(msg.headers() or ())))
        return out
    finally:
        consumer.close()


def kill_broker(cluster: KafkaCluster, node_id: int) -> None:
    """kill -9 one broker of a cluster the tests started."""
    cluster.kill_node(node_id)


def restart_broker(cluster: KafkaCluster, node_id: int, timeout_s: float = 60) -> None:
    """Start a killed broker again on its ports and data; returns once it serves."""
    cluster.start_node(node_id, timeout_s=timeout_s)


def partition_leader(bootstrap: str, topic: str, partition: int) -> int:
    """The node id leading ``topic``[``partition``] now (-1 while it has none)."""
    md = admin(bootstrap).list_topics(topic, timeout=10).topics[topic]
    return md.partitions[partition].leader


def volume_partitions(conf: Mapping[str, Any], topic: str, partitions: int = 4) -> dict[str, int]:
    """volume id -> the log partition its records are in, from the records' headers."""
    from connectors.kafka.reading import iter_range

    out: dict[str, int] = {}
    for p in range(partitions):
        for m in iter_range(dict(conf), topic, p):
            vid = dict(m.headers() or []).get("volume")
            if vid is not None:
                out.setdefault(vid.decode(), p)
    return out
