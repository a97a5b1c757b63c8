"""The primary under fsync loss: what it acknowledged as durable survives, and its backups
converge to what it holds after the crash.

Tries to break: a ts reissued after the clock's high-water file lost its last reservation,
a flushed (or sync-acknowledged) write missing from the image after restart, a region
cleared in the dirty-region log while the write in it was only in the page cache (then a
restart does not republish it and the backups keep bytes the primary lost), a restart
whose republish leaves the log's image different from the primary's. One primary data
directory (an async and a sync volume; small regions and activity-log extents) lives
many lives on one CG on real Kafka: each life opens the CG in-process (restart
republish), writes, zeroes and flushes until the shim cuts the power at a random file
operation (images, region log, clock high-water); the disk keeps only what was synced
plus a seeded subset (one write torn). Then:

- every ts a life handed out is above every ts of the lives before it, and every record
  a volume's log partition gains after a restart is above every one it held before;
- each 512-byte sector of the images holds its last durable value or a value a later
  write (acknowledged or in flight) put there;
- after the restart's republish, the images rebuilt from the log equal the primary's;
- at the end a backup (watermark + applier) converges to the primary byte for byte.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import LowmarkError
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from tests.fsloss.shim import FsLoss
from tests.replication_helpers import (
    FAST,
    ServiceThread,
    log_ops,
    read_log_from,
    running_backup,
    wait_until,
)
from tests.torture_summary import record

pytestmark = pytest.mark.kafka

SECTOR = 512
SIZES = {"a": 256 << 10, "s": 64 << 10}
MODES = {"a": "async", "s": "sync"}
#: small regions and extents so a crash republishes little and clears happen in a life
ENGINE = {
    **FAST,
    "region_bytes": 4096,
    "region_extent_bytes": 16384,
    "region_keep_s": 0.05,
    "markers": False,
    "topology": False,
}
OPS_PER_LIFE = 24


@dataclass
class Model:
    """Per volume and sector: the values it may hold after a crash (its last durable value
    first, then what later writes put there)."""

    cands: dict[str, list[list[bytes]]] = field(default_factory=dict)

    def reset(self, images: dict[str, bytes]) -> None:
        self.cands = {
            v: [[img[i : i + SECTOR]] for i in range(0, len(img), SECTOR)]
            for v, img in images.items()
        }

    def attempt(self, vid: str, off: int, data: bytes) -> None:
        for i in range(0, len(data), SECTOR):
            self.cands[vid][(off + i) // SECTOR].append(data[i : i + SECTOR])

    def durable(self, vid: str, off: int | None = None, n: int = 0) -> None:
        sectors = self.cands[vid]
        rng = range(len(sectors)) if off is None else range(off // SECTOR, (off + n) // SECTOR)
        for s in rng:
            sectors[s][:] = sectors[s][-1:]

    def check(self, images: dict[str, bytes]) -> list[str]:
        out = []
        for vid, sectors in self.cands.items():
            img = images[vid]
            for s, allowed in enumerate(sectors):
                got = img[s * SECTOR : (s + 1) * SECTOR]
                if got not in allowed:
                    what = "its durable value" if len(allowed) == 1 else "any value written"
                    out.append(f"volume {vid} sector {s} holds none of {what} ({len(allowed)})")
                    break
        return out


class LogImage:
    """The images rebuilt from the CG's log, read on incrementally."""

    def __init__(self, kafka_conf: dict[str, Any], cg: str) -> None:
        self.kafka_conf, self.cg = kafka_conf, cg
        self.at: dict[int, int] | None = None
        #: per volume (one partition each): a transaction's commit markers reach its
        #: partitions one by one, so a read just after a commit may see one volume's records
        #: of it and not yet another's (seed 2 life 175): only per partition is ts ordered
        self.max_ts = dict.fromkeys(SIZES, 0)
        self.images = {v: bytearray(n) for v, n in SIZES.items()}
        self.records = 0

    def read_on(self) -> list[str]:
        recs, self.at = read_log_from(self.kafka_conf, self.cg, self.at)
        found = []
        for ts, vid, off, data in log_ops(recs):
            self.records += 1
            if ts <= self.max_ts[vid]:
                found.append(
                    f"log record ts {ts} of {vid} not above its earlier {self.max_ts[vid]}"
                )
            self.max_ts[vid] = max(self.max_ts[vid], ts)
            if data is not None:
                self.images[vid][off : off + len(data)] = data
        return found


def read_images(data_dir: Path) -> dict[str, bytes]:
    site = SiteDir(data_dir)
    out = {}
    for vid, n in SIZES.items():
        path = site.image_path(vid)
        data = path.read_bytes() if path.exists() else b""
        out[vid] = data[:n].ljust(n, b"\0")
    return out


def abandon(cg: ConsistencyGroup) -> None:
    """A dead process: no drain, no last clear, no LEAVE; only the OS closing its files."""
    cg.interceptor.crash()
    if cg.regions is not None:
        cg.regions.crash()
    for vol in cg.volumes.values():
        vol.image.close()


def power_cut(
    cg: ConsistencyGroup, fs: FsLoss, model: Model, run: Run, tag: str
) -> dict[str, bytes]:
    """The life ends as its process would; the disk as the cut left it is checked."""
    if not getattr(cg, "_fsloss_dead", False):
        cg._fsloss_dead = True  # type: ignore[attr-defined]
        abandon(cg)
    report = fs.crash()
    left = read_images(Path(fs.root))
    run.violations += [f"{tag} {report}: {v}" for v in model.check(left)]
    model.reset(left)
    return left


@dataclass
class Run:
    issued: list[int] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    cuts: int = 0
    flushes: int = 0
    sync_acks: int = 0
    acked: int = 0
    open_cuts: int = 0


def workload(cg: ConsistencyGroup, model: Model, rng: random.Random, fs: FsLoss, run: Run,
             floor: int, ops: int) -> None:  # fmt: skip
    """Writes, zeroes and flushes until the power is cut (or ``ops`` are done)."""
    for _ in range(ops):
        if fs.cut.is_set():
            return
        r = rng.random()
        try:
            if r < 0.1:
                cg.flush()
                model.durable("a")
                model.durable("s")
                run.flushes += 1
                continue
            vid = "s" if r < 0.22 else "a"  # a sync ack waits for a cut: ~0.1 s each
            vol = cg.volume(vid)
            n = rng.choice([512, 4096, 8192, 16384])
            off = rng.randrange(0, SIZES[vid] - n) // SECTOR * SECTOR
            if rng.random() < 0.15:
                model.attempt(vid, off, bytes(n))
                ts = vol.write_zeroes(off, n)
            else:
                data = rng.randbytes(n)
                model.attempt(vid, off, data)
                ts = vol.write(off, data)
        except (OSError, LowmarkError):
            if not fs.cut.is_set():
                raise
            return
        run.acked += 1
        if ts <= floor or (run.issued and ts <= run.issued[-1]):
            run.violations.append(f"ts {ts} reissued (floor {floor})")
        run.issued.append(ts)
        if MODES[vid] == "sync":
            model.durable(vid, off, n)  # in a published cut: acknowledged as durable
            run.sync_acks += 1


def crash_lives(kafka_conf: dict[str, Any], cg_name: str, tmp_path: Path, crashes: int,
                seed: int, born: list[ConsistencyGroup]) -> Run:  # fmt: skip
    """``born``: every ConsistencyGroup made, so one whose ``open`` the cut failed half way
    (its threads already running) dies too, as it would with its process."""
    rng = random.Random(seed)
    data_dir = tmp_path / "primary"
    fs = FsLoss(data_dir, seed)
    run = Run()
    model = Model()
    logimg = LogImage(kafka_conf, cg_name)
    with fs:
        cg = ConsistencyGroup.open(cg_name, data_dir, kafka_conf, **ENGINE)
        for vid, n in SIZES.items():
            cg.create_volume(vid, n, mode=MODES[vid])  # type: ignore[arg-type]
        cg.flush()
        model.reset(read_images(data_dir))
        before = fs.ops
        workload(cg, model, rng, fs, run, 0, OPS_PER_LIFE)  # calibration: no crash point
        per_life = max(1, fs.ops - before)
        for life in range(crashes):
            fs.keep_share = rng.choice([0.0, 0.0, 0.5, 0.9])
            fs.tear = rng.random() < 0.5
            fs.crash_at = fs.ops + rng.randint(1, per_life)
            floor = run.issued[-1] if run.issued else 0
            workload(
                cg, model, rng, fs, run, floor, per_life + OPS_PER_LIFE
            )  # each op: >= 1 file op
            tag = f"seed {seed} life {life} (keep {fs.keep_share}, tear {fs.tear})"
            if not fs.cut.is_set():
                fs.crash_at = None
                run.violations.append(f"{tag}: the crash point was never reached")
            run.cuts += 1
            left = power_cut(cg, fs, model, run, tag)
            opened = None
            if rng.random() < 0.25:  # the power goes again while the restart republishes
                fs.crash_at = fs.ops + rng.randint(1, 12)
                try:
                    opened = ConsistencyGroup.open(cg_name, data_dir, kafka_conf, **ENGINE)
                    opened.flush()
                except (OSError, LowmarkError):
                    if not fs.cut.is_set():
                        raise
                if fs.cut.is_set():
                    run.open_cuts += 1
                    left = power_cut(born[-1], fs, model, run, f"{tag} (in the restart)")
                    opened = None
            fs.crash_at = None  # the republish this checks is uncrashed
            cg = opened or ConsistencyGroup.open(cg_name, data_dir, kafka_conf, **ENGINE)
            cg.flush()
            now = read_images(data_dir)
            # the flush returns once the coordinator took the commit; its markers (and so
            # what a read_committed reader sees) may follow a moment later: read on until
            # the log's image matches, or a deadline says it never will
            deadline = time.monotonic() + 10
            while True:
                run.violations += [f"{tag}: {v}" for v in logimg.read_on()]
                if all(bytes(logimg.images[v]) == now[v] for v in SIZES):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            for vid in SIZES:
                if bytes(logimg.images[vid]) != now[vid]:
                    at = next(i for i in range(SIZES[vid]) if logimg.images[vid][i] != now[vid][i])
                    run.violations.append(
                        f"{tag}: after the republish the log's image of {vid} differs from the "
                        f"primary's at byte {at} (region {at // ENGINE['region_bytes']})"
                    )
            if now != left:
                run.violations.append(f"{tag}: the restart changed the images it found")
        cg.close()
    return run


@pytest.mark.parametrize(
    ("crashes", "seed"),
    [
        pytest.param(20, 1, id="short"),
        pytest.param(500, 2, id="long", marks=[pytest.mark.torture, pytest.mark.timeout(3000)]),
    ],
)
def test_primary_fsync_loss(kafka_conf, unique_name, tmp_path, monkeypatch, crashes, seed):
    t0 = time.monotonic()
    born: list[ConsistencyGroup] = []
    init = ConsistencyGroup.__init__

    def noted(self: ConsistencyGroup, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        born.append(self)

    monkeypatch.setattr(ConsistencyGroup, "__init__", noted)
    wm = ServiceThread(
        WatermarkService(WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=30), kafka_conf),
        "watermark",
    ).start()
    try:
        run = crash_lives(kafka_conf, unique_name, tmp_path, crashes, seed, born)
    finally:
        wm.stop()
    assert not run.violations, "\n".join(run.violations[:20])
    assert run.cuts == crashes, f"a life ended without its power cut: {run}"
    assert run.flushes and run.sync_acks, f"nothing acknowledged as durable: {run}"
    primary = read_images(tmp_path / "primary")
    site = tmp_path / "backup"
    with running_backup(kafka_conf, unique_name, site):
        wait_until(
            lambda: read_images(site) == primary, 90 + crashes, "the backup equal to the primary"
        )
    record(
        f"fsync loss: primary ({crashes} crashes)",
        faults=run.cuts,
        checked=run.acked,
        violations=0,
        checked_what="acked writes; per crash: no ts reissued, durable sectors kept, "
        "log image == primary after republish; backup converges",
        seconds=time.monotonic() - t0,
        seed=seed,
        flushes=run.flushes,
        sync_acks=run.sync_acks,
        open_cuts=run.open_cuts,
    )
