"""RPO against ingest rate, and how fast a stopped applier catches up.

    .venv/bin/python -m bench.rpo            # ~2-2.5 min, writes bench/results/rpo.json
    .venv/bin/python -m bench.rpo --quick    # ~40 s smoke run, bench/results/rpo_quick.json
    LOWMARK_BOOTSTRAP_SERVERS=127.0.0.1:19092 .venv/bin/python -m bench.rpo

Processes, laid out like a deployment (one GIL each):

- this process is the primary: a ConsistencyGroup, its interceptor (tick thread), writer
  threads calling ``Volume.write`` (async mode, random aligned writes), a sampler thread;
- the watermark service and the applier each run in a child (``python -m bench.rpo _child``),
  built by ``pipeline.app.services.make_*`` from the config the CLI uses and driven by the same
  ``step()`` loop as ``lowmark watermark`` / ``lowmark apply``. After every step a child
  writes its state (W, applied bytes, time per phase) into a small shared-memory block that
  the sampler reads: a Prometheus scrape every 5 ms would steal the applier's own GIL.

Phases, in one run against one broker:

1. max ingest: unthrottled writers with both services running, then the clock runs on
   until Kafka has every byte: Kafka-durable MB/s (what the primary can sustain);
2. RPO per rate (10..100 % of max): every ~5 ms, ``now - physical(ts)`` of the primary's
   last progress S, of the newest W a watermark-topic consumer has seen, and of the
   applier's applied W (the backup's true RPO: applied, not yet checkpointed). The 50 %
   row, whose p99 is the goal, runs 32 s: one whole cycle of the applier's periodic image
   digest, a multi-second stall a 5 s window would usually miss. The stage table takes
   per-sample differences (S - W, W - applied), so each stage is shown apart from the
   noise of the stages before it;
3. what-if (default run), right after the 50 % row: the same rate with both services
   polling Kafka every 1 ms instead of their default timeouts (the bench sets the timeout
   it passes to ``step``): what the blocking ``consume(n, timeout)`` calls cost;
4. catch-up: the applier stops, writers go on at 50 % for a while, the applier restarts
   from its checkpoint; drain MB/s while ingest continues, as a multiple of the ingest;
5. baseline: a plain confluent-kafka consumer (the applier's settings) reading the same
   log, raw and with Avro decode: the upper bound for the applier.

Deviation from the product defaults, on purpose: the watermark service fences after
``--liveness-timeout-s`` 60 s, not 10 s. Unthrottled, the tick puts the whole outbox (up to
``max_unreplicated_bytes``, 256 MiB) into one transaction, and on a busy machine that took
longer than 10 s: the service fenced the bench's primary mid-run. "S max lag" in the
max-ingest line shows how long the primary was silent.

Goals (from the issue): p99 applied RPO <= 50 ms at 50 % of max ingest; catch-up >= 2x ingest.
When one is missed the report says where the time goes (per-phase timers of the children,
and with ``--profile`` or ``auto`` a cProfile of the applier during a second catch-up).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import io
import itertools
import logging
import math
import mmap
import os
import pstats
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.common import (
    REPO,
    Broker,
    CpuMeter,
    delete_topics,
    kafka_bootstrap,
    percentile,
    print_table,
    process_cpu_s,
    run_id,
    write_results,
)
from connectors.kafka.reading import end_offsets, latest
from connectors.kafka.topics import CgTopics
from pipeline.errors import SetupError
from pipeline.primary.clock import ts_physical_us, wall_us
from pipeline.primary.volume import ConsistencyGroup, Volume
from pipeline.watermark.service import decode_watermark, newer_watermark
from schemas import codec
from schemas.records import LOG_RECORDS, Watermark

MiB = 1 << 20
GOAL_RPO_P99_MS = 50.0  # applied RPO p99 at 50 % of max ingest
GOAL_CATCHUP_RATIO = 2.0  # applier drain MB/s / ingest MB/s
CPU_GROUPS = {"bench-writer": "writers", "lowmark-tick": "tick", "bench-sampler": "sampler",
              "MainThread": "main"}
MAX_DEBT_S = 0.05  # a writer that fell behind its schedule bursts at most this much

log = logging.getLogger("lowmark.bench.rpo")


# --------------------------------------------------------------------------- shared status

# w: applied W (applier) or computed W (watermark); w2: checkpoint W or published W;
# count: checkpoints or publishes; records_read: log records or progress events folded
HEADER = ("seq", "state", "pid", "steps", "w", "w2", "bytes", "bytes_read", "records_read",
          "pending", "count", "first_apply_us", "spare0", "poll_timeout_us", "last_step_us",
          "spare")
TIMERS = ("step", "read_wm", "read_log", "decode", "plan_add", "apply", "plan_take", "pwrite",
          "checkpoint", "sync", "digest", "spill", "fold", "publish", "log_offsets", "fence")
_IDX = {name: i for i, name in enumerate(HEADER)}
_T = {name: i for i, name in enumerate(TIMERS)}
_NFIELDS = len(HEADER) + 2 * len(TIMERS)
STATUS_BYTES = 8 * _NFIELDS
STARTING, RUNNING, STOPPED, FAILED = 0, 1, 2, 3
_CONTROL = _IDX["poll_timeout_us"]  # the one field the parent writes
_SEQ = _IDX["seq"]


class StatusBlock:
    """A child's state in an mmap'd file: the child writes after every step, the parent reads.

    Words go through a ``memoryview`` cast to int64, whose item access is one aligned 8-byte
    copy, so a single field never tears (``struct.pack_into`` writes byte by byte and does).
    A whole snapshot is made consistent by a sequence lock: the writer makes ``seq`` odd,
    writes, makes it even; a reader retries until it saw the same even ``seq`` around its
    copy. The parent's one word (``poll_timeout_us``) is read by the child only.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        if create:
            path.write_bytes(bytes(STATUS_BYTES))
        self.path = path
        self._file = open(path, "r+b")  # noqa: SIM115 - lives as long as the mmap
        self._mm = mmap.mmap(self._file.fileno(), STATUS_BYTES)
        self._mv = memoryview(self._mm).cast("q")
        if create:
            self.set("poll_timeout_us", -1)

    def get(self, name: str) -> int:
        return self._mv[_IDX[name]]

    def set(self, name: str, value: int) -> None:
        self._mv[_IDX[name]] = value

    def publish(self, head: Sequence[int], tail: Sequence[int]) -> None:
        """``head``: the fields between ``seq`` and the control word; ``tail``: those after it."""
        mv = self._mv
        mv[_SEQ] += 1  # odd: a write is under way
        mv[_SEQ + 1 : _CONTROL] = array("q", head)
        mv[_CONTROL + 1 :] = array("q", tail)
        mv[_SEQ] += 1

    def read(self, tries: int = 1000) -> dict[str, Any]:
        mv = self._mv
        for _ in range(tries):
            seq = mv[_SEQ]
            if seq % 2 == 0:
                vals = mv.tolist()
                if mv[_SEQ] == seq:
                    break
            time.sleep(0)
        else:
            raise SetupError(f"status block {self.path} stayed mid-write; is its child stuck?")
        out: dict[str, Any] = dict(zip(HEADER, vals[: len(HEADER)], strict=True))
        ns = vals[len(HEADER) :: 2]
        n = vals[len(HEADER) + 1 :: 2]
        out["timers"] = {t: (ns[i], n[i]) for i, t in enumerate(TIMERS)}
        return out

    def close(self) -> None:
        self._mv.release()
        self._mm.close()
        self._file.close()


# --------------------------------------------------------------------------- child side


class Timers:
    """Nanoseconds and calls per phase; ``wrap`` times any callable (bench instrumentation)."""

    def __init__(self) -> None:
        self.ns = [0] * len(TIMERS)
        self.n = [0] * len(TIMERS)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        i, ns, n, clock = _T[name], self.ns, self.n, time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                ns[i] += clock() - t
                n[i] += 1

        return timed

    def flat(self) -> list[int]:
        return [v for pair in zip(self.ns, self.n, strict=True) for v in pair]


def _instrument_classes(timers: Timers) -> None:
    """Time the library calls the services make (this child process only)."""
    from connectors.image.image import Image
    from pipeline.backup.plan import ApplyPlanner

    codec.decode = timers.wrap("decode", codec.decode)  # type: ignore[method-assign]
    Image.pwrite = timers.wrap("pwrite", Image.pwrite)  # type: ignore[method-assign]
    Image.sync = timers.wrap("sync", Image.sync)  # type: ignore[method-assign]
    Image.content_digest = timers.wrap("digest", Image.content_digest)  # type: ignore[method-assign]
    ApplyPlanner.add = timers.wrap("plan_add", ApplyPlanner.add)  # type: ignore[method-assign]
    ApplyPlanner.take = timers.wrap("plan_take", ApplyPlanner.take)  # type: ignore[method-assign]


def _die_with_parent(parent: int) -> None:
    """A crashed bench must not leave services consuming the broker.

    PR_SET_PDEATHSIG, set here after exec rather than in a preexec_fn (which is unsafe in
    a parent that runs threads); the loop also checks the parent every second.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl took effect
        sys.exit(1)


def child_main(argv: Sequence[str]) -> int:
    """Run one service like ``lowmark watermark`` / ``lowmark apply``, publishing its state."""
    ap = argparse.ArgumentParser(prog="python -m bench.rpo _child")
    ap.add_argument("kind", choices=("apply", "watermark"))
    ap.add_argument("--cg", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--site", default="bench")
    ap.add_argument("--liveness-timeout-s", type=float, default=None)
    ap.add_argument("--profile", type=Path, default=None, help="write cProfile stats here")
    a = ap.parse_args(argv)
    _die_with_parent(a.parent)

    from pipeline.app.config import load_config
    from pipeline.app.services import make_applier, make_watermark_service
    from pipeline.logs import setup_logging

    setup_logging("warning", "text")
    cfg = load_config(None, {
        "kafka": {"bootstrap_servers": a.bootstrap},
        "cg": {"name": a.cg},
        "apply": {"site": a.site, "data_dir": a.data_dir},
        "watermark": {"liveness_timeout_s": a.liveness_timeout_s},
    })
    svc = make_applier(cfg) if a.kind == "apply" else make_watermark_service(cfg)
    child = ChildService(svc, a.kind, StatusBlock(a.status))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    prof = cProfile.Profile() if a.profile else None
    try:
        svc.start()
        child.instrument()
        child.publish(RUNNING)
        if prof is not None:
            prof.enable()
        child.loop(stop, a.parent)
        svc.close()
    except BaseException:
        child.block.set("state", FAILED)
        raise  # the traceback lands in the child's log, which the parent shows
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(a.profile)
    child.publish(STOPPED)
    return 0


class ChildService:
    """A service in a child process: its step loop, timers and status block."""

    def __init__(self, svc: Any, kind: str, block: StatusBlock) -> None:
        self.svc, self.kind, self.block = svc, kind, block
        self.timers = Timers()
        self.steps = 0
        self.first_apply_us = 0
        self.block.set("pid", os.getpid())
        _instrument_classes(self.timers)

    def instrument(self) -> None:
        """After ``start()``: wrap the service's own phases (instance attributes shadow them)."""
        names = (
            {"_read_watermarks": "read_wm", "_read_log": "read_log", "_apply_ready": "apply",
             "checkpoint": "checkpoint", "_spill": "spill"}
            if self.kind == "apply"
            else {"_fold": "fold", "_publish": "publish", "_log_end_offsets": "log_offsets",
                  "_fence_silent": "fence"}
        )
        for attr, name in names.items():
            setattr(self.svc, attr, self.timers.wrap(name, getattr(self.svc, attr)))

    def loop(self, stop: threading.Event, parent: int) -> None:
        svc, block, clock = self.svc, self.block, time.perf_counter_ns
        step_i, ns, n = _T["step"], self.timers.ns, self.timers.n
        next_parent_check = time.monotonic() + 1
        while not stop.is_set():
            poll_us = block.get("poll_timeout_us")
            t = clock()
            if poll_us >= 0:
                svc.step(poll_us / 1e6)
            else:
                svc.step()  # the service's default timeout, as `lowmark apply` runs it
            ns[step_i] += clock() - t
            n[step_i] += 1
            self.steps += 1
            if not self.first_apply_us and self.kind == "apply" and svc.stats.applied_bytes:
                self.first_apply_us = wall_us()
            self.publish(RUNNING)
            if time.monotonic() >= next_parent_check:
                if os.getppid() != parent:
                    break
                next_parent_check = time.monotonic() + 1

    def publish(self, state: int) -> None:
        svc, st = self.svc, self.svc.stats
        if self.kind == "apply":
            v = {"w": svc.applied_w, "w2": svc.checkpoint_w, "bytes": st.applied_bytes,
                 "bytes_read": st.bytes_read, "records_read": st.records_read,
                 "pending": svc.planner.pending_bytes(), "count": st.checkpoints}
        else:
            v = {"w": svc.state.w, "w2": svc.published_w, "records_read": st.events,
                 "count": st.published}
        v.update(state=state, pid=os.getpid(), steps=self.steps,
                 first_apply_us=self.first_apply_us)
        head = [v.get(name, 0) for name in HEADER[_SEQ + 1 : _CONTROL]]
        tail = [wall_us(), 0, *self.timers.flat()]  # last_step_us, spare, timers
        self.block.publish(head, tail)


# --------------------------------------------------------------------------- parent side


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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait(10)
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
                        self.w_seen = max(self.w_seen, codec.decode(msg.value(), Watermark).w)
            ap = self.applier
            if ap is not None and ap.block is not None:
                # a restarting applier reads 0 until it loaded its checkpoint: keep the last
                self.applied = max(self.applied, ap.block.get("w"))
            self.samples.append((wall_us(), self.engine.last_s, self.w_seen, self.applied))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self._wm.close()


def rpo_stats(samples: Sequence[tuple[int, int, int, int]], t0_us: int, t1_us: int
              ) -> dict[str, dict[str, float]]:
    """p50/p99/max of now - physical(ts) in ms, per source, over samples in [t0, t1)."""
    window = [s for s in samples if t0_us <= s[0] < t1_us]
    out: dict[str, dict[str, float]] = {}
    for key, idx in (("S", 1), ("W", 2), ("applied", 3)):
        vals = sorted((s[0] - ts_physical_us(s[idx])) / 1000 for s in window if s[idx] > 0)
        out[key] = {"count": len(vals), "p50_ms": percentile(vals, 50),
                    "p99_ms": percentile(vals, 99), "max_ms": vals[-1] if vals else math.nan}
    # per sample, how far each stage trails the one before it: isolates a stage from the
    # noise upstream (a primary starved of CPU raises S, W and applied lag alike)
    for key, hi, lo in (("W_behind_S", 1, 2), ("applied_behind_W", 2, 3)):
        vals = sorted((ts_physical_us(s[hi]) - ts_physical_us(s[lo])) / 1000
                      for s in window if s[hi] > 0 and s[lo] > 0)
        out[key] = {"count": len(vals), "p50_ms": percentile(vals, 50),
                    "p99_ms": percentile(vals, 99), "max_ms": vals[-1] if vals else math.nan}
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(window)]
    out["sampling"] = {"count": len(window),
                       "mean_interval_ms": (sum(gaps) / len(gaps) / 1000) if gaps else math.nan,
                       "max_interval_ms": max(gaps) / 1000 if gaps else math.nan}
    return out


@dataclass
class Snap:
    """Counters at one instant; two of them make a window's rates."""

    mono: float
    wall: int
    written: int
    engine: dict[str, Any]
    applier: dict[str, Any]
    wm: dict[str, Any]
    cpu_applier: float
    cpu_wm: float


# time inside a phase not spent in the phases nested in it: waiting in Kafka's consume()
_REST = {"consume": ("read_log", ("decode", "plan_add")),  # applier
         "step-rest": ("step", ("fold", "publish", "fence"))}  # watermark service


def timer_split(a: dict[str, Any], b: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Per phase: seconds and share of the window's wall time, from two status reads."""
    out: dict[str, Any] = {}
    raw: dict[str, tuple[int, int]] = {}
    for name in TIMERS:
        ns = b["timers"][name][0] - a["timers"][name][0]
        calls = b["timers"][name][1] - a["timers"][name][1]
        raw[name] = (ns, calls)
    for rest, (outer, inner) in _REST.items():
        if all(raw[i][1] == 0 for i in inner):
            continue  # not this kind of service
        ns, calls = raw[outer]
        raw[rest] = (ns - sum(raw[i][0] for i in inner), calls)
    for name, (ns, calls) in raw.items():
        if calls and wall_s > 0:
            out[name] = {"s": round(ns / 1e9, 3), "share": round(ns / 1e9 / wall_s, 3),
                         "calls": calls, "mean_ms": round(ns / calls / 1e6, 3)}
    return out


# --------------------------------------------------------------------------- the run


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


def say(text: str) -> None:
    print(f"{time.perf_counter() - _T0:6.1f}s {text}", file=sys.stderr, flush=True)


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
        row = {
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


def raw_consume(broker: Broker, topic: str, limit_s: float, decode: bool,
                partitions: int) -> dict[str, Any]:
    """The applier's consumer settings and ``consume`` call, nothing else (optionally decode)."""
    c = Consumer({**broker.conf, "group.id": f"bench-raw-{run_id()}", "enable.auto.commit": False,
                  "isolation.level": "read_committed", "enable.partition.eof": True,
                  "fetch.max.bytes": 64 << 20})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    nbytes = records = 0
    eof: set[int] = set()
    t0 = time.perf_counter()
    try:
        while len(eof) < partitions and time.perf_counter() - t0 < limit_s:
            for msg in c.consume(2000, 0.02):
                if msg.error():
                    if msg.error().code() == -191:  # _PARTITION_EOF
                        eof.add(msg.partition())
                    continue
                value = msg.value() or b""
                if decode:
                    codec.decode(value, LOG_RECORDS)
                nbytes += len(value)
                records += 1
        elapsed = time.perf_counter() - t0
    finally:
        c.close()
    return {"row": "raw consumer" + (" + decode" if decode else ""), "mb_s": nbytes / MiB / elapsed,
            "bytes": nbytes, "records": records, "elapsed_s": round(elapsed, 3),
            "reached_end": len(eof) == partitions}


def profile_text(path: Path, n: int = 25) -> str:
    if not path.exists():
        return ""
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).strip_dirs().sort_stats("tottime").print_stats(n)
    return buf.getvalue()


# --------------------------------------------------------------------------- report


def rpo_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["rate", "variant", "target MB/s", "ingest MB/s", "S p50", "S p99", "W p50", "W p99",
               "W max", "appl p50", "appl p99", "appl max", "appl MB/s", "appl CPU", "wm CPU",
               "blocked s"]
    out = []
    for r in rows:
        rpo = r["rpo"]
        out.append([f"{r['frac']:.0%}", r["variant"], r["target_mb_s"], r["ingest_mb_s"],
                    rpo["S"]["p50_ms"], rpo["S"]["p99_ms"], rpo["W"]["p50_ms"], rpo["W"]["p99_ms"],
                    rpo["W"]["max_ms"],
                    rpo["applied"]["p50_ms"], rpo["applied"]["p99_ms"], rpo["applied"]["max_ms"],
                    r["applier_mb_s"], r["applier_cpu"], r["wm_cpu"], r["blocked_s"]])
    return headers, out


def stage_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["rate", "variant", "S lag p50", "S lag p99", "W behind S p50", "p99",
               "applied behind W p50", "p99"]
    out = []
    for r in rows:
        rpo = r["rpo"]
        out.append([f"{r['frac']:.0%}", r["variant"], rpo["S"]["p50_ms"], rpo["S"]["p99_ms"],
                    rpo["W_behind_S"]["p50_ms"], rpo["W_behind_S"]["p99_ms"],
                    rpo["applied_behind_W"]["p50_ms"], rpo["applied_behind_W"]["p99_ms"]])
    return headers, out


def rate_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    mx = res["max_ingest"]
    cu = res["catchup"]
    ingest = cu["ingest_mb_s"]
    rows: list[list[Any]] = [
        ["max ingest (Kafka-durable)", mx["max_mb_s"], None],
        ["ingest during catch-up", ingest, 1.0],
        ["applier catch-up drain", cu["drain_mb_s"], cu["ratio"]],
    ]
    for b in res["baseline"]:
        rows.append([b["row"], b["mb_s"], b["mb_s"] / ingest if ingest else None])
    return ["row", "MB/s", "x ingest"], rows


def phase_table(title: str, phases: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = [[name, p["s"], p["share"], p["calls"], p["mean_ms"]]
            for name, p in sorted(phases.items(), key=lambda kv: -kv[1]["s"])]
    return [title, "s", "share", "calls", "mean ms"], rows


def goals(res: dict[str, Any]) -> dict[str, Any]:
    half = [r for r in res["levels"] if abs(r["frac"] - 0.5) < 1e-9]
    p99 = half[0]["rpo"]["applied"]["p99_ms"] if half else math.nan
    ratio = res["catchup"]["ratio"]
    return {
        "rpo_p99_ms_at_50pct": p99,
        "rpo_goal_ms": GOAL_RPO_P99_MS,
        "rpo_met": bool(p99 <= GOAL_RPO_P99_MS),
        "catchup_ratio": ratio,
        "catchup_goal": GOAL_CATCHUP_RATIO,
        "catchup_met": bool(ratio is not None and ratio >= GOAL_CATCHUP_RATIO
                            and res["catchup"]["caught_up"]),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Settings:
    ap = argparse.ArgumentParser(
        prog="python -m bench.rpo",
        description="RPO vs ingest rate and applier catch-up rate (set "
        "LOWMARK_BOOTSTRAP_SERVERS to use a running cluster).")
    ap.add_argument("--quick", action="store_true", help="short phases, no what-if (~40 s)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--size", type=int, default=64 * 1024, help="write size in bytes")
    ap.add_argument("--volume-gib", type=float, default=1.0, help="sparse volume size")
    ap.add_argument("--level-s", type=float, default=None, help="seconds measured per rate")
    ap.add_argument("--goal-window-s", type=float, default=None,
                    help="seconds measured at 50 %% (default 32: one whole cycle of the "
                    "applier's 30 s image digest, which stalls it for seconds)")
    ap.add_argument("--backlog-s", type=float, default=None,
                    help="seconds the applier is stopped in the catch-up phase")
    ap.add_argument("--no-whatif", action="store_true", help="skip the 1 ms poll what-if row")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="cProfile the applier in a second catch-up: auto = when the catch-up "
                    "goal is missed and time is left (never with --quick)")
    ap.add_argument("--liveness-timeout-s", type=float, default=60.0,
                    help="the watermark service's fencing timeout (lowmark's default is 10 s; "
                    "an unthrottled primary can be silent longer than that in one tick)")
    ap.add_argument("--keep-topics", action="store_true")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="where images go (default: a temporary directory)")
    a = ap.parse_args(argv)
    if a.threads <= 0 or a.size <= 0 or a.size % 512:
        ap.error("--threads must be positive and --size a positive multiple of 512")
    volume_bytes = int(a.volume_gib * (1 << 30)) // a.size * a.size
    if volume_bytes < a.size * 64:
        ap.error("--volume-gib is too small for the write size")
    q = a.quick
    return Settings(
        quick=q, threads=a.threads, size=a.size, volume_bytes=volume_bytes,
        max_s=1.5 if q else 4.0, liveness_timeout_s=a.liveness_timeout_s,
        fractions=(0.1, 0.25, 0.5, 0.75, 1.0),
        settle_s=0.5 if q else 1.0,
        level_s=a.level_s if a.level_s is not None else (1.5 if q else 5.0),
        goal_window_s=a.goal_window_s if a.goal_window_s is not None else (1.5 if q else 32.0),
        whatif=not (q or a.no_whatif), whatif_poll_us=1000,
        catchup_frac=0.5,
        backlog_s=a.backlog_s if a.backlog_s is not None else (3.0 if q else 8.0),
        catchup_timeout_s=15.0 if q else 45.0,
        drain_timeout_s=5.0 if q else 20.0,
        baseline_s=1.5 if q else 4.0,
        sample_ms=5.0,
        profile="never" if q and a.profile == "auto" else a.profile,
        time_budget_s=150.0,
        keep_topics=a.keep_topics, data_dir=a.data_dir,
    )


def make_pool(size: int, total: int = 16 * MiB) -> list[bytes]:
    rng = random.Random(7)  # random bytes: lz4 gets nothing, like real block data mostly
    return [rng.randbytes(size) for _ in range(max(8, total // size))]


def execute(s: Settings, broker: Broker, work: Path) -> dict[str, Any]:
    cg_name = f"bench-rpo-{run_id()}"
    t = CgTopics(cg_name)
    topics = [t.log, t.progress, t.watermark, t.checkpoints, t.deadletter]
    cg = ConsistencyGroup.open(cg_name, work / "primary", broker.conf, interceptor_id="bench")
    procs: list[ServiceProcess] = []
    run: Run | None = None
    try:
        vol = cg.create_volume("rpo", s.volume_bytes, mode="async")
        wm = ServiceProcess("watermark", cg_name, broker.bootstrap, work, "watermark",
                            liveness_timeout_s=s.liveness_timeout_s).spawn()
        procs.append(wm)
        ap = ServiceProcess("apply", cg_name, broker.bootstrap, work, "applier-0",
                            work / "backup").spawn()
        procs.append(ap)
        wm.wait_running()
        ap.wait_running()
        sampler = Sampler(cg, broker, s.sample_ms / 1000)
        sampler.applier = ap
        sampler.start()
        writers = Writers(vol, s.size, s.threads, make_pool(s.size)).start()
        run = Run(s, broker, work, cg, vol, writers, sampler, wm, ap, procs=procs)
        run.wait_caught_up(30)  # the volume's CREATE reached the backup
        meter = CpuMeter(CPU_GROUPS, broker.pids).start()
        max_bps = run.max_ingest()
        run.levels(max_bps)
        run.results["catchup"] = run.catchup(max_bps, s.backlog_s)
        say("baseline: a plain consumer reading the same log")
        run.results["baseline"] = run.baseline()
        res = run.results
        res["goals"] = goals(res)
        want_profile = s.profile == "always" or (
            s.profile == "auto" and not res["goals"]["catchup_met"]
            and time.perf_counter() - _T0 < s.time_budget_s - 30)
        if want_profile:
            prof = work / "applier.prof"
            res["profiled_catchup"] = run.catchup(max_bps, min(s.backlog_s, 5.0), prof)
            run.applier.stop()  # the child writes its profile as it exits
            res["profile"] = profile_text(prof)
        res["cpu"] = meter.stop()
        res["samples"] = len(sampler.samples)
        # a restarted applier (and the watermark service, and a joining interceptor) reads
        # this topic from offset 0; its length per second of run tells what a day costs
        wm_end = end_offsets(broker.conf, t.watermark).get(0, 0)
        t0 = time.perf_counter()
        latest(broker.conf, t.watermark, decode_watermark, newer_watermark)  # as start() does
        read_s = time.perf_counter() - t0
        res["watermark_topic"] = {"records": wm_end,
                                  "per_s": round(wm_end / res["cpu"]["wall_s"], 1),
                                  "latest_read_s": round(read_s, 3),
                                  "latest_records_per_s": round(wm_end / read_s)}
        return res
    finally:
        t0 = time.perf_counter()
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop(graceful=False)
        if run is not None:
            run.writers.stop()
            run.sampler.stop()
        # only the interceptor: the images are deleted with the work dir, syncing the
        # primary's (hundreds of MB dirty) would only cost time
        cg.interceptor.close()
        for v in cg.volumes.values():
            v.image.close()
        if not s.keep_topics and not broker.embedded:
            delete_topics(broker.bootstrap, topics)
        say(f"teardown {time.perf_counter() - t0:.1f} s")


def report(s: Settings, broker: Broker, res: dict[str, Any], wall: float) -> Path:
    rows = res["levels"] + ([res["whatif"]] if "whatif" in res else [])
    h1, c1 = rpo_table(rows)
    h2, c2 = rate_table(res)
    h4, c4 = stage_table(rows)
    half = [r for r in res["levels"] if abs(r["frac"] - 0.5) < 1e-9] or res["levels"][:1]
    phase_tables = {
        "applier_catchup": phase_table("applier, catch-up", res["catchup"]["applier_phases"]),
        "applier_50pct": phase_table("applier, 50 % row", half[0]["applier_phases"]),
        "watermark_50pct": phase_table("watermark service, 50 % row", half[0]["wm_phases"]),
    }
    print(f"\nRPO in ms (p50/p99/max of now - physical(ts), sampled every {s.sample_ms:g} ms); "
          f"S = primary progress, W = published watermark, appl = applied at the backup")
    print_table(h1, c1)
    print("\nper stage, ms (per sample: S lag = now - S; W behind S = S - W; applied behind W)")
    print_table(h4, c4)
    print()
    print_table(h2, c2)
    for h, c in phase_tables.values():
        print()
        print_table(h, c)
    cpu = res["cpu"]
    print(f"\nmachine: {cpu['machine_busy_frac']:.0%} busy during the run; processes other "
          f"than this one used {cpu['others_s'] / cpu['wall_s']:.1f} cores on average "
          f"(services, broker, anything else running)")
    wt = res["watermark_topic"]
    print(f"watermark topic: {wt['records']:,} records, {wt['per_s']:g}/s ("
          f"{wt['per_s'] * 86400 / 1e6:.1f} M a day), all read again at every service start; "
          f"connectors.kafka.reading.latest() read them at {wt['latest_records_per_s']:,}/s")
    g = res["goals"]
    print(f"\ngoal: p99 applied RPO <= {GOAL_RPO_P99_MS:g} ms at 50 % of max ingest: "
          f"{'MET' if g['rpo_met'] else 'MISSED'} ({g['rpo_p99_ms_at_50pct']:.1f} ms)")
    print(f"goal: catch-up >= {GOAL_CATCHUP_RATIO:g}x ingest: "
          f"{'MET' if g['catchup_met'] else 'MISSED'} ({g['catchup_ratio'] or math.nan:.2f}x)")
    if res.get("profile"):
        print("\n--- cProfile of the applier during a second catch-up (tottime) ---")
        print(res["profile"])
    # a smoke run must not overwrite the numbers of the last full run
    path = write_results("rpo_quick" if s.quick else "rpo", {
        "settings": {**s.__dict__, "data_dir": str(s.data_dir) if s.data_dir else None},
        "broker": {"bootstrap": broker.bootstrap, "embedded": broker.embedded},
        "baseline": "confluent-kafka Consumer with the applier's settings (read_committed, "
                    "fetch.max.bytes 64 MiB, consume(2000, 0.02)) over the same log",
        "wall_s": round(wall, 1),
        **res,
        "tables": {"rpo": {"headers": h1, "rows": c1}, "stages": {"headers": h4, "rows": c4},
               "rates": {"headers": h2, "rows": c2},
                   **{k: {"headers": h, "rows": c} for k, (h, c) in phase_tables.items()}},
    })
    print(f"\n{wall:.0f} s; results in {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    s = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    # "writes blocked" warnings at 100 % would bury the table; blocked_s is in each row
    logging.getLogger("lowmark").setLevel(logging.ERROR)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="lowmark-rpo-", dir=s.data_dir))
    try:
        with kafka_bootstrap("bench-rpo") as broker:
            say(f"broker {broker.bootstrap} ({'embedded' if broker.embedded else 'external'}); "
                f"work dir {tmp}")
            res = execute(s, broker, tmp)
        report(s, broker, res, time.perf_counter() - started)
    finally:
        # unlinking two images with hundreds of MB of dirty pages took 4 s each on a busy
        # disk; nothing waits for it, so the deletion runs on after the bench exits
        subprocess.Popen(["rm", "-rf", "--", str(tmp)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
