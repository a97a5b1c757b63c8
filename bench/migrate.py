"""Volume migration: the I/O pause a client sees, and the bulk copy's speed.

Two ``lowmark serve`` of one CG (plus its watermark service and a backup site) on this
machine; a volume with data on it is migrated back and forth while a two-path client
(``tests/system/nbd_paths.PathWriter``: QD1 4 KiB writes that go to the other path on
ESHUTDOWN, as a multipath initiator does) writes throughout.

Rows:
- ``baseline``: the client's longest gap between two acknowledgements over a window with
  no migration (the machine's own jitter, measured in the same run);
- ``migrate``: per migration, the coordinator's I/O pause (hold -> activate), the client's
  longest gap around it, and the steps' times;
- ``copy``: the migration's bulk copy rate against ``cp --sparse=always`` of the same
  image file (the baseline for reading it), both measured here.

    .venv/bin/python -m bench.migrate [--migrations 10] [--size-mib 256] [--fill-mib 128]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import kafka_bootstrap, percentile, print_table, write_results
from tests.system.migrate_helpers import TwoPrimaries
from tests.system.nbd_paths import PathWriter

VOLUME = "vol1"


def gaps(writer: PathWriter, start: float, end: float) -> float:
    """The longest time between two acknowledgements inside [start, end], in ms."""
    times = [s.replied for s in writer.log if s.outcome == "ok" and start <= s.replied <= end]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1e3


def pcts(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"p50": round(percentile(v, 50), 1), "p99": round(percentile(v, 99), 1),
            "max": round(v[-1], 1)} if v else {}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    with kafka_bootstrap("bench-migrate") as broker, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        two = TwoPrimaries(root, broker.bootstrap, f"bench-migrate-{int(time.time())}",
                           volumes=((VOLUME, f"{args.size_mib}MiB", "async"),))  # fmt: skip
        try:
            two.start_all()
            a, b = two.nbd["primary-a"], two.nbd["primary-b"]
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {args.fill_mib}M",
                            f"nbd://127.0.0.1:{a}/{VOLUME}"], check=True,
                           capture_output=True, timeout=300)  # fmt: skip
            image = root / "primary" / "images" / f"{VOLUME}.img"
            t0 = time.monotonic()
            subprocess.run(["cp", "--sparse=always", str(image), str(root / "cp.img")],
                           check=True, timeout=300)  # fmt: skip
            cp_s = time.monotonic() - t0
            (root / "cp.img").unlink()
            first = args.size_mib * 1024 // 4 - 1024  # the writer's blocks: the last 4 MiB
            writer = PathWriter([a, b], VOLUME, range(first, first + 1024)).start()
            time.sleep(1.0)
            w0 = time.monotonic()
            time.sleep(args.window_s)
            baseline = gaps(writer, w0, time.monotonic())
            rows, where = [], "primary-a"
            for _ in range(args.migrations):
                to = "primary-b" if where == "primary-a" else "primary-a"
                t0 = time.monotonic()
                res = two.migrate_ok(VOLUME, to)
                t1 = time.monotonic()
                time.sleep(args.window_s)
                rows.append({"to": to, "pause_ms": res["io_pause_s"] * 1e3,
                             "client_gap_ms": gaps(writer, t0, time.monotonic()),
                             "seconds": t1 - t0, "copied_bytes": res["copied_bytes"],
                             "cutover_ms": res["cutover_ms"]})  # fmt: skip
                where = to
            writer.stop()
        finally:
            two.kill_all()
    copy_rates = [r["copied_bytes"] / (1 << 20) / r["seconds"] for r in rows]
    return {
        "settings": vars(args),
        "baseline_client_gap_ms": round(baseline, 1),
        "pause_ms": pcts([r["pause_ms"] for r in rows]),
        "client_gap_ms": pcts([r["client_gap_ms"] for r in rows]),
        "migration_mib_per_s": pcts(copy_rates),
        "cp_mib_per_s": round(args.size_mib / cp_s, 1),
        "writes_acked": sum(1 for s in writer.log if s.outcome == "ok"),
        "reconnects": writer.reconnects,
        "migrations": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--fill-mib", type=int, default=128)
    ap.add_argument("--window-s", type=float, default=1.0, help="writer time after each move")
    args = ap.parse_args()
    out = run(args)
    base = out["baseline_client_gap_ms"]
    p, g = out["pause_ms"], out["client_gap_ms"]
    print_table(
        ["row", "p50", "p99", "max", "x baseline (max)"],
        [
            ["client gap, no migration (ms)", base, base, base, 1.0],
            ["coordinator's I/O pause (ms)", p["p50"], p["p99"], p["max"],
             round(p["max"] / max(base, 0.1), 1)],
            ["client's longest gap (ms)", g["p50"], g["p99"], g["max"],
             round(g["max"] / max(base, 0.1), 1)],
        ],
    )  # fmt: skip
    m = out["migration_mib_per_s"]
    ratio = round(m["p50"] / out["cp_mib_per_s"], 2) if out["cp_mib_per_s"] else None
    print(f"whole migration {m['p50']} MiB/s of volume (p50) vs cp --sparse {out['cp_mib_per_s']}"
          f" MiB/s: {ratio}x; {out['writes_acked']} writes acked, {out['reconnects']} reconnects")
    out["migration_vs_cp"] = ratio
    print(write_results("migrate", out))


if __name__ == "__main__":
    main()
