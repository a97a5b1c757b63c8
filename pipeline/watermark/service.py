"""The watermark service: fold the progress log into W and publish it.

W itself is computed by the pure ``WatermarkState`` (deterministic: the same progress log
gives the same W on every instance). This module is the I/O around it:

- take the CG's watermark publisher (``WatermarkPublisher``: one transactional.id, so one
  writer at a time), read the highest committed W as the floor and resume from it (it
  carries the member table and the progress offset it was computed through), then read
  the progress topic from there;
- after folding, when W moved, read the log's high watermarks and publish
  ``Watermark(w, log_offsets, ...)`` in its own transaction. Every record with ts <= W was
  committed together with (or before) the progress that raised W, so it lies below those
  offsets. A W below the floor is never published;
- fence members that are silent for ``liveness_timeout_s`` (``WatermarkState.silent_members``):
  first through Kafka (``init_transactions`` with their transactional.id, which aborts
  their open transaction and locks them out), only then append a FENCE record so the fold
  drops them. Silence is counted from the last moment the service saw the cluster unable
  to take writes (an election is not the member's fault): that rule, too, is
  ``WatermarkState``'s (``silences``); this module only keeps the times, on its injected
  ``TimeSource``.

Each generation of the CG (``WatermarkServiceConfig.generation``; ``CgTopics(cg,
generation)``) has its own progress, watermark and publisher id: a service folds one
generation. ``pipeline.watermark.generations`` moves on to the next one when the roles do.

Several instances may run at once. The one that started (or took over) last publishes; a
fenced one stands by, keeps folding, and takes over when no W has been committed for
``takeover_after_s``. A W lower than one already committed is never written.

Faults: a log partition without a leader (an election) holds W where it is, with a log
line and ``publish_failures``; the service never exits on it and never publishes an offset
it could not read. A progress record that does not decode stops the fold at its offset
(W frozen; a dead-letter copy; ``halted`` in the metrics) until an operator skips it with
``lowmark watermark --skip-progress OFFSET``: skipping a JOIN blindly could let W pass a
member it never saw.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka.admin import Admin
from connectors.kafka.config import cluster_tried
from connectors.kafka.consumer import END, Consumer
from connectors.kafka.deadletter import deadletter_headers
from connectors.kafka.errors import PARTITION_EOF, as_error
from connectors.kafka.producer import Producer
from connectors.kafka.settings import WatermarkSettings
from connectors.kafka.topics import CgTopics, ensure_topics
from pipeline.errors import (
    ConfigError,
    KafkaError,
    KafkaUnavailableError,
    LowmarkError,
    WatermarkError,
    WatermarkHaltedError,
)
from pipeline.fault_streak import FaultStreak
from pipeline.logs import event
from pipeline.timesource import REAL_TIME, TimeSource
from pipeline.watermark.publisher import (
    PublisherTimeouts,
    WatermarkPublisher,
    decode_watermark,
    may_publish,
    newer_watermark,
    resume_from_floor,
)
from pipeline.watermark.state import WatermarkState
from schemas import codec
from schemas.records import Hold, Progress, ProgressKind
from schemas.ts import ts_physical_us

log = logging.getLogger("lowmark.watermark")

__all__ = ["WatermarkService", "WatermarkServiceConfig", "decode_watermark", "newer_watermark"]


@dataclass(frozen=True)
class WatermarkServiceConfig:
    cg: str
    liveness_timeout_s: float = 10.0
    #: the longest W waits before it is published once it moved
    max_publish_delay_s: float = 0.002
    #: republish an unchanged W this often so new consumers and RPO readers see it fresh
    heartbeat_s: float = 1.0
    #: a standby instance takes over when no W was committed for this long
    takeover_after_s: float = 3.0
    #: the longest wait between two tries while Kafka is in trouble (doubling from 50 ms)
    retry_max_s: float = 2.0
    #: the ListOffsets request for the log's end offsets
    list_offsets_timeout_s: float = 2.0
    log_partitions: int = 4
    replication_factor: int | None = None
    #: offsets of undecodable progress records the operator chose to skip (logged)
    skip_progress: frozenset[int] = frozenset()
    #: the CG generation whose progress is folded and whose W is published
    generation: int = 0
    publisher: PublisherTimeouts = field(default_factory=PublisherTimeouts)

    def validate(self) -> WatermarkServiceConfig:
        if self.liveness_timeout_s < 0.5:
            raise ConfigError("liveness_timeout_s below 0.5 s would fence healthy interceptors")
        if self.takeover_after_s <= 2 * self.heartbeat_s:
            raise ConfigError(
                f"takeover_after_s ({self.takeover_after_s}) must exceed twice heartbeat_s "
                f"({self.heartbeat_s}), or standby instances take over from a healthy one"
            )
        return self


@dataclass
class WatermarkStats:
    published: int = 0
    fenced: int = 0
    events: int = 0
    ignored: int = 0
    publish_failures: int = 0
    takeovers: int = 0
    last_publish_us: int = 0
    ignored_reasons: dict[str, int] = field(default_factory=dict)


class WatermarkService:
    def __init__(
        self,
        config: WatermarkServiceConfig,
        kafka_conf: dict[str, Any],
        time_source: TimeSource = REAL_TIME,
    ) -> None:
        self.config = config.validate()
        self.kafka_conf = dict(kafka_conf)
        self.topics = CgTopics(config.cg, config.generation)
        self.settings = WatermarkSettings(self.kafka_conf, config.cg)
        self.state = WatermarkState()
        self.stats = WatermarkStats()
        self.publisher = WatermarkPublisher(
            self.kafka_conf, config.cg, config.publisher, generation=config.generation
        )
        self.published_w = -1
        self.halted: WatermarkHaltedError | None = None
        # monotonic: publish delays, heartbeats, takeover, backoff, liveness; wall: records
        self._now = time_source.monotonic
        self._sleep = time_source.sleep
        self._wall_us = time_source.wall_us
        self._resumed = False
        self._last_seen: dict[str, int] = {}  # interceptor -> monotonic µs of last event
        self._fencing: set[tuple[str, int]] = set()
        self._consumer: Consumer | None = None
        self._watch: Consumer | None = None  # standby: the active instance's commits
        self._admin: Admin | None = None
        self._producer: Producer | None = None
        self._dirty_since: float | None = None
        self._last_publish = 0.0
        self._active_seen = 0.0
        self._retry_at = 0.0
        self._backoff_s = 0.0
        self._trouble_since: float | None = None
        self._streak = FaultStreak(self._now, remind_s=10.0)
        self._tried = cluster_tried(self.kafka_conf)
        self._last_trouble = -1e18
        self._started = self._now()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        ensure_topics(
            self.kafka_conf,
            self.config.cg,
            log_partitions=self.config.log_partitions,
            replication_factor=self.config.replication_factor,
            generation=self.config.generation,
        )
        self._consumer = Consumer(self.settings.progress_consumer())
        # W's log offsets are high watermarks, not last stable offsets: Kafka writes a
        # transaction's commit markers partition by partition, so the progress record can be
        # visible while a log partition's LSO still stops below the same transaction's
        # records. Every record of a committed transaction is below the high watermark.
        self._admin = Admin(self.settings.admin())
        self._producer = Producer(self.settings.producer())
        self._take_over(self._now())  # may fail on a sick cluster: step() retries it

    def close(self) -> None:
        for c in (self._consumer, self._watch):
            if c is not None:
                c.close()
        if self._producer is not None:
            self._producer.flush(5)
        self.publisher.release()
        self._consumer = self._watch = self._producer = self._admin = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step(0.05)

    # ---------------------------------------------------------------- one step

    def step(self, poll_timeout_s: float = 0.05) -> None:
        """Fold what the progress log has, publish W if it moved, fence the silent."""
        now = self._now()
        if not self.publisher.active:
            if not self._resumed or now - self._active_seen >= self.config.takeover_after_s:
                if now < self._retry_at:
                    self._sleep(min(poll_timeout_s, self._retry_at - now))
                    return
                self._take_over(now)
            if not self._resumed:
                return
        msgs = self._poll_progress(poll_timeout_s)
        now = self._now()
        for msg in msgs:
            err = msg.error()
            if err:
                if err.code() != PARTITION_EOF:
                    exc = as_error(err, f"reading {self.topics.progress}")
                    if not exc.retriable:
                        self._trouble(now, str(exc))
                continue
            if self.halted is not None:
                break
            self._fold(msg, now)
        if not self.publisher.active:
            self._watch_active(now)
            return
        w_moved = self.state.w > self.published_w
        if w_moved and self._dirty_since is None:
            self._dirty_since = now
        due = self._dirty_since is not None and (
            not msgs or now - self._dirty_since >= self.config.max_publish_delay_s
        )
        heartbeat = now - self._last_publish >= self.config.heartbeat_s and self.published_w >= 0
        if (due or heartbeat) and now >= self._retry_at:
            self._publish(now)
        if self.halted is None and self.publisher.active:
            self._fence_silent(now)

    def _poll_progress(self, timeout_s: float) -> list[Any]:
        assert self._consumer is not None
        # block only until the first record: consume(n, timeout) waits the whole timeout
        # unless n records arrive, which put ~50 ms between S and W
        first = self._consumer.poll(timeout_s)
        return [] if first is None else [first, *self._consumer.consume(1000, 0)]

    # ---------------------------------------------------------------- one publisher

    def _take_over(self, now: float) -> None:
        """Take the publisher (fencing any other instance), then resume from the floor."""
        try:
            floor = self.publisher.acquire()
        except LowmarkError as exc:
            self._trouble(now, str(exc))
            return
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._resumed:
            self.stats.takeovers += 1
        resumed = resume_from_floor(self.state if self._resumed else None, floor)
        if resumed is not None:
            self._resume(resumed)
        if floor is not None:
            self.published_w = max(self.published_w, floor.w)
        self._recovered(self._now())
        event(
            log,
            "watermark service active",
            cg=self.config.cg,
            generation=self.config.generation,
            w=self.state.w,
            floor_w=self.published_w,
            progress_offset=self.state.progress_offset,
            members=len(self.state.members),
        )

    def _resume(self, state: WatermarkState) -> None:
        assert self._consumer is not None
        self.state = state
        now_us = int(self._now() * 1e6)
        for member in self.state.members:
            # a resumed service gives everyone a full timeout
            self._last_seen.setdefault(member, now_us)
        start = self.state.progress_offset + 1
        if self._resumed:
            self._consumer.seek(self.topics.progress, 0, start)
        else:
            self._consumer.assign(self.topics.progress, {0: start})
        self._resumed = True

    def _watch_active(self, now: float) -> None:
        """Standby: note every W the active instance commits; take over when it stops."""
        if self._watch is None:
            self._watch = Consumer(self.settings.standby_consumer())
            self._watch.assign(self.topics.watermark, {0: END})
            self._active_seen = now
        for msg in self._watch.consume(100, 0):
            if not msg.error():
                self._active_seen = now
                # an unreadable W only means we know less about the floor
                with contextlib.suppress(LowmarkError):
                    self.published_w = max(self.published_w, decode_watermark(msg.value()).w)
        if now - self._active_seen >= self.config.takeover_after_s:
            event(
                log,
                "no W committed by the active instance; taking over",
                level=logging.WARNING,
                cg=self.config.cg,
                silent_s=round(now - self._active_seen, 3),
            )
            self._take_over(now)

    # ---------------------------------------------------------------- folding

    def _fold(self, msg: Any, now: float) -> None:
        try:
            rec = codec.decode(msg.value(), Progress)
        except LowmarkError as exc:
            if msg.offset() in self.config.skip_progress:
                event(
                    log,
                    "bad progress record skipped by operator",
                    level=logging.WARNING,
                    offset=msg.offset(),
                    error=str(exc),
                )
                self.stats.ignored += 1
                return
            self._halt(msg, exc)
            return
        holds = dict(self.state.holds)
        outcome = self.state.apply(rec, msg.offset())
        self.stats.events += 1
        if holds.keys() != self.state.holds.keys() or rec.kind is ProgressKind.LOST:
            self._log_holds(holds, rec)
        if outcome.accepted:
            self._last_seen[rec.interceptor_id] = int(now * 1e6)
        else:
            reason = str(outcome.reason)
            self.stats.ignored += 1
            self.stats.ignored_reasons[reason] = self.stats.ignored_reasons.get(reason, 0) + 1
        if rec.kind in (ProgressKind.LEAVE, ProgressKind.FENCE):
            self._last_seen.pop(rec.interceptor_id, None)

    def _log_holds(self, before: Mapping[tuple[str, int], Hold], rec: Progress) -> None:
        """Say when an ended instance's tail starts or stops holding W, and why."""
        now = self.state.holds
        for key in now.keys() - before.keys():
            h = now[key]
            event(log, "W is held: an interceptor ended without LEAVE and may have "
                "acknowledged async writes that never reached Kafka; restart it on its disk "
                "(it republishes them) or run `lowmark fence --declare-lost ID`",
                level=logging.WARNING, cg=self.config.cg, interceptor=h.interceptor_id,
                epoch=h.epoch, s=h.s, volumes=list(h.volumes))  # fmt: skip
        for key in before.keys() - now.keys():
            h = before[key]
            lost = rec.kind is ProgressKind.LOST
            event(log, "hold declared lost: W passes a tail nobody republished" if lost
                else "hold released: the tail was republished and W passed it",
                level=logging.WARNING if lost else logging.INFO, cg=self.config.cg,
                interceptor=h.interceptor_id, epoch=h.epoch, s=h.s, volumes=list(h.volumes),
                w=self.state.w)  # fmt: skip

    def _halt(self, msg: Any, exc: LowmarkError) -> None:
        """Freeze W at the bad progress record: it may be a JOIN W must not pass blindly."""
        assert self._producer is not None
        off = msg.offset()
        try:
            self._producer.produce(
                self.topics.deadletter,
                msg.value(),
                msg.key(),
                headers=deadletter_headers(self.topics.progress, 0, off, exc, "watermark"),
            )
            self._producer.flush(30)
        except KafkaError as dl:  # W freezes all the same; the record stays in the log
            event(log, "dead-letter copy not written", level=logging.ERROR, error=str(dl))
        self.halted = WatermarkHaltedError(
            f"CG {self.config.cg}: progress record {self.topics.progress}[0]@{off} is bad "
            f"({type(exc).__name__}: {exc}); W stays at {self.state.w} (RPO grows). A copy "
            f"is in {self.topics.deadletter}. Fix the writer, or skip it explicitly with "
            f"`lowmark watermark --skip-progress {off}` (logged)."
        )
        event(
            log,
            "bad progress record: W frozen, dead-letter copy written",
            level=logging.ERROR,
            offset=off,
            w=self.state.w,
            error=str(exc),
        )

    # ---------------------------------------------------------------- publishing

    def _log_end_offsets(self) -> dict[int, int]:
        """Every log partition's high watermark, in one ListOffsets request.

        A partition without a leader answers an error, or an offset below 0 (-1001 seen
        while a 3-node cluster elects): both are ``KafkaUnavailableError``, never an offset.
        """
        assert self._admin is not None
        parts = range(self.config.log_partitions)
        try:
            out = self._admin.end_offsets(
                self.topics.log, parts, self.config.list_offsets_timeout_s
            )
        except KafkaError as exc:
            # the admin client keeps asking the dead leader it has cached (seen for 30 s
            # after the election); a new client starts from fresh metadata
            self._admin = Admin(self.settings.admin())
            raise KafkaUnavailableError(f"{exc}; W waits", code=exc.code) from None
        return out

    def _publish(self, now: float) -> None:
        w = self.state.w
        if not may_publish(w, self.published_w):
            return  # behind the floor (a takeover): publish again once the fold caught up
        try:
            rec = self.state.watermark(self.config.cg, self._log_end_offsets(), self._wall_us())
            committed = self.publisher.publish(rec)
        except KafkaUnavailableError as exc:
            self.stats.publish_failures += 1
            self._trouble(now, str(exc))
            return
        if not committed:  # fenced: another instance publishes now
            self._active_seen = now
            return
        if not may_publish(w, self.published_w):  # pragma: no cover - guarded above
            raise WatermarkError(f"W would decrease from {self.published_w} to {w}")
        self.published_w = w
        self._dirty_since = None
        self._last_publish = now
        self.stats.published += 1
        self.stats.last_publish_us = rec.published_us
        self._recovered(now)

    # ---------------------------------------------------------------- faults

    def _trouble(self, now: float, why: str) -> None:
        """A passing Kafka fault: back off (doubling); said when it starts, when the error
        changes and every 10 s while it lasts (``FaultStreak``), with the cluster tried."""
        self._last_trouble = now
        self._backoff_s = min(self.config.retry_max_s, max(0.05, self._backoff_s * 2))
        self._retry_at = now + self._backoff_s
        if self._trouble_since is None:
            self._trouble_since = now
        said = self._streak.failed(why)
        if said is not None:
            event(log, "kafka trouble; W held, retrying", logging.WARNING, cg=self.config.cg,
                  retry_in_s=round(self._backoff_s, 3), tried=self._tried, **said)  # fmt: skip

    def _recovered(self, now: float) -> None:
        ended = self._streak.succeeded()
        if ended is not None:
            event(log, "kafka trouble over", cg=self.config.cg, **ended)
        self._trouble_since = None
        self._backoff_s = 0.0
        self._retry_at = 0.0

    # ---------------------------------------------------------------- fencing

    def _fence_silent(self, now: float) -> None:
        # silence counts from the later of the last report and the last Kafka trouble seen
        floor_us = int(max(self._started, self._last_trouble) * 1e6)
        now_us, timeout_us = int(now * 1e6), int(self.config.liveness_timeout_s * 1e6)
        quiet = self.state.silences(self._last_seen, now_us, not_before_us=floor_us)
        silent = self.state.silent_members(
            self._last_seen, now_us, timeout_us, not_before_us=floor_us
        )
        # a fence in flight for an instance that has since left the table is done with
        self._fencing &= {(m.interceptor_id, m.epoch) for m in self.state.members.values()}
        for member in silent:
            if (member.interceptor_id, member.epoch) in self._fencing:
                continue
            silent_s = quiet[member.interceptor_id] / 1e6
            self._fence(member.interceptor_id, member.epoch, member.s, silent_s)

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
            self.settings.fencer_producer(self.topics.transactional_id(interceptor_id))
        )
        try:
            fencer.init_transactions(30)
        except KafkaError as exc:
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
        rec = Progress(interceptor_id, epoch, ProgressKind.FENCE, s, {}, self._wall_us())
        assert self._producer is not None
        try:
            self._producer.produce(
                self.topics.progress,
                codec.encode(rec),
                interceptor_id,
                headers=codec.headers_for(rec),
            )
            undelivered = self._producer.flush(30)
        except KafkaError:
            undelivered = 1
        if undelivered > 0:
            # fenced in Kafka, but the fold does not know: W stays held until a retry lands it
            self._fencing.discard((interceptor_id, epoch))
            event(
                log,
                "FENCE record not delivered; will retry",
                level=logging.ERROR,
                interceptor=interceptor_id,
            )
            return
        self.stats.fenced += 1

    # ---------------------------------------------------------------- numbers

    def metrics(self) -> dict[str, Any]:
        w = self.state.w
        return {
            "generation": self.config.generation,
            "w": w,
            "published_w": self.published_w,
            "rpo_s": (self._wall_us() - ts_physical_us(w)) / 1e6 if w > 0 else None,
            "members": len(self.state.members),
            "max_s": self.state.max_s,
            "progress_offset": self.state.progress_offset,
            "published": self.stats.published,
            "fenced": self.stats.fenced,
            "events": self.stats.events,
            "ignored": self.stats.ignored,
            # 1 while this instance is the CG's publisher; 0 while it stands by
            "active": int(self.publisher.active),
            "takeovers": self.stats.takeovers,
            "publish_failures": self.stats.publish_failures,
            "kafka_trouble": int(self._trouble_since is not None),
            "halted": int(self.halted is not None),
            # per held (interceptor/volume): the S W may not pass until it is resolved
            "holds": len(self.state.holds),
            "held_at_s": {
                f"{h.interceptor_id}/{v}": h.s for h in self.state.holds.values() for v in h.volumes
            },
            "lost_declared": len(self.state.lost),
        }
