"""Topic names of a consistency group and their creation.

See docs/ARCHITECTURE.md for why each topic is shaped the way it is (the progress topic
has one partition so the watermark is a deterministic fold of a total order).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from connectors.kafka.admin import Admin, TopicSpec
from pipeline.errors import ConfigError, KafkaUnavailableError

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
    admin = Admin(conf)
    md = admin.metadata(timeout_s)
    rf = replication_factor or min(3, len(md.brokers))
    min_isr = "2" if rf >= 3 else "1"
    compacted = {"cleanup.policy": "compact", "min.insync.replicas": min_isr}
    wanted = [
        TopicSpec(topics.log, log_partitions, rf, {"min.insync.replicas": min_isr}),
        TopicSpec(topics.progress, 1, rf, {"min.insync.replicas": min_isr}),
        TopicSpec(topics.watermark, 1, rf, compacted),
        TopicSpec(topics.checkpoints, 1, rf, compacted),
        TopicSpec(topics.deadletter, 1, rf, {"min.insync.replicas": min_isr}),
    ]
    admin.create_topics([t for t in wanted if t.name not in md.topics], timeout_s)
    # another process may have created them a moment ago: wait for leaders either way
    _wait_for_topics(admin, [t.name for t in wanted], timeout_s)
    return topics


def _wait_for_topics(admin: Admin, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = admin.metadata(timeout_s)
        if all(
            n in md.topics
            and md.topics[n].error is None
            and all(p.leader >= 0 for p in md.topics[n].partitions.values())
            for n in names
        ):
            return
        time.sleep(0.05)
    # an election that outlasts us: a later start may find leaders (retriable)
    raise KafkaUnavailableError(
        f"topics {names} have no leader after {timeout_s}s; check the brokers"
    )
