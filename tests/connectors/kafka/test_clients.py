"""The Kafka wrappers of connectors/kafka against a real broker.

Tries to break: an error from the broker must arrive as a lowmark error with librdkafka's
code and the right ``retriable`` (an unknown topic, a fenced transactional producer, an
unreachable bootstrap); a failed delivery must not vanish (the callback latches it, the
next flush raises it once); the end-offsets reader on an empty, a written and a
transactional topic (an open transaction holds the end back); the range reader must stop
exactly at its end offset when the last offsets are commit markers or aborted records, and
must fail loudly when its start offset was deleted; EOF comes once per partition.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from connectors.kafka.admin import Admin
from connectors.kafka.consumer import BEGINNING, Consumer
from connectors.kafka.errors import OFFSET_GONE, PARTITION_EOF, UNKNOWN_PARTITION, UNKNOWN_TOPIC
from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds, end_offsets, iter_range, read_range
from connectors.kafka.settings import InterceptorSettings, ToolSettings, WatermarkSettings
from connectors.kafka.topics import ensure_topics
from pipeline.errors import FencedError, KafkaError, KafkaUnavailableError
from tests.kafka_helpers import create_topic
from tests.replication_helpers import wait_until

UNREACHABLE = {"bootstrap.servers": "127.0.0.1:1", "client.id": "lowmark-test"}


def _txn_producer(conf: dict[str, Any], tid: str) -> Producer:
    p = Producer(InterceptorSettings(conf).producer(tid, "none"))
    p.init_transactions(30)
    return p


def _committed(p: Producer, topic: str, values: list[bytes], partition_key: str = "k") -> None:
    p.begin_transaction()
    p.produce_batch(topic, [(partition_key, v, None) for v in values])
    p.commit_transaction(30)


# ---------------------------------------------------------------- errors


def test_unknown_topic_arrives_wrapped_with_its_code(kafka_conf, topic):
    c = Consumer(ToolSettings(kafka_conf).reader())
    try:
        assert c.partitions(topic) is None, "an unknown topic is None, not an exception"
        # a new topic answers this for a moment, so it is retried until the deadline, then
        # raised as retriable, with its code
        with pytest.raises(KafkaUnavailableError) as got:
            c.watermark_offsets(topic, 0, timeout_s=1)
        assert got.value.code in (UNKNOWN_TOPIC, UNKNOWN_PARTITION), got.value
        assert got.value.retriable
    finally:
        c.close()
    assert end_offsets(kafka_conf, topic) == {} and bounds(kafka_conf, topic) is None
    admin = Admin(ToolSettings(kafka_conf).admin())
    with pytest.raises(KafkaError) as err:
        admin.end_offsets(topic, [0], timeout_s=10)
    assert err.value.code is not None and not err.value.retriable, err.value
    assert not isinstance(err.value, KafkaUnavailableError) and topic in str(err.value)


def test_a_failed_delivery_is_latched_and_raised_once_by_the_next_flush(kafka_conf, topic):
    # the topic does not exist (auto-creation is off): every delivery fails
    p = Producer({**WatermarkSettings(kafka_conf, "cg").producer(), "message.timeout.ms": 1500})
    for i in range(3):
        p.produce(topic, b"v%d" % i, "k")  # the callback runs in poll/flush, never raises
    with pytest.raises(KafkaError) as got:
        p.flush(20)
    assert got.value.code is not None and "delivering a message" in str(got.value)
    assert p.flush(1) == 0, "raised once: the next flush has nothing left to report"


def test_a_fenced_transactional_producer_raises_fenced_error(kafka_conf, topic, unique_name):
    create_topic(kafka_conf["bootstrap.servers"], topic)
    tid = f"lowmark.{unique_name}.interceptor.a"
    old = _txn_producer(kafka_conf, tid)
    old.begin_transaction()
    old.produce(topic, b"zombie", "k")
    old.flush(10)
    new = _txn_producer(kafka_conf, tid)  # a restarted instance takes the id
    with pytest.raises(FencedError) as got:
        old.commit_transaction(10)
    assert got.value.retriable is False and got.value.code is not None
    _committed(new, topic, [b"fresh"])
    seen = [m.value() for m in iter_range(kafka_conf, topic)]
    assert seen == [b"fresh"], "the fenced transaction never became visible"


def test_an_unreachable_bootstrap_is_kafka_unavailable_and_retriable():
    with pytest.raises(KafkaUnavailableError) as got:
        Admin(UNREACHABLE).metadata(timeout_s=1)
    assert got.value.retriable is True and got.value.code is not None
    with pytest.raises(KafkaUnavailableError) as got:
        ensure_topics(UNREACHABLE, "cg", timeout_s=1)
    assert got.value.retriable is True
    p = Producer(InterceptorSettings(UNREACHABLE).producer("lowmark.x.interceptor.y", "none"))
    with pytest.raises(KafkaUnavailableError) as got:
        p.init_transactions(1)
    assert got.value.retriable is True
    with pytest.raises(KafkaUnavailableError):
        end_offsets(UNREACHABLE, "lowmark.cg.log", timeout_s=1)


# ---------------------------------------------------------------- end offsets


def test_end_offsets_of_empty_written_and_transactional_topics(kafka_conf, topic, unique_name):
    bootstrap = kafka_conf["bootstrap.servers"]
    create_topic(bootstrap, topic, partitions=2)
    assert end_offsets(kafka_conf, topic) == {0: 0, 1: 0}
    plain = Producer(ToolSettings(kafka_conf).admin())
    for i in range(3):
        plain.produce(topic, b"%d" % i, "k")
    assert plain.flush(10) == 0
    ends = end_offsets(kafka_conf, topic)
    assert sum(ends.values()) == 3 and set(ends) == {0, 1}
    assert {p: lo for p, (lo, _hi) in bounds(kafka_conf, topic).items()} == {0: 0, 1: 0}

    txn = _txn_producer(kafka_conf, f"lowmark.{unique_name}.t")
    _committed(txn, topic, [b"a", b"b"])  # 2 records + a commit marker in one partition
    wait_until(lambda: sum(end_offsets(kafka_conf, topic).values()) == 3 + 3, 10,
               "the committed records and their marker")  # fmt: skip
    after_commit = end_offsets(kafka_conf, topic)
    txn.begin_transaction()
    txn.produce(topic, b"open", "k")
    txn.flush(10)
    assert end_offsets(kafka_conf, topic) == after_commit, "an open transaction holds it"
    txn.abort_transaction(10)
    # the coordinator writes the abort marker after EndTxn returns: wait for it
    wait_until(lambda: sum(end_offsets(kafka_conf, topic).values()) == 6 + 2, 10,
               "the aborted record and its marker")  # fmt: skip


# ---------------------------------------------------------------- range reader


def test_range_reader_stops_exactly_at_the_end_over_markers_and_aborted_records(
    kafka_conf, topic, unique_name
):
    create_topic(kafka_conf["bootstrap.servers"], topic)
    txn = _txn_producer(kafka_conf, f"lowmark.{unique_name}.r")
    _committed(txn, topic, [b"a", b"b"])  # 0, 1; marker 2
    txn.begin_transaction()
    txn.produce(topic, b"aborted", "k")  # 3
    txn.flush(10)
    txn.abort_transaction(10)  # marker 4
    _committed(txn, topic, [b"d"])  # 5; marker 6
    assert end_offsets(kafka_conf, topic) == {0: 7}
    settings = ToolSettings(kafka_conf).reader()

    def read(start: int, end: int | None) -> list[tuple[int, bytes]]:
        t0 = time.monotonic()
        got = [
            (m.offset(), m.value())
            for m in read_range(
                settings, topic, {0: start}, None if end is None else {0: end},
                stall_timeout_s=20,
            )
        ]  # fmt: skip
        assert time.monotonic() - t0 < 10, "it stopped at the end, not at the stall timeout"
        return got

    assert read(BEGINNING, None) == [(0, b"a"), (1, b"b"), (5, b"d")]
    assert read(0, 2) == [(0, b"a"), (1, b"b")]
    assert read(0, 3) == [(0, b"a"), (1, b"b")], "the range ends on a commit marker"
    assert read(2, 5) == [], "only a marker and an aborted record in range"
    assert read(1, 6) == [(1, b"b"), (5, b"d")]
    assert read(7, 7) == [] and read(5, 3) == []


def test_range_reader_fails_loudly_when_retention_deleted_its_start(kafka_conf, topic):
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    create_topic(kafka_conf["bootstrap.servers"], topic)
    p = Producer(ToolSettings(kafka_conf).admin())
    for i in range(5):
        p.produce(topic, b"%d" % i, "k")
    assert p.flush(10) == 0
    # what retention does, on demand: the log now starts at offset 3
    client = AdminClient({"bootstrap.servers": kafka_conf["bootstrap.servers"]})
    for fut in client.delete_records([TopicPartition(topic, 0, 3)]).values():
        fut.result(10)
    with pytest.raises(KafkaError) as got:
        list(read_range(ToolSettings(kafka_conf).log_reader(), topic, {0: 0}, {0: 5}))
    assert got.value.code == OFFSET_GONE, got.value
    # the short-read settings keep librdkafka's reset (to the end): nothing, and no error;
    # which is why restore and replay read with log_reader()
    assert [m.offset() for m in iter_range(kafka_conf, topic, 0, 0, 5)] == []
    assert [m.offset() for m in iter_range(kafka_conf, topic, 0, 3, 5)] == [3, 4]


# ---------------------------------------------------------------- EOF events


def test_eof_comes_once_per_partition_and_again_only_after_new_records(kafka_conf, topic):
    create_topic(kafka_conf["bootstrap.servers"], topic, partitions=3)
    p = Producer(ToolSettings(kafka_conf).admin())
    p.produce(topic, b"x", "k")
    assert p.flush(10) == 0
    c = Consumer(ToolSettings(kafka_conf).reader())
    try:
        c.assign(topic, {0: BEGINNING, 1: BEGINNING, 2: BEGINNING})

        def eofs_for(seconds: float) -> dict[int, int]:
            out: dict[int, int] = {}
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for msg in c.consume(100, 0.2):
                    err = msg.error()
                    if err is not None and err.code() == PARTITION_EOF:
                        out[msg.partition()] = out.get(msg.partition(), 0) + 1
            return out

        assert eofs_for(3) == {0: 1, 1: 1, 2: 1}
        end = end_offsets(kafka_conf, topic)
        written = next(part for part, off in end.items() if off == 1)
        p.produce(topic, b"y", "k")  # same key: the same partition
        assert p.flush(10) == 0
        assert eofs_for(3) == {written: 1}
    finally:
        c.close()
