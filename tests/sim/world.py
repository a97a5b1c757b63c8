"""The simulated world: interceptors, the log, a watermark service, two backup sites, faults.

Everything random comes from one ``random.Random(seed)`` and the simulated time is the only
clock, so a seed replays byte for byte. ``World.run`` takes steps (one event each, chosen
by weight), checks every invariant after each one (``tests/sim/checks.py``) and raises
``Violation`` with the seed and the last events when one breaks.

Faults: writes queued and lost by a crash (async), aborted transactions left in the log
and resent (a retry), a kill with a transaction open, an interceptor paused until the
watermark service fences it, graceful leaves, restarts with a new epoch (JOIN), wall clock
jumps (within max_clock_skew), volumes that grow and shrink, zombie records (and zombie
PROGRESS) of a fenced or departed instance surfacing after the W that proves them stale,
records that do not decode (the partition blocks, the applier halts, the operator skips),
partitions read in any interleaving, watermark service restarts, applier spills and kills
(restart from the checkpoint, with every W or only the latest as after compaction), and
failover cuts from a checkpoint to a W (replay, backlog, roll-forward with client I/O).

Invariants checked after every step: W never decreases; every published W bounds its
records and no record with ts <= W is committed after it; W passes a fenced instance's S
only on fresh evidence; a restarted watermark fold agrees with an uninterrupted one; no op
with ts > W and no zombie op is applied; the images of both sites, whenever they claim a
cut, and every checkpoint equal the oracle at their W; checkpoints never pass an unskipped
bad record; the clock never reissues a ts (across restarts, through its reservation) and a
write issued after another was acknowledged gets a larger ts; every failover cut reads as
the oracle before, during and after its roll-forward. At the end (faults off): W covers
every durable record, and both sites, one killed and restarted, hold the oracle's bytes.

The oracle (``primary.reference_images``) applies exactly the committed records of live
instances with ts <= W, per volume in ts order.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, deque
from dataclasses import dataclass

from schemas.records import Progress, ProgressKind, Write, WriteExtent, Zero, ZeroKind
from schemas.ts import ts_physical_us
from tests.sim import checks
from tests.sim.backup import LIVENESS_US, Applier, WatermarkService
from tests.sim.cut import failover_cut
from tests.sim.log import SimLog
from tests.sim.primary import MAX_SKEW_US, Interceptor, RefOp, reference_images

START_US = 1_760_000_000_000_000
TRACE_LEN = 50


class Violation(AssertionError):
    pass


@dataclass(frozen=True)
class Config:
    steps: int = 400
    #: zombies surface only after the applier read the W that proves them stale (the
    #: planner's evidence rule); False lets them come first (see test_sim's xfail)
    zombie_after_proof: bool = True
    #: check failover cuts whose replay range holds a zombie (ReplayPlan has no W evidence)
    cut_zombies: bool = False
    zombies: bool = True
    #: volumes shrink too (else only grow); a restarted applier then meets the known limit
    #: of docs/ARCHITECTURE.md (re-applied writes past a shrink: the sim finds it), so the
    #: site is neither killed nor halted by bad records
    shrinks: bool = False
    #: a restarted applier may find only the latest W (the topic is compacted)
    compaction: bool = False
    #: a replaced instance's zombie may carry a ts at or below its final S (its clock went
    #: back: beyond the S contract); only the W that listed its successor proves it stale,
    #: and compaction can remove that W (test_findings' open cases)
    low_zombies: bool = False

    @classmethod
    def from_env(cls, seed: int, text: str) -> Config:
        """``for_seed`` with the flags of LOWMARK_SIM_CONFIG (``name=0|1,...``) changed."""
        flags = dict(kv.split("=") for kv in text.split(",") if kv)
        return dataclasses.replace(cls.for_seed(seed), **{k: v == "1" for k, v in flags.items()})

    @classmethod
    def for_seed(cls, seed: int, steps: int = 400) -> Config:
        """The default mix: zombies on even seeds, compacted restarts on odd ones (together
        they meet a known gap, test_sim's xfail)."""
        return cls(
            steps=steps,
            zombies=seed % 2 == 0,
            compaction=seed % 2 == 1,
            shrinks=seed % 4 == 2,
        )


class World:
    def __init__(self, seed: int, config: Config | None = None) -> None:
        self.seed = seed
        self.config = config = config or Config.for_seed(seed)
        self.rng = rng = random.Random(seed)
        self.now_us = START_US
        self.trace: deque[str] = deque(maxlen=TRACE_LEN)
        self.faults: Counter[str] = Counter()
        self.acked = 0
        self.step_no = 0
        n_int, n_vol = rng.randint(1, 3), rng.randint(1, 5)
        self.log = SimLog(rng.randint(1, 4))
        self.volumes = [f"v{k}" for k in range(n_vol)]
        part_of = {v: rng.randrange(self.log.partitions) for v in self.volumes}
        disk: dict[str, int] = {}
        self.interceptors = [
            Interceptor(
                f"i{k}",
                [v for j, v in enumerate(self.volumes) if j % n_int == k],
                part_of,
                rng.randint(-MAX_SKEW_US // 2, MAX_SKEW_US // 2),
                disk,
                lambda: self.now_us,
                shrinks=config.shrinks,
            )
            for k in range(n_int)
        ]
        self.ref: list[RefOp] = []
        self.legit: set[tuple[str, int, str, int]] = set()
        self.max_acked_ts = 0
        self.zombies = 0
        self.cuts_checked = 0
        self._checked_ws = 0
        self._zombie_ts: dict[tuple[str, int], int] = {}  # the last ts of each zombie instance
        self._checked_ts: Counter[str] = Counter()
        self.cuts_skipped = 0
        self._ref_cache: dict[int, dict[str, bytes]] = {}
        self.wm = WatermarkService(self.log, lambda: self.now_us, self._fenced)
        self.site = Applier("site", self.log)  # gets killed and restarted
        self.shadow = Applier("shadow", self.log)  # never killed: the same bytes at the end
        for i in self.interceptors:
            if i.volumes:
                self._note(f"{i.iid} starts with {i.volumes} skew {i.skew_us} µs")
                i.start(self.log)

    # ---------------------------------------------------------------- helpers

    def _note(self, what: str, fault: str | None = None) -> None:
        self.trace.append(f"#{self.step_no} t+{self.now_us - START_US}µs {what}")
        if fault is not None:
            self.faults[fault] += 1

    def summary(self) -> Counter[str]:
        """What this run injected and checked (faults, durable ops, W's, aborted txns)."""
        out = Counter(self.faults)
        out["aborted transaction"] += sum(
            1 for part in self.log.parts for e in part if e.record is not None and not e.committed
        )
        out["leaderless partition"] += self.wm.leaderless
        out["durable ops checked"] += len(self.ref)
        out["acknowledged writes checked"] += self.acked
        out["W published"] += len(self.log.watermarks)
        out["zombie records rejected"] += sum(
            a.planner.stats.rejected_stale_epoch for a in (self.site, self.shadow)
        )
        return out

    def fail(self, what: str) -> None:
        trace = "\n  ".join(self.trace)
        default = Config.for_seed(self.seed, self.config.steps)
        changed = [
            f"{f.name}={int(getattr(self.config, f.name))}"
            for f in dataclasses.fields(Config)
            if f.name != "steps" and getattr(self.config, f.name) != getattr(default, f.name)
        ]
        env = f" LOWMARK_SIM_CONFIG={','.join(changed)}" if changed else ""
        raise Violation(
            f"seed {self.seed}, step {self.step_no}: {what}\n"
            f"replay: LOWMARK_SIM_SEED={self.seed}{env} pytest tests/sim/test_sim.py -k replay\n"
            f"last events:\n  {trace}"
        )

    def check(self, result: str | None) -> None:
        if result is not None:
            self.fail(result)

    def reference(self, w: int) -> dict[str, bytes]:
        got = self._ref_cache.get(w)
        if got is None:
            got = self._ref_cache[w] = reference_images(self.ref, w, self.volumes)
        return got

    def _fenced(self, iid: str) -> None:
        for i in self.interceptors:
            if i.iid == iid and i.alive:
                self._note(f"watermark service fences {iid} epoch {i.epoch}", fault="fence")
                i.fenced = True
                i.crash()

    def _commit(self, i: Interceptor, durable: list[RefOp], before: dict[int, int]) -> None:
        max_w = self.log.watermarks[-1].w if self.log.watermarks else 0
        for p, start in before.items():
            self.check(checks.no_record_below_published_w(self.log.parts[p][start:], max_w))
        for op in durable:
            self.ref.append(op)
            self.legit.add((op.volume_id, op.ts, i.iid, i.epoch))
        if durable:
            self._ref_cache.clear()

    # ---------------------------------------------------------------- events

    def step(self) -> None:
        rng = self.rng
        self.step_no += 1
        self.now_us += rng.randint(100, 20_000)
        r = rng.random()
        live = [i for i in self.interceptors if i.alive and i.volumes and not i.stalled]
        if r < 0.30 and live:
            i = rng.choice(live)
            for _ in range(rng.randint(1, 3)):
                op = i.write(rng, rng.choice(i.volumes))
                if op.ts <= self.max_acked_ts:
                    self.fail(
                        f"{i.iid} issued ts {op.ts} <= an acknowledged ts {self.max_acked_ts}"
                    )
            self._note(f"{i.iid} writes, {len(i.outbox)} queued")
        elif r < 0.50 and live:
            i = rng.choice(live)
            before = self.log.ends()
            durable = i.tick(self.log, rng, abort_p=0.15)
            self._note(f"{i.iid} ticks: {len(durable)} ops durable, S {i.last_s}")
            self._commit(i, durable, before)
        elif r < 0.53:
            self._interceptor_fault()
        elif r < 0.56:
            dead = [i for i in self.interceptors if not i.alive and i.volumes]
            if dead:
                i = rng.choice(dead)
                i.start(self.log)
                self._note(f"{i.iid} restarts: epoch {i.epoch}", fault="interceptor restart")
        elif r < 0.58:
            i = rng.choice(self.interceptors)
            i.skew_us = max(
                -MAX_SKEW_US // 2, min(MAX_SKEW_US // 2, i.skew_us + rng.randint(-500_000, 500_000))
            )
            self._note(f"{i.iid}'s wall clock jumps to skew {i.skew_us} µs", fault="clock jump")
        elif r < 0.60:
            if self.config.zombies:
                self._zombie()
        elif r < 0.603 and not self.config.shrinks:  # a skip restarts: the shrink limit
            p = rng.randrange(self.log.partitions)
            off = self.log.append_corrupt(p)
            self._note(f"a record that does not decode at {p}@{off}", fault="bad record")
        elif r < 0.75:
            self._watermark()
        elif r < 0.98:
            self._apply(self.site if rng.random() < 0.5 else self.shadow)
        else:
            self._cut()
        for i in self.interceptors:
            for ts in i.ack_due():
                self.max_acked_ts = max(self.max_acked_ts, ts)
                self.acked += 1
        self.check_all()

    def _interceptor_fault(self) -> None:
        rng = self.rng
        live = [i for i in self.interceptors if i.alive and not i.stalled]
        if not live:
            return
        i = rng.choice(live)
        f = rng.random()
        if f < 0.3:
            i.crash()
            self._note(f"{i.iid} crashes (its queued writes are lost)", fault="interceptor crash")
        elif f < 0.5:
            i.crash_mid_txn(self.log, rng)
            self._note(f"{i.iid} killed in a transaction (aborted)", fault="kill in a transaction")
        elif f < 0.8:
            i.stalled = True
            self._note(f"{i.iid} pauses (will be fenced)", fault="interceptor pause")
        else:
            before = self.log.ends()
            durable = i.leave(self.log, rng)
            self._commit(i, durable, before)
            self._note(f"{i.iid} leaves at S {i.last_s}", fault="leave")

    def _watermark(self) -> None:
        rng = self.rng
        if rng.random() < 0.05:
            self.wm.restart()
            self._note(
                f"watermark service restarts at W {self.wm.state.w}", fault="watermark restart"
            )
            return
        if rng.random() < 0.03:
            self.wm.take_over()
            self._note(
                f"the standby watermark instance takes over at W {self.wm.state.w} "
                f"(floor {self.wm.floor})",
                fault="watermark takeover",
            )
            return
        self.wm.fold(rng)
        for iid in self.wm.fence_silent():
            self._note(f"FENCE {iid}")
        if rng.random() < 0.6:
            wm = self.wm.publish(rng)
            if wm is not None:
                self._note(f"publishes W {wm.w} offsets {dict(wm.log_offsets)}")
                self.check(checks.published_w_bounds_its_records(wm, self.log.parts))
                self.check(checks.fence_clamps_w(wm, self.wm.fences))

    def _zombie(self) -> None:
        """A fenced or departed instance's record surfaces after a W that proves it stale:
        that W lists its departure (and, if replaced, the newer epoch)."""
        rng = self.rng
        if not self.log.watermarks:
            return
        k = len(self.log.watermarks) - 1
        wm = self.log.watermarks[k]
        if not wm.departed:
            return
        d = rng.choice(wm.departed)
        owner = next(i for i in self.interceptors if i.iid == d.interceptor_id)
        replaced = any(
            m.interceptor_id == d.interceptor_id and m.epoch > d.epoch for m in wm.members
        )
        low = 1 if self.config.low_zombies and replaced and rng.random() < 0.5 else d.s + 1
        # its clock: within 200 ms of its S, and never back (one instance's clock is monotonic)
        low = max(low, self._zombie_ts.get((d.interceptor_id, d.epoch), 0) + 1)
        ts = rng.randint(low, max(low, d.s + (200_000 << 12)))
        if ts in owner.issued:
            return
        self._zombie_ts[d.interceptor_id, d.epoch] = ts
        vid = rng.choice(owner.volumes)
        p = owner.partition_of[vid]
        if rng.random() < 0.5:
            rec: Write | Zero = Write(
                vid, d.interceptor_id, d.epoch, (WriteExtent(ts, 0, 4, 0, 1, b"ZZZZ"),)
            )
        else:
            rec = Zero(vid, d.interceptor_id, d.epoch, ts, 0, 8, ZeroKind.ZERO)
        prog = None
        if rng.random() < 0.5:  # its PROGRESS too, with any S: the fold must refuse it
            s = rng.randint(d.s, d.s + (1_000_000 << 12))  # up to 1 s above its last S
            prog = Progress(d.interceptor_id, d.epoch, ProgressKind.PROGRESS, s, {}, 0)
        self.log.append_txn([(p, rec)], prog, committed=True, zombie=True, proof_w=k)
        self.zombies += 1
        self._note(
            f"zombie {d.interceptor_id} epoch {d.epoch} ts {ts} in partition {p}", fault="zombie"
        )

    def _apply(self, a: Applier) -> None:
        rng = self.rng
        f = rng.random()
        if a.halted is not None:
            if f < 0.2:
                self._note(f"{a.name} halted at {a.halted}; the operator skips it")
                a.operator_skip()
            return
        if a is self.site and f < 0.04 and not self.config.shrinks:
            a.restart(compacted=self.config.compaction and rng.random() < 0.5)
            self._note(
                f"{a.name} killed; restarts from checkpoint W {a.checkpoint.w}",
                fault="applier kill",
            )
        elif f < 0.06:
            a.spill()
            self._note(f"{a.name} spills and re-reads", fault="applier spill")
        elif f < 0.55:
            p = rng.randrange(self.log.partitions)
            proof = (
                (lambda k: a.wm_read_max >= k)
                if self.config.zombie_after_proof
                else (lambda k: True)
            )
            n = a.read_log(rng, p, rng.randint(1, 6), proof)
            self._note(f"{a.name} reads {n} of partition {p}")
        elif f < 0.75:
            n = a.read_watermarks(rng.randint(1, 3))
            self._note(f"{a.name} reads {n} W")
        elif f < 0.93:
            if a.apply_ready():
                self._note(f"{a.name} applies up to W {a.applied_w}")
        elif a.take_checkpoint():
            self._note(f"{a.name} checkpoints W {a.checkpoint.w} at {a.checkpoint.offsets}")

    def _cut(self) -> None:
        rng = self.rng
        site = rng.choice([self.site, self.shadow])
        later = [wm for wm in self.log.watermarks if wm.w >= site.checkpoint.w]
        if not later:
            return
        wm = rng.choice(later)
        ck = site.checkpoint
        if not self.config.cut_zombies:
            rng_recs = self.log.committed_records(ck.offsets, dict(wm.log_offsets))
            if any(e.zombie for es in rng_recs.values() for e in es):
                self.cuts_skipped += 1
                return
        self._note(
            f"failover cut from {site.name}'s checkpoint W {ck.w} to W {wm.w}", fault="failover cut"
        )
        self.check(checks.images_equal("checkpoint", ck.images, self.reference(ck.w)))
        latest = self.log.watermarks[-1]  # what `lowmark failover` judges epochs by
        self.check(failover_cut(rng, self.log, ck, wm, self.reference(wm.w), latest))
        self.cuts_checked += 1

    # ---------------------------------------------------------------- invariants

    def check_all(self) -> None:
        # the lists only grow: check the new entries (checking all made a run O(steps²))
        self.check(checks.w_never_decreases(self.log.watermarks, self._checked_ws))
        self._checked_ws = len(self.log.watermarks)
        for i in self.interceptors:
            self.check(checks.strictly_increasing(i.iid, i.issued, self._checked_ts[i.iid]))
            self._checked_ts[i.iid] = len(i.issued)
        for a in (self.site, self.shadow):
            self.check(checks.applied_only_legit_and_below_w(a, self.legit))
            self.check(checks.checkpoint_stops_at_bad_records(a, self.log.bad))
            if a.is_cut():
                self.check(checks.images_equal(a.name, a.images, self.reference(a.applied_w)))
        if self.wm.cursor == self.wm.shadow_cursor:
            self.check(checks.fold_agrees(self.wm.state, self.wm.shadow))

    # ---------------------------------------------------------------- a run

    def drain(self) -> None:
        """Stop the faults: every interceptor flushes and leaves, the service publishes the
        last W, both sites apply it; they must hold the same bytes, the oracle's."""
        self._note("drain")
        for _ in range(3 * LIVENESS_US // 10_000):  # the healthy tick, the rest is fenced
            self.now_us += 10_000
            for i in self.interceptors:
                if i.alive and not i.stalled:
                    before = self.log.ends()
                    self._commit(i, i.tick(self.log, self.rng, abort_p=0.0), before)
            self._fold_all()
            for iid in self.wm.fence_silent():
                self._note(f"drain: FENCE {iid}")
        down = [i for i in self.interceptors if i.volumes and (not i.alive or i.stalled)]
        for i in down:
            i.stalled = False
            i.crash()
        # some never come back (declared lost): W must pass them on the living's evidence
        back = [i for i in down if self.rng.random() < 0.5]
        if down and not back and not any(i.alive for i in self.interceptors):
            back = down[:1]
        for i in back:
            i.start(self.log)
            self._note(f"drain: {i.iid} restarts: epoch {i.epoch}")
        # wait until every wall clock is past every durable ts (floors raised by zombies'
        # S, reservations and skew put some ts ahead of true time): then every S passes all
        newest = max((ts_physical_us(o.ts) for o in self.ref), default=0)
        lag = max(newest - (self.now_us + i.skew_us) for i in self.interceptors)
        self.now_us += max(0, lag) + 2_000_000
        for i in self.interceptors:
            if i.alive:  # a tick after the wait, then until the outbox is empty
                while True:
                    before = self.log.ends()
                    self._commit(i, i.tick(self.log, self.rng, abort_p=0.0, split=False), before)
                    if not i.outbox:
                        break
        self._fold_all()
        self.wm.publish()
        final = max((wm.w for wm in self.log.watermarks), default=0)
        self.check(
            checks.w_covers_everything_durable(final, max((o.ts for o in self.ref), default=0))
        )
        for i in self.interceptors:
            if i.alive:
                before = self.log.ends()
                self._commit(i, i.leave(self.log, self.rng), before)
        for a in (self.site, self.shadow):
            for _ in range(10_000):
                if a.halted is not None:
                    a.operator_skip()
                a.read_watermarks(100)
                for p in range(self.log.partitions):
                    a.read_log(self.rng, p, 100, lambda k: True)
                a.apply_ready()
                if a.applied_w >= final and not a.targets:
                    break
            if a.applied_w != final:
                self.fail(f"{a.name} stalled at W {a.applied_w}, the last W is {final}")
        self.check_all()
        self.check(checks.images_equal("site", self.site.images, self.reference(final)))
        self.check(checks.images_equal("shadow", self.shadow.images, self.reference(final)))

    def _fold_all(self) -> None:
        while self.wm.cursor < len(self.log.progress):
            self.wm.fold(self.rng)

    def run(self) -> World:
        try:
            self.check_all()
            for _ in range(self.config.steps):
                self.step()
            self.drain()
        except Violation:
            raise
        except Exception as exc:  # lowmark raised (a halt, a refused take): also a finding
            self.fail(f"{type(exc).__name__}: {exc}")
        return self
