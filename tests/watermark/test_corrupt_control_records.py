"""Bad records in the control topics (progress, watermark), on a real broker.

What must happen (DESIGN invariant 5, "bad input never lands"):

- a progress record that does not decode freezes W at it: it may have been a JOIN, and W
  passing a member it never saw would break invariant 2. The service keeps running and
  heartbeating the frozen W (RPO grows visibly), writes a dead-letter copy, reports
  ``halted``, halts again at the same offset after a restart, and moves on only when the
  operator skips that offset (logged);
- a watermark record that does not decode is skipped by the applier (logged): a later W
  supersedes it, and a W it cannot read can only hold the backup back.

Tries to break: W moving past a corrupt progress record; a restart passing it silently;
the applier stopping, or applying on a garbage W.
"""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import Producer

from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Progress
from tests.alert_check import fires_in_process
from tests.replication_helpers import FAST, ServiceThread, stop_all, wait_until

pytestmark = pytest.mark.kafka


def _raw(kafka_conf: dict, topic: str, key: bytes, value: bytes) -> int:
    """Produce like kcat -P; the offset it landed at."""
    got: list[int] = []
    p = Producer(kafka_conf)
    p.produce(topic, value, key, on_delivery=lambda e, m: got.append(m.offset()) if not e else 0)
    assert p.flush(15) == 0 and got
    return got[0]


def _service(kafka_conf: dict, cg: str, skip: frozenset[int] = frozenset()) -> ServiceThread:
    cfg = WatermarkServiceConfig(cg=cg, liveness_timeout_s=30, heartbeat_s=0.2, skip_progress=skip)
    return ServiceThread(WatermarkService(cfg, kafka_conf), "wm").start()


def test_corrupt_progress_record_freezes_w_until_the_operator_skips_it(
    kafka_conf, unique_name, tmp_path, caplog
):
    topics = CgTopics(unique_name)
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("v", 1 << 20)
        wm = _service(kafka_conf, unique_name)
        try:
            before = vol.write(0, b"a" * 4096)
            cg.flush()
            wait_until(lambda: wm.service.published_w >= before, 20, "W passing a write")
            healthy = wm.service.metrics()
            garbage = codec.MAGIC + codec.fingerprint(Progress).to_bytes(8, "little") + b"junk"
            bad = _raw(kafka_conf, topics.progress, b"primary", garbage)
            after = vol.write(0, b"b" * 4096)
            cg.flush()
            wait_until(lambda: wm.service.halted is not None, 20, "the service halting")
            assert f"[0]@{bad}" in str(wm.service.halted)
            assert "--skip-progress" in str(wm.service.halted)
            # the positive event: heartbeats go on after the halt, and none passes the write
            published = wm.service.stats.published
            wait_until(lambda: wm.service.stats.published >= published + 3, 20, "heartbeats")
            assert wm.service.published_w < after, "W passed a corrupt progress record"
            assert wm.service.metrics()["halted"] == 1
            # and the operator's alert on it fires, from what /metrics would answer
            fires_in_process(tmp_path, "watermark", wm.service.metrics(), {"cg": unique_name},
                             {"LowmarkWatermarkHalted"}, before=healthy)  # fmt: skip
            assert wm.thread.is_alive() and wm.error is None, "the service must not exit"
        finally:
            stop_all(wm)
        dead = [m for m in iter_range(kafka_conf, topics.deadletter) if m.value() == garbage]
        assert len(dead) == 1
        assert dict(dead[0].headers())["source.offset"] == str(bad).encode()

        again = _service(kafka_conf, unique_name)  # restarted without the skip
        try:
            wait_until(lambda: again.service.halted is not None, 20, "halting again")
            assert f"[0]@{bad}" in str(again.service.halted)
            assert again.service.published_w < after
        finally:
            stop_all(again)

        with caplog.at_level(logging.WARNING, logger="lowmark.watermark"):
            skipped = _service(kafka_conf, unique_name, frozenset({bad}))
            try:
                wait_until(lambda: skipped.service.published_w >= after, 20, "W past the skip")
                assert skipped.service.halted is None
            finally:
                stop_all(skipped)
        assert any(
            "skipped by operator" in r.getMessage() and r.__dict__.get("offset") == bad
            for r in caplog.records
        ), "the skip was not logged"


def test_corrupt_watermark_record_is_skipped_by_the_applier(
    kafka_conf, unique_name, tmp_path, caplog
):
    topics = CgTopics(unique_name)
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("v", 1 << 20)
        wm = _service(kafka_conf, unique_name)
        ap = ServiceThread(
            Applier(ApplierConfig(cg=unique_name, site="b", data_dir=tmp_path / "b"), kafka_conf),
            "applier",
        ).start()
        try:
            with caplog.at_level(logging.ERROR, logger="lowmark.applier"):
                first = vol.write(0, b"x" * 4096)
                cg.flush()
                wait_until(lambda: ap.service.applied_w >= first, 20, "the first write applied")
                bad = _raw(kafka_conf, topics.watermark, unique_name.encode(), b"\xc3\x01garbage")
                later = vol.write(4096, b"y" * 4096)
                cg.flush()
                wait_until(lambda: ap.service.applied_w >= later, 20, "a write after the bad W")
            assert ap.error is None and not ap.service.halted
            assert any(
                "unreadable watermark" in r.getMessage() and r.__dict__.get("offset") == bad
                for r in caplog.records
            ), "the skipped watermark was not logged"
            img = SiteDir(tmp_path / "b").image_path("v").read_bytes()
            assert img[4096:8192] == b"y" * 4096
        finally:
            stop_all(ap, wm)
