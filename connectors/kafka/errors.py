"""librdkafka's errors as lowmark errors, and the few error codes lowmark names.

Every error a Kafka client of ours reports leaves ``connectors.kafka`` as a
``pipeline.errors.KafkaError`` (or a subclass) carrying librdkafka's verdict: ``code``,
``retriable``, ``fatal``, ``txn_requires_abort``. Which class:

- ``FencedError``: another holder of our transactional.id took over (``_FENCED``,
  ``PRODUCER_FENCED``, ``INVALID_PRODUCER_EPOCH``, or a fatal error that says so);
- ``KafkaUnavailableError``: the cluster (or the partition's leader, or the transaction
  coordinator) did not answer in time; always retriable;
- ``KafkaError``: anything else, ``retriable`` as librdkafka says.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError as _CError
from confluent_kafka import KafkaException

from pipeline.errors import FencedError, KafkaError, KafkaUnavailableError

#: the event a consumer with ``enable.partition.eof`` gets at a partition's end (-191); its
#: offset is the position, which can be below the end offset a reader took (transaction
#: markers and aborted records take offsets, a read_committed reader sees none of them)
PARTITION_EOF: int = _CError._PARTITION_EOF
#: the start offset is gone (retention) and ``auto.offset.reset`` is ``error``
OFFSET_GONE: int = _CError._AUTO_OFFSET_RESET
UNKNOWN_TOPIC: int = _CError.UNKNOWN_TOPIC_OR_PART
#: the client's metadata has no such partition (yet): a new or an unknown topic
UNKNOWN_PARTITION: int = _CError._UNKNOWN_PARTITION
TOPIC_ALREADY_EXISTS: int = _CError.TOPIC_ALREADY_EXISTS

_FENCED = frozenset({_CError._FENCED, _CError.PRODUCER_FENCED, _CError.INVALID_PRODUCER_EPOCH})
# the cluster is away, electing, or its coordinator is moving: a later try may succeed
_UNAVAILABLE = frozenset(
    {
        _CError._TRANSPORT,
        _CError._ALL_BROKERS_DOWN,
        _CError._TIMED_OUT,
        _CError._MSG_TIMED_OUT,
        _CError._RESOLVE,
        _CError._WAIT_COORD,
        _CError.REQUEST_TIMED_OUT,
        _CError.LEADER_NOT_AVAILABLE,
        _CError.NOT_LEADER_FOR_PARTITION,
        _CError.COORDINATOR_NOT_AVAILABLE,
        _CError.NOT_COORDINATOR,
        _CError.COORDINATOR_LOAD_IN_PROGRESS,
        _CError.NOT_ENOUGH_REPLICAS,
        _CError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)


def as_error(err: Any, what: str, hint: str = "") -> KafkaError:
    """The lowmark error for librdkafka's ``err`` (a ``KafkaError``, or a ``KafkaException``
    carrying one). ``what`` says what was being done; ``hint`` what the operator can do."""
    if isinstance(err, KafkaException):
        if not err.args or not isinstance(err.args[0], _CError):
            return KafkaError(f"{what}: {err}{'; ' + hint if hint else ''}")
        err = err.args[0]
    code = err.code()
    fatal = bool(err.fatal())
    abort = bool(err.txn_requires_abort())
    text = f"{what}: {err.str()} ({err.name()})"
    if code in _FENCED or (fatal and "fenc" in err.str().lower()):
        return FencedError(
            f"{text}; another instance took over this transactional.id",
            code=code,
            retriable=False,
            fatal=fatal,
            txn_requires_abort=abort,
        )
    if code in _UNAVAILABLE and not fatal:
        return KafkaUnavailableError(
            f"{text}; {hint or 'check that the brokers are up and reachable'}",
            code=code,
            retriable=True,
            txn_requires_abort=abort,
        )
    return KafkaError(
        f"{text}{'; ' + hint if hint else ''}",
        code=code,
        retriable=bool(err.retriable()) and not fatal,
        fatal=fatal,
        txn_requires_abort=abort,
    )
