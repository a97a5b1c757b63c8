"""A live channel on ``lowmark.<cg>.control``: send ``MarkerPhase`` steps, read new ones.

Both sides of a marker use it: the coordinator (``pipeline.ops.marker``) and every
interceptor (``pipeline.primary.marker_member``). It reads from the topic's end at
``open``: a step sent before is history, never acted on. A step that does not decode is
logged and skipped: control steps change no data, and the marker it belonged to times out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

from connectors.kafka.consumer import Consumer
from connectors.kafka.errors import PARTITION_EOF
from connectors.kafka.producer import Producer
from connectors.kafka.settings import MarkerSettings
from connectors.kafka.topics import CgTopics
from pipeline.errors import KafkaError, RecordError
from pipeline.logs import event
from schemas import codec
from schemas.control import MarkerPhase

log = logging.getLogger("lowmark.control")


class ControlChannel:
    def __init__(self, kafka_conf: Mapping[str, Any], topics: CgTopics) -> None:
        self.topic = topics.control
        self._settings = MarkerSettings(dict(kafka_conf))
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self.stats = {"sent": 0, "read": 0, "undecodable": 0}
        self._closing = threading.Lock()

    def open(self, timeout_s: float = 10.0) -> ControlChannel:
        consumer = Consumer(self._settings.control_consumer())
        try:
            _low, high = consumer.watermark_offsets(self.topic, 0, timeout_s)
            consumer.assign(self.topic, {0: high})
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        self._producer = Producer(self._settings.control_producer())
        return self

    def send(self, step: MarkerPhase, flush_s: float = 0.0) -> None:
        if self._producer is None:  # closed (the interceptor is stopping): the other side times out
            event(log, "control step not sent: the channel is closed", level=logging.WARNING,
                  step=step.step.value, marker=step.name)  # fmt: skip
            return
        headers = [("type", MarkerPhase.TYPE.encode()), ("step", step.step.value.encode())]
        self._producer.produce(self.topic, codec.encode(step), step.marker_id, headers=headers)
        self._producer.poll(0)
        if flush_s:
            self._producer.flush(flush_s)
        self.stats["sent"] += 1

    def read(self, timeout_s: float, max_steps: int = 64) -> list[MarkerPhase]:
        """The steps that arrived, waiting at most ``timeout_s`` for the first."""
        if self._consumer is None:
            raise KafkaError("the control channel is not open")
        out: list[MarkerPhase] = []
        # consume(n, t) waits for n messages or t: every step would wait out t
        first = self._consumer.poll(timeout_s)
        msgs = [] if first is None else [first, *self._consumer.consume(max_steps, 0)]
        for msg in msgs:
            if msg.error() is not None:
                err = msg.error()
                if err.code() != PARTITION_EOF:
                    event(log, "control topic read error", level=logging.WARNING,
                          topic=self.topic, error=str(err))  # fmt: skip
                continue
            try:
                out.append(codec.decode(msg.value() or b"", MarkerPhase))
            except RecordError as exc:
                self.stats["undecodable"] += 1
                event(log, "control step skipped: it does not decode", level=logging.WARNING,
                      topic=self.topic, offset=msg.offset(), error=str(exc))  # fmt: skip
        self.stats["read"] += len(out)
        if self._producer is not None:
            self._producer.poll(0)
        return out

    def close(self, flush_s: float = 2.0) -> None:
        with self._closing:  # the member's thread and its owner may both close it
            self._close(flush_s)

    def _close(self, flush_s: float) -> None:
        if self._producer is not None:
            with contextlib.suppress(KafkaError):  # best effort: the other side times out
                self._producer.flush(flush_s)
            self._producer = None
        if self._consumer is not None:
            with contextlib.suppress(KafkaError):
                self._consumer.close()
            self._consumer = None
