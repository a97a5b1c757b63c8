"""The one writer of a CG's watermark topic: a Kafka transactional.id shared by every
watermark service instance of the CG.

Why: several instances may run at once (for availability), each folding the same progress
log at its own speed, so a lagging or freshly restarted one computes a lower W than the one
a faster instance already published. Taking the maximum on the consumer side hides that,
but compaction can leave the lower one as the topic's latest value, and invariant 2 says no
published W is below an earlier one. So exactly one instance publishes at a time:

- ``acquire()``: ``init_transactions`` with the CG's watermark transactional.id. Kafka fences
  every other instance holding it (their open transaction is aborted, their next commit
  fails), and once it returns every transaction of theirs is decided. Only then the topic's
  highest committed W is read: the *floor*. The new holder never publishes below it.
- ``publish(rec)``: one transaction per Watermark message. Consumers read the topic
  read_committed (the applier, status, restore, ``latest``), so an aborted message of a
  fenced instance is never "published" (kcat shows it unless given
  ``-X isolation.level=read_committed``).
- a holder that finds itself fenced reports it (``publish`` returns False) and stands by;
  the service decides when to take over again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import latest
from connectors.kafka.settings import WatermarkSettings
from connectors.kafka.topics import WATERMARK_TAIL, CgTopics
from pipeline.errors import FencedError, KafkaError, KafkaUnavailableError
from pipeline.logs import event
from pipeline.watermark.state import WatermarkState
from schemas import codec
from schemas.records import Watermark

log = logging.getLogger("lowmark.watermark")


@dataclass(frozen=True)
class PublisherTimeouts:
    init_transactions_s: float = 30.0
    commit_s: float = 10.0
    abort_s: float = 10.0
    read_floor_s: float = 30.0


#: the latest W is read from this many of the watermark topic's last records
WM_TAIL = WATERMARK_TAIL


def resume_from_floor(
    fold: WatermarkState | None, floor: Watermark | None
) -> WatermarkState | None:
    """The fold to continue with after taking the publisher, or None to keep ``fold``.

    The progress log folds deterministically, so a floor further on in it than our own fold
    is our fold, further on: continue from it (a lagging instance would otherwise fold its
    way to a W below the floor). A fresh instance (no fold) starts from the floor.
    """
    if fold is None or (floor is not None and floor.progress_offset > fold.progress_offset):
        return WatermarkState.from_watermark(floor) if floor is not None else WatermarkState()
    return None


def may_publish(w: int, floor_w: int) -> bool:
    """Invariant 2 at the writer: a W below the floor (the highest W committed, by any
    instance) is never published; the instance waits until its fold catches up."""
    return w >= floor_w


def decode_watermark(value: bytes) -> Watermark:
    return codec.decode(value, Watermark)


def newer_watermark(a: Watermark, b: Watermark) -> bool:
    return a.newer_than(b)


def latest_watermark(
    kafka_conf: dict[str, Any], cg: str, timeout_s: float = 30.0, *, generation: int = 0
) -> Watermark | None:
    """The highest committed Watermark record of the CG's ``generation``, or None
    (read_committed)."""
    topic = CgTopics(cg, generation).watermark
    # one publisher at a time, and W never goes down: the newest is among the last records
    best = latest(kafka_conf, topic, decode_watermark, newer_watermark, timeout_s, tail=WM_TAIL)
    return None if best is None else best[0]


class WatermarkPublisher:
    """Holds (or tries to hold) the CG's watermark transactional.id."""

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        cg: str,
        timeouts: PublisherTimeouts = PublisherTimeouts(),
        producer_factory: Callable[[dict[str, Any]], Any] = Producer,
        *,
        generation: int = 0,
    ) -> None:
        self.kafka_conf = dict(kafka_conf)
        # one publisher per generation: its own topic and transactional.id
        self.topics = CgTopics(cg, generation)
        self.cg = cg
        self.timeouts = timeouts
        self._factory = producer_factory
        self._producer: Any = None
        self.active = False
        self.acquired = 0  # how often this instance took the id (metrics)

    def acquire(self) -> Watermark | None:
        """Become the only publisher; return the floor (highest committed W record).

        Raises ``KafkaUnavailableError`` (retriable) when the cluster does not answer.
        """
        self.release()
        tid = self.topics.watermark_transactional_id()
        settings = WatermarkSettings(self.kafka_conf, self.cg).publisher_producer(tid)
        producer = self._factory(settings)
        try:
            producer.init_transactions(self.timeouts.init_transactions_s)
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"cannot take the watermark transactional.id of CG {self.cg}: {exc}; "
                "check that the brokers (and their transaction coordinator) are up",
                code=exc.code,
            ) from None
        # every transaction of an earlier holder is decided now: the floor is final
        floor = latest_watermark(
            self.kafka_conf,
            self.cg,
            self.timeouts.read_floor_s,
            generation=self.topics.generation,
        )
        self._producer = producer
        self.active = True
        self.acquired += 1
        event(
            log,
            "watermark publisher acquired",
            cg=self.cg,
            floor_w=None if floor is None else floor.w,
        )
        return floor

    def publish(self, rec: Watermark) -> bool:
        """Write one Watermark in its own transaction.

        True: committed. False: another instance fenced this one (now inactive; nothing
        of this call is visible). Raises ``KafkaUnavailableError`` on a passing fault: the
        transaction was aborted (or its fate is decided by the next ``acquire``), so the
        caller may retry the same W later.
        """
        if not self.active:
            return False
        p = self._producer
        value = codec.encode(rec)
        try:
            p.begin_transaction()
            p.produce(self.topics.watermark, value, self.cg, headers=codec.headers_for(rec))
            p.commit_transaction(self.timeouts.commit_s)
            return True
        except FencedError as err:
            self._lost(f"fenced by another watermark instance ({err})")
            return False
        except KafkaError as err:
            if err.txn_requires_abort:
                try:
                    p.abort_transaction(self.timeouts.abort_s)
                except KafkaError:
                    self._lost(f"abort failed after {err}")
            else:
                # a commit that timed out may still complete; a new init_transactions
                # decides it, and the floor read after it then covers it
                self._lost(f"commit outcome unknown ({err})")
            raise KafkaUnavailableError(
                f"publishing W to {self.topics.watermark} failed: {err}; retrying",
                code=err.code,
            ) from None

    def _lost(self, why: str) -> None:
        event(log, "watermark publisher standing by", level=logging.WARNING, cg=self.cg, why=why)
        self.release()

    def release(self) -> None:
        if self._producer is not None:
            # a fenced producer may refuse even this; it is dropped either way
            with contextlib.suppress(KafkaError):
                self._producer.flush(1)
        self._producer = None
        self.active = False
