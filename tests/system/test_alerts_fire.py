"""lowmark's alert rules fire on what its services really export, judged by promtool.

The three services run as an operator runs them; the test provokes one condition after
another — a record the applier cannot validate (written with kcat), an interceptor that
stops answering (SIGSTOP: W held and frozen, RPO climbing, a target down), then
`lowmark fence --declare-lost` — scraping every /metrics endpoint as Prometheus would.
Prometheus' rule engine (``promtool test rules``) then says which alerts fire when.

Tries to break: an alert that fires on a healthy CG; an alert whose expression names a
metric the services do not export under that name (it would never fire); a condition
the rules miss.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka.reading import bounds
from connectors.kafka.topics import CgTopics
from tests.alert_check import Timeline, promtool
from tests.app.test_alert_rules import metric_names, rules
from tests.cli_services import CgServices
from tests.prereqs import require_tools
from tests.replication_helpers import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.tools]

# exported only once their condition exists (a retention that has deleted something)
ONLY_WHEN = {"lowmark_applier_retained_share_before_checkpoint"}
JOBS = CgServices.JOBS


def _scene(tmp: Path, bootstrap: str, cg: str) -> CgServices:
    """One async volume, and a watermark that declares silence after 3 s."""
    return CgServices(tmp, bootstrap, cg, liveness_timeout_s=3)


def _samples(tl: Timeline, scene: CgServices, n: int) -> int:
    step = 0
    for _ in range(n):
        step = tl.sample(scene.texts())
        time.sleep(1)
    return step


def test_alerts_fire_on_provoked_conditions_and_not_on_a_healthy_cg(
    kafka_conf, unique_name, tmp_path
):
    require_tools("qemu-io", "kcat")
    promtool()  # skip before starting anything if it is not built
    scene = _scene(tmp_path, kafka_conf["bootstrap.servers"], unique_name)
    tl = Timeline()
    expected: dict[int, set[str]] = {}
    stopped = False
    try:
        scene.start_all()
        scene.write(0x11)
        wait_until(lambda: scene.numbers("apply").get("lowmark_applier_applied_bytes_total", 0)
                   > 0, 60, "the backup to apply")  # fmt: skip
        # three quiet minutes of real scrapes (W moves in each): nothing fires
        healthy = _samples(tl, scene, 12)
        expected[healthy] = set()

        # 1. a record the applier cannot validate, on vol1's partition (kcat, murmur2 as
        # lowmark's producer partitions), then a write whose W needs the applier past it
        topic = CgTopics(unique_name).log
        subprocess.run(["kcat", "-b", scene.bootstrap, "-t", topic, "-P", "-K:",
                        "-X", "partitioner=murmur2_random"],
                       input=b"vol1:not a lowmark record\n", check=True, timeout=30)  # fmt: skip
        scene.write(0x22)
        wait_until(lambda: scene.numbers("apply").get("lowmark_applier_halted") == 1.0, 60,
                   "the applier to halt on the bad record")  # fmt: skip
        expected[_samples(tl, scene, 2)] = {"LowmarkApplierHalted"}

        # 2. the interceptor stops answering: the watermark holds W at its last promise
        os.kill(scene.procs["serve"].pid, signal.SIGSTOP)
        stopped = True
        wait_until(lambda: scene.numbers("watermark").get("lowmark_watermark_holds", 0) > 0,
                   30, "the watermark to hold the silent interceptor")  # fmt: skip
        wait_until(lambda: scene.numbers("apply").get("lowmark_applier_rpo_seconds", 0) > 31,
                   60, "the applied RPO to pass 30 s")  # fmt: skip
        _samples(tl, scene, 3)
        # it stays so (W frozen, the target down, RPO only growing): for: clauses elapse
        expected[tl.hold_for(150)] = {"LowmarkApplierHalted", "LowmarkInterceptorHeld",
                                      "LowmarkWatermarkFrozen", "LowmarkRPOHigh",
                                      "LowmarkServiceDown"}  # fmt: skip

        # 3. its host is gone: the operator declares its unreplicated tail lost
        out = subprocess.run(scene.argv("fence", "primary-a", "--declare-lost", "--config",
                                        str(scene.config)), env=scene.env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: scene.numbers("watermark").get("lowmark_watermark_lost_declared", 0)
                   > 0, 30, "the loss to be declared")  # fmt: skip
        expected[_samples(tl, scene, 2)] = {"LowmarkInterceptorDeclaredLost",
                                            "LowmarkApplierHalted"}  # fmt: skip
    finally:
        if stopped:
            os.kill(scene.procs["serve"].pid, signal.SIGCONT)
        scene.kill_all()

    # what the services exported is what the rules select: each rule on these three
    # services names metrics seen in the scrapes (a misnamed one would never fire)
    seen = {name.split("{", 1)[0] for step in tl.steps for name in step}
    for rule in rules():
        names = metric_names(rule["expr"])
        if any(n.startswith(("lowmark_primary_", "lowmark_watermark_", "lowmark_applier_"))
               for n in names):  # fmt: skip
            missing = names - seen - {"up"} - ONLY_WHEN
            assert not missing, f"{rule['alert']}: {sorted(missing)} not in any scrape"
    tl.assert_firing(tmp_path, expected, exact={healthy})


def test_a_site_retention_left_behind_stays_up_and_its_alert_fires(
    kafka_conf, unique_name, tmp_path
):
    """A stopped site's records are deleted (as retention.ms would) while the primary writes
    on. Started again, the applier refuses to apply — nothing it could apply is a cut — and
    stays up saying so on /metrics, instead of exiting into a target that is merely down."""
    require_tools("qemu-io")
    promtool()
    scene = _scene(tmp_path, kafka_conf["bootstrap.servers"], unique_name)
    tl = Timeline()
    expected: dict[int, set[str]] = {}
    topic = CgTopics(unique_name).log
    try:
        scene.start_all()
        scene.write(0x11)
        wait_until(lambda: scene.numbers("apply").get("lowmark_applier_applied_bytes_total", 0)
                   > 0, 60, "the backup to apply")  # fmt: skip
        healthy = _samples(tl, scene, 6)
        expected[healthy] = set()
        assert scene.stop("apply") == 0
        for pattern in range(0x20, 0x24):
            scene.write(pattern)
        admin = AdminClient(kafka_conf)
        ends = bounds(kafka_conf, topic) or {}
        cut = [TopicPartition(topic, p, end) for p, (_low, end) in ends.items() if end > 0]
        for fut in admin.delete_records(cut, request_timeout=30).values():
            fut.result()
        scene.start("apply")
        wait_until(lambda: scene.numbers("apply").get("lowmark_applier_retention_lost") == 1.0,
                   60, "the restarted site to say retention passed it")  # fmt: skip
        expected[_samples(tl, scene, 2)] = {"LowmarkSiteRetentionLost", "LowmarkApplierHalted"}
        assert scene.procs["apply"].poll() is None, "the halted applier exited"
        assert "--bootstrap-from" in scene.log("apply")  # and it said what to do
    except BaseException:
        scene.dump_logs()
        raise
    finally:
        scene.kill_all()
    tl.assert_firing(tmp_path, expected, exact={healthy})
