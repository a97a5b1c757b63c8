"""The raw rows of bench.write_path: confluent-kafka's ``Producer`` with nothing of lowmark.

``raw-txn`` sends each write's bytes as one message keyed by the volume id, with the
interceptor's producer settings, in transactions committed every 10 ms (the fair baseline
for lowmark's 10 ms tick); ``raw`` is the same without transactions. A row's evidence that
Kafka has its bytes is the partitions' end offsets.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import CPU_GROUPS, Broker, CpuMeter, MiB, run_id, summarize_ns

KEY = "vol"  # lowmark keys log records by volume id; one volume -> one key -> one partition
PARTITIONS = 4  # InterceptorConfig.log_partitions default
TXN_INTERVAL_S = 0.01  # InterceptorConfig.tick_interval_s default


def producer_conf(bootstrap: str, transactional_id: str | None) -> dict[str, Any]:
    """The interceptor's producer settings (``Interceptor._producer_conf``), so the only
    difference between the rows is lowmark's own work."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "compression.type": "lz4",
        "linger.ms": 2,
        "batch.size": 1_000_000,
        "message.timeout.ms": 30_000,
        # lowmark lets at most max_unreplicated_bytes (256 MiB) wait for Kafka; give the
        # raw producer the same bound, or a no-transaction row queues a GiB and the row's
        # time is mostly its final flush
        "queue.buffering.max.kbytes": 256 * 1024,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = 60_000
    return conf


def create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    rf = min(3, len(admin.list_topics(timeout=15).brokers))
    fut = admin.create_topics([NewTopic(topic, partitions, rf)], request_timeout=30)[topic]
    fut.result()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(topic, timeout=10).topics.get(topic)
        parts = md.partitions.values() if md is not None and md.error is None else ()
        if parts and all(p.leader >= 0 for p in parts):
            return
        time.sleep(0.05)
    raise RuntimeError(f"bench topic {topic} has no leader after 30 s; check the broker")


_SETTLING = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
}


def end_offsets_total(bootstrap: str, topic: str, timeout_s: float = 20) -> int:
    """Sum of the partitions' high watermarks (data records plus transaction markers)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{run_id()}"})
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                parts = c.list_topics(topic, timeout=10).topics[topic].partitions
                return sum(
                    c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in parts
                )
            except KafkaException as exc:
                # a topic created a moment ago may still be moving its leaders
                err = exc.args[0]
                settling = err.retriable() or err.code() in _SETTLING
                if not settling or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        c.close()


def run_raw(
    broker: Broker,
    topic: str,
    size: int,
    duration_s: float,
    transactional: bool,
    pool: list[bytes],
    producer: Producer | None = None,
) -> dict[str, Any]:
    """One producer thread, one message per write, for ``duration_s``; then commit/flush.

    Like the tick: produce for 10 ms, commit (blocking), repeat. Durability evidence is the
    end offset: every message sent is a record (plus one marker per committed transaction).
    """
    p = producer or Producer(producer_conf(broker.bootstrap, None))
    before = end_offsets_total(broker.bootstrap, topic)
    meter = CpuMeter(CPU_GROUPS, broker.pids).start()
    commit_ns: list[int] = []
    sent = commits = 0
    n_pool = len(pool)
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    if transactional:
        p.begin_transaction()
    next_commit = t0 + TXN_INTERVAL_S
    in_txn = 0
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        try:
            p.produce(topic, pool[sent % n_pool], KEY)
        except BufferError:  # librdkafka's queue is full: let it drain
            p.poll(0.001)
            continue
        sent += 1
        in_txn += 1
        if transactional and now >= next_commit:
            c0 = time.perf_counter_ns()
            p.commit_transaction(30)
            commit_ns.append(time.perf_counter_ns() - c0)
            commits += 1
            in_txn = 0
            p.begin_transaction()
            next_commit = time.perf_counter() + TXN_INTERVAL_S
        elif sent % 1000 == 0:
            p.poll(0)
    produce_s = time.perf_counter() - t0
    if transactional:
        p.commit_transaction(30)
        commits += 1 if in_txn else 0
        remaining = 0
    else:
        remaining = p.flush(60)
    total_s = time.perf_counter() - t0
    cpu = meter.stop()
    delta = end_offsets_total(broker.bootstrap, topic) - before
    expected = sent + (commits if transactional else 0)
    nbytes = sent * size
    return {
        "row": "raw-txn" if transactional else "raw",
        "size": size,
        "threads": 1,
        "writes": sent,
        "bytes": nbytes,
        "produce_s": round(produce_s, 3),
        "drain_s": round(total_s - produce_s, 3),
        "total_s": round(total_s, 3),
        "mib_s": nbytes / MiB / total_s,
        "writes_s": sent / total_s,
        "transactions": commits,
        "commit_latency": summarize_ns(commit_ns) if commit_ns else None,
        "verified": remaining == 0 and delta == expected,
        "check": f"end offsets grew by {delta}, expected {expected}; {remaining} unflushed",
        "cpu": cpu,
    }
