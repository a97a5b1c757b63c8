"""The migration coordinator's decision (``pipeline.ops.migrate_plan``), pure.

Tries to break the single-writer rule and the migration's atomicity by brute force: every
state pair a coordinator can find is decided, and a model of both interceptors (their
durable and in-memory states, what a crash keeps, a hold's lease) is driven by the
coordinator's steps under random crashes of either side and of the coordinator itself,
for many seeds. At no instant may both sides take writes; every run, continued by fresh
coordinators, must end migrated (or rolled back when asked).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from pipeline.errors import MigrationError
from pipeline.ops import migrate as migrate_mod
from pipeline.ops.migrate import Ask, migrate
from pipeline.ops.migrate_plan import STEPS, Side, next_step

SOURCE = ("served", "held", "released", "absent")
TARGET = ("absent", "staged", "served")
PHASES = ("starting", "copying", "following", "failed", "stopped")
MID = "v@a->b"


def sides() -> list[tuple[Side, Side]]:
    out = []
    for s, t in itertools.product(SOURCE, TARGET):
        for smid in ("", MID, "other"):
            phases = PHASES if t == "staged" else ("",)
            tmids = ("", MID, "other") if t == "staged" else ("",)
            for ph, tmid in itertools.product(phases, tmids):
                out.append((Side(s, smid), Side(t, tmid, ph)))
    return out


@pytest.mark.parametrize("abort", [False, True])
def test_every_state_pair_gets_a_step_that_keeps_one_writer(abort: bool) -> None:
    for src, dst in sides():
        step = next_step(src, dst, MID, abort)
        assert step.action in STEPS, (src, dst, step)
        where = (src, dst, abort, step)
        if step.action == "activate":  # the target's commit point only after the source's
            assert src.state == "released" and dst.phase == "following", where
        if step.action == "reclaim":  # never while a stage could still become active
            assert dst.state == "absent" or (dst.state == "staged" and not abort), where
            assert src.state in ("held", "released"), where
        if step.action == "forget":
            assert dst.state == "served" and src.state == "released", where
        if step.action in ("prepare", "hold", "catch_up", "wait"):
            assert not abort and dst.state != "served", where
        if step.action == "unstage":
            assert abort and dst.state == "staged", where
        if src.state == "served" and dst.state == "served":
            assert step.action == "stuck", where
        if step.action == "done":
            assert dst.state == "served" and src.state == "absent", where
        if step.action == "rolled back":
            assert src.state == "served" and dst.state == "absent", where


def test_a_target_that_lost_its_stage_under_a_hold_gets_the_source_served_first() -> None:
    step = next_step(Side("held", MID), Side("staged", MID, "stopped"), MID)
    assert step.action == "reclaim"
    assert next_step(Side("held", MID), Side("absent"), MID).action == "reclaim"


def test_a_released_source_with_a_lost_stage_is_synchronized_again() -> None:
    # the source's image is intact (nothing wrote it since the release): copy it again
    for t in (Side("absent"), Side("staged", MID, "failed"), Side("staged", MID, "stopped")):
        assert next_step(Side("released", MID), t, MID).action == "prepare"


def test_an_active_target_is_never_rolled_back() -> None:
    step = next_step(Side("released", MID), Side("served"), MID, abort=True)
    assert step.action == "stuck" and "migrate the volume back" in step.why


# ---------------------------------------------------------------- a model of both sides


@dataclass
class Source:
    durable: str = "served"  # served, released, absent (its catalog)
    held: bool = False
    up: bool = True
    lease: int = 0

    @property
    def state(self) -> str:
        if self.durable == "served" and self.held:
            return "held"
        return self.durable

    def writes(self) -> bool:
        return self.up and self.durable == "served" and not self.held


@dataclass
class Target:
    durable: str = "absent"  # absent, staged, served
    phase: str = ""  # in memory: lost on a crash (the stage's follower is gone)
    up: bool = True

    def writes(self) -> bool:
        return self.up and self.durable == "served"


class Crash(Exception):
    pass


class World:
    """Both interceptors as ``MigrationMember`` and ``Parking`` make them: what is
    durable survives a crash, a hold and a follower do not; a hold lapses."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.s, self.t = Source(), Target()
        self.violations: list[str] = []

    def check(self) -> None:
        if self.s.writes() and self.t.writes():
            self.violations.append(f"both take writes: {self.s} {self.t}")

    def tick(self) -> None:
        """Time passes: a lease may lapse, a copy may finish, a side may crash or restart."""
        r = self.rng.random()
        if self.s.held:
            self.s.lease -= 1
            if self.s.lease <= 0:
                self.s.held = False  # lapsed: served again
        if self.t.durable == "staged" and self.t.phase == "copying" and r < 0.5:
            self.t.phase = "following"
        if r < 0.04 and self.s.up:
            self.s.up, self.s.held = False, False
        elif r < 0.08 and self.t.up:
            self.t.up, self.t.phase = False, ""
        elif r < 0.3:
            self.s.up = True
            self.t.up = True
        self.check()

    def ask_source(self) -> Side:
        if not self.s.up:
            raise Crash
        return Side(self.s.state, MID if self.s.state in ("held", "released") else "")

    def ask_target(self) -> Side:
        if not self.t.up:
            raise Crash
        if self.t.durable == "staged":
            return Side("staged", MID, self.t.phase or "stopped")
        return Side(self.t.durable)

    def do(self, action: str, held: bool = True) -> None:
        s, t = self.s, self.t
        if action in ("hold", "release", "reclaim", "forget") and not s.up:
            raise Crash
        if action in ("prepare", "activate", "unstage", "catch_up") and not t.up:
            raise Crash
        if action == "prepare":
            t.durable, t.phase = "staged", "copying"
        elif action == "hold":
            if s.durable == "served":
                s.held, s.lease = True, self.rng.randint(1, 6)
        elif action == "catch_up":
            if (held and not s.held) or t.phase != "following":
                raise Crash  # the coordinator's cutover stops and asks again
        elif action == "release":
            if not s.held:
                raise Crash  # lapsed: "hold it again"
            s.durable, s.held = "released", False
        elif action == "activate":
            if t.phase != "following":  # the target trusts the coordinator on the source
                raise Crash
            t.durable, t.phase = "served", ""
        elif action == "forget":
            s.durable = "absent"
        elif action == "unstage":
            t.durable, t.phase = "absent", ""
        elif action == "reclaim":
            s.held = False
            if s.durable == "released":
                s.durable = "served"
        self.check()


class Killed(BaseException):
    """The coordinator process is killed (SIGKILL): nothing of it runs on."""


def asker(w: World, side: str) -> Ask:
    """One side's admin socket as ``migrate()`` sees it; each request lets time pass."""

    def ask(req: dict) -> dict:
        w.tick()
        if w.rng.random() < 0.03:
            raise Killed
        up = w.s.up if side == "source" else w.t.up
        if not up:
            return {"ok": False, "error": f"{side} is down"}
        if req["op"] == "whoami":
            iid = "a" if side == "source" else "b"
            return {"ok": True, "interceptor": iid, "cg": "cg", "generation": 0}
        step = req["step"]
        try:
            if step == "state":
                got = w.ask_source() if side == "source" else w.ask_target()
                return {"ok": True, "state": got.state, "migration": got.migration,
                        "sync": {"phase": got.phase}, "info": {}, "image": "",
                        "final_ts": 1}  # fmt: skip
            w.do(step, bool(req.get("held", True)))
        except Crash:
            return {"ok": False, "error": f"{side} refused {step}"}
        return {"ok": True, "final_ts": 1}

    return ask


def coordinator(w: World, abort: bool) -> str | None:
    """One real ``lowmark migrate`` run against the model; None when it died."""
    try:
        res = migrate("v", "b", asker(w, "source"), asker(w, "target"), abort=abort,
                      timeout_s=5, attempts=1000)  # fmt: skip
    except Killed:
        return None
    except MigrationError as exc:
        return "stuck" if "cannot go on" in str(exc) else None
    return "done" if res.outcome == "migrated" else "rolled back"


@pytest.mark.parametrize("seed", range(300))
def test_random_crashes_of_both_sides_and_the_coordinator_keep_one_writer(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate_mod.time, "sleep", lambda _s: None)
    rng = random.Random(seed)
    w = World(rng)
    abort_after = rng.choice([None, None, 1, 2])
    outcome = None
    for run in range(300):
        abort = abort_after is not None and run >= abort_after
        outcome = coordinator(w, abort)
        if outcome in ("done", "rolled back", "stuck"):
            break
    assert not w.violations, (seed, w.violations[:3])
    assert outcome in ("done", "rolled back", "stuck"), (seed, outcome, w.s, w.t)
    if outcome == "done":
        assert (w.s.durable, w.t.durable) == ("absent", "served")
    if outcome == "rolled back":
        assert (w.s.durable, w.t.durable) == ("served", "absent")
    if outcome == "stuck":  # only an abort of a migration that had completed
        assert abort and w.t.durable == "served" and w.s.durable in ("released", "absent")
