"""The applier under fsync loss: a checkpoint is never ahead of its data.

Tries to break: a checkpoint written before the images it covers are synced, an image file
or catalog whose name no directory fsync made durable, a torn checkpoint file read back as
valid, a W after recovery below one a checkpoint reported durable, a restart that does not
converge to the cut. One CG log (real interceptor, real Kafka) is applied by a fresh site
per crash; the shim cuts the power at a random file operation of the applier (images,
catalog, checkpoint, lock), keeps only what was synced plus a seeded subset of the rest
(one write torn); then, on the disk as the crash left it:

- the checkpoint W read back is >= the last W a checkpoint reported durable,
- the images hold every extent with ts <= that W (bytes no later op touched equal the cut),
- a restarted applier converges to the cut at the final W, byte for byte.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.kafka.config import KafkaConnection
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.backup.checkpointer import Checkpointer
from pipeline.errors import LowmarkError
from pipeline.site import SiteDir
from schemas.records import Checkpoint
from tests.fsloss.logs import Log, ahead_of_data, diverged, make_log
from tests.fsloss.shim import FsLoss
from tests.kafka_helpers import unique
from tests.torture_summary import record

pytestmark = pytest.mark.kafka


def life(log: Log, kafka_conf: dict[str, Any], site: str, data_dir: Path, fs: FsLoss,
         reported: list[int], *, fresh: bool, crash_after_report: int | None = None,
         timeout_s: float = 60.0) -> Applier:  # fmt: skip
    """Run an applier until the power is cut or it checkpointed the final W.

    ``crash_after_report=k``: cut the power k file operations after the first checkpoint
    reported durable (a crash point drawn over the whole run can fall, for every life,
    before the first background checkpoint finished, when a loaded machine slows it).

    ``fresh``: the site's first life is one that started before the log's W's were
    published, as a site following a live CG does: with no checkpoint and empty images it
    has nothing to re-apply, so it checkpoints W after W. (A restart keeps the applier's
    own floor: it may not checkpoint below a W published before it started.)"""
    ap = Applier(
        ApplierConfig(cg=log.cg, site=site, data_dir=data_dir, checkpoint_interval_s=0.001),
        kafka_conf,
    )
    written = ap._checkpoint_written

    def noted(rec: Checkpoint) -> None:
        written(rec)
        reported.append(rec.w)  # reported durable: the applier commits offsets on it
        if crash_after_report is not None and len(reported) == 1:
            fs.crash_at = fs.ops + crash_after_report

    ap._checkpoint_written = noted  # type: ignore[method-assign]
    deadline = time.monotonic() + timeout_s
    try:
        ap.start()
        if ap._wm is not None:
            # one W per step, so a life checkpoints W after W (as an applier following a
            # live CG does) instead of applying the whole log under its first checkpoint
            consume = ap._wm.consume
            ap._wm.consume = lambda n, t: consume(1, t)  # type: ignore[method-assign]
        if fresh:
            ap._wm_end_at_start = 0
        while not fs.cut.is_set() and ap.checkpoint_w < log.final_w:
            assert time.monotonic() < deadline, f"site {site} did not converge: {ap.stats}"
            ap.step()
    except (OSError, LowmarkError):
        if not fs.cut.is_set():
            raise
    return ap


def abandon(ap: Applier) -> None:
    """A dead process: no checkpoint, no clean close; only what the OS would free."""
    ap.roles.stop()
    if ap._bg is not None:
        ap._bg[0].join(30)  # it fails on the dead disk; it must not outlive the cut
    if ap.site is not None:
        ap.site.close()
    ap.lock.release()
    ap._close_consumers()
    ap._producer = None


def durable_w(data_dir: Path, log: Log, kafka_conf: dict[str, Any], site: str) -> int:
    ck = Checkpointer(log.cg, site, SiteDir(data_dir).checkpoint_path, kafka_conf, None)  # type: ignore[arg-type]
    got = ck.load()
    return got.w if got is not None else 0


def crash_runs(log: Log, kafka_conf: dict[str, Any], tmp_path: Path, crashes: int,
               seed: int) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(seed)
    out: dict[str, Any] = {"violations": [], "checkpoints_reported": 0, "cuts": 0,
                           "cuts_after_report": 0}  # fmt: skip
    # calibration: how many file operations a whole uncrashed apply takes
    cal = tmp_path / "cal"
    cal_fs = FsLoss(cal, seed)
    with cal_fs:
        life(log, kafka_conf, "cal", cal, cal_fs, [], fresh=True).close()
    full = cal_fs.ops
    out["ops_per_apply"] = full
    for i in range(crashes):
        site, data_dir = f"s{i}", tmp_path / f"s{i}"
        after = rng.randint(1, 30) if i % 4 == 3 else None  # every 4th: after a report
        at = None if after else rng.randint(1, full)
        fs = FsLoss(data_dir, seed * 100_003 + i, keep_share=rng.choice([0.0, 0.0, 0.5, 0.9]),
                    tear=rng.random() < 0.5, crash_at=at)  # fmt: skip
        reported: list[int] = []
        with fs:
            ap = life(log, kafka_conf, site, data_dir, fs, reported, fresh=True,
                      crash_after_report=after)  # fmt: skip
            if not fs.cut.is_set():
                try:
                    ap.close()  # its last checkpoint may be where the power goes
                except (OSError, LowmarkError):
                    if not fs.cut.is_set():
                        raise
            if fs.cut.is_set():
                out["cuts"] += 1
                out["cuts_after_report"] += bool(reported)
                abandon(ap)
            report = fs.crash()
            out["checkpoints_reported"] += len(reported)
            w = durable_w(data_dir, log, kafka_conf, site)
            tag = f"seed {seed} crash {i} (keep {fs.keep_share}, tear {fs.tear}, {report})"
            if reported and w < max(reported):
                out["violations"].append(f"{tag}: W {w} after recovery < reported {max(reported)}")
            out["violations"] += [f"{tag}: {v}" for v in ahead_of_data(log, w, data_dir)]
            ap = life(log, kafka_conf, site, data_dir, fs, [], fresh=False)
            ap.close()
            out["violations"] += [f"{tag}: {v}" for v in diverged(log, data_dir)]
    return out


@pytest.fixture(scope="module")
def one_log(kafka, tmp_path_factory) -> Log:
    """One CG log for every crash of the module (``kafka_conf`` is per test: a connection
    of the module's own, from the session's cluster)."""
    conf = KafkaConnection(kafka.bootstrap_servers, client_id="lowmark-test").librdkafka()
    cg = unique("fsloss-applier")
    return make_log(conf, cg, tmp_path_factory.mktemp("primary"), seed=16, writes=160)


@pytest.mark.parametrize(
    ("crashes", "seed"),
    [
        pytest.param(20, 1, id="short"),
        pytest.param(500, 2, id="long", marks=[pytest.mark.torture, pytest.mark.timeout(3000)]),
    ],
)
def test_applier_fsync_loss(one_log, kafka_conf, tmp_path, crashes, seed):
    t0 = time.monotonic()
    out = crash_runs(one_log, kafka_conf, tmp_path, crashes, seed)
    assert not out["violations"], "\n".join(out["violations"][:20])
    drawn = crashes - crashes // 4  # the lives whose crash point was drawn over the run
    assert out["cuts"] >= drawn * 0.8, f"most runs ended before their crash point: {out}"
    assert out["cuts_after_report"] > 0, f"no crash after a reported checkpoint: {out}"
    record(
        f"fsync loss: applier ({crashes} crashes)",
        faults=out["cuts"],
        checked=crashes,
        violations=0,
        checked_what="recoveries: checkpoint W >= reported, images hold the checkpoint's "
        "cut, restart converges byte for byte",
        seconds=time.monotonic() - t0,
        seed=seed,
        ops_per_apply=out["ops_per_apply"],
        checkpoints_reported=out["checkpoints_reported"],
        watermarks=one_log.watermarks,
    )
