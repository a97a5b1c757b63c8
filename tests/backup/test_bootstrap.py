"""A replacement backup site built from a peer's checkpoint copy (``--bootstrap-from``).

Tries to break: a bootstrapped site that reads the whole log anyway (bytes from Kafka must
be the records after the peer's checkpoint, nothing more); one that differs from the
primary at the next W while the peer keeps applying (and pruning its copies) during the
copy; a bootstrap killed midway whose half-copied images an applier would then take for a
cut; a peer copy too old for the log's retention, one of another CG, a peer without copies;
a site pushed past retention that a restart with --bootstrap-from must rebuild.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka.reading import value_bytes_from
from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.backup.bootstrap import bootstrap_mark, bootstrap_site, needs_bootstrap
from pipeline.backup.checkpointer import decode_checkpoint
from pipeline.errors import ApplyError, RetentionLostError
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from tests.ops.test_ops_tools import FAST, _workload
from tests.oracles import first_difference, read_image
from tests.replication_helpers import ServiceThread, running_backup, stop_all, wait_until

GIB = 1 << 30


def assert_same_images(primary: Path, backup: Path, sizes: dict[str, int]) -> None:
    for vid, size in sizes.items():
        want = read_image(SiteDir(primary).image_path(vid), size)
        got = read_image(SiteDir(backup).image_path(vid), size)
        assert got == want, f"{vid}: {first_difference(got, want)}"


def test_a_replacement_site_reads_only_the_log_after_the_peers_checkpoint(
    kafka_conf, unique_name, tmp_path
):
    rng = random.Random(11)
    ts: list[int] = []
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        cg.create_volume("big", GIB)  # sparse: a 1 GiB image with a few MiB written
        cg.create_volume("small", 1 << 20)
        sizes = {v.volume_id: v.size for v in cg.volumes.values()}
        with running_backup(kafka_conf, unique_name, tmp_path / "dr1", site="dr1",
                            checkpoint_interval_s=0.05, snapshot_interval_s=0.3,
                            snapshots_kept=2) as (_wm, _dr1):  # fmt: skip
            _workload(cg, rng, 400, ts)
            cg.flush()
            wait_until(lambda: any(w >= max(ts) for w, _s in SiteDir(tmp_path / "dr1")
                                   .snapshots()), 30, "dr1's copy at the end")  # fmt: skip
            # the peer keeps applying (and taking and pruning copies) while dr3 copies
            _workload(cg, rng, 100, ts)
            res = bootstrap_site(tmp_path / "dr3", cg=unique_name, site="dr3",
                                 source=tmp_path / "dr1", kafka_conf=kafka_conf)  # fmt: skip
            assert res.volumes == 2 and res.bytes_copied == GIB + (1 << 20)
            ckpt = decode_checkpoint(SiteDir(tmp_path / "dr3").checkpoint_path.read_bytes())
            assert (
                ckpt.site == "dr3"
                and ckpt.w == res.w
                and dict(ckpt.log_offsets) == (res.log_offsets)
            )
            _workload(cg, rng, 100, ts)
            cg.flush()
            after = value_bytes_from(kafka_conf, CgTopics(unique_name).log, res.log_offsets)
            whole = value_bytes_from(kafka_conf, CgTopics(unique_name).log, {})
            dr3 = ServiceThread(Applier(ApplierConfig(cg=unique_name, site="dr3",
                                                      data_dir=tmp_path / "dr3"), kafka_conf),
                                "dr3").start()  # fmt: skip
            try:
                wait_until(lambda: dr3.service.applied_w >= max(ts), 60, "dr3 to catch up")
                read = dr3.service.stats.bytes_read
            finally:
                stop_all(dr3)
        assert_same_images(tmp_path / "p", tmp_path / "dr3", sizes)
        # exactly the records after the peer's checkpoint, and far less than the log
        assert read == after, (read, after, whole)
        assert after < 0.6 * whole, (after, whole, res)


def test_an_interrupted_bootstrap_is_never_taken_for_a_cut(kafka_conf, unique_name, tmp_path):
    rng = random.Random(12)
    ts: list[int] = []
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        cg.create_volume("a", 1 << 20)
        with running_backup(kafka_conf, unique_name, tmp_path / "dr1", site="dr1",
                            checkpoint_interval_s=0.05,
                            snapshot_interval_s=0.2) as (_wm, dr1):  # fmt: skip
            _workload(cg, rng, 60, ts)
            cg.flush()
            wait_until(lambda: len(SiteDir(tmp_path / "dr1").snapshots()) >= 1, 30, "a copy")

            def crash(*_a: object) -> None:
                raise KeyboardInterrupt("killed mid-copy")

            with pytest.raises(KeyboardInterrupt):
                bootstrap_site(tmp_path / "dr3", cg=unique_name, site="dr3",
                               source=tmp_path / "dr1", kafka_conf=kafka_conf,
                               progress=crash)  # fmt: skip
            assert bootstrap_mark(tmp_path / "dr3").exists()
            assert needs_bootstrap(tmp_path / "dr3", unique_name, kafka_conf) is not None
            ap = Applier(ApplierConfig(cg=unique_name, site="dr3", data_dir=tmp_path / "dr3"),
                         kafka_conf)  # fmt: skip
            with pytest.raises(ApplyError, match=r"interrupted.*--bootstrap-from"):
                ap.start()
            ap.close(checkpoint=False)
            # run again: it starts over and the site is whole
            bootstrap_site(tmp_path / "dr3", cg=unique_name, site="dr3",
                           source=tmp_path / "dr1", kafka_conf=kafka_conf)  # fmt: skip
            assert needs_bootstrap(tmp_path / "dr3", unique_name, kafka_conf) is None
            wait_until(lambda: dr1.service.applied_w >= max(ts), 30, "dr1 to apply")
        # bad sources: no copies, another CG's copy
        SiteDir(tmp_path / "empty").create()
        with pytest.raises(ApplyError, match="snapshot_interval_s"):
            bootstrap_site(tmp_path / "x", cg=unique_name, site="x",
                           source=tmp_path / "empty", kafka_conf=kafka_conf)  # fmt: skip
        with pytest.raises(ApplyError, match="not 'other'"):
            bootstrap_site(tmp_path / "x", cg="other", site="x",
                           source=tmp_path / "dr1", kafka_conf=kafka_conf)  # fmt: skip
        with pytest.raises(ApplyError, match="no such directory"):
            bootstrap_site(tmp_path / "x", cg=unique_name, site="x",
                           source=tmp_path / "nowhere", kafka_conf=kafka_conf)  # fmt: skip


def test_a_site_past_retention_is_rebuilt_from_a_peer(kafka_conf, unique_name, tmp_path):
    from pipeline.app.config import load_config
    from pipeline.app.services import prepare_from_peer

    rng = random.Random(13)
    ts: list[int] = []
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        cg.create_volume("a", 1 << 20)
        sizes = {v.volume_id: v.size for v in cg.volumes.values()}
        with running_backup(kafka_conf, unique_name, tmp_path / "dr2", site="dr2",
                            checkpoint_interval_s=0.05) as (_wm, dr2):  # fmt: skip
            _workload(cg, rng, 40, ts)
            cg.flush()
            wait_until(lambda: dr2.service.applied_w >= max(ts), 30, "dr2 to apply")
        # dr2 is stopped; dr1 applies on and copies its checkpoints; retention then deletes
        # everything before dr1's newest copy (and so what dr2 needs)
        with running_backup(kafka_conf, unique_name, tmp_path / "dr1", site="dr1",
                            checkpoint_interval_s=0.05,
                            snapshot_interval_s=0.2) as (_wm, dr1):  # fmt: skip
            _workload(cg, rng, 80, ts)
            cg.flush()
            wait_until(lambda: dr1.service.applied_w >= max(ts), 30, "dr1 to apply")
            wait_until(lambda: any(w >= max(ts) for w, _s in SiteDir(tmp_path / "dr1")
                                   .snapshots()), 30, "dr1's copy at the end")  # fmt: skip
        newest = decode_checkpoint(
            SiteDir(tmp_path / "dr1").snapshots()[-1][1].checkpoint_path.read_bytes()
        )
        topic = CgTopics(unique_name).log
        cut = [TopicPartition(topic, p, o) for p, o in newest.log_offsets.items() if o > 0]
        admin = AdminClient(kafka_conf)  # kept: a client collected at once never answers
        for fut in admin.delete_records(cut, request_timeout=30).values():
            fut.result(timeout=60)
        ap = Applier(ApplierConfig(cg=unique_name, site="dr2", data_dir=tmp_path / "dr2"),
                     kafka_conf)  # fmt: skip
        with pytest.raises(RetentionLostError):
            ap.start()
        ap.close(checkpoint=False)
        apply = {"site": "dr2", "data_dir": str(tmp_path / "dr2")}
        kafka = {"bootstrap_servers": kafka_conf["bootstrap.servers"]}
        cfg = load_config(None, {"kafka": kafka, "cg": {"name": unique_name}, "apply": apply})
        res = prepare_from_peer(cfg, tmp_path / "dr1")
        assert res is not None and res.w == newest.w
        assert prepare_from_peer(cfg, tmp_path / "dr1") is None  # now it need not
        with running_backup(kafka_conf, unique_name, tmp_path / "dr2", site="dr2",
                            checkpoint_interval_s=0.05) as (_wm, dr2):  # fmt: skip
            _workload(cg, rng, 30, ts)
            cg.flush()
            wait_until(lambda: dr2.service.applied_w >= max(ts), 60, "dr2 to catch up")
        assert_same_images(tmp_path / "p", tmp_path / "dr2", sizes)
