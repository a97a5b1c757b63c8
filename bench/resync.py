"""``lowmark failback --source-dir`` after an unplanned failover: what it copies, how fast,
and what it costs the new primary's clients.

    .venv/bin/python -m bench.resync                      # 256 MiB volume, ~40 MiB diverged
    .venv/bin/python -m bench.resync --size-mib 64 --diverged-mib 8 --max-rate-mib 4

The scene is the system tests' (``tests.system.resync_helpers.build``, on an embedded
broker or ``$LOWMARK_BOOTSTRAP_SERVERS``): the old primary writes above a frozen cut and
leaves an unreplicated tail marked in its dirty-region log (at 64 KiB regions: the scene's
primary runs without the 4 MiB activity log, whose active extents a crash would mark
whole), dies; ``lowmark failover --force`` makes dr1 the primary, whose clients then
write through NBD (qemu-io). Then:

- **baseline**: fio 4 KiB random writes at queue depth 1 on dr1's NBD export (over its
  first 16 MiB, counted as diverged), no resync;
- **during**: the same fio while ``resync`` (in this process, ``--max-rate``) runs.

Reported: the plan's copied bytes over the diverged regions the scene wrote (at 64 KiB),
bytes read from dr1's images, the copy's MB/s against its limit (copy phase only: bytes
read over the time from the first piece to the last), the whole resync's wall time, and
fio's p50 / p99 write latency in both runs. Writes ``bench/results/resync.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, kafka_bootstrap, print_table, tmpfs_dir, write_results
from bench.nbd import Job, run_fio
from pipeline.ops.resync import Progress, ResyncConfig, ResyncResult, resync
from tests.system.resync_helpers import RB, build

FIO = Job("4k-randwrite-qd1", "randwrite", "4k", 1)
FIO_MIB = 16


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    diverged = args.diverged_mib * MiB
    with kafka_bootstrap("bench-resync") as broker:
        root = Path(tempfile.mkdtemp(prefix="lowmark-bench-resync-", dir=tmpfs_dir()))
        conf = broker.conf
        rs = build(conf, f"bresync-{int(time.time())}", root, sizes={"a": size},
                   above_cut=diverged // 4, unreplicated=diverged // 4, seed=3)  # fmt: skip
        try:
            rs.write_new(diverged // 2)
            uri = rs.fo.uri("a")
            # fio writes the first FIO_MIB of the volume (so its writes diverge that much)
            base = run_fio(uri, FIO, f"{FIO_MIB}M", args.fio_s, root / "fio-base.json")
            rs.note("a", 0, FIO_MIB * MiB)
            known = len(rs.diverged["a"]) * RB
            progress = Progress()
            box: dict[str, Any] = {}
            copy_t: list[float] = []

            def line(text: str) -> None:
                if text.startswith("resync copy:"):
                    copy_t.append(time.monotonic())

            def go() -> None:
                t0 = time.monotonic()
                box["result"] = resync(
                    conf, rs.scene.cg, "prod", rs.prod_dir, rs.new_dir,
                    ResyncConfig(max_rate=args.max_rate_mib * MiB, reflink=False,
                                 progress_interval_s=0.2),
                    on_line=line, progress=progress,
                )  # fmt: skip
                box["wall_s"] = time.monotonic() - t0

            th = threading.Thread(target=go)
            th.start()
            time.sleep(0.5)  # the resync plans first (reads both logs): fio meets the copy
            during = run_fio(uri, FIO, f"{FIO_MIB}M", args.fio_s, root / "fio-during.json")
            th.join(600)
            result: ResyncResult = box["result"]
        finally:
            rs.close()
    copy_s = (copy_t[-1] - copy_t[0]) if len(copy_t) > 1 else float("nan")
    plan = result.plan.volumes[0]
    return {
        "volume_mib": args.size_mib,
        "mode": plan.mode.value,
        "diverged_regions_bytes": known,
        "planned_bytes": plan.planned_bytes,
        "copied_over_diverged": round(result.bytes_copied / known, 3),
        "bytes_read_from_source": result.bytes_read,
        "copy_mb_s": round(result.bytes_read / copy_s / 1e6, 2) if copy_s == copy_s else None,
        "limit_mb_s": round(args.max_rate_mib * MiB / 1e6, 2),
        "resync_wall_s": round(box["wall_s"], 2),
        "fio_baseline": base,
        "fio_during_resync": during,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--diverged-mib", type=int, default=40)
    p.add_argument("--max-rate-mib", type=int, default=8)
    p.add_argument("--fio-s", type=float, default=4.0)
    args = p.parse_args(argv)
    row = run(args)
    print_table(
        ["volume", "mode", "diverged", "copied/diverged", "read", "MB/s (limit)", "wall",
         "p99 w/o", "p99 during"],
        [[f"{row['volume_mib']} MiB", row["mode"], f"{row['diverged_regions_bytes'] / MiB:.1f} MiB",
          row["copied_over_diverged"], f"{row['bytes_read_from_source'] / MiB:.1f} MiB",
          f"{row['copy_mb_s']} ({row['limit_mb_s']})", f"{row['resync_wall_s']} s",
          f"{row['fio_baseline']['p99_us']:.0f} us",
          f"{row['fio_during_resync']['p99_us']:.0f} us"]],
    )  # fmt: skip
    path = write_results("resync", {"args": vars(args), "rows": [row]})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
