"""An applier that was offline catches up in bounded memory (``Backlog``, ``take_early``).

Tries to break: the stall the drop-and-re-read had — one W covering a backlog many times
the budget (the watermark service was down too, so no W in between), read by an applier
that starts before any W is published (it must wait within its budget, not drop and
re-read in a loop); a site that then checkpoints images that are ahead of its W; one that
differs from the primary at the end.
"""

from __future__ import annotations

import random
import time

from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from tests.backup.test_bootstrap import assert_same_images
from tests.ops.test_ops_tools import FAST
from tests.replication_helpers import ServiceThread, running_backup, stop_all, wait_until

MIB = 1 << 20


def test_a_backlog_many_times_the_budget_under_one_w_streams_through(
    kafka_conf, unique_name, tmp_path
):
    rng = random.Random(21)
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        a, b = cg.create_volume("a", 8 * MIB), cg.create_volume("b", 8 * MIB)
        sizes = {"a": 8 * MIB, "b": 8 * MIB}
        with running_backup(kafka_conf, unique_name, tmp_path / "dr1", site="dr1",
                            checkpoint_interval_s=0.05) as (_wm, dr1):  # fmt: skip
            last = a.write(0, b"first")
            wait_until(lambda: dr1.service.applied_w >= last, 30, "dr1 to apply")
        # applier and watermark service both down: the backlog is under no W at all
        for _ in range(1500):  # 48 MiB: more than one consume batch (16 MiB prefetch)
            vol = rng.choice([a, b])
            vol.write(rng.randrange(0, 8 * MIB - 65536) // 4096 * 4096, rng.randbytes(32768))
        cg.flush()
        # ~48 MiB of records under one W, a 1 MiB budget; the applier starts first and
        # reads the backlog with no W known at all
        ap = ServiceThread(Applier(ApplierConfig(cg=unique_name, site="dr1",
                                                 data_dir=tmp_path / "dr1",
                                                 checkpoint_interval_s=0.05,
                                                 max_pending_bytes=MIB), kafka_conf),
                           "dr1").start()  # fmt: skip
        wait_until(lambda: ap.service.stats.records_read > 0, 30, "dr1 to read the backlog")
        time.sleep(1)
        held = ap.service.planner.pending_bytes()
        wm = ServiceThread(WatermarkService(WatermarkServiceConfig(cg=unique_name,
                                                                   liveness_timeout_s=30),
                                            kafka_conf), "watermark").start()  # fmt: skip
        try:
            last = a.write(64, b"last")
            cg.flush()
            wait_until(lambda: ap.service.applied_w >= last, 120, "dr1 to catch up")
            stats = ap.service.stats
            planner = ap.service.planner.stats
            wait_until(lambda: ap.service.checkpoint_w >= last, 30, "a checkpoint at the end")
        finally:
            stop_all(ap, wm)
        assert stats.applied_early > 500, stats
        # with no W it waited within the budget plus one read batch (librdkafka's prefetch
        # queue, 16 MiB), dropping nothing; then everything went through without a re-read
        assert held <= MIB + (24 << 20), held
        assert planner.dropped == 0, planner
        assert SiteDir(tmp_path / "dr1").checkpoint_path.exists()
        assert_same_images(tmp_path / "p", tmp_path / "dr1", sizes)
