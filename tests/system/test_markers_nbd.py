"""Markers through real processes and clients: two `lowmark serve`, libnbd, hooks, kill -9.

Tries to break: a marker cut holding a commit without its data, or (the application
frozen by the hooks) data without its commit, over a marker every 100 ms for 30 s; a
marker that `lowmark restore --marker` does not give back byte for byte; writes that stay
held when a member stops answering and the coordinator is killed -9 mid-phase; a Marker
emitted by such an attempt; an old QUIESCE acted on by a member that wakes up late.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from connectors.embedded_kafka.procs import free_port
from pipeline.ops.status import scrape
from tests.primary.test_zero_allocation import nbdsh_env
from tests.replication_helpers import read_log, wait_until
from tests.system.marker_scene import SIZES, Cluster, check_pairs, replay_states

pytestmark = [pytest.mark.kafka, pytest.mark.tools]

WORKLOAD = Path(__file__).with_name("marker_workload.py")


@pytest.fixture
def cluster(kafka_conf, unique_name, tmp_path):
    c = Cluster(tmp_path, kafka_conf["bootstrap.servers"], unique_name, SIZES)
    try:
        c.up()
        wait_until(lambda: c.marker("probe", "--timeout-s", "2").returncode == 0, 60,
                   "a first marker (both members in a published W)")  # fmt: skip
        yield c
    except BaseException:
        for n in c.procs:
            print(f"----- {n} -----\n{c.log(n)[-4000:]}")
        raise
    finally:
        c.down()


def test_a_marker_every_100ms_for_30s_is_application_consistent(cluster, kafka_conf, tmp_path):
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    env = nbdsh_env()
    app = subprocess.Popen(["python3", str(WORKLOAD), cluster.uri("a"), cluster.uri("b"), str(ctl)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    pre = (f'echo "$LOWMARK_MARKER" > {ctl}/freeze.tmp && mv {ctl}/freeze.tmp {ctl}/freeze && '
           f'until [ "$(cat {ctl}/frozen 2>/dev/null)" = "$LOWMARK_MARKER" ]; do sleep 0.001; done')
    post = f"rm -f {ctl}/freeze"
    try:
        time.sleep(1)
        out = cluster.marker("m", "--every", "0.1", "--count", "300", "--json",
                             "--timeout-s", "5", "--pre-hook", pre, "--post-hook", post,
                             timeout_s=300)  # fmt: skip
    finally:
        (ctl / "stop").touch()
        (ctl / "freeze").unlink(missing_ok=True)
        app_out = app.communicate(timeout=30)[0].decode()
    assert out.returncode == 0, out.stderr[-3000:]
    results = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == 300
    pairs, freezes = (int(x) for x in app_out.split())
    assert freezes >= 300 and pairs > 1000, app_out  # it ran, and honoured every freeze
    log = read_log(kafka_conf, cluster.cg)
    markers = {r["name"]: r["ts"] for t, r, _p, _o in log if t == "Marker"}
    assert all(markers[r["name"]] == r["ts"] for r in results)
    moving = 0
    last = (0, 0)
    for _ts, images in replay_states(log, sorted(r["ts"] for r in results)):
        data, commit = check_pairs(images)
        assert data == commit, f"data {data} without its commit: the freeze was not honoured"
        moving += (data, commit) != last
        last = (data, commit)
    assert moving > 250  # the workload moved between markers: the cuts differ
    holds = sorted(max(r["held_ms"].values()) for r in results)
    print(f"\n300 markers, {pairs} pairs; writes held p50 {holds[150]:.2f} ms, "
          f"p99 {holds[296]:.2f} ms, max {holds[-1]:.2f} ms")  # fmt: skip
    status = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "status", "--config",
                             str(tmp_path / "a.toml")], capture_output=True, text=True,
                            env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip
    assert f"marker   {results[-1]['name']!r}" in status.stdout, status.stdout + status.stderr
    # restore by name gives back exactly the replayed cut
    name = results[150]["name"]
    to = tmp_path / "restored"
    done = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "restore", "--marker", name,
                           "--to", str(to), "--from-log", "--config", str(tmp_path / "a.toml")],
                          capture_output=True, text=True, env={**os.environ, "LOWMARK_CONFIG": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    (_, want), = replay_states(log, [markers[name]])
    for vid in SIZES:
        assert (to / "images" / f"{vid}.img").read_bytes() == bytes(want[vid]), vid


def test_a_killed_coordinator_and_a_stopped_member_never_wedge_the_primary(cluster, kafka_conf):
    b = cluster.procs["b"]
    b_metrics = f"127.0.0.1:{cluster.ports['b_m']}"
    b_quiesced = scrape(b_metrics)["lowmark_primary_markers_quiesced_total"]
    b.send_signal(signal.SIGSTOP)  # member b will never answer
    try:
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "pipeline.app.cli", "marker", "stuck", "--timeout-s", "3",
             "--config", str(cluster.tmp / "a.toml")], env={**os.environ, "LOWMARK_CONFIG": ""})
        metrics = f"127.0.0.1:{cluster.ports['a_m']}"
        wait_until(lambda: scrape(metrics).get("lowmark_primary_marker_holding") == 1.0, 20,
                   "member a holding for the marker")  # fmt: skip
        coordinator.send_signal(signal.SIGKILL)  # mid-phase: no ABORT will come
        coordinator.wait()
        t0 = time.monotonic()
        write = subprocess.run(["nbdsh", "-u", cluster.uri("a"), "-c", "h.pwrite(b'x' * 4096, 0)"],
                               env=nbdsh_env(), capture_output=True, timeout=30)  # fmt: skip
        waited = time.monotonic() - t0
        assert write.returncode == 0, write.stderr
        assert waited < 3.5, f"a write waited {waited:.2f} s: the hold outlived its timeout"
        wait_until(lambda: scrape(metrics).get("lowmark_primary_marker_holding") == 0.0, 5,
                   "member a resumed by itself")  # fmt: skip
    finally:
        b.send_signal(signal.SIGCONT)
    # b wakes up to a QUIESCE that is long over: it must not hold for it
    wait_until(lambda: scrape(b_metrics).get("lowmark_primary_up") == 1.0, 10, "b answers")
    time.sleep(1)
    assert scrape(b_metrics)["lowmark_primary_markers_quiesced_total"] == b_quiesced
    assert scrape(b_metrics)["lowmark_primary_marker_holding"] == 0.0
    assert "beyond its timeout" in cluster.log("b")
    names = {r["name"] for t, r, _p, _o in read_log(kafka_conf, cluster.cg) if t == "Marker"}
    assert "stuck" not in names
    assert cluster.marker("after", "--timeout-s", "2").returncode == 0  # markers work again


def test_markers_on_a_schedule_come_from_the_active_watermark_service_only(cluster, kafka_conf):
    ports = {}
    text = (cluster.tmp / "a.toml").read_text()
    for name in ("w2", "w3"):  # two more watermark services, each with the schedule
        ports[name] = free_port()
        (cluster.tmp / f"{name}.toml").write_text(
            text.replace(f"127.0.0.1:{cluster.ports['w_m']}", f"127.0.0.1:{ports[name]}")
            + '\n[markers]\ninterval_s = 0.3\nname = "sched"\ntimeout_s = 2\n')

    def taken(name: str) -> float:
        got = scrape(f"127.0.0.1:{ports[name]}")
        return got.get("lowmark_watermark_scheduled_markers_total", -1)

    def scheduled() -> list[str]:
        log = read_log(kafka_conf, cluster.cg)
        names = [r["name"] for t, r, _p, _o in log if t == "Marker"]
        return [n for n in names if n.startswith("sched-")]

    # the newest instance takes the publisher's transactional id: w2, then w3, is active
    cluster.start("w2", "watermark", config="w2")
    wait_until(lambda: taken("w2") >= 3, 60, "scheduled markers from w2")
    cluster.start("w3", "watermark", config="w3")
    wait_until(lambda: taken("w3") >= 2, 60, "scheduled markers from w3 once it is active")
    before = taken("w2")
    time.sleep(2)
    assert taken("w2") <= before + 1, "a standby watermark service kept taking markers"
    assert taken("w3") >= 5
    names = scheduled()
    assert len(names) == len(set(names)) >= 7
