"""Topic names of a consistency group and their creation.

See docs/ARCHITECTURE.md for why each topic is shaped the way it is (the progress topic
has one partition so the watermark is a deterministic fold of a total order).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import ConfigError, KafkaError, KafkaUnavailableError

_CG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def check_cg_name(cg: str) -> str:
    if not _CG_NAME.match(cg):
        raise ConfigError(
            f"consistency group name {cg!r} is invalid: use letters, digits, '-' and '_' "
            "(it becomes part of Kafka topic names)"
        )
    return cg


@dataclass(frozen=True)
class CgTopics:
    cg: str

    @property
    def log(self) -> str:
        return f"lowmark.{self.cg}.log"

    @property
    def progress(self) -> str:
        return f"lowmark.{self.cg}.progress"

    @property
    def watermark(self) -> str:
        return f"lowmark.{self.cg}.watermark"

    @property
    def checkpoints(self) -> str:
        return f"lowmark.{self.cg}.checkpoints"

    @property
    def deadletter(self) -> str:
        return f"lowmark.{self.cg}.deadletter"

    def transactional_id(self, interceptor_id: str) -> str:
        return f"lowmark.{self.cg}.interceptor.{interceptor_id}"

    def watermark_transactional_id(self) -> str:
        """Shared by every watermark service instance of the CG: one publisher at a time."""
        return f"lowmark.{self.cg}.watermark-publisher"


def ensure_topics(
    conf: dict[str, str],
    cg: str,
    *,
    log_partitions: int = 4,
    replication_factor: int | None = None,
    timeout_s: float = 30.0,
) -> CgTopics:
    """Create the CG's topics if missing; existing ones are left as they are."""
    topics = CgTopics(check_cg_name(cg))
    admin = AdminClient(dict(conf))
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {conf.get('bootstrap.servers')}: {exc}; "
            "start it with `lowmark kafka up` or fix bootstrap.servers"
        ) from None
    rf = replication_factor or min(3, len(md.brokers))
    min_isr = "2" if rf >= 3 else "1"
    compacted = {"cleanup.policy": "compact", "min.insync.replicas": min_isr}
    wanted = [
        NewTopic(topics.log, log_partitions, rf, config={"min.insync.replicas": min_isr}),
        NewTopic(topics.progress, 1, rf, config={"min.insync.replicas": min_isr}),
        NewTopic(topics.watermark, 1, rf, config=compacted),
        NewTopic(topics.checkpoints, 1, rf, config=compacted),
        NewTopic(topics.deadletter, 1, rf, config={"min.insync.replicas": min_isr}),
    ]
    missing = [t for t in wanted if t.topic not in md.topics]
    if missing:
        for name, fut in admin.create_topics(missing, request_timeout=timeout_s).items():
            try:
                fut.result()
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaError(f"creating topic {name} failed: {exc}") from None
    # another process may have created them a moment ago: wait for leaders either way
    _wait_for_topics(admin, [t.topic for t in wanted], timeout_s)
    return topics


def _wait_for_topics(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout_s)
        if all(
            n in md.topics
            and md.topics[n].error is None
            and all(p.leader >= 0 for p in md.topics[n].partitions.values())
            for n in names
        ):
            return
        time.sleep(0.05)
    raise KafkaError(f"topics {names} have no leader after {timeout_s}s; check the brokers")
