"""kill -9 of a backup site's applier process around a generation switch (issue #12).

The CG is failed over once (generation 0's log with the old primary's tail past the cut,
generation 1's log and W: ``tests.backup.follow_helpers.build_world``). Each seed is
another backup site: its applier runs as a child process and is killed with SIGKILL at
random moments after it is up (the switch happens in its first second or so: before,
during and after it), restarted, killed again, then left to finish. The images must equal
the oracle (generation 0 up to base_w, then generation 1 up to its W) and the site's
checkpoint must be generation 1's. A kill also tests the site lock: the kernel drops it
with the process, so the next applier is never refused.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.backup.checkpointer import decode_checkpoint
from pipeline.errors import RecordError
from pipeline.site import SiteDir
from tests.backup.follow_helpers import VIDS, World, build_world, site_images
from tests.service_runner import ChildProcess

pytestmark = pytest.mark.kafka

SEEDS = int(os.environ.get("LOWMARK_FOLLOW_KILL_SEEDS", "3"))


@pytest.fixture(scope="module")
def world_cache() -> dict[str, World]:
    return {}


def _spec(conf: dict[str, Any], world: World, site: str, site_dir: Path) -> dict[str, Any]:
    return {
        "service": "applier",
        "kafka": conf,
        "config": {
            "cg": world.cg,
            "site": site,
            "data_dir": str(site_dir),
            "checkpoint_interval_s": 0.05,
            "compute_digests": False,
        },
    }


def _local_checkpoint(site_dir: Path) -> tuple[int, int] | None:
    try:
        ck = decode_checkpoint(SiteDir(site_dir).checkpoint_path.read_bytes())
    except (OSError, RecordError):
        return None
    return ck.generation, ck.w


def _wait(child: ChildProcess, pred: Any, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert child.alive(), f"applier died: {child.log_tail()}"
        assert time.monotonic() < deadline, f"timed out; log: {child.log_tail()}"
        time.sleep(0.02)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_kill9_around_the_switch_converges(
    kafka_conf: dict[str, str], tmp_path: Path, seed: int, world_cache: dict[str, World]
) -> None:
    key = kafka_conf["bootstrap.servers"]
    if key not in world_cache:
        world_cache[key] = build_world(kafka_conf, f"follow-kill9-{time.time_ns()}", 5)
    world = world_cache[key]
    rng = random.Random(seed)
    site, site_dir = f"dr-k{seed}", tmp_path / "site"
    seen: list[tuple[int, int] | None] = []
    for i in range(4):
        child = ChildProcess(
            "tests.service_runner", _spec(kafka_conf, world, site, site_dir), tmp_path / "log"
        )
        child.expect("READY", 90)
        if i < 3:
            # 0: any moment of its start; 1: once it switched (its first checkpoint in
            # generation 1 is the switch's); 2: any moment again
            if i == 1:
                _wait(child, lambda: (_local_checkpoint(site_dir) or (0, 0))[0] == 1)
            time.sleep(rng.uniform(0.0, 0.3 if i == 1 else 2.0))
            child.kill()
            seen.append(_local_checkpoint(site_dir))
            continue
        _wait(child, lambda: _local_checkpoint(site_dir) == (1, world.w1))
        assert child.stop() == 0, child.log_tail()
    assert site_images(site_dir, VIDS) == world.expected(), f"checkpoints seen: {seen}"
    assert _local_checkpoint(site_dir) == (1, world.w1)
