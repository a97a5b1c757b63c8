"""`lowmark status`: the numbers an operator reads, from Kafka alone.

Tries to break: status reporting no W or a stale one, missing a site, a lag that does
not count unapplied records, and JSON that does not parse.
"""

from __future__ import annotations

import orjson
import pytest
from click.testing import CliRunner

from pipeline.app.cli import main
from pipeline.ops.status import cg_status, render
from pipeline.primary.volume import ConsistencyGroup
from tests.replication_helpers import FAST, running_backup, wait_until

pytestmark = pytest.mark.kafka


def test_status_reports_w_rpo_sites_and_lag(kafka_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("v", 1 << 20)
        with running_backup(
            kafka_conf, unique_name, tmp_path / "b", site="dr1", checkpoint_interval_s=0.1
        ) as (_wm, ap):
            for i in range(20):
                vol.write(i * 4096, b"s" * 4096)
            cg.flush()
            target = cg.interceptor.last_s
            wait_until(lambda: ap.service.checkpoint_w >= target, 30, "a checkpoint at W")
            st = cg_status(kafka_conf, unique_name)
            assert st["w"] is not None and st["w"] >= target
            assert 0 <= st["rpo_s"] < 30
            assert [m["id"] for m in st["interceptors"]] == ["primary"]
            site = st["sites"]["dr1"]
            assert site["checkpoint_w"] >= target
            assert site["lag_records"] == 0, "a caught-up site has no lag"
            assert "site dr1" in render(st) and "RPO" in render(st)
        # the site has stopped: records written now are its lag
        for i in range(5):
            vol.write(i * 4096, b"t" * 4096)
        cg.flush()
        lagging = cg_status(kafka_conf, unique_name)["sites"]["dr1"]
        assert lagging["lag_records"] >= 1 and lagging["lag_bytes_estimate"] > 0
    res = CliRunner().invoke(
        main,
        [
            "status",
            "--cg",
            unique_name,
            "--bootstrap-servers",
            kafka_conf["bootstrap.servers"],
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    parsed = orjson.loads(res.output)
    assert parsed["cg"] == unique_name and "dr1" in parsed["sites"]
