"""librdkafka settings of every Kafka client lowmark makes, one builder per role.

Each builder starts from the settings every client shares (``KafkaConnection.librdkafka()``:
bootstrap servers, TLS/SASL, client id) and adds what its role needs. Every key that
differs from librdkafka's default says why. The roles:

- ``InterceptorSettings``: the transactional producer of records + progress, and the
  follower of published cuts (sync acknowledgements);
- ``WatermarkSettings``: the progress reader, the watermark publisher, the fencer of a
  silent member, the standby's watch, and the producer of FENCE records and dead letters;
- ``ApplierSettings``: the readers of the log and the watermark topic, the producer of
  checkpoints and dead letters;
- ``MarkerSettings``: the coordinator's and the interceptors' steps of a marker;
- ``TopologySettings``: the one transactional writer of a CG's roles and the reader of
  ``lowmark.config``;
- ``ToolSettings``: short reads by start-up code and the operator tools (status, restore,
  replay, tail, verify) and the admin client.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from connectors.kafka.config import KafkaConnection

Settings = dict[str, Any]


class _Role:
    def __init__(self, connection: KafkaConnection | Mapping[str, Any]) -> None:
        #: the shared settings (``KafkaConnection.librdkafka()``), never mutated
        self.base: Settings = (
            connection.librdkafka() if isinstance(connection, KafkaConnection) else dict(connection)
        )

    def admin(self) -> Settings:
        return dict(self.base)

    def _reader(self, group: str) -> Settings:
        return {
            **self.base,
            "group.id": group,
            # the checkpoint (or the caller) is the truth about positions, never the group
            "enable.auto.commit": False,
            # an aborted transaction (a fenced instance, a retried commit) is never data
            "isolation.level": "read_committed",
        }


class InterceptorSettings(_Role):
    def producer(self, transactional_id: str, compression: str) -> Settings:
        return {
            **self.base,
            # fencing: a newer instance with this id aborts and locks out this one
            "transactional.id": transactional_id,
            "enable.idempotence": True,  # no duplicates or reordering on retries
            "acks": "all",  # durable = on every in-sync replica
            # per-volume order needs one partition per volume, chosen like Java does
            "partitioner": "murmur2_random",
            "compression.type": compression,
            "linger.ms": 2,  # a tick produces in a burst; commit flushes anyway
            "batch.size": 1_000_000,
            # records never time out locally while Kafka is away: a timed-out record
            # makes the transaction abortable mid-commit, and aborting a commit already
            # in progress is a fatal INVALID_TXN_STATE. Sync writes still fail after
            # replication_timeout_s (they wait on their ticket); the rest waits, bounded
            # by max_unreplicated_bytes. A dead interceptor's open transaction is aborted
            # sooner than this by the watermark service's fencing.
            "message.timeout.ms": 300_000,
            "transaction.timeout.ms": 300_000,
        }

    def cuts_consumer(self) -> Settings:
        return {
            # its own group: it only reads (offsets are never committed or stored)
            **self._reader(f"lowmark-cuts-{uuid.uuid4().hex[:8]}"),
            "enable.auto.offset.store": False,
            # every millisecond here is added to every sync write's latency
            "fetch.wait.max.ms": 5,
        }


class MarkerSettings(_Role):
    """The coordination of markers through ``lowmark.<cg>.control`` (both sides)."""

    def control_consumer(self) -> Settings:
        return {
            # its own group: it reads live from the end, never commits
            **self._reader(f"lowmark-control-{uuid.uuid4().hex[:8]}"),
            # steps are plain (non-transactional) records: a fetch returns the moment
            # one arrives, whatever fetch.wait.max.ms says
            "isolation.level": "read_uncommitted",
            # a step is a few hundred bytes: Nagle would hold the next fetch request back
            "socket.nagle.disable": True,
        }

    def control_producer(self) -> Settings:
        return {
            **self.base,
            "enable.idempotence": True,
            "acks": "all",
            # every millisecond of a step's trip is added to the hold of every write
            "linger.ms": 0,
            "socket.nagle.disable": True,
        }


class WatermarkSettings(_Role):
    def __init__(self, connection: KafkaConnection | Mapping[str, Any], cg: str) -> None:
        super().__init__(connection)
        self.cg = cg

    def progress_consumer(self) -> Settings:
        return {
            **self._reader(f"lowmark.{self.cg}.watermark"),
            # the fold must know when it has read everything committed so far
            "enable.partition.eof": True,
            # a read_committed fetch may wait out fetch.wait.max.ms (500 ms) although the
            # transaction committed; progress is tiny, so ask often: this bounds W's lag
            "fetch.wait.max.ms": 5,
        }

    def standby_consumer(self) -> Settings:
        return self._reader(f"lowmark.{self.cg}.watermark.standby")

    def producer(self) -> Settings:
        """FENCE progress records and dead-letter copies."""
        return {
            **self.base,
            "enable.idempotence": True,  # a retried FENCE is not written twice
            "acks": "all",  # a FENCE the fold acts on must survive a broker loss
            "linger.ms": 0,  # a FENCE unblocks W: send it at once
        }

    def publisher_producer(self, transactional_id: str) -> Settings:
        return {
            **self.base,
            # fences every other instance: one writer, so W never goes down in the topic
            "transactional.id": transactional_id,
            "enable.idempotence": True,
            "acks": "all",
            # a W is tiny and every microsecond of delay is RPO
            "linger.ms": 0,
            # a transaction of ours that hangs must not keep the LSO (and so every
            # read_committed consumer of the topic) back for long
            "transaction.timeout.ms": 60_000,
        }

    def fencer_producer(self, transactional_id: str) -> Settings:
        # init_transactions with a silent member's id aborts its open transaction and
        # locks it out; the producer sends nothing
        return {**self.base, "transactional.id": transactional_id}


class ApplierSettings(_Role):
    def __init__(self, connection: KafkaConnection | Mapping[str, Any], cg: str, site: str) -> None:
        super().__init__(connection)
        self.group = f"lowmark.{cg}.apply.{site}"

    def _consumer(self, group: str) -> Settings:
        return {
            **self._reader(group),
            # an EOF proves every committed record below it was read (note_position)
            "enable.partition.eof": True,
            "fetch.max.bytes": 64 << 20,  # large writes: fewer round trips
            # librdkafka's prefetch queue is memory outside max_pending_bytes: 64 MiB by
            # default; 16 MiB kept a catch-up above 10x ingest (bench/fleet) and the peak
            # RSS of a site catching up ~50 MiB lower
            "queued.max.messages.kbytes": 16 << 10,
            # see the watermark service: without it a committed record can wait 500 ms
            "fetch.wait.max.ms": 5,
        }

    def log_consumer(self) -> Settings:
        # a position retention deleted must stop the site, never jump to the log's end
        # (librdkafka's default) past records it needs
        return {**self._consumer(self.group), "auto.offset.reset": "error"}

    def watermark_consumer(self) -> Settings:
        # compacted: any W read is as good as the ones compaction removed before it
        return {**self._consumer(self.group + ".wm"), "auto.offset.reset": "earliest"}

    def producer(self) -> Settings:
        """Checkpoints and dead-letter copies."""
        return {
            **self.base,
            "enable.idempotence": True,  # a retried checkpoint is not written twice
            "acks": "all",  # a checkpoint must survive a broker loss
        }


class TopologySettings(_Role):
    def entries_producer(self) -> Settings:
        """Volume and site entries: one writer per key (the primary for its volumes, a
        site's service for its site), the newest wins by its own fields, not by order."""
        return {
            **self.base,
            "enable.idempotence": True,  # a retried send is not written twice
            "acks": "all",  # the model must survive a broker loss
            "linger.ms": 5,
        }

    def roles_producer(self, transactional_id: str) -> Settings:
        return {
            **self.base,
            # one writer per CG: taking the id fences a concurrent writer and aborts what
            # it left open, so a role change is compare-and-set on what is committed
            "transactional.id": transactional_id,
            "enable.idempotence": True,  # a retried send is not written twice
            "acks": "all",  # a role change must survive a broker loss
            "linger.ms": 0,  # one tiny record per change: send it at once
            # a writer that died mid-change holds back the LSO of lowmark.config (every
            # read_committed reader of roles) until the next writer fences it or this
            # passes: half the default 60 s, as a change is one record
            "transaction.timeout.ms": 30_000,
        }

    def reader(self) -> Settings:
        """A bounded read of ``lowmark.config``."""
        return {
            # a group of its own: no offsets are ever committed
            **self._reader(f"lowmark-config-{uuid.uuid4().hex[:8]}"),
            # the read stops at the end of what is committed
            "enable.partition.eof": True,
            # a topic that ends in a transaction marker says so (EOF) only once a fetch
            # returns: waiting the default 500 ms for more data there is pure latency
            "fetch.wait.max.ms": 10,
        }


class ToolSettings(_Role):
    def reader(self) -> Settings:
        """A short read of one topic (``connectors.kafka.reading``)."""
        return {
            # a group of its own: no offsets are ever committed
            **self._reader(f"lowmark-reader-{uuid.uuid4().hex[:8]}"),
            # the reader stops at the end
            "enable.partition.eof": True,
            # as for lowmark.config: the EOF after a transaction marker comes with a fetch
            "fetch.wait.max.ms": 10,
        }

    def log_reader(self, auto_offset_reset: str = "error") -> Settings:
        """Restore, replay, verify and tail: the CG's log, maybe many partitions."""
        return {
            **self._reader(f"lowmark-replay-{uuid.uuid4().hex[:8]}"),
            "enable.partition.eof": True,
            # a start offset that retention deleted must fail loudly, never skip records
            "auto.offset.reset": auto_offset_reset,
            # a partition at its end must not hold up the others for the default 500 ms
            "fetch.wait.max.ms": 50,
            # a backlog is read in bulk: 1 MiB per partition and fetch is the default, and
            # 16 MiB read 1 GiB of log in 1.6 s instead of 2.5 s on a 2-core machine
            "max.partition.fetch.bytes": 16 << 20,
            "fetch.max.bytes": 128 << 20,
        }

    def follower(self) -> Settings:
        """A migration target following the CG's log until its cutover."""
        return {
            **self.log_reader(),
            # the cutover's I/O pause waits for the follower to reach the log's end: a
            # fetch that waits 50 ms for more data at an idle partition is 50 ms of pause
            "fetch.wait.max.ms": 5,
        }
