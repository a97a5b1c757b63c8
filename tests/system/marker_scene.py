"""Two `lowmark serve` processes (interceptors a and b, volumes A and B) and `lowmark
watermark`, one CG: the scene of the marker tests and of ``bench/markers``."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from connectors.embedded_kafka.procs import free_port
from pipeline.ops.status import scrape
from tests.replication_helpers import log_ops, wait_until

#: the application both marker tests run: data in a SLOT of volume A, then a COMMIT
#: record naming it (seq, slot, crc32 of the data) on volume B
SLOT, SLOTS, COMMIT, COMMITS = 4096, 64, 512, 256
SIZES = {"A": SLOT * SLOTS, "B": COMMIT * COMMITS}


class Cluster:
    """`lowmark serve` a (volume A) and b (volume B), and `lowmark watermark`, one CG."""

    def __init__(
        self, tmp: Path, bootstrap: str, cg: str, sizes: dict[str, int], serve_extra: str = ""
    ) -> None:
        self.tmp, self.cg, self.bootstrap = tmp, cg, bootstrap
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {n: free_port() for n in ("a", "b", "a_m", "b_m", "w_m")}
        for iid, vol in (("a", "A"), ("b", "B")):
            (tmp / f"{iid}.toml").write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
[cg]
name = "{cg}"
[serve]
interceptor_id = "{iid}"
data_dir = "{tmp / iid}"
listen = "127.0.0.1:{self.ports[iid]}"
metrics = "127.0.0.1:{self.ports[iid + "_m"]}"
{serve_extra}
[[serve.volumes]]
name = "{vol}"
size = {sizes[vol]}
[watermark]
liveness_timeout_s = 30
metrics = "127.0.0.1:{self.ports["w_m"]}"
""")

    def start(self, name: str, *args: str, config: str = "a") -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "pipeline.app.cli", "--log-format", "json", *args,
               "--config", str(self.tmp / f"{config}.toml")]  # fmt: skip
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip
        self.procs[name] = p
        return p

    def up(self) -> None:
        self.start("watermark", "watermark")
        self.start("a", "serve", config="a")
        self.start("b", "serve", config="b")
        for iid in ("a", "b"):
            wait_until(lambda iid=iid: scrape(f"127.0.0.1:{self.ports[iid + '_m']}")
                       .get("lowmark_primary_up") == 1.0, 60, f"serve {iid}")  # fmt: skip

    def uri(self, iid: str) -> str:
        return f"nbd://127.0.0.1:{self.ports[iid]}/{iid.upper()}"

    def marker(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "pipeline.app.cli", "marker", *args,
               "--config", str(self.tmp / "a.toml")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip

    def down(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with_signal(p, signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


def with_signal(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(sig)


def check_pairs(images: dict[str, bytearray]) -> tuple[int, int]:
    """No commit without its data; returns (newest data seq, newest commit seq)."""
    newest_commit = 0
    for i in range(COMMITS):
        rec = bytes(images["B"][i * COMMIT : (i + 1) * COMMIT])
        if not any(rec):
            continue
        seq, slot, crc = struct.unpack(">QQI", rec[:20])
        data = bytes(images["A"][slot * SLOT : (slot + 1) * SLOT])
        (found,) = struct.unpack(">Q", data[:8])
        assert found >= seq, f"commit {seq} without its data (slot {slot} holds {found})"
        assert found != seq or zlib.crc32(data) == crc, f"commit {seq}: torn data"
        newest_commit = max(newest_commit, seq)
    newest_data = max(struct.unpack(">Q", bytes(images["A"][s * SLOT : s * SLOT + 8]))[0]
                      for s in range(SLOTS))  # fmt: skip
    return newest_data, newest_commit


def replay_states(records, marker_ts: list[int]):
    """The images at each ts of ``marker_ts`` (ascending), replayed independently."""
    ops = sorted((o for o in log_ops(records) if o[3] is not None), key=lambda o: o[0])
    images = {v: bytearray(n) for v, n in SIZES.items()}
    i = 0
    for ts in marker_ts:
        while i < len(ops) and ops[i][0] <= ts:
            _t, vid, off, data = ops[i]
            images[vid][off : off + len(data)] = data
            i += 1
        yield ts, images
