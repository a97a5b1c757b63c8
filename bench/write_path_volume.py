"""The lowmark rows of bench.write_path: ``Volume.write`` from N threads, until durable.

:func:`run_volume` runs writer threads at random aligned offsets of a sparse volume for a
row's duration, waits until Kafka has every write, and checks the row by reading its records
back from the CG's log topic. :class:`CountingHandler` counts lowmark's warnings (one per
write that meets backpressure) instead of printing them mid-table.
"""

from __future__ import annotations

import cProfile
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import (
    CPU_GROUPS,
    Broker,
    CpuMeter,
    MiB,
    log_writes,
    profile_top,
    summarize_ns,
)
from connectors.kafka.reading import end_offsets
from pipeline.primary.volume import ConsistencyGroup, Volume

ENTRY_OVERHEAD = 64  # Interceptor.append counts len(data) + 64 per entry in stats["bytes"]


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
            "writers": profile_top(profilers, 25),
            "tick": profile_top([tick_prof], 25),
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
