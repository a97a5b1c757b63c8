"""The simulation finds wave one's bugs when they are put back (issue 16 item 4).

An outside probe broke three invariants of wave one in an hour; each was fixed in lowmark's
pure core. Every test here puts one bug back into that core (the function as it was, or as
a careless edit would leave it), runs seeds until the simulation raises ``Violation``, and
fails if no seed of the budget finds it: a simulation that cannot see these bugs proves
nothing about the code it checks.

- a bad record's batch-mates: valid records behind a bad one in the same fetch batch were
  applied, and the partition EOF after it moved the checkpoint past it (fixed in e632915:
  ``ApplyPlanner`` blocks the partition at the bad record);
- two watermark instances racing across restarts: a lagging instance published a W below
  the one a faster instance had published (fixed in fe1f0c0: one publisher, which resumes
  from the floor and never publishes below it; ``resume_from_floor``, ``may_publish``);
- a partition without a leader: ListOffsets answered -1001 and that went into W's
  log_offsets (fixed in fe1f0c0: ``checked_end_offsets`` holds W instead).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from connectors.kafka import admin
from pipeline.backup.plan import ApplyPlanner
from pipeline.watermark import publisher
from pipeline.watermark.state import WatermarkState
from schemas.records import Watermark
from tests import torture_summary
from tests.sim.world import Violation, World

#: seeds each mutant may take to be found (each is found far sooner; see the summary table)
BUDGET = 300


def _unblocked(self: ApplyPlanner, partition: int, offset: int) -> bool:
    return False


def _unclamped(self: ApplyPlanner, partition: int, next_offset: int) -> None:
    self._positions[partition] = max(self._positions.get(partition, 0), next_offset)


def _keep_own_fold(fold: WatermarkState | None, floor: Watermark | None) -> WatermarkState | None:
    return WatermarkState() if fold is None else None


def _offsets_as_answered(topic: str, parts: Any, got: Mapping[int, int]) -> dict[int, int]:
    return dict(got)


Patch = tuple[Any, str, Callable[..., Any]]

MUTANTS: dict[str, list[Patch]] = {
    "bad record's batch-mates applied and counted as consumed": [
        (ApplyPlanner, "is_blocked", _unblocked),
        (ApplyPlanner, "note_position", _unclamped),
    ],
    "two watermark instances racing: W below the floor": [
        (publisher, "resume_from_floor", _keep_own_fold),
        (publisher, "may_publish", lambda w, floor_w: True),
    ],
    "a leaderless partition's -1001 end offset in W": [
        (admin, "checked_end_offsets", _offsets_as_answered),
    ],
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_simulation_finds_the_bug_put_back(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for target, attr, fake in MUTANTS[name]:
        monkeypatch.setattr(target, attr, fake)
    started = time.monotonic()
    found: str | None = None
    for seed in range(BUDGET):
        try:
            World(seed).run()
        except Violation as exc:
            found = str(exc).splitlines()[0]
            break
    seeds = seed + 1
    torture_summary.record(
        f"sim mutant: {name}",
        faults=1,
        checked=seeds,
        violations=0 if found else 1,
        checked_what="seeds until the simulation caught the bug put back",
        seconds=time.monotonic() - started,
        found=found or "",
    )
    assert found is not None, f"{BUDGET} seeds did not find the bug put back: {name}"
    print(f"{name}: found by {found}")


def test_without_a_mutant_the_same_seeds_pass() -> None:
    """The control: what the mutants break holds on lowmark as it is (the first seeds)."""
    for seed in range(20):
        World(seed).run()
