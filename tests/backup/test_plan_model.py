"""Tries to break the apply planner against a model of its log (DESIGN invariants 1, 4, 5).

A consumer reads the partitions of a generated log (``tests.backup.plan_logs``) in random
interleavings, W moves in random steps, the planner drops its backlog (budget) and
re-reads, and "crashes" (a new planner from checkpoint_offsets + applied_w, re-reading from
there) while the images keep whatever was applied. After every take(w) the ops must be
exactly the log's ops in (applied_w, w] in order, and the images must equal the images
built by applying every legitimate record with ts <= w directly in ts order. Driven by a
seeded simulation and by a hypothesis state machine.
"""

from __future__ import annotations

import bisect
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pipeline.backup.plan import AddOutcome, ApplyPlanner
from tests.backup.plan_logs import IMAGE_SIZE, Log, apply_to, expected_ops, image_at, make_log


class Driver:
    """What the applier does, with the choices left to the caller (rng or hypothesis)."""

    def __init__(self, log: Log, budget: int) -> None:
        self.log = log
        self.budget = budget
        self.planner = ApplyPlanner(max_pending_bytes=budget)
        self.cursor = [0] * len(log.parts)
        self.images = {v: bytearray(IMAGE_SIZE) for v in log.volumes}
        self.published_w = 0
        self.high_w = 0  # highest W applied to the images (survives crashes)
        self.ckpt: tuple[int, dict[int, int], list] = (0, {}, [])
        self.takes = 0

    def read(self, p: int, n: int) -> None:
        recs = self.log.parts[p]
        for _ in range(n):
            if self.cursor[p] >= len(recs):
                return
            r = recs[self.cursor[p]]
            applied = self.planner.applied_w
            out = self.planner.add(r.record, p, r.offset)
            if r.zombie:
                assert out is AddOutcome.REJECTED_STALE_EPOCH, r
            elif r.max_ts <= applied:
                assert out is AddOutcome.SKIPPED_APPLIED, r
            else:
                assert out is AddOutcome.ACCEPTED, r
            self.cursor[p] += 1
            nxt = recs[self.cursor[p]].offset if self.cursor[p] < len(recs) else r.offset + 1
            self.planner.note_position(p, nxt)
            if self.planner.over_budget():
                self.drop()
                return

    def publish(self, dw: int) -> None:
        self.published_w = min(self.published_w + dw, self.log.max_ts + 2)

    def apply(self, rng: random.Random | None = None) -> bool:
        w = self.published_w
        if not self.planner.ready(w, self.log.required_offsets(w, rng)):
            return False
        before = self.planner.applied_w
        ops = self.planner.take(w)
        if w <= before:
            assert ops == []
            return True
        assert ops == expected_ops(self.log, before, w)
        for op in ops:
            apply_to(self.images, op)
        assert w >= self.high_w  # the applier never goes back: W never decreases
        self.high_w = w
        assert self.images == image_at(self.log, w)
        self.takes += 1
        return True

    def seek(self, offsets: dict[int, int]) -> None:
        for p, recs in enumerate(self.log.parts):
            off = offsets.get(p, 0)
            self.cursor[p] = bisect.bisect_left([r.offset for r in recs], off)

    def drop(self) -> None:
        positions = self.planner.checkpoint_offsets()
        offsets = self.planner.drop_pending()
        assert self.planner.pending_bytes() == 0 and not self.planner.over_budget()
        for p, off in offsets.items():
            assert off <= positions[p]
        self.seek(offsets)

    def checkpoint(self) -> None:
        p = self.planner
        self.ckpt = (p.applied_w, p.checkpoint_offsets(), p.epoch_evidence())

    def crash(self) -> None:
        w, offsets, evidence = self.ckpt
        self.planner = ApplyPlanner(w, self.budget, evidence)
        self.seek(offsets)
        for p, off in offsets.items():
            self.planner.note_position(p, off)  # where the consumer was told to start

    def drain(self) -> None:
        """Read everything (ignoring the budget) and apply the last W."""
        self.planner.max_pending_bytes = 1 << 40
        for p in range(len(self.log.parts)):
            self.read(p, 10**9)
        self.published_w = self.log.max_ts + 2
        assert self.apply()
        assert self.images == image_at(self.log, self.log.max_ts)
        assert self.planner.pending_bytes() == 0
        ckpt = self.planner.checkpoint_offsets()
        for p, recs in enumerate(self.log.parts):
            if recs:
                assert ckpt[p] == recs[-1].offset + 1  # nothing pending: the position


class PlannerMachine(RuleBasedStateMachine):
    @initialize(
        seed=st.integers(0, 2**32 - 1),
        n_vol=st.integers(1, 4),
        n_part=st.integers(1, 3),
        steps=st.integers(5, 60),
        budget=st.sampled_from([1 << 30, 400, 1200]),
    )
    def setup(self, seed: int, n_vol: int, n_part: int, steps: int, budget: int) -> None:
        self.rng = random.Random(seed)
        self.d = Driver(make_log(self.rng, n_vol, n_part, steps), budget)

    @rule(p=st.integers(0, 2), n=st.integers(1, 6))
    def read(self, p: int, n: int) -> None:
        self.d.read(p % len(self.d.log.parts), n)

    @rule(dw=st.integers(0, 12))
    def publish(self, dw: int) -> None:
        self.d.publish(dw)

    @rule()
    def apply(self) -> None:
        self.d.apply(self.rng)

    @rule()
    def drop(self) -> None:
        self.d.drop()

    @rule()
    def checkpoint(self) -> None:
        self.d.checkpoint()

    @rule()
    def crash(self) -> None:
        self.d.crash()

    @invariant()
    def bookkeeping(self) -> None:
        p = self.d.planner
        assert p.pending_bytes() >= 0
        assert p.over_budget() == (p.pending_bytes() > p.max_pending_bytes)
        for part, off in p.checkpoint_offsets().items():
            recs = self.d.log.parts[part]
            pos = recs[self.d.cursor[part]].offset if self.d.cursor[part] < len(recs) else None
            assert pos is None or off <= pos

    def teardown(self) -> None:
        if hasattr(self, "d"):
            self.d.drain()


PlannerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_planner_machine = PlannerMachine.TestCase


def simulate(seed: int, steps: int) -> Driver:
    rng = random.Random(seed)
    log = make_log(rng, rng.randint(1, 5), rng.randint(1, 4), steps)
    d = Driver(log, rng.choice([1 << 30, 1 << 30, 500, 2000]))
    for _ in range(steps * 4):
        r = rng.random()
        if r < 0.45:
            d.read(rng.randrange(len(log.parts)), rng.randint(1, 8))
        elif r < 0.65:
            d.publish(rng.randint(0, 10))
        elif r < 0.85:
            d.apply(rng)
        elif r < 0.9:
            d.checkpoint()
        elif r < 0.95:
            d.crash()
        else:
            d.drop()
    d.drain()
    return d


def test_simulation_many_seeds() -> None:
    takes = 0
    for seed in range(300):
        takes += simulate(seed, 80).takes
    assert takes > 600  # the runs applied many times, not only in the final drain


@pytest.mark.torture
def test_simulation_torture() -> None:
    for seed in range(100_000, 101_000):
        simulate(seed, 400)


@pytest.mark.torture
def test_planner_machine_torture() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        PlannerMachine,
        settings=settings(max_examples=2000, stateful_step_count=150, deadline=None),
    )
