"""Failover runs in the simulation: the pure rules of ``pipeline/ops/failover_state`` (``decide``,
``FailoverRecord``) and ``pipeline/topology/roles`` (``plan_failover``, compare-and-set on
the generation) driven as ``lowmark failover`` drives them, by several sites at once, each
run killed at any step and run again.

A run is a generator: every ``yield`` is a point where it may be killed (what it saved to
its state file survives) or another site's run may go on. Checked after every step:

- the roles move one generation per commit, and history has one transition per generation;
- a site changes its images only for a generation the roles committed with it as primary
  from its cut (never while only PLANNED, never for a plan that lost the race);
- the volume changes are never applied again once the site began serving (CHANGES_APPLIED
  recorded): a kill before that re-applies them onto untouched images, which is idempotent;
- a run is told to continue or serve only while the roles name its site and cut;
- once the kills stop, running the current primary's failover again reaches DONE.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.errors import FailoverError, RolesError
from pipeline.ops.failover_state import Action, FailoverRecord, Phase, decide
from pipeline.topology.roles import initial_roles, plan_failover
from schemas.records import CgRoles

CG = "sim"


@dataclass
class Site:
    name: str
    record: FailoverRecord | None = None  # its state/failover.json
    serving: set[int] = field(default_factory=set)  # generations it began serving
    run: Iterator[None] | None = None
    done: bool = False
    refused: str = ""


class FailoverWorld:
    def __init__(self, seed: int, n_sites: int = 3) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.now = 1_000
        self.roles: CgRoles = initial_roles(CG, "s0", now_us=self.now)
        self.sites = [Site(f"s{k}") for k in range(1, n_sites + 1)]
        self.trace: list[str] = []

    def fail(self, what: str) -> None:
        raise AssertionError(
            f"failover sim seed {self.seed}: {what}\nlast events:\n  "
            + "\n  ".join(self.trace[-40:])
        )

    # ---------------------------------------------------------------- one run

    def _run(self, site: Site) -> Iterator[None]:
        """``lowmark failover --site <site>``: prepare, commit, apply changes, roll forward."""
        decision = decide(site.record, self.roles, site.name)
        self.trace.append(f"{site.name} decides {decision.action.value}: {decision.why}")
        if decision.action in (Action.CONTINUE, Action.DONE) and not (
            decision.record is not None and decision.record.matches(self.roles)
        ):
            self.fail(f"{site.name} is told to {decision.action.value} serving, not its roles")
        if decision.action is Action.START:
            cut = self.roles.base_w + self.rng.randint(0, 100)
            site.record = FailoverRecord(
                CG, site.name, self.roles.generation + 1, self.roles.generation,
                self.roles.primary_site, cut, "latest", None, cut, {0: cut}, 0, {}, False,
                f"{site.name}-i", self.now,
            )  # fmt: skip
            yield  # the plan is saved before anything is committed
        record = site.record
        assert record is not None
        if decision.action in (Action.START, Action.COMMIT):
            current = self.roles
            if not record.matches(current):
                planned = plan_failover(
                    current, CG, site.name, record.cut_ts, record.base_offsets, False, self.now
                )
                if planned.generation != record.generation:
                    raise FailoverError(f"{site.name}: another failover got there first")
                self.trace.append(f"{site.name} commits generation {planned.generation}")
                self.roles = planned  # compare-and-set: nothing ran since it was read
                yield  # committed, not yet recorded as such
            record = site.record = record.at(Phase.COMMITTED, self.now)
            yield
        if record.phase < Phase.CHANGES_APPLIED:
            self._touch(site, record, "applies volume changes")
            if record.generation in site.serving:
                self.fail(
                    f"{site.name} applies the volume changes of generation "
                    f"{record.generation} again after it began serving"
                )
            yield  # applied, not yet recorded: a re-run applies them again (idempotent)
            record = site.record = record.at(Phase.CHANGES_APPLIED, self.now)
            site.serving.add(record.generation)  # foreground writes may land from here
            yield
        if record.phase < Phase.ROLLED_FORWARD:
            self._touch(site, record, "rolls forward")
            yield
            site.record = record.at(Phase.ROLLED_FORWARD, self.now)
        site.done = True

    def _touch(self, site: Site, record: FailoverRecord, what: str) -> None:
        """A site changes its images only for a generation committed with it as primary
        from its cut (it may since have been superseded: its images are then its own, and
        it rejoins as a backup)."""
        self.trace.append(f"{site.name} {what} for generation {record.generation}")
        made = [t for t in self.roles.history if t.generation == record.generation]
        if not made or (made[0].to_site, made[0].w) != (site.name, record.cut_ts):
            self.fail(
                f"{site.name} changed its images for generation {record.generation}, which "
                f"the roles never gave it (history {self.roles.history})"
            )

    # ---------------------------------------------------------------- the world

    def step(self, kills: bool) -> None:
        rng = self.rng
        self.now += rng.randint(1, 1000)
        site = rng.choice(self.sites)
        if site.run is None:
            if site.refused or (site.done and rng.random() < 0.8):
                return
            site.done = False
            site.run = self._run(site)
        if kills and rng.random() < 0.25:
            self.trace.append(f"{site.name}'s failover is killed")
            site.run = None
            return
        try:
            next(site.run)
        except StopIteration:
            site.run = None
        except (FailoverError, RolesError) as exc:
            self.trace.append(f"{site.name} refused: {exc}")
            site.run, site.refused = None, str(exc)
        self.check()

    def check(self) -> None:
        roles = self.roles
        if len(roles.history) != roles.generation:
            self.fail(f"generation {roles.generation} with {len(roles.history)} transitions")

    def run(self, steps: int = 60) -> FailoverWorld:
        for _ in range(steps):
            self.step(kills=True)
        # the kills stop: the current primary's failover, run again, completes
        primary = next((s for s in self.sites if s.name == self.roles.primary_site), None)
        if primary is not None:
            primary.run = None
            for _ in range(20):
                if primary.done:
                    break
                primary.run = self._run(primary)
                try:
                    for _ in primary.run:
                        self.check()
                except FailoverError as exc:
                    self.fail(f"the primary {primary.name} cannot complete: {exc}")
            if not primary.done:
                self.fail(f"the primary {primary.name} never completes its failover")
        self.trace.append(f"end: generation {self.roles.generation}")
        return self
