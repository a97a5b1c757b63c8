"""A sync volume refuses a log topic with a single copy (issue #16).

A sync acknowledgement promises the write survives a broker loss. Tries to break: a sync
volume created, or a CG with one opened, on a topic with replication factor 1 (a 1-broker
cluster) or min.insync.replicas 1; an error that does not say why and what to do; an
async volume refused; a 3-broker cluster with RF 3 / min.insync.replicas 2 refused.
"""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from connectors.kafka.topics import CgTopics
from pipeline.errors import ConfigError
from pipeline.primary.volume import ConsistencyGroup
from tests.ops.test_ops_tools import FAST

STRICT = {**FAST, "allow_single_copy_sync": False}


def test_a_sync_volume_on_one_broker_is_refused_saying_why(kafka_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **STRICT) as cg:
        cg.create_volume("a", 1 << 20)  # async: fine anywhere
        with pytest.raises(ConfigError) as err:
            cg.create_volume("s", 1 << 20, mode="sync")
        msg = str(err.value)
        assert "replication factor 1" in msg and "allow_single_copy_sync" in msg, msg
        assert "s" not in cg.volumes
    # a CG holding a sync volume (created while allowed) refuses to open strict
    with ConsistencyGroup.open(unique_name, tmp_path / "p2", kafka_conf, **FAST) as cg:
        cg.create_volume("s", 1 << 20, mode="sync")
    with pytest.raises(ConfigError, match="sync volume s refused"):
        ConsistencyGroup.open(unique_name, tmp_path / "p2", kafka_conf, **STRICT)


def test_min_insync_replicas_1_is_refused_and_2_of_3_is_fine(kafka3_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka3_conf, **STRICT) as cg:
        cg.create_volume("s", 1 << 20, mode="sync")  # RF 3, min.insync.replicas 2: fine
    admin = AdminClient(kafka3_conf)
    entry = ConfigEntry("min.insync.replicas", "1", incremental_operation=AlterConfigOpType.SET)
    res = ConfigResource("topic", CgTopics(unique_name).log, incremental_configs=[entry])
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(30)
    with pytest.raises(ConfigError, match=r"min\.insync\.replicas 1"):
        ConsistencyGroup.open(unique_name, tmp_path / "p", kafka3_conf, **STRICT)
