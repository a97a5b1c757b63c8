"""Follows the published cuts (W) of a consistency group, for sync-mode acknowledgements.

Why a sync write waits for W, not only for Kafka: W is the minimum of every member's S. A
record durable in Kafka with ts above a member's S stays outside every cut for as long as
that member holds W back, and forever when it dies with that S (until it is fenced, W
moves past it and the write is inside the next cut). Invariant 3 promises an acknowledged
sync write is present after a failover, i.e. inside the cut a backup fails over to, so the
acknowledgement waits until a committed W >= ts (which also implies the record is durable:
W only passes what was committed with or before the progress that raised it).

How: a read_committed consumer of the CG's watermark topic (one partition), keeping the
highest W seen. It starts near the end: every W published before our JOIN is below every
ts we stamp (the clock floor is raised above all S reported before it), so older history
cannot cover a write of ours; the short tail it re-reads only makes ``w`` meaningful at once.

Waiters are bounded (``max_waiters``); each has a deadline, and a timeout, a consumer
failure or ``close`` fails it with ``ReplicationError``: never a silent ack.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from connectors.kafka.consumer import Consumer
from connectors.kafka.errors import PARTITION_EOF
from connectors.kafka.settings import InterceptorSettings
from connectors.kafka.topics import CgTopics
from pipeline.errors import LowmarkError, ReplicationError
from pipeline.fault_streak import FaultStreak
from pipeline.logs import event
from schemas import codec
from schemas.records import Watermark

log = logging.getLogger("lowmark.interceptor")

Callback = Callable[[BaseException | None], None]

#: offsets re-read at start: one W per transaction plus its commit marker, some aborted
_TAIL = 64


class _Waiter:
    __slots__ = ("deadline", "fn", "settled", "timeout_s", "ts")

    def __init__(self, ts: int, deadline: float, timeout_s: float, fn: Callback) -> None:
        self.ts = ts
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.fn = fn
        self.settled = False


class CutFollower:
    """The highest committed W of a CG, and waits for it to reach a ts. Thread-safe."""

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        cg: str,
        *,
        generation: int = 0,
        max_waiters: int = 65536,
        poll_s: float = 0.05,
        now: Callable[[], float] = time.monotonic,
        consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
    ) -> None:
        self.kafka_conf = dict(kafka_conf)
        self.cg = cg
        # the interceptor's own generation: a cut of another generation covers nothing
        self.topic = CgTopics(cg, generation).watermark
        self.max_waiters = max_waiters
        # poll_s bounds how late a deadline is noticed; a new W wakes poll at once
        self._poll_s = poll_s
        # injectable so tests can drive deadlines without sleeping
        self._now = now
        self._factory = consumer_factory
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._w = 0
        self._by_ts: list[tuple[int, int, _Waiter]] = []
        self._by_deadline: list[tuple[float, int, _Waiter]] = []
        self._pending = 0
        self._seq = itertools.count()
        self._closed = False
        self._failure: LowmarkError | None = None  # ``fail``: what every waiter gets
        self._thread: threading.Thread | None = None
        self.stats = {"watermarks": 0, "covered": 0, "timeouts": 0, "errors": 0}

    @property
    def w(self) -> int:
        """The highest W committed in the topic as far as this follower has read (0: none)."""
        return self._w

    def start(self) -> None:
        """Start following (idempotent, cheap: the consumer is set up in the thread, so a
        caller on a hot path, e.g. the tick thread's callback, never waits for Kafka)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"lowmark-cuts-{self.cg}", daemon=True
            )
            self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop; every waiter still pending fails (its write is not known to be in a cut)."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            waiters = self._drain()
        for wt in waiters:
            self._call(
                wt.fn,
                ReplicationError(
                    f"sync write at ts {wt.ts} is durable in Kafka but the interceptor "
                    "closed before a watermark covered it; it may be outside the backup's cut"
                ),
            )

    # ---------------------------------------------------------------- waiting

    def wait_covered(self, ts: int, timeout_s: float) -> None:
        """Block until a committed W >= ts; ``ReplicationError`` after ``timeout_s``."""
        self.start()
        deadline = self._now() + timeout_s
        with self._cv:
            while self._w < ts or self._failure is not None:
                if self._failure is not None:
                    raise self._failure
                if self._closed:
                    raise self._closed_error(ts)
                remaining = deadline - self._now()
                if remaining <= 0:
                    self.stats["timeouts"] += 1
                    raise self._timeout_error(ts, timeout_s)
                self._cv.wait(remaining)

    def on_covered(self, ts: int, fn: Callback, timeout_s: float) -> None:
        """Call ``fn(None)`` once a committed W >= ts, or ``fn(exc)`` on timeout, failure or
        close; from the follower's thread (or at once from this one if already settled)."""
        self.start()
        with self._lock:
            if self._failure is not None:
                ready: BaseException | None = self._failure
            elif self._w >= ts:
                ready = None
            elif self._closed:
                ready = self._closed_error(ts)
            elif self._pending >= self.max_waiters:
                # failing loudly beats growing without bound when W stopped moving
                ready = ReplicationError(
                    f"{self._pending} sync writes already wait for a watermark of CG "
                    f"{self.cg} (last W {self._w}); is `lowmark watermark` running?"
                )
            else:
                wt = _Waiter(ts, self._now() + timeout_s, timeout_s, fn)
                n = next(self._seq)
                heapq.heappush(self._by_ts, (ts, n, wt))
                heapq.heappush(self._by_deadline, (wt.deadline, n, wt))
                self._pending += 1
                return
        self._call(fn, ready)

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        consumer: Any = None
        backoff = 0.05
        faults = FaultStreak(self._now)
        try:
            while not self._closed:
                if consumer is None:
                    try:
                        consumer = self._subscribe()
                        backoff = 0.05
                        if (ended := faults.succeeded()) is not None:
                            event(log, "following the watermark topic again", cg=self.cg,
                                  **ended)  # fmt: skip
                    except LowmarkError as exc:
                        # transient (brokers away, an election): waiters time out meanwhile
                        # with a message naming what to check
                        self.stats["errors"] += 1
                        if (said := faults.failed(str(exc))) is not None:
                            event(log, "cannot follow the watermark topic; retrying",
                                  level=logging.WARNING, cg=self.cg, **said)  # fmt: skip
                        self._expire()
                        with self._cv:
                            self._cv.wait(backoff)
                        backoff = min(backoff * 2, 2.0)
                        continue
                msg = consumer.poll(self._poll_s)
                if msg is not None:
                    self._on_message(msg)
                self._expire()
        except Exception as exc:  # pragma: no cover - a bug; fail the waiters, not silently
            log.exception("cut follower died")
            self._fail(ReplicationError(f"watermark follower of CG {self.cg} died: {exc!r}"))
        finally:
            if consumer is not None:
                consumer.close()

    def _subscribe(self) -> Any:
        # read_committed: an aborted W of a fenced publisher is never a cut
        consumer = self._factory(InterceptorSettings(self.kafka_conf).cuts_consumer())
        try:
            low, high = consumer.watermark_offsets(self.topic, 0)
            consumer.assign(self.topic, {0: max(low, high - _TAIL)})
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _on_message(self, msg: Any) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != PARTITION_EOF:
                self.stats["errors"] += 1
                event(log, "watermark topic read error", level=logging.WARNING,
                      cg=self.cg, error=err.str())  # fmt: skip
            return
        if msg.value() is None:
            return
        try:
            w = codec.decode(msg.value(), Watermark).w
        except Exception:
            # the applier dead-letters a corrupt W; here it just covers nothing
            self.stats["errors"] += 1
            return
        self.stats["watermarks"] += 1
        fire: list[_Waiter] = []
        with self._cv:
            if w <= self._w or self._failure is not None:
                return
            self._w = w
            while self._by_ts and self._by_ts[0][0] <= w:
                wt = heapq.heappop(self._by_ts)[2]
                if not wt.settled:
                    wt.settled = True
                    self._pending -= 1
                    fire.append(wt)
            self._cv.notify_all()
        self.stats["covered"] += len(fire)
        for wt in fire:
            self._call(wt.fn, None)

    def _expire(self) -> None:
        now = self._now()
        late: list[_Waiter] = []
        with self._lock:
            while self._by_deadline and self._by_deadline[0][0] <= now:
                wt = heapq.heappop(self._by_deadline)[2]
                if not wt.settled:
                    wt.settled = True
                    self._pending -= 1
                    late.append(wt)
            # settled entries linger in the other heap (lazy removal); rebuild both once
            # they dominate, so a W that stalls for long does not grow them without bound
            if len(self._by_ts) + len(self._by_deadline) > 4 * self._pending + 1024:
                self._by_ts = [e for e in self._by_ts if not e[2].settled]
                self._by_deadline = [e for e in self._by_deadline if not e[2].settled]
                heapq.heapify(self._by_ts)
                heapq.heapify(self._by_deadline)
        self.stats["timeouts"] += len(late)
        for wt in late:
            self._call(wt.fn, self._timeout_error(wt.ts, wt.timeout_s))

    def fail(self, exc: LowmarkError) -> None:
        """Cover nothing more: every waiter, now and later, fails with ``exc`` (the
        interceptor was fenced; no W may acknowledge its writes any more)."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._fail(exc)

    def _fail(self, exc: LowmarkError) -> None:
        with self._lock:
            self._closed = True
            waiters = self._drain()
            self._cv.notify_all()
        for wt in waiters:
            self._call(wt.fn, exc)

    def _drain(self) -> list[_Waiter]:
        waiters = [wt for _ts, _n, wt in self._by_ts if not wt.settled]
        for wt in waiters:
            wt.settled = True
        self._by_ts.clear()
        self._by_deadline.clear()
        self._pending = 0
        return waiters

    @staticmethod
    def _call(fn: Callback, exc: BaseException | None) -> None:
        try:
            fn(exc)
        except Exception:
            # a caller's callback must not stop the follower (and strand every other waiter)
            log.exception("sync acknowledgement callback failed")

    def _timeout_error(self, ts: int, timeout_s: float) -> ReplicationError:
        return ReplicationError(
            f"sync write at ts {ts} is durable in Kafka but no watermark covered it within "
            f"{timeout_s:.1f} s (last W seen {self._w}): is `lowmark watermark` running for "
            f"CG {self.cg}, and are all interceptors of the CG alive? (a dead one is fenced "
            "after liveness_timeout_s)"
        )

    def _closed_error(self, ts: int) -> ReplicationError:
        return ReplicationError(
            f"sync write at ts {ts}: the watermark follower of CG {self.cg} is closed, so "
            "no cut is known to cover it"
        )
