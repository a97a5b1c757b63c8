"""A fenced interceptor's zombie records never reach a backup image.

Tries to break invariant 2's fencing end to end: a stalled interceptor is fenced by the
watermark service (liveness 1 s); then a record with its old epoch surfaces in its
volume's partition (a plain producer, past Kafka's fencing, as Jepsen saw fenced
producers' writes land), with a fresh ts the living then move W past. Whether the fenced
interceptor rejoined with a new epoch or stays fenced (and declared lost, so that W may
pass its S), the applier must count and drop the record, and apply the living's later
writes (the event that shows it went past it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.ops.fence import fence
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.timesource import wall_us
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas.ts import make_ts
from tests.oracles import read_image
from tests.replication_helpers import (
    FAST,
    ServiceThread,
    create_cg_topics,
    produce_stale_write,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.kafka


@dataclass
class ZombieSetup:
    kafka_conf: dict[str, Any]
    cg: str
    live: ConsistencyGroup
    stalled: ConsistencyGroup
    wm: ServiceThread
    ap: ServiceThread
    old_epoch: int


@pytest.fixture
def fenced_zombie(kafka_conf, unique_name, tmp_path) -> Iterator[ZombieSetup]:
    """A live interceptor, and a stalled one the service has fenced (liveness 1 s)."""
    create_cg_topics(kafka_conf, unique_name)
    live = ConsistencyGroup.open(
        unique_name, tmp_path / "live", kafka_conf, interceptor_id="live", **FAST
    )
    stalled = ConsistencyGroup.open(
        unique_name, tmp_path / "stall", kafka_conf, interceptor_id="stall", **FAST
    )
    wm = ap = None
    try:
        live.create_volume("lv", 1 << 20)
        sv = stalled.create_volume("sv", 1 << 20)
        sv.write(0, b"before-the-stall" * 64)
        stalled.flush()
        wm = ServiceThread(
            WatermarkService(
                WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=1.0), kafka_conf
            ),
            "wm",
        ).start()
        ap = ServiceThread(
            Applier(
                ApplierConfig(
                    cg=unique_name,
                    site="backup",
                    data_dir=tmp_path / "backup",
                    checkpoint_interval_s=0.2,
                ),
                kafka_conf,
            ),
            "applier",
        ).start()
        old_epoch = stalled.interceptor.epoch
        # the service must know the member before it goes silent, or "not a member" below
        # would hold from the start
        wait_until(lambda: "stall" in wm.service.state.members, 20, "the JOIN folded")
        stalled.interceptor.crash()  # the tick thread stops: a stalled process
        wait_until(
            lambda: "stall" not in wm.service.state.members,
            20,
            "the service to fence the stalled interceptor and fold the FENCE",
        )
        assert wm.service.stats.fenced == 1
        yield ZombieSetup(kafka_conf, unique_name, live, stalled, wm, ap, old_epoch)
    finally:
        try:
            stop_all(ap, wm)  # a service that failed fails the test
        finally:
            live.close()
            stalled.close()


ZOMBIE_BYTES = b"ZOMBIE-WRITE-FROM-A-FENCED-EPOCH!" * 31


def _produce_zombie_write(setup: ZombieSetup, volume_id: str, offset: int) -> int:
    """A valid Write record with the fenced epoch, produced past Kafka's fencing, into the
    volume's own partition; a zombie resuming after a pause stamps with its clock: now."""
    ts = make_ts(wall_us())
    produce_stale_write(
        setup.kafka_conf, setup.cg, "stall", setup.old_epoch, volume_id, offset, ZOMBIE_BYTES, ts
    )
    return ts


def _drive_w_past(setup: ZombieSetup, ts: int, *cgs: ConsistencyGroup) -> None:
    """Write on the living until one of their writes has a ts above ``ts`` (the first
    does: their clocks are at least the wall clock ``ts`` was taken from), then wait for the
    applier to apply it: the positive event after which the zombie would have landed."""
    deadline = time.monotonic() + 20
    last = 0
    while last <= ts and time.monotonic() < deadline:
        for i, cg in enumerate(cgs):
            vol = next(iter(cg.volumes.values()))
            last = max(last, vol.write(8192 + 512 * i, b"moving-on" * 50))
            cg.flush()
    assert last > ts
    ap = setup.ap
    wait_until(
        lambda: ap.error is not None or ap.service.applied_w >= last, 20, "the applier passes ts"
    )
    ap.check()


def test_zombie_record_is_rejected_after_its_interceptor_rejoined(fenced_zombie, tmp_path):
    """The fenced interceptor restarts (new epoch) and writes; then a record of the old
    epoch surfaces in the same partition: the applier must count and drop it."""
    setup = fenced_zombie
    rejoined = ConsistencyGroup.open(
        setup.cg, tmp_path / "stall", setup.kafka_conf, interceptor_id="stall", **FAST
    )
    try:
        assert rejoined.interceptor.epoch > setup.old_epoch
        ts_new = rejoined.volume("sv").write(4096, b"new-epoch" * 50)
        rejoined.flush()
        wait_until(lambda: setup.ap.service.applied_w >= ts_new, 20, "the new epoch applied")
        zombie_ts = _produce_zombie_write(setup, "sv", 65536)
        _drive_w_past(setup, zombie_ts, setup.live, rejoined)
        planner = setup.ap.service.planner
        assert planner.stats.rejected_stale_epoch >= 1, planner.stats
        image = read_image(SiteDir(tmp_path / "backup").image_path("sv"))
        assert b"new-epoch" in image and b"before-the-stall" in image
        assert ZOMBIE_BYTES not in image, "a fenced epoch's record reached the backup"
    finally:
        rejoined.close()


def test_zombie_record_is_rejected_while_its_interceptor_stays_fenced(fenced_zombie, tmp_path):
    """Nobody restarts the fenced interceptor; a record of its epoch surfaces with a fresh
    ts, and the living move W past that ts. The record must not reach the backup."""
    setup = fenced_zombie
    zombie_ts = _produce_zombie_write(setup, "sv", 65536)
    # it served an async volume and ended without LEAVE: W holds at its S, whatever the
    # living write, until its tail is republished or declared lost (issue #13 item 3)
    svc = setup.wm.service
    (hold,) = svc.state.holds.values()
    assert (hold.interceptor_id, hold.volumes) == ("stall", ("sv",))
    live_ts = setup.live.volume("lv").write(8192, b"held" * 128)
    setup.live.flush()
    time.sleep(0.5)
    assert svc.state.w <= hold.s < live_ts, "W passed a dead instance's possible async tail"
    out = fence(setup.kafka_conf, setup.cg, "stall", declare_lost=True)
    assert out.holds == [hold]
    wait_until(lambda: not svc.state.holds, 20, "the LOST record folded")
    assert [(x.interceptor_id, x.volumes) for x in svc.state.lost] == [("stall", ("sv",))]
    _drive_w_past(setup, zombie_ts, setup.live)
    image = read_image(SiteDir(tmp_path / "backup").image_path("sv"))
    assert b"before-the-stall" in image
    stats = setup.ap.service.planner.stats
    assert ZOMBIE_BYTES not in image, (
        f"a record of fenced interceptor 'stall' epoch {setup.old_epoch} (ts {zombie_ts}) "
        f"was applied to the backup; planner stats {stats}"
    )
    assert stats.rejected_stale_epoch >= 1, stats
