"""The machinery of the interceptor-kill disasters (``tests/system/test_disasters.py``): plan a
disaster from its seed, drive the causal chain through two ``tests.disaster_driver``
processes, SIGKILL both, wait until nothing more can arrive, and check the backup.

``_check`` is the oracle: the backup images read as bytes (``tests.oracles``), the log
replayed independently to W (``rebuild_from_log``), every chain write classified present,
absent or torn by its self-describing payload, acknowledged losses counted by mode.
Lanes run disasters one after the other in a CG each; ``run_campaign`` runs lanes at once.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from tests.disaster_driver import payload
from tests.oracles import first_difference, reader_bytes
from tests.replication_helpers import (
    ServiceThread,
    create_cg_topics,
    fence_interceptor,
    last_committed_offset,
    read_log_from,
    rebuild_from_log,
    record_ts_index,
    wait_until,
    watermark_bound_violations,
    watermark_history,
)
from tests.service_runner import ChildProcess

VOLUME_SIZE = 16 << 20
BLOCK = 4096
LANES = 4
SURVIVOR_LANES = 6
SEED_BASE = {"dead": 0, "fenced": 1_000_000, "survivor": 3_000_000}
# fenced: 2.5 s, not 1 s: on a loaded 2-core machine a live interceptor's commits can stall
# over a second, and the service then fences it at start-up ("stopped the backup side") or
# mid-chain (its own writers fail); survivor too: a restart's republish commits megabytes
LIVENESS_S = {"dead": 3600.0, "fenced": 2.5, "survivor": 2.5}
#: survivor: how long the living one keeps writing the chain once W holds for the dead one
SURVIVE_S = 0.4
NODES = ("x", "y")


# ---------------------------------------------------------------- one disaster


@dataclass(frozen=True)
class Plan:
    seed: int
    modes: dict[str, str]
    workload_s: float
    first: str  # the node killed first
    gap_s: float  # until the second is killed

    @classmethod
    def of(cls, seed: int) -> Plan:
        rng = random.Random(seed)
        sync = rng.choice([None, None, "x", "y"])
        survivor = seed >= SEED_BASE["survivor"]
        if survivor:
            sync = None  # the survivor's sync writes would wait for the held W, by design
        return cls(
            seed,
            {n: "sync" if n == sync else "async" for n in NODES},
            # survivor: later, so the first one's S covers part of the chain on a loaded box
            rng.uniform(0.6, 1.5) if survivor else rng.uniform(0.2, 1.0),
            rng.choice(NODES),
            rng.uniform(0.0, 0.05),
        )


@dataclass
class ChainWrite:
    index: int  # position in the causal chain, from 1
    node: str
    volume: str
    offset: int
    length: int
    ts: int | None = None  # set once acknowledged


@dataclass
class Outcome:
    variant: str
    lane: str
    round: int
    plan: Plan
    volumes: dict[str, str]
    chain: list[ChainWrite]
    w: int = 0
    present: int = 0
    lost_async: int = 0  # acknowledged async writes not in the backup (allowed: ts > W)
    lost_async_at_or_below_w: int = 0  # ... with ts <= W: breaks invariant 3
    lost_sync: list[str] = field(default_factory=list)  # acknowledged sync writes missing
    survivor_acks: int = 0  # survivor: chain writes acknowledged after the first one died
    interceptor_error: str = ""
    volume_full: bool = False  # the chain stopped before the kill
    epochs: dict[str, int] = field(default_factory=dict)  # node -> its interceptor's epoch
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, for the summary

    def where(self) -> str:
        return (
            f"[{self.variant} seed={self.plan.seed} lane={self.lane} round={self.round} "
            f"modes={self.plan.modes} workload={self.plan.workload_s:.2f}s "
            f"first={self.plan.first} gap={self.plan.gap_s * 1000:.0f}ms W={self.w}"
            + (f" {self.interceptor_error}" if self.interceptor_error else "")
            + "]"
        )


@dataclass
class Lane:
    """One CG with its backup side, running disasters one after the other."""

    name: str
    cg: str
    root: Path
    kafka_conf: dict[str, Any]
    variant: str
    wm: ServiceThread
    ap: ServiceThread
    recheck: bool = False  # re-check earlier disasters' cuts after each later one
    log_offsets: dict[int, int] = field(default_factory=dict)
    rounds: int = 0
    history: list[Outcome] = field(default_factory=list)
    record_ts: list[tuple[int, int, int]] = field(default_factory=list)  # (p, offset, min ts)

    @property
    def service(self) -> WatermarkService:
        return self.wm.service

    @property
    def applier(self) -> Applier:
        return self.ap.service

    def check_services(self) -> None:
        for st in (self.wm, self.ap):
            st.check()


def _chain_length(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.01:  # > 512 KiB: fragmented, must land whole or not at all
        return rng.randrange(520 << 10, 800 << 10) // 512 * 512
    return rng.choice([512, BLOCK, BLOCK, BLOCK, 3 * BLOCK])


def _drive_chain(
    drivers: dict[str, ChildProcess],
    volumes: dict[str, str],
    plan: Plan,
    out: Outcome,
    stop: threading.Event | None = None,
) -> None:
    """Issue w1, w2, ... alternating x and y, each after the previous one's ack. With
    ``stop`` (the survivor variant) a dead node is skipped and the living one goes on
    alone until ``stop`` is set: its writes causally follow the dead one's tail."""
    rng = random.Random(plan.seed * 7 + 1)
    next_offset = dict.fromkeys(NODES, 0)
    dead: set[str] = set()
    index = 0
    while True:
        index += 1
        node = NODES[(index - 1) % 2]
        if stop is not None:
            if stop.is_set() or len(dead) == len(NODES):
                return
            if node in dead:
                node = next(n for n in NODES if n not in dead)
        length = _chain_length(rng)
        offset = next_offset[node]
        if offset + length > VOLUME_SIZE:
            out.volume_full = True
            return  # wait for the kill without writing
        next_offset[node] = offset + -(-length // BLOCK) * BLOCK
        cw = ChainWrite(index, node, volumes[node], offset, length)
        out.chain.append(cw)
        reply = drivers[node].request(f"W {offset} {length} {plan.seed} {index}")
        if reply is None:
            if stop is None:
                return  # killed while this write was in flight
            dead.add(node)  # this one is never acknowledged; the chain goes on
            continue
        if not reply.startswith("A "):
            out.interceptor_error = f"{node} answered {reply!r} before the kill"
            return
        cw.ts = int(reply.split()[1])
        if dead:
            out.survivor_acks += 1
            time.sleep(0.004)  # ~250 writes/s while W holds: the chain, not a flood


def _kill_both(drivers: dict[str, ChildProcess], plan: Plan) -> None:
    time.sleep(plan.workload_s)
    order = [plan.first, *(n for n in NODES if n != plan.first)]
    for i, node in enumerate(order):
        if i:
            time.sleep(plan.gap_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(drivers[node].pid, signal.SIGKILL)


def _kill_one_then_the_survivor(
    lane: Lane, drivers: dict[str, ChildProcess], plan: Plan, stop: threading.Event
) -> None:
    """Kill the first; once the service holds W for it, let the other write on for
    ``SURVIVE_S`` (its S passes the dead one's by far), then kill it too."""
    time.sleep(plan.workload_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(drivers[plan.first].pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
        h.interceptor_id == plan.first for h in list(lane.service.state.holds.values())
    ):
        time.sleep(0.05)
    time.sleep(SURVIVE_S)
    stop.set()
    for node in NODES:
        with contextlib.suppress(ProcessLookupError):
            os.kill(drivers[node].pid, signal.SIGKILL)


def run_disaster(lane: Lane, seed: int) -> Outcome:
    plan = Plan.of(seed)
    r = lane.rounds
    lane.rounds += 1
    volumes = {n: f"{n}{r}" for n in NODES}
    out = Outcome(lane.variant, lane.name, r, plan, volumes, [])
    drivers: dict[str, ChildProcess] = {}
    t0 = time.monotonic()
    try:
        for node in NODES:
            drivers[node] = ChildProcess(
                "tests.disaster_driver",
                {
                    "kafka": lane.kafka_conf,
                    "cg": lane.cg,
                    # the same disk every round: a restart republishes the last one's tail
                    "dir": str(lane.root / node),
                    "interceptor_id": node,
                    "volume": volumes[node],
                    "size": VOLUME_SIZE,
                    "mode": plan.modes[node],
                    "engine": {
                        "tick_interval_s": 0.01,
                        "replication_timeout_s": 10.0,
                        # a republished tail goes out in several commits, each with its
                        # PROGRESS: one 16 MiB commit can outlast the liveness timeout
                        "max_transaction_bytes": 1 << 20,
                        # the activity log on, at a scale of these 16 MiB volumes: 4 MiB
                        # extents kept 2 s made every restart republish the whole volume
                        # (6 lanes at once: past the 10 s announce timeout under load)
                        "region_extent_bytes": 1 << 20,
                        "region_keep_s": 0.25,
                        # no markers here: a control consumer per node start made the
                        # survivor campaign ~15% slower, near its 300 s bound
                        "markers": False,
                    },
                },
                lane.root / f"r{r}" / f"{node}.log",
            )
        for node, d in drivers.items():
            out.epochs[node] = int(d.expect("READY", 90).split()[1])
        t1 = time.monotonic()
        out.seconds["start"] = t1 - t0
        stop = threading.Event() if lane.variant == "survivor" else None
        if stop is None:
            killer = threading.Thread(target=_kill_both, args=(drivers, plan), daemon=True)
        else:
            args = (lane, drivers, plan, stop)
            killer = threading.Thread(target=_kill_one_then_the_survivor, args=args, daemon=True)
        killer.start()
        _drive_chain(drivers, volumes, plan, out, stop)
        killer.join()
    finally:
        for d in drivers.values():
            d.kill()
    t2 = time.monotonic()
    out.seconds["workload"] = t2 - t1
    out.w = _settle(lane, out)
    if os.environ.get("LOWMARK_DISASTER_VERBOSE"):
        st = lane.service.state
        print("STATE", st.w, st.holds, st.members, st.departed, flush=True)
    t3 = time.monotonic()
    out.seconds["settle"] = t3 - t2
    _check(lane, out)
    if lane.recheck:
        _recheck_earlier(lane, out)
        lane.history.append(out)
    out.seconds["check"] = time.monotonic() - t3
    return out


def _settle(lane: Lane, out: Outcome) -> int:
    """Wait until no more progress can come, W is published and the backup checkpointed it."""
    if lane.variant == "dead":
        for node in NODES:  # what their restart would do first
            fence_interceptor(lane.kafka_conf, lane.cg, node)
    else:
        # this disaster's instances fenced, not merely absent: "no members" also holds
        # before the service folded their JOINs (survivor too: with its last instance
        # still a member, the service's liveness fence of it could hit the next round's
        # instance of the same id between its init_transactions and its JOIN)
        def fenced() -> bool:
            state = lane.service.state
            return lane.wm.error is not None or (
                not state.members
                and all(state.departed.get(n, (None,))[0] == e for n, e in out.epochs.items())
            )

        wait_until(fenced, 60, f"{out.where()} the service fencing both dead interceptors")
    lane.check_services()
    last = last_committed_offset(lane.kafka_conf, CgTopics(lane.cg).progress)
    svc = lane.service

    def folded() -> bool:
        return lane.wm.error is not None or (
            svc.state.progress_offset >= last and svc.published_w == svc.state.w
        )

    wait_until(folded, 60, f"{out.where()} the service folding progress up to offset {last}")
    lane.check_services()
    w = svc.published_w
    ap = lane.applier
    wait_until(
        lambda: lane.ap.error is not None or (ap.applied_w >= w and ap.checkpoint_w >= w),
        90,
        f"{out.where()} the applier applying and checkpointing W={w}",
    )
    lane.check_services()
    if ap.applied_w != w:
        out.problems.append(f"applier went to W={ap.applied_w} past the settled W={w}")
    return w


def _check(lane: Lane, out: Outcome) -> None:
    w = out.w
    records, lane.log_offsets = read_log_from(lane.kafka_conf, lane.cg, lane.log_offsets)
    lane.record_ts.extend(record_ts_index(records))
    vids = set(out.volumes.values())
    mine = [rec for rec in records if rec[1].get("volume_id") in vids]
    sizes = dict.fromkeys(vids, VOLUME_SIZE)
    reference = rebuild_from_log(mine, sizes, upto_ts=w)
    created = {
        rec["volume_id"]: rec["ts"]
        for rtype, rec, _p, _o in mine
        if rtype == "VolumeChange" and rec["op"] == "CREATE"
    }
    images = _backup_images(lane, out)
    for vid in sorted(vids):
        if not (lane.applier.image_path(vid)).exists() and created.get(vid, w + 1) <= w:
            out.problems.append(f"volume {vid} was created at ts <= W but has no image")
        if images[vid] != bytes(reference[vid]):
            out.problems.append(
                f"backup image {vid} differs from the log replayed to W: "
                + first_difference(images[vid], reference[vid])
            )
    states = _chain_states(images, out)
    for cw, state in zip(out.chain, states, strict=True):
        if state == "torn":
            out.problems.append(f"write w{cw.index} ({cw.length} bytes) is torn or corrupt")
        if cw.ts is not None and cw.ts > w and state == "present":
            out.problems.append(f"write w{cw.index} has ts {cw.ts} > W but is in the backup")
    _count_losses(out, states)
    out.present, problem = _prefix(out, states)
    if problem:
        out.problems.append(problem)


def _count_losses(out: Outcome, states: list[str]) -> None:
    """Invariant 3, per mode: every acknowledged (``ts`` set) write that is not in the
    backup is a loss; a sync one is never allowed, an async one only above W."""
    for cw, state in zip(out.chain, states, strict=True):
        if cw.ts is None or state == "present":
            continue
        if out.plan.modes[cw.node] == "sync":
            out.lost_sync.append(
                f"w{cw.index} on {cw.volume} (sync, ts {cw.ts} {'<=' if cw.ts <= out.w else '>'}"
                f" W={out.w}) was acknowledged but is not in the backup"
            )
        elif cw.ts <= out.w:
            out.lost_async_at_or_below_w += 1
            out.problems.append(
                f"acknowledged async write w{cw.index} has ts {cw.ts} <= W but is not in the "
                "backup (progress promised a record that was not committed)"
            )
        else:
            out.lost_async += 1


def _backup_images(lane: Lane, out: Outcome) -> dict[str, bytes]:
    """The backup's images of a disaster's volumes (zeroes where no image exists yet)."""
    images = {}
    for vid in out.volumes.values():
        data = reader_bytes(lane.applier.image_path(vid), VOLUME_SIZE)
        images[vid] = bytes(VOLUME_SIZE) if data is None else data
    return images


def _chain_states(images: dict[str, bytes], out: Outcome) -> list[str]:
    """present / absent / torn, per chain write."""
    states = []
    for cw in out.chain:
        got = images[cw.volume][cw.offset : cw.offset + cw.length]
        if got == payload(out.plan.seed, cw.index, cw.length):
            states.append("present")
        elif got == bytes(cw.length):
            states.append("absent")
        else:
            states.append("torn")
    return states


def _prefix(out: Outcome, states: list[str]) -> tuple[int, str]:
    """(length of the present prefix, a problem when later writes are present too)."""
    n = next((i for i, s in enumerate(states) if s != "present"), len(states))
    later = [out.chain[i].index for i in range(n, len(states)) if states[i] == "present"]
    if not later:
        return n, ""
    return n, (
        f"not a causal prefix: w{n + 1} is missing but w{later[0]} "
        f"(and {len(later) - 1} more later writes) are in the backup"
    )


def _recheck_earlier(lane: Lane, out: Outcome) -> None:
    """Earlier disasters' volumes must still hold a causal prefix now that W moved on, and
    every write they acknowledged: the restart on the same disk republished the tail, and
    W passed it (it held until then). Only the one write in flight at the kill (never
    acknowledged) may be absent or torn: the image holds whatever part of it landed."""
    for earlier in lane.history:
        states = _chain_states(_backup_images(lane, earlier), earlier)
        last = len(earlier.chain) - 1
        if last >= 0 and earlier.chain[last].ts is None and states[last] == "torn":
            states[last] = "absent"
        _present, problem = _prefix(earlier, states)
        lost = [cw.index for cw, st in zip(earlier.chain, states, strict=True)
                if cw.ts is not None and st != "present"]  # fmt: skip
        if lost and not problem:
            problem = f"acknowledged writes lost across the restart: w{lost[0]} (+{len(lost) - 1})"
        if problem or "torn" in states:
            out.problems.append(
                f"after the primary restarted, W={out.w} exposes round {earlier.round} "
                f"(seed {earlier.plan.seed}, cut at W={earlier.w} with w1..w{earlier.present}): "
                f"{problem or 'a torn write'}"
            )


# ---------------------------------------------------------------- lanes


def _open_lane(
    kafka_conf: dict[str, Any], cg: str, root: Path, variant: str, name: str, recheck: bool
) -> Lane:
    create_cg_topics(kafka_conf, cg)
    wm = ServiceThread(
        WatermarkService(
            WatermarkServiceConfig(cg=cg, liveness_timeout_s=LIVENESS_S[variant]), kafka_conf
        ),
        f"watermark-{name}",
    ).start()
    ap = ServiceThread(
        Applier(
            ApplierConfig(
                cg=cg,
                site="backup",
                data_dir=root / "backup",
                checkpoint_interval_s=0.2,
                compute_digests=False,  # the images are compared directly
            ),
            kafka_conf,
        ),
        f"applier-{name}",
    ).start()
    return Lane(name, cg, root, kafka_conf, variant, wm, ap, recheck)


@dataclass
class Campaign:
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    service_errors: list[str] = field(default_factory=list)  # found when a lane closed
    lock: threading.Lock = field(default_factory=threading.Lock)


MAX_LANE_RESTARTS = 5


def _run_lane(
    kafka_conf: dict[str, Any],
    prefix: str,
    root: Path,
    variant: str,
    name: str,
    seeds: list[int],
    campaign: Campaign,
    recheck: bool,
) -> None:
    """Run ``seeds`` one after the other; a failure (a halted applier, a timeout) is
    recorded with its seed and the lane goes on in a fresh CG."""
    lane: Lane | None = None
    restarts = 0
    try:
        for seed in seeds:
            if lane is None:
                tag = f"{name}r{restarts}" if restarts else name
                lane = _open_lane(
                    kafka_conf, f"{prefix}-{tag}", root / f"lane{tag}", variant, tag, recheck
                )
            try:
                outcome = run_disaster(lane, seed)
            except Exception as exc:
                plan = Plan.of(seed)
                with campaign.lock:
                    campaign.failures.append(
                        f"[{variant} seed={seed} lane={lane.name} round={lane.rounds - 1} "
                        f"cg={lane.cg} modes={plan.modes} workload={plan.workload_s:.2f}s "
                        f"first={plan.first} gap={plan.gap_s * 1000:.0f}ms] {exc}"
                    )
                _close_lane(lane, campaign)
                lane = None
                restarts += 1
                if restarts > MAX_LANE_RESTARTS:
                    return
                continue
            with campaign.lock:
                campaign.outcomes.append(outcome)
    finally:
        if lane is not None:
            _close_lane(lane, campaign)


def _close_lane(lane: Lane, campaign: Campaign) -> None:
    """Stop the lane's services (a failure of theirs is the campaign's failure), then check
    every W it published against the whole log (a record with ts <= W at or above that
    W's log_offsets breaks safety)."""
    for st in (lane.ap, lane.wm):
        try:
            st.stop()
        except AssertionError as exc:
            with campaign.lock:
                campaign.service_errors.append(f"[lane {lane.name} cg={lane.cg}] {exc}")
    records, lane.log_offsets = read_log_from(lane.kafka_conf, lane.cg, lane.log_offsets)
    lane.record_ts.extend(record_ts_index(records))
    history = watermark_history(lane.kafka_conf, lane.cg)
    bad = watermark_bound_violations(lane.record_ts, history)
    ws = [rec["w"] for _o, rec in history]
    if ws != sorted(ws):
        bad.append(f"W decreased in the watermark topic of {lane.cg}")
    with campaign.lock:
        campaign.failures.extend(f"[lane {lane.name} cg={lane.cg}] {b}" for b in bad[:5])


def seeds_for(variant: str, count: int) -> list[int]:
    replay = os.environ.get("LOWMARK_DISASTER_SEEDS", "").strip()
    if replay:
        return [int(s) for s in replay.split(",") if s.strip()]
    return [SEED_BASE[variant] + i for i in range(count)]


def run_campaign(
    kafka_conf: dict[str, Any],
    prefix: str,
    root: Path,
    variant: str,
    seeds: list[int],
    lanes: int = LANES,
    recheck: bool = False,
) -> Campaign:
    campaign = Campaign()
    if variant == "survivor" and lanes == LANES:
        lanes = SURVIVOR_LANES  # they mostly wait (the fence, the held W): run more at once
    lanes = min(lanes, len(seeds))
    with ThreadPoolExecutor(lanes) as pool:
        futures = [
            pool.submit(
                _run_lane,
                kafka_conf,
                prefix,
                root,
                variant,
                str(i),
                seeds[i::lanes],
                campaign,
                recheck,
            )
            for i in range(lanes)
        ]
        for f in futures:
            f.result()
    return campaign
