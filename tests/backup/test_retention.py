"""A site against the log's retention: ``retention_state``, ``lowmark status`` and the
applier's numbers say when a site falls (or is about to fall) out of what Kafka still holds.

Tries to break: a site whose needed records were deleted reported as fine; a site warned
about when nothing was ever deleted, or when it has read a partition to its end; a
negative "nothing read yet" offset taken for a lost one.
"""

from __future__ import annotations

import random

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka.reading import bounds
from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.backup.checkpointer import RETENTION_WARN_SHARE, retention_state
from pipeline.errors import RetentionLostError
from pipeline.ops.status import cg_status, render
from pipeline.primary.volume import ConsistencyGroup
from tests.alert_check import fires_in_process
from tests.ops.test_ops_tools import FAST, _workload
from tests.replication_helpers import running_backup, wait_until


@pytest.mark.parametrize(
    ("offsets", "log", "want"),
    [
        ({0: 5, 1: 9}, {0: (0, 10), 1: (0, 10)}, ("ok", None)),  # nothing ever deleted
        ({0: 0}, {0: (0, 10)}, ("ok", None)),  # far behind, but nothing deleted
        ({0: 4}, {0: (5, 10)}, ("lost", 0.0)),  # record 4 is gone
        ({0: -1}, {0: (0, 10)}, ("ok", None)),  # nothing read yet, nothing deleted
        ({0: -1}, {0: (3, 10)}, ("lost", 0.0)),  # nothing read yet, records 0-2 gone
        ({0: 5}, {0: (5, 100)}, ("near", 0.0)),  # at the deletion front
        ({0: 50}, {0: (5, 100)}, ("ok", 45 / 95)),
        ({0: 100}, {0: (100, 100)}, ("ok", None)),  # everything deleted and read
        ({0: 9, 1: 50}, {0: (5, 10), 1: (5, 100)}, ("ok", 45 / 95)),  # p0 near its end
        ({0: 6, 1: 50}, {0: (5, 100), 1: (5, 100)}, ("near", 1 / 95)),  # the worst counts
        ({0: 10}, {0: (5, 10)}, ("ok", None)),  # read to the end: needs nothing more
        ({}, {0: (5, 10)}, ("lost", 0.0)),  # no offset for a partition: from 0
    ],
)
def test_retention_state(offsets, log, want) -> None:
    state, share = retention_state(offsets, log)
    assert state == want[0]
    assert share == pytest.approx(want[1]) if want[1] is not None else share is None
    if state == "near":
        assert share is not None and share < RETENTION_WARN_SHARE


def test_status_warns_then_says_lost_as_retention_eats_a_stopped_sites_records(
    kafka_conf, unique_name, tmp_path
):
    rng = random.Random(4)
    ts: list[int] = []
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        cg.create_volume("a", 1 << 20)
        with running_backup(
            kafka_conf, unique_name, tmp_path / "dr1", site="dr1", checkpoint_interval_s=0.05
        ) as (_wm, ap):
            _workload(cg, rng, 30, ts)
            cg.flush()
            wait_until(lambda: ap.service.applied_w >= max(ts), 30, "the site to apply")
            m = ap.service.metrics()
            assert m["retention_lost"] is False and m["retained_share_before_checkpoint"] is None
        # the site is stopped (it checkpointed); the primary writes on
        _workload(cg, rng, 60, ts)
        cg.flush()
    site = cg_status(kafka_conf, unique_name)["sites"]["dr1"]
    assert site["retention"] == "ok" and site["lag_records"] > 0
    ckpt = {int(p): o for p, o in site_offsets(kafka_conf, unique_name).items()}
    topic = CgTopics(unique_name).log
    admin = AdminClient(kafka_conf)

    def delete_up_to(offsets: dict[int, int]) -> None:
        cut = [TopicPartition(topic, p, o) for p, o in offsets.items() if o > 0]
        for fut in admin.delete_records(cut, request_timeout=30).values():
            fut.result()

    # retention reaches the site's checkpoint: the next deletion takes what it needs
    delete_up_to(ckpt)
    status = cg_status(kafka_conf, unique_name)
    assert status["sites"]["dr1"]["retention"] == "near", status["sites"]["dr1"]
    assert "near retention" in render(status)
    # a site that starts there says so on /metrics until it checkpoints past the front
    # (an hour away here), and the operator's alert on it fires
    ap = Applier(ApplierConfig(cg=unique_name, site="dr1", data_dir=tmp_path / "dr1",
                               checkpoint_interval_s=3600), kafka_conf)  # fmt: skip
    ap.start()
    try:

        def seen() -> bool:
            ap.step()
            return ap.metrics()["retained_share_before_checkpoint"] is not None

        wait_until(seen, 30, "the site to learn the log's new start")
        m = ap.metrics()
        assert m["retained_share_before_checkpoint"] < RETENTION_WARN_SHARE
        fires_in_process(tmp_path, "applier", m, {"cg": unique_name, "site": "dr1"},
                         {"LowmarkSiteNearRetention"}, hold_s=330)  # fmt: skip
    finally:
        ap.close(checkpoint=False)
    # and passes it: the site cannot catch up from Kafka any more, and status says so
    log_bounds = bounds(kafka_conf, topic) or {}
    delete_up_to({p: end for p, (_low, end) in log_bounds.items()})
    status = cg_status(kafka_conf, unique_name)
    assert status["sites"]["dr1"]["retention"] == "lost", status["sites"]["dr1"]
    assert "RETENTION" in render(status) and "cannot catch up" in render(status)


def site_offsets(kafka_conf, cg: str) -> dict[int, int]:  # type: ignore[no-untyped-def]
    from pipeline.ops.status import latest_checkpoints

    return dict(latest_checkpoints(kafka_conf, cg)["dr1"].log_offsets)


def test_a_site_whose_records_retention_deleted_refuses_to_start_and_says_bootstrap(
    kafka_conf, unique_name, tmp_path
):
    """The adversary: retention deleted records the stopped site still needed. A consumer
    told to start there jumps to the log's end by default; the site would then checkpoint a
    W whose writes it never applied. It must refuse, naming the way back (a peer)."""
    rng = random.Random(5)
    ts: list[int] = []
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        cg.create_volume("a", 1 << 20)
        with running_backup(
            kafka_conf, unique_name, tmp_path / "dr1", site="dr1", checkpoint_interval_s=0.05
        ) as (_wm, ap):
            _workload(cg, rng, 20, ts)
            cg.flush()
            wait_until(lambda: ap.service.applied_w >= max(ts), 30, "the site to apply")
        _workload(cg, rng, 40, ts)
        cg.flush()
        topic = CgTopics(unique_name).log
        log_bounds = bounds(kafka_conf, topic) or {}
        admin = AdminClient(kafka_conf)
        cut = [TopicPartition(topic, p, end) for p, (_low, end) in log_bounds.items() if end]
        for fut in admin.delete_records(cut, request_timeout=30).values():
            fut.result()
        applier = Applier(
            ApplierConfig(cg=unique_name, site="dr1", data_dir=tmp_path / "dr1"), kafka_conf
        )
        with pytest.raises(RetentionLostError) as err:
            applier.start()
        applier.close(checkpoint=False)
        assert "retention" in str(err.value) and "--bootstrap-from" in str(err.value)
        # a site on an empty directory cannot be built from a log that lost its start
        fresh = Applier(
            ApplierConfig(cg=unique_name, site="dr9", data_dir=tmp_path / "dr9"), kafka_conf
        )
        with pytest.raises(RetentionLostError, match="--bootstrap-from"):
            fresh.start()
        fresh.close(checkpoint=False)
