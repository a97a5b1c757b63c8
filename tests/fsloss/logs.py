"""One CG log for many fsync-loss crashes, and the oracles that judge a site against it.

``make_log`` writes a CG through the real interceptor (writes, zeroes, trims over two
volumes, spread over many W's by a running watermark service) and returns the log as read
back from Kafka: every crash of a torture run then applies the same log, so a crash costs
one applier start, not a new CG.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from tests.replication_helpers import (
    FAST,
    ServiceThread,
    log_ops,
    read_log,
    wait_until,
    watermark_history,
)

SIZES = {"a": 512 << 10, "b": 256 << 10}


@dataclass
class Log:
    cg: str
    #: (ts, volume, offset, data) in ts order; data None: the volume's CREATE
    ops: list[tuple[int, str, int, bytes | None]]
    final_w: int
    watermarks: int

    def images_at(self, w: int) -> dict[str, bytearray]:
        out = {v: bytearray(n) for v, n in SIZES.items()}
        for ts, vid, off, data in self.ops:
            if ts <= w and data is not None:
                out[vid][off : off + len(data)] = data
        return out

    def created_by(self, w: int) -> set[str]:
        return {vid for ts, vid, _o, data in self.ops if data is None and ts <= w}


def make_log(kafka_conf: dict[str, Any], cg: str, data_dir: Path, seed: int, writes: int) -> Log:
    rng = random.Random(seed)
    wm = ServiceThread(
        WatermarkService(WatermarkServiceConfig(cg=cg, liveness_timeout_s=30), kafka_conf),
        "watermark",
    ).start()
    try:
        with ConsistencyGroup.open(cg, data_dir, kafka_conf, **FAST) as pcg:
            for vid, n in SIZES.items():
                pcg.create_volume(vid, n)
            for i in range(writes):
                vid = rng.choice(list(SIZES))
                vol = pcg.volume(vid)
                n = rng.choice([512, 4096, 8192, 65536])
                off = rng.randrange(0, SIZES[vid] - n) // 512 * 512
                r = rng.random()
                if r < 0.08:
                    vol.write_zeroes(off, n)
                elif r < 0.12:
                    vol.trim(off, n)
                else:
                    vol.write(off, rng.randbytes(n))
                if i % 8 == 0:
                    time.sleep(0.03)  # spread the writes over many W's
            pcg.flush()
        ops = log_ops(read_log(kafka_conf, cg))
        last = ops[-1][0]
        wait_until(
            lambda: max((w["w"] for _o, w in watermark_history(kafka_conf, cg)), default=0) >= last,
            60,
            "W past the last write",
        )
    finally:
        wm.stop()
    history = watermark_history(kafka_conf, cg)
    return Log(cg, ops, max(w["w"] for _o, w in history), len(history))


def read_site(site: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for vid in SIZES:
        path = SiteDir(site).image_path(vid)
        out[vid] = path.read_bytes() if path.exists() else None
    return out


def ahead_of_data(log: Log, w: int, site: Path) -> list[str]:
    """Where the images lack an extent with ts <= ``w`` (the checkpoint's W): each byte no op
    above ``w`` touched must hold the cut's byte; a byte one touched may hold any version."""
    expect = log.images_at(w)
    got = read_site(site)
    found = []
    for vid in sorted(log.created_by(w)):
        data = got[vid]
        if data is None:
            found.append(f"volume {vid} created at or below W={w} has no image file")
            continue
        have = bytearray(data[: SIZES[vid]].ljust(SIZES[vid], b"\0"))
        want = expect[vid]
        for ts, v, off, d in log.ops:
            if ts > w and v == vid and d is not None:
                have[off : off + len(d)] = want[off : off + len(d)] = bytes(len(d))
        if have != want:
            at = next(i for i in range(len(want)) if have[i] != want[i])
            found.append(f"volume {vid} differs from the cut at W={w} at byte {at}")
    return found


def diverged(log: Log, site: Path) -> list[str]:
    """Where a converged site differs from the cut at the log's final W."""
    expect = log.images_at(log.final_w)
    got = read_site(site)
    return [
        f"volume {vid}: image {'missing' if got[vid] is None else 'differs'} at W={log.final_w}"
        for vid in SIZES
        if got[vid] != bytes(expect[vid])
    ]
