"""Primary -> Kafka -> watermark -> applier on a real broker.

Tries to break: backup images that differ from the primary after quiescing, a checkpoint
that is not a cut of the log, W going backwards, an idle interceptor holding W back, a
stalled one letting W skip its data, a dead one's late records being applied, a corrupt
record being applied instead of halting the CG.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from confluent_kafka import Producer

from connectors.image.image import content_digest_bytes, file_digest
from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.applier import Applier, ApplierConfig
from pipeline.errors import ApplierHaltedError
from pipeline.volume import ConsistencyGroup
from pipeline.watermark_service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from tests.replication_helpers import (
    ServiceThread,
    read_log,
    rebuild_from_log,
    running_backup,
    wait_until,
)

pytestmark = pytest.mark.kafka

FAST = {"tick_interval_s": 0.005, "replication_timeout_s": 10.0}


def _workload(cg: ConsistencyGroup, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    vols = list(cg.volumes.values())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vol = rng.choice(vols)
        length = rng.choice([512, 4096, 4096, 65536, 700_000])
        length = min(length, vol.size)
        off = rng.randrange(0, vol.size - length + 1) // 512 * 512
        r = rng.random()
        if r < 0.05:
            vol.write_zeroes(off, length)
        elif r < 0.08:
            vol.trim(off, length)
        else:
            vol.write(off, rng.randbytes(length))


def test_backup_converges_byte_identical(kafka_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path / "primary", kafka_conf, **FAST) as cg:
        cg.create_volume("a", 8 << 20)
        cg.create_volume("b", 2 << 20, mode="sync")
        with running_backup(kafka_conf, unique_name, tmp_path / "backup") as (wm, ap):
            writers = [
                threading.Thread(target=_workload, args=(cg, 2.0, seed)) for seed in range(3)
            ]
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            cg.flush()
            target = cg.interceptor.last_s
            wait_until(lambda: ap.service.applied_w >= target or ap.error, 30, "backup reaches W")
            assert ap.error is None and wm.error is None
            ckpt = ap.service.checkpoint()
        primary = {v.volume_id: v.image.content_digest() for v in cg.volumes.values()}
    backup = {v["volume_id"]: v["digest"] for v in ckpt["volumes"]}
    assert backup == primary
    for vid in primary:
        assert file_digest(tmp_path / "backup" / "images" / f"{vid}.img") == primary[vid]


def test_watermark_never_decreases_and_checkpoints_are_cuts(kafka_conf, unique_name, tmp_path):
    sizes = {"a": 1 << 20, "b": 1 << 20}
    with ConsistencyGroup.open(unique_name, tmp_path / "primary", kafka_conf, **FAST) as cg:
        for name, size in sizes.items():
            cg.create_volume(name, size)
        with running_backup(
            kafka_conf,
            unique_name,
            tmp_path / "backup",
            checkpoint_interval_s=0.2,
            digest_interval_s=0,
        ) as (_wm, ap):
            _workload(cg, 2.0, 7)
            cg.flush()
            target = cg.interceptor.last_s
            wait_until(lambda: ap.service.applied_w >= target, 30, "backup reaches W")
    ws = [
        codec.decode(m.value(), "Watermark").record["w"]
        for m in iter_range(kafka_conf, CgTopics(unique_name).watermark)
    ]
    assert len(ws) > 5 and ws == sorted(ws), "W went backwards"
    # every checkpoint's digests equal the log replayed to exactly its W
    log_records = read_log(kafka_conf, unique_name)
    ckpts = [
        codec.decode(m.value(), "Checkpoint").record
        for m in iter_range(kafka_conf, CgTopics(unique_name).checkpoints)
    ]
    assert len(ckpts) >= 2
    for ck in ckpts:
        ref = rebuild_from_log(log_records, sizes, upto_ts=ck["w"])
        for v in ck["volumes"]:
            assert v["digest"] == content_digest_bytes(ref[v["volume_id"]]), (
                f"checkpoint at W={ck['w']} is not the cut of the log at W"
            )


def test_idle_interceptor_does_not_hold_w_back(kafka_conf, unique_name, tmp_path):
    busy = ConsistencyGroup.open(
        unique_name, tmp_path / "busy", kafka_conf, interceptor_id="busy", **FAST
    )
    idle = ConsistencyGroup.open(
        unique_name, tmp_path / "idle", kafka_conf, interceptor_id="idle", **FAST
    )
    try:
        vol = busy.create_volume("v", 1 << 20)
        idle.create_volume("quiet", 1 << 20)
        with running_backup(kafka_conf, unique_name, tmp_path / "backup") as (_wm, ap):
            for i in range(20):
                vol.write(i * 4096, b"busy" * 1024)
            busy.flush()
            ts_last = vol.write(0, b"last")
            busy.flush()
            wait_until(lambda: ap.service.applied_w >= ts_last, 10, "W passes the busy writes")
    finally:
        busy.close()
        idle.close()


def test_stalled_interceptor_freezes_w_then_fenced_and_late_records_rejected(
    kafka_conf, unique_name, tmp_path
):
    live = ConsistencyGroup.open(
        unique_name, tmp_path / "live", kafka_conf, interceptor_id="live", **FAST
    )
    stalled = ConsistencyGroup.open(
        unique_name, tmp_path / "stall", kafka_conf, interceptor_id="stall", **FAST
    )
    wm = ServiceThread(
        WatermarkService(
            WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=2.0), kafka_conf
        ),
        "wm",
    ).start()
    try:
        lv = live.create_volume("lv", 1 << 20)
        stalled.create_volume("sv", 1 << 20)
        stalled.flush()
        time.sleep(0.3)
        # the stalled interceptor stops ticking but is not dead: W must freeze at its S
        stalled.interceptor.crash()
        frozen_at = stalled.interceptor.last_s
        time.sleep(0.3)
        w_before = wm.service.state.w
        assert w_before <= frozen_at
        lv.write(0, b"after-stall")
        live.flush()
        time.sleep(0.8)  # still inside the liveness timeout
        assert wm.service.state.w <= frozen_at, "W skipped a stalled interceptor"
        # after the timeout it is fenced, and W moves on with fresh progress from the living
        wait_until(lambda: wm.service.stats.fenced >= 1, 10, "the stalled interceptor is fenced")
        ts = lv.write(4096, b"moves-on")
        live.flush()
        wait_until(lambda: wm.service.state.w >= ts, 10, "W moves past the fenced interceptor")
        assert wm.error is None
    finally:
        wm.stop()
        live.close()


def test_corrupt_record_halts_the_applier_with_a_dead_letter_copy(
    kafka_conf, unique_name, tmp_path
):
    topics = CgTopics(unique_name)
    with ConsistencyGroup.open(unique_name, tmp_path / "primary", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("v", 1 << 20)
        applier = Applier(
            ApplierConfig(cg=unique_name, site="b", data_dir=tmp_path / "backup"), kafka_conf
        )
        wm = ServiceThread(
            WatermarkService(WatermarkServiceConfig(cg=unique_name), kafka_conf), "wm"
        ).start()
        applier.start()
        try:
            good_ts = vol.write(0, b"good" * 1024)
            cg.flush()
            while applier.applied_w < good_ts:
                applier.step()
            # a corrupt copy of a real Write lands in the volume's partition, then more writes
            good = next(
                m
                for m in iter_range(kafka_conf, topics.log, _partition_of(kafka_conf, topics.log))
                if codec.type_of(m.value()) == "Write"
            )
            bad = bytearray(good.value())
            bad[len(bad) // 2] ^= 0x40
            p = Producer(kafka_conf)
            p.produce(topics.log, bytes(bad), b"v", partition=good.partition())
            p.flush(10)
            after = vol.write(8192, b"after-bad" * 100)
            cg.flush()
            with pytest.raises(ApplierHaltedError) as info:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    applier.step()
            msg = str(info.value)
            assert "--skip" in msg and topics.deadletter in msg
            assert good_ts <= applier.applied_w < after
            img = (tmp_path / "backup" / "images" / "v.img").read_bytes()
            assert b"good" in img, "records before the bad one are applied"
            assert b"after-bad" not in img, "nothing after the bad record is applied"
            dead = list(iter_range(kafka_conf, topics.deadletter))
            assert len(dead) == 1 and dead[0].value() == bytes(bad)
            with pytest.raises(ApplierHaltedError):
                applier.step()  # stays halted until an operator acts
        finally:
            wm.stop()
            applier.close(checkpoint=False)


def _partition_of(kafka_conf, topic):
    for p in range(4):
        if list(iter_range(kafka_conf, topic, p)):
            return p
    raise AssertionError("no records")
