"""Named snapshots through real processes and clients: two `lowmark serve`, two backup
sites, libnbd under load, kill -9 of a site, `nbdcopy` and `qemu-img convert`.

Tries to break: a site's copy that differs from the primary's (or from the log replayed
to the snapshot's ts), a copy with a commit but not its data, a site killed -9 after a
copy and before any checkpoint covering it (it must end with exactly one correct copy,
not two, not a copy of later images), a snapshot `list` that says held where it is not,
a read-only export that takes a write, `restore --snapshot` that differs.
"""

from __future__ import annotations

import hashlib
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
SITES = {"dr1": 0.5, "dr2": 3600.0}  # checkpoint interval: dr2 never checkpoints a snapshot
COUNT = 20


def cli(tmp: Path, *args: str, config: str = "a", timeout_s: float = 120):
    cmd = [sys.executable, "-m", "pipeline.app.cli", *args, "--config", str(tmp / f"{config}.toml")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def scene(kafka_conf, unique_name, tmp_path):
    # a slow background copy: the workload's writes meet chunks not yet copied, so the
    # copies are right only if every write first saves what it overwrites
    c = Cluster(tmp_path, kafka_conf["bootstrap.servers"], unique_name, SIZES,
                serve_extra='snapshot_copy_rate = "512KiB"')  # fmt: skip
    metrics = {}
    for site, interval in SITES.items():
        metrics[site] = free_port()
        (tmp_path / f"{site}.toml").write_text(f"""
[kafka]
bootstrap_servers = "{kafka_conf["bootstrap.servers"]}"
[cg]
name = "{unique_name}"
[apply]
site = "{site}"
data_dir = "{tmp_path / site}"
checkpoint_interval_s = {interval}
metrics = "127.0.0.1:{metrics[site]}"
""")
    c.site_metrics = metrics  # type: ignore[attr-defined]
    try:
        c.up()
        for site in SITES:
            c.start(site, "apply", config=site)
        wait_until(lambda: c.marker("probe", "--timeout-s", "2").returncode == 0, 60,
                   "a first marker (both members in a published W)")  # fmt: skip
        yield c
    except BaseException:
        for n in c.procs:
            print(f"----- {n} -----\n{c.log(n)[-4000:]}")
        raise
    finally:
        c.down()


def held(c: Cluster, site: str) -> float:
    got = scrape(f"127.0.0.1:{c.site_metrics[site]}")  # type: ignore[attr-defined]
    return got.get("lowmark_applier_snapshots_held", -1.0)


def test_twenty_snapshots_under_load_are_identical_at_every_site(scene, kafka_conf, tmp_path):
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    argv = ["python3", str(WORKLOAD), scene.uri("a"), scene.uri("b"), str(ctl)]
    app = subprocess.Popen(argv, env=nbdsh_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)  # fmt: skip
    results = []
    try:
        time.sleep(0.5)
        for i in range(1, COUNT + 1):
            out = cli(tmp_path, "snapshot", "create", f"s{i}", "--json", "--timeout-s", "5")
            assert out.returncode == 0, out.stderr[-3000:]
            results.append(orjson.loads(out.stdout))
            if i == COUNT // 2:
                # dr2 holds s10 and has no checkpoint since: kill -9, restart
                wait_until(lambda: (tmp_path / "dr2" / "named" / "s10").is_dir(), 60, "dr2 s10")
                scene.procs["dr2"].send_signal(signal.SIGKILL)
                scene.procs["dr2"].wait(30)
                scene.start("dr2", "apply", config="dr2")
    finally:
        (ctl / "stop").touch()
        app_out = app.communicate(timeout=30)[0].decode()
    pairs = int(app_out.split()[0])
    assert pairs > 100, app_out  # the workload ran through the snapshots
    # a duplicate name is refused before anything is held
    dup = cli(tmp_path, "snapshot", "create", "s3")
    assert dup.returncode != 0 and "exists already" in dup.stderr, dup.stderr
    for site in SITES:
        wait_until(lambda site=site: held(scene, site) == COUNT, 120, f"{site} holds {COUNT}")
    assert scrape(f"127.0.0.1:{scene.site_metrics['dr2']}")[  # type: ignore[attr-defined]
        "lowmark_applier_snapshots_already_held_total"] >= 1  # the restart re-applied a record

    log = read_log(kafka_conf, scene.cg)
    records = {r["name"]: r for t, r, _p, _o in log if t == "Snapshot"}
    assert sorted(records) == sorted(f"s{i}" for i in range(1, COUNT + 1))
    by_ts = sorted(results, key=lambda r: r["ts"])
    # replay_states yields one dict it keeps changing: copy each state
    replayed = {ts: {v: bytes(b) for v, b in images.items()}
                for ts, images in replay_states(log, [r["ts"] for r in by_ts])}  # fmt: skip
    moving = set()
    for r in by_ts:
        name, ts = r["name"], r["ts"]
        assert records[name]["ts"] == ts and sorted(records[name]["volume_ids"]) == ["A", "B"]
        want = replayed[ts]
        check_pairs({v: bytearray(b) for v, b in want.items()})  # no commit without its data
        moving.add(hashlib.sha256(bytes(want["A"]) + bytes(want["B"])).hexdigest())
        for vid, iid in (("A", "a"), ("B", "b")):
            expect = hashlib.sha256(bytes(want[vid])).hexdigest()
            copies = {"primary": tmp_path / iid / "named" / name / "images" / f"{vid}.img"}
            copies.update({s: tmp_path / s / "named" / name / "images" / f"{vid}.img"
                           for s in SITES})  # fmt: skip
            got = {where: sha(p) for where, p in copies.items()}
            assert set(got.values()) == {expect}, (name, vid, got, expect)
    assert len(moving) > COUNT // 2  # the snapshots are of different moments
    for site in SITES:
        left = [p.name for p in (tmp_path / site / "named").iterdir()]
        assert sorted(left) == sorted(f"s{i}" for i in range(1, COUNT + 1)), (site, left)

    # list: every snapshot held at both interceptors and at dr1 (whose checkpoints say so)
    wait_until(lambda: all(v["presence"].get("dr1") == "held" for v in orjson.loads(
        cli(tmp_path, "snapshot", "list", "--json").stdout)), 30, "dr1 checkpoints")  # fmt: skip
    views = orjson.loads(cli(tmp_path, "snapshot", "list", "--json").stdout)
    assert [v["name"] for v in views] == [r["name"] for r in by_ts]
    for v in views:
        assert v["presence"]["primary:a"] == v["presence"]["primary:b"] == "held", v
        assert v["size"] == sum(SIZES.values())
    prim = scrape(f"127.0.0.1:{scene.ports['a_m']}")
    assert prim["lowmark_primary_snapshots_sealed_total"] == COUNT
    assert prim["lowmark_primary_snapshots_copying"] == 0
    status = cli(tmp_path, "status")
    newest = by_ts[-1]["name"]
    assert f"{COUNT} snapshots (newest {newest!r})" in status.stdout, status.stdout
    holds = sorted(max(r["held_ms"].values()) for r in results)
    print(f"\n{COUNT} snapshots: writes held p50 {holds[COUNT // 2]:.2f} ms, max "
          f"{holds[-1]:.2f} ms")  # fmt: skip

    # restore by name, from a site's store and (not held there) from the log
    name, ts = by_ts[6]["name"], by_ts[6]["ts"]
    done = cli(tmp_path, "restore", "--snapshot", name, "--site-dir", str(tmp_path / "dr1"),
               "--to", str(tmp_path / "r1"))  # fmt: skip
    assert done.returncode == 0 and "verified" in done.stdout, done.stderr[-2000:]
    done = cli(tmp_path, "restore", "--snapshot", name, "--site-dir", str(tmp_path / "ctl"),
               "--to", str(tmp_path / "r2"), "--from-log")  # fmt: skip
    assert done.returncode == 0 and "from the log" in done.stdout, done.stderr[-2000:]
    for vid in SIZES:
        for r in ("r1", "r2"):
            assert (tmp_path / r / "images" / f"{vid}.img").read_bytes() == bytes(
                replayed[ts][vid]), (r, vid)

    # served read-only over NBD, pulled by nbdcopy and qemu-img convert
    port = free_port()
    served = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "serve-snapshot", name, "--site-dir",
         str(tmp_path / "dr2"), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "LOWMARK_CONFIG": ""},
    )  # fmt: skip
    try:
        info = ["nbdinfo", f"nbd://127.0.0.1:{port}/A"]
        wait_until(lambda: subprocess.run(info, capture_output=True).returncode == 0, 30,
                   "serving")  # fmt: skip
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/A", str(tmp_path / "A.raw")],
                       check=True, timeout=60)  # fmt: skip
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        f"nbd://127.0.0.1:{port}/B", str(tmp_path / "B.raw")],
                       check=True, timeout=60)  # fmt: skip
        write = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096",
                                f"nbd://127.0.0.1:{port}/A"], capture_output=True, text=True,
                               timeout=60)  # fmt: skip
        assert write.returncode != 0 or "rror" in write.stdout + write.stderr, write
    finally:
        served.send_signal(signal.SIGTERM)
        served.wait(30)
    assert (tmp_path / "A.raw").read_bytes() == bytes(replayed[ts]["A"])
    assert (tmp_path / "B.raw").read_bytes() == bytes(replayed[ts]["B"])
    assert sha(tmp_path / "dr2" / "named" / name / "images" / "A.img") == sha(tmp_path / "A.raw")
