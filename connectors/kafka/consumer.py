"""The one consumer class lowmark uses: a thin owner of a ``confluent_kafka.Consumer``.

Positions are given as ``topic`` plus ``{partition: offset}``, errors leave as lowmark
``KafkaError`` (``connectors.kafka.errors.as_error``). ``poll`` and ``consume`` return
librdkafka's messages as they are (``.value()``, ``.offset()``, ``.error()``...): the
apply loop and the fold pay one call per batch, nothing per message. An error *event*
(``msg.error()`` set; ``PARTITION_EOF`` at a partition's end with
``enable.partition.eof``) is a message too; ``as_error(msg.error(), ...)`` gives its
lowmark error to branch on (``.retriable``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING as _BEGINNING
from confluent_kafka import OFFSET_END as _END
from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaException, TopicPartition

from connectors.kafka.client_log import client_logger
from connectors.kafka.errors import UNKNOWN_PARTITION, UNKNOWN_TOPIC, as_error
from pipeline.errors import KafkaUnavailableError

#: logical start offsets for ``assign``: the partition's first / next new record
BEGINNING: int = _BEGINNING
END: int = _END

# a new topic's partitions answer these for a moment after creation, whatever metadata says
_NEW_TOPIC = frozenset({UNKNOWN_TOPIC, UNKNOWN_PARTITION})


class Consumer:
    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        try:
            self._c = _Consumer({"logger": client_logger(), **self.settings})
        except KafkaException as exc:  # a setting librdkafka refuses
            raise as_error(exc, "creating a Kafka consumer", "check the Kafka settings") from None

    # ---------------------------------------------------------------- positions

    def assign(self, topic: str, offsets: Mapping[int, int]) -> None:
        self._call(
            self._c.assign,
            f"assigning {topic}",
            [TopicPartition(topic, p, o) for p, o in offsets.items()],
        )

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._call(
            self._c.seek, f"seeking {topic}[{partition}]", TopicPartition(topic, partition, offset)
        )

    def pause(self, topic: str, partitions: Iterable[int]) -> None:
        tps = [TopicPartition(topic, p) for p in partitions]
        self._call(self._c.pause, f"pausing {topic}", tps)

    def resume(self, topic: str, partitions: Iterable[int]) -> None:
        tps = [TopicPartition(topic, p) for p in partitions]
        self._call(self._c.resume, f"resuming {topic}", tps)

    def position(self, topic: str, partition: int) -> int:
        """The offset the next fetch of the partition starts at (< 0: none yet)."""
        got = self._call(
            self._c.position, f"position of {topic}", [TopicPartition(topic, partition)]
        )
        return int(got[0].offset)

    def commit(self, topic: str, offsets: Mapping[int, int], asynchronous: bool = True) -> None:
        """Store the group's offsets (advisory for lowmark: checkpoints are the truth)."""
        tps = [TopicPartition(topic, p, o) for p, o in offsets.items()]
        if tps:
            self._call(
                self._c.commit,
                f"committing offsets of {topic}",
                offsets=tps,
                asynchronous=asynchronous,
            )

    # ---------------------------------------------------------------- reading

    def poll(self, timeout_s: float) -> Any:
        """One message or event, or None after ``timeout_s``."""
        try:
            return self._c.poll(timeout_s)
        except KafkaException as exc:
            raise as_error(exc, "polling") from None

    def consume(self, n: int, timeout_s: float) -> list[Any]:
        """Up to ``n`` messages/events; waits up to ``timeout_s`` for ``n`` of them."""
        try:
            return self._c.consume(n, timeout_s)
        except KafkaException as exc:
            raise as_error(exc, "consuming") from None

    # ---------------------------------------------------------------- metadata

    def partitions(self, topic: str, timeout_s: float = 10.0) -> list[int] | None:
        """The topic's partitions, sorted; None when the cluster does not know the topic."""
        md = self._call(self._c.list_topics, f"listing {topic}", topic, timeout=timeout_s)
        t = md.topics.get(topic)
        if t is None or (t.error is not None and t.error.code() == UNKNOWN_TOPIC):
            return None
        if t.error is not None:
            raise as_error(t.error, f"listing {topic}")
        return sorted(t.partitions)

    def watermark_offsets(
        self, topic: str, partition: int, timeout_s: float = 10.0, cached: bool = False
    ) -> tuple[int, int]:
        """(low, high) of a partition, retrying while a new topic's leader is being elected.

        ``high`` is the last stable offset for a read_committed consumer. ``cached``: the
        last values fetch responses brought, as they are (no request, no retry; may be
        stale or -1001 before the first fetch).
        """
        tp = TopicPartition(topic, partition)
        if cached:
            got = self._call(self._c.get_watermark_offsets, f"offsets of {topic}", tp, cached=True)
            return int(got[0]), int(got[1])
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                low, high = self._c.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            except KafkaException as exc:
                err = as_error(exc, f"reading the offsets of {topic}[{partition}]")
                if not (err.retriable or err.code in _NEW_TOPIC):
                    raise err from None
                if time.monotonic() > deadline:
                    raise KafkaUnavailableError(
                        f"{err}; check that the brokers are up", code=err.code
                    ) from None
                time.sleep(0.1)
                continue
            if low >= 0 and high >= 0:
                return low, high
            # -1001 (OFFSET_INVALID): the partition has no leader right now (an election)
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(
                    f"{topic}[{partition}] has no leader (offsets {low}, {high}); retry once "
                    "the cluster has elected one (`lowmark kafka status`, or the broker logs)"
                )
            time.sleep(0.1)

    def close(self) -> None:
        """Leave (no group offsets are committed on close: auto-commit is off)."""
        self._call(self._c.close, "closing the consumer")

    def _call(self, fn: Any, what: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KafkaException as exc:
            raise as_error(exc, what) from None
