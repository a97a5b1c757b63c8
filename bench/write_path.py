"""Throughput and latency of the replicating volume API against the raw Kafka producer.

    .venv/bin/python -m bench.write_path            # 3 s per row; bench/results/write_path.json
    .venv/bin/python -m bench.write_path --quick    # 0.75 s per row, no profile
    LOWMARK_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python -m bench.write_path --duration 10

Rows, all against one broker in one run (see bench/README.md for how to read them):

- ``raw-txn``: confluent-kafka ``Producer`` sending each write's bytes as one message keyed
  by the volume id, with the interceptor's producer settings, in transactions committed
  every 10 ms (the fair baseline for lowmark's 10 ms tick); ``raw``: the same without
  transactions.
- ``async``: ``Volume.write`` on an async volume from N threads, random aligned offsets in
  a sparse volume; the clock runs until every write is durable in Kafka (``drain``).
- ``sync``: the same on a sync volume, where each ``write`` waits until it is inside a
  published cut (W >= ts): its transaction, then a watermark service (run in this process
  for the CG's rows) folding that progress and publishing W, then the interceptor seeing it.

Every row checks its own bytes: the raw rows by the partition's end offset, the lowmark
rows by reading the row's records back from the CG's log topic (read_committed) and
counting its writes and data bytes there. A row that fails its check makes the exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import os
import pstats
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import (
    Broker,
    CpuMeter,
    delete_topics,
    kafka_bootstrap,
    log_writes,
    print_table,
    run_id,
    running_watermark_service,
    summarize_ns,
    write_results,
)
from connectors.kafka.reading import end_offsets
from connectors.kafka.topics import CgTopics
from pipeline.primary.volume import ConsistencyGroup, Volume

MiB = 1 << 20
KEY = "vol"  # lowmark keys log records by volume id; one volume -> one key -> one partition
PARTITIONS = 4  # InterceptorConfig.log_partitions default
TXN_INTERVAL_S = 0.01  # InterceptorConfig.tick_interval_s default
GOAL_RATIO = 0.7  # async durable throughput / raw-txn throughput, from the issue
POOL_BYTES = 16 * MiB  # distinct random buffers, so lz4 sees incompressible block data
ENTRY_OVERHEAD = 64  # Interceptor.append counts len(data) + 64 per entry in stats["bytes"]
CPU_GROUPS = {"bench-writer": "writers", "lowmark-tick": "tick", "MainThread": "main"}


@dataclass(frozen=True)
class Settings:
    duration_s: float
    sizes: tuple[int, ...]
    async_threads: tuple[int, ...]
    sync_threads: tuple[int, ...]
    volume_bytes: int
    warmup_s: float
    profile: str  # "auto" | "always" | "never"
    profile_s: float
    keep_topics: bool
    data_dir: Path | None
    switch_interval_ms: float | None


# --------------------------------------------------------------------------- data


def make_pool(size: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(max(8, POOL_BYTES // size))]


class CountingHandler(logging.Handler):
    """Counts the library's warnings instead of printing them mid-table.

    The interceptor logs one WARNING per write that meets backpressure; printing them
    would slow the writers and bury the table, but the count is evidence.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._mutex:
            key = record.getMessage()
            self.counts[key] = self.counts.get(key, 0) + 1

    def take(self) -> dict[str, int]:
        with self._mutex:
            out, self.counts = self.counts, {}
        return out


# --------------------------------------------------------------------------- raw producer


def producer_conf(bootstrap: str, transactional_id: str | None) -> dict[str, Any]:
    """The interceptor's producer settings (``Interceptor._producer_conf``), so the only
    difference between the rows is lowmark's own work."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "compression.type": "lz4",
        "linger.ms": 2,
        "batch.size": 1_000_000,
        "message.timeout.ms": 30_000,
        # lowmark lets at most max_unreplicated_bytes (256 MiB) wait for Kafka; give the
        # raw producer the same bound, or a no-transaction row queues a GiB and the row's
        # time is mostly its final flush
        "queue.buffering.max.kbytes": 256 * 1024,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = 60_000
    return conf


def create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    rf = min(3, len(admin.list_topics(timeout=15).brokers))
    fut = admin.create_topics([NewTopic(topic, partitions, rf)], request_timeout=30)[topic]
    fut.result()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(topic, timeout=10).topics.get(topic)
        parts = md.partitions.values() if md is not None and md.error is None else ()
        if parts and all(p.leader >= 0 for p in parts):
            return
        time.sleep(0.05)
    raise RuntimeError(f"bench topic {topic} has no leader after 30 s; check the broker")


_SETTLING = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
}


def end_offsets_total(bootstrap: str, topic: str, timeout_s: float = 20) -> int:
    """Sum of the partitions' high watermarks (data records plus transaction markers)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{run_id()}"})
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                parts = c.list_topics(topic, timeout=10).topics[topic].partitions
                return sum(
                    c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in parts
                )
            except KafkaException as exc:
                # a topic created a moment ago may still be moving its leaders
                err = exc.args[0]
                settling = err.retriable() or err.code() in _SETTLING
                if not settling or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        c.close()


def run_raw(
    broker: Broker,
    topic: str,
    size: int,
    duration_s: float,
    transactional: bool,
    pool: list[bytes],
    producer: Producer | None = None,
) -> dict[str, Any]:
    """One producer thread, one message per write, for ``duration_s``; then commit/flush.

    Like the tick: produce for 10 ms, commit (blocking), repeat. Durability evidence is the
    end offset: every message sent is a record (plus one marker per committed transaction).
    """
    p = producer or Producer(producer_conf(broker.bootstrap, None))
    before = end_offsets_total(broker.bootstrap, topic)
    meter = CpuMeter(CPU_GROUPS, broker.pids).start()
    commit_ns: list[int] = []
    sent = commits = 0
    n_pool = len(pool)
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    if transactional:
        p.begin_transaction()
    next_commit = t0 + TXN_INTERVAL_S
    in_txn = 0
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        try:
            p.produce(topic, pool[sent % n_pool], KEY)
        except BufferError:  # librdkafka's queue is full: let it drain
            p.poll(0.001)
            continue
        sent += 1
        in_txn += 1
        if transactional and now >= next_commit:
            c0 = time.perf_counter_ns()
            p.commit_transaction(30)
            commit_ns.append(time.perf_counter_ns() - c0)
            commits += 1
            in_txn = 0
            p.begin_transaction()
            next_commit = time.perf_counter() + TXN_INTERVAL_S
        elif sent % 1000 == 0:
            p.poll(0)
    produce_s = time.perf_counter() - t0
    if transactional:
        p.commit_transaction(30)
        commits += 1 if in_txn else 0
        remaining = 0
    else:
        remaining = p.flush(60)
    total_s = time.perf_counter() - t0
    cpu = meter.stop()
    delta = end_offsets_total(broker.bootstrap, topic) - before
    expected = sent + (commits if transactional else 0)
    nbytes = sent * size
    return {
        "row": "raw-txn" if transactional else "raw",
        "size": size,
        "threads": 1,
        "writes": sent,
        "bytes": nbytes,
        "produce_s": round(produce_s, 3),
        "drain_s": round(total_s - produce_s, 3),
        "total_s": round(total_s, 3),
        "mib_s": nbytes / MiB / total_s,
        "writes_s": sent / total_s,
        "transactions": commits,
        "commit_latency": summarize_ns(commit_ns) if commit_ns else None,
        "verified": remaining == 0 and delta == expected,
        "check": f"end offsets grew by {delta}, expected {expected}; {remaining} unflushed",
        "cpu": cpu,
    }


# --------------------------------------------------------------------------- lowmark


@dataclass
class WriterResult:
    writes: int = 0
    latencies_ns: list[int] | None = None
    cpu_s: float = 0.0
    error: Exception | None = None


def _writer(
    vol: Volume,
    size: int,
    pool: list[bytes],
    seed: int,
    start: threading.Barrier,
    deadline_box: list[float],
    out: WriterResult,
    profiler: cProfile.Profile | None,
) -> None:
    rng = random.Random(seed)
    blocks = vol.size // size
    lat: list[int] = []
    n_pool = len(pool)
    now_ns = time.perf_counter_ns
    write = vol.write
    try:
        start.wait()
        deadline = deadline_box[0]
        c0 = time.thread_time()
        if profiler is not None:
            profiler.enable()
        i = 0
        while time.perf_counter() < deadline:
            data = pool[(seed + i) % n_pool]
            offset = rng.randrange(blocks) * size
            t = now_ns()
            write(offset, data)
            lat.append(now_ns() - t)
            i += 1
        if profiler is not None:
            profiler.disable()
        out.cpu_s = time.thread_time() - c0
    except Exception as exc:  # reported in the row, never lost with the thread
        out.error = exc
    out.writes = len(lat)
    out.latencies_ns = lat


def run_volume(
    cg: ConsistencyGroup,
    vol: Volume,
    broker: Broker,
    size: int,
    threads: int,
    duration_s: float,
    pool: list[bytes],
    warnings: CountingHandler,
    profile: bool = False,
) -> dict[str, Any]:
    """N writer threads for ``duration_s``, then wait until Kafka has every write."""
    engine = cg.interceptor
    cg.flush()
    warnings.take()
    seq0 = engine.barrier().seq
    stats0 = engine.metrics()
    log0 = end_offsets(broker.conf, engine.topics.log)  # the row's records start here
    profilers = [cProfile.Profile() if profile else None for _ in range(threads)]
    tick_prof = cProfile.Profile() if profile else None
    restore = _profile_tick(engine, tick_prof) if tick_prof else None
    results = [WriterResult() for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    deadline_box = [0.0]
    workers = [
        threading.Thread(
            target=_writer,
            args=(vol, size, pool, 1000 * i + size, start, deadline_box, results[i], profilers[i]),
            name=f"bench-writer-{i}",
            daemon=True,
        )
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    meter = CpuMeter(CPU_GROUPS, broker.pids).start()
    t0 = time.perf_counter()
    deadline_box[0] = t0 + duration_s
    start.wait()
    for w in workers:
        w.join()
    write_s = time.perf_counter() - t0
    last = engine.barrier()
    last.wait(120)  # every write is in a committed transaction
    drain_s = time.perf_counter() - t0 - write_s
    cpu = meter.stop({"writers": sum(r.cpu_s for r in results)})
    f0 = time.perf_counter()
    vol.flush(120)  # fdatasync of the image; Kafka has nothing left to do
    flush_s = time.perf_counter() - f0
    if restore:
        restore()
    stats1 = engine.metrics()
    in_kafka = log_writes(broker.conf, engine.topics.log, log0, vol.volume_id)

    errors = [repr(r.error) for r in results if r.error is not None]
    writes = sum(r.writes for r in results)
    lat = [x for r in results for x in (r.latencies_ns or [])]
    nbytes = writes * size
    total_s = write_s + drain_s
    d = {k: stats1[k] - stats0[k] for k in ("ticks", "transactions", "records", "bytes")}
    expected_bytes = writes * (size + ENTRY_OVERHEAD)
    blocked_s = stats1["blocked_s"] - stats0["blocked_s"]
    # each write is one seq; the log topic, read back, holds every write and every byte
    verified = (
        not errors
        and not stats1["failed"]
        and last.seq - seq0 == writes
        and stats1["durable_seq"] >= last.seq
        and in_kafka["writes"] == writes
        and in_kafka["data_bytes"] == nbytes
    )
    row: dict[str, Any] = {
        "row": vol.mode,
        "size": size,
        "threads": threads,
        "writes": writes,
        "bytes": nbytes,
        "write_s": round(write_s, 3),
        "drain_s": round(drain_s, 3),
        "flush_s": round(flush_s, 3),
        "total_s": round(total_s, 3),
        "mib_s": nbytes / MiB / total_s,
        "writes_s": writes / total_s,
        "accepted_mib_s": nbytes / MiB / write_s,
        "latency": summarize_ns(lat),
        "engine": {
            **d,
            "blocked_s": round(blocked_s, 3),
            "writes_per_transaction": writes / d["transactions"] if d["transactions"] else None,
            "avg_record_kib": d["bytes"] / 1024 / d["records"] if d["records"] else None,
            "last_commit_ms": stats1["last_commit_ms"],
            "txn_retries": stats1["txn_retries"] - stats0["txn_retries"],
        },
        "warnings": warnings.take(),
        "in_kafka": in_kafka,
        "verified": verified,
        "check": (
            f"{writes} writes ({nbytes} bytes), seqs {seq0 + 1}..{last.seq}, durable_seq "
            f"{stats1['durable_seq']}; read back from {engine.topics.log}: "
            f"{in_kafka['writes']} writes, {in_kafka['data_bytes']} bytes in "
            f"{in_kafka['records']} records; engine bytes {d['bytes']} (expected "
            f"{expected_bytes})" + ("; errors: " + "; ".join(errors) if errors else "")
        ),
        "cpu": cpu,
    }
    if profile:
        row["profile"] = {
            "writers": _top(profilers, 25),
            "tick": _top([tick_prof], 25),
        }
    return row


def _profile_tick(engine: Any, prof: cProfile.Profile) -> Callable[[], None]:
    """Wrap the interceptor's ``_tick`` so cProfile records the tick thread only.

    cProfile hooks the thread that enables it, so the wrapper enables it around each tick
    inside the tick thread. Bench-only instrumentation; the instance attribute shadows the
    method and is removed again by the returned function.
    """
    inner = engine._tick

    def profiled_tick() -> None:
        prof.enable()
        try:
            inner()
        finally:
            prof.disable()

    engine._tick = profiled_tick

    def restore() -> None:
        del engine._tick

    return restore


def _top(profilers: Sequence[cProfile.Profile | None], n: int) -> str:
    live = [p for p in profilers if p is not None]
    if not live:
        return ""
    buf = io.StringIO()
    stats = pstats.Stats(live[0], stream=buf)
    for p in live[1:]:
        stats.add(p)
    stats.strip_dirs().sort_stats("tottime").print_stats(n)
    return buf.getvalue()


class Session:
    """One run's broker-side state: the raw producers, the CG's data directory, the topics
    to delete at the end.

    Rows of one write size run back to back (raw, async, sync), so a ratio compares
    numbers taken within seconds of each other on a shared machine. The CG is open only
    for its own rows: an idle interceptor still commits a transaction every tick, which
    would load the broker (and the GIL) under the raw rows.
    """

    def __init__(self, broker: Broker, s: Settings, data_dir: Path,
                 warnings: CountingHandler) -> None:
        self.broker = broker
        self.s = s
        self.data_dir = data_dir
        self.rid = run_id()
        self.cg_name = f"bench-{self.rid}"
        self.warnings = warnings
        self.pools = {size: make_pool(size) for size in s.sizes}
        t = CgTopics(self.cg_name)
        self.topics: list[str] = [t.log, t.progress, t.watermark, t.checkpoints, t.deadletter]
        self.plain = Producer(producer_conf(broker.bootstrap, None))
        self.txn = Producer(producer_conf(broker.bootstrap, f"bench.{self.rid}.raw"))
        self.txn.init_transactions(30)
        for size in s.sizes:  # created up front: their leaders settle while others run
            self.topics.append(self.raw_topic(size))
            create_topic(broker.bootstrap, self.raw_topic(size))

    def raw_topic(self, size: int) -> str:
        return f"bench.{self.rid}.raw.{size}"

    @contextlib.contextmanager
    def open_cg(self) -> Iterator[ConsistencyGroup]:
        with ConsistencyGroup.open(self.cg_name, self.data_dir, self.broker.conf,
                                   interceptor_id="bench") as cg:
            cg.create_volume("bench-async", self.s.volume_bytes, mode="async")
            cg.create_volume("bench-sync", self.s.volume_bytes, mode="sync")
            # a sync write is acknowledged only once a published W covers it
            with running_watermark_service(self.cg_name, self.broker.conf):
                yield cg

    def rows_for(self, size: int) -> list[dict[str, Any]]:
        s, pool = self.s, self.pools[size]
        topic = self.raw_topic(size)
        if s.warmup_s:  # first records pay for JIT, segment creation, connections
            run_raw(self.broker, topic, size, s.warmup_s, True, pool, self.txn)
        rows = []
        for prod, transactional in ((self.txn, True), (self.plain, False)):
            rows.append(run_raw(self.broker, topic, size, s.duration_s, transactional, pool, prod))
            progress(rows[-1])
        plan = [("bench-async", n) for n in s.async_threads]
        plan += [("bench-sync", n) for n in s.sync_threads]
        with self.open_cg() as cg:
            for vol, n in plan:
                rows.append(self.volume_row(cg, vol, size, n, s.duration_s))
                progress(rows[-1])
        return rows

    def volume_row(self, cg: ConsistencyGroup, volume: str, size: int, threads: int,
                   duration_s: float, profile: bool = False) -> dict[str, Any]:
        return run_volume(cg, cg.volume(volume), self.broker, size, threads, duration_s,
                          self.pools[size], self.warnings, profile)

    def profile_row(self, size: int, threads: int, duration_s: float) -> dict[str, Any]:
        with self.open_cg() as cg:
            return self.volume_row(cg, "bench-async", size, threads, duration_s, profile=True)

    def close(self) -> None:
        try:
            self.plain.flush(10)
        finally:
            if not self.s.keep_topics and not self.broker.embedded:
                delete_topics(self.broker.bootstrap, self.topics)


# --------------------------------------------------------------------------- report


_T0 = time.perf_counter()


def progress(row: dict[str, Any]) -> None:
    ok = "ok" if row["verified"] else "CHECK FAILED: " + row["check"]
    print(f"{time.perf_counter() - _T0:5.1f}s {row['row']:>7} {row['size'] // 1024:>3} KiB "
          f"x{row['threads']:<2} {row['mib_s']:8.1f} MiB/s  {ok}", file=sys.stderr, flush=True)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {(r["row"], r["size"]): r["mib_s"] for r in rows if r["row"].startswith("raw")}
    for r in rows:
        mib = r["bytes"] / MiB
        r["cpu_ms_per_mib"] = r["cpu"]["process_s"] * 1000 / mib if mib else None
        txn = base.get(("raw-txn", r["size"]))
        plain = base.get(("raw", r["size"]))
        r["vs_raw_txn"] = r["mib_s"] / txn if txn else None
        r["vs_raw"] = r["mib_s"] / plain if plain else None
        r["goal_met"] = (r["vs_raw_txn"] >= GOAL_RATIO) if r["row"] == "async" and txn else None


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["row", "KiB", "thr", "MiB/s", "writes/s", "p50 µs", "p99 µs", "drain ms",
               "flush ms", "x raw-txn", "x raw", "CPU ms/MiB", "others", "ok"]
    out = []
    for r in rows:
        lat = r.get("latency") or {}
        if r["row"] == "raw-txn" and r.get("commit_latency"):
            lat = {}  # commit latency is not a per-write latency; it is in the JSON
        out.append([
            r["row"], r["size"] // 1024, r["threads"], r["mib_s"], r["writes_s"],
            lat.get("p50_us"), lat.get("p99_us"), r["drain_s"] * 1000,
            r["flush_s"] * 1000 if "flush_s" in r else None,
            r["vs_raw_txn"], r["vs_raw"],
            # client CPU per byte: on a CPU-bound box this, not MiB/s, is the stable number
            r["cpu_ms_per_mib"],
            # cores busy outside this process (broker, other jobs): a noisy row shows here
            r["cpu"]["others_s"] / r["cpu"]["wall_s"] if r["cpu"]["wall_s"] else None,
            "ok" if r["verified"] else "FAIL",
        ])
    return headers, out


def worst_async(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    cands = [r for r in rows if r["row"] == "async" and r["vs_raw_txn"] is not None]
    return min(cands, key=lambda r: r["vs_raw_txn"]) if cands else None


# --------------------------------------------------------------------------- main


def default_data_dir() -> Path | None:
    """tmpfs when there is one: the raw producer has no local write to pay for, and freeing
    a sparse image's scattered blocks on a filesystem mounted with ``discard`` can take a
    minute (measured: 61 s to unlink a 1 GiB image after 50k random 4 KiB writes)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def parse_args(argv: Sequence[str] | None) -> Settings:
    ap = argparse.ArgumentParser(
        prog="python -m bench.write_path",
        description="lowmark volume API vs the raw confluent-kafka producer "
        "(set LOWMARK_BOOTSTRAP_SERVERS to use a running cluster).",
    )
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of writing per row (default 3; 0.75 with --quick)")
    ap.add_argument("--quick", action="store_true", help="short rows, no profile (~20 s)")
    ap.add_argument("--sizes", default="4096,65536", help="write sizes in bytes")
    ap.add_argument("--async-threads", default="1,4")
    ap.add_argument("--sync-threads", default="1,16")
    ap.add_argument("--volume-gib", type=float, default=1.0, help="sparse volume size")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="cProfile the worst async row: auto = when it misses the goal")
    ap.add_argument("--keep-topics", action="store_true",
                    help="do not delete this run's topics at the end")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="where the volume images go (default: a fresh directory in /dev/shm, "
                    "see bench/README.md; give a disk path to include the filesystem)")
    ap.add_argument("--switch-interval", type=float, default=None, metavar="MS",
                    help="sys.setswitchinterval in ms (Python's default is 5): shows how much "
                    "GIL hand-over between writers and the tick thread costs")
    a = ap.parse_args(argv)
    duration = a.duration if a.duration is not None else (0.75 if a.quick else 3.0)
    if duration <= 0:
        ap.error("--duration must be positive")

    def ints(text: str) -> tuple[int, ...]:
        try:
            vals = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            ap.error(f"{text!r} is not a comma-separated list of integers")
        if not vals or min(vals) <= 0:
            ap.error(f"{text!r} needs positive integers")
        return vals

    sizes = ints(a.sizes)
    if any(sz % 512 for sz in sizes):
        ap.error("--sizes must be multiples of 512 (block writes)")
    volume_bytes = int(a.volume_gib * (1 << 30)) // max(sizes) * max(sizes)
    if volume_bytes < max(sizes) * 16:
        ap.error("--volume-gib is too small for the write sizes")
    return Settings(
        duration_s=duration,
        sizes=sizes,
        async_threads=ints(a.async_threads),
        sync_threads=ints(a.sync_threads),
        volume_bytes=volume_bytes,
        warmup_s=0.5 if a.quick else 1.0,
        profile="never" if a.quick and a.profile == "auto" else a.profile,
        profile_s=min(duration, 3.0),
        keep_topics=a.keep_topics,
        data_dir=a.data_dir or default_data_dir(),
        switch_interval_ms=a.switch_interval,
    )


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    if s.switch_interval_ms is not None:
        sys.setswitchinterval(s.switch_interval_ms / 1000)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    warnings = CountingHandler()
    lowmark_log = logging.getLogger("lowmark")
    lowmark_log.addHandler(warnings)
    lowmark_log.propagate = False
    lowmark_log.setLevel(logging.WARNING)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    profile_row = worst = None
    with kafka_bootstrap() as broker, tempfile.TemporaryDirectory(
        prefix="lowmark-bench-", dir=s.data_dir
    ) as tmp:
        print(f"broker {broker.bootstrap} ({'embedded' if broker.embedded else 'external'}), "
              f"{s.duration_s:g} s per row", file=sys.stderr)
        session = Session(broker, s, Path(tmp), warnings)
        try:
            for size in s.sizes:
                rows += session.rows_for(size)
            add_ratios(rows)
            worst = worst_async(rows)
            if worst and (s.profile == "always" or (s.profile == "auto" and not worst["goal_met"])):
                print(f"profiling async {worst['size'] // 1024} KiB x{worst['threads']} "
                      f"for {s.profile_s:g} s (cProfile: writers and tick thread)",
                      file=sys.stderr)
                profile_row = session.profile_row(worst["size"], worst["threads"], s.profile_s)
        finally:
            session.close()
    headers, cells = table(rows)
    print()
    print_table(headers, cells)
    if worst:
        met = all(r["goal_met"] for r in rows if r["goal_met"] is not None)
        print(f"\ngoal: async >= {GOAL_RATIO}x raw-txn (transactions every "
              f"{TXN_INTERVAL_S * 1000:g} ms): {'MET' if met else 'MISSED'}; worst async row "
              f"{worst['size'] // 1024} KiB x{worst['threads']} at {worst['vs_raw_txn']:.2f}x")
    if profile_row:
        print("\n--- profile: writer threads (tottime) ---\n" + profile_row["profile"]["writers"])
        print("--- profile: tick thread (tottime) ---\n" + profile_row["profile"]["tick"])
    wall = time.perf_counter() - started
    path = write_results("write_path", {
        "settings": {**s.__dict__, "data_dir": str(s.data_dir or tempfile.gettempdir())},
        "broker": {"bootstrap": broker.bootstrap, "embedded": broker.embedded},
        "baseline": "raw-txn: confluent-kafka Producer, same settings as the interceptor, "
                    f"one message per write keyed '{KEY}', transactions every "
                    f"{TXN_INTERVAL_S * 1000:g} ms",
        "goal_ratio": GOAL_RATIO,
        "switch_interval_s": sys.getswitchinterval(),
        "wall_s": round(wall, 1),
        "rows": rows,
        "profile": profile_row,
        "table": {"headers": headers, "rows": cells},
    })
    print(f"\n{wall:.0f} s; results in {path}")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
