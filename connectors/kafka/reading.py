"""Small, bounded reads of a topic: the latest record of a compacted topic, an offset range.

Used at start-up (an interceptor's clock floor, a service resuming from its last state),
never on a hot path. Every loop is bounded by a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from pipeline.errors import KafkaUnavailableError


def _consumer(conf: dict[str, Any]) -> Consumer:
    c = dict(conf)
    c.update(
        {
            "group.id": f"lowmark-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    return Consumer(c)


# a new topic's partitions answer these for a moment after creation, whatever metadata says
_TRANSIENT = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._UNKNOWN_PARTITION,
}


def watermark_offsets(
    c: Consumer, topic: str, partition: int, timeout_s: float = 10.0
) -> tuple[int, int]:
    """(low, high) of a partition, retrying while a new topic's leader is being elected."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = c.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s, cached=False
            )
            if low >= 0 and high >= 0:
                return low, high
            # -1001 (OFFSET_INVALID): the partition has no leader right now (an election)
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(
                    f"{topic}[{partition}] has no leader (offsets {low}, {high}); retry once "
                    "the cluster has elected one (`lowmark kafka status`, or the broker logs)"
                )
            time.sleep(0.1)
            continue
        except KafkaException as exc:
            err = exc.args[0]
            transient = err.retriable() or err.code() in _TRANSIENT
            if not transient or time.monotonic() > deadline:
                raise KafkaUnavailableError(
                    f"cannot read the offsets of {topic}[{partition}]: {exc.args[0].str()}; "
                    "check that the brokers are up"
                ) from None
            time.sleep(0.1)


def end_offsets(conf: dict[str, Any], topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Per-partition read_committed end offset (the last stable offset)."""
    c = _consumer(conf)
    try:
        md = c.list_topics(topic, timeout=timeout_s)
        parts = sorted(md.topics[topic].partitions) if topic in md.topics else []
        out = {}
        for p in parts:
            out[p] = watermark_offsets(c, topic, p, timeout_s)[1]
        return out
    except KafkaException as exc:
        raise KafkaUnavailableError(f"cannot read offsets of {topic}: {exc}") from None
    finally:
        c.close()


def iter_range(
    conf: dict[str, Any],
    topic: str,
    partition: int = 0,
    start: int = OFFSET_BEGINNING,
    end: int | None = None,
    timeout_s: float = 30.0,
) -> Iterator[Any]:
    """Yield messages of one partition from ``start`` up to (excluding) ``end``.

    ``end=None`` reads to the end as of now. Raises KafkaUnavailableError at the deadline.
    """
    c = _consumer(conf)
    try:
        if end is None:
            end = watermark_offsets(c, topic, partition, timeout_s)[1]
        c.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + timeout_s
        pos = start if start >= 0 else 0
        while pos < end:
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(
                    f"reading {topic}[{partition}] {start}..{end} timed out at offset {pos}"
                )
            msg = c.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == -191:  # _PARTITION_EOF: may be below end (aborted txns)
                    pos_tp = c.position([TopicPartition(topic, partition)])[0]
                    if pos_tp.offset >= end or pos_tp.offset < 0:
                        break
                    continue
                raise KafkaUnavailableError(f"reading {topic}: {msg.error()}")
            pos = msg.offset() + 1
            if msg.offset() >= end:
                break
            yield msg
    finally:
        c.close()


def latest(
    conf: dict[str, Any],
    topic: str,
    decode: Callable[[bytes], Any],
    better: Callable[[Any, Any], bool],
    timeout_s: float = 30.0,
) -> tuple[Any, int] | None:
    """The best decodable record of a (compacted, single-partition) topic and its offset."""
    best: tuple[Any, int] | None = None
    for msg in iter_range(conf, topic, 0, OFFSET_BEGINNING, None, timeout_s):
        if msg.value() is None:
            continue
        try:
            rec = decode(msg.value())
        except Exception:
            continue
        if best is None or better(rec, best[0]):
            best = (rec, msg.offset())
    return best
