"""Three backup sites that never hold each other back, and a replacement site from a peer.

    .venv/bin/python -m bench.fleet            # ~3 min, writes bench/results/fleet.json
    .venv/bin/python -m bench.fleet --quick    # ~1 min smoke run, bench/results/fleet_quick.json

The primary runs in this process (a ConsistencyGroup, writer threads at a fixed ingest
rate of 64 KiB async writes to a sparse 1 GiB volume); `lowmark watermark` and three
`lowmark apply` sites (dr1, dr2, dr3) run as the CLI runs them, each its own process. A
sampler scrapes every site's /metrics every 50 ms for its applied RPO (now - W applied).

1. baseline: every site runs; RPO of dr1 and dr2;
2. stop: dr3 is stopped (SIGTERM) for ``--stop-s`` while the writers go on; RPO of dr1
   and dr2 meanwhile, as a ratio to the baseline (the goal: p99 within 10 %);
3. catch-up: dr3 restarts with ``max_pending_bytes`` of ``--budget-mib`` (smaller than
   its backlog); the bytes it has to apply over the time it takes to reach the W current
   at its restart, as a multiple of the ingest (goal >= 2x); its peak RSS (VmHWM) against
   the budget plus the RSS of dr1, a site that never had a backlog (the constant);
4. replacement: dr4 starts with ``--bootstrap-from`` a checkpoint copy of dr3 (which keeps
   one every 2 s); the bytes it reads from Kafka against the log's bytes after the copy's
   offsets, and against the whole log.

Numbers are ratios measured in this run on this machine, where the broker shares the
cores: absolute MB/s mean little, the ratios are the result.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    Broker,
    kafka_bootstrap,
    percentile,
    print_table,
    random_pool,
    run_id,
    running_watermark_service,
    write_results,
)
from connectors.embedded_kafka.procs import free_port
from connectors.kafka.reading import value_bytes_from
from connectors.kafka.topics import CgTopics
from pipeline.app.metric_names import from_scrape
from pipeline.ops.status import scrape
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from schemas import codec
from schemas.records import Checkpoint

MIB = 1 << 20
WRITE = 64 << 10
# the applier numbers the bench reads, by the service's own keys
NUMBERS = ("rpo_s", "applied_w", "target_w", "applied_bytes", "applied_early", "pending_dropped",
           "bytes_read")


def say(msg: str) -> None:
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


class Site:
    def __init__(self, name: str, work: Path, bootstrap: str, cg: str, **apply: Any) -> None:
        self.name, self.work, self.metrics = name, work, f"127.0.0.1:{free_port()}"
        self.dir = work / name
        extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in apply.items())
        self.config = work / f"{name}.toml"
        self.config.write_text(f'[kafka]\nbootstrap_servers = "{bootstrap}"\n[cg]\n'
                               f'name = "{cg}"\n[apply]\nsite = "{name}"\n'
                               f'data_dir = "{self.dir}"\nmetrics = "{self.metrics}"\n'
                               f"checkpoint_interval_s = 0.5\n{extra}")  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Site:
        log = (self.work / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "--log-format",
                                      "json", "apply", "--config", str(self.config), *args],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.proc = None

    def numbers(self) -> dict[str, float]:
        return from_scrape("applier", scrape(self.metrics, 1), NUMBERS)

    def peak_rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0


class Writers:
    """Async 64 KiB writes at ``rate`` bytes/s, from ``threads`` threads."""

    def __init__(self, cg: ConsistencyGroup, rate: int, threads: int = 2) -> None:
        self.vol, self.rate, self.threads = cg.volume("v"), rate, threads
        self.stop_ev, self.written = threading.Event(), 0
        self._lock = threading.Lock()
        self.pool = random_pool(WRITE)

    def start(self) -> Writers:
        for i in range(self.threads):
            threading.Thread(target=self._run, args=(i,), daemon=True).start()
        return self

    def _run(self, i: int) -> None:
        per = self.rate / self.threads / WRITE  # writes per second per thread
        n, t0, slots = 0, time.monotonic(), self.vol.size // WRITE
        while not self.stop_ev.is_set():
            due = t0 + n / per
            if (d := due - time.monotonic()) > 0:
                time.sleep(d)
            self.vol.write(((n * 7919 + i * 104729) % slots) * WRITE, self.pool[n % len(self.pool)])
            n += 1
            with self._lock:
                self.written += WRITE


class Sampler(threading.Thread):
    def __init__(self, sites: list[Site]) -> None:
        super().__init__(daemon=True)
        self.sites, self.stop_ev = sites, threading.Event()
        self.rpo: dict[str, list[tuple[float, float]]] = {s.name: [] for s in sites}

    def run(self) -> None:
        while not self.stop_ev.wait(0.05):
            for s in self.sites:
                if s.proc is None:
                    continue
                v = s.numbers().get("rpo_s")
                if v is not None and v == v:  # NaN: no W applied yet
                    self.rpo[s.name].append((time.monotonic(), v * 1000))

    def window(self, name: str, t0: float, t1: float) -> dict[str, float]:
        xs = sorted(v for t, v in self.rpo[name] if t0 <= t < t1)
        if not xs:
            return {"n": 0}
        return {"n": len(xs), "p50_ms": round(percentile(xs, 50), 1),
                "p99_ms": round(percentile(xs, 99), 1), "max_ms": round(xs[-1], 1)}  # fmt: skip


def wait_for(pred: Any, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise SystemExit(f"fleet bench: timed out after {timeout_s} s waiting for {what}")


def execute(a: argparse.Namespace, broker: Broker, work: Path) -> dict[str, Any]:
    cg_name = f"bench-fleet-{run_id()}"
    conf = broker.conf
    cg = ConsistencyGroup.open(cg_name, work / "primary", conf, interceptor_id="bench")
    cg.create_volume("v", 1 << 30)
    # dr3 (the one stopped) keeps checkpoint copies: its copies' pauses must not show in
    # the other two sites' RPO, which is what this measures
    sites = [Site("dr1", work, broker.bootstrap, cg_name),
             Site("dr2", work, broker.bootstrap, cg_name),
             Site("dr3", work, broker.bootstrap, cg_name, snapshot_interval_s=2.0,
                  max_pending_bytes=f"{a.budget_mib}MiB")]  # fmt: skip
    res: dict[str, Any] = {"ingest_mib_s": a.rate_mib, "budget_mib": a.budget_mib,
                           "stop_s": a.stop_s, "phase_s": a.phase_s}  # fmt: skip
    with running_watermark_service(cg_name, conf):
        for s in sites:
            s.start()
        for s in sites:
            wait_for(lambda s=s: s.numbers().get("applied_w", 0) > 0, 60, f"{s.name} to apply")
        sampler = Sampler(sites)
        sampler.start()
        writers = Writers(cg, a.rate_mib * MIB).start()
        time.sleep(2)
        say(f"baseline {a.phase_s} s")
        t0 = time.monotonic()
        time.sleep(a.phase_s)
        t1 = time.monotonic()
        res["baseline"] = {s: sampler.window(s, t0, t1) for s in ("dr1", "dr2", "dr3")}
        say(f"dr3 stopped for {a.stop_s} s")
        sites[2].stop()
        written0 = writers.written
        time.sleep(a.stop_s)
        t2 = time.monotonic()
        res["during_stop"] = {s: sampler.window(s, t1, t2) for s in ("dr1", "dr2")}
        backlog = writers.written - written0
        w_at_restart = max(s.numbers().get("target_w", 0) for s in sites[:2])
        sites[2].start()
        say("dr3 restarted: catching up")
        wait_for(lambda: sites[2].numbers().get("applied_bytes") is not None, 60, "dr3 up")
        t3 = time.monotonic()
        catch_s = wait_for(lambda: sites[2].numbers().get("applied_w", 0) >= w_at_restart,
                           600, "dr3 to catch up")  # fmt: skip
        t4 = time.monotonic()
        n3 = sites[2].numbers()
        applied = n3.get("applied_bytes", 0)  # since its restart
        res["catchup"] = {
            "backlog_mib": round(backlog / MIB, 1),
            "seconds": round(catch_s, 2),
            "applied_mib": round(applied / MIB, 1),
            "rate_x_ingest": round(applied / max(catch_s, 1e-9) / (a.rate_mib * MIB), 2),
            "applied_early_ops": n3.get("applied_early", 0),
            "pending_dropped": n3.get("pending_dropped", 0),
            "peak_rss_mib": round(sites[2].peak_rss_bytes() / MIB, 1),
            "steady_site_peak_rss_mib": round(sites[0].peak_rss_bytes() / MIB, 1),
        }
        c = res["catchup"]
        c["rss_over_budget_mib"] = round(c["peak_rss_mib"] - a.budget_mib, 1)
        c["rss_over_steady_site_mib"] = round(c["peak_rss_mib"] - c["steady_site_peak_rss_mib"], 1)
        res["during_catchup"] = {s: sampler.window(s, t3, t4) for s in ("dr1", "dr2")}
        # a replacement site from dr1's newest checkpoint copy
        say("dr4 bootstraps from dr3")
        wait_for(lambda: any(w >= w_at_restart for w, _s in SiteDir(sites[2].dir).snapshots()),
                 60, "a copy at dr3 after its catch-up")  # fmt: skip
        newest = SiteDir(sites[2].dir).snapshots()[-1][1]
        ckpt = codec.decode(newest.checkpoint_path.read_bytes(), Checkpoint)
        writers.stop_ev.set()
        time.sleep(0.5)
        cg.flush()
        topic = CgTopics(cg_name).log
        after = value_bytes_from(conf, topic, dict(ckpt.log_offsets))
        whole = value_bytes_from(conf, topic, {})
        dr4 = Site("dr4", work, broker.bootstrap, cg_name)
        t5 = time.monotonic()
        dr4.start("--bootstrap-from", str(newest.root))
        final_w = max(s.numbers().get("target_w", 0) for s in sites[:2])
        wait_for(lambda: dr4.numbers().get("applied_w", 0) >= final_w, 300, "dr4 to catch up")
        n4 = dr4.numbers()
        res["replacement"] = {
            "image_gib": 1, "seconds_to_w": round(time.monotonic() - t5, 2),
            "bytes_read_mib": round(n4.get("bytes_read", 0) / MIB, 2),
            "log_after_copy_mib": round(after / MIB, 2), "whole_log_mib": round(whole / MIB, 2),
            "read_over_after_copy": round(n4.get("bytes_read", 0) / max(after, 1), 3),
            "read_over_whole_log": round(n4.get("bytes_read", 0) / max(whole, 1), 3),
        }  # fmt: skip
        sampler.stop_ev.set()
        dr4.stop()
        for s in sites:
            s.stop()
    cg.close()
    b, d = res["baseline"], res["during_stop"]
    res["goals"] = {
        "others_p99_within_10pct": all(
            d[s]["p99_ms"] <= 1.1 * b[s]["p99_ms"] for s in ("dr1", "dr2")),
        "catchup_2x_ingest": res["catchup"]["rate_x_ingest"] >= 2.0,
    }  # fmt: skip
    return res


def report(res: dict[str, Any]) -> None:
    rows = []
    for phase in ("baseline", "during_stop", "during_catchup"):
        for s, w in res[phase].items():
            ratio = (round(w["p99_ms"] / res["baseline"][s]["p99_ms"], 2)
                     if phase != "baseline" and w.get("n") else "")  # fmt: skip
            rows.append([phase, s, w.get("p50_ms"), w.get("p99_ms"), w.get("max_ms"), ratio])
    print_table(["phase", "site", "RPO p50 ms", "p99 ms", "max ms", "p99 / baseline"], rows)
    c, r = res["catchup"], res["replacement"]
    print_table(["catch-up", "value"], [[k, v] for k, v in c.items()])
    print_table(["replacement", "value"], [[k, v] for k, v in r.items()])
    print("goals:", res["goals"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate-mib", type=float, default=4.0, help="ingest, MiB/s")
    ap.add_argument("--budget-mib", type=int, default=16, help="dr3's max_pending_bytes")
    ap.add_argument("--stop-s", type=float, default=None)
    ap.add_argument("--phase-s", type=float, default=None)
    a = ap.parse_args(argv)
    a.stop_s = a.stop_s if a.stop_s is not None else (15.0 if a.quick else 120.0)
    a.phase_s = a.phase_s if a.phase_s is not None else (10.0 if a.quick else 30.0)
    work = Path(tempfile.mkdtemp(prefix="lowmark-fleet-"))
    with kafka_bootstrap("bench-fleet") as broker:
        res = execute(a, broker, work)
    report(res)
    path = write_results("fleet_quick" if a.quick else "fleet", res)
    print(f"results: {path}")
    subprocess.Popen(["rm", "-rf", "--", str(work)], start_new_session=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
