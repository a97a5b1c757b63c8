"""``lowmark pause`` / ``resume`` and a paused site's failover, on a real broker.

Tries to break: a paused site whose images move anyway, or whose checkpoint claims what its
images do not hold; a resume that ends on other bytes than the log's; a failover of a
paused site that reads the backlog from Kafka again (its first read would wait for it), or
that serves other bytes than the cut; a running applier that will not give the site up; an
applier killed -9 while paused, whose half-written stage a failover then trusts.

The reference images come from the tests' own replay of the log (``rebuild_from_log``);
the failover's bytes are read by nbdcopy.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time

import pytest

from pipeline.backup import pause as control
from pipeline.backup import staging
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir, SiteLock
from tests.kafka_helpers import unique
from tests.ops.test_ops_tools import FAST, _workload
from tests.oracles import first_difference, read_image
from tests.prereqs import require_tools
from tests.replication_helpers import read_log, rebuild_from_log, running_backup, wait_until
from tests.system.failover_helpers import (
    SITE,
    ApplyProcess,
    FailoverProcess,
    lowmark,
    make_site,
    nbd_copy,
    published_w,
)

pytestmark = pytest.mark.tools

SIZES = {"a": 2 << 20, "b": 1 << 20}


def _indexed(out: str) -> dict[str, int]:
    line = next(x for x in out.splitlines() if "backlog indexed" in x)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def _staged_w(site: SiteDir) -> int:
    w = staging.staged_w(site)
    return -1 if w is None else w


def _check_images(fo: FailoverProcess, want: dict[str, bytearray], tmp) -> None:  # type: ignore[no-untyped-def]
    for vid in SIZES:
        got = nbd_copy(fo.uri(vid), tmp / "copy.raw")
        assert got == bytes(want[vid]), f"{vid}: " + first_difference(got, want[vid])


def test_a_paused_sites_failover_indexes_its_stage_and_serves_the_cut(kafka_conf, tmp_path):
    require_tools("nbdcopy")
    cg = unique("fopause")
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=40, backlog_writes=300, seed=11,
        paused=True,
    )  # fmt: skip
    try:
        assert scene.applier is not None
        site = SiteDir(scene.site_dir)
        ckpt = site.checkpoint_path.read_bytes()
        wait_until(lambda: _staged_w(site) >= scene.w, 60, "the stage to reach W")
        assert site.checkpoint_path.read_bytes() == ckpt, "a paused site checkpointed"
        want = {v: bytearray(b) for v, b in scene.reference(scene.w).items()}
        records = len(read_log(kafka_conf, cg))
        fo = FailoverProcess(scene, "--force", "--rollforward-rate", "1MiB")
        try:
            fo.wait_for("serving")
            # the applier handed the site over by itself: a clean exit, stage marked
            assert scene.applier.wait(30) == 0, scene.applier.output()
            assert "handing the site over" in scene.applier.output()
            assert "site handed over" in fo.output()
            n = _indexed(fo.output())
            assert n["staged_ops"] > 0 and n["staged_bytes"] > 0, fo.output()
            # only the tail past the stage's last mark came from Kafka
            assert n["records"] < records // 4, (n, records)
            assert "rolled forward" not in fo.output(), "the roll-forward ended too soon"
            _check_images(fo, want, tmp_path)  # mid roll-forward: index over images
            fo.wait_for("rolled forward", 120)
            _check_images(fo, want, tmp_path)
            assert not staging.stage_dir(site).exists(), "the stage outlived the roll-forward"
            assert not control.is_set(site, control.PAUSED)
        finally:
            assert fo.stop() == 0, fo.output()
    finally:
        scene.applier = None
        scene.close()


@pytest.mark.parametrize("seed", range(3))
def test_an_applier_killed_while_paused_leaves_a_stage_the_failover_trusts_only_to_its_mark(
    kafka_conf, tmp_path, seed
):
    """kill -9 mid-backlog: the stage holds what was marked before; the rest of the
    backlog is read from Kafka, and the failover's images are the cut all the same."""
    require_tools("nbdcopy")
    rng = random.Random(seed)
    killed = threading.Event()
    site = SiteDir(tmp_path / SITE)

    def arm_killer() -> None:  # make_site runs it once the applier paused, before the backlog
        pid = SiteLock(site).holder_pid()
        assert pid is not None and pid != os.getpid(), "the lock names no applier process"
        marks = rng.randint(1, 3)  # kill after this many new marks (or after 10 s)

        def killer() -> None:
            seen, t0 = [_staged_w(site)], time.monotonic()
            while len(seen) <= marks and time.monotonic() - t0 < 10:
                w = _staged_w(site)
                if w > seen[-1]:
                    seen.append(w)
                time.sleep(0.002)
            with contextlib.suppress(ProcessLookupError):  # the assert below says why
                os.kill(pid, signal.SIGKILL)
                killed.set()

        threading.Thread(target=killer, daemon=True).start()

    scene = make_site(
        kafka_conf, unique("fopausekill"), tmp_path, sizes=SIZES, applied_writes=20,
        backlog_writes=400, seed=20 + seed, paused=True, before_backlog=arm_killer,
    )  # fmt: skip
    try:
        assert killed.wait(30), "the applier was not killed:\n" + (
            scene.applier.output() if scene.applier else ""
        )
        assert scene.applier is not None and scene.applier.wait(30) == -signal.SIGKILL
        staged, why = staging.load(site, site.checkpoint_path.read_bytes())
        assert staged is not None, f"the killed applier's stage is refused: {why}"
        want = {v: bytearray(b) for v, b in scene.reference(scene.w).items()}
        fo = FailoverProcess(scene, "--force")
        try:
            fo.wait_for("rolled forward", 120)
            n = _indexed(fo.output())
            assert n["staged_ops"] == len(staged.rows), (n, len(staged.rows))
            # W goes on rising after the last write (idle ticks): a stage marked past every
            # write has nothing left to read, so only a write past the mark proves the path
            if any(staged.w < t <= scene.w for t in scene.write_ts):
                assert n["records"] > 0, "the backlog past the stage was not read from Kafka"
            _check_images(fo, want, tmp_path)
        finally:
            assert fo.stop() == 0, fo.output()
    finally:
        scene.applier = None
        scene.close()


def test_a_running_applier_hands_the_site_over_with_a_checkpoint(kafka_conf, tmp_path):
    """Not paused: the failover asks, the applier checkpoints and exits 0; no stage."""
    require_tools("nbdcopy")
    cg = unique("fohand")
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=30, backlog_writes=60, seed=5
    )
    try:
        applier = ApplyProcess(scene)
        site = SiteDir(scene.site_dir)
        wait_until(
            lambda: "applier started" in applier.output() and _ckpt_w(site) >= scene.w,
            60,
            "the applier to catch up to W",
        )
        want = {v: bytearray(b) for v, b in scene.reference(scene.w).items()}
        fo = FailoverProcess(scene, "--force")
        try:
            fo.wait_for("rolled forward", 120)
            assert applier.wait(30) == 0, applier.output()
            assert "site handed over" in fo.output()
            assert _indexed(fo.output())["staged_ops"] == 0
            _check_images(fo, want, tmp_path)
        finally:
            assert fo.stop() == 0, fo.output()
    finally:
        scene.close()


def _ckpt_w(site: SiteDir) -> int:
    from pipeline.backup.checkpointer import decode_checkpoint

    try:
        return decode_checkpoint(site.checkpoint_path.read_bytes()).w
    except FileNotFoundError:
        return -1


def test_pause_holds_the_images_and_resume_applies_the_stage(kafka_conf, unique_name, tmp_path):
    """Through `lowmark pause` / `lowmark resume` against a running applier."""
    sizes = {"v": 1 << 20}
    rng = random.Random(7)
    site_dir = tmp_path / "site"
    args = ["--bootstrap-servers", kafka_conf["bootstrap.servers"], "--cg", unique_name,
            "--site", SITE, "--data-dir", str(site_dir)]  # fmt: skip
    ts: list[int] = []
    with (
        ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg,
        running_backup(
            kafka_conf, unique_name, site_dir, site=SITE, checkpoint_interval_s=0.05
        ) as (_wm, ap),
    ):
        cg.create_volume("v", sizes["v"])
        _workload(cg, rng, 30, ts)
        cg.flush()
        wait_until(lambda: ap.service.applied_w >= max(ts), 30, "the first writes applied")
        done = lowmark("pause", *args)
        assert done.returncode == 0 and "paused" in done.stdout, done.stderr
        site = SiteDir(site_dir)
        held_ckpt = site.checkpoint_path.read_bytes()
        held = read_image(site.image_path("v"), sizes["v"])
        held_w = ap.service.checkpoint_w
        _workload(cg, rng, 80, ts)
        cg.flush()
        wait_until(lambda: published_w(kafka_conf, unique_name) >= max(ts), 30, "W")
        wait_until(lambda: ap.service.applied_w >= max(ts), 30, "the backlog staged")
        m = ap.service.metrics()
        assert m["paused"] and m["staged_bytes"] > 0 and m["staged_w"] >= held_w
        time.sleep(0.3)  # several checkpoint intervals: none may be written
        assert read_image(site.image_path("v"), sizes["v"]) == held, "paused images moved"
        assert site.checkpoint_path.read_bytes() == held_ckpt, "a paused site checkpointed"
        assert rebuild_from_log(read_log(kafka_conf, unique_name), sizes, upto_ts=held_w)[
            "v"
        ] == bytearray(held), "the held images are not the checkpoint's cut"
        done = lowmark("resume", *args)
        assert done.returncode == 0 and "stage is applied" in done.stdout, done.stderr
        w = ap.service.applied_w
        wait_until(lambda: ap.service.checkpoint_w >= w, 30, "a checkpoint after resume")
        want = rebuild_from_log(read_log(kafka_conf, unique_name), sizes, upto_ts=w)["v"]
        got = read_image(site.image_path("v"), sizes["v"])
        assert got == bytes(want), first_difference(got, want)
        assert not staging.stage_dir(site).exists()
