"""A primary's word on its volumes in ``lowmark.config``, and the resize it refuses.

Tries to break: a created or resized volume missing from the model, or shown at a size
the log does not have; a restart that re-publishes an older state over the newer one; a
shrink that silently cuts off written bytes (or changes anything when refused); a shrink
of a tail that holds only zeros refused.
"""

from __future__ import annotations

import pytest

from pipeline.errors import VolumeError
from pipeline.primary.volume import ConsistencyGroup
from pipeline.topology.catalog import read_topology
from tests.ops.test_ops_tools import FAST
from tests.replication_helpers import read_log, wait_until

MIB = 1 << 20


def sizes(kafka_conf, cg: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {vid: v.size for vid, v in read_topology(kafka_conf, cg).live().items()}


def test_volume_changes_reach_the_model_and_a_restart_repairs_it(
    kafka_conf, unique_name, tmp_path
):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        cg.create_volume("a", MIB, metadata={"app": "db"})
        cg.create_volume("b", MIB, mode="sync")
        cg.resize_volume("a", 4 * MIB)
        wait_until(lambda: sizes(kafka_conf, unique_name) == {"a": 4 * MIB, "b": MIB}, 30,
                   "the model to show both")  # fmt: skip
        topo = read_topology(kafka_conf, unique_name)
        a, b = topo.volumes["a"], topo.volumes["b"]
        assert (a.mode, dict(a.metadata), b.mode) == ("async", {"app": "db"}, "sync")
        # the model's ts is the log's: the VolumeChange record of that state
        changes = [r for t, r, _p, _o in read_log(kafka_conf, unique_name) if t == "VolumeChange"]
        assert a.ts == max(r["ts"] for r in changes if r["volume_id"] == "a")
        first_ts = a.ts
    # reopened: every entry again, with a newer ts, the same state
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST):
        wait_until(lambda: read_topology(kafka_conf, unique_name).volumes["a"].ts > first_ts,
                   30, "the re-publish")  # fmt: skip
        assert sizes(kafka_conf, unique_name) == {"a": 4 * MIB, "b": MIB}


def test_a_shrink_that_would_cut_data_is_refused_and_changes_nothing(
    kafka_conf, unique_name, tmp_path
):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("a", 4 * MIB)
        vol.write(3 * MIB + 4096, b"\x01" * 512)
        vol.write_zeroes(MIB, 4096)  # zeros are not data: a shrink over them is fine
        with pytest.raises(VolumeError, match=rf"data at offset {3 * MIB + 4096}.*nothing"):
            cg.resize_volume("a", 2 * MIB)
        with pytest.raises(VolumeError, match="multiple of 512"):
            cg.resize_volume("a", 1000)
        assert vol.size == 4 * MIB and vol.pread(3 * MIB + 4096, 512) == b"\x01" * 512
        cg.flush()
        changes = [r for t, r, _p, _o in read_log(kafka_conf, unique_name) if t == "VolumeChange"]
        assert [r["op"] for r in changes] == ["CREATE"]  # nothing reached the log either
        vol.trim(3 * MIB, MIB)
        cg.resize_volume("a", 2 * MIB)  # the tail is trimmed: allowed
        assert vol.size == 2 * MIB
