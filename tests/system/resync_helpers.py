"""The scene of a failback after an unplanned failover, on a real broker.

The old primary ``prod`` writes, W freezes (its watermark service stops), ``prod`` writes
more (committed above the cut: nobody applies them), dies (``Interceptor.crash``), and its
images get bytes no record carries in regions its dirty-region log marks (the
acknowledged-but-unreplicated tail, written by hand as a crash leaves it). ``lowmark
failover --force`` makes ``dr1`` the primary of generation 1 at the frozen W; a watermark
service follows generation 1; dr1's primary is written through NBD by qemu-io. The test
knows every region each side wrote; the reference images come from the tests' own replay of
both generations' logs (``rebuild_from_log``, ``log_ops``), never from the product's.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.primary.regions import (
    HEADER_BYTES,
    bitmap_len,
    decode_header,
    encode_header,
    set_bits,
)
from pipeline.site import SiteDir
from pipeline.topology.roles import initial_roles
from pipeline.topology.store import RolesStore
from pipeline.watermark.generations import GenerationalWatermark
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from tests.replication_helpers import ServiceThread, log_ops, read_log, rebuild_from_log
from tests.system.failover_helpers import FailoverProcess, Scene, make_site

RB = 64 * 1024


@dataclass
class ResyncScene:
    scene: Scene
    fo: FailoverProcess
    wm1: ServiceThread
    cut: int
    #: volume -> regions (of RB) each side may have made differ
    diverged: dict[str, set[int]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    @property
    def prod_dir(self) -> Path:
        return self.scene.primary_dir

    @property
    def new_dir(self) -> Path:
        return self.scene.site_dir

    def note(self, vid: str, offset: int, length: int) -> None:
        self.diverged.setdefault(vid, set()).update(
            range(offset // RB, (offset + length - 1) // RB + 1)
        )

    def reference(self, w1: int) -> dict[str, bytearray]:
        """The CG at W1 of generation 1: generation 0 up to the cut, then generation 1."""
        conf, cg = self.scene.conf, self.scene.cg
        images = rebuild_from_log(read_log(conf, cg), self.scene.sizes, upto_ts=self.cut)
        for ts, vid, off, data in log_ops(read_log(conf, cg, generation=1)):
            if data is not None and ts <= w1:
                images[vid][off : off + len(data)] = data
        return images

    def write_new(self, nbytes: int, volumes: list[str] | None = None) -> None:
        """Random writes of 4-64 KiB through NBD to the new primary (one qemu-io per volume)."""
        vols = volumes or list(self.scene.sizes)
        cmds: dict[str, list[str]] = {v: [] for v in vols}
        left = nbytes
        while left > 0:
            vid = self.rng.choice(vols)
            off, n = _random_extent(self.rng, self.scene.sizes[vid])
            cmds[vid] += ["-c", f"write -P {self.rng.randrange(1, 255)} {off} {n}"]
            self.note(vid, off, n)
            left -= RB
        for vid, c in cmds.items():
            if c:
                out = subprocess.run(
                    ["qemu-io", "-f", "raw", *c, "-c", "flush", self.fo.uri(vid)],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert out.returncode == 0, out.stderr[-2000:]

    def close(self) -> None:
        if self.fo.alive():
            self.fo.stop()
        self.wm1.stop(check=False)
        self.scene.close()


def _random_extent(rng: random.Random, size: int) -> tuple[int, int]:
    """A 4-64 KiB write inside one random region (so N bytes of budget diverge N bytes)."""
    n = rng.choice([4096, 16384, 65536])
    region = rng.randrange(0, size // RB)
    return region * RB + rng.randrange(0, (RB - n) // 4096 + 1) * 4096, n


def _generational_wm(conf: dict[str, Any], cg: str) -> ServiceThread:
    store = RolesStore(conf, timeout_s=5.0)

    def make(generation: int) -> WatermarkService:
        wcfg = WatermarkServiceConfig(cg=cg, liveness_timeout_s=30, generation=generation)
        return WatermarkService(wcfg, conf)

    service = GenerationalWatermark(cg, make, lambda: store.latest(cg), check_every_s=0.2)
    return ServiceThread(service, "watermark-g1").start()


def _dirty_bits(path: Path, size: int) -> list[int]:
    """The regions (of RB) a dirty-region log file names, at its own granularity."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    rb, nbits = decode_header(raw[:HEADER_BYTES])
    return [
        r
        for b in set_bits(raw[HEADER_BYTES:], nbits)
        for r in range(b * rb // RB, (b + 1) * rb // RB)
    ]


def _mark_dirty(path: Path, size: int, regions: set[int]) -> None:
    """Set ``regions`` in a dirty-region log file as the log leaves it after a crash."""
    nregions = -(-size // RB)
    bits = bytearray(bitmap_len(nregions))
    if path.exists():
        bits[:] = path.read_bytes()[HEADER_BYTES:].ljust(len(bits), b"\0")[: len(bits)]
    for r in regions:
        bits[r // 8] |= 1 << (r % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_header(RB, nregions) + bytes(bits))


def build(
    conf: dict[str, Any],
    cg: str,
    root: Path,
    *,
    sizes: dict[str, int],
    above_cut: int,
    unreplicated: int,
    seed: int,
) -> ResyncScene:
    """Everything up to the new primary serving; ``above_cut`` and ``unreplicated`` bytes
    written by the old primary at random places (the tail above the cut, the tail no log
    holds)."""
    rng = random.Random(seed)
    scene = make_site(
        conf, cg, root, sizes=sizes, applied_writes=10, backlog_writes=10, seed=seed,
        keep_primary=True, generational=True,
        # regions, not 4 MiB extents: the delta path is what these tests measure (with the
        # activity log a crash marks its active extents whole, and so does `diverged`)
        primary_options={"region_extent_bytes": 0},
    )  # fmt: skip
    RolesStore(conf).commit(cg, None, initial_roles(cg, "prod", now_us=1))
    primary = scene.primary
    assert primary is not None
    scene.wm.stop()  # W freezes here: the cut
    diverged: dict[str, set[int]] = {v: set() for v in sizes}

    def note(vid: str, off: int, n: int) -> None:
        diverged[vid].update(range(off // RB, (off + n - 1) // RB + 1))

    left = above_cut
    while left > 0:
        vid = rng.choice(list(sizes))
        off, n = _random_extent(rng, sizes[vid])
        primary.volumes[vid].write(off, rng.randbytes(n))
        note(vid, off, n)
        left -= RB
    primary.flush()
    time.sleep(0.3)  # the dirty-region log clears what Kafka holds
    if primary.regions is not None:
        primary.regions.crash()
    primary.interceptor.crash()
    for vol in primary.volumes.values():
        vol.image.close()
    scene.primary = None
    site = SiteDir(scene.primary_dir)
    for vid, size in sizes.items():  # what a crash left set is diverged too
        diverged[vid].update(_dirty_bits(site.region_log_path(vid), size))
        diverged[vid].update(_dirty_bits(site.activity_log_path(vid), size))
    left = unreplicated
    marks: dict[str, set[int]] = {v: set() for v in sizes}
    while left > 0:
        vid = rng.choice(list(sizes))
        off, n = _random_extent(rng, sizes[vid])
        with open(site.image_path(vid), "r+b") as f:
            f.seek(off)
            f.write(rng.randbytes(n))
        marks[vid].update(range(off // RB, (off + n - 1) // RB + 1))
        note(vid, off, n)
        left -= RB
    for vid, regions in marks.items():
        _mark_dirty(site.region_log_path(vid), sizes[vid], regions)
    fo = FailoverProcess(scene, "--force", tag="to-dr1")
    fo.wait_for("rolled forward")
    roles = RolesStore(conf).latest(cg)
    assert roles is not None and roles.generation == 1 and roles.primary_site == "dr1"
    wm1 = _generational_wm(conf, cg)
    rs = ResyncScene(scene, fo, wm1, roles.base_w, diverged, rng)
    return rs


class Writer:
    """The new primary's clients keep writing while the resync runs."""

    def __init__(self, rs: ResyncScene, chunk: int = 256 << 10, volumes: list[str] | None = None):
        self.rs, self.chunk, self.volumes = rs, chunk, volumes
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.rs.write_new(self.chunk, self.volumes)
                self.rounds += 1
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self.thread.join(60)
        if self.error is not None:
            raise self.error


def images_of(site_dir: Path) -> dict[str, bytes]:
    site = SiteDir(site_dir)
    entries = site.read_catalog()
    return {e["volume_id"]: site.image_path(e["volume_id"]).read_bytes() for e in entries}
