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

This module is the entry (arguments, the session, the report); the rows are run by
``bench.write_path_raw`` and ``bench.write_path_volume``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.common import (
    Broker,
    MiB,
    cg_topic_names,
    delete_topics,
    kafka_bootstrap,
    print_table,
    random_pool,
    run_id,
    running_watermark_service,
    tmpfs_dir,
    write_results,
)
from bench.kafka_perf import JavaProducerRun, ceiling
from bench.write_path_raw import KEY, TXN_INTERVAL_S, create_topic, producer_conf, run_raw
from bench.write_path_volume import CountingHandler, run_volume
from pipeline.primary.volume import ConsistencyGroup

GOAL_RATIO = 0.7  # async durable throughput / raw-txn throughput, from the issue


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
        self.pools = {size: random_pool(size) for size in s.sizes}
        self.topics: list[str] = cg_topic_names(self.cg_name)
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
        # the bench's cluster may be one broker: the sync rows measure the protocol there
        with ConsistencyGroup.open(self.cg_name, self.data_dir, self.broker.conf,
                                   interceptor_id="bench", allow_single_copy_sync=True) as cg:
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


_T0 = time.perf_counter()


def progress(row: dict[str, Any]) -> None:
    ok = "ok" if row["verified"] else "CHECK FAILED: " + row["check"]
    print(f"{time.perf_counter() - _T0:5.1f}s {row['row']:>7} {row['size'] // 1024:>3} KiB "
          f"x{row['threads']:<2} {row['mib_s']:8.1f} MiB/s  {ok}", file=sys.stderr, flush=True)


def add_ratios(rows: list[dict[str, Any]], java: Mapping[int, JavaProducerRun]) -> None:
    base = {(r["row"], r["size"]): r["mib_s"] for r in rows if r["row"].startswith("raw")}
    for r in rows:
        mib = r["bytes"] / MiB
        r["cpu_ms_per_mib"] = r["cpu"]["process_s"] * 1000 / mib if mib else None
        run = java.get(r["size"])
        r["vs_java"] = r["mib_s"] / run.mib_per_s if run and run.mib_per_s else None
        theirs = run.cpu_s_per_mib if run else None
        r["cpu_vs_java"] = (r["cpu_ms_per_mib"] / 1000 / theirs
                            if theirs and r["cpu_ms_per_mib"] is not None else None)  # fmt: skip
        txn = base.get(("raw-txn", r["size"]))
        plain = base.get(("raw", r["size"]))
        r["vs_raw_txn"] = r["mib_s"] / txn if txn else None
        r["vs_raw"] = r["mib_s"] / plain if plain else None
        r["goal_met"] = (r["vs_raw_txn"] >= GOAL_RATIO) if r["row"] == "async" and txn else None


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["row", "KiB", "thr", "MiB/s", "writes/s", "p50 µs", "p99 µs", "drain ms",
               "flush ms", "x raw-txn", "x raw", "x java", "CPU ms/MiB", "CPU x java",
               "others", "ok"]
    out = []
    for r in rows:
        lat = r.get("latency") or {}
        if r["row"] == "raw-txn" and r.get("commit_latency"):
            lat = {}  # commit latency is not a per-write latency; it is in the JSON
        out.append([
            r["row"], r["size"] // 1024, r["threads"], r["mib_s"], r["writes_s"],
            lat.get("p50_us"), lat.get("p99_us"), r["drain_s"] * 1000,
            r["flush_s"] * 1000 if "flush_s" in r else None,
            r["vs_raw_txn"], r["vs_raw"], r["vs_java"],
            # client CPU per byte: on a CPU-bound box this, not MiB/s, is the stable number
            r["cpu_ms_per_mib"], r["cpu_vs_java"],
            # cores busy outside this process (broker, other jobs): a noisy row shows here
            r["cpu"]["others_s"] / r["cpu"]["wall_s"] if r["cpu"]["wall_s"] else None,
            "ok" if r["verified"] else "FAIL",
        ])
    return headers, out


def worst_async(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    cands = [r for r in rows if r["row"] == "async" and r["vs_raw_txn"] is not None]
    return min(cands, key=lambda r: r["vs_raw_txn"]) if cands else None


def default_data_dir() -> Path | None:
    """tmpfs when there is one: the raw producer has no local write to pay for, and freeing
    a sparse image's scattered blocks on a filesystem mounted with ``discard`` can take a
    minute (measured: 61 s to unlink a 1 GiB image after 50k random 4 KiB writes)."""
    return tmpfs_dir()


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
    java: dict[int, JavaProducerRun] = {}
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
            java = ceiling(broker.bootstrap, list(s.sizes), max_s=15.0)
            add_ratios(rows, java)
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
        "java_producer": {str(k): v.as_dict() for k, v in java.items()},
        "profile": profile_row,
        "table": {"headers": headers, "rows": cells},
    })
    print(f"\n{wall:.0f} s; results in {path}")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
