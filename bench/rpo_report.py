"""The report of bench.rpo: its tables, the goals, and ``bench/results/rpo*.json``.

Goals (from the issue): p99 applied RPO <= 50 ms at 50 % of max ingest; catch-up >= 2x
ingest. :func:`report` prints every table and writes the results file (``rpo_quick.json``
for a ``--quick`` run, so a smoke run never overwrites the numbers of the last full one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import Broker, print_table, write_results
from bench.rpo_run import Settings

GOAL_RPO_P99_MS = 50.0  # applied RPO p99 at 50 % of max ingest
GOAL_CATCHUP_RATIO = 2.0  # applier drain MB/s / ingest MB/s


def rpo_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["rate", "variant", "target MB/s", "ingest MB/s", "S p50", "S p99", "W p50", "W p99",
               "W max", "appl p50", "appl p99", "appl max", "appl MB/s", "appl CPU", "wm CPU",
               "blocked s"]
    out = []
    for r in rows:
        rpo = r["rpo"]
        out.append([f"{r['frac']:.0%}", r["variant"], r["target_mb_s"], r["ingest_mb_s"],
                    rpo["S"]["p50_ms"], rpo["S"]["p99_ms"], rpo["W"]["p50_ms"], rpo["W"]["p99_ms"],
                    rpo["W"]["max_ms"],
                    rpo["applied"]["p50_ms"], rpo["applied"]["p99_ms"], rpo["applied"]["max_ms"],
                    r["applier_mb_s"], r["applier_cpu"], r["wm_cpu"], r["blocked_s"]])
    return headers, out


def stage_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["rate", "variant", "S lag p50", "S lag p99", "W behind S p50", "p99",
               "applied behind W p50", "p99"]
    out = []
    for r in rows:
        rpo = r["rpo"]
        out.append([f"{r['frac']:.0%}", r["variant"], rpo["S"]["p50_ms"], rpo["S"]["p99_ms"],
                    rpo["W_behind_S"]["p50_ms"], rpo["W_behind_S"]["p99_ms"],
                    rpo["applied_behind_W"]["p50_ms"], rpo["applied_behind_W"]["p99_ms"]])
    return headers, out


def rate_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    mx = res["max_ingest"]
    cu = res["catchup"]
    ingest = cu["ingest_mb_s"]
    rows: list[list[Any]] = [
        ["max ingest (Kafka-durable)", mx["max_mb_s"], None],
        ["ingest during catch-up", ingest, 1.0],
        ["applier catch-up drain", cu["drain_mb_s"], cu["ratio"]],
    ]
    for b in res["baseline"]:
        rows.append([b["row"], b["mb_s"], b["mb_s"] / ingest if ingest else None])
    return ["row", "MB/s", "x ingest"], rows


def phase_table(title: str, phases: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = [[name, p["s"], p["share"], p["calls"], p["mean_ms"]]
            for name, p in sorted(phases.items(), key=lambda kv: -kv[1]["s"])]
    return [title, "s", "share", "calls", "mean ms"], rows


def goals(res: dict[str, Any]) -> dict[str, Any]:
    half = [r for r in res["levels"] if abs(r["frac"] - 0.5) < 1e-9]
    p99 = half[0]["rpo"]["applied"]["p99_ms"] if half else math.nan
    ratio = res["catchup"]["ratio"]
    return {
        "rpo_p99_ms_at_50pct": p99,
        "rpo_goal_ms": GOAL_RPO_P99_MS,
        "rpo_met": bool(p99 <= GOAL_RPO_P99_MS),
        "catchup_ratio": ratio,
        "catchup_goal": GOAL_CATCHUP_RATIO,
        "catchup_met": bool(ratio is not None and ratio >= GOAL_CATCHUP_RATIO
                            and res["catchup"]["caught_up"]),
    }


def report(s: Settings, broker: Broker, res: dict[str, Any], wall: float) -> Path:
    rows = res["levels"] + ([res["whatif"]] if "whatif" in res else [])
    h1, c1 = rpo_table(rows)
    h2, c2 = rate_table(res)
    h4, c4 = stage_table(rows)
    half = [r for r in res["levels"] if abs(r["frac"] - 0.5) < 1e-9] or res["levels"][:1]
    phase_tables = {
        "applier_catchup": phase_table("applier, catch-up", res["catchup"]["applier_phases"]),
        "applier_50pct": phase_table("applier, 50 % row", half[0]["applier_phases"]),
        "watermark_50pct": phase_table("watermark service, 50 % row", half[0]["wm_phases"]),
    }
    print(f"\nRPO in ms (p50/p99/max of now - physical(ts), sampled every {s.sample_ms:g} ms); "
          f"S = primary progress, W = published watermark, appl = applied at the backup")
    print_table(h1, c1)
    print("\nper stage, ms (per sample: S lag = now - S; W behind S = S - W; applied behind W)")
    print_table(h4, c4)
    print()
    print_table(h2, c2)
    for h, c in phase_tables.values():
        print()
        print_table(h, c)
    cpu = res["cpu"]
    print(f"\nmachine: {cpu['machine_busy_frac']:.0%} busy during the run; processes other "
          f"than this one used {cpu['others_s'] / cpu['wall_s']:.1f} cores on average "
          f"(services, broker, anything else running)")
    wt = res["watermark_topic"]
    print(f"watermark topic: {wt['records']:,} records, {wt['per_s']:g}/s ("
          f"{wt['per_s'] * 86400 / 1e6:.1f} M a day), all read again at every service start; "
          f"connectors.kafka.reading.latest() read them at {wt['latest_records_per_s']:,}/s")
    g = res["goals"]
    print(f"\ngoal: p99 applied RPO <= {GOAL_RPO_P99_MS:g} ms at 50 % of max ingest: "
          f"{'MET' if g['rpo_met'] else 'MISSED'} ({g['rpo_p99_ms_at_50pct']:.1f} ms)")
    print(f"goal: catch-up >= {GOAL_CATCHUP_RATIO:g}x ingest: "
          f"{'MET' if g['catchup_met'] else 'MISSED'} ({g['catchup_ratio'] or math.nan:.2f}x)")
    if res.get("profile"):
        print("\n--- cProfile of the applier during a second catch-up (tottime) ---")
        print(res["profile"])
    # a smoke run must not overwrite the numbers of the last full run
    path = write_results("rpo_quick" if s.quick else "rpo", {
        "settings": {**s.__dict__, "data_dir": str(s.data_dir) if s.data_dir else None},
        "broker": {"bootstrap": broker.bootstrap, "embedded": broker.embedded},
        "baseline": "confluent-kafka Consumer with the applier's settings (read_committed, "
                    "fetch.max.bytes 64 MiB, consume(2000, 0.02)) over the same log",
        "wall_s": round(wall, 1),
        **res,
        "tables": {"rpo": {"headers": h1, "rows": c1}, "stages": {"headers": h4, "rows": c4},
               "rates": {"headers": h2, "rows": c2},
                   **{k: {"headers": h, "rows": c} for k, (h, c) in phase_tables.items()}},
    })
    print(f"\n{wall:.0f} s; results in {path}")
    return path
