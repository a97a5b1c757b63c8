"""Sites that configure themselves, through real processes and clients we did not write.

One `lowmark serve`, `lowmark watermark` and three `lowmark apply` sites; dr3 gets nothing
but the bootstrap servers, the CG and its name, on an empty directory. Under fio load a
volume is created and another resized with `lowmark volume` at the running primary, and
qemu-io writes to both at once.

Tries to break: a new volume or a grown one that some site lacks (or lacks the writes to)
2 s after the primary had them; a site that needs a config file to join; a shrink that
would cut off written data; a corrupt or unknown record in lowmark.config that changes the
model, or that `lowmark topology` does not name; any site not byte-identical at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.embedded_kafka.procs import free_port
from connectors.kafka.producer import Producer
from connectors.kafka.topics import CONFIG_TOPIC, site_key, volume_key
from pipeline.ops.status import scrape
from pipeline.site import SiteDir
from tests.prereqs import require_tools
from tests.replication_helpers import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.tools]

MIB = 1 << 20


def _cli(*args: str, cwd: Path | None = None, check: bool = True) -> Any:
    cmd = [sys.executable, "-m", "pipeline.app.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, check=check,
                          env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip


class Fleet:
    def __init__(self, tmp: Path, bootstrap: str, cg: str) -> None:
        self.tmp, self.bootstrap, self.cg = tmp, bootstrap, cg
        self.port, self.metrics = free_port(), free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        (tmp / "p.toml").write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
[cg]
name = "{cg}"
[serve]
data_dir = "{tmp / "p"}"
listen = "127.0.0.1:{self.port}"
metrics = "127.0.0.1:{self.metrics}"
[[serve.volumes]]
name = "A"
size = {16 * MIB}
[watermark]
liveness_timeout_s = 30
""")
        for site in ("dr1", "dr2"):
            (tmp / f"{site}.toml").write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
[cg]
name = "{cg}"
[apply]
site = "{site}"
data_dir = "{tmp / site}"
checkpoint_interval_s = 0.2
""")

    def start(self, name: str, *args: str, cwd: Path | None = None) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "pipeline.app.cli", "--log-format", "json", *args]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                            env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip

    def site_dirs(self) -> dict[str, Path]:
        return {"dr1": self.tmp / "dr1", "dr2": self.tmp / "dr2",
                "dr3": self.tmp / "dr3" / ".lowmark" / "backup"}  # fmt: skip

    def uri(self, volume: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{volume}"

    def down(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _image(site: Path, vid: str, offset: int, length: int) -> bytes | None:
    path = SiteDir(site).image_path(vid)
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(length)
    except FileNotFoundError:
        return None


def _qemu_write(uri: str, pattern: int, offset: int, length: int) -> None:
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
                    "-c", "flush", uri], check=True, capture_output=True, timeout=60)  # fmt: skip


def _until_everywhere(sites: dict[str, Path], vid: str, offset: int, pattern: int,
                      t0: float) -> dict:  # type: ignore[type-arg]  # fmt: skip
    """Seconds from ``t0`` (the change asked for) until each site's image of ``vid`` holds
    the 64 KiB write that followed the change."""
    want, seen = bytes([pattern]) * (64 << 10), {}
    while len(seen) < len(sites) and time.monotonic() - t0 < 30:
        for site, d in sites.items():
            if f"{site} {vid}" not in seen and _image(d, vid, offset, 64 << 10) == want:
                seen[f"{site} {vid}"] = time.monotonic() - t0
        time.sleep(0.005)
    assert len(seen) == len(sites), f"{vid} reached only {sorted(seen)} in 30 s"
    return seen


def test_sites_follow_volume_changes_under_load_and_join_with_no_config(
    kafka_conf, unique_name, tmp_path
):
    require_tools("qemu-io", "fio")
    bootstrap = kafka_conf["bootstrap.servers"]
    fleet = Fleet(tmp_path, bootstrap, unique_name)
    (tmp_path / "dr3").mkdir()
    fio = None
    try:
        fleet.start("watermark", "watermark", "--config", str(tmp_path / "p.toml"))
        fleet.start("serve", "serve", "--config", str(tmp_path / "p.toml"))
        wait_until(lambda: scrape(f"127.0.0.1:{fleet.metrics}").get("lowmark_primary_up") == 1.0,
                   60, "serve")  # fmt: skip
        for site in ("dr1", "dr2"):
            fleet.start(site, "apply", "--config", str(tmp_path / f"{site}.toml"))
        # dr3: bootstrap servers, CG and site name, nothing else (its data dir the default)
        fleet.start("dr3", "apply", "--bootstrap-servers", bootstrap, "--cg", unique_name,
                    "--site", "dr3", cwd=tmp_path / "dr3")  # fmt: skip
        sites = fleet.site_dirs()
        for site, d in sites.items():
            wait_until(lambda d=d: SiteDir(d).catalog_path.exists(), 60, f"{site} to have A")
        fio = subprocess.Popen(["fio", "--name=load", "--ioengine=nbd", f"--uri={fleet.uri('A')}",
                                "--rw=randwrite", "--bs=4k", "--iodepth=4", "--size=12m",
                                "--rate=4m", "--time_based", "--runtime=60",
                                f"--directory={tmp_path}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(2)
        admin = ["--data-dir", str(tmp_path / "p")]
        out = _cli("volume", "create", "B", "8MiB", "--meta", "app=db", *admin)
        assert "created" in out.stdout, out
        t0 = time.monotonic()  # the primary has B: from here to B and a write at every site
        _qemu_write(fleet.uri("B"), 0x5B, MIB, 64 << 10)
        lag = _until_everywhere(sites, "B", MIB, 0x5B, t0)
        out = _cli("volume", "resize", "A", "32MiB", *admin)
        assert "33,554,432" in out.stdout, out
        t0 = time.monotonic()
        _qemu_write(fleet.uri("A"), 0x7A, 20 * MIB, 64 << 10)  # beyond the old end
        lag.update(_until_everywhere(sites, "A", 20 * MIB, 0x7A, t0))
        # a qemu-io run (its start-up and a flush) included
        print("primary has it -> it and a write at every site, s:",
              {k: round(v, 3) for k, v in lag.items()})
        assert max(lag.values()) < 2.0, lag

        # a shrink that would cut off the write at 20 MiB: refused, nothing changes
        bad = _cli("volume", "resize", "A", "16MiB", *admin, check=False)
        assert bad.returncode != 0 and "holds data at offset" in bad.stderr, bad
        listed = orjson.loads(_cli("volume", "list", "--json", *admin).stdout)
        assert {v["name"]: v["size"] for v in listed["volumes"]} == {"A": 32 * MIB, "B": 8 * MIB}

        # the model: both volumes as the primary has them, all three sites registered
        def view() -> dict:  # type: ignore[type-arg]
            r = _cli("topology", "--json", "--bootstrap-servers", bootstrap, "--cg", unique_name,
                     check=False)  # fmt: skip
            return orjson.loads(r.stdout)

        wait_until(lambda: all(s["volumes"] == {"A": "ok", "B": "ok"}
                               for s in view()["sites"]) and len(view()["sites"]) == 3, 30,
                   "every site's checkpoint to hold A and B as described")  # fmt: skip
        v = view()
        assert {x["name"]: (x["size"], x["metadata"]) for x in v["volumes"]} == {
            "A": (32 * MIB, {}), "B": (8 * MIB, {"app": "db"})}  # fmt: skip
        assert {s["site"] for s in v["sites"]} == {"dr1", "dr2", "dr3"}
        dr3 = next(s for s in v["sites"] if s["site"] == "dr3")
        assert dr3["data_dir"] == str(sites["dr3"].resolve()) and dr3["kind"] == "backup"

        # hostile lowmark.config input: garbage under A's key, an unknown record under a site
        p = Producer({"bootstrap.servers": bootstrap})
        p.produce(CONFIG_TOPIC, b"\x00garbage", volume_key(unique_name, "A"))
        p.produce(CONFIG_TOPIC, b"\xc3\x01" + b"\x11" * 8 + b"x", site_key(unique_name, "dr9"))
        p.flush(10)
        r = _cli("topology", "--bootstrap-servers", bootstrap, "--cg", unique_name, check=False)
        assert r.returncode == 3 and r.stdout.count("REJECTED") == 2, r
        v2 = view()
        assert {x["name"]: x["size"] for x in v2["volumes"]} == {"A": 32 * MIB, "B": 8 * MIB}
        assert {s["site"] for s in v2["sites"]} == {"dr1", "dr2", "dr3"}
        assert all(p.poll() is None for p in fleet.procs.values()), "a service stopped"

        # the end: every site byte-identical to the primary
        fio.send_signal(signal.SIGINT)
        fio.wait(30)
        fio = None
        prim = SiteDir(tmp_path / "p")
        for site, d in sites.items():
            for vid, size in (("A", 32 * MIB), ("B", 8 * MIB)):
                want = prim.image_path(vid).read_bytes()[:size]
                wait_until(lambda d=d, v=vid, n=size, w=want: _image(d, v, 0, n) == w, 30,
                           f"{site}'s {vid} to equal the primary's")  # fmt: skip
    finally:
        if fio is not None:
            fio.kill()
        fleet.down()
