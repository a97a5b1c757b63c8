"""librdkafka's own log lines, as lowmark's structured records.

Left alone, librdkafka prints ``%3|1796316894.005|FAIL|lowmark#producer-3| [thrd:...]:
127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused`` on
stderr: not JSON, not filterable, and once per client per reconnect attempt (a service has
several clients, each retrying about every second). Every client ``connectors.kafka`` makes
gets :func:`client_logger` instead: confluent-kafka hands the lines to it on the client's
own ``poll`` (never from a librdkafka thread), and :class:`OncePerBroker` turns them into
records of ``lowmark.kafka.client`` with ``fac``, ``client`` and ``broker`` fields,

- a broker that cannot be reached said once per broker and kind of failure per
  ``quiet_s``, with what to check, and the count of lines held back since on the next one;
- any other line once per ``quiet_s`` for the same text (numbers aside).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

__all__ = ["LOGGER", "OncePerBroker", "client_logger"]

LOGGER = "lowmark.kafka.client"

# "[thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to ... failed: ..."
_THREAD = re.compile(r"^\[thrd:[^\]]*\]:\s*")
_BROKER = re.compile(r"^(?P<broker>(?:(?:ssl|sasl_\w+|plaintext)://)?[\w.\-\[\]:]+:\d+"
                     r"(?:/(?:\d+|bootstrap))?):\s*")  # fmt: skip
_NUMBERS = re.compile(r"\d+")
# what librdkafka says when a connection attempt or an established connection fails
_UNREACHABLE = ("Connect to", "Connection refused", "timed out", "Disconnected",
                "Failed to resolve", "Receive failed", "Send failed")  # fmt: skip


class OncePerBroker(logging.Filter):
    """Rewrites confluent-kafka's ``log(level, "%s [%s] %s", fac, client, text)`` records
    and drops repeats. ``now`` is injected for tests."""

    def __init__(self, quiet_s: float = 60.0, now: Callable[[], float] = time.monotonic):
        super().__init__()
        self.quiet_s, self._now = quiet_s, now
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()  # clients are polled from several threads

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.args, tuple) and len(record.args) == 3):
            return True  # not librdkafka's shape: leave it be
        fac, client, raw = (str(a) for a in record.args)
        text = _THREAD.sub("", raw)
        m = _BROKER.match(text)
        broker = m.group("broker") if m else ""
        text = text[m.end():] if m else text  # fmt: skip
        unreachable = bool(broker) and any(s in text for s in _UNREACHABLE)
        key = (broker, "unreachable") if unreachable else (fac, _NUMBERS.sub("#", text))
        with self._lock:
            t = self._now()
            last, held = self._last.get(key, (float("-inf"), 0))
            if t - last < self.quiet_s:
                self._last[key] = (last, held + 1)
                return False
            self._last[key] = (t, 0)
        if unreachable:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = (f"cannot reach Kafka broker {broker}: {text}; lowmark keeps "
                          "retrying: check that the broker runs and that bootstrap.servers "
                          "and the security settings name it")  # fmt: skip
        else:
            record.msg = f"Kafka client: {text}"
        record.args = ()
        record.fac, record.client, record.broker = fac, client, broker
        if held:
            record.held_back = held  # lines like it since the last one said
        return True


_lock = threading.Lock()


def client_logger() -> logging.Logger:
    """The logger every lowmark Kafka client is given (``"logger"`` in its settings)."""
    logger = logging.getLogger(LOGGER)
    with _lock:
        if not any(isinstance(f, OncePerBroker) for f in logger.filters):
            logger.addFilter(OncePerBroker())
    return logger
