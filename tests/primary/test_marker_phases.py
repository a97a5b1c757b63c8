"""The marker phases (``pipeline.primary.markers``) under random interleavings, no broker.

A simulated control topic (one order), members and a coordinator that read it at their
own pace, steps that take random time to land, drains that finish late or fail, members
that stop answering, a coordinator that dies, hooks that never come. Tries to break:
members that disagree on whether the marker happened or at which ts; a Marker written
although an ABORT stood before the last QUIESCED in the topic (or not written although
every QUIESCED stood first); a ts not above every member's cap; a member that holds past
its timeout; a coordinator that reports success without a durable Marker, or failure
with one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from pipeline.primary.markers import Act, MarkerRun, MemberAction, MemberPhases, Stage
from schemas.control import MarkerPhase, MarkerStep


@dataclass
class Member:
    iid: str
    phases: MemberPhases
    cursor: int = 0
    outbox: list[MarkerPhase] = field(default_factory=list)
    draining: MemberAction | None = None
    drain_done_at: float = 0.0
    drain_fails: bool = False
    silent: bool = False  # stops reading and answering (a stopped process)
    holding: bool = False
    held_since: float = 0.0
    resumed: list[tuple[str, int, str]] = field(default_factory=list)  # (act, ts, why)
    emitted: list[int] = field(default_factory=list)


class Sim:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.t = 0.0
        self.log: list[MarkerPhase] = []
        n = self.rng.randint(1, 4)
        self.timeout = self.rng.choice([0.2, 1.0, 4.0])
        self.members = [
            Member(f"i{k}", MemberPhases(f"i{k}", lambda: self.t)) for k in range(n)
        ]
        self.by_id = {m.iid: m for m in self.members}
        self.run = MarkerRun("m1", "nightly", tuple(m.iid for m in self.members),
                             self.timeout, lambda: self.t)  # fmt: skip
        self.coord_cursor = 0
        self.coord_dies_at = self.rng.choice([None, None, self.rng.uniform(0, self.timeout)])
        self.coord_outbox: list[MarkerPhase] = [self.run.start()]
        self.next_cap = 1000
        for m in self.members:
            m.drain_fails = self.rng.random() < 0.05
            m.silent = self.rng.random() < 0.05
        self.max_hold = 0.0
        self.max_dt = 0.0

    def coordinator_alive(self) -> bool:
        return self.coord_dies_at is None or self.t < self.coord_dies_at

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.15:  # time passes; a live member polls its deadline (the edge does, often)
            dt = self.rng.expovariate(1 / (self.timeout / 20))
            self.t += dt
            self.max_dt = max(self.max_dt, dt)
            for m in self.members:
                if not m.silent and m.draining is None:
                    self._act(m, m.phases.poll())
        elif r < 0.35:  # a sent step lands in the topic
            boxes = [b for b in [self.coord_outbox, *(m.outbox for m in self.members)] if b]
            if boxes:
                self.log.append(self.rng.choice(boxes).pop(0))
        elif r < 0.55 and self.coordinator_alive():
            while self.coord_cursor < len(self.log):
                self.run.on_step(self.log[self.coord_cursor])
                self.coord_cursor += 1
            out = self.run.poll()
            if out is not None:
                self.coord_outbox.append(out)
        else:
            m = self.rng.choice(self.members)
            if m.silent:
                return
            if m.draining is not None and self.t >= m.drain_done_at:
                self._finish_drain(m)
            elif m.cursor < len(self.log):
                step = self.log[m.cursor]
                m.cursor += 1
                self._act(m, m.phases.on_step(step))
            self._act(m, m.phases.poll())

    def _finish_drain(self, m: Member) -> None:
        action, m.draining = m.draining, None
        assert action is not None
        if m.drain_fails:
            reply = m.phases.failed(action.marker_id, "drain too slow")
            if reply is not None:
                m.outbox.append(reply)
            m.holding = False
            return
        self.next_cap += self.rng.randint(1, 50)
        for after in m.phases.quiesced(action.marker_id, self.next_cap):
            self._act(m, after)

    def _act(self, m: Member, action: MemberAction) -> None:
        if action.act is Act.QUIESCE:
            m.holding, m.held_since = True, self.t
            m.draining = action
            m.drain_done_at = self.t + self.rng.uniform(0, self.timeout / 3)
        elif action.act is Act.ANSWER and action.reply is not None:
            m.outbox.append(action.reply)
        elif action.act in (Act.EMIT, Act.RESUME):
            if m.holding:
                self.max_hold = max(self.max_hold, self.t - m.held_since)
            m.holding = False
            m.resumed.append((action.act.value, action.ts, action.why))
            if action.act is Act.EMIT:
                m.emitted.append(action.ts)
            m.outbox.append(m.phases.resumed(action, 1))

    # ---------------------------------------------------------------- the truth

    def complete_in_log(self) -> tuple[bool, int]:
        """Every member's QUIESCED (no error) before any ABORT or error QUIESCED?"""
        caps: dict[str, int] = {}
        for s in self.log:
            if s.step is MarkerStep.ABORT or (s.step is MarkerStep.QUIESCED and s.error):
                break
            if s.step is MarkerStep.QUIESCED:
                caps.setdefault(s.interceptor_id, s.ts)
        done = set(caps) == set(self.by_id)
        return done, max(caps.values()) if done else 0


def _simulate(seed: int) -> Sim:
    sim = Sim(seed)
    for _ in range(3000):
        sim.step()
        if sim.t > sim.timeout * 6:
            break
    # let it settle: every message lands, every live actor reads everything
    sim.t += sim.timeout * 3
    for _ in range(50):
        for box in [sim.coord_outbox, *(m.outbox for m in sim.members)]:
            while box:
                sim.log.append(box.pop(0))
        for m in sim.members:
            if m.silent:
                continue
            if m.draining is not None:
                sim._finish_drain(m)
            while m.cursor < len(sim.log):
                m.cursor += 1
                sim._act(m, m.phases.on_step(sim.log[m.cursor - 1]))
            sim._act(m, m.phases.poll())
        if sim.coordinator_alive():
            while sim.coord_cursor < len(sim.log):
                sim.run.on_step(sim.log[sim.coord_cursor])
                sim.coord_cursor += 1
            out = sim.run.poll()
            if out is not None:
                sim.coord_outbox.append(out)
        sim.t += sim.timeout
    return sim


def check(sim: Sim) -> None:
    done, ts = sim.complete_in_log()
    caps = {s.interceptor_id: s.ts for s in sim.log if s.step is MarkerStep.QUIESCED and s.ts}
    for m in sim.members:
        assert not m.holding or m.silent, f"{m.iid} still holds"
        for _act, rts, why in m.resumed:
            if "by itself" in why:
                assert rts == 0
                continue
            if rts:
                assert done and rts == ts, f"{m.iid} resumed at {rts}, the log says {done, ts}"
            else:
                assert not done or "no longer held" in why, f"{m.iid} missed the marker"
        assert len(m.emitted) <= 1
    emitter = sim.run.emitter
    emitted = sim.by_id[emitter].emitted
    if emitted:
        assert done and emitted == [ts]
        assert all(ts >= c for c in caps.values())
    live = [m for m in sim.members if not m.silent]
    if done and not sim.by_id[emitter].silent:
        # the emitter writes it unless it had resumed by itself before it completed
        expired = any("by itself" in why for _a, _t, why in sim.by_id[emitter].resumed)
        assert emitted or expired
    if sim.coordinator_alive():
        assert sim.run.finished, sim.run.stage
        if sim.run.stage is Stage.DONE:
            assert emitted == [sim.run.ts]
        else:
            assert not emitted or sim.run.error.startswith("emitter"), sim.run.error
    # a drain counts against the timeout too: it is bounded by a third of it here
    assert sim.max_hold <= sim.timeout * 4 / 3 + sim.max_dt or not live


@pytest.mark.parametrize("block", range(10))
def test_random_interleavings_agree_with_the_order_of_the_topic(block: int) -> None:
    outcomes = {"done": 0, "aborted": 0}
    for seed in range(block * 300, (block + 1) * 300):
        sim = _simulate(seed)
        check(sim)
        if sim.run.stage is Stage.DONE:
            outcomes["done"] += 1
        elif sim.run.stage is Stage.ABORTED:
            outcomes["aborted"] += 1
    assert outcomes["done"] > 30 and outcomes["aborted"] > 10, outcomes  # both paths run


def test_a_marker_with_prompt_members_is_one_hop() -> None:
    now = [0.0]
    run = MarkerRun("x", "m", ("a", "b"), 2.0, lambda: now[0])
    members = {i: MemberPhases(i, lambda: now[0]) for i in ("a", "b")}
    log = [run.start()]
    acts = {i: members[i].on_step(log[0]) for i in members}
    assert all(a.act is Act.QUIESCE for a in acts.values())
    for i, cap in (("a", 10), ("b", 7)):
        (ans,) = members[i].quiesced("x", cap)
        assert ans.reply is not None
        log.append(ans.reply)
    # each member decides from the two QUIESCED alone, with no step from the coordinator
    decided = {i: [members[i].on_step(s) for s in log[1:]][-1] for i in members}
    assert decided["a"].act is Act.EMIT and decided["b"].act is Act.RESUME
    assert decided["a"].ts == decided["b"].ts == 10
    for s in log:
        run.on_step(s)
    assert run.stage is Stage.COMPLETE and run.ts == 10
    for i in members:
        run.on_step(members[i].resumed(decided[i], 5))
    assert run.stage is Stage.DONE and run.emitted


def test_an_abort_before_the_last_quiesced_wins_and_one_after_means_nothing() -> None:
    for abort_at in range(4):
        m = MemberPhases("a", lambda: 0.0)
        q = MarkerPhase("x", "n", MarkerStep.QUIESCE, emitter="a", timeout_ms=1000,
                        members=("a", "b"))  # fmt: skip
        m.on_step(q)
        m.quiesced("x", 5)
        steps = [MarkerPhase("x", "n", MarkerStep.QUIESCED, "a", ts=5),
                 MarkerPhase("x", "n", MarkerStep.QUIESCED, "b", ts=9)]  # fmt: skip
        steps.insert(abort_at, MarkerPhase("x", "n", MarkerStep.ABORT, error="late"))
        acts = [m.on_step(s) for s in steps]
        final = [a for a in acts if a.act is not Act.NOTHING]
        assert len(final) == 1
        assert (final[0].act is Act.EMIT) == (abort_at == 2) or abort_at == 3
        if abort_at >= 2:
            assert final[0].act is Act.EMIT and final[0].ts == 9
        else:
            assert final[0].act is Act.RESUME and final[0].ts == 0
