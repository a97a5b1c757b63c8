"""The clock's high-water file under fsync loss: no ts is ever issued twice.

Tries to break: a reservation the clock trusts before its rename is durable, a torn or
half-renamed state file read back as a lower bound, a restart on a host whose clock jumped
back below everything issued. Each life issues ts (``now`` and ``observe``, the wall clock
running fast so reservations are frequent) until the shim's crash point cuts the power at
a random file operation; the disk keeps only what was synced (and a seeded subset of the
rest, one write torn); the next life starts with the wall clock set back below the last
ts issued.
Every ts any life handed out is recorded: each must be above every ts of the lives before.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from pipeline.errors import ClockError
from pipeline.primary.clock import HybridClock
from schemas.ts import LOGICAL_BITS
from tests.fsloss.shim import FsLoss
from tests.torture_summary import record

START_US = 1_700_000_000_000_000


class Wall:
    def __init__(self) -> None:
        self.us = START_US

    def __call__(self) -> int:
        return self.us


def run_lives(tmp_path: Path, crashes: int, seed: int) -> dict[str, int]:
    root = tmp_path / "state"
    root.mkdir()
    state = root / "clock.json"
    rng = random.Random(seed)
    fs = FsLoss(root, seed, keep_share=0.0)
    issued_max = -1
    reissued = refused = issued = cuts = 0
    with fs:
        for life in range(crashes + 1):
            fs.keep_share = rng.choice([0.0, 0.0, 0.3, 0.7, 1.0])
            fs.tear = rng.random() < 0.5
            wall = Wall()
            if issued_max > 0:  # the host's clock jumped back below what was issued
                wall.us = (issued_max >> LOGICAL_BITS) - rng.randint(0, 300)
            fs.crash_at = fs.ops + rng.randint(1, 40) if life < crashes else None
            try:
                clock = HybridClock(wall, state_path=state, reserve_us=50)
            except ClockError:  # the crash point hit the first reservation
                assert fs.cut.is_set() or life == crashes
                cuts += 1
                fs.crash()
                continue
            if clock.last() < issued_max:
                reissued += 1  # its next now() may repeat a ts of an earlier life
            for _ in range(200 if life < crashes else 50):
                wall.us += rng.randint(0, 30)
                try:
                    if rng.random() < 0.1:
                        seen = ((wall.us + rng.randint(0, 200)) << LOGICAL_BITS) + 7
                        clock.observe(seen)
                        # a progress S may promise "never <= last()" from here
                        issued_max = max(issued_max, clock.last())
                        continue
                    ts = clock.now()
                except ClockError:
                    assert fs.cut.is_set(), "the clock failed without a crash"
                    refused += 1
                    break
                issued += 1
                if ts <= issued_max:
                    reissued += 1
                issued_max = ts
            else:
                assert life == crashes or not fs.cut.is_set()
            cuts += fs.cut.is_set()
            fs.crash()
    return {"issued": issued, "reissued": reissued, "refused": refused, "cuts": cuts}


@pytest.mark.parametrize(
    ("crashes", "seed"),
    [
        pytest.param(50, 1, id="short"),
        pytest.param(500, 2, id="long", marks=pytest.mark.torture),
    ],
)
def test_clock_never_reissues_after_fsync_loss(tmp_path, crashes, seed):
    t0 = time.monotonic()
    out = run_lives(tmp_path, crashes, seed)
    assert out["reissued"] == 0, f"seed {seed}: {out}"
    assert out["issued"] > crashes * 20, f"the lives issued too little to prove anything: {out}"
    assert out["cuts"] == crashes, f"a life ended without its power cut: {out}"
    record(
        f"fsync loss: clock high-water ({crashes} crashes)",
        faults=crashes,
        checked=out["issued"],
        violations=out["reissued"],
        checked_what="ts issued, each above every ts of earlier lives",
        seconds=time.monotonic() - t0,
        seed=seed,
        refused=out["refused"],
    )
