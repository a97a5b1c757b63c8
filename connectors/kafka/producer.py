"""The one producer class lowmark uses: a thin owner of a ``confluent_kafka.Producer``.

What it adds, and nothing per message on the success path:

- every error leaves as a lowmark ``KafkaError`` (``connectors.kafka.errors.as_error``)
  with librdkafka's code and verdict (``FencedError``, ``KafkaUnavailableError``, ...);
- a full local queue (``BufferError``) is waited out a bounded number of times
  (``buffer_full_tries`` polls of ``buffer_full_poll_s``), then raised as a retriable
  ``KafkaUnavailableError``; for a transactional producer it says the transaction must be
  aborted (part of it may already be queued);
- a non-transactional producer's failed delivery of a message sent without a callback is
  latched (the callback never raises) and raised by the next ``produce`` or ``flush``, so
  "flushed" means "delivered". A transactional producer latches nothing: a failed delivery
  fails ``commit_transaction``, and an abort reports every purged message as failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka import Producer as _Producer

from connectors.kafka.client_log import client_logger
from connectors.kafka.errors import as_error
from pipeline.errors import KafkaError, KafkaUnavailableError

DeliveryCallback = Callable[[Any, Any], None]
Headers = Sequence[tuple[str, bytes]] | None


class Producer:
    def __init__(
        self,
        settings: Mapping[str, Any],
        *,
        buffer_full_tries: int = 3,
        buffer_full_poll_s: float = 1.0,
    ) -> None:
        self.transactional = "transactional.id" in settings
        try:
            self._p = _Producer({"logger": client_logger(), **settings})
        except KafkaException as exc:  # a setting librdkafka refuses
            raise as_error(exc, "creating a Kafka producer", "check the Kafka settings") from None
        self._tries = max(1, buffer_full_tries)
        self._poll_s = buffer_full_poll_s
        self._latch: DeliveryCallback | None = None if self.transactional else self._on_delivery
        self._error: KafkaError | None = None

    # ---------------------------------------------------------------- producing

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: str | bytes | None = None,
        headers: Headers = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        if self._error is not None:
            self._raise_latched()
        self.produce_batch(topic, [(key, value, headers)], on_delivery)

    def _queue_full(self, topic: str) -> KafkaUnavailableError:
        return KafkaUnavailableError(
            f"producing to {topic}: the local queue stayed full for "
            f"{self._tries * self._poll_s:.0f} s ({len(self._p)} messages wait for Kafka); "
            "check the brokers",
            code=None,
            retriable=True,
            txn_requires_abort=self.transactional,
        )

    def produce_batch(
        self,
        topic: str,
        messages: Sequence[tuple[str | bytes | None, bytes | None, Headers]],
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """``produce`` each (key, value, headers) in order: one call for a tick's records,
        so the hot path pays no Python frame per message on top of librdkafka's."""
        if self._error is not None:
            self._raise_latched()
        cb = on_delivery or self._latch
        produce = self._p.produce
        i, n, full = 0, len(messages), 0
        while i < n:
            try:
                for key, value, headers in messages[i:] if i else messages:
                    produce(topic, value, key, headers=headers, on_delivery=cb)  # type: ignore[arg-type]
                    i += 1
            except BufferError:
                full += 1
                if full >= self._tries:
                    raise self._queue_full(topic) from None
                self._p.poll(self._poll_s)  # deliveries free the queue
            except KafkaException as exc:
                raise as_error(exc, f"producing to {topic}") from None

    def poll(self, timeout_s: float = 0) -> int:
        """Serve delivery callbacks; how many were served."""
        return self._p.poll(timeout_s)

    def flush(self, timeout_s: float) -> int:
        """Wait for every queued message; how many are still undelivered. Raises the first
        delivery failure since the last raise (non-transactional producers)."""
        try:
            left = self._p.flush(timeout_s)
        except KafkaException as exc:
            raise as_error(exc, "flushing the producer") from None
        if self._error is not None:
            self._raise_latched()
        return left

    def __len__(self) -> int:
        return len(self._p)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        # never raises (it runs inside librdkafka's poll): the first failure is kept
        if err is not None and self._error is None:
            self._error = as_error(err, f"delivering a message to {msg.topic()}")

    def _raise_latched(self) -> None:
        err, self._error = self._error, None
        assert err is not None
        raise err

    # ---------------------------------------------------------------- transactions

    def init_transactions(self, timeout_s: float) -> None:
        """Take the transactional.id: fences every earlier holder and decides its
        transactions (committed or aborted) before it returns."""
        self._call(self._p.init_transactions, "taking the transactional.id", timeout_s)

    def begin_transaction(self) -> None:
        self._call(self._p.begin_transaction, "beginning a transaction")

    def commit_transaction(self, timeout_s: float) -> None:
        self._call(self._p.commit_transaction, "committing a transaction", timeout_s)

    def abort_transaction(self, timeout_s: float) -> None:
        self._call(self._p.abort_transaction, "aborting a transaction", timeout_s)

    def send_offsets_to_transaction(
        self, offsets: list[Any], group_metadata: Any, timeout_s: float
    ) -> None:
        """Commit a consumer's ``offsets`` with the open transaction (exactly-once)."""
        self._call(
            self._p.send_offsets_to_transaction,
            "adding offsets to a transaction",
            offsets,
            group_metadata,
            timeout_s,
        )

    def _call(self, fn: Callable[..., Any], what: str, *args: Any) -> Any:
        try:
            return fn(*args)
        except KafkaException as exc:
            raise as_error(exc, what) from None
