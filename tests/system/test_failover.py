"""``lowmark failover`` on a real broker, read and written through real NBD clients.

Tries to break: a read during the roll-forward that is not the cut's byte (indexed and
unindexed ranges alike), a write during the roll-forward that the roll-forward then
overwrites, a failover killed -9 at a random point that, run again, bumps the generation
twice, loses an acknowledged write or ends with images other than the cut's, a cut at a
marker or a ts that is not exactly that cut, and a failover that starts with the site's
applier still running.

The reference images come from the tests' own replay of the log (``rebuild_from_log``);
the bytes are read by qemu-io and nbdcopy.
"""

from __future__ import annotations

import random
import time

import pytest

from pipeline.topology.store import RolesStore
from tests.kafka_helpers import unique
from tests.oracles import first_difference
from tests.prereqs import require_tools
from tests.replication_helpers import read_log
from tests.system.failover_helpers import (
    SITE,
    FailoverProcess,
    make_site,
    nbd_copy,
    nbd_read,
    nbd_write,
)

pytestmark = pytest.mark.tools

SIZES = {"a": 2 << 20, "b": 1 << 20}


def _writes_of(records: list, vid: str) -> list[tuple[int, int]]:
    out = []
    for t, rec, _p, _o in records:
        if t == "Write" and rec["volume_id"] == vid:
            out.extend((x["offset"], len(x["data"])) for x in rec["extents"])
    return out


def test_reads_during_roll_forward_are_the_cut_and_writes_survive_it(kafka_conf, tmp_path):
    require_tools("qemu-io", "nbdcopy", "nbdinfo")
    cg = unique("fo")
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=60, backlog_writes=400, seed=1
    )
    try:
        want = {v: bytearray(b) for v, b in scene.reference(scene.w).items()}
        backlog = read_log(kafka_conf, cg)
        # slow the roll-forward so the reads below happen while it runs
        fo = FailoverProcess(scene, "--force", "--rollforward-rate", "256KiB")
        try:
            fo.wait_for("serving")
            # reads spread over indexed (backlog writes) and unindexed ranges
            rng = random.Random(5)
            for vid, size in SIZES.items():
                spots = rng.sample(_writes_of(backlog, vid), 10)
                spots += [(rng.randrange(0, size - 4096) // 512 * 512, 4096) for _ in range(5)]
                for off, n in spots:
                    got = nbd_read(fo.uri(vid), off, n)
                    assert got == bytes(want[vid][off : off + n]), f"{vid}@{off}+{n}"
            # writes during the roll-forward: one over a backlog range, one elsewhere
            fo.wait_for("new primary started")
            w_off = _writes_of(backlog, "a")[-1][0] // 512 * 512
            for vid, off, pat in (("a", w_off, 0xA5), ("b", 4096, 0x5A)):
                assert nbd_write(fo.uri(vid), off, 65536, pat), fo.output()
                want[vid][off : off + 65536] = bytes([pat]) * 65536
            assert "rolled forward" not in fo.output(), "the roll-forward ended too soon"
            for vid in SIZES:  # the whole volume, mid roll-forward
                got = nbd_copy(fo.uri(vid), tmp_path / "copy.raw")
                assert got == bytes(want[vid]), f"{vid}: " + first_difference(got, want[vid])
            fo.wait_for("rolled forward", 120)
            for vid in SIZES:
                got = nbd_copy(fo.uri(vid), tmp_path / "copy.raw")
                assert got == bytes(want[vid]), f"{vid}: " + first_difference(got, want[vid])
        finally:
            assert fo.stop() == 0, fo.output()
        roles = RolesStore(kafka_conf).latest(cg)
        assert roles is not None and roles.generation == 1 and roles.primary_site == SITE
        assert roles.base_w == scene.w and roles.history[-1].forced
        gen1 = read_log(kafka_conf, cg, generation=1)
        wrote = {(rec["volume_id"], x["offset"]) for t, rec, _p, _o in gen1 if t == "Write"
                 for x in rec["extents"]}  # fmt: skip
        assert {("a", w_off), ("b", 4096)} <= wrote
        assert all(x["ts"] > scene.w for t, rec, _p, _o in gen1 if t == "Write"
                   for x in rec["extents"])  # fmt: skip
    finally:
        scene.close()


@pytest.mark.parametrize("how", ["marker", "ts"])
def test_failover_at_a_marker_and_at_a_ts_is_exactly_that_cut(kafka_conf, tmp_path, how):
    require_tools("nbdcopy")
    cg = unique("foat")
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=40, backlog_writes=200, seed=2,
        marker_at=100,
    )  # fmt: skip
    try:
        if how == "marker":
            cut, args = scene.markers["m1"], ["--at-marker", "m1"]
        else:
            later = sorted(t for t in scene.write_ts if t > scene.site_w)
            cut = later[len(later) // 3]
            args = ["--at", str(cut)]
        assert scene.site_w < cut < scene.w
        want = scene.reference(cut)
        fo = FailoverProcess(scene, "--force", *args)
        try:
            fo.wait_for("rolled forward")
            for vid in SIZES:
                got = nbd_copy(fo.uri(vid), tmp_path / "copy.raw")
                assert got == bytes(want[vid]), f"{vid}: " + first_difference(got, want[vid])
        finally:
            assert fo.stop() == 0, fo.output()
        roles = RolesStore(kafka_conf).latest(cg)
        assert roles is not None and roles.base_w == cut
    finally:
        scene.close()


@pytest.mark.parametrize("seed", range(20))
def test_failover_killed_at_a_random_point_completes_when_run_again(kafka_conf, tmp_path, seed):
    require_tools("qemu-io", "nbdcopy")
    cg = unique(f"fok{seed}")
    sizes = {"a": 512 << 10, "b": 256 << 10}
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=sizes, applied_writes=20, backlog_writes=80, seed=seed
    )
    rng = random.Random(seed)
    try:
        want = {v: bytearray(b) for v, b in scene.reference(scene.w).items()}
        unsure: list[tuple[str, int, int]] = []  # writes in flight at a kill: either way
        kills = []
        for attempt in range(rng.randint(1, 3)):
            fo = FailoverProcess(
                scene, "--force", "--rollforward-rate", "128KiB", tag=f"k{attempt}"
            )
            delay = rng.uniform(0.2, 4.0)
            deadline = time.monotonic() + delay
            if rng.random() < 0.5:  # write once it takes writes, if that comes before the kill
                while time.monotonic() < deadline and "new primary started" not in fo.output():
                    time.sleep(0.02)
                if "new primary started" in fo.output() and fo.alive():
                    vid = rng.choice(sorted(sizes))
                    off = rng.randrange(0, sizes[vid] - 8192) // 512 * 512
                    pat = rng.randrange(1, 255)
                    if nbd_write(fo.uri(vid), off, 8192, pat):
                        want[vid][off : off + 8192] = bytes([pat]) * 8192
                    else:
                        unsure.append((vid, off, 8192))
            time.sleep(max(0.0, deadline - time.monotonic()))
            kills.append(round(time.monotonic() - fo.started, 2))
            fo.kill()
        fo = FailoverProcess(scene, "--force", tag="final")
        try:
            fo.wait_for("rolled forward")
            for vid in sizes:
                got = bytearray(nbd_copy(fo.uri(vid), tmp_path / "copy.raw"))
                ref = bytearray(want[vid])
                for uvid, off, n in unsure:
                    if uvid == vid:
                        got[off : off + n] = ref[off : off + n]
                assert got == ref, f"seed {seed}, kills at {kills} s, {vid}: " + first_difference(
                    bytes(got), bytes(ref)
                )
        finally:
            assert fo.stop() == 0, fo.output()
        roles = RolesStore(kafka_conf).latest(cg)
        assert roles is not None and roles.generation == 1, "a re-run bumped the generation again"
        assert len(roles.history) == 1 and roles.primary_site == SITE
    finally:
        scene.close()


def test_failover_refuses_while_the_sites_applier_runs_and_without_force(kafka_conf, tmp_path):
    cg = unique("fobusy")
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=10, backlog_writes=10, seed=3
    )
    try:
        from pipeline.site import SiteLock

        lock = SiteLock(scene.site_dir, "applier").acquire()  # what a running applier holds
        try:
            # a holder that never hands the site over (not an applier that reads the ask)
            fo = FailoverProcess(scene, "--force", "--handover-timeout-s", "1", tag="busy")
            try:
                assert fo.proc.wait(60) == 2
            finally:
                fo.kill()  # a failover that did not refuse must not outlive the test
            out = fo.output()
            assert "in use" in out and "its applier" in out, out
            assert "did not hand the site over within 1.0 s" in out, out
            assert not (scene.site_dir / "state" / "handover").exists(), "the ask was left"
        finally:
            lock.release()
        # the primary died (no tick for more than the liveness timeout): without --force
        # the failover refuses and says so
        time.sleep(1.5)
        fo = FailoverProcess(
            scene, tag="noforce", env={"LOWMARK_WATERMARK_LIVENESS_TIMEOUT_S": "1"}
        )
        try:
            assert fo.proc.wait(60) == 2
        finally:
            fo.kill()
        out = fo.output()
        assert "cannot be reached" in out and "--force" in out
        assert RolesStore(kafka_conf).latest(cg) is None, "a refused failover changed the roles"
    finally:
        scene.close()


def test_the_old_primary_never_gets_a_write_replicated_into_the_new_generation(
    kafka_conf, tmp_path
):
    """The old primary comes back after the failover: its `lowmark serve` refuses to start,
    and a raw producer with its transactional id gets records into the old generation's
    log, which the new generation's backup (a second site that kept applying through the
    failover) never applies: that site ends at the cut plus the new primary's writes."""
    require_tools("qemu-io", "nbdcopy")
    import subprocess
    import sys

    from connectors.kafka.producer import Producer
    from connectors.kafka.settings import InterceptorSettings
    from connectors.kafka.topics import CgTopics
    from pipeline.backup.applier import Applier, ApplierConfig
    from pipeline.site import SiteDir
    from schemas import codec
    from schemas.records import Write, WriteExtent
    from schemas.ts import make_ts
    from tests.oracles import read_image
    from tests.replication_helpers import ServiceThread, wait_until

    cg = unique("fosplit")
    dr2_dir = tmp_path / "dr2"
    dr2 = ServiceThread(
        Applier(ApplierConfig(cg=cg, site="dr2", data_dir=dr2_dir, checkpoint_interval_s=0.05),
                kafka_conf),
        "applier-dr2",
    )  # fmt: skip
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=40, backlog_writes=100, seed=4,
        generational=True, before_backlog=dr2.start,
    )  # fmt: skip
    try:
        want = {v: bytearray(b) for v, b in scene.reference(scene.w).items()}
        fo = FailoverProcess(scene, "--force")
        try:
            fo.wait_for("rolled forward")
            assert nbd_write(fo.uri("a"), 8192, 65536, 0x3C), fo.output()
            want["a"][8192 : 8192 + 65536] = b"\x3c" * 65536
            # the old primary restarted with its own config refuses to start
            old = subprocess.run(
                [sys.executable, "-m", "pipeline.app.cli", "serve",
                 "--bootstrap-servers", kafka_conf["bootstrap.servers"], "--cg", cg,
                 "--data-dir", str(scene.primary_dir), "--listen", "127.0.0.1:0"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert old.returncode == 2, old.stdout + old.stderr
            assert "generation 1" in old.stderr and "dr1" in old.stderr, old.stderr
            # a raw producer with the old primary's transactional id: Kafka takes the
            # record (into the old generation's log), nobody of generation 1 applies it
            tid = CgTopics(cg, 0).transactional_id("prod")
            p = Producer(InterceptorSettings(kafka_conf).producer(tid, "none"))
            p.init_transactions(30)
            p.begin_transaction()
            ts = make_ts(int(time.time() * 1e6) + 10_000_000, 0)
            stale = Write("b", "prod", 0, (WriteExtent(ts, 0, 65536, 0, 1, b"\xee" * 65536),))
            p.produce(CgTopics(cg, 0).log, codec.encode(stale), key=b"b",
                      headers=codec.headers_for(stale))  # fmt: skip
            p.commit_transaction(30)
            # dr2 applied generation 0 up to the cut, switched, and applies generation 1
            gen1 = read_log(kafka_conf, cg, generation=1)
            last = max(x["ts"] for t, rec, _p, _o in gen1 if t == "Write" for x in rec["extents"])
            wait_until(
                lambda: dr2.service.applied_w >= last or dr2.error, 60, "dr2 in generation 1"
            )
            dr2.check()
            time.sleep(1.0)  # time enough to (wrongly) apply the stale record
            site = SiteDir(dr2_dir)
            for vid, size in SIZES.items():
                got = read_image(site.image_path(vid), size)
                assert got == bytes(want[vid]), f"dr2 {vid}: " + first_difference(
                    got, bytes(want[vid])
                )
            # point-in-time restore across the generations: a cut in generation 1 is
            # generation 0 restored to the failover cut plus generation 1's log
            from pipeline.ops import restore as rs
            from tests.system.failover_helpers import published_w

            w1 = published_w(kafka_conf, cg, 1)
            out = rs.restore(kafka_conf, cg, w1, tmp_path / "r1")
            assert out.manifest["generation"] == 1
            assert out.manifest["base"]["kind"] == "generation-start"
            before = scene.write_ts[len(scene.write_ts) // 2]  # a cut in generation 0
            out0 = rs.restore(kafka_conf, cg, before, tmp_path / "r0")
            assert out0.manifest["generation"] == 0
            ref0 = scene.reference(before)
            for vid, size in SIZES.items():
                got = read_image(SiteDir(tmp_path / "r1").image_path(vid), size)
                assert got == bytes(want[vid]), f"restore at {w1}, {vid}: " + first_difference(
                    got, bytes(want[vid])
                )
                got = read_image(SiteDir(tmp_path / "r0").image_path(vid), size)
                assert got == bytes(ref0[vid]), f"restore at {before}, {vid}"
        finally:
            assert fo.stop() == 0, fo.output()
    finally:
        dr2.stop(check=False)
        scene.close()


def test_a_reachable_primary_is_stopped_first_and_loses_no_acknowledged_sync_write(
    kafka_conf, tmp_path
):
    """Without --force: the old primary keeps writing sync writes during the failover. It
    is fenced, so every write after that fails (never a silent ack), and every sync write
    it acknowledged is inside the cut the new primary starts from."""
    require_tools("nbdcopy")
    import threading

    cg = unique("fostop")
    sizes = {"a": 1 << 20, "s": 1 << 20}
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=sizes, applied_writes=20, backlog_writes=40, seed=6,
        keep_primary=True,
    )  # fmt: skip
    assert scene.primary is not None
    primary = scene.primary
    sync = primary.create_volume("sync1", 1 << 20, mode="sync")
    acked: list[tuple[int, bytes]] = []
    errors: list[BaseException] = []

    def writer() -> None:
        for i in range(256):  # one 4 KiB block each, never overwritten
            data = bytes([i % 251 + 1]) * 4096
            try:
                sync.write(i * 4096, data)
            except Exception as exc:  # the fence: every later write fails too
                errors.append(exc)
                continue
            acked.append((i * 4096, data))
            time.sleep(0.01)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(0.3)
        fo = FailoverProcess(scene, tag="stop")
        try:
            fo.wait_for("rolled forward")
            t.join(30)
            assert errors, "the old primary kept acknowledging writes after the failover"
            n_acked = len(acked)
            assert n_acked > 0
            got = nbd_copy(fo.uri("sync1"), tmp_path / "sync.raw")
            for off, data in acked:
                assert got[off : off + 4096] == data, f"acknowledged sync write at {off} lost"
            # and nothing after the last acknowledged one, in order: a prefix
            assert got[n_acked * 4096 : (n_acked + 1) * 4096] in (bytes(4096),
                   bytes([n_acked % 251 + 1]) * 4096)  # fmt: skip
            assert "old watermark publisher fenced" in fo.output()
        finally:
            assert fo.stop() == 0, fo.output()
        roles = RolesStore(kafka_conf).latest(cg)
        assert roles is not None and not roles.history[-1].forced
    finally:
        scene.close()


def test_switchover_under_a_running_workload_loses_no_acknowledged_write(kafka_conf, tmp_path):
    """Planned: the primary keeps writing (async and sync volumes) while `lowmark switchover`
    runs at dr1. The primary drains (it refuses new writes, makes every acknowledged one
    durable, publishes its LEAVE), the cut covers its final S, and every write it
    acknowledged, async ones included, is in dr1's images."""
    require_tools("nbdcopy")
    import threading

    cg = unique("foswitch")
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=20, backlog_writes=40, seed=7,
        keep_primary=True, generational=True,
    )  # fmt: skip
    primary = scene.primary
    assert primary is not None
    vols = {"async1": primary.create_volume("async1", 1 << 20),
            "sync1": primary.create_volume("sync1", 1 << 20, mode="sync")}  # fmt: skip
    acked: dict[str, list[tuple[int, bytes]]] = {v: [] for v in vols}
    refused: list[BaseException] = []

    def writer(name: str) -> None:
        vol = vols[name]
        for i in range(256):  # one 4 KiB block each, never overwritten
            data = bytes([i % 251 + 1]) * 4096
            try:
                vol.write(i * 4096, data)
            except Exception as exc:  # draining, then fenced
                refused.append(exc)
                continue
            acked[name].append((i * 4096, data))
            time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=(v,), daemon=True) for v in vols]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        fo = FailoverProcess(scene, tag="switch", sub="switchover")
        try:
            fo.wait_for("rolled forward")
            for t in threads:
                t.join(30)
            assert refused, "the old primary kept taking writes after the switchover"
            assert all(acked.values()), acked
            for name in vols:
                got = nbd_copy(fo.uri(name), tmp_path / f"{name}.raw")
                for off, data in acked[name]:
                    assert got[off : off + 4096] == data, f"acknowledged {name} write at {off} lost"
            out = fo.output()
            assert "old primary drained" in out, out
        finally:
            assert fo.stop() == 0, fo.output()
        roles = RolesStore(kafka_conf).latest(cg)
        assert roles is not None and roles.generation == 1
        last = roles.history[-1]
        assert last.kind.value == "SWITCHOVER" and not last.forced
    finally:
        scene.close()


def test_switchover_round_trip_primary_to_dr1_and_back_loses_nothing(kafka_conf, tmp_path):
    """prod -> dr1 (switchover under writes), prod rejoins as a backup (`lowmark failback`,
    no copy), dr1's primary takes writes, then dr1 -> prod (switchover): prod's images hold
    every write acknowledged on either side."""
    require_tools("nbdcopy", "qemu-io")
    import subprocess
    import sys
    import threading

    from pipeline.backup.applier import Applier, ApplierConfig
    from pipeline.topology.roles import initial_roles
    from tests.replication_helpers import ServiceThread, wait_until

    cg = unique("foround")
    scene = make_site(
        kafka_conf, cg, tmp_path, sizes=SIZES, applied_writes=20, backlog_writes=30, seed=8,
        keep_primary=True, generational=True,
    )  # fmt: skip
    RolesStore(kafka_conf).commit(cg, None, initial_roles(cg, "prod", now_us=1))
    primary = scene.primary
    assert primary is not None
    vols = {"async1": primary.create_volume("async1", 1 << 20),
            "sync1": primary.create_volume("sync1", 1 << 20, mode="sync")}  # fmt: skip
    want: dict[str, dict[int, bytes]] = {v: {} for v in vols}

    def writer(name: str) -> None:
        for i in range(128):
            data = bytes([i % 251 + 1]) * 4096
            try:
                vols[name].write(i * 4096, data)
            except Exception:
                continue
            want[name][i * 4096] = data
            time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=(v,), daemon=True) for v in vols]
    for t in threads:
        t.start()
    prod_dir = scene.primary_dir
    ap: ServiceThread | None = None
    try:
        time.sleep(0.2)
        to_dr1 = FailoverProcess(scene, tag="to-dr1", sub="switchover")
        to_dr1.wait_for("rolled forward")
        for t in threads:
            t.join(30)
        primary.close()
        scene.primary = None
        # prod rejoins as a backup of generation 1, without a copy
        fb = subprocess.run(
            [sys.executable, "-m", "pipeline.app.cli", "failback", "--bootstrap-servers",
             kafka_conf["bootstrap.servers"], "--cg", cg, "--site", "prod",
             "--data-dir", str(prod_dir)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert fb.returncode == 0, fb.stdout + fb.stderr
        assert "is a backup of CG" in fb.stdout
        ap = ServiceThread(
            Applier(
                ApplierConfig(cg=cg, site="prod", data_dir=prod_dir, checkpoint_interval_s=0.05),
                kafka_conf,
            ),
            "applier-prod",
        ).start()
        # the new primary takes writes; prod applies them
        for i, name in enumerate(vols):
            assert nbd_write(to_dr1.uri(name), 600 * 1024 + i * 8192, 8192, 0x77 + i)
            for k in range(2):
                want[name][600 * 1024 + i * 8192 + k * 4096] = bytes([0x77 + i]) * 4096
        gen1 = read_log(kafka_conf, cg, generation=1)
        last = max(x["ts"] for t, rec, _p, _o in gen1 if t == "Write" for x in rec["extents"])
        wait_until(lambda: ap.service.applied_w >= last or ap.error, 60, "prod to apply gen 1")
        ap.stop()
        ap = None
        # and back: dr1's primary drains, prod takes over
        back = FailoverProcess(
            scene, tag="to-prod", sub="switchover", site="prod", site_dir=prod_dir
        )
        try:
            back.wait_for("rolled forward")
            to_dr1.proc.wait(60)  # its interceptor drained: it stops serving
            for name in vols:
                got = nbd_copy(back.uri(name), tmp_path / f"{name}.raw")
                for off, data in want[name].items():
                    assert got[off : off + 4096] == data, f"{name}@{off} lost on the way back"
        finally:
            assert back.stop() == 0, back.output()
        roles = RolesStore(kafka_conf).latest(cg)
        assert roles is not None and roles.generation == 2 and roles.primary_site == "prod"
        assert [t.kind.value for t in roles.history] == ["SWITCHOVER", "SWITCHOVER"]
    finally:
        if ap is not None:
            ap.stop(check=False)
        if to_dr1.proc.poll() is None:
            to_dr1.stop()
        scene.close()
