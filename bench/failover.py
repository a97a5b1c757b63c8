"""``lowmark failover`` against a backlog: time to the first read, to rolled forward, and
read latency while it rolls forward, beside the same reads after it and against nbdkit.

    .venv/bin/python -m bench.failover                    # 64, 256, 1024 MiB backlogs
    .venv/bin/python -m bench.failover --quick            # 16, 64 MiB, fewer reads
    .venv/bin/python -m bench.failover --sizes 256 --write-size-kib 64

For each backlog size, a fresh scene (``bench.failover_scene``): a 2-volume CG whose site
applied a small initial part and paused, then the backlog (random 256 KiB writes over both
volumes, each volume as large as the backlog), W past its last write, the primary dead.
Then, timed from the moment ``python -m pipeline.app.cli failover --force`` is spawned
(``subprocess.Popen``, NBD on a unix socket only, ``--listen ''``):

- **first read**: python3-libnbd (``bench.failover_reader``, a child of the system Python,
  already running and polling for the socket every 2 ms) connects and reads 4 KiB; the
  time is its read's answer (CLOCK_MONOTONIC) minus the spawn. Goal: <= 1 s (issue #12).
- the command's own step timings (``failover_*_s`` on its ``/metrics``, relative to its
  start inside the process, after Python's start-up and imports) and its log lines.
- **rolled forward**: when its ``rolled forward`` log line appears (polled every 20 ms).
- **reads**: 4 KiB reads at queue depth 1, paced (``--read-rate``), of spots spread over
  both volumes (half in backlog blocks: indexed; half uniform: mostly the site's image),
  cycling from the first read until rolled forward (``during``), then each spot once
  (``after``), then the same once against ``nbdkit file`` serving the site's images after
  the failover process stopped (``nbdkit``, the baseline). Every read's crc32 is checked
  against the dead primary's image (the cut: W passed its last write).

Data dirs go to /dev/shm when it has room for them, else a temp dir on disk (the JSON
says which). Writes ``bench/results/failover.json`` (``failover_quick.json`` with --quick,
``failover_<N>k.json`` with a non-default write size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Broker,
    MiB,
    delete_topics,
    kafka_bootstrap,
    percentile,
    print_table,
    run_id,
    stop_process,
    tmpfs_dir,
    write_results,
)
from bench.failover_scene import BLOCK, SITE, VOLUMES, Scene, pick_spots, site_with_backlog
from connectors.embedded_kafka.procs import free_port
from connectors.kafka.topics import CgTopics
from pipeline.app.metric_names import from_scrape
from pipeline.errors import SetupError

GOAL_FIRST_READ_S = 1.0
SYSTEM_PYTHON = "/usr/bin/python3"
READER_MAIN = "import sys; from bench.failover_reader import main; sys.exit(main())"
TIMING_KEYS = ("planned_s", "indexed_s", "committed_s", "serving_s", "first_read_s",
               "writes_s", "rolled_forward_s")
ROLLFORWARD_KEYS = ("bytes_total", "bytes_done", "extents_done", "batches", "elapsed_s",
                    "dropped_by_writes", "spilled_bytes")  # fmt: skip


# --------------------------------------------------------------------------- children


class ReaderProcess:
    """``bench.failover_reader`` under the system Python; its JSON lines in a queue."""

    def __init__(self, spots_file: Path) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", READER_MAIN, str(spots_file)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, name="bench-reader-out", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))
        self.lines.put({"ev": "exited", "code": self.proc.wait()})

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, ev: str, timeout_s: float = 600) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise SetupError(f"the NBD reader said nothing for {timeout_s:.0f} s") from None
        if msg.get("ev") != ev:
            raise SetupError(f"the NBD reader answered {msg} where {ev!r} was expected")
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send(cmd="quit")
        stop_process(self.proc, 10, name="the NBD reader")


class FailoverProcess:
    """``lowmark failover --force`` as an operator starts it, JSON log lines to a file."""

    def __init__(self, broker: Broker, scene: Scene, sock: Path, metrics: str) -> None:
        self.log_path = scene.root / "failover.log"
        cmd = [
            sys.executable, "-m", "pipeline.app.cli", "--log-format", "json", "failover",
            "--bootstrap-servers", broker.bootstrap, "--cg", scene.cg, "--site", SITE,
            "--data-dir", str(scene.site_dir), "--force", "--listen", "",
            "--unix-socket", str(sock), "--metrics", metrics,
        ]  # fmt: skip
        self._out = self.log_path.open("wb")
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._out, stderr=self._out)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines (the progress bar's ``\\r`` lines and echoes are skipped)."""
        out = []
        for raw in self.text().replace("\r", "\n").splitlines():
            start = raw.find('{"ts"')
            if start >= 0:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(raw[start:]))
        return out

    def wait_event(self, msg: str, timeout_s: float, poll_s: float = 0.02) -> float:
        """Monotonic time at which ``msg`` was first seen in the log."""
        deadline = time.monotonic() + timeout_s
        needle = f'"msg":"{msg}"'
        while True:
            if needle in self.text():
                return time.monotonic()
            if self.proc.poll() is not None:
                raise SetupError(f"lowmark failover exited {self.proc.returncode}:\n"
                                 f"{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise SetupError(f"no {msg!r} from lowmark failover within {timeout_s:.0f} s:"
                                 f"\n{self.text()[-4000:]}")
            time.sleep(poll_s)

    def stop(self) -> int:
        stop_process(self.proc, 60, name="lowmark failover")
        self._out.close()
        return self.proc.returncode


def scrape(port: int) -> dict[str, float]:
    """The command's own numbers (``failover_*_s``, ``rollforward_*``), by their keys, from
    its /metrics (labels dropped)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    got: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("lowmark_failover_") and "part=" not in line:
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                got[name.split("{", 1)[0]] = float(value)
    keys = [f"failover_{k}" for k in TIMING_KEYS] + [f"rollforward_{k}" for k in ROLLFORWARD_KEYS]
    return from_scrape("failover", got, keys)


# --------------------------------------------------------------------------- numbers


def lat_stats(samples: list[list[Any]], spots: list[tuple[str, int]], scene: Scene,
              ) -> dict[str, Any]:
    """p50/p99 of read latencies in µs, all and by kind of spot."""
    def summary(ns: list[int]) -> dict[str, Any]:
        ns = sorted(ns)
        return {"count": len(ns), "p50_us": round(percentile(ns, 50) / 1e3, 1),
                "p99_us": round(percentile(ns, 99) / 1e3, 1),
                "max_us": round(ns[-1] / 1e3, 1) if ns else None}

    by_kind: dict[str, list[int]] = {}
    for k, _start, ns, _crc in samples:
        vol, off = spots[k]
        by_kind.setdefault(scene.kind(vol, off), []).append(ns)
    out = summary([s[2] for s in samples])
    out["by_kind"] = {kind: summary(v) for kind, v in sorted(by_kind.items())}
    return out


def check_reads(samples: list[list[Any]], oracle: list[int], spots: list[tuple[str, int]],
                ) -> dict[str, Any]:
    bad = [(spots[k], crc) for k, _s, _ns, crc in samples if crc != oracle[k]]
    return {"reads": len(samples), "wrong": len(bad),
            "first_wrong": [f"{v}@{o}" for (v, o), _c in bad[:5]]}


def run_size(broker: Broker, args: argparse.Namespace, size_mib: int, base: Path,
             site_mode: str = "paused") -> dict[str, Any]:
    cg = f"bench-fo-{run_id()}"
    root = Path(tempfile.mkdtemp(prefix=f"lowmark-bench-failover-{size_mib}-", dir=base))
    write_size = args.write_size_kib * 1024
    print(f"== backlog {size_mib} MiB ({args.write_size_kib} KiB writes), site {site_mode}, "
          f"CG {cg}, in {root}", file=sys.stderr, flush=True)
    try:
        t = time.monotonic()
        with site_with_backlog(broker.conf, cg, root, backlog_bytes=size_mib * MiB,
                               write_size=write_size, seed=size_mib,
                               paused=site_mode == "paused") as scene:
            setup_s = time.monotonic() - t
            print(f"   scene built in {setup_s:.1f} s (backlog written in "
                  f"{scene.backlog_write_s:.1f} s); failing over", file=sys.stderr, flush=True)
            row = {"site": site_mode, **_measure(broker, args, scene)}
            row["setup_s"] = round(setup_s, 2)
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not broker.embedded and not args.keep_topics:
            names = []
            for gen in (0, 1):
                t_ = CgTopics(cg, gen)
                names += [t_.log, t_.progress, t_.watermark, t_.checkpoints, t_.deadletter]
            delete_topics(broker.bootstrap, names)


def _measure(broker: Broker, args: argparse.Namespace, scene: Scene) -> dict[str, Any]:
    spots = pick_spots(scene, args.spots)
    oracle = [scene.oracle_crc(v, o) for v, o in spots]
    spots_file = scene.root / "spots.json"
    spots_file.write_text(json.dumps({"length": BLOCK, "spots": spots}))
    sock = scene.root / "failover.sock"
    uris = {v: f"nbd+unix:///{v}?socket={sock}" for v in VOLUMES}
    first_vol, first_off = spots[0]
    port = free_port()
    reader = ReaderProcess(spots_file)
    fo: FailoverProcess | None = None
    try:
        ready = reader.expect("ready", 60)
        reader.send(cmd="connect", uris=uris, socket=str(sock), first=[first_vol, first_off],
                    timeout_s=600)
        reader.expect("waiting", 30)
        fo = FailoverProcess(broker, scene, sock, f"127.0.0.1:{port}")
        t0 = fo.spawned
        conn = reader.expect("connected", 600)
        reader.send(cmd="reads", mode="until_stop", rate=args.read_rate)
        rf_seen = fo.wait_event("rolled forward", args.timeout)
        reader.send(cmd="stop")
        during = reader.expect("reads", 120)
        metrics = scrape(port)
        reader.send(cmd="reads", mode="once", rate=args.read_rate)
        after = reader.expect("reads", 600)
        reader.send(cmd="close")
        reader.expect("closed", 30)
        events = fo.events()
        code = fo.stop()
        fo_text = fo.text()
        base = _baseline(reader, scene, args.read_rate)
    finally:
        if fo is not None and fo.proc.poll() is None:
            fo.stop()
        reader.close()
    fr = conn["first_read"]
    first_read_s = fr["end_mono"] - t0
    first_ok = fr["crc"] == scene.oracle_crc(first_vol, first_off)
    timings = {k: metrics.get(k if k.startswith("failover_") else f"failover_{k}")
               for k in TIMING_KEYS}
    internal_first = timings.get("first_read_s")
    ev = {e["msg"]: e for e in events}
    indexed = ev.get("backlog indexed", {})
    missing = [k for k, v in timings.items() if v is None]
    missing += [m for m in ("failover planned", "backlog indexed", "generation committed",
                            "new primary started", "serving", "first read answered",
                            "rolled forward") if m not in ev]
    checks = {"during": check_reads(during["samples"], oracle, spots),
              "after": check_reads(after["samples"], oracle, spots),
              "nbdkit": check_reads(base["samples"], oracle, spots)}
    reads_ok = first_ok and all(c["wrong"] == 0 for c in checks.values())
    during_window = [s for s in during["samples"] if s[1] + s[2] / 1e9 <= rf_seen]
    return {
        "backlog_mib": scene.backlog_bytes / MiB,
        "write_size": scene.write_size,
        "volume_bytes": scene.volume_bytes,
        "backlog": {
            "writes": scene.backlog_writes, "bytes": scene.backlog_bytes,
            "initial_writes": scene.initial_writes, "initial_bytes": scene.initial_bytes,
            "written_in_s": round(scene.backlog_write_s, 2),
            "w_wait_s": round(scene.w_wait_s, 2),
            "records": indexed.get("records"), "bytes_read": indexed.get("bytes_read"),
            "staged_ops": indexed.get("staged_ops"), "staged_bytes": indexed.get("staged_bytes"),
            "extents": indexed.get("extents"), "bytes_indexed": indexed.get("bytes_indexed"),
            "spilled_bytes": metrics.get("rollforward_spilled_bytes"),
            "indexed_blocks_frac": round(
                sum(b.count(1) for b in scene.blocks.values())
                / (len(VOLUMES) * scene.volume_bytes // BLOCK), 3),
        },
        "first_read_s": round(first_read_s, 3),
        "first_read_vs_goal": round(first_read_s / GOAL_FIRST_READ_S, 2),
        "first_read_ok": first_ok,
        "connect_attempts": conn["attempts"],
        "connected_s": round(conn["connected_mono"] - t0, 3),
        # spawn -> the command's own clock start (Python start-up, imports), estimated from
        # the first read: the reader's answer minus the command's failover_first_read_s
        "startup_s": round(first_read_s - internal_first, 3) if internal_first else None,
        "rolled_forward_s": round(rf_seen - t0, 3),
        "internal": timings,
        # the command's log lines, each with its at_s: where the time to the first read went
        "timeline": {m: e.get("at_s") for m, e in ev.items() if e.get("at_s") is not None},
        "rollforward": {k: metrics.get(f"rollforward_{k}") for k in ROLLFORWARD_KEYS},
        "reads": {
            "during": lat_stats(during_window, spots, scene),
            "after": lat_stats(after["samples"], spots, scene),
            "nbdkit": lat_stats(base["samples"], spots, scene),
        },
        "read_errors": {"during": during["errors"], "after": after["errors"],
                        "nbdkit": base["errors"]},
        "checks": checks,
        "reads_ok": reads_ok,
        "missing": missing,
        "exit_code": code,
        "reader": {"libnbd": ready.get("libnbd")},
        "failover_output_tail": fo_text[-1500:] if (missing or code or not reads_ok) else "",
    }


def _baseline(reader: ReaderProcess, scene: Scene, rate: float) -> dict[str, Any]:
    """The same reads against ``nbdkit file`` serving the site's images (rolled forward)."""
    images = scene.image(scene.site_dir, VOLUMES[0]).parent
    sock = scene.root / "nbdkit.sock"
    log = (scene.root / "nbdkit.log").open("w")
    proc = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(sock), "file", f"dir={images}"],
                            stdout=log, stderr=log)
    try:
        uris = {v: f"nbd+unix:///{scene.image(scene.site_dir, v).name}?socket={sock}"
                for v in VOLUMES}
        reader.send(cmd="connect", uris=uris, socket=str(sock), timeout_s=30)
        reader.expect("waiting", 30)
        reader.expect("connected", 60)
        reader.send(cmd="reads", mode="once", rate=rate)
        out = reader.expect("reads", 600)
        reader.send(cmd="close")
        reader.expect("closed", 30)
        return out
    finally:
        stop_process(proc, 10, name="nbdkit")
        log.close()


# --------------------------------------------------------------------------- the run


def data_base(sizes: list[int]) -> tuple[Path | None, str]:
    """/dev/shm when it (and free memory) hold the largest scene 2x over, else disk."""
    need = 6 * max(sizes) * MiB  # primary + site images, spill, the failover's memory
    shm = tmpfs_dir()
    if shm is not None:
        free = shutil.disk_usage(shm).free
        avail = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        if free >= 2 * need and avail >= 2 * need:
            return shm, f"tmpfs ({shm})"
    return None, f"disk ({tempfile.gettempdir()})"


def print_rows(rows: list[dict[str, Any]]) -> None:
    print_table(
        ["site", "backlog MiB", "writes", "records read", "extents", "first read s", "x goal",
         "startup s", "indexed s", "serving s", "committed s", "writes s", "rolled fwd s", "ok"],
        [[r["site"], r["backlog_mib"], r["backlog"]["writes"], r["backlog"]["records"],
          r["backlog"]["extents"], r["first_read_s"], r["first_read_vs_goal"], r["startup_s"],
          r["internal"]["indexed_s"], r["internal"]["serving_s"], r["internal"]["committed_s"],
          r["internal"]["writes_s"], r["rolled_forward_s"],
          "yes" if r["reads_ok"] and not r["missing"] else "NO"] for r in rows],
    )
    print()
    lat_rows = []
    for r in rows:
        for phase in ("during", "after", "nbdkit"):
            s = r["reads"][phase]
            kinds = s["by_kind"]
            lat_rows.append([r["site"], r["backlog_mib"], phase, s["count"], s["p50_us"],
                             s["p99_us"],
                             kinds.get("indexed", {}).get("p50_us"),
                             kinds.get("indexed", {}).get("p99_us"),
                             kinds.get("image", {}).get("p50_us"),
                             kinds.get("zero", {}).get("p50_us"),
                             r["checks"][phase]["wrong"]])
    print_table(["site", "backlog MiB", "reads", "n", "p50 us", "p99 us", "indexed p50",
                 "indexed p99", "image p50", "zero p50", "wrong"], lat_rows)


def bench(args: argparse.Namespace) -> int:
    if not Path(SYSTEM_PYTHON).exists() or shutil.which("nbdkit") is None:
        raise SetupError("needs /usr/bin/python3 with python3-libnbd and nbdkit "
                         "(apt-get install python3-libnbd nbdkit)")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SetupError(f"{SYSTEM_PYTHON} cannot import nbd (apt-get install python3-libnbd):"
                         f" {probe.stderr.strip()[-300:]}")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [16, 64] if args.quick else [64, 256, 1024])
    base, where = data_base(sizes)
    rows: list[dict[str, Any]] = []
    t = time.monotonic()
    load0 = os.getloadavg()
    with kafka_bootstrap("bench-failover") as broker:
        for mode, size in ((m, s) for m in args.site_modes.split(",") for s in sizes):
            rows.append(run_size(broker, args, size, base or Path(tempfile.gettempdir()), mode))
            r = rows[-1]
            print(f"   first read {r['first_read_s']:.3f} s, rolled forward "
                  f"{r['rolled_forward_s']:.2f} s, reads ok {r['reads_ok']}", file=sys.stderr,
                  flush=True)
    print()
    print_rows(rows)
    name = "failover" + ("_quick" if args.quick else "")
    if args.write_size_kib != 256:
        name += f"_{args.write_size_kib}k"
    path = write_results(name, {
        "settings": {"sizes_mib": sizes, "site_modes": args.site_modes.split(","),
                     "write_size_kib": args.write_size_kib,
                     "volumes": len(VOLUMES), "spots": args.spots, "read_rate": args.read_rate,
                     "data_dirs": where, "broker": "embedded" if broker.embedded else "external",
                     "transport": "unix socket", "goal_first_read_s": GOAL_FIRST_READ_S,
                     "loadavg_at_start": list(load0)},
        "wall_s": round(time.monotonic() - t, 1),
        "rows": rows,
    })
    print(f"\nwrote {path}")
    bad = [r for r in rows if not r["reads_ok"] or r["missing"] or r["exit_code"]]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="", help="backlog sizes in MiB, e.g. 64,256,1024")
    parser.add_argument("--quick", action="store_true", help="16 and 64 MiB, 600 spots")
    parser.add_argument("--site-modes", default="paused,stopped",
                        help="how the site waits: paused (its applier runs, staging the log; "
                        "the must-show case) and/or stopped (its applier exited: the cold case)")
    parser.add_argument("--write-size-kib", type=int, default=256, help="backlog write size")
    parser.add_argument("--spots", type=int, default=0, help="read spots (default 2000)")
    parser.add_argument("--read-rate", type=float, default=500.0,
                        help="reads per second at queue depth 1 (0: back to back)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds the failover gets to roll forward")
    parser.add_argument("--keep-topics", action="store_true",
                        help="with LOWMARK_BOOTSTRAP_SERVERS: keep the run's topics")
    args = parser.parse_args(argv)
    args.spots = args.spots or (600 if args.quick else 2000)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
