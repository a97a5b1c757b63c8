"""fio through NBD: lowmark's asyncio server against ``nbdkit file``, on the same image.

    .venv/bin/python -m bench.nbd              # ~1.5 min, writes bench/results/nbd.json
    .venv/bin/python -m bench.nbd --quick      # ~20 s smoke run
    .venv/bin/python -m bench.nbd --export-factory pkg.mod:make_export   # + replication on
    .venv/bin/python -m bench.nbd --region-log-cost   # + replication with the region log off

``--region-log-cost`` adds ``lowmark-repl-nolog`` (the same replicating target with the
dirty-region log off) after ``lowmark-repl`` in every job and prints MB/s on/off per job;
on a shared machine compare the cpu us/io columns too. ``--cg-dir`` puts the replicating
CGs (image and region log) on a disk of your choice instead of tmpfs.

Targets, each a separate server process on a Unix socket (client and server never share
a GIL), each job run against each target back to back:

- ``nbdkit``: ``nbdkit file`` (C, multi-threaded): the baseline every ratio is against.
- ``lowmark-file``: our server with ``FileExport``, i.e. replication off: what the NBD
  layer costs on its own.
- ``lowmark-factory``: our server with the export built by ``--export-factory
  module:callable``, called as ``callable(image_path: str, name: str)`` and returning an
  ``Export`` (or an awaitable of one), e.g. the replicating volume adapter. Optional
  ``close()``/``aclose()`` on the export is called at shutdown. Two factories here
  measure the server's own async paths: ``bench.nbd:eager_export`` (coroutines that never
  suspend: the eager path, no task) and ``bench.nbd:yielding_export`` (each call yields
  once: a task per request).

Jobs (fio ``--ioengine=nbd``, ``--time_based``): 4 KiB randwrite at QD1 and QD16, 64 KiB
and 1 MiB sequential write at QD16. Reported: MB/s, IOPS, p50/p99 completion latency,
the server process's CPU time per I/O (user+sys; steadier than MB/s when other work
shares the machine) and the ratio of MB/s to nbdkit's. The image lives in /dev/shm when
there is one, so the numbers are about the NBD path, not the disk.

With replication on, Kafka's own producer (``bench.kafka_perf``) runs on the same broker
at each write size: the ceiling the replicating rows are reported against (MB/s and CPU
per MiB). Then the latency rows: 4 KiB randwrite and 64 KiB write at QD16, rate-limited
(fio ``--rate``) to 25, 50 and 75% of that ceiling, through ``nbdkit file`` and through
lowmark replicating, with p50/p99/p99.9 completion latency and lowmark's p99 over
nbdkit's at the same rate — the tail a workload below saturation sees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    kafka_bootstrap,
    print_table,
    process_cpu_s,
    stop_process,
    tmpfs_dir,
    write_results,
)
from bench.kafka_perf import JavaProducerRun, ceiling
from pipeline.errors import ConfigError, SetupError

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int
    rate_bytes_s: int = 0  # fio --rate: below saturation (0: as fast as it goes)
    share: float = 0.0  # of the ceiling, for the latency rows


REPLICATING = "bench.nbd:replicating_export"

JOBS = (
    Job("4k-randwrite-qd1", "randwrite", "4k", 1),
    Job("4k-randwrite-qd16", "randwrite", "4k", 16),
    Job("64k-write-qd16", "write", "64k", 16),
    Job("1m-write-qd16", "write", "1m", 16),
)
#: the latency rows: these jobs at these shares of Kafka's own producer's rate
LATENCY_JOBS = ("4k-randwrite-qd16", "64k-write-qd16")
LATENCY_SHARES = (0.25, 0.5, 0.75)


# --- the server side: `python -m bench.nbd serve ...` ---------------------------------------


def load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--export-factory {spec!r}: expected module:callable")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--export-factory {spec!r}: {exc}") from exc


async def serve(image: str, socket_path: str, factory: str | None) -> None:
    from connectors.nbd.file_export import FileExport
    from connectors.nbd.server import NbdServer, NbdServerConfig

    if factory:
        export = load_factory(factory)(image, "")
        if inspect.isawaitable(export):
            export = await export
    else:
        export = FileExport(image, "")
    server = NbdServer({"": export}, NbdServerConfig(host=None, port=None, unix_path=socket_path))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    print(json.dumps(server.stats.snapshot()), flush=True)
    if hasattr(export, "aclose"):
        await export.aclose()
    elif hasattr(export, "close"):
        export.close()


class _AsyncFile:
    """FileExport behind coroutines; ``yields`` makes every call suspend once."""

    def __init__(self, image: str, name: str, yields: bool) -> None:
        from connectors.nbd.file_export import FileExport

        self.inner = FileExport(image, name)
        self.name, self.size, self.description = name, self.inner.size, self.inner.description
        self.read_only, self.can_multi_conn = False, True
        self.yields = yields

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        if self.yields:
            await asyncio.sleep(0)
        self.inner.write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        if self.yields:
            await asyncio.sleep(0)
        self.inner.write_zeroes(offset, length, fua, may_trim)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        if self.yields:
            await asyncio.sleep(0)
        self.inner.trim(offset, length, fua)

    async def flush(self) -> None:
        if self.yields:
            await asyncio.sleep(0)
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def eager_export(image: str, name: str) -> _AsyncFile:
    return _AsyncFile(image, name, yields=False)


def yielding_export(image: str, name: str) -> _AsyncFile:
    return _AsyncFile(image, name, yields=True)


# --- the client side --------------------------------------------------------------------


@contextlib.contextmanager
def started(cmd: list[str], socket_path: Path, log_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Run a server process until the block ends; wait until it accepts connections.
    Its output goes to ``log_path`` (a pipe nobody reads could block it)."""
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=log_file, text=True)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-2000:]
                raise SetupError(f"{' '.join(cmd)} did not start:\n{tail}")
            time.sleep(0.05)
        yield proc
    finally:
        stop_process(proc, 20, name=cmd[0])


def run_fio(uri: str, job: Job, size: str, runtime_s: float, out: Path) -> dict[str, Any]:
    cmd = [
        "fio",
        f"--name={job.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--size={size}",
        f"--runtime={runtime_s:g}",
        "--time_based",
        "--output-format=json",
        f"--output={out}",
        *([f"--rate={job.rate_bytes_s}"] if job.rate_bytes_s else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime_s + 60)
    if proc.returncode != 0:
        raise SetupError(f"fio failed ({proc.returncode}): {proc.stderr[-2000:]}")
    w = json.loads(out.read_text())["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {
        "ios": w["total_ios"],
        "mb_s": w["bw_bytes"] / 1e6,
        "iops": w["iops"],
        "p50_us": pct.get("50.000000", 0) / 1e3,
        "p99_us": pct.get("99.000000", 0) / 1e3,
        "p999_us": pct.get("99.900000", 0) / 1e3,
    }


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lowmark-bench-nbd-", dir=tmpfs_dir()))


class ReplicatingExport:
    """A lowmark volume (VolumeExport) in a fresh CG of its own: replication on.

    ``region_bytes`` overrides the dirty-region log's granularity (0: the log off). The
    CG's directory (its image and state, the region log's files among them) is next to
    ``image`` unless ``LOWMARK_BENCH_CG_DIR`` names a parent for it (a real disk, to see
    what the log's fdatasyncs cost there)."""

    def __init__(self, image: str, name: str, region_bytes: int | None = None) -> None:
        import uuid

        from pipeline.primary.nbd_volume import VolumeExport
        from pipeline.primary.volume import ConsistencyGroup

        bootstrap = os.environ["LOWMARK_BOOTSTRAP_SERVERS"]
        size = Path(image).stat().st_size
        cg_name = f"bench-nbd-{uuid.uuid4().hex[:8]}"
        parent = os.environ.get("LOWMARK_BENCH_CG_DIR")
        self.cg_dir = Path(parent) / cg_name if parent else Path(image).with_suffix(".cg")
        options: dict[str, Any] = {} if region_bytes is None else {"region_bytes": region_bytes}
        self.cg = ConsistencyGroup.open(
            cg_name, self.cg_dir, {"bootstrap.servers": bootstrap}, **options
        )
        self.inner = VolumeExport(self.cg.create_volume("bench", size))
        self.name, self.size, self.description = name, size, self.inner.description
        self.read_only, self.can_multi_conn = False, True
        for attr in ("pread", "write", "write_zeroes", "trim", "flush"):
            setattr(self, attr, getattr(self.inner, attr))

    def close(self) -> None:
        if self.cg.regions is not None:
            print(json.dumps({"region_log": self.cg.regions.metrics()}), flush=True)
        self.cg.close()
        if os.environ.get("LOWMARK_BENCH_CG_DIR"):
            shutil.rmtree(self.cg_dir, ignore_errors=True)


def replicating_export(image: str, name: str) -> ReplicatingExport:
    return ReplicatingExport(image, name)


def replicating_export_no_region_log(image: str, name: str) -> ReplicatingExport:
    """Replication on, the dirty-region log off: what the log costs is the difference."""
    return ReplicatingExport(image, name, region_bytes=0)


NO_REGION_LOG = "bench.nbd:replicating_export_no_region_log"


def bench(args: argparse.Namespace) -> int:
    if args.export_factory == REPLICATING and not args.no_replication:
        with kafka_bootstrap("bench-nbd") as broker:
            os.environ["LOWMARK_BOOTSTRAP_SERVERS"] = broker.bootstrap
            return _bench(args)
    if args.no_replication:
        args.export_factory = None
    return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} is not installed (apt-get install {tool})")
    runtime = 2.0 if args.quick else args.runtime
    work = scratch_dir()
    targets: list[tuple[str, list[str]]] = [
        ("nbdkit", ["nbdkit", "-f", "-U", "{sock}", "file", "{img}"]),
        ("lowmark-file", [sys.executable, "-m", "bench.nbd", "serve", "{img}", "{sock}"]),
    ]
    if args.export_factory:
        load_factory(args.export_factory)  # fail here, not in the child
        cmd = [sys.executable, "-m", "bench.nbd", "serve", "{img}", "{sock}", args.export_factory]
        label = "lowmark-repl" if args.export_factory == REPLICATING else "lowmark-factory"
        targets.append((label, cmd))
        if args.region_log_cost and args.export_factory == REPLICATING:
            # the same replicating target with the dirty-region log off, back to back
            cmd = [sys.executable, "-m", "bench.nbd", "serve", "{img}", "{sock}", NO_REGION_LOG]
            targets.append(("lowmark-repl-nolog", cmd))
    if args.cg_dir:
        os.environ["LOWMARK_BENCH_CG_DIR"] = args.cg_dir
    rows: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    try:
        for job in JOBS:
            for target, template in targets:
                rows.append(run_target(job, target, template, args, work, runtime))
        java = java_ceiling(args, runtime)
        # below saturation: the same rate through nbdkit and through lowmark, replicating
        for job in rate_jobs(java):
            for target, template in targets:
                if target in ("nbdkit", "lowmark-repl"):
                    latency.append(run_target(job, target, template, args, work, runtime))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {r["job"]: r["mb_s"] for r in rows if r["target"] == "nbdkit"}
    for r in rows:
        r["ratio"] = r["mb_s"] / base[r["job"]] if base.get(r["job"]) else None
        add_java_ratios(r, java.get(JOB_BYTES[r["job"]]))
    print()
    print_table(
        ["job", "target", "MB/s", "IOPS", "p50 us", "p99 us", "cpu us/io", "vs nbdkit",
         "vs java", "cpu/MiB vs java"],
        [
            [
                r["job"],
                r["target"],
                r["mb_s"],
                r["iops"],
                r["p50_us"],
                r["p99_us"],
                r["server_cpu_us_per_io"],
                r["ratio"],
                r.get("x_java"),
                r.get("cpu_per_mib_x_java"),
            ]
            for r in rows
        ],
    )
    if latency:
        add_latency_ratios(latency)
        print("\nlatency below saturation: fio --rate at a share of Kafka's own producer")
        print_table(
            ["job", "share", "target", "rate MB/s", "MB/s", "p50 us", "p99 us", "p99.9 us",
             "p99 x nbdkit"],
            [[r["job"], r["share"], r["target"], r["rate_mb_s"], r["mb_s"], r["p50_us"],
              r["p99_us"], r["p999_us"], r.get("p99_x_nbdkit")] for r in latency],
        )  # fmt: skip
    cost = region_log_cost(rows)
    if cost:
        print("\ndirty-region log: MB/s with it / without it (goal >= 0.95)")
        for job_name, ratio in cost.items():
            print(f"  {job_name:18s} {ratio:6.3f}")
    path = write_results(
        "nbd",
        {
            "config": {
                "runtime_s": runtime,
                "image_mib": args.size_mib,
                "export_factory": args.export_factory,
                "transport": "unix socket",
                "cg_dir": args.cg_dir or "tmpfs, next to the image",
            },
            "results": rows,
            "latency": latency,
            "java_producer": {str(k): v.as_dict() for k, v in java.items()},
            "region_log_ratio": cost,
        },
    )
    print(f"\nwrote {path}")
    return 0


JOB_BYTES = {j.name: {"4k": 4096, "64k": 65536, "1m": 1 << 20}[j.bs] for j in JOBS}


def run_target(job: Job, target: str, template: list[str], args: argparse.Namespace,
               work: Path, runtime: float) -> dict[str, Any]:  # fmt: skip
    """One fio job against one target, on a fresh image and a fresh server."""
    img = work / f"{target}.img"
    sock = work / f"{target}.sock"
    with img.open("wb") as f:
        f.truncate(args.size_mib << 20)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    cmd = [part.format(img=img, sock=sock) for part in template]
    with started(cmd, sock, work / f"{target}.log") as proc:
        cpu0 = process_cpu_s(proc.pid) or 0.0
        result = run_fio(f"nbd+unix:///?socket={sock}", job, f"{args.size_mib}M", runtime,
                         work / "fio.json")  # fmt: skip
        # Server CPU per I/O: steadier than MB/s on a machine shared with other work, and
        # what a second core would buy back.
        cpu = (process_cpu_s(proc.pid) or 0.0) - cpu0
        result["server_cpu_us_per_io"] = cpu * 1e6 / max(1, result["ios"])
        result["server_cpu_s"], result["seconds"] = cpu, runtime
    img.unlink()
    row = {"target": target, "job": job.name, **result}
    if job.rate_bytes_s:
        row |= {"share": job.share, "rate_mb_s": job.rate_bytes_s / 1e6}
    print(f"  {job.name:18s} {target:16s} {result['mb_s']:9.1f} MB/s"
          + (f"  (rate {job.rate_bytes_s / 1e6:.1f}, p99 {result['p99_us']:.0f} us)"
             if job.rate_bytes_s else ""), flush=True)  # fmt: skip
    return row


def rate_jobs(java: dict[int, JavaProducerRun]) -> list[Job]:
    """The latency rows' jobs: each latency job at each share of Kafka's own producer's
    rate at that write size (none without the ceiling)."""
    out = []
    for job in JOBS:
        run = java.get(JOB_BYTES[job.name])
        if job.name not in LATENCY_JOBS or run is None or not run.mib_per_s:
            continue
        for share in LATENCY_SHARES:
            rate = int(share * run.mib_per_s * (1 << 20))
            out.append(Job(job.name, job.rw, job.bs, job.iodepth, rate, share))
    return out


def add_latency_ratios(rows: list[dict[str, Any]]) -> None:
    """Each lowmark row's p99 over nbdkit's at the same job and rate."""
    base = {(r["job"], r["share"]): r["p99_us"] for r in rows if r["target"] == "nbdkit"}
    for r in rows:
        b = base.get((r["job"], r["share"]))
        r["p99_x_nbdkit"] = r["p99_us"] / b if b else None


def java_ceiling(args: argparse.Namespace, runtime_s: float) -> dict[int, JavaProducerRun]:
    """Kafka's own producer at each job's write size, on the broker the replicating
    target used (none without replication)."""
    bootstrap = os.environ.get("LOWMARK_BOOTSTRAP_SERVERS", "")
    if args.export_factory != REPLICATING or not bootstrap or args.no_java:
        return {}
    print("\nKafka's own producer (ProducerPerformance), the same broker and settings:")
    return ceiling(bootstrap, sorted(set(JOB_BYTES.values())), max_s=15.0)


def add_java_ratios(row: dict[str, Any], run: JavaProducerRun | None) -> None:
    """A replicating row against Kafka's own producer: MB/s, and server CPU per MiB."""
    if run is None or not row["target"].startswith("lowmark-repl"):
        return
    row["x_java"] = row["mb_s"] / (run.mib_per_s * 1.048576) if run.mib_per_s else None
    mib = row["mb_s"] * 1e6 / (1 << 20) * row["seconds"]
    mine = row["server_cpu_s"] / mib if mib else None
    row["cpu_s_per_mib"] = mine
    theirs = run.cpu_s_per_mib
    row["cpu_per_mib_x_java"] = mine / theirs if mine is not None and theirs else None


def region_log_cost(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per job, lowmark-repl's MB/s over lowmark-repl-nolog's (1.0: the log is free)."""
    on = {r["job"]: r["mb_s"] for r in rows if r["target"] == "lowmark-repl"}
    off = {r["job"]: r["mb_s"] for r in rows if r["target"] == "lowmark-repl-nolog"}
    return {job: on[job] / off[job] for job in on if off.get(job)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        image, socket_path, *factory = argv[1:]
        asyncio.run(serve(image, socket_path, factory[0] if factory else None))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.nbd", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per job (~20 s total)")
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per job")
    parser.add_argument("--size-mib", type=int, default=1024, help="image size")
    parser.add_argument(
        "--export-factory",
        default=REPLICATING,
        help="module:callable building the replicating export (default: a lowmark volume "
        "replicating to an embedded Kafka, or LOWMARK_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument(
        "--no-replication", action="store_true", help="only nbdkit and lowmark without Kafka"
    )
    parser.add_argument(
        "--no-java", action="store_true", help="skip Kafka's own producer (the ceiling rows)"
    )
    parser.add_argument(
        "--region-log-cost",
        action="store_true",
        help="also run the replicating target with the dirty-region log off, and report "
        "the MB/s ratio on/off per job",
    )
    parser.add_argument(
        "--cg-dir",
        default="",
        help="where the replicating targets keep their CG (image, region log); default "
        "tmpfs next to the image, where an fdatasync costs nothing",
    )
    return bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
