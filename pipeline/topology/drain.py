"""A planned switchover's drain request, in ``lowmark.config`` under ``drain/<cg>``.

A switchover loses nothing because the old primary stops first: ``request_drain`` asks the
interceptors of one generation to stop taking writes, make every acknowledged write
durable, publish their last progress (LEAVE) and stop; the switchover then cuts at the W
that covers their last S. Only a request for an interceptor's *own* generation concerns it
(``concerns``): a request left over from an earlier switchover names an older generation
and is ignored, so requests never need deleting.

Written through a transactional producer of its own (``lowmark.config.drain.<cg>``): a
request is one record and readers read committed; no compare-and-set is needed, since
asking twice is asking once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from connectors.kafka.producer import Producer
from connectors.kafka.reading import bounds, read_range
from connectors.kafka.settings import TopologySettings
from connectors.kafka.topics import CONFIG_TOPIC, ensure_config_topic
from pipeline.errors import KafkaUnavailableError, RecordError
from pipeline.logs import event
from schemas import codec
from schemas.records import DrainRequest

__all__ = ["concerns", "drain_key", "latest_drain", "request_drain"]

log = logging.getLogger("lowmark.topology")


def drain_key(cg: str) -> str:
    return f"drain/{cg}"


def concerns(request: DrainRequest | None, cg: str, generation: int) -> bool:
    """Whether ``request`` asks the interceptors of ``generation`` of ``cg`` to drain."""
    return request is not None and request.cg == cg and request.generation == generation


def latest_drain(conf: Mapping[str, Any], cg: str, timeout_s: float = 10.0) -> DrainRequest | None:
    """The newest committed drain request of ``cg`` (None: never asked)."""
    found = bounds(conf, CONFIG_TOPIC, timeout_s)
    if not found or 0 not in found or found[0][1] <= found[0][0]:
        return None
    key = drain_key(cg).encode()
    best: DrainRequest | None = None
    settings = TopologySettings(dict(conf)).reader()
    end = {0: found[0][1]}
    # from the known low offset, not BEGINNING: resolving that costs a fresh consumer ~0.5 s
    start = {0: found[0][0]}
    for msg in read_range(
        settings, CONFIG_TOPIC, start, end, stall_timeout_s=timeout_s, timeout_s=timeout_s
    ):
        if msg.key() != key or msg.value() is None:
            continue
        try:
            rec = codec.decode(msg.value(), DrainRequest)
        except RecordError as exc:
            event(log, "skipped a drain request that does not decode", logging.WARNING,
                  cg=cg, offset=msg.offset(), why=str(exc))  # fmt: skip
            continue
        if rec.cg == cg and (best is None or rec.generation >= best.generation):
            best = rec
    return best


def request_drain(conf: Mapping[str, Any], request: DrainRequest, timeout_s: float = 30.0) -> None:
    """Commit ``request`` and return once readers see it."""
    payload = codec.encode(request)
    ensure_config_topic(dict(conf))
    tid = f"{CONFIG_TOPIC}.drain.{request.cg}"
    producer = Producer(TopologySettings(dict(conf)).roles_producer(tid))
    producer.init_transactions(timeout_s)
    producer.begin_transaction()
    producer.produce(
        CONFIG_TOPIC, payload, key=drain_key(request.cg), headers=codec.headers_for(request)
    )
    producer.commit_transaction(timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        seen = latest_drain(conf, request.cg, timeout_s)
        if seen is not None and seen.generation >= request.generation:
            break
        if time.monotonic() > deadline:
            raise KafkaUnavailableError(
                f"the drain request of CG {request.cg} is committed but not readable after "
                f"{timeout_s} s; check the brokers"
            )
        time.sleep(0.02)
    event(log, "drain requested", cg=request.cg, generation=request.generation,
          to_site=request.to_site)  # fmt: skip
