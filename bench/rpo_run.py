r"""The phases of a bench.rpo run: max ingest, RPO per rate, the what-if, catch-up, baseline.

:class:`Run` holds what one run set up (the CG, its volume, the writers, the sampler and
the service children) and measures each phase as a window between two :class:`Snap`\ s;
:class:`Settings` are the phase lengths and rates ``bench.rpo`` parsed from its arguments.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Broker, MiB
from bench.rpo_measure import Snap, raw_consume, rpo_stats, timer_split
from bench.rpo_workload import Sampler, ServiceProcess, Writers
from connectors.kafka.topics import CgTopics
from pipeline.errors import SetupError
from pipeline.primary.volume import ConsistencyGroup, Volume
from pipeline.timesource import wall_us
from schemas.ts import ts_physical_us


@dataclass(frozen=True)
class Settings:
    quick: bool
    threads: int
    size: int
    volume_bytes: int
    max_s: float
    liveness_timeout_s: float
    fractions: tuple[float, ...]
    settle_s: float
    level_s: float
    goal_window_s: float  # the 50 % row, whose p99 is the goal: long enough for rare stalls
    whatif: bool
    whatif_poll_us: int
    catchup_frac: float
    backlog_s: float
    catchup_timeout_s: float
    drain_timeout_s: float
    baseline_s: float
    sample_ms: float
    profile: str  # auto | always | never
    time_budget_s: float
    keep_topics: bool
    data_dir: Path | None


_T0 = time.perf_counter()


def elapsed_s() -> float:
    """Seconds since the bench started (since this module was imported)."""
    return time.perf_counter() - _T0


def say(text: str) -> None:
    print(f"{elapsed_s():6.1f}s {text}", file=sys.stderr, flush=True)


@dataclass
class Run:
    s: Settings
    broker: Broker
    work: Path
    cg: ConsistencyGroup
    vol: Volume
    writers: Writers
    sampler: Sampler
    wm: ServiceProcess
    applier: ServiceProcess
    results: dict[str, Any] = field(default_factory=dict)
    procs: list[ServiceProcess] = field(default_factory=list)  # every child, for cleanup

    # -- plumbing

    def snap(self) -> Snap:
        self.check()
        return Snap(time.monotonic(), wall_us(), self.writers.total(),
                    dict(self.cg.interceptor.stats), self.applier.read(), self.wm.read(),
                    self.applier.cpu_s(), self.wm.cpu_s())

    def check(self) -> None:
        self.wm.check()
        self.applier.check()
        if self.writers.errors:
            raise SetupError(f"a writer failed: {self.writers.errors[0]!r}")
        if self.cg.interceptor.failure is not None:
            raise self.cg.interceptor.failure

    def window(self, a: Snap, b: Snap) -> dict[str, Any]:
        dt = b.mono - a.mono
        return {
            "wall_s": round(dt, 3),
            "ingest_mb_s": (b.written - a.written) / MiB / dt,
            # what Kafka took: the engine counts each entry as its data + 64 bytes
            "committed_mb_s": (b.engine["bytes"] - a.engine["bytes"]) / MiB / dt
            * self.s.size / (self.s.size + 64),
            "applier_mb_s": (b.applier["bytes"] - a.applier["bytes"]) / MiB / dt,
            "blocked_s": round(b.engine["blocked_s"] - a.engine["blocked_s"], 3),
            "transactions": b.engine["transactions"] - a.engine["transactions"],
            "wm_published": b.wm["count"] - a.wm["count"],
            "applier_cpu": round((b.cpu_applier - a.cpu_applier) / dt, 3),
            "wm_cpu": round((b.cpu_wm - a.cpu_wm) / dt, 3),
            "applier_phases": timer_split(a.applier, b.applier, dt),
            "wm_phases": timer_split(a.wm, b.wm, dt),
            "rpo": rpo_stats(self.sampler.samples, a.wall, b.wall),
        }

    def wait_caught_up(self, timeout_s: float) -> float:
        """Until everything stamped before now is applied; returns the seconds it took."""
        target = wall_us()
        t0 = time.monotonic()
        while ts_physical_us(self.applier.read()["w"]) < target:
            self.check()
            if time.monotonic() - t0 > timeout_s:
                say(f"applier still {(target - ts_physical_us(self.applier.read()['w'])) / 1e6:.1f}"
                    f" s behind after {timeout_s:.0f} s; going on (next row starts with backlog)")
                break
            time.sleep(0.01)
        return time.monotonic() - t0

    def measure(self, rate: float, settle_s: float, duration_s: float) -> dict[str, Any]:
        self.writers.set_rate(rate)
        time.sleep(settle_s)
        a = self.snap()
        time.sleep(duration_s)
        return self.window(a, self.snap())

    # -- phases

    def max_ingest(self) -> float:
        """Unthrottled writers for ``max_s``, then the clock runs until Kafka has every byte.

        Durable, not accepted, throughput: the backpressure buffer (max_unreplicated_bytes)
        takes writes far faster than Kafka for a while, and the tick commits whatever the
        outbox holds in one transaction, so a window's committed bytes come in lumps.
        """
        engine = self.cg.interceptor
        say(f"max ingest: {self.s.threads} writers, {self.s.size // 1024} KiB, unthrottled "
            f"for {self.s.max_s:g} s, then until durable")
        engine.barrier().wait(120)
        a = self.snap()
        self.writers.set_rate(math.inf)
        time.sleep(self.s.max_s)
        self.writers.pause()
        written = self.snap()
        engine.barrier().wait(120)
        b = self.snap()
        row = self.window(a, b)
        row["write_s"] = round(written.mono - a.mono, 3)
        row["durable_s"] = round(b.mono - a.mono, 3)
        row["max_mb_s"] = (b.written - a.written) / MiB / (b.mono - a.mono)
        row["accepted_mb_s"] = (written.written - a.written) / MiB / (written.mono - a.mono)
        row["drain_after_s"] = round(self.wait_caught_up(self.s.drain_timeout_s), 2)
        self.results["max_ingest"] = row
        say(f"  max ingest {row['max_mb_s']:.1f} MB/s durable (accepted "
            f"{row['accepted_mb_s']:.1f} MB/s for {row['write_s']} s, durable after "
            f"{row['durable_s']} s); S max lag {row['rpo']['S']['max_ms']:.0f} ms; applier "
            f"{row['applier_mb_s']:.1f} MB/s, caught up {row['drain_after_s']} s later")
        return row["max_mb_s"] * MiB

    def levels(self, max_bps: float) -> None:
        rows = []
        for frac in self.s.fractions:
            goal_row = abs(frac - 0.5) < 1e-9
            duration = self.s.goal_window_s if goal_row else self.s.level_s
            row = self.measure(frac * max_bps, self.s.settle_s, duration)
            row.update(frac=frac, target_mb_s=frac * max_bps / MiB, variant="default")
            rows.append(row)
            self.writers.pause()
            row["drain_after_s"] = round(self.wait_caught_up(self.s.drain_timeout_s), 2)
            r = row["rpo"]
            say(f"  {frac:4.0%}: ingest {row['ingest_mb_s']:6.1f} MB/s  RPO p99 S "
                f"{r['S']['p99_ms']:.0f} / W {r['W']['p99_ms']:.0f} / applied "
                f"{r['applied']['p99_ms']:.0f} ms")
            if self.s.whatif and goal_row:
                self.whatif(max_bps)  # right after its baseline row: same machine weather
        self.results["levels"] = rows

    def whatif(self, max_bps: float) -> None:
        us = self.s.whatif_poll_us
        say(f"what-if: 50 % with both services polling every {us / 1000:g} ms")
        self.wm.set_poll_timeout_us(us)
        self.applier.set_poll_timeout_us(us)
        try:
            row = self.measure(0.5 * max_bps, self.s.settle_s, self.s.level_s)
        finally:
            self.writers.pause()
            self.wm.set_poll_timeout_us(-1)
            self.applier.set_poll_timeout_us(-1)
        row.update(frac=0.5, target_mb_s=0.5 * max_bps / MiB, variant=f"poll {us / 1000:g} ms")
        row["drain_after_s"] = round(self.wait_caught_up(self.s.drain_timeout_s), 2)
        self.results["whatif"] = row
        say(f"  p99 RPO W {row['rpo']['W']['p99_ms']:.0f} / applied "
            f"{row['rpo']['applied']['p99_ms']:.0f} ms")

    def respawn_applier(self, profile: Path | None = None) -> ServiceProcess:
        ap = ServiceProcess("apply", self.cg.name, self.broker.bootstrap, self.work,
                            f"applier-{len(self.procs)}", self.work / "backup", profile)
        self.procs.append(ap)
        return ap.spawn()

    def catchup(self, max_bps: float, backlog_s: float, profile: Path | None = None
                ) -> dict[str, Any]:
        rate = self.s.catchup_frac * max_bps
        say(f"catch-up: ingest {rate / MiB:.1f} MB/s, applier stopped for {backlog_s:g} s")
        self.writers.set_rate(rate)
        time.sleep(self.s.settle_s)
        self.wait_caught_up(self.s.drain_timeout_s)
        stopped = self.applier.stop()
        w_stop_us = ts_physical_us(stopped["w"])
        b0, t0 = self.writers.total(), time.monotonic()
        time.sleep(backlog_s)
        backlog_rate = (self.writers.total() - b0) / (time.monotonic() - t0)
        ap = self.respawn_applier(profile)
        spawned_us = ap.spawned_us
        ap.wait_running()
        self.applier = self.sampler.applier = ap
        running_us = wall_us()
        a = self.snap()
        first_us, first_st = 0, a.applier
        deadline = time.monotonic() + self.s.catchup_timeout_s
        caught = False
        while time.monotonic() < deadline:
            st = ap.read()
            if not first_us and st["bytes"]:
                first_us, first_st = wall_us(), st
            if ts_physical_us(st["w"]) >= spawned_us:
                caught = True
                break
            self.check()
            time.sleep(0.005)
        b = self.snap()
        done_us = wall_us()
        self.writers.pause()
        drain_s = (done_us - first_us) / 1e6 if first_us else math.nan
        drained = b.applier["bytes"] - first_st["bytes"]
        ingest = (b.written - a.written) / (b.mono - a.mono)
        row: dict[str, Any] = {
            "ingest_mb_s": ingest / MiB,
            "backlog_ingest_mb_s": backlog_rate / MiB,
            "backlog_s": round((spawned_us - w_stop_us) / 1e6, 2),  # RPO when it restarted
            "backlog_mb": round(backlog_rate * (spawned_us - w_stop_us) / 1e6 / MiB, 1),
            "start_s": round((running_us - spawned_us) / 1e6, 2),  # spawn -> service running
            "first_apply_s": round((first_us - spawned_us) / 1e6, 2) if first_us else None,
            "drain_s": round(drain_s, 2),
            "caught_up": caught,
            "drain_mb_s": drained / MiB / drain_s if first_us and drain_s > 0 else math.nan,
            "applier_cpu": round((b.cpu_applier - a.cpu_applier) / (b.mono - a.mono), 3),
            "applier_phases": timer_split(first_st, b.applier, drain_s) if first_us else {},
            "read_mb_s": (b.applier["bytes_read"] - first_st["bytes_read"]) / MiB / drain_s
            if first_us and drain_s > 0 else math.nan,
        }
        row["ratio"] = row["drain_mb_s"] / row["ingest_mb_s"] if row["ingest_mb_s"] else None
        say(f"  drained {drained / MiB:.0f} MB in {drain_s:.1f} s = {row['drain_mb_s']:.1f} MB/s"
            f" while ingest ran at {row['ingest_mb_s']:.1f} MB/s: {row['ratio'] or math.nan:.2f}x"
            f"{'' if caught else ' (NOT caught up: timed out)'}")
        self.wait_caught_up(self.s.drain_timeout_s)
        return row

    def baseline(self) -> list[dict[str, Any]]:
        topic = CgTopics(self.cg.name).log
        rows = []
        for decode in (False, True):
            rows.append(raw_consume(self.broker, topic, self.s.baseline_s, decode,
                                    self.cg.interceptor.config.log_partitions))
            say(f"  raw consumer{' + decode' if decode else ''}: {rows[-1]['mb_s']:.1f} MB/s")
        return rows
