"""The interceptor's replication engine.

Volumes (``pipeline.primary.volume``) stamp each write with a ts and hand it here. A tick thread
turns everything stamped since the last tick into log records and, in the same Kafka
transaction, a PROGRESS record with S:

    every record of this interceptor with ts <= S is in this or an earlier committed
    transaction, and this interceptor never emits ts <= S again.

S is the clock's value at the tick, lowered below any ts that was stamped but whose record
is not yet in the outbox (its local write is still under way). Because records and
progress commit atomically, a committed S never promises a record that is not committed.

Promises to callers (see ``Ticket``):
- async mode: a write returns after the local write; ``Ticket.wait`` tells when it is
  durable in Kafka;
- sync mode: acknowledged once the write is inside a published cut: W >= ts (see
  ``pipeline.primary.cut_follower``; durable alone is not enough, another member may hold W back
  below it forever), or ``ReplicationError`` (never a silent ack);
- ``flush`` (and NBD FUA on async volumes): once every earlier record is durable in Kafka;
- backpressure: at most ``max_unreplicated_bytes`` wait for Kafka; beyond that writers
  block (and say so in the log) until Kafka takes them. Nothing acknowledged is dropped.
- fenced (a newer generation, ``generation_watch``; or its transactional id taken): no
  acknowledgement after that moment (``admit_ack``), ``FencedError`` to every caller.

Every PROGRESS names the async volumes served (``tail_volumes``): if this instance ends
without LEAVE, W holds at its S until a later instance republishes their dirty regions
and says so in a PROGRESS's ``resynced_volumes`` (``resynced``; ``watermark.state``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.settings import InterceptorSettings
from connectors.kafka.topics import CgTopics, ensure_topics
from pipeline.errors import (
    FencedError,
    KafkaError,
    LowmarkError,
    ReplicationError,
)
from pipeline.fault_streak import FaultStreak
from pipeline.logs import event
from pipeline.primary.clock import HybridClock
from pipeline.primary.cut_follower import CutFollower
from pipeline.primary.drain import drain
from pipeline.primary.engine_config import InterceptorConfig
from pipeline.primary.generation_watch import GenerationWatch
from pipeline.primary.joining import clock_floor
from pipeline.primary.outbox import (
    Entry,
    Message,
    Ticket,
    encode_batch,
    entry_bytes,
    progress_message,
)
from pipeline.timesource import REAL_TIME, TimeSource
from pipeline.watermark.state import JOIN_EPOCH_FROM_OFFSET, join_epoch
from schemas.records import CgRoles, LogRecord, Progress, ProgressKind

log = logging.getLogger("lowmark.interceptor")


class Interceptor:
    """One interceptor of a consistency group: clock, outbox, tick thread, producer."""

    def __init__(
        self,
        config: InterceptorConfig,
        kafka_conf: dict[str, Any],
        clock: HybridClock | None = None,
        time_source: TimeSource = REAL_TIME,
        roles_reader: Callable[[], CgRoles | None] | None = None,
    ) -> None:
        self.config = config.validate()
        #: every wait, deadline, backoff and wall-clock stamp of this engine reads this
        self.time_source = time_source
        self._txn_faults = FaultStreak(time_source.monotonic)
        self.kafka_conf = dict(kafka_conf)
        self.topics = CgTopics(config.cg, config.generation)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock or HybridClock(
            state_path=config.state_dir / f"clock.{config.interceptor_id}",
            # a restarted clock starts at the reserved bound and commit wait sleeps until
            # the wall clock reaches it: keep the reservation short (4 fsyncs/s)
            reserve_us=250_000,
            max_clock_skew_us=config.max_clock_skew_us,
            wall_us=time_source.wall_us,
            sleep=time_source.sleep,
        )
        # the JOIN carries the sentinel; the fold's rule turns it into the JOIN's offset
        self.epoch = JOIN_EPOCH_FROM_OFFSET
        self.failure: LowmarkError | None = None
        self.draining: LowmarkError | None = None  # a switchover's drain (``drain.py``)
        #: set once the roles named a newer generation (``generation_watch``)
        self.fenced_by_generation: FencedError | None = None
        #: writes acknowledged before that moment (none are after it)
        self.acks_before_fence: int | None = None
        self.durable_seq = 0
        self.last_s = 0
        #: the async volumes served, named in every JOIN/PROGRESS (set by the CG)
        self.tail_volumes: tuple[str, ...] = ()
        #: (seq, volumes): once seq is durable, the next PROGRESS says they are resynced
        self._resynced: tuple[int, tuple[str, ...]] | None = None
        # outbox state, all under _lock
        self._lock = threading.Lock()
        self._durable_cv = threading.Condition(self._lock)
        self._space_cv = threading.Condition(self._lock)
        self._outbox: list[Entry] = []
        self._outbox_bytes = 0
        self._unreplicated_bytes = 0
        self._inflight: dict[int, int] = {}  # token -> stamped ts whose entry is pending
        self._tokens = itertools.count(1)
        self._next_seq = 1
        self._waiters: list[tuple[int, int, Callable[[BaseException | None], None]]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._crashed = False  # crash(): no tick and no drain once set: nothing more goes out
        self._thread: threading.Thread | None = None
        self._producer: Producer | None = None
        self._delivered: dict[int, int] = {}  # log partition -> next offset after ours
        self._delivery_error: Any = None  # the last Kafka error seen (for messages)
        # sync acks wait for a cut; followed only once the CG has a sync volume
        self.cuts = CutFollower(
            self.kafka_conf, config.cg, generation=config.generation, now=time_source.monotonic
        )
        self.generation_watch = GenerationWatch.of(config, self.kafka_conf, self.fence,
            time_source.monotonic, roles_reader, on_drain=lambda r: drain(self, r))  # fmt: skip
        self.stats = {
            "ticks": 0, "transactions": 0, "records": 0, "bytes": 0, "txn_retries": 0,
            "acks": 0, "blocked_s": 0.0, "last_commit_ms": 0.0,
        }  # fmt: skip

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Refuse a superseded generation, fence older instances, join the CG, raise the
        clock floor, start ticking and watching the roles."""
        # a primary whose generation was replaced must not even join: nobody reads it
        self.generation_watch.check()
        if self.fenced_by_generation is not None:
            raise self.fenced_by_generation
        ensure_topics(
            self.kafka_conf,
            self.config.cg,
            log_partitions=self.config.log_partitions,
            replication_factor=self.config.replication_factor,
            generation=self.config.generation,
        )
        # the generation's base first: even the JOIN's S is above it, so no W of this
        # generation is below the cut it starts from
        self.clock.observe(self.config.clock_floor_us)
        for attempt in (1, 2):
            self._producer = Producer(self._producer_conf())
            try:
                self._producer.init_transactions(30)
                self.epoch = self._join()
                break
            except FencedError as exc:
                # the watermark service's liveness fence of our previous instance (same
                # transactional id) can land between our init and our JOIN: nothing of
                # ours is committed, so join again (a real newer instance wins either way)
                if attempt == 2 or self.generation_watch.check() or self.fenced_by_generation:
                    raise
                event(log, "fenced while joining; joining again", level=logging.WARNING,
                      interceptor=self.config.interceptor_id, error=str(exc))  # fmt: skip
            except KafkaError as exc:
                raise ReplicationError(
                    f"interceptor {self.config.interceptor_id}: cannot initialise Kafka "
                    f"transactions: {exc}; check the brokers and the transaction log topic"
                ) from None
        floor = clock_floor(self.kafka_conf, self.topics, self.epoch)
        self.clock.observe(max(floor, self.config.clock_floor_us))
        self._thread = threading.Thread(
            target=self._run, name=f"lowmark-tick-{self.config.interceptor_id}", daemon=True
        )
        self._thread.start()
        self.generation_watch.start()
        event(
            log,
            "interceptor joined",
            cg=self.config.cg,
            interceptor=self.config.interceptor_id,
            epoch=self.epoch,
            generation=self.config.generation,
        )

    def close(self, timeout_s: float = 30.0) -> None:
        """Publish everything stamped so far and a final LEAVE progress, then stop."""
        self.generation_watch.close()
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self._thread = None
        if self.failure is None and self._producer is not None:
            try:
                self._transaction([], self._progress(ProgressKind.LEAVE, self.last_s))
            except LowmarkError as exc:
                log.warning("could not publish LEAVE: %s", exc)
        if self._producer is not None:
            try:
                self._producer.flush(5)
            except LowmarkError:  # a fenced interceptor's last transaction: failure says it
                if self.failure is None:
                    raise
        self.cuts.close()
        event(log, "interceptor closed", interceptor=self.config.interceptor_id, s=self.last_s)

    def crash(self) -> None:
        """Stop without publishing anything more: a process that dies (tests), or an open
        that failed after the start (``ConsistencyGroup.open``)."""
        self.failure = self.failure or ReplicationError("interceptor crashed (simulated)")
        self._crashed = True
        self.generation_watch.close()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.cuts.close()

    @property
    def crashed(self) -> bool:
        return self._crashed

    def _producer_conf(self) -> dict[str, Any]:
        tid = self.topics.transactional_id(self.config.interceptor_id)
        return InterceptorSettings(self.kafka_conf).producer(tid, self.config.compression)

    # ---------------------------------------------------------------- join

    def _join(self) -> int:
        offsets: list[int] = []
        s = self.clock.now()

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                offsets.append(msg.offset())

        rec = self._progress(ProgressKind.JOIN, s)
        self._transaction([], rec, progress_cb=on_delivery)
        self._producer.poll(0)  # type: ignore[union-attr]
        if not offsets:
            raise ReplicationError("JOIN progress record was not delivered; check the brokers")
        return join_epoch(self.epoch, offsets[-1])  # as every reader of the JOIN folds it

    # ---------------------------------------------------------------- write path

    def stamp(self) -> tuple[int, int]:
        """(token, ts) for a local write about to take effect; the volume holds its lock.

        Until ``append`` or ``abandon`` of the token, no tick promises an S >= ts.
        """
        if self.failure is not None or self.draining is not None:
            raise self.failure or self.draining  # type: ignore[misc]
        with self._lock:
            ts = self.clock.now()
            token = next(self._tokens)
            self._inflight[token] = ts
        return token, ts

    def abandon(self, token: int) -> None:
        """The local write failed: forget its stamp, publish nothing for it."""
        with self._lock:
            self._inflight.pop(token, None)

    def append(self, token: int, volume_id: str, ts: int, offset: int, data: bytes) -> Ticket:
        """Queue the data of a local write that took effect with ``ts``."""
        return self._queue(token, Entry(0, volume_id, ts, offset, data))

    def append_record(self, token: int, record: LogRecord) -> Ticket:
        """Queue any other log record (a Zero, VolumeChange, Marker, ...) stamped by ``token``.

        It must carry this instance's interceptor id and epoch (``origin``): a record
        with another epoch would be judged against the wrong instance by every backup.
        """
        if (record.interceptor_id, record.epoch) != self.origin:
            raise ReplicationError(
                f"{record.TYPE} record from ({record.interceptor_id}, epoch {record.epoch}) "
                f"handed to interceptor {self.origin}; build it with Interceptor.origin"
            )
        return self._queue(token, Entry(0, getattr(record, "volume_id", ""), 0, 0, None, record))

    @property
    def origin(self) -> tuple[str, int]:
        """(interceptor_id, epoch) every record of this instance carries."""
        return self.config.interceptor_id, self.epoch

    def _queue(self, token: int, entry: Entry) -> Ticket:
        if entry.record is not None:
            entry.ts = max(entry.record.timestamps())
        nbytes = len(entry.data) if entry.data is not None else 0
        with self._lock:
            self._inflight.pop(token, None)
            entry.seq = seq = self._next_seq
            self._next_seq += 1
            self._outbox.append(entry)
            self._outbox_bytes += nbytes + 64  # == entry_bytes of the new entry
            self._unreplicated_bytes += nbytes + 64
            big = self._outbox_bytes >= self.config.max_record_bytes * 4
        if big:
            self._wake.set()
        return Ticket(self, seq, entry.ts)

    def wait_for_space(self, nbytes: int, timeout_s: float | None = None) -> None:
        """Backpressure: block while too many bytes wait for Kafka."""
        limit = self.config.max_unreplicated_bytes
        with self._lock:
            if self._unreplicated_bytes + nbytes <= limit or self._unreplicated_bytes == 0:
                return
            now = self.time_source.monotonic
            t0 = now()
            event(
                log,
                "writes blocked: Kafka is not taking records fast enough",
                level=logging.WARNING,
                unreplicated_bytes=self._unreplicated_bytes,
                limit=limit,
            )
            while self._unreplicated_bytes + nbytes > limit and self._unreplicated_bytes > 0:
                if self.failure is not None:
                    raise self.failure
                remaining = None if timeout_s is None else timeout_s - (now() - t0)
                if remaining is not None and remaining <= 0:
                    raise ReplicationError(
                        f"{self._unreplicated_bytes} bytes still wait for Kafka after "
                        f"{timeout_s}s; check the brokers"
                    )
                self._space_cv.wait(remaining if remaining is not None else 1.0)
            self.stats["blocked_s"] += now() - t0

    def has_space(self, nbytes: int) -> bool:
        return self._unreplicated_bytes + nbytes <= self.config.max_unreplicated_bytes

    def barrier(self) -> Ticket:
        """A ticket that is done when everything appended so far is durable."""
        with self._lock:
            seq = self._next_seq - 1
        self._wake.set()
        return Ticket(self, seq, 0)

    def urgent(self) -> None:
        """Someone waits for durability: tick now instead of at the next interval."""
        self._wake.set()

    def fence(self, error: FencedError) -> None:
        """A newer generation exists (``generation_watch``): acknowledge nothing from now on.

        Under the lock every acknowledgement passes through (``admit_ack``), so a write is
        either acknowledged before this or refused after it. Waiters fail, the tick
        thread stops without publishing more (nobody applies this generation past its cut).
        """
        with self._lock:
            if self.fenced_by_generation is not None:
                return
            self.fenced_by_generation = error
            self.acks_before_fence = int(self.stats["acks"])
            self.failure = error  # replaces a lesser failure: this is what to tell writers
        self._fail(error)
        self._stop.set()
        self._wake.set()

    def admit_ack(self, writes: int = 1) -> None:
        """The last step before ``writes`` writes (0: a flush) are acknowledged: raises the
        ``FencedError`` once this interceptor is fenced, else counts them."""
        with self._lock:
            if isinstance(self.failure, FencedError):
                raise self.failure
            self.stats["acks"] += writes

    def wait_durable(self, seq: int, timeout_s: float | None = None) -> None:
        timeout_s = self.config.replication_timeout_s if timeout_s is None else timeout_s
        deadline = self.time_source.monotonic() + timeout_s
        self._wake.set()
        with self._lock:
            while self.durable_seq < seq or isinstance(self.failure, FencedError):
                # fenced: durable in this generation's log means nothing any more
                if self.failure is not None:
                    raise self.failure
                remaining = deadline - self.time_source.monotonic()
                if remaining <= 0:
                    raise ReplicationError(
                        f"write #{seq} of interceptor {self.config.interceptor_id} is not "
                        f"durable in Kafka after {timeout_s:.1f}s "
                        f"(last error: {self._delivery_error or 'none'}); the data is on the "
                        "primary image but NOT replicated; check the brokers / min.insync.replicas"
                    )
                self._durable_cv.wait(remaining)

    def on_durable(self, seq: int, fn: Callable[[BaseException | None], None]) -> None:
        with self._lock:
            if isinstance(self.failure, FencedError):
                ready: BaseException | None = self.failure
            elif self.durable_seq >= seq:
                ready = None
            elif self.failure is not None:
                ready = self.failure
            else:
                heapq.heappush(self._waiters, (seq, next(self._tokens), fn))
                self._wake.set()
                return
        fn(ready)

    def wait_covered(self, ts: int, timeout_s: float | None = None) -> None:
        """Block until a published W >= ts (a sync ack); ``ReplicationError`` if not in time."""
        timeout_s = self.config.replication_timeout_s if timeout_s is None else timeout_s
        self.cuts.wait_covered(ts, timeout_s)

    def on_covered(
        self, ts: int, fn: Callable[[BaseException | None], None], timeout_s: float | None = None
    ) -> None:
        """``fn(None)`` once a published W >= ts, ``fn(exc)`` on timeout or failure."""
        timeout_s = self.config.replication_timeout_s if timeout_s is None else timeout_s
        self.cuts.on_covered(ts, fn, timeout_s)

    # ---------------------------------------------------------------- tick thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(self.config.tick_interval_s)
                self._wake.clear()
                if not self._crashed:
                    self._tick()
            # drain: a graceful stop publishes everything stamped before it (a fenced
            # one publishes nothing more: no reader of its generation wants it)
            while (self._outbox or self._inflight) and not self._no_drain():
                self._tick()
                if self._inflight:
                    self.time_source.sleep(0.001)
        except LowmarkError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("tick thread died")
            self._fail(ReplicationError(f"interceptor tick thread died: {exc!r}"))

    def _tick(self) -> None:
        with self._lock:
            s = self.clock.now()
            if self._inflight:
                s = min(s, min(self._inflight.values()) - 1)
            batch, rest = self._split(self._outbox)
            if rest:
                # what stays behind must stay above S; it goes out in the next transaction
                s = min(s, min(e.ts for e in rest) - 1)
                self._wake.set()
            s = max(s, self.last_s)
            self._outbox = rest
            self._outbox_bytes = sum(entry_bytes(e) for e in rest)
            last_seq = batch[-1].seq if batch else self.durable_seq
        records = encode_batch(
            batch,
            interceptor_id=self.config.interceptor_id,
            epoch=self.epoch,
            fragment_bytes=self.config.fragment_bytes,
            max_record_bytes=self.config.max_record_bytes,
        )
        t0 = self.time_source.monotonic()
        resynced = self._resynced if self._resynced and self._resynced[0] <= last_seq else None
        self._transaction(records, self._progress(ProgressKind.PROGRESS, s, resynced))
        if resynced is not None:
            self._resynced = None
        commit_ms = (self.time_source.monotonic() - t0) * 1000
        nbytes = sum(entry_bytes(e) for e in batch)
        with self._lock:
            self.last_s = s
            self.durable_seq = max(self.durable_seq, last_seq)
            self._unreplicated_bytes = max(0, self._unreplicated_bytes - nbytes)
            fire = []
            while self._waiters and self._waiters[0][0] <= self.durable_seq:
                fire.append(heapq.heappop(self._waiters)[2])
            self._durable_cv.notify_all()
            self._space_cv.notify_all()
        self.stats["ticks"] += 1
        self.stats["records"] += len(records)
        self.stats["bytes"] += nbytes
        self.stats["last_commit_ms"] = commit_ms
        for fn in fire:
            fn(None)

    def _split(self, outbox: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """The prefix of the outbox (in seq order) that fits one transaction."""
        cap = self.config.max_transaction_bytes
        total = 0
        for i, e in enumerate(outbox):
            total += entry_bytes(e)
            if total > cap and i > 0:
                return outbox[:i], outbox[i:]
        return outbox, []

    def _no_drain(self) -> bool:
        return self._crashed or self.fenced_by_generation is not None

    def _fail(self, exc: LowmarkError) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = exc
            waiters, self._waiters = self._waiters, []
            self._durable_cv.notify_all()
            self._space_cv.notify_all()
        event(log, "interceptor stopped replicating", level=logging.ERROR, error=str(exc))
        if isinstance(exc, FencedError):
            # a durable sync write must not be acknowledged by a later W either: after a
            # failover that W may lie above the new generation's cut
            self.cuts.fail(exc)
        for _seq, _t, fn in waiters:
            fn(exc)

    def resynced(self, seq: int, volumes: tuple[str, ...]) -> None:
        """Every earlier instance's dirty region of ``volumes`` is queued up to ``seq``."""
        self._resynced = (seq, volumes)
        self._wake.set()

    def _progress(
        self, kind: ProgressKind, s: int, resynced: tuple[int, tuple[str, ...]] | None = None
    ) -> Message:
        iid, wall = self.config.interceptor_id, self.time_source.wall_us()
        return progress_message(Progress(iid, self.epoch, kind, s, dict(self._delivered), wall,
            self.tail_volumes, resynced[1] if resynced else ()))  # fmt: skip

    # ---------------------------------------------------------------- Kafka

    def _transaction(
        self,
        records: list[Message],
        progress: Message,
        progress_cb: Callable[[Any, Any], None] | None = None,
    ) -> None:
        """Commit ``records`` + ``progress`` atomically, retrying what Kafka lets us retry.

        librdkafka's rules: a commit that fails retriably (e.g. timed out while brokers are
        down) is still in progress and must be *called again*, not begun anew; one that
        requires an abort is aborted, then the same records go out in a new transaction
        (an aborted transaction is invisible to read_committed readers); a fatal error
        (fenced, ...) ends this interceptor.
        """
        p = self._producer
        assert p is not None
        backoff = 0.05
        deadline = self.time_source.monotonic() + max(self.config.replication_timeout_s, 1.0) * 4
        begun = False
        while True:
            try:
                if not begun:
                    p.begin_transaction()
                    begun = True
                    p.produce_batch(self.topics.log, records, on_delivery=self._on_delivery)
                    key, value, headers = progress
                    p.produce(
                        self.topics.progress, value, key, headers=headers, on_delivery=progress_cb
                    )
                p.commit_transaction(self.config.replication_timeout_s)
                p.poll(0)
                self.stats["transactions"] += 1
                if (ended := self._txn_faults.succeeded()) is not None:
                    event(log, "transactions commit again", **ended)
                return
            except KafkaError as err:
                self._raise_if_fatal(err)
                self.stats["txn_retries"] += 1
                if err.txn_requires_abort:
                    self._abort(p)
                    begun = False
                if self._stop.is_set() and self.time_source.monotonic() > deadline:
                    raise ReplicationError(
                        f"could not commit to Kafka before shutdown: {err}"
                    ) from None
                if (said := self._txn_faults.failed(str(err))) is not None:  # not every try
                    event(log, "transaction failed; retrying until it commits",
                          logging.WARNING, abort=err.txn_requires_abort, **said)  # fmt: skip
                self.time_source.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _abort(self, p: Producer) -> None:
        """Abort the open transaction, retrying while the coordinator is unreachable."""
        backoff = 0.05
        while True:
            try:
                p.abort_transaction(self.config.replication_timeout_s)
                return
            except KafkaError as err:
                self._raise_if_fatal(err)
                if self._stop.is_set() and not err.retriable:
                    raise ReplicationError(f"could not abort a transaction: {err}") from None
                event(
                    log,
                    "abort_transaction failed; retrying",
                    level=logging.WARNING,
                    error=str(err),
                )
                self.time_source.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _raise_if_fatal(self, err: KafkaError) -> None:
        self._delivery_error = err
        if isinstance(err, FencedError):
            raise FencedError(
                f"interceptor {self.config.interceptor_id} (epoch {self.epoch}, generation "
                f"{self.config.generation}) was fenced by a newer instance, the watermark "
                "service or a failover (`lowmark roles show`); it can add no records. If "
                "the roles still name this site, restart it; resync its volumes' backups "
                "if it acknowledged async writes after its last progress.",
                code=err.code,
                fatal=err.fatal,
            ) from None
        if err.fatal:
            raise ReplicationError(f"Kafka producer failed fatally: {err}") from None

    def _on_delivery(self, err: Any, msg: Any) -> None:
        # never raises: latch the error, keep the offsets (quix-streams' shape)
        if err is not None:
            self._delivery_error = err
            return
        part = msg.partition()
        off = msg.offset() + 1
        if off > self._delivered.get(part, 0):
            self._delivered[part] = off

    # ---------------------------------------------------------------- numbers

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            pending = self._unreplicated_bytes
        return {
            **self.stats,
            "epoch": self.epoch,
            "s": self.last_s,
            "unreplicated_bytes": pending,
            "durable_seq": self.durable_seq,
            "w_seen": self.cuts.w,
            "failed": self.failure is not None,
            "generation": self.config.generation,
            "fenced_by_generation": int(self.fenced_by_generation is not None),
        }
