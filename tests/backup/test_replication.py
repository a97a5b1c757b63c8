"""Primary -> Kafka -> watermark -> applier on a real broker.

Tries to break: backup images that differ from the primary after quiescing, a checkpoint
that is not a cut of the log, W going backwards, an idle interceptor holding W back, a
stalled one letting W skip its data, a fenced one's late record being applied, the FENCE
progress record being written before (or without) the Kafka fencing it stands for, a
corrupt record being applied instead of halting the CG.

Images are compared by their bytes and checkpoint digests against ``tests.oracles``,
never through the product's digest code.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

import pipeline.watermark.service as watermark_service
from connectors.kafka.errors import as_error
from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.errors import ApplierHaltedError
from pipeline.ops.fence import fence
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.timesource import wall_us
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Checkpoint, Progress, ProgressKind, Watermark, Write
from schemas.ts import make_ts
from tests.oracles import claimed_digest, first_difference, read_image
from tests.replication_helpers import (
    FAST,
    ServiceThread,
    produce_stale_write,
    read_log,
    rebuild_from_log,
    running_backup,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.kafka


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
            wm.check()
            ap.stop(close=False)  # checkpoint from this thread only once the applier's stopped
            ckpt = ap.service.checkpoint()
        primary = {v.volume_id: v.pread(0, v.size) for v in cg.volumes.values()}
    for vid, data in primary.items():
        backup = read_image(SiteDir(tmp_path / "backup").image_path(vid), len(data))
        assert backup == data, f"backup {vid}: {first_difference(backup, data)}"
    claimed = {v.volume_id: v.digest for v in ckpt.volumes}
    assert claimed == {vid: claimed_digest(data) for vid, data in primary.items()}, (
        "the checkpoint's digests are not those of the primary's bytes"
    )


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
        codec.decode(m.value(), Watermark).w
        for m in iter_range(kafka_conf, CgTopics(unique_name).watermark)
    ]
    assert len(ws) > 5 and ws == sorted(ws), "W went backwards"
    # every checkpoint's digests equal the log replayed to exactly its W
    log_records = read_log(kafka_conf, unique_name)
    ckpts = [
        codec.decode(m.value(), Checkpoint)
        for m in iter_range(kafka_conf, CgTopics(unique_name).checkpoints)
    ]
    assert len(ckpts) >= 2
    for ck in ckpts:
        ref = rebuild_from_log(log_records, sizes, upto_ts=ck.w)
        for v in ck.volumes:
            assert v.digest == claimed_digest(ref[v.volume_id]), (
                f"checkpoint at W={ck.w} is not the cut of the log at W"
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
        with running_backup(kafka_conf, unique_name, tmp_path / "backup") as (wm, ap):
            for i in range(20):
                vol.write(i * 4096, b"busy" * 1024)
            busy.flush()
            ts_last = vol.write(0, b"last")
            busy.flush()
            wait_until(lambda: ap.service.applied_w >= ts_last, 10, "W passes the busy writes")
            # not vacuous: W passed them with the idle interceptor a member all along
            assert {"busy", "idle"} <= set(wm.service.state.members)
            assert wm.service.stats.fenced == 0
    finally:
        busy.close()
        idle.close()


LATE_BYTES = b"LATE-RECORD-OF-A-FENCED-EPOCH!" * 34


def test_stalled_interceptor_freezes_w_then_is_fenced_and_its_late_record_is_rejected(
    kafka_conf, unique_name, tmp_path
):
    """A stalled interceptor holds W at its S while the living write on; past the liveness
    timeout it is fenced, and once its tail is declared lost W moves on; a record of its
    epoch that surfaces after the fence (a plain producer, past Kafka's fencing) never
    reaches the backup, while the living's later writes do."""
    live = ConsistencyGroup.open(
        unique_name, tmp_path / "live", kafka_conf, interceptor_id="live", **FAST
    )
    stalled = ConsistencyGroup.open(
        unique_name, tmp_path / "stall", kafka_conf, interceptor_id="stall", **FAST
    )
    wm = ap = None
    try:
        lv = live.create_volume("lv", 1 << 20)
        sv = stalled.create_volume("sv", 1 << 20)
        sv.write(0, b"before-the-stall" * 64)
        stalled.flush()
        wm = ServiceThread(
            WatermarkService(
                WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=2.0), kafka_conf
            ),
            "wm",
        ).start()
        ap = ServiceThread(
            Applier(
                ApplierConfig(cg=unique_name, site="backup", data_dir=tmp_path / "backup"),
                kafka_conf,
            ),
            "applier",
        ).start()
        svc = wm.service
        # the stalled interceptor stops ticking but is not dead: W must freeze at its S
        stalled.interceptor.crash()
        frozen_at = stalled.interceptor.last_s
        ts_after = lv.write(0, b"after-stall")
        live.flush()
        # positive event: the service folded a progress of the living past ts_after (it
        # lies after the stalled one's last progress in the progress log)
        wait_until(
            lambda: (
                wm.error is not None
                or ("live" in svc.state.members and svc.state.members["live"].s >= ts_after)
            ),
            10,
            "the service folding the living interceptor's progress past its write",
        )
        wm.check()
        w_frozen = svc.state.w
        assert svc.stats.fenced == 0 and "stall" in svc.state.members, (
            "fenced before the liveness timeout: nothing shows W froze"
        )
        assert w_frozen == frozen_at < ts_after, (
            f"W={w_frozen} while the stalled interceptor's S is {frozen_at} and the living "
            f"wrote at {ts_after}: W skipped a stalled interceptor"
        )
        # after the timeout it is fenced, and W moves on with fresh progress from the living
        wait_until(
            lambda: wm.error is not None or "stall" not in svc.state.members,
            10,
            "the stalled interceptor fenced and its FENCE folded",
        )
        wm.check()
        assert svc.stats.fenced == 1
        # it served an async volume: W holds at its S (its tail may be lost) until the
        # operator declares the loss (issue #13); then W moves on with the living
        assert [h.interceptor_id for h in svc.state.holds.values()] == ["stall"]
        fence(kafka_conf, unique_name, "stall", declare_lost=True)
        wait_until(lambda: wm.error is not None or not svc.state.holds, 10, "the LOST folded")
        # its late record: the fenced epoch, stamped by its clock when it resumes (now)
        late_ts = make_ts(wall_us())
        late_at = produce_stale_write(
            kafka_conf,
            unique_name,
            "stall",
            stalled.interceptor.epoch,
            "sv",
            65536,
            LATE_BYTES,
            late_ts,
        )
        # positive event: the applier applied a later write of the living, so it read the
        # late record's partition position and W moved past the late record's ts
        ts_on = lv.write(4096, b"moves-on")
        live.flush()
        assert ts_on > late_ts
        wait_until(
            lambda: ap.error is not None or ap.service.applied_w >= ts_on,
            20,
            "the applier applying the living's write after the late record",
        )
        ap.check()
        backup = SiteDir(tmp_path / "backup")
        assert read_image(backup.image_path("lv"))[4096:4104] == b"moves-on"
        stale = read_image(backup.image_path("sv"))
        assert stale.startswith(b"before-the-stall"), "the stalled interceptor's data is lost"
        assert LATE_BYTES not in stale, (
            f"the late record of fenced interceptor 'stall' (epoch {stalled.interceptor.epoch}, "
            f"ts {late_ts}, at {late_at}) reached the backup"
        )
        assert ap.service.planner.stats.rejected_stale_epoch >= 1, ap.service.planner.stats
    finally:
        stop_all(ap, wm)
        live.close()
        stalled.close()


def _fence_records(kafka_conf: dict[str, Any], cg: str, interceptor_id: str) -> int:
    """How many FENCE progress records of ``interceptor_id`` a read_committed reader sees."""
    return sum(
        1
        for m in iter_range(kafka_conf, CgTopics(cg).progress)
        if (rec := codec.decode(m.value(), Progress)).kind is ProgressKind.FENCE
        and rec.interceptor_id == interceptor_id
    )


def test_fence_record_only_after_fencing_succeeded_and_fencing_is_retried(
    kafka_conf, unique_name, tmp_path, monkeypatch
):
    """The service fences a silent interceptor through Kafka (init_transactions with its
    transactional.id) and only then writes the FENCE progress record the fold acts on. The
    first fencing attempt fails (injected into the service's Producer): no FENCE may be
    written, and the service must try again; after the retry succeeds the FENCE follows.

    Seam: ``pipeline.watermark.service.Producer`` (the ``connectors.kafka`` wrapper),
    wrapped for the silent interceptor's transactional.id only; every other producer of the
    service is the real one. The injected failure is what the wrapper raises for
    librdkafka's ``_TIMED_OUT``."""
    fenced_tid = CgTopics(unique_name).transactional_id("stall")
    real_producer = watermark_service.Producer
    attempts: list[dict[str, Any]] = []

    class FlakyFencer(real_producer):  # type: ignore[misc, valid-type]
        def init_transactions(self, *args: Any) -> None:
            seen = {
                "fence_records_before": _fence_records(kafka_conf, unique_name, "stall"),
                "still_a_member": "stall" in svc.state.members,
            }
            attempts.append(seen)
            if len(attempts) == 1:
                seen["outcome"] = "failed"
                raise as_error(
                    KafkaException(
                        KafkaError(KafkaError._TIMED_OUT, "injected: transaction coordinator down")
                    ),
                    "taking the transactional.id",
                )
            super().init_transactions(*args)
            seen["outcome"] = "fenced"
            seen["fence_records_after"] = _fence_records(kafka_conf, unique_name, "stall")

    def producer(conf: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if conf.get("transactional.id") == fenced_tid:
            return FlakyFencer(conf, *args, **kwargs)
        return real_producer(conf, *args, **kwargs)

    monkeypatch.setattr(watermark_service, "Producer", producer)
    stalled = ConsistencyGroup.open(
        unique_name, tmp_path / "stall", kafka_conf, interceptor_id="stall", **FAST
    )
    wm = None
    try:
        stalled.create_volume("sv", 1 << 20)
        stalled.flush()
        svc = WatermarkService(
            WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=1.0), kafka_conf
        )
        wm = ServiceThread(svc, "wm").start()
        # the service must know the member before it goes silent, or "not a member" below
        # would hold from the start
        wait_until(
            lambda: wm.error is not None or "stall" in svc.state.members, 20, "the JOIN folded"
        )
        wm.check()
        stalled.interceptor.crash()
        wait_until(
            lambda: wm.error is not None or "stall" not in svc.state.members,
            30,
            "the service fencing the silent interceptor (after one failed attempt)",
        )
        wm.check()
        fences = _fence_records(kafka_conf, unique_name, "stall")
        outcomes = [a["outcome"] for a in attempts]
        assert attempts and attempts[0]["fence_records_before"] == 0, (
            f"a FENCE record came before any fencing through Kafka: {attempts}"
        )
        assert "fenced" in outcomes, (
            "a FENCE record was written although fencing through Kafka had failed"
            if fences
            else "the failed fencing was never retried"
        ) + f": attempts {attempts}"
        assert outcomes == ["failed", "fenced"], attempts
        assert attempts[1]["still_a_member"], "the failed fencing dropped the member anyway"
        assert attempts[1]["fence_records_before"] == 0, (
            "a FENCE record was written although fencing through Kafka had failed"
        )
        assert attempts[1]["fence_records_after"] == 0, (
            "the FENCE record was written before fencing through Kafka returned"
        )
        assert fences == 1, "after fencing succeeded, exactly one FENCE record must follow"
        assert svc.stats.fenced == 1
    finally:
        stop_all(wm)
        stalled.close()


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
            wait_until(
                lambda: (applier.step(), applier.applied_w >= good_ts)[1], 30, "the good write"
            )
            # a corrupt copy of a real Write lands in the volume's partition, then more writes
            good = next(
                m
                for m in iter_range(kafka_conf, topics.log, _partition_of(kafka_conf, topics.log))
                if codec.class_of(m.value()) is Write
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
            img = SiteDir(tmp_path / "backup").image_path("v").read_bytes()
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
