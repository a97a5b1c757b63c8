"""The one admin client class lowmark uses: a thin owner of a ``confluent_kafka`` AdminClient.

Metadata, topic creation and the log's end offsets in one ListOffsets request; every error
leaves as a lowmark ``KafkaError`` (``connectors.kafka.errors.as_error``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, OffsetSpec

from connectors.kafka.client_log import client_logger
from connectors.kafka.errors import TOPIC_ALREADY_EXISTS, as_error
from pipeline.errors import KafkaUnavailableError


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)


class Admin:
    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        try:
            self._a = AdminClient({"logger": client_logger(), **self.settings})  # type: ignore[dict-item]
        except KafkaException as exc:  # a setting librdkafka refuses
            raise as_error(exc, "creating a Kafka admin client", "check the settings") from None

    def _serve_logs(self) -> None:
        # an admin client's log lines wait for its poll(); nothing else here polls it
        self._a.poll(0)

    def metadata(self, timeout_s: float) -> Any:
        """The cluster's metadata (``.brokers``, ``.topics[name].partitions[p].leader``)."""
        self._serve_logs()
        try:
            return self._a.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            raise as_error(
                exc,
                f"cannot reach Kafka at {self.settings.get('bootstrap.servers')}",
                "start it with `lowmark kafka up` or fix bootstrap.servers",
            ) from None

    def durability(self, topic: str, timeout_s: float) -> tuple[int, int]:
        """(the fewest replicas of any partition, the topic's min.insync.replicas): how
        many brokers an acks=all write is on at least, and how many it may be on."""
        md = self.metadata(timeout_s)
        t = md.topics.get(topic)
        if t is None or not t.partitions:
            raise KafkaUnavailableError(f"topic {topic} has no metadata yet; retry", code=None,
                                        retriable=True)  # fmt: skip
        replicas = min(len(p.replicas) for p in t.partitions.values())
        try:
            res = ConfigResource("topic", topic)
            cfg = self._a.describe_configs([res], request_timeout=timeout_s)[res].result()
        except KafkaException as exc:
            raise as_error(exc, f"reading the configuration of topic {topic}") from None
        entry = cfg.get("min.insync.replicas")
        return replicas, int(entry.value) if entry is not None and entry.value else 1

    def create_topics(self, specs: Iterable[TopicSpec], timeout_s: float) -> None:
        """Create the topics; one that exists already (another process was faster) is fine."""
        new = [
            NewTopic(s.name, s.partitions, s.replication_factor, config=dict(s.config))
            for s in specs
        ]
        if not new:
            return
        self._serve_logs()
        try:
            futures = self._a.create_topics(new, request_timeout=timeout_s)
        except KafkaException as exc:
            raise as_error(exc, "creating topics") from None
        for name, fut in futures.items():
            try:
                fut.result()
            except KafkaException as exc:
                err = as_error(exc, f"creating topic {name} failed")
                if err.code != TOPIC_ALREADY_EXISTS:
                    raise err from None

    def end_offsets(
        self, topic: str, partitions: Iterable[int], timeout_s: float, committed: bool = False
    ) -> dict[int, int]:
        """Each partition's end offset in one ListOffsets request: the high watermark, or
        with ``committed`` the last stable offset. A partition without a leader (an error,
        or an offset below 0, -1001 while a cluster elects) is ``KafkaUnavailableError``."""
        parts = list(partitions)
        level = IsolationLevel.READ_COMMITTED if committed else IsolationLevel.READ_UNCOMMITTED
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]  # unannotated upstream
        request = {TopicPartition(topic, p): latest for p in parts}
        self._serve_logs()
        try:
            futures = self._a.list_offsets(
                request, isolation_level=level, request_timeout=timeout_s
            )
            out = {tp.partition: fut.result(timeout_s).offset for tp, fut in futures.items()}
        except KafkaException as exc:
            raise as_error(exc, f"cannot read the end offsets of {topic}") from None
        except TimeoutError:
            raise KafkaUnavailableError(
                f"cannot read the end offsets of {topic}: no answer in {timeout_s} s"
            ) from None
        return checked_end_offsets(topic, parts, out)


def checked_end_offsets(topic: str, parts: Iterable[int], got: Mapping[int, int]) -> dict[int, int]:
    """A ListOffsets answer as offsets, or ``KafkaUnavailableError`` if any partition has none.

    A partition without a leader answers an offset below 0 (-1001 while a cluster elects):
    a W published with it would name no position in that partition, and an applier would
    take it as ready before reading the records it covers.
    """
    parts = list(parts)
    bad = sorted(p for p in parts if got.get(p, -1) < 0)
    if bad:
        raise KafkaUnavailableError(
            f"{topic} partitions {bad} have no end offset (leader election?)"
        )
    return {p: got[p] for p in parts}
