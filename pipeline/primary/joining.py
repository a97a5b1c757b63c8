"""What an interceptor reads from Kafka to join its CG: the clock floor under its JOIN.

Every S reported before the JOIN bounds a W computed without this instance, so its clock
starts above the largest one (``pipeline.watermark.state.join_clock_floor`` is the pure
fold): the newest W's ``max_s`` plus the progress records between that W's offset and the
JOIN. Read from the W topic's tail: before compaction it holds one W per tick, so reading
it whole would make a start grow with the CG's age.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors.kafka.reading import iter_range, latest
from connectors.kafka.topics import WATERMARK_TAIL, CgTopics
from pipeline.errors import LowmarkError
from pipeline.watermark.state import join_clock_floor
from schemas import codec
from schemas.records import Progress, Watermark


def clock_floor(kafka_conf: Mapping[str, Any], topics: CgTopics, join_offset: int) -> int:
    """The largest S any instance reported before the JOIN at ``join_offset``."""
    best = latest(
        dict(kafka_conf), topics.watermark, lambda v: codec.decode(v, Watermark),
        Watermark.newer_than, tail=WATERMARK_TAIL,
    )  # fmt: skip
    max_s, start = (best[0].max_s, best[0].progress_offset + 1) if best else (0, 0)
    events = []
    for msg in iter_range(dict(kafka_conf), topics.progress, 0, start, join_offset):
        try:
            events.append(codec.decode(msg.value(), Progress))
        except LowmarkError:
            continue
    return join_clock_floor(max_s, events)
