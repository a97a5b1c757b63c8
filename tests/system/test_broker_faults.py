"""Broker faults under a 2-volume workload: kills, pauses, clean restarts of brokers (the
log topic's partition leaders by preference) and partitions, delays and resets of
lowmark's connections through the fault proxies (tests/faults), on a 3-broker cluster
with RF 3 and min.insync.replicas 2 (the Kafka replication tests' setup).

Two CGs side by side, one of sync volumes and one of async ones, so the same faults hit
both modes at the same instants; each has `lowmark serve` (volumes v0, v1), `lowmark
watermark` and `lowmark apply` as processes that reach Kafka only through the proxies,
and one NBD client per volume writing block after block, each write carrying the other
volume's newest acknowledged seq, recording every answer and its latency.

Tries to break, in sync mode: an acknowledged write missing at the backup once it
converged (invariant 3); a write that fails without an error reply, or hangs past
``replication_timeout_s``. In async mode: a backup snapshot that is not a causal cut of the
writes (invariant 1), checked for every snapshot the applier exposes during the faults; the
RPO not recovering after a fault. Both modes check both, and that no service exits.

``make test`` runs a short version (``SHORT_FAULTS`` faults); the torture version runs
``LOWMARK_NEMESIS_FAULTS`` (default 200) faults, each hitting both modes. Replay a run:
``LOWMARK_NEMESIS_SEED=<seed>`` (the seed is printed and every fault logged with it to
``nemesis.jsonl`` in the test's tmp dir).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import torture_summary
from tests.faults.cut_check import (
    ACK,
    BLOCK,
    ERR,
    HANG,
    ack_index,
    check_held,
    missing_acked,
)
from tests.faults.fixtures import ProxiedCluster
from tests.faults.nemesis import Event, Nemesis, seed_from_env
from tests.faults.scene import (
    DROPPED,
    SIZE,
    VOLUMES,
    Services,
    Watch,
    Writer,
    start_writers,
    wait_rpo_below,
)
from tests.kafka_helpers import unique

pytestmark = pytest.mark.kafka3

SHORT_FAULTS = 6  # about 3 min on the 2-core machine
TORTURE_FAULTS = 200
REPLICATION_TIMEOUT_S = 6.0
#: an error reply may come this much after replication_timeout_s (the tick, the loop)
SLACK_S = 3.0
#: the RPO a fault must come back under before the next one
RPO_OK_S = 2.0
RECOVER_TIMEOUT_S = 60.0
PACE_S = 0.01
MODES = ("sync", "async")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


@dataclass
class Scene:
    """One mode's CG: its services, writers, watch, and per fault the time to recover."""

    mode: str
    services: Services
    watch: Watch
    writers: list[Writer] = field(default_factory=list)
    recovered: dict[int, float | None] = field(default_factory=dict)


def run_scenes(pc: ProxiedCluster, tmp: Path, faults: int) -> dict[str, dict[str, Any]]:
    """A sync CG and an async CG side by side under the same nemesis: the same faults hit
    both modes at the same instants."""
    seed = seed_from_env()
    scenes = {}
    for mode in MODES:
        (tmp / mode).mkdir()
        cg = unique(f"bf-{mode}")
        services = Services(tmp / mode, pc.bootstrap, cg, mode, REPLICATION_TIMEOUT_S)
        scenes[mode] = Scene(mode, services, Watch(services))
    print(f"broker faults: {faults} faults, LOWMARK_NEMESIS_SEED={seed}, "
          f"CGs {[s.services.cg for s in scenes.values()]}")  # fmt: skip

    def settle(event: Event) -> None:
        for sc in scenes.values():
            gone = sc.services.exited()
            if gone:
                raise AssertionError(f"{sc.mode}: services exited at fault {event.fault.index}"
                                     f": {gone}")  # fmt: skip
            sc.recovered[event.fault.index] = wait_rpo_below(
                sc.services, RPO_OK_S, RECOVER_TIMEOUT_S, since=event.healed
            )

    nemesis = Nemesis(pc.cluster, pc.proxies, [f"lowmark.{s.services.cg}.log"
                                               for s in scenes.values()],
                      seed, faults, tmp / "nemesis.jsonl", settle=settle)  # fmt: skip
    started = time.monotonic()
    answers: dict[str, dict[int, list[str]]] = {}
    converged: dict[str, dict[str, Any]] = {}
    try:
        for sc in scenes.values():
            sc.services.up()
        for sc in scenes.values():
            sc.writers = start_writers(sc.services.ports["nbd"],
                                       REPLICATION_TIMEOUT_S + SLACK_S, PACE_S)  # fmt: skip
            sc.watch.start()
        for sc in scenes.values():
            assert wait_rpo_below(sc.services, RPO_OK_S, 60) is not None, (
                f"{sc.mode}: the RPO never settled before the faults"
            )
        nemesis.start()
        try:
            nemesis.join(faults * 90 + 120)
        finally:
            nemesis.halt()
            pc.restore()
        time.sleep(2.0)  # writes after the last fault, on a healed cluster
        for sc in scenes.values():
            for w in sc.writers:
                w.stop.set()
        for sc in scenes.values():
            for w in sc.writers:
                w.thread.join(REPLICATION_TIMEOUT_S + SLACK_S + 5)
                assert w.error is None, f"{sc.mode} writer v{w.index} failed: {w.error!r}"
            answers[sc.mode] = {w.index: list(w.answers) for w in sc.writers}
        for sc in scenes.values():
            converged[sc.mode] = _converge(sc.services, answers[sc.mode])
            sc.watch.halt()
            sc.watch.sample()
            gone = sc.services.exited()
            assert not gone, f"{sc.mode}: services exited during the run: {gone}"
    except BaseException:
        for sc in scenes.values():
            for name in sc.services.procs:
                print(f"----- {sc.mode} {name} -----\n{sc.services.log_tail(name)}")
        raise
    finally:
        for sc in scenes.values():
            for w in sc.writers:
                w.stop.set()
            sc.watch.halt()
            sc.services.down()
    seconds = round(time.monotonic() - started, 1)
    reports = {mode: _report(sc, nemesis, answers[mode], converged[mode], seed, seconds)
               for mode, sc in scenes.items()}  # fmt: skip
    per_fault = [e.as_dict(nemesis.t0) for e in nemesis.events]
    for i, f in enumerate(per_fault):
        e = nemesis.events[i]
        for mode, sc in scenes.items():
            f[f"{mode}_recover_s"] = sc.recovered.get(e.fault.index)
            f[f"{mode}_max_rpo_s"] = sc.watch.max_rpo(e.started, e.settled)
    (tmp / "report.json").write_bytes(orjson.dumps({**reports, "per_fault": per_fault},
                                                   option=orjson.OPT_INDENT_2))  # fmt: skip
    print(orjson.dumps(reports, option=orjson.OPT_INDENT_2).decode())
    print(f"per-fault log: {tmp / 'report.json'}, nemesis log: {tmp / 'nemesis.jsonl'}")
    return reports


def _report(
    sc: Scene, nemesis: Nemesis, answers: dict[int, list[str]], converged: dict[str, Any],
    seed: int, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    index = {v: ack_index(said, SIZE // BLOCK) for v, said in answers.items()}
    cut_problems = list(sc.watch.torn)
    for w_cut, held in sc.watch.cuts:
        cut_problems += [f"snapshot W {w_cut}: {p}" for p in check_held(held, answers, index)]
    outcomes = [o for w in sc.writers for o in w.outcomes]
    count = {a: sum(1 for o in outcomes if o.answer == a) for a in (ACK, ERR, HANG, DROPPED)}
    max_rpos, recovers = [], []
    for e in nemesis.events:
        rpo = sc.watch.max_rpo(e.started, e.settled)
        if rpo == rpo:  # NaN: no sample inside a fault shorter than the sampling period
            max_rpos.append(rpo)
        rec = sc.recovered.get(e.fault.index)
        if rec is not None:
            recovers.append(rec)
    late = [{"v": w.index, "seq": o.seq, "t": round(o.at - nemesis.t0, 3),
             "latency_s": round(o.latency_s, 3), "answer": o.answer}
            for w in sc.writers for o in w.outcomes if o.late]  # fmt: skip
    err_lat = [o.latency_s for o in outcomes if o.answer == ERR]
    ack_lat = [o.latency_s for o in outcomes if o.answer == ACK]
    return {
        "mode": sc.mode, "seed": seed, "faults": len(nemesis.events),
        "kinds": nemesis.summary(), "writes": len(outcomes), "answers": count,
        "missing_acked": converged["missing"], "converge_s": converged["seconds"],
        "backup_equals_primary": converged["equal"],
        "cuts_checked": len(sc.watch.cuts), "cut_problems": cut_problems[:20],
        "cut_violations": len(cut_problems),
        "not_recovered": [e.fault.index for e in nemesis.events
                          if sc.recovered.get(e.fault.index) is None],
        "rpo_max_per_fault_s": _dist(max_rpos), "recover_s": _dist(recovers),
        "ack_latency_s": _dist(ack_lat),
        "acks_after_replication_timeout": sum(1 for x in ack_lat if x > REPLICATION_TIMEOUT_S),
        "error_latency_s": _dist(err_lat),
        "late_replies": len(late), "late": late[:30],
        "seconds": seconds,
    }  # fmt: skip


def _dist(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 0.5), 3), "p99": round(pct(values, 0.99), 3),
            "max": round(max(values, default=float("nan")), 3)}  # fmt: skip


def _converge(services: Services, answers: dict[int, list[str]]) -> dict[str, Any]:
    """Wait until the backup holds every acknowledged write (and, where every write was
    acknowledged, equals the primary); what was missing at the deadline."""
    started = time.monotonic()
    missing: list[str] = []
    equal = False
    while time.monotonic() - started < 120:
        images = {i: _read(services.backup.image_path(v)) for i, v in enumerate(VOLUMES)}
        missing = missing_acked(images, answers)
        primary = {i: _read(services.primary.image_path(v)) for i, v in enumerate(VOLUMES)}
        equal = images == primary
        all_acked = all(a == ACK for said in answers.values() for a in said)
        if not missing and (equal or not all_acked):
            break
        time.sleep(0.5)
    return {"missing": missing[:20], "seconds": round(time.monotonic() - started, 1),
            "equal": equal}  # fmt: skip


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes().ljust(SIZE, b"\0")
    except FileNotFoundError:
        return bytes(SIZE)


def check(reports: dict[str, dict[str, Any]], suffix: str) -> None:
    problems = []
    for mode, report in reports.items():
        problems += [f"{mode}: {p}" for p in _problems(report)]
    assert not problems, f"seed {reports['sync']['seed']}: " + "; ".join(problems)
    for mode, report in reports.items():
        _record(report, f"broker faults {mode} {suffix}".strip())


def _problems(report: dict[str, Any]) -> list[str]:
    mode = report["mode"]
    problems = []
    if report["missing_acked"]:
        problems.append(f"acknowledged writes missing at the backup: {report['missing_acked']}")
    if report["late_replies"] or report["answers"][HANG] or report["answers"][DROPPED]:
        problems.append(f"writes without a reply within {REPLICATION_TIMEOUT_S + SLACK_S} s: "
                        f"{report['late_replies']} late ({report['late']}), "
                        f"answers {report['answers']}")  # fmt: skip
    if report["cut_violations"]:
        problems.append(f"backup snapshots not causal cuts: {report['cut_problems']}")
    if report["not_recovered"]:
        problems.append(f"RPO not back under {RPO_OK_S} s within {RECOVER_TIMEOUT_S} s after "
                        f"faults {report['not_recovered']}")  # fmt: skip
    if mode == "async" and not report["backup_equals_primary"]:
        problems.append("the async backup did not converge to the primary's bytes")
    if not report["cuts_checked"]:
        problems.append("no backup snapshot was sampled")
    if not report["answers"][ACK]:
        problems.append("no write was acknowledged")
    return problems


def _record(report: dict[str, Any], name: str) -> None:
    mode = report["mode"]
    violations = (len(report["missing_acked"]) + report["cut_violations"]
                  + report["late_replies"] + report["answers"][DROPPED])  # fmt: skip
    torture_summary.record(
        name, faults=report["faults"],
        checked=report["answers"][ACK] if mode == "sync" else report["cuts_checked"],
        violations=violations,
        checked_what=("acknowledged sync writes at the converged backup; error replies"
                      if mode == "sync" else "backup snapshots as causal cuts; RPO recovery"),
        seconds=report["seconds"], seed=report["seed"], answers=report["answers"],
        cuts_checked=report["cuts_checked"], rpo_max_per_fault_s=report["rpo_max_per_fault_s"],
        recover_s=report["recover_s"], kinds=report["kinds"],
    )  # fmt: skip


# its finding (seed 1560717716: sync writes with no reply within replication_timeout_s
# while the log leader was partitioned, paused and killed) is fixed; the seed passes
@pytest.mark.timeout(900)
def test_broker_faults_short(proxied3, tmp_path):
    reports = run_scenes(proxied3, tmp_path, SHORT_FAULTS)
    check(reports, "(short)")


@pytest.mark.torture
@pytest.mark.timeout(4 * 3600)  # 200 faults: about an hour on the 2-core machine
def test_broker_faults_torture(proxied3, tmp_path):
    faults = int(os.environ.get("LOWMARK_NEMESIS_FAULTS", TORTURE_FAULTS))
    check(run_scenes(proxied3, tmp_path, faults), "")
