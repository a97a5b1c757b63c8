"""``lowmark failback --source-dir`` after an unplanned failover, on a real broker.

Tries to break: a resync that copies more than the diverged regions (or reads a volume
whole in DELTA mode), one whose images are not exactly generation 1 at its W1 (while the
new primary keeps writing through NBD during the copy), a threshold that does not switch a
heavily diverged volume to a full copy, a resync killed -9 at random instants that does not
converge on a re-run or leaves a checkpoint the images do not match (or lets `lowmark
apply` start on a half-synced site), and the round trip:
the resynced site follows generation 1 with `lowmark apply` and takes the role back with
`lowmark switchover`.

The reference images come from the tests' own replay of both generations' logs.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.ops.resync import ResyncConfig, in_progress, resync
from pipeline.ops.resync_plan import Mode
from pipeline.site import SiteDir
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.records import Checkpoint
from tests.kafka_helpers import unique
from tests.oracles import first_difference
from tests.prereqs import require_tools
from tests.replication_helpers import ServiceThread, read_log, wait_until
from tests.system.failover_helpers import REPO, FailoverProcess, lowmark, nbd_copy
from tests.system.resync_helpers import RB, Writer, build, images_of

pytestmark = pytest.mark.tools

SIZES = {"a": 16 << 20, "b": 1 << 20}


def _same(got: dict[str, bytes], want: dict[str, bytearray], what: str) -> None:
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for vid in want:
        diff = first_difference(bytes(want[vid]), got[vid])
        assert not diff, f"{what}: volume {vid}: {diff}"


def _checkpoint(site_dir) -> Checkpoint | None:
    path = SiteDir(site_dir).checkpoint_path
    if not path.exists():
        return None
    ckpt = codec.decode(path.read_bytes(), (Checkpoint,))
    assert isinstance(ckpt, Checkpoint)
    return ckpt


@pytest.mark.parametrize(("mib", "round_trip"), [(0.5, False), (2, True)])
def test_failback_copies_the_divergence_only_and_lands_on_w1(kafka_conf, tmp_path, mib, round_trip):
    require_tools("qemu-io", "nbdcopy")
    cg = unique("resync")
    n = int(mib * (1 << 20))
    rs = build(kafka_conf, cg, tmp_path, sizes=SIZES, above_cut=n // 2, unreplicated=n // 2,
               seed=int(mib * 10))  # fmt: skip
    ap: ServiceThread | None = None
    try:
        rs.write_new(n, ["a"])
        rs.write_new(800 << 10, ["b"])  # most of b's 16 regions: above the threshold
        writer = Writer(rs, volumes=["a"])  # the new primary's clients keep writing
        try:
            time.sleep(0.3)
            result = resync(
                kafka_conf, cg, "prod", rs.prod_dir, rs.new_dir,
                ResyncConfig(region_bytes=RB, full_copy_threshold=0.5, reflink=False),
            )  # fmt: skip
        finally:
            writer.join()
        plan = {v.volume_id: v for v in result.plan.volumes}
        assert plan["a"].mode is Mode.DELTA and plan["b"].mode is Mode.FULL, result.plan
        assert writer.rounds >= 1
        # copied and read: the diverged regions at the granularity, never volume a whole
        known = len(rs.diverged["a"]) * RB
        assert plan["a"].planned_bytes <= 1.1 * known, (plan["a"].planned_bytes, known)
        assert plan["a"].planned_bytes >= len(rs.diverged["a"]) * RB * 0.5
        assert result.bytes_read <= plan["a"].planned_bytes + SIZES["b"]
        assert result.bytes_read < SIZES["a"]
        ckpt = result.checkpoint
        assert ckpt.generation == 1 and ckpt.site == "prod"
        assert _checkpoint(rs.prod_dir) == ckpt
        assert in_progress(rs.prod_dir) is None
        _same(images_of(rs.prod_dir), rs.reference(ckpt.w), "prod after the resync")
        if not round_trip:
            return
        # prod follows generation 1 from the checkpoint
        ap = ServiceThread(
            Applier(
                ApplierConfig(cg=cg, site="prod", data_dir=rs.prod_dir, checkpoint_interval_s=0.05),
                kafka_conf,
            ),
            "applier-prod",
        ).start()
        rs.write_new(256 << 10)
        gen1 = read_log(kafka_conf, cg, generation=1)
        last = max(x["ts"] for t, rec, _p, _o in gen1 if t == "Write" for x in rec["extents"])
        wait_until(lambda: ap.service.applied_w >= last or ap.error, 60, "prod to apply gen 1")
        ap.stop()
        ap = None
        _same(images_of(rs.prod_dir), rs.reference(last), "prod following generation 1")
        # and the role goes back: dr1's primary drains, prod takes over
        back = FailoverProcess(
            rs.scene, tag="to-prod", sub="switchover", site="prod", site_dir=rs.prod_dir
        )
        try:
            back.wait_for("rolled forward")
            rs.fo.proc.wait(60)
            want = rs.reference(last)
            for vid in SIZES:
                got = nbd_copy(back.uri(vid), tmp_path / f"{vid}.raw")
                assert not first_difference(bytes(want[vid]), got), vid
        finally:
            assert back.stop() == 0, back.output()
        roles = RolesStore(kafka_conf).latest(cg)
        assert roles is not None and roles.generation == 2 and roles.primary_site == "prod"
    finally:
        if ap is not None:
            ap.stop(check=False)
        rs.close()


def test_resync_yields_to_the_new_primarys_writes_down_to_its_floor(kafka_conf, tmp_path):
    """--min-rate/--max-rate with the foreground measured off generation 1's log: while the
    new primary's clients write, the copy's limit drops below --max-rate, never below the
    floor, and the line says so."""
    require_tools("qemu-io")
    cg = unique("resyncfg")
    rs = build(kafka_conf, cg, tmp_path, sizes=SIZES, above_cut=256 << 10,
               unreplicated=256 << 10, seed=7)  # fmt: skip
    lines: list[str] = []
    max_rate, min_rate = 4 << 20, 256 << 10
    try:
        rs.write_new(1 << 20, ["a"])
        writer = Writer(rs, volumes=["a"])
        try:
            time.sleep(0.5)
            resync(
                kafka_conf, cg, "prod", rs.prod_dir, rs.new_dir,
                ResyncConfig(region_bytes=RB, reflink=False, max_rate=max_rate,
                             min_rate=min_rate, progress_interval_s=0.2),
                on_line=lines.append,
            )  # fmt: skip
        finally:
            writer.join()
        copying = [ln for ln in lines if ln.startswith("resync copy")]
        found = map(re.compile(r"limit ([0-9.]+) MB/s, foreground ([0-9.]+)").search, copying)
        limits = [(float(m.group(1)) * 1e6, float(m.group(2)) * 1e6) for m in found if m]
        assert limits and len(limits) == len(copying), lines
        assert all(min_rate - 1e4 <= lim <= max_rate + 1e4 for lim, _fg in limits), limits
        # the writer wrote during the copy: some sample saw it and took the limit down
        busy = [(lim, fg) for lim, fg in limits if fg > 0]
        assert busy, f"no sample saw the new primary's writes: {lines}"
        for lim, fg in busy:
            assert lim == pytest.approx(max(min_rate, max_rate - fg), abs=2e4), (lim, fg)
        assert min(lim for lim, _fg in busy) < max_rate - 1e4, limits
    finally:
        rs.close()


def _failback_cmd(kafka_conf, cg, rs, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.app.cli", "failback",
        "--bootstrap-servers", kafka_conf["bootstrap.servers"], "--cg", cg,
        "--site", "prod", "--data-dir", str(rs.prod_dir), "--source-dir", str(rs.new_dir),
        *extra,
    ]  # fmt: skip


def _kill9_converges(kafka_conf, tmp_path, seed: int, kills: int) -> None:
    require_tools("qemu-io")
    rng = random.Random(seed)
    cg = unique("resynck")
    rs = build(kafka_conf, cg, tmp_path, sizes=SIZES, above_cut=512 << 10,
               unreplicated=256 << 10, seed=seed)  # fmt: skip
    try:
        rs.write_new(1 << 20, ["a"])
        # slow enough that a kill lands in the copy, the wait for W1, the catch-up or install
        args = ("--max-rate", "1MiB", "--region-bytes", "64KiB")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        base = ["--bootstrap-servers", kafka_conf["bootstrap.servers"], "--cg", cg,
                "--site", "prod", "--data-dir", str(rs.prod_dir)]  # fmt: skip
        no_source = lowmark("failback", *base)  # after a failover, a copy is needed
        assert no_source.returncode != 0 and "--source-dir" in no_source.stderr
        phases: list[str] = []  # where each kill left an open resync
        for i in range(kills):
            log = open(tmp_path / f"fb{i}.log", "wb")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(_failback_cmd(kafka_conf, cg, rs, *args), cwd=REPO,
                                    env=env, stdout=log, stderr=log)  # fmt: skip
            time.sleep(rng.uniform(0.8, 3.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            log.close()
            state = in_progress(rs.prod_dir)
            if state is not None:
                phases.append(str(state.get("phase", "plan")))
                if len(phases) == 1:  # a half-synced site is no backup
                    apply = lowmark("apply", *base)
                    assert apply.returncode != 0 and "resyncing" in apply.stderr, apply.stderr
                    # and status says so, with what is left and how to continue
                    shown = lowmark("status", *base[:4], "--data-dir", str(rs.prod_dir))
                    assert shown.returncode == 0, shown.stderr
                    assert "RESYNC" in shown.stdout and "not a backup" in shown.stdout, shown.stdout
                    assert f"phase {phases[0]}" in shown.stdout, (phases, shown.stdout)
            ckpt = _checkpoint(rs.prod_dir)
            if ckpt is not None:  # a checkpoint is only ever one the images match
                assert in_progress(rs.prod_dir) is None, "a checkpoint beside an open resync"
                _same(images_of(rs.prod_dir), rs.reference(ckpt.w), f"after kill {i}")
                break
        done = subprocess.run(_failback_cmd(kafka_conf, cg, rs, *args), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "is a backup of CG" in done.stdout, done.stdout
        said = done.stdout + done.stderr
        said += "".join((tmp_path / f"fb{k}.log").read_text() for k in range(i + 1))
        # the run that finished printed its plan (unless killed between its end and print)
        assert ("a: delta" in said and "copied" in said) or "already" in done.stdout, said
        assert "resync copy:" in said and "MB/s" in said and "ETA" in said, said
        ckpt = _checkpoint(rs.prod_dir)
        assert ckpt is not None and in_progress(rs.prod_dir) is None
        _same(images_of(rs.prod_dir), rs.reference(ckpt.w), "after the kills")
        assert phases, "no kill landed inside the resync: the test proved nothing"
        print(f"seed {seed}: kills left the resync in {phases}")
    finally:
        rs.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_failback_killed_at_random_instants_resumes_and_converges(kafka_conf, tmp_path, seed):
    _kill9_converges(kafka_conf, tmp_path, seed, kills=3)


@pytest.mark.torture
@pytest.mark.parametrize("seed", range(100, 120))
def test_failback_kill9_torture(kafka_conf, tmp_path, seed):
    _kill9_converges(kafka_conf, tmp_path, seed, kills=6)
