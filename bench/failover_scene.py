"""The disaster bench.failover fails over from: a site with a backlog, a dead primary.

Built from the product's own pieces, as an operator's deployment would run them (bench/
does not import tests/):

1. a ``ConsistencyGroup`` primary (``pipeline.primary.volume``) with 2 async volumes of
   ``volume_bytes`` each, default interceptor settings; the CG's watermark service runs in
   a child process (``bench.common.running_watermark_service``) for the whole scene;
2. the site's ``Applier`` (``pipeline.backup.applier``) in a thread applies a small initial
   part of random writes and is stopped (it checkpoints); ``paused`` (the default), the
   site's own ``lowmark apply`` then runs in a child process, started paused (``lowmark
   pause``: it stages what it reads, ``pipeline.backup.pause``); not ``paused``, nothing
   runs at the site (the cold case);
3. the primary writes the backlog (random ``write_size`` writes, 4 KiB aligned, over both
   volumes), flushes, and the bench waits until the latest published W passes the last
   write; then ``Interceptor.crash()``: the primary dies, nothing more is published. A
   paused site is given the time to stage up to that W (it is running all along: the
   failover asks it to hand the site over).

With W past every write, the failover's cut is every write: the primary's images, as the
crash left them, are the oracle of every byte a reader gets (``Scene.oracle_crc``).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, MiB, random_pool, running_watermark_service, stop_process
from pipeline.backup import pause, staging
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.errors import RestoreError, SetupError
from pipeline.ops import restore as rs
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir

SITE = "dr1"
VOLUMES = ("a", "b")
BLOCK = 4096


@dataclass
class Scene:
    cg: str
    root: Path
    site_dir: Path
    primary_dir: Path
    volume_bytes: int
    write_size: int
    initial_writes: int = 0
    initial_bytes: int = 0
    backlog_writes: int = 0
    backlog_bytes: int = 0
    backlog_write_s: float = 0.0
    w_wait_s: float = 0.0
    site_w: int = 0
    w: int = 0
    #: per volume, one flag per 4 KiB block: 1 written by the backlog (indexed at the
    #: failover), 2 written only before the site paused (in the site's image), 0 never
    blocks: dict[str, bytearray] = field(default_factory=dict)

    def image(self, site: Path, vol: str) -> Path:
        return SiteDir(site).image_path(vol)

    def oracle_crc(self, vol: str, offset: int, length: int = BLOCK) -> int:
        """crc32 of the cut's bytes: the dead primary's image (W passed its last write)."""
        with self.image(self.primary_dir, vol).open("rb") as f:
            f.seek(offset)
            return zlib.crc32(f.read(length))

    def kind(self, vol: str, offset: int) -> str:
        flag = self.blocks[vol][offset // BLOCK]
        return {1: "indexed", 2: "image", 0: "zero"}[flag]


class _ApplierThread:
    """The site's applier, run as ``lowmark apply`` runs it: start, step, close."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-applier", daemon=True)

    def _run(self) -> None:
        try:
            self.applier.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def start(self) -> _ApplierThread:
        self.applier.start()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        if self.thread.is_alive():
            raise SetupError("the site's applier did not stop within 60 s")
        self.applier.close()  # checkpoints: the failover starts from that checkpoint
        if self.error is not None:
            raise SetupError(f"the site's applier failed: {self.error!r}") from self.error


def published_w(conf: dict[str, Any], cg: str) -> int:
    try:
        return rs.latest_watermark(conf, cg, 0).w
    except RestoreError:
        return -1


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise SetupError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


class _Writer:
    """Random ``write_size`` writes at 4 KiB-aligned offsets, flagged per block."""

    def __init__(self, cg: ConsistencyGroup, scene: Scene, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vols = [cg.volume(v) for v in VOLUMES]
        self.scene = scene
        self.pool = random_pool(scene.write_size, total=32 * MiB, seed=seed)
        self.last_ts = 0

    def write(self, total_bytes: int, flag: int) -> int:
        ws = self.scene.write_size
        n = max(1, total_bytes // ws)
        slots = (self.scene.volume_bytes - ws) // BLOCK + 1
        for i in range(n):
            vol = self.vols[i % len(self.vols)]
            off = self.rng.randrange(slots) * BLOCK
            self.last_ts = max(self.last_ts, vol.write(off, self.pool[i % len(self.pool)]))
            blocks = self.scene.blocks[vol.name]
            first, end = off // BLOCK, (off + ws) // BLOCK
            if flag == 1:
                blocks[first:end] = b"\x01" * (end - first)
            else:
                for b in range(first, end):
                    blocks[b] = blocks[b] or flag
        return n


@contextlib.contextmanager
def site_with_backlog(
    conf: dict[str, Any],
    cg: str,
    root: Path,
    *,
    backlog_bytes: int,
    write_size: int,
    volume_bytes: int | None = None,
    initial_bytes: int | None = None,
    seed: int = 1,
    paused: bool = True,
) -> Iterator[Scene]:
    """The scene (module docstring); the watermark service runs until the block ends."""
    if write_size % BLOCK:
        raise SetupError(f"the write size {write_size} must be a multiple of {BLOCK}")
    vol_bytes = volume_bytes or backlog_bytes
    scene = Scene(cg, root, root / SITE, root / "primary", vol_bytes, write_size)
    scene.blocks = {v: bytearray(vol_bytes // BLOCK) for v in VOLUMES}
    initial = initial_bytes if initial_bytes is not None else max(4 * MiB, backlog_bytes // 16)
    primary = ConsistencyGroup.open(cg, scene.primary_dir, conf, interceptor_id="prod")
    crashed = False
    try:
        for v in VOLUMES:
            primary.create_volume(v, vol_bytes)
        with contextlib.ExitStack() as stack, running_watermark_service(cg, conf):
            applier = _ApplierThread(
                Applier(
                    ApplierConfig(
                        cg=cg, site=SITE, data_dir=scene.site_dir, checkpoint_interval_s=0.2
                    ),
                    conf,
                )
            ).start()
            writer = _Writer(primary, scene, seed)
            try:
                scene.initial_writes = writer.write(initial, flag=2)
                scene.initial_bytes = scene.initial_writes * write_size
                primary.flush()
                last = writer.last_ts
                _wait(
                    lambda: applier.applier.applied_w >= last or applier.error is not None,
                    300,
                    "the site to apply the initial writes",
                )
            finally:
                applier.stop()  # it checkpoints and stops
            scene.site_w = applier.applier.checkpoint_w
            site = SiteDir(scene.site_dir)
            if not site.checkpoint_path.exists():
                raise SetupError("the site's applier left no checkpoint")
            if paused:  # the site's own `lowmark apply`, started paused
                pause.set_control(site, pause.PAUSED, True)
                stack.enter_context(_apply_process(conf, cg, site))
            t = time.monotonic()
            scene.backlog_writes = writer.write(backlog_bytes, flag=1)
            scene.backlog_bytes = scene.backlog_writes * write_size
            primary.flush()
            scene.backlog_write_s = time.monotonic() - t
            last = writer.last_ts
            t = time.monotonic()
            _wait(lambda: published_w(conf, cg) >= last, 300, "W past the backlog")
            scene.w_wait_s = time.monotonic() - t
            primary.interceptor.crash()  # kill -9: nothing more is published
            crashed = True
            for vol in primary.volumes.values():
                vol.image.sync()
                vol.image.close()
            scene.w = _settled_w(conf, cg)
            if paused:
                _wait(lambda: _staged_w(site) >= scene.w, 300, "the paused site to stage up to W")
            yield scene
    finally:
        if not crashed:
            primary.interceptor.crash()
            for vol in primary.volumes.values():
                vol.image.close()


@contextlib.contextmanager
def _apply_process(conf: dict[str, Any], cg: str, site: SiteDir) -> Iterator[None]:
    """``lowmark apply`` of the site in its own process, as deployed; returns once it has
    paused (its stage exists). The failover asks it to hand the site over; it exits."""
    log = (site.root.parent / "apply.log").open("ab")
    env = {**os.environ, "LOWMARK_APPLY_CHECKPOINT_INTERVAL_S": "0.2",
           "LOWMARK_BOOTSTRAP_SERVERS": conf["bootstrap.servers"]}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "apply", "--cg", cg, "--site", SITE,
         "--data-dir", str(site.root)],
        cwd=REPO, env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        _wait(lambda: (staging.stage_dir(site) / staging.OPS).exists() or proc.poll() is not None,
              120, "the site's `lowmark apply` to pause")  # fmt: skip
        if proc.poll() is not None:
            raise SetupError(f"the site's `lowmark apply` exited {proc.returncode}: see {log.name}")
        yield
    finally:
        stop_process(proc, 30, name="the site's `lowmark apply`")
        log.close()


def _staged_w(site: SiteDir) -> int:
    w = staging.staged_w(site)
    return -1 if w is None else w


def _settled_w(conf: dict[str, Any], cg: str, quiet_s: float = 0.5) -> int:
    """The service may still fold the dead primary's last ticks: wait until W holds still."""
    w, since = published_w(conf, cg), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.05)
        now = published_w(conf, cg)
        if now != w:
            w, since = now, time.monotonic()
    return w


def pick_spots(scene: Scene, n: int, seed: int = 3) -> list[tuple[str, int]]:
    """``n`` 4 KiB spots spread over both volumes: half in blocks the backlog wrote (indexed
    at the failover), half uniform over the volume (mostly unindexed: the site's image)."""
    rng = random.Random(seed)
    spots: list[tuple[str, int]] = []
    indexed = {v: [i for i, f in enumerate(scene.blocks[v]) if f == 1] for v in VOLUMES}
    nblocks = scene.volume_bytes // BLOCK
    for i in range(n):
        vol = VOLUMES[i % len(VOLUMES)]
        if i % 4 < 2 and indexed[vol]:
            spots.append((vol, rng.choice(indexed[vol]) * BLOCK))
        else:
            spots.append((vol, rng.randrange(nblocks) * BLOCK))
    rng.shuffle(spots)
    return spots
