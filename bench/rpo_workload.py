"""What runs during a bench.rpo run: the service children, the writers, the sampler.

- :class:`ServiceProcess` starts a service child (``python -m bench.rpo _child``), reads its
  status block, sets its poll timeout and stops it;
- :class:`Writers` are the primary's writer threads, at a total rate the phases set;
- :class:`Sampler` records, every few ms, the primary's S, the newest W a watermark-topic
  consumer has seen and the applier's applied W: the raw material of the RPO numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.common import REPO, Broker, process_cpu_s, run_id, stop_process
from bench.rpo_status import RUNNING, StatusBlock
from connectors.kafka.topics import CgTopics
from pipeline.errors import SetupError
from pipeline.primary.volume import ConsistencyGroup, Volume
from pipeline.timesource import wall_us
from schemas import codec
from schemas.records import Watermark

MAX_DEBT_S = 0.05  # a writer that fell behind its schedule bursts at most this much


class ServiceProcess:
    """One child service: start, read its state, change its poll timeout, stop."""

    def __init__(self, kind: str, cg: str, bootstrap: str, work: Path, name: str,
                 data_dir: Path | None = None, profile: Path | None = None,
                 liveness_timeout_s: float | None = None) -> None:
        self.kind, self.name = kind, name
        self.status_path = work / f"{name}.status"
        self.log_path = work / f"{name}.log"
        self.profile = profile
        self.cmd = [sys.executable, "-m", "bench.rpo", "_child", kind, "--cg", cg,
                    "--bootstrap", bootstrap, "--status", str(self.status_path),
                    "--parent", str(os.getpid())]
        if data_dir is not None:
            self.cmd += ["--data-dir", str(data_dir), "--site", "bench"]
        if profile is not None:
            self.cmd += ["--profile", str(profile)]
        if liveness_timeout_s is not None:
            self.cmd += ["--liveness-timeout-s", str(liveness_timeout_s)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.block: StatusBlock | None = None
        self.spawned_us = 0

    def spawn(self) -> ServiceProcess:
        self.block = StatusBlock(self.status_path, create=True)
        self.spawned_us = wall_us()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf)
        return self

    def wait_running(self, timeout_s: float = 90) -> ServiceProcess:
        deadline = time.monotonic() + timeout_s
        while self.read()["state"] != RUNNING:
            self.check()
            if time.monotonic() > deadline:
                raise SetupError(f"bench {self.name} did not start in {timeout_s:.0f}s; "
                                 f"its log:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def read(self) -> dict[str, Any]:
        assert self.block is not None
        return self.block.read()

    def set_poll_timeout_us(self, us: int) -> None:
        assert self.block is not None
        self.block.set("poll_timeout_us", us)

    def cpu_s(self) -> float:
        return (process_cpu_s(self.proc.pid) or 0.0) if self.proc else 0.0

    def check(self) -> None:
        """Raise if the child died (a halted applier, a broken broker): numbers would lie."""
        if self.proc is not None and self.proc.poll() is not None:
            raise SetupError(f"bench {self.name} exited with status {self.proc.returncode}; "
                             f"its log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 90, graceful: bool = True) -> dict[str, Any]:
        """SIGTERM (the service closes: the applier checkpoints), then wait; kill if stuck.

        ``graceful=False`` kills at once: at the end of the run nobody needs the checkpoint,
        and the applier's close (fdatasync + image digest) would cost seconds.
        """
        if self.proc is None:
            return {}
        stop_process(self.proc, timeout_s, signal.SIGTERM if graceful else signal.SIGKILL,
                     self.name)
        final = self.read()
        self.proc = None
        return final


class Writers:
    """Threads writing ``size`` bytes at random aligned offsets, at a settable total rate."""

    def __init__(self, vol: Volume, size: int, threads: int, pool: list[bytes]) -> None:
        self.vol, self.size, self.n, self.pool = vol, size, threads, pool
        self.bytes = [0] * threads
        self.paused = [-1] * threads  # the rate generation each writer last paused in
        self.errors: list[BaseException] = []
        self._rate = 0.0  # total bytes/s; 0 pauses, inf is unthrottled
        self._gen = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"bench-writer-{i}") for i in range(threads)]

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def set_rate(self, bytes_per_s: float) -> None:
        self._rate = bytes_per_s
        self._gen += 1  # writers pick the new rate up and restart their schedules

    def total(self) -> int:
        return sum(self.bytes)

    def pause(self, timeout_s: float = 120) -> None:
        """Rate 0, and wait until no writer is inside a write (one may sit in backpressure)."""
        self.set_rate(0)
        gen, deadline = self._gen, time.monotonic() + timeout_s
        while any(p != gen for p in self.paused) and not self.errors:
            if time.monotonic() > deadline:
                raise SetupError(f"writers still busy {timeout_s:.0f}s after being paused")
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, i: int) -> None:
        rng = random.Random(1000 + i)
        blocks = self.vol.size // self.size
        write, pool, n_pool = self.vol.write, self.pool, len(self.pool)
        gen, rate, interval, next_t, k = -1, 0.0, 0.0, 0.0, i
        try:
            while not self._stop.is_set():
                if gen != self._gen:
                    gen, rate = self._gen, self._rate
                    interval = self.size * self.n / rate if 0 < rate < math.inf else 0.0
                    next_t = time.perf_counter() + rng.random() * interval  # stagger writers
                if rate <= 0:
                    self.paused[i] = gen
                    time.sleep(0.002)
                    continue
                if interval:
                    now = time.perf_counter()
                    if next_t > now:
                        time.sleep(next_t - now)
                    elif now - next_t > MAX_DEBT_S:
                        next_t = now - MAX_DEBT_S
                    next_t += interval
                write(rng.randrange(blocks) * self.size, pool[k % n_pool])
                self.bytes[i] += self.size
                k += 1
        except Exception as exc:  # reported at the next phase boundary, never lost
            self.errors.append(exc)


class Sampler(threading.Thread):
    """Every ``interval_s``: (wall µs, primary S, published W seen by a consumer, applied W)."""

    def __init__(self, cg: ConsistencyGroup, broker: Broker, interval_s: float) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.engine = cg.interceptor
        self.interval_s = interval_s
        self.samples: list[tuple[int, int, int, int]] = []
        self.applier: ServiceProcess | None = None  # swapped by the catch-up phase
        self.w_seen = 0
        self.applied = 0
        self._halt = threading.Event()  # not _stop: Thread has a method of that name
        self._wm = Consumer({**broker.conf, "group.id": f"bench-rpo-{run_id()}",
                             "enable.auto.commit": False, "isolation.level": "read_committed"})
        self._wm.assign([TopicPartition(CgTopics(cg.name).watermark, 0, 0)])

    def run(self) -> None:
        next_t = time.perf_counter()
        while not self._halt.wait(max(0.0, next_t - time.perf_counter())):
            next_t = max(next_t + self.interval_s, time.perf_counter() - self.interval_s)
            for msg in self._wm.consume(100, 0):
                if not msg.error():
                    with contextlib.suppress(Exception):
                        w = codec.decode(msg.value() or b"", Watermark).w
                        self.w_seen = max(self.w_seen, w)
            ap = self.applier
            if ap is not None and ap.block is not None:
                # a restarting applier reads 0 until it loaded its checkpoint: keep the last
                self.applied = max(self.applied, ap.block.get("w"))
            self.samples.append((wall_us(), self.engine.last_s, self.w_seen, self.applied))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self._wm.close()
