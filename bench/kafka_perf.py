"""The ceiling: Kafka's own Java producer (``ProducerPerformance``) on the same broker.

On a 2-core machine the broker shares the cores with whatever feeds it, so the rate a
replicated write path can reach is what Kafka's own tuned producer reaches there, in the
same run, with the same acks, idempotence, compression, batching and record size. Every
write-path bench reports lowmark against it (``x java``), beside ``nbdkit file``.

``org.apache.kafka.tools.ProducerPerformance`` comes from the ``kafka-tools`` artifact in
the broker's pom (connectors/embedded_kafka/pom.xml), so its jars are the broker's own.
Its last line is the summary::

    100000 records sent, 25000.0 records/sec (97.66 MB/sec), 12.34 ms avg latency,
    200.00 ms max latency, 10 ms 50th, 20 ms 95th, 30 ms 99th, 40 ms 99.9th.

CPU is the JVM's user+sys over its whole life (``wait4``'s rusage: every thread), so a
run should be long enough (the default runs 25 s) that
start-up (~1 s of CPU with JIT) is small beside it; ``cpu_s_per_mib`` says what one
replicated MiB costs the client.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

MAIN = "org.apache.kafka.tools.ProducerPerformance"
_SUMMARY = re.compile(
    r"(?P<records>\d+) records sent, (?P<rps>[\d.]+) records/sec \((?P<mbps>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, (?P<p50>\d+) ms 50th, "
    r"(?P<p95>\d+) ms 95th, (?P<p99>\d+) ms 99th, (?P<p999>\d+) ms 99\.9th"
)
#: lowmark cuts a bigger write into records of at most this (InterceptorConfig
#: max_record_bytes: under the broker's 1 MiB message.max.bytes); Java sends the same
MAX_RECORD = 900 * 1024
_WINDOW = re.compile(
    r"(?P<records>\d+) records sent, (?P<rps>[\d.]+) records/sec \((?P<mbps>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency\.$", re.MULTILINE
)

#: the interceptor's producer settings (connectors/kafka/settings.py), as Java names them
LOWMARK_LIKE = {
    "acks": "all",
    "enable.idempotence": "true",
    "compression.type": "lz4",
    "linger.ms": "2",
    "batch.size": str(1 << 20),
    "max.request.size": str(16 << 20),
}
#: lowmark's settings, and the same uncompressed: the faster of the two is the ceiling
VARIANTS = (LOWMARK_LIKE, {**LOWMARK_LIKE, "compression.type": "none"})


@dataclass(frozen=True)
class JavaProducerRun:
    record_size: int
    records: int
    records_per_s: float
    mib_per_s: float  # Java's "MB/sec" is MiB (bytes / 1024 / 1024)
    latency_ms: dict[str, float]
    cpu_s: float | None
    wall_s: float
    props: dict[str, str]
    #: the other variants' runs at this size (``as_dict``), for the record
    alternatives: tuple[dict[str, Any], ...] = ()

    @property
    def cpu_s_per_mib(self) -> float | None:
        mib = self.records * self.record_size / (1 << 20)
        return self.cpu_s / mib if self.cpu_s is not None and mib else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_s_per_mib": self.cpu_s_per_mib}


def parse_summary(output: str) -> dict[str, float]:
    """The run's numbers: from its 5 s progress windows when it has two or more (the first,
    JIT warm-up, left out of the rate: the ceiling is the steady rate; no percentiles),
    else from the summary line (a short run, or one stopped on SIGINT, which the JVM
    ends without a summary). ``ValueError`` when neither is there."""
    found = list(_SUMMARY.finditer(output))
    windows = [{k: float(v) for k, v in m.groupdict().items()} for m in _WINDOW.finditer(output)]
    if found and len(windows) < 2:
        return {k: float(v) for k, v in found[-1].groupdict().items()}
    if not windows:
        raise ValueError(f"no ProducerPerformance summary in its output:\n{output[-2000:]}")
    steady = windows[1:] or windows
    return {"records": sum(w["records"] for w in windows),
            "rps": sum(w["rps"] for w in steady) / len(steady),
            "mbps": sum(w["mbps"] for w in steady) / len(steady),
            "avg": sum(w["avg"] for w in steady) / len(steady),
            "max": max(w["max"] for w in windows)}  # fmt: skip


def _wait_cpu_s(proc: subprocess.Popen[str], max_s: float | None) -> float:
    """Wait for ``proc`` (SIGINT after ``max_s``: the tool's shutdown hook still prints
    its summary) and return its user+sys CPU seconds, all threads, from wait4's rusage."""
    deadline = None if max_s is None else time.monotonic() + max_s
    while True:
        flags = os.WNOHANG if deadline is not None else 0
        pid, status, usage = os.wait4(proc.pid, flags)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if deadline is not None and time.monotonic() >= deadline:
            proc.send_signal(signal.SIGINT)
            deadline = None
        time.sleep(0.05)


def java_producer(
    libs: str,
    bootstrap: str,
    topic: str,
    record_size: int,
    *,
    total_bytes: int = 16 << 30,
    max_s: float = 25.0,
    props: Mapping[str, str] = LOWMARK_LIKE,
    transactional_ms: int | None = None,
    heap: str = "512m",
) -> JavaProducerRun:
    """Run Kafka's producer perf tool once against ``topic`` (created by the caller, like
    lowmark's log: one partition per volume) and return its summary.

    ``transactional_ms``: commit a transaction every that many ms, as the interceptor's
    tick does. The run ends after ``total_bytes`` or ``max_s`` (SIGINT: the tool still
    prints its summary of what it sent)."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java is not installed (make deps installs it)")
    records = max(1, total_bytes // record_size)
    settings = {"bootstrap.servers": bootstrap, **props}
    cmd = [java, f"-Xmx{heap}", "-cp", f"{libs}/*", MAIN, "--topic", topic,
           "--num-records", str(records), "--record-size", str(record_size),
           "--throughput", "-1", "--producer-props",
           *(f"{k}={v}" for k, v in settings.items())]  # fmt: skip
    if transactional_ms is not None:
        cmd += ["--transactional-id", f"{topic}-perf", "--transaction-duration-ms",
                str(transactional_ms)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        cpu = _wait_cpu_s(proc, max_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            _wait_cpu_s(proc, None)
    reader.join(10)
    wall = time.monotonic() - t0
    out = "".join(lines)
    s = parse_summary(out or "")
    return JavaProducerRun(
        record_size=record_size,
        records=int(s["records"]),
        records_per_s=s["rps"],
        mib_per_s=s["mbps"],
        latency_ms={k: s[k] for k in ("avg", "max", "p50", "p95", "p99", "p999") if k in s},
        cpu_s=cpu,
        wall_s=wall,
        props=dict(props),
    )


def ceiling(bootstrap: str, record_sizes: list[int], *, max_s: float = 15.0,
            total_bytes: int = 16 << 30) -> dict[int, JavaProducerRun]:  # fmt: skip
    """Kafka's own producer at each write size (records of at most ``MAX_RECORD``, as
    lowmark's), on a fresh 1-partition topic each (a volume's records share one
    partition), the faster of ``VARIANTS`` (lowmark's compression, and none: Java's lz4
    costs it ~40% at 64 KiB here, librdkafka's far less). Without transactions: a commit
    every 10 ms, as the interceptor's tick does, stalls ProducerPerformance's one sending
    thread (87 against ~200 MB/s at 64 KiB here), so the stronger baseline is without."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from bench.common import delete_topics, run_id
    from connectors.embedded_kafka.jars import ensure_jars

    libs = str(ensure_jars())
    admin = AdminClient({"bootstrap.servers": bootstrap})
    # lowmark's own rule (connectors/kafka/topics.py): RF 3, or every broker of a smaller
    # cluster, min.insync.replicas 2 from RF 3
    rf = min(3, len(admin.list_topics(timeout=30).brokers))
    isr = {"min.insync.replicas": "2" if rf >= 3 else "1"}
    out: dict[int, JavaProducerRun] = {}
    for size in record_sizes:
        topic = f"bench-java-{size}-{run_id()}"
        for fut in admin.create_topics([NewTopic(topic, 1, rf, config=isr)]).values():
            fut.result(30)
        runs = []
        try:
            for props in VARIANTS:
                runs.append(java_producer(libs, bootstrap, topic, min(size, MAX_RECORD),
                                          total_bytes=total_bytes, max_s=max_s,
                                          props=props))  # fmt: skip
                run = runs[-1]
                print(f"  java producer {size:>8d} B  {props['compression.type']:>5}  "
                      f"{run.mib_per_s * 1.048576:9.1f} MB/s  cpu {run.cpu_s_per_mib or 0:.4f} "
                      "s/MiB", flush=True)  # fmt: skip
        finally:
            delete_topics(bootstrap, [topic])
        best = max(runs, key=lambda r: r.mib_per_s)
        out[size] = replace(best, alternatives=tuple(r.as_dict() for r in runs if r is not best))
    return out
