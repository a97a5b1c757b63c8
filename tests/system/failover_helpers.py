"""A CG whose backup site has a backlog, and ``lowmark failover`` as the operator runs it.

``make_site`` builds the scene of a disaster: a primary writes, the site's applier applies
part of it and is stopped (paused), the primary writes the backlog, W passes it, and the
primary dies without a word (``Interceptor.crash``: no LEAVE, nothing more published). The
reference images are computed from the log by the tests' own replayer
(``rebuild_from_log``), never by the product's.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.errors import RestoreError
from pipeline.ops import restore as rs
from pipeline.primary.volume import ConsistencyGroup
from pipeline.topology.store import RolesStore
from pipeline.watermark.generations import GenerationalWatermark
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from tests.ops.test_ops_tools import FAST, _marker, _workload
from tests.replication_helpers import (
    ServiceThread,
    read_log,
    rebuild_from_log,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
SITE = "dr1"


@dataclass
class Scene:
    conf: dict[str, str]
    cg: str
    root: Path
    sizes: dict[str, int]
    site_dir: Path
    primary_dir: Path
    wm: ServiceThread
    write_ts: list[int] = field(default_factory=list)
    site_w: int = 0
    w: int = 0  # the latest W once the primary died
    markers: dict[str, int] = field(default_factory=dict)
    primary: ConsistencyGroup | None = None  # alive (``keep_primary``)
    applier: ApplyProcess | None = None  # the site's paused `lowmark apply` (``paused``)

    def reference(self, ts: int) -> dict[str, bytearray]:
        return rebuild_from_log(read_log(self.conf, self.cg), self.sizes, upto_ts=ts)

    def close(self) -> None:
        if self.primary is not None:
            self.primary.interceptor.crash()
        if self.applier is not None:
            self.applier.kill()
        self.wm.stop()


def published_w(conf: dict[str, Any], cg: str, generation: int = 0) -> int:
    try:
        return rs.latest_watermark(conf, cg, generation).w
    except RestoreError:
        return -1


def make_site(
    conf: dict[str, str],
    cg: str,
    root: Path,
    *,
    sizes: dict[str, int],
    applied_writes: int,
    backlog_writes: int,
    seed: int,
    marker_at: int | None = None,
    generational: bool = False,
    before_backlog: Callable[[], object] | None = None,
    keep_primary: bool = False,
    paused: bool = False,
    primary_options: dict[str, Any] | None = None,
) -> Scene:
    """Primary writes, the site applies ``applied_writes`` of them and stops; the backlog
    follows (with a marker after ``marker_at`` of its writes); the primary dies.

    ``generational``: the watermark service follows the roles into the next generation
    (as ``lowmark watermark`` does). ``before_backlog`` runs just before the backlog.
    ``keep_primary``: the primary stays alive (``Scene.primary``), its volumes included.
    ``paused``: the site's applier does not stop but pauses: a ``lowmark apply`` process
    (``Scene.applier``) started after ``lowmark pause`` stages the backlog."""
    rng = random.Random(seed)
    site_dir = root / SITE
    service: Any = WatermarkService(WatermarkServiceConfig(cg=cg, liveness_timeout_s=30), conf)
    if generational:
        store = RolesStore(conf, timeout_s=5.0)

        def make(generation: int) -> WatermarkService:
            wcfg = WatermarkServiceConfig(cg=cg, liveness_timeout_s=30, generation=generation)
            return WatermarkService(wcfg, conf)

        service = GenerationalWatermark(cg, make, lambda: store.latest(cg), check_every_s=0.2)
    wm = ServiceThread(service, "watermark").start()
    scene = Scene(conf, cg, root, sizes, site_dir, root / "primary", wm)
    primary = ConsistencyGroup.open(
        cg, scene.primary_dir, conf, interceptor_id="prod", **{**FAST, **(primary_options or {})}
    )
    alive = False
    try:
        for vid, size in sizes.items():
            primary.create_volume(vid, size)
        ap = ServiceThread(
            Applier(
                ApplierConfig(cg=cg, site=SITE, data_dir=site_dir, checkpoint_interval_s=0.05),
                conf,
            ),
            "applier",
        ).start()
        _workload(primary, rng, applied_writes, scene.write_ts)
        primary.flush()
        last = max(scene.write_ts)
        wait_until(lambda: ap.service.applied_w >= last or ap.error, 60, "the site to apply")
        ap.stop()  # the applier is paused: it checkpoints and stops
        scene.site_w = ap.service.applied_w
        if paused:
            scene.applier = ApplyProcess(scene)
            scene.applier.pause()
        if before_backlog is not None:
            before_backlog()
        for i in range(backlog_writes):
            _workload(primary, rng, 1, scene.write_ts)
            if marker_at is not None and i == marker_at:
                scene.markers["m1"] = _marker(primary, "m1")
        primary.flush()
        last = max(scene.write_ts)
        wait_until(lambda: published_w(conf, cg) >= last, 60, "W past the backlog")
        alive = keep_primary
    finally:
        if not alive:
            primary.interceptor.crash()  # kill -9: nothing more is published
            for vol in primary.volumes.values():
                vol.image.close()
    if alive:
        scene.primary = primary
        return scene
    # the watermark service may still fold the dead primary's last ticks: W settles
    w, still_since = published_w(conf, cg), time.monotonic()
    while time.monotonic() - still_since < 0.5:
        time.sleep(0.05)
        now = published_w(conf, cg)
        if now != w:
            w, still_since = now, time.monotonic()
    scene.w = w
    return scene


_SPAWNED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A test that failed mid-way must not leave a failover serving past the session."""
    for proc in _SPAWNED:
        if proc.poll() is None:
            proc.kill()


def lowmark(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``lowmark ARGS`` in a child process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.app.cli", *args],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


class ApplyProcess:
    """The site's ``lowmark apply`` in a child process (checkpoints every 0.1 s)."""

    def __init__(self, scene: Scene, tag: str = "apply") -> None:
        self.scene = scene
        self.log = scene.root / f"{tag}.log"
        self.site_args = [
            "--bootstrap-servers", scene.conf["bootstrap.servers"],
            "--cg", scene.cg, "--site", SITE, "--data-dir", str(scene.site_dir),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "LOWMARK_APPLY_CHECKPOINT_INTERVAL_S": "0.1"}
        self.out = open(self.log, "ab")  # noqa: SIM115 - closed in kill()/wait()
        cmd = [sys.executable, "-m", "pipeline.app.cli", "apply", *self.site_args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.out, stderr=self.out)
        _SPAWNED.append(self.proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pause(self) -> None:
        """``lowmark pause``: returns once the applier has paused (its stage exists)."""
        # before it holds the site, `lowmark pause` only leaves the ask for its next start
        wait_until(lambda: "applier started" in self.output(), 60, "the applier started")
        done = lowmark("pause", *self.site_args, timeout_s=90)
        assert done.returncode == 0, done.stderr + self.output()
        assert "paused; its images stay" in done.stdout, done.stdout

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.out.close()

    def wait(self, timeout_s: float = 60) -> int:
        code = self.proc.wait(timeout_s)
        self.out.close()
        return code


class FailoverProcess:
    """``lowmark failover`` in a child process, serving NBD on a unix socket."""

    def __init__(
        self,
        scene: Scene,
        *args: str,
        tag: str = "f",
        metrics: str = "",
        env: dict[str, str] | None = None,
        sub: str = "failover",
        site: str = SITE,
        site_dir: Path | None = None,
    ) -> None:
        self.scene = scene
        self.sock = scene.root / f"{tag}.sock"
        self.log = scene.root / f"{tag}.log"
        cmd = [
            sys.executable, "-m", "pipeline.app.cli", sub,
            "--bootstrap-servers", scene.conf["bootstrap.servers"],
            "--cg", scene.cg, "--site", site, "--data-dir", str(site_dir or scene.site_dir),
            "--listen", "", "--unix-socket", str(self.sock), *args,
        ]  # fmt: skip
        if metrics:
            cmd += ["--metrics", metrics]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "LOWMARK_SERVE_TICK_INTERVAL_MS": "5",
            **(env or {}),
        }
        self.out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.out, stderr=self.out)
        _SPAWNED.append(self.proc)

    def uri(self, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.sock}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, text: str, timeout_s: float = 120) -> None:
        def seen() -> bool:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"failover exited {self.proc.returncode}:\n{self.output()}")
            return False

        wait_until(seen, timeout_s, f"{text!r} in the failover's output", interval_s=0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.out.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.out.close()
        return code


def nbd_read(uri: str, offset: int, length: int, timeout_s: float = 30) -> bytes:
    """``length`` bytes at ``offset`` as qemu-io (a client we did not write) reads them."""
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-r", "-c", f"read -v {offset} {length}", uri],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return _parse_dump(out.stdout, offset, length)


def _parse_dump(text: str, offset: int, length: int) -> bytes:
    data = bytearray()
    for line in text.splitlines():
        head, sep, rest = line.partition(":  ")
        if not sep:
            continue
        try:
            int(head, 16)
        except ValueError:
            continue
        hexpart = rest[: 16 * 3].split()
        data.extend(int(h, 16) for h in hexpart[:16])
    assert len(data) == length, f"qemu-io dumped {len(data)} of {length} bytes at {offset}"
    return bytes(data)


def nbd_write(uri: str, offset: int, length: int, pattern: int, timeout_s: float = 30) -> bool:
    """Write ``pattern`` bytes with qemu-io and flush; whether the server acknowledged."""
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", "-c", "flush", uri],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    return out.returncode == 0 and "wrote" in out.stdout


def nbd_copy(uri: str, out: Path) -> bytes:
    proc = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = out.read_bytes()
    out.unlink()
    return data
