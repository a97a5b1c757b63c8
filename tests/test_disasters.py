"""Kill -9 the primary's interceptors mid-workload; the backup must hold a causal prefix.

Tries to break invariants 1 (consistent cut) and 2 (watermark safety) with the crash DR is
for. Two interceptors, each in a process of its own (``tests.disaster_driver``) owning one
volume, carry one causal chain w1 -> w2 -> w3 ... alternating volumes: each write is issued
only after the previous one was acknowledged. At a random instant both processes get
SIGKILL, in random order, up to 50 ms apart. The watermark service and the applier run
here throughout; once nothing more can arrive, the backup images must hold exactly a
prefix w1..wm of the chain, every present write byte-exact (no torn large write), and
equal the log replayed to the final W.

Variants: ``dead``: the dead interceptors stay members (their open transactions are
resolved as a restart would, by init_transactions), W stays at their last progress;
``fenced``: liveness 1 s, the service fences both one after the other, which is what
the FENCE clamp of ``WatermarkState`` is for. A third of the disasters run one volume in
sync mode. Several disasters run at once, each in its own CG ("lane"); a lane reuses its
watermark service and applier for all its disasters, each disaster on fresh volumes.

Also: a stalled interceptor is fenced, and a record its zombie still writes with the old
epoch never reaches the backup image.

Replay: ``LOWMARK_DISASTER_SEEDS=17,42 pytest tests/test_disasters.py -k dead``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from connectors.kafka.topics import CgTopics
from pipeline.applier import Applier, ApplierConfig
from pipeline.clock import make_ts, wall_us
from pipeline.volume import ConsistencyGroup
from pipeline.watermark_service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from tests.disaster_driver import payload
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

pytestmark = pytest.mark.kafka

VOLUME_SIZE = 16 << 20
BLOCK = 4096
LANES = 4
DEFAULT_DISASTERS = 50  # per variant: 100 in the default suite
TORTURE_DISASTERS = 500  # per variant: 1000 under -m torture
SEED_BASE = {"dead": 0, "fenced": 1_000_000}
LIVENESS_S = {"dead": 3600.0, "fenced": 1.0}
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
        return cls(
            seed,
            {n: "sync" if n == sync else "async" for n in NODES},
            rng.uniform(0.2, 1.0),
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
    lost_acked: int = 0
    interceptor_error: str = ""
    volume_full: bool = False  # the chain stopped before the kill
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
            if st.error is not None:
                raise AssertionError(f"lane {self.name}: {st.thread.name} failed: {st.error!r}")


def _chain_length(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.01:  # > 512 KiB: fragmented, must land whole or not at all
        return rng.randrange(520 << 10, 800 << 10) // 512 * 512
    return rng.choice([512, BLOCK, BLOCK, BLOCK, 3 * BLOCK])


def _drive_chain(
    drivers: dict[str, ChildProcess], volumes: dict[str, str], plan: Plan, out: Outcome
) -> None:
    """Issue w1, w2, ... alternating x and y, each after the previous one's ack."""
    rng = random.Random(plan.seed * 7 + 1)
    next_offset = dict.fromkeys(NODES, 0)
    index = 0
    while True:
        index += 1
        node = NODES[(index - 1) % 2]
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
            return  # killed while this write was in flight
        if not reply.startswith("A "):
            out.interceptor_error = f"{node} answered {reply!r} before the kill"
            return
        cw.ts = int(reply.split()[1])


def _kill_both(drivers: dict[str, ChildProcess], plan: Plan) -> None:
    time.sleep(plan.workload_s)
    order = [plan.first, *(n for n in NODES if n != plan.first)]
    for i, node in enumerate(order):
        if i:
            time.sleep(plan.gap_s)
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
                    "dir": str(lane.root / f"r{r}" / node),
                    "interceptor_id": node,
                    "volume": volumes[node],
                    "size": VOLUME_SIZE,
                    "mode": plan.modes[node],
                    "engine": {"tick_interval_s": 0.01, "replication_timeout_s": 10.0},
                },
                lane.root / f"r{r}" / f"{node}.log",
            )
        for d in drivers.values():
            d.expect("READY", 90)
        t1 = time.monotonic()
        out.seconds["start"] = t1 - t0
        killer = threading.Thread(target=_kill_both, args=(drivers, plan), daemon=True)
        killer.start()
        _drive_chain(drivers, volumes, plan, out)
        killer.join()
    finally:
        for d in drivers.values():
            d.kill()
    t2 = time.monotonic()
    out.seconds["workload"] = t2 - t1
    out.w = _settle(lane, out)
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
        wait_until(
            lambda: not lane.service.state.members or lane.wm.error is not None,
            60,
            f"{out.where()} the service fencing both dead interceptors",
        )
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


def _read_image(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


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
            at = next(
                i
                for i, (a, b) in enumerate(zip(images[vid], reference[vid], strict=True))
                if a != b
            )
            out.problems.append(
                f"backup image {vid} differs from the log replayed to W at byte {at}"
            )
    states = _chain_states(images, out)
    for cw, state in zip(out.chain, states, strict=True):
        if state == "torn":
            out.problems.append(f"write w{cw.index} ({cw.length} bytes) is torn or corrupt")
        if cw.ts is not None and cw.ts <= w and state != "present":
            out.problems.append(
                f"acknowledged write w{cw.index} has ts {cw.ts} <= W but is not in the backup "
                "(progress promised a record that was not committed)"
            )
        if cw.ts is not None and cw.ts > w and state == "present":
            out.problems.append(f"write w{cw.index} has ts {cw.ts} > W but is in the backup")
    out.present, problem = _prefix(out, states)
    if problem:
        out.problems.append(problem)
    out.lost_acked = sum(
        1 for cw, s in zip(out.chain, states, strict=True) if cw.ts and s != "present"
    )


def _backup_images(lane: Lane, out: Outcome) -> dict[str, bytes]:
    """The backup's images of a disaster's volumes (zeroes where no image exists yet)."""
    images = {}
    for vid in out.volumes.values():
        data = _read_image(lane.applier.image_path(vid))
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
    """Earlier disasters' volumes must still hold a causal prefix now that W moved on."""
    for earlier in lane.history:
        states = _chain_states(_backup_images(lane, earlier), earlier)
        _present, problem = _prefix(earlier, states)
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


def _close_lane(lane: Lane, campaign: Campaign | None = None) -> None:
    """Stop the lane's services; with ``campaign``, check every W it published against the
    whole log (a record with ts <= W at or above that W's log_offsets breaks safety)."""
    lane.ap.stop()
    lane.wm.stop()
    if campaign is None:
        return
    records, lane.log_offsets = read_log_from(lane.kafka_conf, lane.cg, lane.log_offsets)
    lane.record_ts.extend(record_ts_index(records))
    history = watermark_history(lane.kafka_conf, lane.cg)
    bad = watermark_bound_violations(lane.record_ts, history)
    ws = [rec["w"] for _o, rec in history]
    if ws != sorted(ws):
        bad.append(f"W decreased in the watermark topic of {lane.cg}")
    with campaign.lock:
        campaign.failures.extend(f"[lane {lane.name} cg={lane.cg}] {b}" for b in bad[:5])


def _seeds(variant: str, count: int) -> list[int]:
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


def _assert_campaign(campaign: Campaign, expected: int, started: float, variant: str) -> None:
    outs = campaign.outcomes
    problems = [f"{o.where()} {p}" for o in outs for p in o.problems]
    elapsed = time.monotonic() - started
    with_data = sum(1 for o in outs if o.present > 0)
    print(
        f"\n{variant}: {len(outs) + len(campaign.failures)} disasters in {elapsed:.0f} s, "
        f"{len(campaign.failures)} stopped the backup side, {len(problems)} broke the cut; "
        f"chain writes issued {sum(len(o.chain) for o in outs)}, acknowledged "
        f"{sum(1 for o in outs for c in o.chain if c.ts)}, in the backup "
        f"{sum(o.present for o in outs)}, acknowledged but lost (async, above W) "
        f"{sum(o.lost_acked for o in outs)}; disasters with a non-empty backup {with_data}; "
        f"interceptor errors before the kill "
        f"{sum(1 for o in outs if o.interceptor_error)}; chains that filled their volumes "
        f"before the kill {sum(1 for o in outs if o.volume_full)}; mean seconds per phase "
        + str(
            {
                k: round(sum(o.seconds.get(k, 0) for o in outs) / max(1, len(outs)), 2)
                for k in ("start", "workload", "settle", "check")
            }
        )
    )
    assert not campaign.failures and not problems, (
        f"{len(campaign.failures)} disasters stopped the backup side, {len(problems)} broke "
        "the cut:\n" + "\n".join([*campaign.failures, *problems][:20])
    )
    assert len(outs) == expected
    # not vacuous: most cuts hold some writes and some acknowledged writes were cut off
    assert with_data * 2 >= len(outs), "most disasters left an empty backup: W never moved"
    assert len(outs) < 5 or sum(o.lost_acked for o in outs) > 0, "no kill ever cut an async tail"


def _campaign_test(
    kafka_conf: dict[str, Any], unique_name: str, tmp_path: Path, variant: str, count: int
) -> None:
    seeds = _seeds(variant, count)
    started = time.monotonic()
    campaign = run_campaign(kafka_conf, unique_name, tmp_path, variant, seeds)
    _assert_campaign(campaign, len(seeds), started, variant)


@pytest.mark.parametrize("variant", ["dead", "fenced"])
def test_killed_interceptors_leave_a_causal_prefix(kafka_conf, unique_name, tmp_path, variant):
    _campaign_test(kafka_conf, unique_name, tmp_path, variant, DEFAULT_DISASTERS)


@pytest.mark.torture
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("variant", ["dead", "fenced"])
def test_killed_interceptors_leave_a_causal_prefix_torture(
    kafka_conf, unique_name, tmp_path, variant, request
):
    if "torture" not in (request.config.getoption("-m") or ""):
        pytest.skip(f"{TORTURE_DISASTERS} disasters per variant: run with -m torture")
    _campaign_test(kafka_conf, unique_name, tmp_path, variant, TORTURE_DISASTERS)


# ---------------------------------------------------------------- zombies


FAST = {"tick_interval_s": 0.005, "replication_timeout_s": 10.0}


@dataclass
class ZombieSetup:
    kafka_conf: dict[str, Any]
    cg: str
    live: ConsistencyGroup
    stalled: ConsistencyGroup
    wm: ServiceThread
    ap: ServiceThread
    old_epoch: int


@pytest.fixture
def fenced_zombie(kafka_conf, unique_name, tmp_path) -> Iterator[ZombieSetup]:
    """A live interceptor, and a stalled one the service has fenced (liveness 1 s)."""
    create_cg_topics(kafka_conf, unique_name)
    live = ConsistencyGroup.open(
        unique_name, tmp_path / "live", kafka_conf, interceptor_id="live", **FAST
    )
    stalled = ConsistencyGroup.open(
        unique_name, tmp_path / "stall", kafka_conf, interceptor_id="stall", **FAST
    )
    wm = ap = None
    try:
        live.create_volume("lv", 1 << 20)
        sv = stalled.create_volume("sv", 1 << 20)
        sv.write(0, b"before-the-stall" * 64)
        stalled.flush()
        wm = ServiceThread(
            WatermarkService(
                WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=1.0), kafka_conf
            ),
            "wm",
        ).start()
        ap = ServiceThread(
            Applier(
                ApplierConfig(
                    cg=unique_name,
                    site="backup",
                    data_dir=tmp_path / "backup",
                    checkpoint_interval_s=0.2,
                ),
                kafka_conf,
            ),
            "applier",
        ).start()
        old_epoch = stalled.interceptor.epoch
        stalled.interceptor.crash()  # the tick thread stops: a stalled process
        wait_until(
            lambda: "stall" not in wm.service.state.members,
            20,
            "the service to fence the stalled interceptor and fold the FENCE",
        )
        assert wm.service.stats.fenced == 1
        yield ZombieSetup(kafka_conf, unique_name, live, stalled, wm, ap, old_epoch)
        assert wm.error is None and ap.error is None, (wm.error, ap.error)
    finally:
        for st in (ap, wm):
            if st is not None:
                st.stop()
        live.close()
        stalled.close()


ZOMBIE_BYTES = b"ZOMBIE-WRITE-FROM-A-FENCED-EPOCH!" * 31


def _produce_zombie_write(setup: ZombieSetup, volume_id: str, offset: int) -> int:
    """A valid Write record with the fenced epoch, produced past Kafka's fencing (the way
    Jepsen saw fenced producers' writes surface), into the volume's own partition."""
    records, _ends = read_log_from(setup.kafka_conf, setup.cg)
    partition = next(p for _t, rec, p, _o in records if rec.get("volume_id") == volume_id)
    ts = make_ts(wall_us())  # a zombie resuming after a pause stamps with its clock: now
    rec = {
        "volume_id": volume_id,
        "interceptor_id": "stall",
        "epoch": setup.old_epoch,
        "extents": [
            {
                "ts": ts,
                "offset": offset,
                "write_length": len(ZOMBIE_BYTES),
                "fragment_index": 0,
                "fragment_count": 1,
                "data": ZOMBIE_BYTES,
            }
        ],
    }
    p = Producer(setup.kafka_conf)
    p.produce(
        CgTopics(setup.cg).log,
        codec.encode("Write", rec),
        volume_id,
        partition=partition,
        headers=codec.headers_for("Write", rec),
    )
    assert p.flush(10) == 0
    return ts


def _drive_w_past(setup: ZombieSetup, ts: int, *cgs: ConsistencyGroup) -> None:
    """Write on the living until W (and the applier) passed ``ts``."""
    deadline = time.monotonic() + 20
    last = 0
    while last <= ts and time.monotonic() < deadline:
        for i, cg in enumerate(cgs):
            vol = next(iter(cg.volumes.values()))
            last = max(last, vol.write(8192 + 512 * i, b"moving-on" * 50))
            cg.flush()
        time.sleep(0.05)
    assert last > ts
    ap = setup.ap
    wait_until(
        lambda: ap.error is not None or ap.service.applied_w >= last, 20, "the applier passes ts"
    )
    assert ap.error is None, f"the applier stopped: {ap.error!r}"


def test_zombie_record_is_rejected_after_its_interceptor_rejoined(fenced_zombie, tmp_path):
    """The fenced interceptor restarts (new epoch) and writes; then a record of the old
    epoch surfaces in the same partition: the applier must count and drop it."""
    setup = fenced_zombie
    rejoined = ConsistencyGroup.open(
        setup.cg, tmp_path / "stall", setup.kafka_conf, interceptor_id="stall", **FAST
    )
    try:
        assert rejoined.interceptor.epoch > setup.old_epoch
        ts_new = rejoined.volume("sv").write(4096, b"new-epoch" * 50)
        rejoined.flush()
        wait_until(lambda: setup.ap.service.applied_w >= ts_new, 20, "the new epoch applied")
        zombie_ts = _produce_zombie_write(setup, "sv", 65536)
        _drive_w_past(setup, zombie_ts, setup.live, rejoined)
        planner = setup.ap.service.planner
        assert planner.stats.rejected_stale_epoch >= 1, planner.stats
        image = (tmp_path / "backup" / "images" / "sv.img").read_bytes()
        assert b"new-epoch" in image and b"before-the-stall" in image
        assert ZOMBIE_BYTES not in image, "a fenced epoch's record reached the backup"
    finally:
        rejoined.close()


def test_zombie_record_is_rejected_while_its_interceptor_stays_fenced(fenced_zombie, tmp_path):
    """Nobody restarts the fenced interceptor; a record of its epoch surfaces with a fresh
    ts, and the living move W past that ts. The record must not reach the backup."""
    setup = fenced_zombie
    zombie_ts = _produce_zombie_write(setup, "sv", 65536)
    _drive_w_past(setup, zombie_ts, setup.live)
    image = (tmp_path / "backup" / "images" / "sv.img").read_bytes()
    assert b"before-the-stall" in image
    stats = setup.ap.service.planner.stats
    assert ZOMBIE_BYTES not in image, (
        f"a record of fenced interceptor 'stall' epoch {setup.old_epoch} (ts {zombie_ts}) "
        f"was applied to the backup; planner stats {stats}"
    )
    assert stats.rejected_stale_epoch >= 1, stats


@pytest.mark.xfail(
    reason=(
        "known limit, documented in docs/ARCHITECTURE.md: when a dead interceptor rejoins (or "
        "is fenced) and the living report again, W moves past its last S; its acknowledged "
        "async tail is lost, so a later write that causally followed it can be in the cut. "
        "Closing this needs a dirty-region log and resync of the rejoining volume (failback)."
    ),
    strict=False,
)
def test_restarted_primary_keeps_earlier_cuts_causal(kafka_conf, unique_name, tmp_path):
    """The primary restarts after each disaster (same interceptor ids, new epochs) and
    writes on, so W moves past the dead instances' S. Every earlier disaster's volumes
    must still hold a causal prefix: invariant 1 covers every exposed state, not only the
    one right after the crash."""
    seeds = [2_000_000 + i for i in range(6)]
    started = time.monotonic()
    campaign = run_campaign(kafka_conf, unique_name, tmp_path, "dead", seeds, 2, recheck=True)
    _assert_campaign(campaign, len(seeds), started, "dead, re-checked after restarts")
