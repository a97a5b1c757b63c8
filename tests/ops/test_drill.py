"""``lowmark drill`` on a real broker, read and written through real NBD clients.

Tries to break: a clone that is not exactly the cut it claims (at a ts, at a marker), a
drill that stalls or disturbs the site's applier (the site's checkpoint W must keep moving
while the drill is built and served), a write to the clone that reaches the site's images
or the log, a delete that removes a drill still served or a directory that is not a drill,
and a wrong site or a cut above W that starts anything at all.

The clone's bytes are read by ``nbdcopy`` (and ``nbdinfo``/``qemu-io``), never through the
product's own reader, and compared with the log replayed independently
(``rebuild_from_log``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from connectors.kafka.config import KafkaConnection
from connectors.kafka.reading import end_offsets
from connectors.kafka.topics import CgTopics
from connectors.nbd.server import NbdServerConfig
from pipeline.app.cli_drill import drill as drill_cli
from pipeline.errors import RestoreError
from pipeline.ops import drill as dr
from pipeline.ops import restore as rs
from pipeline.ops.status import latest_checkpoints
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from schemas.ts import make_ts, ts_physical_us
from tests.kafka_helpers import unique
from tests.ops.test_ops_tools import FAST, _marker, _workload
from tests.oracles import first_difference, read_image
from tests.prereqs import require_tools
from tests.replication_helpers import read_log, rebuild_from_log, running_backup, wait_until

REPO = Path(__file__).resolve().parents[2]
SIZES = {"a": 1 << 20, "b": 512 << 10}
SITE = "dr1"


# ---------------------------------------------------------------- helpers


def _reference(records: list, ts: int) -> dict[str, bytes]:
    ref = rebuild_from_log(records, SIZES, upto_ts=ts)
    return {v: bytes(ref[v]) for v in SIZES}


def _nbd_read(uri: str, out: Path) -> bytes:
    """The whole export as nbdcopy (libnbd, a client we did not write) reads it."""
    proc = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = out.read_bytes()
    out.unlink()
    return data


def _nbd_size(uri: str) -> int:
    proc = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip())


class DrillProcess:
    """``lowmark drill start`` as the operator runs it: a foreground child process."""

    def __init__(self, kafka_conf: dict[str, str], cg: str, to_dir: Path, *args: str) -> None:
        self.to_dir = to_dir
        self.log = to_dir.parent / f"{to_dir.name}.log"
        cmd = [
            sys.executable,
            "-m",
            "pipeline.app.cli",
            "drill",
            "start",
            "--bootstrap-servers",
            kafka_conf["bootstrap.servers"],
            "--cg",
            cg,
            "--to",
            str(to_dir),
            *args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.out, stderr=self.out)

    def wait_serving(self, timeout_s: float = 120) -> dict[str, Any]:
        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"drill exited {self.proc.returncode}: {self.output()}")
            doc = dr.read_drill(self.to_dir) if dr.manifest_path(self.to_dir).exists() else None
            return bool(doc and doc["address"].get("serving"))

        wait_until(serving, timeout_s, "the drill to serve")
        doc = dr.read_drill(self.to_dir)
        assert doc is not None
        return doc

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.out.close()
        return code


# ---------------------------------------------------------------- no broker


def _fake_drill(path: Path, sizes: dict[str, int]) -> None:
    site = SiteDir(path).create()
    for vid, size in sizes.items():
        with open(site.image_path(vid), "wb") as f:
            f.truncate(size)
    site.write_catalog([{"volume_id": v, "name": v, "size": s} for v, s in sizes.items()])
    dr.write_manifest(path, {"kind": "lowmark-drill", "cg": "x", "cut": {"w": 1}})


def test_delete_refuses_a_non_drill_and_a_served_drill(tmp_path):
    other = tmp_path / "not-a-drill"
    SiteDir(other).create()
    with pytest.raises(dr.DrillError, match="not a drill"):
        dr.delete(other)
    assert other.is_dir()
    (other / "drill.json").write_text('{"someone": "else"}')
    with pytest.raises(dr.DrillError, match="not a lowmark drill manifest"):
        dr.delete(other)
    assert other.is_dir()

    d = tmp_path / "d1"
    _fake_drill(d, {"a": 4096})
    assert dr.running_pid(d) is None
    with dr.DrillLock(d):
        assert dr.running_pid(d) == os.getpid()
        with pytest.raises(dr.DrillError, match="already served"):
            dr.DrillLock(d).acquire()
        with pytest.raises(dr.DrillError, match="still served"):
            dr.delete(d)
        [listed] = dr.list_drills(tmp_path)
        assert listed["running"] and listed["dir"] == str(d)
        res = CliRunner().invoke(drill_cli, ["delete", str(d)])
        assert isinstance(res.exception, dr.DrillError) and d.is_dir()
    # the lock dropped (as when the serving process dies): now it goes
    assert dr.list_drills(d)[0]["running"] is False
    res = CliRunner().invoke(drill_cli, ["list", "--json", str(tmp_path)])
    assert res.exit_code == 0 and orjson.loads(res.stdout)[0]["running"] is False
    res = CliRunner().invoke(drill_cli, ["delete", str(d)])
    assert res.exit_code == 0, res.output
    assert not d.exists() and dr.list_drills(tmp_path) == []


@pytest.mark.tools
def test_serve_exports_every_volume_by_name_writable(tmp_path):
    require_tools("nbdinfo", "qemu-io", "nbdcopy")
    d = tmp_path / "d"
    _fake_drill(d, {"a": 64 << 10, "b": 128 << 10})
    stop = threading.Event()
    ready: list[dr.Served] = []
    cfg = NbdServerConfig(host="127.0.0.1", port=0)
    t = threading.Thread(target=dr.serve, args=(d, cfg, stop, ready.append), daemon=True)
    t.start()
    try:
        wait_until(lambda: bool(ready), 10, "the server to listen")
        uris = ready[0].exports
        assert sorted(uris) == ["a", "b"]
        assert _nbd_size(uris["a"]) == 64 << 10 and _nbd_size(uris["b"]) == 128 << 10
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 4096", uris["b"]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        got = _nbd_read(uris["b"], tmp_path / "b.raw")
        assert got == bytes(4096) + b"\x5a" * 4096 + bytes((128 << 10) - 8192)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert read_image(SiteDir(d).image_path("b"))[4096:8192] == b"\x5a" * 4096


# ---------------------------------------------------------------- on a real broker


class Writer:
    """Keeps writing to the primary in a thread, so the site keeps applying."""

    def __init__(self, cg: ConsistencyGroup, seed: int) -> None:
        self.cg, self.rng = cg, random.Random(seed)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                _workload(self.cg, self.rng, 5, [])
                time.sleep(0.02)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert self.error is None, self.error


def _published_w(conf: dict[str, Any], cg: str) -> int:
    try:
        return rs.latest_watermark(conf, cg).w
    except RestoreError:
        return -1  # none published yet


def _site_w(conf: dict[str, Any], cg: str) -> int:
    found = latest_checkpoints(conf, cg)
    return found[SITE].w if SITE in found else -1


@pytest.mark.tools
def test_drill_at_a_ts_and_a_marker_while_the_site_keeps_applying(kafka, tmp_path):
    require_tools("nbdinfo", "qemu-io", "nbdcopy")
    conf = KafkaConnection(kafka.bootstrap_servers, client_id="lowmark-test").librdkafka()
    name = unique("drill")
    site_dir = tmp_path / SITE
    rng = random.Random(12)
    write_ts: list[int] = []
    with ConsistencyGroup.open(name, tmp_path / "primary", conf, **FAST) as cg:
        for vid, size in SIZES.items():
            cg.create_volume(vid, size)
        with running_backup(
            conf,
            name,
            site_dir,
            site=SITE,
            checkpoint_interval_s=0.05,
            snapshot_interval_s=0.2,
            snapshots_kept=1000,
        ) as (_wm, ap):
            for round_ in range(6):
                _workload(cg, rng, 40, write_ts)
                if round_ == 3:
                    marker_ts = _marker(cg, "pre-drill")
                cg.flush()
                time.sleep(0.3)  # snapshots (every 0.2 s) spread over the log
            wait_until(lambda: _published_w(conf, name) >= max(write_ts), 30, "W past the writes")
            cut = sorted(write_ts)[len(write_ts) * 2 // 3]
            assert cut != marker_ts
            writer = Writer(cg, 13)  # the site keeps applying through the drill
            try:
                site_w0 = _site_w(conf, name)
                d1 = DrillProcess(
                    conf, name, tmp_path / "d1", "--site", SITE, "--site-dir", str(site_dir),
                    "--at", str(cut), "--port", "0",
                )  # fmt: skip
                doc = d1.wait_serving()
                assert doc["cut"]["w"] == cut and doc["site"] == SITE and doc["cg"] == name
                assert doc["base"]["kind"] == "snapshot", f"no snapshot base: {doc['base']}"
                # the summary is printed before the manifest says serving; a slow pipe may lag
                wait_until(lambda: "RPO of this cut" in d1.output(), 10, "the drill summary")
                out = d1.output()
                assert f"at W {cut} " in out and "RPO of this cut" in out
                for uri in doc["exports"].values():
                    assert uri in out
                # the marker's drill on a unix socket, beside the first one
                sock = str(tmp_path / "d2.sock")
                d2 = DrillProcess(
                    conf, name, tmp_path / "d2", "--site", SITE, "--site-dir", str(site_dir),
                    "--at-marker", "pre-drill", "--unix", sock,
                )  # fmt: skip
                doc2 = d2.wait_serving()
                assert doc2["cut"]["w"] == marker_ts and doc2["cut"]["marker"] == "pre-drill"
                assert doc2["exports"]["a"].startswith("nbd+unix:///a?socket=")
                records = read_log(conf, name)
                for d, at in ((doc, cut), (doc2, marker_ts)):
                    want = _reference(records, at)
                    assert sorted(d["exports"]) == sorted(SIZES)
                    for vid, uri in d["exports"].items():
                        assert _nbd_size(uri) == SIZES[vid]
                        got = _nbd_read(uri, tmp_path / "read.raw")
                        assert got == want[vid], f"drill at {at}, {vid}: " + first_difference(
                            got, want[vid]
                        )
                # the applier was neither paused nor stopped: its checkpoint W moved on
                wait_until(
                    lambda: _site_w(conf, name) > max(site_w0, marker_ts, cut) or ap.error,
                    30,
                    "the site's checkpoint W to advance during the drill",
                )
                ap.check()
                assert d2.stop(signal.SIGTERM) == 0, d2.output()
                assert not Path(sock).exists()  # the server removed its socket
            finally:
                writer.stop()
            # the clone's writes stay in the clone: the site applied everything, quiet now
            cg.flush()
            last = cg.interceptor.last_s
            wait_until(lambda: ap.service.applied_w >= last or ap.error, 30, "site at W")
            ap.check()
            site = SiteDir(site_dir)
            before = {v: read_image(site.image_path(v), SIZES[v]) for v in SIZES}
            log_end = end_offsets(conf, CgTopics(name).log)
            log_before = read_log(conf, name)
            clone_a = doc["exports"]["a"]
            proc = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 65536", "-c", "flush", clone_a],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert proc.returncode == 0, proc.stderr
            proc = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "read -P 0xa5 0 65536", clone_a],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout
            clone_img = read_image(SiteDir(tmp_path / "d1").image_path("a"))
            assert clone_img[:65536] == b"\xa5" * 65536
            time.sleep(0.5)  # anything the write would have set off has had time
            # per partition in offset order (two reads interleave partitions differently)
            after = sorted(read_log(conf, name), key=lambda r: (r[2], r[3]))
            assert after == sorted(log_before, key=lambda r: (r[2], r[3])), (
                "the clone's write reached the log"
            )
            assert end_offsets(conf, CgTopics(name).log) == log_end
            for v in SIZES:
                now = read_image(site.image_path(v), SIZES[v])
                assert now == before[v], f"site volume {v}: {first_difference(now, before[v])}"
            # list shows it served; delete refuses until it stops, then removes it
            res = CliRunner().invoke(drill_cli, ["list", "--json", str(tmp_path)])
            listed = {Path(x["dir"]).name: x for x in orjson.loads(res.stdout)}
            assert listed["d1"]["running"] and not listed["d2"]["running"]
            with pytest.raises(dr.DrillError, match="still served"):
                dr.delete(tmp_path / "d1")
            assert d1.stop() == 0, d1.output()
            assert "drill stopped" in d1.output()
            for d in ("d1", "d2"):
                res = CliRunner().invoke(drill_cli, ["delete", str(tmp_path / d)])
                assert res.exit_code == 0, res.output
                assert not (tmp_path / d).exists()
            assert SiteDir(site_dir).is_site() and ap.error is None

            # a wrong site, a cut above W, a marker that does not exist: nothing starts
            # an hour past W: the idle primary's ticks move W on meanwhile, by milliseconds
            above = make_ts(ts_physical_us(rs.latest_watermark(conf, name).w) + 3600 * 10**6)
            with pytest.raises(dr.DrillError, match="site 'nope' has no checkpoint"):
                dr.check_site(conf, name, "nope")
            with pytest.raises(dr.DrillError, match="not a site's data dir"):
                dr.check_site(conf, name, SITE, tmp_path / "no-such-dir")
            with pytest.raises(RestoreError, match="above the latest published W"):
                dr.choose_cut(conf, name, at=above)
            with pytest.raises(RestoreError, match="no marker named"):
                dr.choose_cut(conf, name, marker="never-set")
            base = ["start", "--bootstrap-servers", conf["bootstrap.servers"], "--cg", name]
            for args, why in (
                (["--site", "nope", "--to", str(tmp_path / "x")], "has no checkpoint"),
                (["--site", SITE, "--at", str(above), "--to", str(tmp_path / "y")], "above"),
            ):
                res = CliRunner().invoke(drill_cli, [*base, *args])
                assert isinstance(res.exception, RestoreError), res.output
                assert why in str(res.exception)
            assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
