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

This module is the entry: arguments, setting a run up and tearing it down. The parts are
``bench.rpo_status`` (the status block), ``rpo_child`` (the child side), ``rpo_workload``
(children, writers, sampler), ``rpo_measure`` (the numbers), ``rpo_run`` (the phases) and
``rpo_report`` (tables, goals, results file).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CPU_GROUPS,
    Broker,
    CpuMeter,
    cg_topic_names,
    delete_topics,
    kafka_bootstrap,
    profile_top,
    random_pool,
    run_id,
)
from bench.rpo_child import child_main
from bench.rpo_report import goals, report
from bench.rpo_run import Run, Settings, elapsed_s, say
from bench.rpo_workload import Sampler, ServiceProcess, Writers
from connectors.kafka.reading import end_offsets, latest
from connectors.kafka.topics import CgTopics
from pipeline.primary.volume import ConsistencyGroup
from pipeline.watermark.service import decode_watermark, newer_watermark


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


def execute(s: Settings, broker: Broker, work: Path) -> dict[str, Any]:
    cg_name = f"bench-rpo-{run_id()}"
    t = CgTopics(cg_name)
    topics = cg_topic_names(cg_name)
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
        writers = Writers(vol, s.size, s.threads, random_pool(s.size)).start()
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
            and elapsed_s() < s.time_budget_s - 30)
        if want_profile:
            prof = work / "applier.prof"
            res["profiled_catchup"] = run.catchup(max_bps, min(s.backlog_s, 5.0), prof)
            run.applier.stop()  # the child writes its profile as it exits
            res["profile"] = profile_top([prof])
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
