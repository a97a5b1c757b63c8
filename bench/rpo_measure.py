"""The numbers of bench.rpo: RPO percentiles from samples, per-phase time from two status
reads, and the baseline a plain consumer sets.

- :func:`rpo_stats`: p50/p99/max of ``now - physical(ts)`` of S, W and applied W, and of
  each stage behind the one before it, over a window of the sampler's samples;
- :class:`Snap` / :func:`timer_split`: counters at one instant, and seconds per phase
  between two of them;
- :func:`raw_consume`: the applier's consumer settings with nothing of lowmark around them.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from bench.common import Broker, MiB, percentile, run_id
from bench.rpo_status import TIMERS
from schemas import codec
from schemas.records import LOG_RECORDS
from schemas.ts import ts_physical_us


def rpo_stats(samples: Sequence[tuple[int, int, int, int]], t0_us: int, t1_us: int
              ) -> dict[str, dict[str, float]]:
    """p50/p99/max of now - physical(ts) in ms, per source, over samples in [t0, t1)."""
    window = [s for s in samples if t0_us <= s[0] < t1_us]
    out: dict[str, dict[str, float]] = {}
    for key, idx in (("S", 1), ("W", 2), ("applied", 3)):
        vals = sorted((s[0] - ts_physical_us(s[idx])) / 1000 for s in window if s[idx] > 0)
        out[key] = {"count": len(vals), "p50_ms": percentile(vals, 50),
                    "p99_ms": percentile(vals, 99), "max_ms": vals[-1] if vals else math.nan}
    # per sample, how far each stage trails the one before it: isolates a stage from the
    # noise upstream (a primary starved of CPU raises S, W and applied lag alike)
    for key, hi, lo in (("W_behind_S", 1, 2), ("applied_behind_W", 2, 3)):
        vals = sorted((ts_physical_us(s[hi]) - ts_physical_us(s[lo])) / 1000
                      for s in window if s[hi] > 0 and s[lo] > 0)
        out[key] = {"count": len(vals), "p50_ms": percentile(vals, 50),
                    "p99_ms": percentile(vals, 99), "max_ms": vals[-1] if vals else math.nan}
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(window)]
    out["sampling"] = {"count": len(window),
                       "mean_interval_ms": (sum(gaps) / len(gaps) / 1000) if gaps else math.nan,
                       "max_interval_ms": max(gaps) / 1000 if gaps else math.nan}
    return out


@dataclass
class Snap:
    """Counters at one instant; two of them make a window's rates."""

    mono: float
    wall: int
    written: int
    engine: dict[str, Any]
    applier: dict[str, Any]
    wm: dict[str, Any]
    cpu_applier: float
    cpu_wm: float


# time inside a phase not spent in the phases nested in it: waiting in Kafka's consume()
_REST = {"consume": ("read_log", ("decode", "plan_add")),  # applier
         "step-rest": ("step", ("fold", "publish", "fence"))}  # watermark service


def timer_split(a: dict[str, Any], b: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Per phase: seconds and share of the window's wall time, from two status reads."""
    out: dict[str, Any] = {}
    raw: dict[str, tuple[int, int]] = {}
    for name in TIMERS:
        ns = b["timers"][name][0] - a["timers"][name][0]
        calls = b["timers"][name][1] - a["timers"][name][1]
        raw[name] = (ns, calls)
    for rest, (outer, inner) in _REST.items():
        if all(raw[i][1] == 0 for i in inner):
            continue  # not this kind of service
        ns, calls = raw[outer]
        raw[rest] = (ns - sum(raw[i][0] for i in inner), calls)
    for name, (ns, calls) in raw.items():
        if calls and wall_s > 0:
            out[name] = {"s": round(ns / 1e9, 3), "share": round(ns / 1e9 / wall_s, 3),
                         "calls": calls, "mean_ms": round(ns / calls / 1e6, 3)}
    return out


def raw_consume(broker: Broker, topic: str, limit_s: float, decode: bool,
                partitions: int) -> dict[str, Any]:
    """The applier's consumer settings and ``consume`` call, nothing else (optionally decode)."""
    c = Consumer({**broker.conf, "group.id": f"bench-raw-{run_id()}", "enable.auto.commit": False,
                  "isolation.level": "read_committed", "enable.partition.eof": True,
                  "fetch.max.bytes": 64 << 20})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    nbytes = records = 0
    eof: set[int] = set()
    t0 = time.perf_counter()
    try:
        while len(eof) < partitions and time.perf_counter() - t0 < limit_s:
            for msg in c.consume(2000, 0.02):
                err = msg.error()
                if err is not None:
                    partition = msg.partition()
                    if err.code() == KafkaError._PARTITION_EOF and partition is not None:
                        eof.add(partition)
                    continue
                value = msg.value() or b""
                if decode:
                    codec.decode(value, LOG_RECORDS)
                nbytes += len(value)
                records += 1
        elapsed = time.perf_counter() - t0
    finally:
        c.close()
    return {"row": "raw consumer" + (" + decode" if decode else ""), "mb_s": nbytes / MiB / elapsed,
            "bytes": nbytes, "records": records, "elapsed_s": round(elapsed, 3),
            "reached_end": len(eof) == partitions}
