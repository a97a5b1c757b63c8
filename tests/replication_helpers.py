"""Helpers shared by the replication tests: run the services in threads, rebuild from the log."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Watermark, Write, WriteExtent

#: interceptor options for tests: a short tick, and a sync write fails fast
FAST = {"tick_interval_s": 0.005, "replication_timeout_s": 10.0}


class ServiceThread:
    """Runs a service's ``run`` in a thread; ``stop`` joins it and raises its failure.

    A service that fails in its thread must fail the test that runs it, even when the
    test only looked at the images: ``stop`` (and ``check``) raise an AssertionError
    chained to the service's exception, and a thread that does not stop is an error too.
    """

    def __init__(self, service: Any, name: str) -> None:
        self.service = service
        self.name = name
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.service.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def start(self) -> ServiceThread:
        self.service.start()
        self.thread.start()
        return self

    def check(self) -> None:
        """Raise if the service's thread failed (at any time, not only at ``stop``)."""
        if self.error is not None:
            raise AssertionError(f"service {self.name} failed: {self.error!r}") from self.error

    def stop(self, close: bool = True, check: bool = True, join_timeout_s: float = 30.0) -> None:
        """Stop the thread, close the service, then raise what the service raised.

        ``check=False``: the caller has already reported the failure (or expects one and
        reads ``error`` itself).
        """
        self.stop_event.set()
        self.thread.join(join_timeout_s)
        if self.thread.is_alive():
            # closing under a running step would race it; leave the daemon thread be
            raise AssertionError(f"service {self.name} did not stop within {join_timeout_s} s")
        if close:
            self.service.close()
        if check:
            self.check()


def stop_all(*threads: ServiceThread | None, close: bool = True) -> None:
    """Stop every thread given, even when an earlier one raises; then raise the first."""
    first: BaseException | None = None
    for st in threads:
        if st is None:
            continue
        try:
            st.stop(close=close)
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first


@contextlib.contextmanager
def running_backup(
    kafka_conf: dict[str, Any], cg: str, site_dir: Path, site: str = "backup", **applier_opts: Any
) -> Iterator[tuple[ServiceThread, ServiceThread]]:
    wm = ServiceThread(
        WatermarkService(WatermarkServiceConfig(cg=cg, liveness_timeout_s=30), kafka_conf),
        "watermark",
    ).start()
    ap = ServiceThread(
        Applier(ApplierConfig(cg=cg, site=site, data_dir=site_dir, **applier_opts), kafka_conf),
        "applier",
    ).start()
    try:
        yield wm, ap
    finally:
        stop_all(ap, wm)


def wait_until(pred: Any, timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def read_log(
    kafka_conf: dict[str, Any],
    cg: str,
    partitions: int = 4,
    timeout_s: float = 60.0,
    generation: int = 0,
) -> list[tuple[str, dict[str, Any], int, int]]:
    """Every committed log record as (type, record, partition, offset); fails (never
    returns a partial log) when the end is not reached within ``timeout_s``.

    ``record`` is the plain Avro dict the schema file defines (``Record.to_avro()``): the
    tests' reference below reads the log independently of the typed records' helpers."""
    return read_log_from(kafka_conf, cg, None, partitions, timeout_s, generation)[0]


def log_ops(
    records: list[tuple[str, dict[str, Any], int, int]],
) -> list[tuple[int, str, int, bytes | None]]:
    """(ts, volume, offset, data) of every whole write / zero, in ts order; data None marks
    a volume's CREATE. Written independently of the planner: the tests' reference."""
    ops: list[tuple[int, str, int, bytes | None]] = []
    frags: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for rtype, rec, _p, _o in records:
        if rtype == "Write":
            for ext in rec["extents"]:
                key = (rec["volume_id"], ext["ts"])
                frags.setdefault(key, {})[ext["fragment_index"]] = ext
                if len(frags[key]) == ext["fragment_count"]:
                    parts = [frags[key][i] for i in range(ext["fragment_count"])]
                    data = b"".join(x["data"] for x in parts)
                    ops.append((ext["ts"], rec["volume_id"], parts[0]["offset"], data))
        elif rtype == "Zero":
            ops.append((rec["ts"], rec["volume_id"], rec["offset"], bytes(rec["length"])))
        elif rtype == "VolumeChange" and rec["op"] == "CREATE":
            ops.append((rec["ts"], rec["volume_id"], 0, None))
    ops.sort(key=lambda o: o[0])  # stable: a CREATE stays before writes of its ts
    return ops


def rebuild_from_log(
    records: list[tuple[str, dict[str, Any], int, int]],
    sizes: dict[str, int],
    upto_ts: int | None = None,
) -> dict[str, bytearray]:
    """Reference images: every write / zero with ts <= upto_ts applied in ts order."""
    ops = [o for o in log_ops(records) if o[3] is not None]
    images = {v: bytearray(n) for v, n in sizes.items()}
    for ts, vid, off, data in ops:
        if upto_ts is not None and ts > upto_ts:
            continue
        images[vid][off : off + len(data)] = data
    return images


# ---- disaster and kill tests (test_disasters.py, test_service_kills.py) --------------------
# Imports stay inside the functions: this block is appended to a module other tests share.


def fence_interceptor(
    kafka_conf: dict[str, Any], cg: str, interceptor_id: str, timeout_s: float = 30.0
) -> None:
    """Do what a restarted instance does first: ``init_transactions`` with the interceptor's
    transactional.id. Its open transaction is aborted (or its commit completed), so nothing
    of it can still become visible; no FENCE record is written."""
    from confluent_kafka import Producer

    p = Producer({**kafka_conf, "transactional.id": CgTopics(cg).transactional_id(interceptor_id)})
    p.init_transactions(timeout_s)
    p.flush(1)


def last_committed_offset(
    kafka_conf: dict[str, Any], topic: str, partition: int = 0, lookback: int = 256
) -> int:
    """Offset of the last record a read_committed consumer sees (-1: none in the tail).

    Reads only the last ``lookback`` offsets; transaction markers and aborted records take
    offsets too, so keep it well above the number of producers that may have died mid-txn.
    """
    from connectors.kafka.reading import end_offsets, iter_range

    end = end_offsets(kafka_conf, topic).get(partition, 0)
    last = -1
    for msg in iter_range(kafka_conf, topic, partition, max(0, end - lookback), end):
        last = msg.offset()
    if last < 0 and end > lookback:
        for msg in iter_range(kafka_conf, topic, partition, 0, end):
            last = msg.offset()
    return last


def read_log_from(
    kafka_conf: dict[str, Any],
    cg: str,
    start: dict[int, int] | None = None,
    partitions: int = 4,
    timeout_s: float = 60.0,
    generation: int = 0,
) -> tuple[list[tuple[str, dict[str, Any], int, int]], dict[int, int]]:
    """Committed log records from ``start`` (per partition; default 0) to the end as of now.

    Returns the records as ``read_log`` does, and the end offsets to start the next read
    at. Raises AssertionError, saying how far it got, when the end is not reached within
    ``timeout_s``: a check over a partial log would pass on what it never saw.
    """
    topic = CgTopics(cg, generation).log
    start = {p: (start or {}).get(p, 0) for p in range(partitions)}
    c = Consumer(
        {
            **kafka_conf,
            "group.id": f"reader-{time.time_ns()}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        ends = {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in range(partitions)
        }
        c.assign([TopicPartition(topic, p, start[p]) for p in range(partitions)])
        done = {p for p in range(partitions) if start[p] >= ends[p]}
        out: list[tuple[str, dict[str, Any], int, int]] = []
        reached = dict(start)
        deadline = time.monotonic() + timeout_s
        while len(done) < partitions:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"reading {topic} from {start} to {ends}: after {timeout_s} s only "
                    f"{len(out)} records read, up to offsets {reached}; partitions "
                    f"{sorted(set(range(partitions)) - done)} not at their end"
                )
            for msg in c.consume(1000, 0.2):
                p = msg.partition()
                if msg.error():
                    # EOF can come below the end offset when the tail is transaction markers
                    if msg.error().code() == -191:
                        done.add(p)
                    continue
                if msg.offset() >= ends[p]:
                    done.add(p)
                    continue
                dec = codec.decode(msg.value())
                out.append((dec.TYPE, dec.to_avro(), p, msg.offset()))
                reached[p] = msg.offset() + 1
                if msg.offset() + 1 >= ends[p]:
                    done.add(p)
        return out, ends
    finally:
        c.close()


def watermark_history(kafka_conf: dict[str, Any], cg: str) -> list[tuple[int, dict[str, Any]]]:
    """(offset, Watermark record as its Avro dict) of every record of the CG's watermark
    topic, in order."""
    from connectors.kafka.reading import iter_range

    return [
        (m.offset(), codec.decode(m.value(), Watermark).to_avro())
        for m in iter_range(kafka_conf, CgTopics(cg).watermark)
    ]


def record_ts_index(
    records: list[tuple[str, dict[str, Any], int, int]],
) -> list[tuple[int, int, int]]:
    """(partition, offset, smallest ts) of each log record, for ``watermark_bound_violations``."""
    out = []
    for rtype, rec, p, o in records:
        ts = min(x["ts"] for x in rec["extents"]) if rtype == "Write" else rec["ts"]
        out.append((p, o, ts))
    return out


def watermark_bound_violations(
    record_ts: list[tuple[int, int, int]], watermarks: list[tuple[int, dict[str, Any]]]
) -> list[str]:
    """Watermark safety, checked after the fact: every log record with ts <= W must lie
    below that Watermark's ``log_offsets``. ``record_ts`` must cover the log from offset 0
    to at least the largest of those offsets."""
    import bisect

    by_part: dict[int, list[tuple[int, int]]] = {}
    for p, o, ts in sorted(record_ts):
        by_part.setdefault(p, []).append((o, ts))
    suffix_min: dict[int, list[int]] = {}
    for p, recs in by_part.items():
        mins = [0] * len(recs)
        low = 2**63
        for i in range(len(recs) - 1, -1, -1):
            low = min(low, recs[i][1])
            mins[i] = low
        suffix_min[p] = mins
    out = []
    for wm_offset, rec in watermarks:
        w = rec["w"]
        for po in rec["log_offsets"]:
            p, end = po["partition"], po["offset"]
            recs = by_part.get(p, [])
            i = bisect.bisect_left(recs, (end, -1))
            if i < len(recs) and suffix_min[p][i] <= w:
                bad = next(r for r in recs[i:] if r[1] <= w)
                out.append(
                    f"watermark record {wm_offset} publishes W={w} with log_offsets[{p}]={end}, "
                    f"but the record at partition {p} offset {bad[0]} has ts {bad[1]} <= W"
                )
    return out


def replay_digests(
    records: list[tuple[str, dict[str, Any], int, int]], sizes: dict[str, int], ws: list[int]
) -> dict[int, dict[str, str]]:
    """The digest a checkpoint at each W in ``ws`` must claim for each volume: the
    documented digest format (``oracles.claimed_digest``, not the product's code) over the
    log replayed to W.

    One pass in ts order (``rebuild_from_log`` per W would be quadratic). A volume whose
    CREATE has ts > W is absent from that W's map, as from a checkpoint taken then.
    """
    from tests.oracles import claimed_digest

    ops = log_ops(records)
    images = {v: bytearray(n) for v, n in sizes.items()}
    created: set[str] = set()
    out: dict[int, dict[str, str]] = {}
    i = 0
    for w in sorted(set(ws)):
        while i < len(ops) and ops[i][0] <= w:
            _ts, vid, off, data = ops[i]
            if data is None:
                created.add(vid)
            else:
                images[vid][off : off + len(data)] = data
            i += 1
        out[w] = {vid: claimed_digest(images[vid]) for vid in sorted(created)}
    return out


def create_cg_topics(kafka_conf: dict[str, Any], cg: str, timeout_s: float = 30.0) -> None:
    """Create the CG's topics and wait until every partition answers offset requests.

    A just-created partition can answer NOT_LEADER for a moment after the metadata shows a
    leader; tests that start several services at once wait here rather than race it.
    """
    from confluent_kafka import KafkaException

    from connectors.kafka.topics import ensure_topics

    topics = CgTopics(cg)
    ensure_topics(kafka_conf, cg)
    c = Consumer({**kafka_conf, "group.id": f"probe-{time.time_ns()}"})
    try:
        wanted = [(topics.log, p) for p in range(4)] + [
            (t, 0) for t in (topics.progress, topics.watermark, topics.checkpoints)
        ]

        def ready() -> bool:
            try:
                for t, p in wanted:
                    c.get_watermark_offsets(TopicPartition(t, p), timeout=5, cached=False)
            except KafkaException:
                return False
            return True

        wait_until(ready, timeout_s, f"the topics of CG {cg} to serve", interval_s=0.1)
    finally:
        c.close()


def produce_stale_write(
    kafka_conf: dict[str, Any],
    cg: str,
    interceptor_id: str,
    epoch: int,
    volume_id: str,
    offset: int,
    data: bytes,
    ts: int,
) -> tuple[int, int]:
    """A validly encoded Write of ``interceptor_id`` at ``epoch``, produced by a plain
    (non-transactional) producer into the volume's partition: what a fenced instance's
    record looks like when it surfaces past Kafka's fencing (Jepsen saw fenced producers'
    writes land). Returns its (partition, offset)."""
    from confluent_kafka import Producer

    records, _ends = read_log_from(kafka_conf, cg)
    partition = next(p for _t, rec, p, _o in records if rec.get("volume_id") == volume_id)
    rec = Write(
        volume_id, interceptor_id, epoch, (WriteExtent(ts, offset, len(data), 0, 1, data),)
    )
    delivered: list[tuple[int, int]] = []

    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None, f"the stale write was not delivered: {err}"
        delivered.append((msg.partition(), msg.offset()))

    p = Producer(kafka_conf)
    p.produce(
        CgTopics(cg).log,
        codec.encode(rec),
        volume_id,
        partition=partition,
        headers=codec.headers_for(rec),
        on_delivery=on_delivery,
    )
    assert p.flush(10) == 0 and delivered, "the stale write was not delivered"
    return delivered[0]
