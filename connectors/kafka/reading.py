"""Bounded reads of a topic: its offsets, an offset range, the latest record of a compacted
topic. The one place lowmark reads "up to the end".

Used at start-up (an interceptor's clock floor, a service resuming from its last state) and
by the operator tools (status, restore, replay, verify), never on a hot path. Every loop
is bounded: by a deadline, or by how long no message arrived.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from connectors.kafka.consumer import BEGINNING, Consumer
from connectors.kafka.errors import OFFSET_GONE, PARTITION_EOF, as_error
from connectors.kafka.settings import ToolSettings
from pipeline.errors import KafkaError, KafkaUnavailableError

__all__ = [
    "BEGINNING",
    "bounds",
    "end_offsets",
    "iter_range",
    "latest",
    "mean_value_bytes",
    "read_range",
]


def bounds(
    conf: Mapping[str, Any], topic: str, timeout_s: float = 10.0
) -> dict[int, tuple[int, int]] | None:
    """(low, read_committed end) of every partition of ``topic``; None: no such topic.

    The end is the last stable offset: every committed record lies below it, and a
    transaction still open holds it back (so does a dead producer's, until it is fenced).
    """
    c = _metadata_client(conf)
    try:
        parts = c.partitions(topic, timeout_s)
        if parts is None:
            return None
        return {p: c.watermark_offsets(topic, p, timeout_s) for p in parts}
    except KafkaError:
        _drop_client(conf, c)  # a cluster that is gone: do not keep reconnecting to it
        raise


_CLIENTS: dict[tuple[tuple[str, str], ...], Consumer] = {}
_CLIENTS_LOCK = threading.Lock()


def _metadata_client(conf: Mapping[str, Any]) -> Consumer:
    """One consumer per process and cluster for metadata and offsets: a new client's first
    request waits ~60 ms for its connection, a warm one's ~5 ms (``lowmark failover``
    asks several times before its first read). It never subscribes, so it joins no group;
    librdkafka handles are thread-safe."""
    key = tuple(sorted((k, repr(v)) for k, v in conf.items()))
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(key)
        if c is None:
            if not _CLIENTS:
                atexit.register(close_metadata_clients)
            c = _CLIENTS[key] = Consumer(ToolSettings(conf).reader())
        return c


def _drop_client(conf: Mapping[str, Any], c: Consumer) -> None:
    """Forget a client (never closed here: another thread may be inside a call on it; it is
    destroyed with its last reference)."""
    key = tuple(sorted((k, repr(v)) for k, v in conf.items()))
    with _CLIENTS_LOCK:
        if _CLIENTS.get(key) is c:
            del _CLIENTS[key]


def close_metadata_clients() -> None:
    """Close the cached metadata clients (at exit; or before their cluster goes away, so
    they do not keep reconnecting to it). Later calls open new ones."""
    with _CLIENTS_LOCK:
        for c in _CLIENTS.values():
            c.close()
        _CLIENTS.clear()


def end_offsets(conf: Mapping[str, Any], topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Per-partition read_committed end offset ({} when the topic does not exist)."""
    return {p: end for p, (_low, end) in (bounds(conf, topic, timeout_s) or {}).items()}


def read_range(
    settings: Mapping[str, Any],
    topic: str,
    start: Mapping[int, int],
    end: Mapping[int, int] | None = None,
    *,
    stall_timeout_s: float = 30.0,
    timeout_s: float | None = None,
) -> Iterator[Any]:
    """Messages of ``topic`` with start[p] <= offset < end[p], in offset order per partition.

    ``settings``: a consumer's (``ToolSettings``). ``start[p]`` may be ``BEGINNING``;
    ``end=None``: each partition's end as of now. Partitions interleave. A partition is
    done at its end offset even when its last offsets are transaction markers or aborted
    records (the EOF event is then at or past the end). Raises ``KafkaUnavailableError``
    when no message arrived for ``stall_timeout_s`` or after ``timeout_s`` in all; a
    ``KafkaError`` with code ``OFFSET_GONE`` when a start offset was deleted by retention
    and the settings say ``auto.offset.reset=error``.
    """
    if end is not None and all(s >= end.get(p, 0) for p, s in start.items()):
        return  # nothing to read: no consumer (a failover's first read waits for this)
    c = Consumer(settings)
    try:
        if end is None:
            end = {p: c.watermark_offsets(topic, p, stall_timeout_s)[1] for p in start}
        todo = {p: s for p, s in start.items() if s < end.get(p, 0)}
        if not todo:
            return
        c.assign(topic, todo)
        now = time.monotonic()
        deadline = now + timeout_s if timeout_s is not None else float("inf")
        last_progress = now
        while todo:
            first = c.poll(0.2)
            msgs = [] if first is None else [first, *c.consume(500, 0)]
            now = time.monotonic()
            if not msgs and (now - last_progress > stall_timeout_s or now > deadline):
                raise KafkaUnavailableError(
                    f"reading {topic} stalled at partitions {sorted(todo)} (wanted "
                    f"{dict(start)}..{dict(end)}); check the brokers"
                )
            if now > deadline:
                raise KafkaUnavailableError(
                    f"reading {topic} {dict(start)}..{dict(end)} took over {timeout_s} s; "
                    f"partitions {sorted(todo)} not at their end"
                )
            for msg in msgs:
                p = msg.partition()
                if p not in todo:
                    continue
                err = msg.error()
                if err is not None:
                    code = err.code()
                    if code == PARTITION_EOF:
                        if msg.offset() >= end[p]:
                            del todo[p]
                        continue
                    if code == OFFSET_GONE:
                        raise KafkaError(
                            f"{topic}[{p}] no longer holds offset {start[p]}: retention "
                            "deleted records this read needs",
                            code=code,
                        )
                    exc = as_error(err, f"reading {topic}[{p}]")
                    if exc.retriable:
                        continue
                    raise exc
                last_progress = now
                if msg.offset() >= end[p]:
                    del todo[p]
                    continue
                yield msg
                if msg.offset() + 1 >= end[p]:
                    del todo[p]
    finally:
        c.close()


def iter_range(
    conf: Mapping[str, Any],
    topic: str,
    partition: int = 0,
    start: int = BEGINNING,
    end: int | None = None,
    timeout_s: float = 30.0,
) -> Iterator[Any]:
    """``read_range`` of one partition with the short-read settings, within ``timeout_s``."""
    return read_range(
        ToolSettings(conf).reader(),
        topic,
        {partition: start},
        None if end is None else {partition: end},
        stall_timeout_s=timeout_s,
        timeout_s=timeout_s,
    )


def mean_value_bytes(
    conf: Mapping[str, Any], topic: str, ends: Mapping[int, int], last: int = 50
) -> float:
    """The mean value size of the ``last`` records before ``ends`` in each partition (0.0
    when there are none): what an offset of the topic weighs, for rates from offsets."""
    sizes: list[int] = []
    for p, end in ends.items():
        for msg in iter_range(conf, topic, p, max(0, end - last), end, timeout_s=5):
            sizes.append(len(msg.value() or b""))
    return sum(sizes) / len(sizes) if sizes else 0.0


def value_bytes_from(
    conf: Mapping[str, Any], topic: str, start: Mapping[int, int], timeout_s: float = 60.0
) -> int:
    """The bytes of the committed record values of ``topic`` from ``start[p]`` (missing: 0)
    to each partition's end as of now: what a reader starting there fetches."""
    ends = {p: end for p, (_low, end) in (bounds(conf, topic) or {}).items()}
    begin = {p: start.get(p, 0) for p in ends}
    msgs = read_range(ToolSettings(conf).log_reader(), topic, begin, ends,
                      stall_timeout_s=timeout_s, timeout_s=timeout_s)  # fmt: skip
    return sum(len(m.value() or b"") for m in msgs)


def latest(
    conf: Mapping[str, Any],
    topic: str,
    decode: Callable[[bytes], Any],
    better: Callable[[Any, Any], bool],
    timeout_s: float = 30.0,
    *,
    tail: int | None = None,
) -> tuple[Any, int] | None:
    """The best decodable record of a (compacted, single-partition) topic and its offset.

    ``tail``: the best record is known to be among the last ``tail`` records when any of
    them decodes (a topic whose one writer never publishes a worse record after a better
    one, such as the watermark topic); only those are read, not the whole topic, which
    before compaction holds every record ever published. None decodes: the whole topic.
    """
    found = bounds(conf, topic, timeout_s)
    if not found or 0 not in found:
        return None  # no such topic: nothing in it
    # from the known offsets, never BEGINNING: resolving that costs a new consumer ~0.5 s
    low, high = found[0]
    if tail is not None:
        start = max(low, high - tail)
        best = _best(iter_range(conf, topic, 0, start, high, timeout_s), decode, better)
        if best is not None or start == low:
            return best
    return _best(iter_range(conf, topic, 0, low, high, timeout_s), decode, better)


def _best(
    msgs: Iterable[Any], decode: Callable[[bytes], Any], better: Callable[[Any, Any], bool]
) -> tuple[Any, int] | None:
    best: tuple[Any, int] | None = None
    for msg in msgs:
        if msg.value() is None:
            continue
        try:
            rec = decode(msg.value())
        except Exception:
            continue
        if best is None or better(rec, best[0]):
            best = (rec, msg.offset())
    return best
