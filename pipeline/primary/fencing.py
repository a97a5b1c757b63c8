"""Fencing a generation's interceptors through Kafka, for a failover's orchestrator.

The old primary's interceptors must not commit another record once the CG moves on:

- ``interceptor_ids(kafka_conf, cg, generation)``: every interceptor known to that
  generation: the members of its latest W plus every interceptor named by a progress
  record (JOIN, PROGRESS, LEAVE, FENCE) in the tail of its progress topic. A live
  interceptor reports every tick, so the tail always names it; one that left long ago
  and restarts later is refused by its own roles check (``generation_watch``).
- ``fence_interceptors(kafka_conf, cg, generation, ids)``: ``init_transactions`` with each
  one's transactional id (the interceptor's own producer settings): its producer is
  fenced, its open transaction aborted, and every transaction of it is decided (committed
  or aborted) once this returns. The interceptor learns it at its next commit (a tick)
  and fails with ``FencedError``: no write of it is acknowledged after that.
- ``last_progress_age_s(kafka_conf, cg, generation)``: how long ago the generation's
  newest progress record was written by its interceptor (by the wall clock stamped in it,
  so host clock skew adds to it), None when it has none: a few tick intervals means the
  old primary is alive and reaches Kafka; no longer moving means it is dead or cut off.
  ``progress_activity`` gives the same per interceptor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds, iter_range, latest
from connectors.kafka.settings import InterceptorSettings
from connectors.kafka.topics import WATERMARK_TAIL, CgTopics
from pipeline.errors import KafkaError, LowmarkError
from pipeline.logs import event
from pipeline.timesource import wall_us
from schemas import codec
from schemas.records import Progress, ProgressKind, Watermark

__all__ = [
    "Activity",
    "fence_interceptors",
    "interceptor_ids",
    "last_progress_age_s",
    "progress_activity",
]

log = logging.getLogger("lowmark.fencing")

#: progress records read back from the end: at 100 ticks/s this is minutes of one member
TAIL_RECORDS = 20_000


@dataclass(frozen=True)
class Activity:
    """The newest progress record about one interceptor in a generation's progress tail."""

    interceptor_id: str
    kind: ProgressKind
    offset: int
    #: the wall clock of its writer (the interceptor; the watermark service for a FENCE)
    wall_us: int
    #: the S it reported (the last S of a fenced member, for a FENCE)
    s: int = 0


def progress_activity(
    kafka_conf: Mapping[str, Any],
    cg: str,
    generation: int,
    *,
    tail: int = TAIL_RECORDS,
    timeout_s: float = 30.0,
) -> dict[str, Activity]:
    """The newest progress record per interceptor among the last ``tail`` offsets of the
    generation's progress topic ({} when the topic is missing or empty)."""
    topic = CgTopics(cg, generation).progress
    b = bounds(kafka_conf, topic, timeout_s)
    if not b or 0 not in b:
        return {}
    low, end = b[0]
    out: dict[str, Activity] = {}
    for msg in iter_range(kafka_conf, topic, 0, max(low, end - tail), end, timeout_s):
        if msg.value() is None:
            continue
        try:
            rec = codec.decode(msg.value(), Progress)
        except LowmarkError:
            continue  # the watermark service halts on it; here it names nobody
        out[rec.interceptor_id] = Activity(
            rec.interceptor_id, rec.kind, msg.offset(), rec.wall_us, rec.s
        )
    return out


def interceptor_ids(
    kafka_conf: Mapping[str, Any], cg: str, generation: int, *, timeout_s: float = 30.0
) -> set[str]:
    """Every interceptor of ``generation`` that may still hold its transactional id: the
    members of the latest W and everyone in the progress tail."""
    conf = dict(kafka_conf)
    ids = set(progress_activity(conf, cg, generation, timeout_s=timeout_s))
    topic = CgTopics(cg, generation).watermark
    if bounds(conf, topic, timeout_s):
        best = latest(
            conf,
            topic,
            lambda v: codec.decode(v, Watermark),
            Watermark.newer_than,
            timeout_s,
            tail=WATERMARK_TAIL,
        )
        if best is not None:
            ids.update(m.interceptor_id for m in best[0].members)
    return ids


def fence_interceptors(
    kafka_conf: Mapping[str, Any],
    cg: str,
    generation: int,
    interceptor_ids: Iterable[str],
    *,
    timeout_s: float = 30.0,
) -> list[str]:
    """Take the transactional id of each interceptor of ``generation``; the ids fenced, in
    order. Raises ``KafkaError`` (naming those already fenced) when Kafka refuses one:
    fencing is idempotent, so the caller retries with the same ids."""
    topics = CgTopics(cg, generation)
    settings = InterceptorSettings(dict(kafka_conf))
    done: list[str] = []
    for iid in sorted(set(interceptor_ids)):
        tid = topics.transactional_id(iid)
        producer = Producer(settings.producer(tid, "none"))
        try:
            producer.init_transactions(timeout_s)
        except KafkaError as exc:
            raise type(exc)(
                f"fencing interceptor {iid} of CG {cg} generation {generation} "
                f"(transactional id {tid}) failed: {exc}; fenced so far: {done or 'none'}. "
                "Retry: fencing the same ids again is harmless",
                code=exc.code,
                retriable=exc.retriable,
            ) from None
        finally:
            producer.flush(1)
        done.append(iid)
        event(log, "interceptor fenced through Kafka", cg=cg, generation=generation,
              interceptor=iid, transactional_id=tid)  # fmt: skip
    return done


def last_progress_age_s(
    kafka_conf: Mapping[str, Any],
    cg: str,
    generation: int,
    *,
    now_us: int | None = None,
    timeout_s: float = 30.0,
) -> float | None:
    """Seconds since the generation's newest progress record of an interceptor (JOIN,
    PROGRESS or LEAVE: a FENCE is the watermark service's) was written; None: none."""
    activity = progress_activity(kafka_conf, cg, generation, timeout_s=timeout_s)
    stamps = [a.wall_us for a in activity.values() if a.kind is not ProgressKind.FENCE]
    if not stamps:
        return None
    now = wall_us() if now_us is None else now_us
    return max(0.0, (now - max(stamps)) / 1e6)
