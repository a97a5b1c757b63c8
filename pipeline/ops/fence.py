"""`lowmark fence ID [--declare-lost]`: lock an interceptor out, and accept its lost tail.

An interceptor that ended without LEAVE while serving async volumes holds W at its last S
(``pipeline.watermark.state``, holds): it may have acknowledged writes that never reached
Kafka, and a cut above its S could hold effects of them without them. Restarted on its
disk it republishes them and the hold lifts by itself. When its disk is gone, only an
operator can decide that W should go on without them:

- ``fence`` takes the interceptor's transactional id (``init_transactions``: its producer,
  if it still runs, commits nothing more) and records a FENCE in the progress log, so the
  watermark service drops it now instead of after the liveness timeout.
- with ``declare_lost``, a LOST record instead: every instance of that id up to the
  progress log's current end (its epochs are JOIN offsets below it) is removed and its
  holds are dropped. The loss is logged here and by the watermark service, and kept in
  the W record's ``lost`` list, which `lowmark status` shows. A later instance (a JOIN
  after it) is untouched.

A live interceptor (it reported within ``alive_s``) is refused: it would republish its
own tail, and fencing it would fail its writers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds
from connectors.kafka.settings import WatermarkSettings
from connectors.kafka.topics import CgTopics
from pipeline.errors import ConfigError, KafkaError
from pipeline.logs import event
from pipeline.primary.fencing import fence_interceptors, progress_activity
from pipeline.timesource import wall_us
from pipeline.watermark.publisher import latest_watermark
from schemas import codec
from schemas.records import Hold, Progress, ProgressKind

log = logging.getLogger("lowmark.fence")


@dataclass
class FenceOutcome:
    interceptor_id: str
    generation: int
    kind: ProgressKind  # FENCE or LOST
    epoch: int  # the epoch the record names (LOST: every instance up to it)
    offset: int  # of the record in the progress topic
    w_before: int
    holds: list[Hold] = field(default_factory=list)  # the id's holds when it was written


def fence(
    kafka_conf: Mapping[str, Any],
    cg: str,
    interceptor_id: str,
    *,
    generation: int = 0,
    declare_lost: bool = False,
    alive_s: float = 10.0,
    timeout_s: float = 30.0,
) -> FenceOutcome:
    """Fence ``interceptor_id`` of the CG's ``generation``; with ``declare_lost`` accept
    its unrepublished tails. Raises ``ConfigError`` saying why not."""
    conf = dict(kafka_conf)
    topics = CgTopics(cg, generation)
    wm = latest_watermark(conf, cg, timeout_s, generation=generation)
    members = {m.interceptor_id: m for m in wm.members} if wm else {}
    holds = [h for h in (wm.holds if wm else ()) if h.interceptor_id == interceptor_id]
    activity = progress_activity(conf, cg, generation, timeout_s=timeout_s)
    act = activity.get(interceptor_id)
    if act is None and interceptor_id not in members and not holds:
        known = sorted({*activity, *members})
        raise ConfigError(
            f"CG {cg} generation {generation} knows no interceptor {interceptor_id!r} (known: "
            f"{known or 'none'}): check the id (`lowmark status` lists them)"
        )
    age_s = None if act is None else (wall_us() - act.wall_us) / 1e6
    alive = act is not None and act.kind in (ProgressKind.JOIN, ProgressKind.PROGRESS)
    if alive and age_s is not None and age_s < alive_s:
        raise ConfigError(
            f"interceptor {interceptor_id} reported {age_s:.1f} s ago: it is alive. Stop it "
            "first; restarted on its disk it republishes its own tail, and fencing it now "
            "would fail its writers"
        )
    b = bounds(conf, topics.progress, timeout_s)
    end = b[0][1] if b and 0 in b else 0
    fence_interceptors(conf, cg, generation, [interceptor_id], timeout_s=timeout_s)
    member = members.get(interceptor_id)
    if declare_lost:
        kind, epoch = ProgressKind.LOST, max(end - 1, 0)
    else:
        kind, epoch = ProgressKind.FENCE, member.epoch if member else max(end - 1, 0)
    s = member.s if member else max((h.s for h in holds), default=0)
    offset = _publish(conf, cg, topics, Progress(interceptor_id, epoch, kind, s, {}, wall_us()))
    out = FenceOutcome(interceptor_id, generation, kind, epoch, offset, wm.w if wm else 0, holds)
    event(
        log,
        "interceptor declared lost: W will pass its unreplicated async tail"
        if declare_lost
        else "interceptor fenced by the operator",
        level=logging.WARNING,
        cg=cg,
        generation=generation,
        interceptor=interceptor_id,
        epoch=epoch,
        s=s,
        offset=offset,
        held_volumes=sorted({v for h in holds for v in h.volumes}),
    )
    return out


def _publish(conf: dict[str, Any], cg: str, topics: CgTopics, rec: Progress) -> int:
    offsets: list[int] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            offsets.append(msg.offset())

    producer = Producer(WatermarkSettings(conf, cg).producer())
    try:
        producer.produce(
            topics.progress,
            codec.encode(rec),
            rec.interceptor_id,
            headers=codec.headers_for(rec),
            on_delivery=delivered,
        )
        producer.flush(30)
    except KafkaError as exc:
        raise KafkaError(
            f"writing the {rec.kind.value} record for interceptor {rec.interceptor_id} to "
            f"{topics.progress} failed: {exc}; the interceptor is fenced in Kafka already. "
            "Retry the command: it is idempotent"
        ) from None
    if not offsets:
        raise KafkaError(
            f"the {rec.kind.value} record for {rec.interceptor_id} was not delivered to "
            f"{topics.progress} within 30 s; check the brokers and retry"
        )
    return offsets[-1]
