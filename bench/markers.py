"""What a marker costs the writes: hold time, and write latency with markers beside without.

Two `lowmark serve` processes (two interceptors of one CG, one volume each) and `lowmark
watermark` on one host (``tests.system.marker_scene``); a fio job per volume
(``--ioengine=nbd``, 4 KiB random writes at queue depth 1, a fixed rate) is the
application. Two phases of the same length, in this order:

- **without**: fio alone;
- **with**: fio while `lowmark marker bench<rate> --every INTERVAL --json` takes markers.

Reported: the hold (how long each interceptor held new writes per marker: p50/p99/max of
the larger of the two per marker, and per interceptor), how long a marker took to complete
(QUIESCE sent to every QUIESCED read) and fio's completion latency p50/p99/p99.9/max in
both phases, with the ratio. The goal: p99 hold <= 10 ms (IBM Global Mirror's default
budget is 50 ms).

    python -m bench.markers [--seconds 20] [--rates 200,1000] [--interval 0.1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    kafka_bootstrap,
    percentile,
    print_table,
    run_id,
    tmpfs_dir,
    write_results,
)
from tests.system.marker_scene import Cluster

MiB = 1 << 20
SIZES = {"A": 64 * MiB, "B": 64 * MiB}


def fio(uri: str, seconds: float, rate_iops: int, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["fio", "--name=app", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--iodepth=1", f"--rate_iops={rate_iops}", "--size=64m", f"--runtime={seconds:g}",
         "--time_based", "--percentile_list=50:99:99.9", "--output-format=json",
         f"--output={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def fio_latency(out: Path) -> dict[str, Any]:
    w = json.loads(out.read_text())["jobs"][0]["write"]
    clat = w["clat_ns"]
    pct = clat.get("percentile", {})
    return {
        "ios": w["total_ios"],
        "iops": round(w["iops"], 1),
        "p50_us": round(pct.get("50.000000", 0) / 1e3, 1),
        "p99_us": round(pct.get("99.000000", 0) / 1e3, 1),
        "p99_9_us": round(pct.get("99.900000", 0) / 1e3, 1),
        "max_us": round(clat.get("max", 0) / 1e3, 1),
    }


def phase(
    cluster: Cluster, root: Path, name: str, args: argparse.Namespace, rate: int
) -> dict[str, Any]:
    outs = {iid: root / f"fio-{name}-{rate}-{iid}.json" for iid in ("a", "b")}
    procs = {iid: fio(cluster.uri(iid), args.seconds, rate, out)
             for iid, out in outs.items()}  # fmt: skip
    markers: list[dict[str, Any]] = []
    if name == "with":
        count = int(args.seconds / args.interval) - 5
        time.sleep(1)
        run = cluster.marker(f"bench{rate}", "--every", str(args.interval), "--count", str(count),
                             "--json", "--timeout-s", "5", timeout_s=args.seconds * 4)  # fmt: skip
        if run.returncode != 0:
            raise SystemExit(f"lowmark marker failed:\n{run.stderr[-3000:]}")
        markers = [json.loads(line) for line in run.stdout.splitlines()]
    for iid, p in procs.items():
        out, _ = p.communicate(timeout=args.seconds + 60)
        if p.returncode != 0:
            raise SystemExit(f"fio on {iid} failed:\n{out[-2000:]}")
    row: dict[str, Any] = {"phase": name, "fio": {iid: fio_latency(o) for iid, o in outs.items()}}
    if markers:
        holds = sorted(max(m["held_ms"].values()) for m in markers)
        per = {iid: sorted(m["held_ms"][iid] for m in markers) for iid in ("a", "b")}
        complete = sorted(m["phases_s"]["quiesce_s"] * 1000 for m in markers)
        # each member logs how long the slowest step of a marker took to reach it
        lags = sorted(e["step_lag_ms"] for iid in ("a", "b") for e in _events(cluster, iid)
                      if e.get("msg") == "marker resumed" and e.get("step_lag_ms") is not None
                      and str(e.get("marker", "")).startswith(f"bench{rate}-"))  # fmt: skip
        row["markers"] = {
            "count": len(markers),
            "hold_ms": _pcts(holds),
            "hold_ms_by_interceptor": {iid: _pcts(v) for iid, v in per.items()},
            "complete_ms": _pcts(complete),
            "step_lag_ms": _pcts(lags) if lags else None,
        }
    return row


def _events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    out = []
    for line in cluster.log(name).splitlines():
        if line.startswith("{") and '"marker resumed"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _pcts(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3),
            "max": round(values[-1], 3)}  # fmt: skip


def bench(args: argparse.Namespace) -> int:
    with kafka_bootstrap("markers") as broker:
        root = Path(tempfile.mkdtemp(prefix="lowmark-bench-markers-", dir=tmpfs_dir()))
        cluster = Cluster(root, broker.bootstrap, f"bench-mk-{run_id()}", SIZES)
        try:
            cluster.up()
            deadline = time.monotonic() + 60
            while cluster.marker("probe", "--timeout-s", "2").returncode != 0:
                if time.monotonic() > deadline:
                    raise SystemExit("no marker could be taken within 60 s: see " + str(root))
                time.sleep(0.5)
            rows = []
            for rate in (int(r) for r in args.rates.split(",")):
                for name in ("without", "with"):
                    print(f"== {rate} IOPS per volume, markers: {name}", file=sys.stderr)
                    rows.append({"rate_iops": rate, **phase(cluster, root, name, args, rate)})
        finally:
            stop = threading.Thread(target=cluster.down)
            stop.start()
            stop.join(60)
    table, mtable = [], []
    for without, with_ in zip(rows[::2], rows[1::2], strict=True):
        rate = without["rate_iops"]
        for iid in ("a", "b"):
            w0, w1 = without["fio"][iid], with_["fio"][iid]
            table.append([rate, iid, w0["p50_us"], w1["p50_us"], w0["p99_us"], w1["p99_us"],
                          w0["p99_9_us"], w1["p99_9_us"], w0["max_us"], w1["max_us"],
                          round(w1["p99_us"] / max(w0["p99_us"], 1e-9), 2)])  # fmt: skip
        m = with_["markers"]
        lag = m["step_lag_ms"] or {"p50": None, "p99": None}
        mtable.append([rate, m["count"], m["hold_ms"]["p50"], m["hold_ms"]["p99"],
                       m["hold_ms"]["max"], m["complete_ms"]["p50"], m["complete_ms"]["p99"],
                       lag["p50"], lag["p99"], 10])  # fmt: skip
    print_table(["IOPS/vol", "fio on", "p50 us w/o", "p50 us with", "p99 us w/o",
                 "p99 us with", "p99.9 w/o", "p99.9 with", "max w/o", "max with",
                 "p99 ratio"], table)  # fmt: skip
    print()
    print_table(["IOPS/vol", "markers", "hold p50 ms", "hold p99 ms", "hold max ms",
                 "complete p50 ms", "complete p99 ms", "step trip p50 ms", "step trip p99 ms",
                 "goal p99 hold ms"], mtable)  # fmt: skip
    path = write_results("markers", {
        "settings": {"seconds": args.seconds, "rates_iops_per_volume": args.rates,
                     "interval_s": args.interval, "interceptors": 2, "block": "4k randwrite QD1",
                     "broker": "embedded" if broker.embedded else "external"},
        "goal_p99_hold_ms": 10,
        "rows": rows,
    })  # fmt: skip
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.markers",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rates", default="200,1000", help="fio's rates per volume, IOPS")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between markers")
    return bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
