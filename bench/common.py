"""Helpers shared by the bench scripts: a broker, numbers, a table, a results file.

- :func:`kafka_bootstrap` yields bootstrap servers: ``$LOWMARK_BOOTSTRAP_SERVERS`` when set
  (an existing cluster; nothing is started or stopped), otherwise a 1-node embedded KRaft
  cluster started for the run with ``connectors.embedded_kafka.cluster.KafkaCluster`` and wiped at
  the end (a bench writes gigabytes; keeping them helps nobody).
- :func:`summarize_ns` / :func:`percentile` turn latency samples into p50/p99/max.
- :class:`CpuMeter` reads per-thread CPU time from ``/proc`` so a result can say where the
  cores went (writers, the tick thread, librdkafka, other processes on the machine).
- :func:`running_watermark_service` runs a CG's watermark service in a child process
  (sync writes are acknowledged only once a published W covers them).
- :func:`print_table` renders rows; :func:`write_results` writes
  ``bench/results/<name>.json`` with machine info, git commit and timestamp.
- Small pieces more than one bench needs: :func:`random_pool` (write payloads),
  :func:`cg_topic_names`, :func:`tmpfs_dir`, :func:`profile_top`, :func:`stop_process`.
"""

from __future__ import annotations

import contextlib
import cProfile
import datetime as dt
import io
import json
import logging
import os
import platform
import pstats
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from connectors.kafka.topics import CgTopics
from pipeline.errors import KafkaUnavailableError, SetupError
from pipeline.watermark.publisher import latest_watermark

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
BOOTSTRAP_ENV = "LOWMARK_BOOTSTRAP_SERVERS"
MiB = 1 << 20
# threading name prefix -> CpuMeter group; a bench without such a thread shows no such group
CPU_GROUPS = {"bench-writer": "writers", "lowmark-tick": "tick", "bench-sampler": "sampler",
              "MainThread": "main"}

log = logging.getLogger("lowmark.bench")


# --------------------------------------------------------------------------- broker


@dataclass
class Broker:
    """Where the bench sends its records, and whether the bench owns the cluster."""

    bootstrap: str
    embedded: bool
    pids: list[int] = field(default_factory=list)  # broker JVMs we started (for CPU)

    @property
    def conf(self) -> dict[str, str]:
        return {"bootstrap.servers": self.bootstrap}


@contextlib.contextmanager
def kafka_bootstrap(name: str = "bench", timeout_s: float = 90) -> Iterator[Broker]:
    """An existing cluster named by ``$LOWMARK_BOOTSTRAP_SERVERS``, or an embedded one."""
    external = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if external:
        wait_for_broker(external, timeout_s=15)
        yield Broker(external, embedded=False)
        return
    from connectors.embedded_kafka.cluster import KafkaCluster  # late: needs java only here

    cluster = KafkaCluster(f"{name}-{os.getpid()}", nodes=1, die_with_parent=True)
    print(f"starting an embedded 1-node Kafka ({cluster.base_dir}); set {BOOTSTRAP_ENV} "
          "to use a running cluster instead", file=sys.stderr)
    cluster.start(timeout_s=timeout_s, fresh=True)
    try:
        pids = [p for p in cluster.node_pids.values() if p]
        yield Broker(cluster.bootstrap_servers, embedded=True, pids=pids)
    finally:
        cluster.wipe()


def wait_for_broker(bootstrap: str, timeout_s: float) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailableError(
            f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f}s ({exc}); "
            f"fix {BOOTSTRAP_ENV} or unset it to start an embedded cluster"
        ) from None


def delete_topics(bootstrap: str, names: Sequence[str], timeout_s: float = 30) -> None:
    """Delete topics this run created; a failure is reported, never fatal."""
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, fut in admin.delete_topics(list(names), operation_timeout=timeout_s).items():
        try:
            fut.result()
        except KafkaException as exc:
            log.warning("could not delete bench topic %s: %s", name, exc)


def log_writes(
    conf: dict[str, Any], topic: str, since: dict[int, int], volume_id: str,
    timeout_s: float = 120,
) -> dict[str, int]:
    """What a lowmark log topic holds for ``volume_id`` after the offsets ``since``
    (``end_offsets`` taken before the writes), read back committed and decoded: records,
    writes (first fragments) and data bytes. The bench's durability evidence comes from
    Kafka, not from the engine's counters of what it sent."""
    from connectors.kafka.reading import end_offsets, iter_range  # late: bench-only reads
    from schemas import codec
    from schemas.records import Write

    out = {"records": 0, "writes": 0, "data_bytes": 0}
    for partition, end in end_offsets(conf, topic).items():
        start = since.get(partition, 0)
        if end <= start:
            continue
        for msg in iter_range(conf, topic, partition, start, end, timeout_s):
            rec = codec.decode(msg.value())
            if not isinstance(rec, Write) or rec.volume_id != volume_id:
                continue
            out["records"] += 1
            for extent in rec.extents:
                out["writes"] += extent.fragment_index == 0
                out["data_bytes"] += len(extent.data)
    return out


def run_id() -> str:
    """A short unique name part, so runs against a shared broker never share topics."""
    return f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"


def cg_topic_names(cg: str) -> list[str]:
    """Every topic of a CG, to delete at the end of a run on a cluster the bench does not own."""
    t = CgTopics(cg)
    return [t.log, t.progress, t.watermark, t.checkpoints, t.deadletter]


# --------------------------------------------------------------------------- workload


def random_pool(size: int, total: int = 16 * MiB, seed: int = 7) -> list[bytes]:
    """Distinct random write payloads of ``size`` bytes, about ``total`` in all (at least 8):
    lz4 gains nothing on them, as on most real block data."""
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(max(8, total // size))]


def tmpfs_dir() -> Path | None:
    """``/dev/shm`` when it is there and writable, else None (the system's temp directory)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def profile_top(sources: Sequence[cProfile.Profile | Path | None], n: int = 25) -> str:
    """The ``n`` functions with the most own time (tottime) over one or more cProfile runs
    (profilers, or stats files a child wrote); a missing source is passed over."""
    live = [s for s in sources if s is not None and not (isinstance(s, Path) and not s.exists())]
    if not live:
        return ""
    buf = io.StringIO()
    stats = pstats.Stats(_stats_source(live[0]), stream=buf)
    for s in live[1:]:
        stats.add(_stats_source(s))
    stats.strip_dirs().sort_stats("tottime").print_stats(n)
    return buf.getvalue()


def _stats_source(source: cProfile.Profile | Path) -> cProfile.Profile | str:
    return str(source) if isinstance(source, Path) else source


def stop_process(proc: subprocess.Popen[Any], timeout_s: float, sig: int = signal.SIGTERM,
                 name: str = "") -> None:
    """Send ``sig`` to a child (SIGTERM: let it close cleanly) and wait for it; kill it if it
    has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0fs; killing it", name or proc.args, timeout_s)
        proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- numbers


def percentile(sorted_values: Sequence[int | float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100); NaN if empty."""
    if not sorted_values:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside 0..100")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n*q/100), at least 1
    return float(sorted_values[int(rank) - 1])


def summarize_ns(samples_ns: list[int]) -> dict[str, float]:
    """p50 / p99 / p999 / max / mean of latency samples in ns, reported in µs."""
    values = sorted(samples_ns)
    n = len(values)
    return {
        "count": n,
        "p50_us": percentile(values, 50) / 1e3,
        "p99_us": percentile(values, 99) / 1e3,
        "p999_us": percentile(values, 99.9) / 1e3,
        "max_us": (values[-1] / 1e3) if n else float("nan"),
        "mean_us": (sum(values) / n / 1e3) if n else float("nan"),
    }


# --------------------------------------------------------------------------- CPU


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_cpu_s(stat_text: str) -> float:
    # after "(comm)" the state is field 3; utime and stime are fields 14 and 15
    rest = stat_text.rsplit(")", 1)[-1].split()
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def thread_cpu_s() -> dict[int, tuple[str, float]]:
    """Per live thread of this process: native id -> (kernel thread name, CPU seconds)."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            out[int(task.name)] = (comm, _stat_cpu_s((task / "stat").read_text()))
        except (OSError, IndexError, ValueError):
            continue  # the thread ended while we looked
    return out


def process_cpu_s(pid: int) -> float | None:
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU seconds spent between ``start`` and ``stop``: per thread group of this process,
    per broker JVM we started, and by the rest of the machine (noise from other work).

    Python 3.11 does not name OS threads, so Python threads are grouped by their
    ``threading`` name prefix (``groups``); librdkafka names its own (``rdk:*``). A thread
    that exits before ``stop`` takes its /proc entry with it: such threads (writers) report
    their own ``time.thread_time()`` through ``extra``; whatever is still missing shows up
    as ``unaccounted`` (process total minus the groups).
    """

    def __init__(self, groups: dict[str, str], broker_pids: Sequence[int] = ()) -> None:
        self.groups = groups  # threading name prefix -> group name
        self.broker_pids = list(broker_pids)
        self._t0 = 0.0
        self._threads0: dict[int, tuple[str, float]] = {}
        self._own0 = 0.0
        self._brokers0: dict[int, float | None] = {}
        self._machine0 = (0.0, 0.0)

    def start(self) -> CpuMeter:
        self._t0 = time.perf_counter()
        self._threads0 = thread_cpu_s()
        self._own0 = _own_cpu_s()
        self._brokers0 = {p: process_cpu_s(p) for p in self.broker_pids}
        self._machine0 = machine_busy_s()
        return self

    def _group(self, native_id: int, comm: str, names: dict[int, str]) -> str:
        name = names.get(native_id, "")
        for prefix, group in self.groups.items():
            if name.startswith(prefix):
                return group
        return "rdkafka" if comm.startswith("rdk:") else "other"

    def stop(self, extra: dict[str, float] | None = None) -> dict[str, Any]:
        wall = time.perf_counter() - self._t0
        busy1, total1 = machine_busy_s()
        own = _own_cpu_s() - self._own0
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id}
        by_group: dict[str, float] = dict(extra or {})
        for tid, (comm, cpu) in thread_cpu_s().items():
            cpu0 = self._threads0.get(tid, (comm, 0.0))[1]
            group = self._group(tid, comm, names)
            by_group[group] = by_group.get(group, 0.0) + cpu - cpu0
        by_group["unaccounted"] = max(0.0, own - sum(by_group.values()))
        broker = 0.0
        for pid, broker0 in self._brokers0.items():
            broker1 = process_cpu_s(pid)
            if broker0 is not None and broker1 is not None:
                broker += broker1 - broker0
        machine_busy = busy1 - self._machine0[0]
        machine_total = total1 - self._machine0[1]
        out: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "process_s": round(own, 3),
            "threads_s": {k: round(v, 3) for k, v in sorted(by_group.items())},
            "machine_busy_frac": round(machine_busy / machine_total, 3) if machine_total else None,
            # what the rest of the machine (broker included) burnt while we measured
            "others_s": round(max(0.0, machine_busy - own), 3),
        }
        if self.broker_pids:
            out["broker_s"] = round(broker, 3)
        return out


# --------------------------------------------------------------------------- output


def fmt_num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Fixed-width text table; text columns left-aligned, numbers right-aligned."""
    cells = [[fmt_num(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [
        all(isinstance(r[i], int | float) or r[i] is None for r in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(render_table(headers, rows), flush=True)


def git_commit() -> dict[str, Any]:
    """HEAD and whether the work tree has changes (read-only git commands)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                                 text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status) if status is not None else None
    return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}


def machine_info() -> dict[str, Any]:
    import confluent_kafka

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "loadavg": list(os.getloadavg()),
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
    }


def write_results(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically, with machine, git and time added."""
    doc = {
        "bench": name,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine_info(),
        **payload,
    }
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise SetupError(f"cannot write bench results to {results_dir}: {exc}") from exc
    return path


# --------------------------------------------------------------------------- services


# the service as its own process, as deployed (`lowmark watermark`): in this process its
# fold would compete with the measured writers for the GIL
_WATERMARK_MAIN = """
import json, signal, sys, threading
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
svc = WatermarkService(WatermarkServiceConfig(cg=sys.argv[1]), json.loads(sys.argv[2]))
svc.start()
try:
    svc.run(stop)
finally:
    svc.close()
"""


@contextlib.contextmanager
def running_watermark_service(
    cg: str, kafka_conf: dict[str, Any], ready_timeout_s: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """The CG's watermark service in a child process for as long as the block; returns
    once it has published a W (the CG must be open), so no row pays for its start-up."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WATERMARK_MAIN, cg, json.dumps(kafka_conf)], cwd=REPO
    )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while latest_watermark(kafka_conf, cg, timeout_s=10) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SetupError(
                    f"the watermark service of CG {cg} published no W within "
                    f"{ready_timeout_s} s (exit status {proc.poll()}); see its output above"
                )
            time.sleep(0.2)
        yield proc
    finally:
        stop_process(proc, 30, name=f"the watermark service of CG {cg}")
