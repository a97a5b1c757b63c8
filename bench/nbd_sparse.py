"""Sparse copy: ``nbdcopy`` of a 1%-allocated 4 GiB image, with block status and without.

    .venv/bin/python -m bench.nbd_sparse            # ~1 min, writes bench/results/nbd_sparse.json
    .venv/bin/python -m bench.nbd_sparse --quick    # 1 GiB image, one copy per target

The image (in /dev/shm when there is one, so the disk does not set the pace) holds random
bytes in 1 MiB extents at random 1 MiB-aligned places, 1% of its size; the rest are
holes. Each target is a server process on a Unix socket, and ``nbdcopy`` copies the
image from it to a fresh file next to it (``--repeat`` times, the median reported):

- ``lowmark``: our server, ``FileExport``, structured replies and ``base:allocation``:
  nbdcopy asks BLOCK_STATUS and reads only the data.
- ``lowmark-holes``: structured replies without block status (``block_status=False``):
  nbdcopy reads every byte, and the server answers the holes with OFFSET_HOLE chunks
  without reading them.
- ``lowmark-simple``: structured replies off (``structured_replies=False``): every byte
  is read from the file and sent. The baseline the issue's ratio is against.
- ``nbdkit`` / ``nbdkit-no-sr``: ``nbdkit file`` as it comes, and with ``--no-sr`` (no
  structured replies, so no block status either): the outside reference for both.

Reported per target: the copy's wall time, the rate over the image size, the server's
CPU seconds, the bytes the server read for the copy (lowmark's counters) and the
destination's allocated bytes; every copy's content is checked against the source (the
digest of ``connectors.image.image``, which skips holes) and the run fails on a mismatch.
``speedup`` is ``lowmark-simple``'s median time over ``lowmark``'s (goal: >= 20).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import print_table, process_cpu_s, tmpfs_dir, write_results
from bench.nbd import started
from connectors.image.image import file_digest
from pipeline.errors import SetupError

MiB = 1 << 20
GOAL = 20.0


# --- the server side: `python -m bench.nbd_sparse serve IMG SOCK [flags]` ------------------


async def serve(image: str, socket_path: str, structured: bool, block_status: bool) -> None:
    from connectors.nbd.file_export import FileExport
    from connectors.nbd.server import NbdServer, NbdServerConfig

    export = FileExport(image, "", read_only=True)
    config = NbdServerConfig(
        host=None, port=None, unix_path=socket_path,
        structured_replies=structured, block_status=block_status,
    )  # fmt: skip
    server = NbdServer({"": export}, config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    print(json.dumps(server.stats.snapshot()), flush=True)
    export.close()


# --- the client side ----------------------------------------------------------------------


def make_image(path: Path, size: int, fraction: float, seed: int) -> int:
    """A sparse image with ``fraction`` of its 1 MiB slots filled; the data bytes."""
    rng = random.Random(seed)
    slots = rng.sample(range(size // MiB), max(1, round(size // MiB * fraction)))
    with path.open("wb") as f:
        f.truncate(size)
        for slot in sorted(slots):
            f.seek(slot * MiB)
            f.write(rng.randbytes(MiB))
    return len(slots) * MiB


def targets(img: Path, sock: Path) -> list[tuple[str, list[str]]]:
    serve_cmd = [sys.executable, "-m", "bench.nbd_sparse", "serve", str(img), str(sock)]
    return [
        ("lowmark", serve_cmd),
        ("lowmark-holes", [*serve_cmd, "--no-block-status"]),
        ("lowmark-simple", [*serve_cmd, "--no-structured"]),
        ("nbdkit", ["nbdkit", "-f", "-r", "-U", str(sock), "file", str(img)]),
        ("nbdkit-no-sr", ["nbdkit", "-f", "-r", "--no-sr", "-U", str(sock), "file", str(img)]),
    ]


def copy_once(sock: Path, dest: Path) -> float:
    dest.unlink(missing_ok=True)
    uri = f"nbd+unix:///?socket={sock}"
    t0 = time.perf_counter()
    proc = subprocess.run(["nbdcopy", uri, str(dest)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SetupError(f"nbdcopy failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def run_target(
    name: str, cmd: list[str], img: Path, sock: Path, work: Path, repeat: int, want: str
) -> dict[str, Any]:
    log_path = work / f"{name}.log"
    dest = work / "copy.img"
    sock.unlink(missing_ok=True)
    times: list[float] = []
    with started(cmd, sock, log_path) as proc:
        cpu0 = process_cpu_s(proc.pid) or 0.0
        for _ in range(repeat):
            times.append(copy_once(sock, dest))
            got = file_digest(dest)
            if got != want:
                raise SetupError(f"{name}: the copy differs from the image ({got} != {want})")
            allocated = os.stat(dest).st_blocks * 512
        cpu = (process_cpu_s(proc.pid) or 0.0) - cpu0
    stats: dict[str, Any] = {}
    if name.startswith("lowmark"):
        lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("{")]
        stats = json.loads(lines[-1]) if lines else {}
    dest.unlink(missing_ok=True)
    read = stats.get("bytes_read")
    holes = stats.get("bytes_read_holes", 0)
    return {
        "target": name,
        "median_s": statistics.median(times),
        "times_s": times,
        "server_cpu_s_per_copy": cpu / repeat,
        "asked_bytes_per_copy": read // repeat if read is not None else None,
        "read_bytes_per_copy": (read - holes) // repeat if read is not None else None,
        "block_status_requests": stats.get("requests", {}).get("block_status"),
        "dest_allocated_bytes": allocated,
    }


def bench(args: argparse.Namespace) -> int:
    for tool in ("nbdcopy", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install libnbd-bin nbdkit", file=sys.stderr)
            return 2
    size = (1 if args.quick else 4) << 30
    repeat = 1 if args.quick else args.repeat
    work = Path(tempfile.mkdtemp(prefix="lowmark-bench-sparse-", dir=tmpfs_dir()))
    try:
        img, sock = work / "sparse.img", work / "nbd.sock"
        data_bytes = make_image(img, size, args.fraction, args.seed)
        want = file_digest(img)
        rows = [
            run_target(name, cmd, img, sock, work, repeat, want) for name, cmd in targets(img, sock)
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["target"]: r for r in rows}
    speedup = by["lowmark-simple"]["median_s"] / by["lowmark"]["median_s"]
    nbdkit_speedup = by["nbdkit-no-sr"]["median_s"] / by["nbdkit"]["median_s"]
    print(f"image {size >> 30} GiB, {data_bytes / size:.1%} allocated ({data_bytes // MiB} MiB), "
          f"nbdcopy to a file, median of {repeat}")  # fmt: skip

    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / MiB:.0f}"

    print_table(
        ["target", "copy s", "GiB/s", "server cpu s", "asked MiB", "read MiB", "dest MiB"],
        [
            [r["target"], f"{r['median_s']:.3f}", f"{size / r['median_s'] / (1 << 30):.1f}",
             f"{r['server_cpu_s_per_copy']:.2f}", mib(r["asked_bytes_per_copy"]),
             mib(r["read_bytes_per_copy"]), mib(r["dest_allocated_bytes"])]
            for r in rows
        ],
    )  # fmt: skip
    verdict = "met" if speedup >= GOAL else "NOT met"
    print(f"speedup with block status: {speedup:.1f}x (goal >= {GOAL:g}x: {verdict}); "
          f"nbdkit's own: {nbdkit_speedup:.1f}x")  # fmt: skip
    if not args.quick:
        write_results("nbd_sparse", {
            "settings": {"size_bytes": size, "fraction": args.fraction, "seed": args.seed,
                         "repeat": repeat, "extent_bytes": MiB, "tool": "nbdcopy to a file"},
            "data_bytes": data_bytes,
            "rows": rows,
            "speedup": speedup,
            "nbdkit_speedup": nbdkit_speedup,
            "goal": GOAL,
        })  # fmt: skip
    return 0 if speedup >= GOAL or args.quick else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        image, socket_path, *flags = argv[1:]
        structured = "--no-structured" not in flags
        asyncio.run(serve(image, socket_path, structured, "--no-block-status" not in flags))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB, one copy per target")
    parser.add_argument("--repeat", type=int, default=3, help="copies per target")
    parser.add_argument("--fraction", type=float, default=0.01, help="allocated share")
    parser.add_argument("--seed", type=int, default=17)
    return bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
