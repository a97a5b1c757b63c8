"""Topic names of a consistency group and their creation; the shared config topic.

See docs/ARCHITECTURE.md for why each topic is shaped the way it is (the progress topic
has one partition so the watermark is a deterministic fold of a total order).

Generations are separate topics: generation 0 keeps the names a CG always had
(``lowmark.<cg>.log``, ...), generation g >= 1 uses ``lowmark.<cg>.g<g>.log``, ... and
transactional ids scoped the same way, so an old primary can only ever write into its own
generation's topics, which no applier of a newer generation reads. A CG name has no '.',
so no generation's names can be another CG's.

``lowmark.config`` (one partition, compacted) holds what is not one CG's data, such as
the roles of every CG (key ``roles/<cg>``, written by ``pipeline.topology.store``) and
the topology (``volume/<cg>/<id>``, ``site/<cg>/<site>``: ``pipeline.topology.catalog``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

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


#: the shared, compacted config topic (roles of every CG, ...)
CONFIG_TOPIC = "lowmark.config"


def roles_key(cg: str) -> str:
    """The key of a CG's roles in ``CONFIG_TOPIC`` (compaction keeps the latest per key)."""
    return f"roles/{cg}"


def volume_key(cg: str, volume_id: str) -> str:
    """A volume of a CG as its primary describes it (``VolumeEntry``)."""
    return f"volume/{cg}/{volume_id}"


def site_key(cg: str, site: str) -> str:
    """A site of a CG as its service registered it (``SiteEntry``)."""
    return f"site/{cg}/{site}"


def roles_transactional_id(cg: str) -> str:
    """The one writer of a CG's roles: taking this id fences any concurrent writer. Not
    generation-scoped: it is what decides which generation comes next."""
    return f"{CONFIG_TOPIC}.roles.{cg}"


#: the latest W of a watermark topic is among its last this many records: one publisher
#: at a time commits, and W never goes down (read_committed skips a fenced one's aborts)
WATERMARK_TAIL = 64
#: the control topic's steps matter for seconds; a day keeps them for `kcat` and audits
CONTROL_RETENTION = {"retention.ms": str(24 * 3600 * 1000)}


@dataclass(frozen=True)
class CgTopics:
    """The topics and transactional ids of one generation of a CG (default: generation 0,
    the names every CG had before generations existed)."""

    cg: str
    generation: int = 0

    def __post_init__(self) -> None:
        g = self.generation
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ConfigError(f"generation must be an integer >= 0, got {g!r}")

    @property
    def prefix(self) -> str:
        """``lowmark.<cg>`` for generation 0, ``lowmark.<cg>.g<g>`` after it."""
        g = self.generation
        return f"lowmark.{self.cg}.g{g}" if g else f"lowmark.{self.cg}"

    @property
    def log(self) -> str:
        return f"{self.prefix}.log"

    @property
    def progress(self) -> str:
        return f"{self.prefix}.progress"

    @property
    def watermark(self) -> str:
        return f"{self.prefix}.watermark"

    @property
    def checkpoints(self) -> str:
        return f"{self.prefix}.checkpoints"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def control(self) -> str:
        """Coordination steps (markers): read live, kept a day for inspection."""
        return f"{self.prefix}.control"

    def transactional_id(self, interceptor_id: str) -> str:
        return f"{self.prefix}.interceptor.{interceptor_id}"

    def watermark_transactional_id(self) -> str:
        """Shared by every watermark service instance of the CG: one publisher at a time."""
        return f"{self.prefix}.watermark-publisher"


def ensure_topics(
    conf: dict[str, str],
    cg: str,
    *,
    log_partitions: int = 4,
    replication_factor: int | None = None,
    timeout_s: float = 30.0,
    generation: int = 0,
) -> CgTopics:
    """Create the topics of the CG's ``generation`` if missing; existing ones are left as
    they are."""
    topics = CgTopics(check_cg_name(cg), generation)
    admin = Admin(conf)
    md = admin.metadata(timeout_s)
    rf, min_isr = _replication(md, replication_factor)
    compacted = {"cleanup.policy": "compact", "min.insync.replicas": min_isr}
    wanted = [
        TopicSpec(topics.log, log_partitions, rf, {"min.insync.replicas": min_isr}),
        TopicSpec(topics.progress, 1, rf, {"min.insync.replicas": min_isr}),
        TopicSpec(topics.watermark, 1, rf, compacted),
        TopicSpec(topics.checkpoints, 1, rf, compacted),
        TopicSpec(topics.deadletter, 1, rf, {"min.insync.replicas": min_isr}),
        TopicSpec(topics.control, 1, rf, {"min.insync.replicas": min_isr, **CONTROL_RETENTION}),
    ]
    admin.create_topics([t for t in wanted if t.name not in md.topics], timeout_s)
    # another process may have created them a moment ago: wait for leaders either way
    _wait_for_topics(admin, [t.name for t in wanted], timeout_s)
    return topics


def ensure_config_topic(
    conf: dict[str, str], *, replication_factor: int | None = None, timeout_s: float = 30.0
) -> str:
    """Create ``lowmark.config`` if missing (one partition: one order of every change;
    compacted: the latest record per key is kept forever); returns its name."""
    admin = Admin(conf)
    md = admin.metadata(timeout_s)
    rf, min_isr = _replication(md, replication_factor)
    spec = TopicSpec(
        CONFIG_TOPIC, 1, rf, {"cleanup.policy": "compact", "min.insync.replicas": min_isr}
    )
    admin.create_topics([spec] if CONFIG_TOPIC not in md.topics else [], timeout_s)
    _wait_for_topics(admin, [CONFIG_TOPIC], timeout_s)
    return CONFIG_TOPIC


def _replication(md: Any, replication_factor: int | None) -> tuple[int, str]:
    """The replication factor (default: 3, or every broker of a smaller cluster) and the
    min.insync.replicas that goes with it."""
    rf = replication_factor or min(3, len(md.brokers))
    return rf, "2" if rf >= 3 else "1"


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
