"""Issue 16 item 4: the deterministic simulation of lowmark's core (tests/sim/world.py).

``make test`` runs SEEDS seeds, ``make torture`` TORTURE_SEEDS more; a failure names its
seed and replays alone with ``LOWMARK_SIM_SEED=<seed> pytest tests/sim/test_sim.py -k replay``.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

from tests import torture_summary
from tests.sim.failover_runs import FailoverWorld
from tests.sim.world import Config, World

SEEDS = 1000
TORTURE_SEEDS = 100_000
CHUNK = 1000
#: World.summary's keys that count what was checked, not faults injected
_CHECKED = {
    "durable ops checked",
    "acknowledged writes checked",
    "W published",
    "zombie records rejected",
}


def _run(seeds: range) -> Counter[str]:
    started = time.monotonic()
    total: Counter[str] = Counter()
    for seed in seeds:
        total += World(seed).run().summary()
    # World.run raises Violation on the first broken invariant: reaching here means none
    torture_summary.record(
        f"sim seeds {seeds.start}-{seeds.stop - 1}",
        faults=sum(v for k, v in total.items() if k not in _CHECKED),
        checked=total["acknowledged writes checked"],
        checked_what=f"acknowledged writes, {len(seeds)} seeds, invariants after every step",
        seconds=time.monotonic() - started,
        **dict(total),
    )
    print(
        f"simulated {len(seeds)} seeds, 0 violations: "
        + ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
    )
    return total


def test_sim_seeds() -> None:
    total = _run(range(SEEDS))
    # the faults the sim exists for did happen (a sim that injects nothing proves nothing)
    for fault in ("zombie", "interceptor crash", "applier kill", "failover cut", "bad record"):
        assert total[fault] > 0, f"no {fault} in {SEEDS} seeds: {total}"


def test_failover_runs_seeds() -> None:
    """Racing failovers of several sites, each killed at any step (failover_runs.py)."""
    for seed in range(SEEDS):
        FailoverWorld(seed).run()


@pytest.mark.torture
def test_failover_runs_torture() -> None:
    for seed in range(SEEDS, SEEDS + TORTURE_SEEDS):
        FailoverWorld(seed).run()


@pytest.mark.torture
@pytest.mark.parametrize("chunk", range(TORTURE_SEEDS // CHUNK))
def test_sim_torture(chunk: int) -> None:
    _run(range(SEEDS + chunk * CHUNK, SEEDS + (chunk + 1) * CHUNK))


def test_sim_replay() -> None:
    """One seed from LOWMARK_SIM_SEED (default 0; LOWMARK_SIM_CONFIG as a failure printed
    it), twice: the same trace and the same log, byte for byte."""
    seed = int(os.environ.get("LOWMARK_SIM_SEED", "0"))
    config = Config.from_env(seed, os.environ.get("LOWMARK_SIM_CONFIG", ""))
    a, b = World(seed, config).run(), World(seed, config).run()
    assert list(a.trace) == list(b.trace)
    assert a.log.parts == b.log.parts and a.log.watermarks == b.log.watermarks
