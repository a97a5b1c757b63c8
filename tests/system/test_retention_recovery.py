"""A site pushed past the log's retention: detected, warned about, refused, rebuilt.

The CG's log has 1 MiB segments; once dr1 holds everything, ``retention.bytes`` drops to
1 MiB (Kafka deletes whole segments within a second). dr2 was stopped while the primary
wrote on, so retention deletes what it needs.
Tries to break: `lowmark status` calling it fine; `lowmark apply` silently starting at the
log's end (the default of a Kafka consumer) and checkpointing a W whose writes it never
applied; `lowmark apply --bootstrap-from` not bringing it back byte-identical.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from connectors.kafka.reading import bounds
from connectors.kafka.topics import ensure_topics
from pipeline.ops.status import cg_status, render
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from tests.backup.test_bootstrap import assert_same_images
from tests.ops.test_ops_tools import FAST
from tests.replication_helpers import running_backup, wait_until

pytestmark = [pytest.mark.kafka]
MIB = 1 << 20


def _apply(kafka_conf, cg: str, site: str, data_dir, *args: str, timeout_s: float = 60):  # type: ignore[no-untyped-def]
    cmd = [sys.executable, "-m", "pipeline.app.cli", "apply", "--bootstrap-servers",
           kafka_conf["bootstrap.servers"], "--cg", cg, "--site", site, "--data-dir",
           str(data_dir), *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip


def test_a_site_past_retention_is_warned_refused_and_rebuilt_from_a_peer(
    kafka_conf, unique_name, tmp_path
):
    topics = ensure_topics(kafka_conf, unique_name)
    admin = AdminClient(kafka_conf)

    def set_log_config(**entries: int) -> None:
        ops = [ConfigEntry(k.replace("_", "."), str(v), incremental_operation=AlterConfigOpType.SET)
               for k, v in entries.items()]  # fmt: skip
        res = ConfigResource("topic", topics.log, incremental_configs=ops)
        for fut in admin.incremental_alter_configs([res]).values():
            fut.result(30)

    # Small segments from the start, but no retention until dr1 holds everything: on a
    # loaded machine dr1 itself could otherwise fall behind a 1 MiB retention mid-write.
    set_log_config(segment_bytes=MIB, retention_bytes=-1)
    rng = random.Random(8)
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("a", 4 * MIB)
        sizes = {"a": 4 * MIB}
        with running_backup(kafka_conf, unique_name, tmp_path / "dr2", site="dr2",
                            checkpoint_interval_s=0.05) as (_wm, dr2):  # fmt: skip
            last = vol.write(0, rng.randbytes(65536))
            wait_until(lambda: dr2.service.applied_w >= last, 30, "dr2 to apply")
        with running_backup(kafka_conf, unique_name, tmp_path / "dr1", site="dr1",
                            checkpoint_interval_s=0.05,
                            snapshot_interval_s=0.2) as (_w, dr1):  # fmt: skip
            for i in range(160):  # 10 MiB: ten segments, retention keeps about one
                last = vol.write((i % 64) * 65536, rng.randbytes(65536))
            cg.flush()
            wait_until(lambda: dr1.service.applied_w >= last, 60, "dr1 to apply")
            wait_until(lambda: any(w >= last for w, _s in SiteDir(tmp_path / "dr1").snapshots()),
                       30, "dr1's copy at the end")  # fmt: skip
            set_log_config(retention_bytes=MIB)
            wait_until(lambda: any(low > 0 for low, _e in (bounds(kafka_conf, topics.log)
                                                           or {}).values()), 60,
                       "retention to delete the log's first segments")  # fmt: skip
        status = cg_status(kafka_conf, unique_name)
        assert status["sites"]["dr2"]["retention"] == "lost", status["sites"]["dr2"]
        assert "RETENTION" in render(status) and "cannot catch up" in render(status)
        # without a peer: refused, naming the way back; nothing checkpointed
        before = (tmp_path / "dr2" / "checkpoint.avro").read_bytes()
        p = _apply(kafka_conf, unique_name, "dr2", tmp_path / "dr2")
        out, _ = p.communicate(timeout=60)
        assert p.returncode != 0 and "retention deleted" in out and "--bootstrap-from" in out, out
        assert (tmp_path / "dr2" / "checkpoint.avro").read_bytes() == before
        # with one: rebuilt from dr1's copy, then the log after it
        p = _apply(kafka_conf, unique_name, "dr2", tmp_path / "dr2", "--bootstrap-from",
                   str(tmp_path / "dr1"))  # fmt: skip
        try:
            vol.write(0, b"after the rebuild".ljust(512, b"."))
            cg.flush()
            with running_backup(kafka_conf, unique_name, tmp_path / "dr1", site="dr1") as _s:
                wait_until(lambda: _image_has(tmp_path / "dr2", b"after the rebuild"), 60,
                           "dr2 to be rebuilt and catch up")  # fmt: skip
        finally:
            p.terminate()
            out, _ = p.communicate(timeout=60)
        assert "bootstrapping the site from a peer" in out and "bootstrap done" in out, out
        assert_same_images(tmp_path / "p", tmp_path / "dr2", sizes)


def _image_has(site, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    path = SiteDir(site).image_path("a")
    return path.exists() and path.read_bytes()[: len(data)] == data
