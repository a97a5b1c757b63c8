"""Routine faults: the leader of a log partition killed (-9) mid-workload, 3-node cluster.

Tries to break: the watermark service exiting on a partition without a leader (it used to:
``impossible Watermark record: log_offsets partition 1 has offset -1001``), or publishing a
bogus offset; the applier exiting or skipping records on a consumer error; W staying frozen
after the election; an acknowledged write (sync or async) missing at the backup.
"""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest

from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.errors import LowmarkError
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig, decode_watermark
from tests.kafka_helpers import kill_broker, partition_leader, restart_broker, volume_partitions
from tests.oracles import read_image
from tests.replication_helpers import ServiceThread, stop_all, wait_until

pytestmark = pytest.mark.kafka3

BLOCK = 4096
SIZE = 4 << 20


class Writer:
    """Writes unique blocks to both volumes until stopped; records what was acknowledged."""

    def __init__(self, cg: ConsistencyGroup, seed: int) -> None:
        self.cg = cg
        self.rng = random.Random(seed)
        self.acked: list[tuple[str, int, int, bytes, float]] = []  # vol, ts, off, data, when
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set() and n < SIZE // BLOCK:
            for name in ("sync", "async"):
                data = self.rng.randbytes(BLOCK)
                try:
                    ts = self.cg.volume(name).write(n * BLOCK, data)
                except LowmarkError:
                    self.failed += 1  # not acknowledged: the test asks nothing of it
                    continue
                self.acked.append((name, ts, n * BLOCK, data, time.monotonic()))
            n += 1
            time.sleep(0.005)

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.mark.parametrize("victim", ["sync", "async"])
def test_services_ride_out_a_log_leader_kill(kafka3, kafka3_conf, unique_name, tmp_path, victim):
    topics = CgTopics(unique_name)
    opts = {"log_partitions": 4, "replication_factor": 3}
    with ConsistencyGroup.open(
        unique_name, tmp_path / "primary", kafka3_conf, tick_interval_s=0.005,
        replication_timeout_s=60.0, **opts,
    ) as cg:  # fmt: skip
        cg.create_volume("sync", SIZE, mode="sync")
        cg.create_volume("async", SIZE)
        wm = ServiceThread(
            WatermarkService(
                WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=30, **opts),
                kafka3_conf,
            ),
            "wm",
        ).start()
        ap = ServiceThread(
            Applier(
                ApplierConfig(cg=unique_name, site="b", data_dir=tmp_path / "backup", **opts),
                kafka3_conf,
            ),
            "applier",
        ).start()
        writer = Writer(cg, seed=len(victim))
        killed: int | None = None
        try:
            wait_until(lambda: len(writer.acked) > 40, 30, "writes before the kill")
            part = volume_partitions(kafka3_conf, topics.log)[victim]
            killed = partition_leader(kafka3.bootstrap_servers, topics.log, part)
            assert killed >= 0
            kill_broker(kafka3, killed)
            killed_at = time.monotonic()
            # W resumes: it passes a write acknowledged after the election
            wait_until(
                lambda: partition_leader(kafka3.bootstrap_servers, topics.log, part)
                not in (-1, killed),
                60,
                "a new leader",
            )
            wait_until(
                lambda: any(a[4] > killed_at + 0.5 and a[0] == victim for a in writer.acked),
                60,
                f"a {victim} write acknowledged after the election",
            )
            after = next(a for a in writer.acked if a[4] > killed_at + 0.5 and a[0] == victim)
            wait_until(
                lambda: wm.error is not None or wm.service.published_w >= after[1],
                30,
                "W passing a write acknowledged after the election",
            )
            resumed_s = time.monotonic() - killed_at
            for svc in (wm, ap):
                assert svc.error is None and svc.thread.is_alive(), (
                    f"{svc.thread.name} exited on a leader election: {svc.error!r}"
                )
            writer.halt()
            cg.flush()
            last = max(a[1] for a in writer.acked)
            wait_until(
                lambda: ap.error is not None or ap.service.applied_w >= last,
                60,
                "the backup applying every acknowledged write",
            )
            for svc in (wm, ap):
                assert svc.error is None, f"{svc.thread.name} failed: {svc.error!r}"
            backup = {v: read_image(SiteDir(tmp_path / "backup").image_path(v), SIZE)
                      for v in ("sync", "async")}  # fmt: skip
            missing = {
                mode: sum(1 for a in writer.acked if a[0] == mode
                          and backup[mode][a[2] : a[2] + BLOCK] != a[3])
                for mode in ("sync", "async")
            }  # fmt: skip
            assert missing == {"sync": 0, "async": 0}, (
                f"acknowledged writes missing at the backup: {missing}"
            )
            # through the election, every committed W is at least the one before it
            ws = [
                decode_watermark(m.value()).w
                for m in iter_range(kafka3_conf, topics.watermark)
            ]
            assert ws and all(b >= a for a, b in itertools.pairwise(ws)), "W went down"
            print(f"W resumed {resumed_s:.1f} s after the kill of node {killed}; "
                  f"{len(writer.acked)} acked, {writer.failed} failed")  # fmt: skip
        finally:
            writer.halt()
            try:
                stop_all(ap, wm)
            finally:
                if killed is not None:
                    restart_broker(kafka3, killed)
