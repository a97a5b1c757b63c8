"""The watermark service: fold the progress log into W and publish it.

W itself is computed by the pure ``WatermarkState`` (deterministic: the same progress log
gives the same W on every instance). This module is the I/O around it:

- resume from the latest published Watermark record (it carries the member table and the
  progress offset it was computed through), then read the progress topic from there;
- after folding, when W moved, read the log's high watermarks and publish
  ``Watermark(w, log_offsets, ...)``. Every record with ts <= W was committed together with
  (or before) the progress that raised W, so it lies below those offsets;
- fence members that are silent for ``liveness_timeout_s``: first through Kafka
  (``init_transactions`` with their transactional.id, which aborts their open transaction
  and locks them out), only then append a FENCE record so the fold drops them.

Several instances may run at once; a lower W than one already published is never written.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, IsolationLevel, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from connectors.kafka.reading import latest
from connectors.kafka.topics import CgTopics, ensure_topics
from pipeline.clock import ts_physical_us, wall_us
from pipeline.errors import ConfigError, KafkaUnavailableError, LowmarkError, WatermarkError
from pipeline.logs import event
from pipeline.watermark import WatermarkState
from schemas import codec

log = logging.getLogger("lowmark.watermark")


@dataclass(frozen=True)
class WatermarkServiceConfig:
    cg: str
    liveness_timeout_s: float = 10.0
    #: the longest W waits before it is published once it moved
    max_publish_delay_s: float = 0.002
    #: republish an unchanged W this often so new consumers and RPO readers see it fresh
    heartbeat_s: float = 1.0
    log_partitions: int = 4
    replication_factor: int | None = None

    def validate(self) -> WatermarkServiceConfig:
        if self.liveness_timeout_s < 0.5:
            raise ConfigError("liveness_timeout_s below 0.5 s would fence healthy interceptors")
        return self


@dataclass
class WatermarkStats:
    published: int = 0
    fenced: int = 0
    events: int = 0
    ignored: int = 0
    last_publish_us: int = 0
    ignored_reasons: dict[str, int] = field(default_factory=dict)


def decode_watermark(value: bytes) -> dict[str, Any]:
    return codec.decode(value, "Watermark").record


def newer_watermark(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["w"], a["progress_offset"]) > (b["w"], b["progress_offset"])


class WatermarkService:
    def __init__(self, config: WatermarkServiceConfig, kafka_conf: dict[str, Any]) -> None:
        self.config = config.validate()
        self.kafka_conf = dict(kafka_conf)
        self.topics = CgTopics(config.cg)
        self.state = WatermarkState()
        self.stats = WatermarkStats()
        self.published_w = -1
        self._last_seen: dict[str, float] = {}  # interceptor -> monotonic time of last event
        self._fencing: set[tuple[str, int]] = set()
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None
        self._dirty_since: float | None = None
        self._last_publish = 0.0
        self._started = time.monotonic()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        ensure_topics(
            self.kafka_conf,
            self.config.cg,
            log_partitions=self.config.log_partitions,
            replication_factor=self.config.replication_factor,
        )
        best = latest(self.kafka_conf, self.topics.watermark, decode_watermark, newer_watermark)
        if best is not None:
            self.state = WatermarkState.from_snapshot(best[0])
            self.published_w = best[0]["w"]
        now = time.monotonic()
        for member in self.state.members:
            self._last_seen[member] = now  # a resumed service gives everyone a full timeout
        base = {
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            # a read_committed fetch may wait out fetch.wait.max.ms (500 ms) although the
            # transaction committed; progress is tiny, so ask often: this bounds W's lag
            "fetch.wait.max.ms": 5,
        }
        self._consumer = Consumer(
            {**self.kafka_conf, **base, "group.id": f"lowmark.{self.config.cg}.watermark"}
        )
        self._consumer.assign(
            [TopicPartition(self.topics.progress, 0, self.state.progress_offset + 1)]
        )
        # W's log offsets are high watermarks, not last stable offsets: Kafka writes a
        # transaction's commit markers partition by partition, so the progress record can be
        # visible while a log partition's LSO still stops below the same transaction's
        # records. Every record of a committed transaction is below the high watermark.
        self._admin = AdminClient(dict(self.kafka_conf))
        self._producer = Producer(
            {**self.kafka_conf, "enable.idempotence": True, "acks": "all", "linger.ms": 0}
        )
        event(
            log,
            "watermark service started",
            cg=self.config.cg,
            w=self.state.w,
            progress_offset=self.state.progress_offset,
            members=len(self.state.members),
        )

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
        if self._producer is not None:
            self._producer.flush(5)
        self._consumer = self._producer = self._admin = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step(0.05)

    # ---------------------------------------------------------------- one step

    def step(self, poll_timeout_s: float = 0.05) -> None:
        """Fold what the progress log has, publish W if it moved, fence the silent."""
        assert self._consumer is not None
        # block only until the first record: consume(n, timeout) waits the whole timeout
        # unless n records arrive, which put ~50 ms between S and W
        first = self._consumer.poll(poll_timeout_s)
        msgs = [] if first is None else [first, *self._consumer.consume(1000, 0)]
        now = time.monotonic()
        for msg in msgs:
            if msg.error():
                if msg.error().retriable() or msg.error().code() == -191:
                    continue
                raise KafkaUnavailableError(f"reading {self.topics.progress}: {msg.error()}")
            self._fold(msg, now)
        w_moved = self.state.w > self.published_w
        if w_moved and self._dirty_since is None:
            self._dirty_since = now
        due = self._dirty_since is not None and (
            not msgs or now - self._dirty_since >= self.config.max_publish_delay_s
        )
        if due or (now - self._last_publish >= self.config.heartbeat_s and self.published_w >= 0):
            self._publish()
        self._fence_silent(now)

    def _fold(self, msg: Any, now: float) -> None:
        try:
            rec = codec.decode(msg.value(), "Progress").record
        except LowmarkError as exc:
            # a bad progress record can only hold W back, never move it: skip and say so
            event(
                log,
                "unreadable progress record skipped",
                level=logging.ERROR,
                offset=msg.offset(),
                error=str(exc),
            )
            self.stats.ignored += 1
            return
        ev = dict(rec)
        if ev["kind"] == "JOIN":
            ev["epoch"] = msg.offset()  # an interceptor's epoch is its JOIN's offset
        outcome = self.state.apply(ev, msg.offset())
        self.stats.events += 1
        if getattr(outcome, "accepted", True):
            self._last_seen[ev["interceptor_id"]] = now
        else:
            reason = getattr(outcome, "reason", "ignored")
            self.stats.ignored += 1
            self.stats.ignored_reasons[reason] = self.stats.ignored_reasons.get(reason, 0) + 1
        if ev["kind"] in ("LEAVE", "FENCE"):
            self._last_seen.pop(ev["interceptor_id"], None)

    def _log_end_offsets(self) -> list[dict[str, int]]:
        """Every log partition's high watermark, in one ListOffsets request."""
        assert self._admin is not None
        request = {
            TopicPartition(self.topics.log, p): OffsetSpec.latest()
            for p in range(self.config.log_partitions)
        }
        deadline = time.monotonic() + 30
        while True:
            try:
                futures = self._admin.list_offsets(
                    request, isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=10
                )
                return [
                    {"partition": tp.partition, "offset": fut.result().offset}
                    for tp, fut in sorted(futures.items(), key=lambda kv: kv[0].partition)
                ]
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise KafkaUnavailableError(
                        f"cannot read the end offsets of {self.topics.log}: {exc.args[0]}"
                    ) from None
                time.sleep(0.05)

    def _publish(self) -> None:
        assert self._producer is not None
        w = self.state.w
        if w < self.published_w:  # pragma: no cover - WatermarkState already asserts this
            raise WatermarkError(f"W would decrease from {self.published_w} to {w}")
        snap = self.state.snapshot()
        rec = {
            "cg": self.config.cg,
            "w": w,
            "log_offsets": self._log_end_offsets(),
            "progress_offset": snap["progress_offset"],
            "max_s": snap["max_s"],
            "members": snap["members"],
            "departed": snap["departed"],
            "published_us": wall_us(),
        }
        value = codec.encode("Watermark", rec)
        self._producer.produce(
            self.topics.watermark,
            value,
            self.config.cg,
            headers=codec.headers_for("Watermark", rec),
        )
        self._producer.poll(0)
        self.published_w = w
        self._dirty_since = None
        self._last_publish = time.monotonic()
        self.stats.published += 1
        self.stats.last_publish_us = rec["published_us"]

    # ---------------------------------------------------------------- fencing

    def _fence_silent(self, now: float) -> None:
        timeout = self.config.liveness_timeout_s
        for member_id, member in list(self.state.members.items()):
            seen = self._last_seen.get(member_id, self._started)
            if now - seen < timeout or (member_id, member.epoch) in self._fencing:
                continue
            self._fence(member_id, member.epoch, member.s, now - seen)

    def _fence(self, interceptor_id: str, epoch: int, s: int, silent_s: float) -> None:
        """Lock the interceptor out through Kafka, then record the FENCE in the progress log."""
        self._fencing.add((interceptor_id, epoch))
        event(
            log,
            "fencing silent interceptor",
            level=logging.WARNING,
            interceptor=interceptor_id,
            epoch=epoch,
            s=s,
            silent_s=round(silent_s, 3),
        )
        fencer = Producer(
            {**self.kafka_conf, "transactional.id": self.topics.transactional_id(interceptor_id)}
        )
        try:
            fencer.init_transactions(30)
        except KafkaException as exc:
            self._fencing.discard((interceptor_id, epoch))
            event(
                log,
                "fencing failed; will retry",
                level=logging.ERROR,
                interceptor=interceptor_id,
                error=str(exc),
            )
            return
        finally:
            fencer.flush(1)
        rec = {
            "interceptor_id": interceptor_id,
            "epoch": epoch,
            "kind": "FENCE",
            "s": s,
            "partition_offsets": [],
            "wall_us": wall_us(),
        }
        assert self._producer is not None
        self._producer.produce(
            self.topics.progress,
            codec.encode("Progress", rec),
            interceptor_id,
            headers=codec.headers_for("Progress", rec),
        )
        self._producer.flush(30)
        self.stats.fenced += 1

    # ---------------------------------------------------------------- numbers

    def metrics(self) -> dict[str, Any]:
        w = self.state.w
        return {
            "w": w,
            "published_w": self.published_w,
            "rpo_s": (wall_us() - ts_physical_us(w)) / 1e6 if w > 0 else None,
            "members": len(self.state.members),
            "max_s": self.state.max_s,
            "progress_offset": self.state.progress_offset,
            "published": self.stats.published,
            "fenced": self.stats.fenced,
            "events": self.stats.events,
            "ignored": self.stats.ignored,
        }
