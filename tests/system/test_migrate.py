"""`lowmark migrate`: a volume moves between two `lowmark serve` of one CG, through real
NBD clients, a real broker and a backup site that is told nothing.

Tries to break: a write lost or reordered across the cutover, a source that still
answers after it let go, a backup whose image of the volume stops following it, a
migration killed mid-way that neither completes nor rolls back.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.kafka_helpers import unique
from tests.replication_helpers import wait_until
from tests.system.migrate_helpers import TwoPrimaries, running
from tests.system.nbd_paths import BS, PathWriter, block_bytes, decode_block

pytestmark = pytest.mark.kafka

MIB = 1 << 20


@pytest.fixture
def two(kafka, tmp_path):
    vols = (("vol1", "16MiB", "async"), ("vol2", "8MiB", "async"))
    with running(tmp_path, kafka.bootstrap_servers, unique("migrate"), vols) as svc:
        yield svc


def qemu_io(
    port: int, volume: str, *cmds: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    argv.append(f"nbd://127.0.0.1:{port}/{volume}")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def nbd_digest(port: int, volume: str, size: int) -> str:
    out = subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/{volume}", "-"],
                         capture_output=True, timeout=60, check=True).stdout  # fmt: skip
    assert len(out) == size
    return hashlib.sha256(out).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backup_caught_up(two: TwoPrimaries, volume: str, want: str) -> bool:
    img = two.tmp / "backup" / "images" / f"{volume}.img"
    return img.exists() and file_digest(img) == want


def test_migrate_moves_the_volume_and_the_backup_follows(two):
    a, b = two.nbd["primary-a"], two.nbd["primary-b"]
    qemu_io(a, "vol1", "write -P 0x11 0 1M", "write -P 0x12 8M 64k")
    qemu_io(a, "vol2", "write -P 0x21 0 256k")
    assert "inaccessible" not in subprocess.run(
        ["nbdinfo", "--list", f"nbd://127.0.0.1:{a}"], capture_output=True, text=True,
        timeout=30).stdout  # fmt: skip

    res = two.migrate_ok("vol1", "primary-b")
    assert res["outcome"] == "migrated", res
    assert res["io_pause_s"] is not None and res["io_pause_s"] < 5, res
    assert two.states("vol1") == {"primary-a": "absent", "primary-b": "served"}

    # the source answers a client ESHUTDOWN (reconnect elsewhere): a path that is
    # inaccessible, as NVMe ANA has it
    r = qemu_io(a, "vol1", "read 0 4k", check=False)
    assert r.returncode != 0 or "shutdown" in (r.stdout + r.stderr).lower(), r
    listing = subprocess.run(["nbdinfo", "--list", f"nbd://127.0.0.1:{b}"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    assert "access optimized" in listing, listing

    # the destination serves the source's bytes, then takes writes of its own
    r = qemu_io(b, "vol1", "read -P 0x11 0 1M", "read -P 0x12 8M 64k")
    assert "Pattern verification failed" not in r.stdout, r.stdout
    qemu_io(b, "vol1", "write -P 0x13 4M 128k")
    want = nbd_digest(b, "vol1", 16 * MIB)
    # the backup site follows with no action of its own
    wait_until(lambda: backup_caught_up(two, "vol1", want), 60, "backup has vol1 as at b")
    # the source restarts with vol1 still in its [[serve.volumes]]: the tombstone keeps it
    # from being created again (a CREATE in the log would empty it at the backup)
    two.stop("serve")
    two.start("serve")
    wait_until(lambda: two.numbers("serve").get("lowmark_primary_up") == 1.0, 60, "a again")
    assert two.states("vol1") == {"primary-a": "absent", "primary-b": "served"}
    assert "parked here, not served" in two.log("serve")
    r = subprocess.run(["nbdinfo", "--list", f"nbd://127.0.0.1:{a}"], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    want_text = "access inaccessible: volume vol1 is inaccessible at interceptor primary-a: "
    assert want_text + "migrated to primary-b" in r.stdout, r.stdout + r.stderr
    argv = two.argv("status", "--config", str(two.config), "--format", "text")
    status = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env=two.env).stdout  # fmt: skip
    assert "vol1" in status and "at primary-b (optimized; primary-a inaccessible)" in status, status
    qemu_io(b, "vol1", "write -P 0x15 2M 64k")
    want = nbd_digest(b, "vol1", 16 * MIB)
    wait_until(lambda: backup_caught_up(two, "vol1", want), 60, "backup has vol1 after a restart")
    # vol2 stayed at a and goes on
    qemu_io(a, "vol2", "write -P 0x22 1M 64k")
    want2 = nbd_digest(a, "vol2", 8 * MIB)
    wait_until(lambda: backup_caught_up(two, "vol2", want2), 60, "backup has vol2")

    # and back: the source copy was removed, the move back stages it afresh
    res = two.migrate_ok("vol1", "primary-a")
    assert res["outcome"] == "migrated", res
    assert nbd_digest(a, "vol1", 16 * MIB) == want
    qemu_io(a, "vol1", "write -P 0x14 12M 64k")
    want = nbd_digest(a, "vol1", 16 * MIB)
    wait_until(lambda: backup_caught_up(two, "vol1", want), 60, "backup has vol1 as at a")
    time.sleep(0.1)


def fio(cwd: Path, port: int, *extra: str, timeout: float = 120) -> subprocess.Popen[str]:
    argv = ["fio", "--name=mig", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/vol1",
            "--rw=randwrite", "--bs=4k", "--size=16m", "--iodepth=8", "--verify=crc32c",
            "--output-format=json", *extra]  # fmt: skip
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_fio_verifies_across_the_move_and_a_multipath_client_loses_nothing(two):
    """fio writes (crc32c-verified blocks) at the source while the volume moves; it is
    told ESHUTDOWN at the cutover and stops; its verify at the destination finds every
    block it completed. A two-path client rides through the move: every write it had
    acknowledged is there, and the pause it saw is measured."""
    a, b = two.nbd["primary-a"], two.nbd["primary-b"]
    work = two.tmp / "fio"
    work.mkdir()
    writer = PathWriter([a, b], "vol2", range(0, 256))  # vol2: a client riding through
    writer2 = PathWriter([a, b], "vol1", range(3072, 4096))  # on vol1, past fio's first 12M
    job = fio(work, a, "--size=12m", "--do_verify=0", "--verify_state_save=1",
              "--rate_iops=500")  # fmt: skip
    writer.start()
    writer2.start()
    time.sleep(2.0)
    res = two.migrate_ok("vol1", "primary-b")
    _out, err = job.communicate(timeout=120)
    time.sleep(0.5)
    writer.stop()
    writer2.stop()
    assert res["outcome"] == "migrated" and res["io_pause_s"] < 2.0, str(res)
    # fio was running at the cutover: told ESHUTDOWN, it stops. Its verify at the
    # destination must find every block it completed; the only blocks allowed to differ
    # are the writes fio itself reported failed (never acknowledged: fio's saved state
    # counts an errored write as issued, so its verify reads those blocks too)
    failed = {int(x) for x in re.findall(r"io_u error on file .*write offset=(\d+)", err)}
    assert failed and "transport endpoint shutdown" in err, err[-2000:]
    verify = fio(work, b, "--size=12m", "--verify_only", "--verify_state_load=1")
    _vout, verr = verify.communicate(timeout=120)
    bad = {int(x) for x in re.findall(r"requested block: offset=(\d+)", verr)}
    assert bad <= failed, f"lost or corrupted at {sorted(bad - failed)}: {verr[-3000:]}"
    assert verify.returncode == 0 or bad, verr[-3000:]
    # the two-path client on the moving volume: every acknowledged write is at b
    acked, doubt = writer2.acked(), writer2.in_doubt()
    assert writer2.reconnects >= 1 and acked, (writer2.reconnects, len(acked))
    image = subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{b}/vol1", "-"], capture_output=True,
                           timeout=60, check=True).stdout  # fmt: skip
    for block, seq in acked.items():
        got = decode_block(image[block * BS : (block + 1) * BS])
        assert got is not None and got[0] == block, (block, got)
        assert got[1] == seq or got[1] in doubt.get(block, ()), (block, seq, got)
    gap = writer2.max_gap_s()
    print(
        f"client-seen pause {gap * 1000:.0f} ms, coordinator's {res['io_pause_s'] * 1000:.0f}"
        f" ms {res['cutover_ms']}; fio: {err[-300:]}"
    )
    assert gap < 5.0
    # a fresh fio at the destination: writes and verifies (the client reconnected)
    again = fio(work, b, "--size=4m", "--offset=4m", "--do_verify=1")
    aout, aerr = again.communicate(timeout=120)
    assert again.returncode == 0, (aout[-3000:], aerr[-3000:])


def restored(two: TwoPrimaries, ts: int, out: Path) -> dict[str, bytes]:
    """The CG's images at exactly the cut ``ts``, by `lowmark restore --from-log`."""
    argv = two.argv("restore", "--config", str(two.config), "--at", str(ts), "--to", str(out),
                    "--from-log", "--json")  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=two.env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {v: (out / "images" / f"{v}.img").read_bytes() for v in ("vol1", "vol2")}


def test_every_cut_across_the_move_holds_the_primarys_bytes_and_stays_causal(two, kafka_conf):
    """A causal chain across two volumes, one of them moving: seq n to vol1 (acked), then
    seq n to vol2 (acked), then n + 1 to vol1... At every cut, before, during and after
    the cutover, vol2 may trail vol1 by one write, never lead it; and each image is
    exactly the primary's after that write (block 0 holds it, nothing else is there)."""
    from pipeline.watermark.publisher import decode_watermark

    a, b = two.nbd["primary-a"], two.nbd["primary-b"]
    vol1 = PathWriter([a, b], "vol1", range(1))
    vol2 = PathWriter([a], "vol2", range(1), pinned=0)
    stop = threading.Event()
    acked = [0]

    def chain() -> None:
        n = 1
        while not stop.is_set():
            vol1.put(0, n)
            vol2.put(0, n)
            acked[0] = n
            n += 1

    t = threading.Thread(target=chain, daemon=True)
    t.start()
    time.sleep(1.0)
    first = acked[0]
    chain_us = int(time.time() * 1e6) - 500_000  # the chain's first writes are older
    res = two.migrate_ok("vol1", "primary-b")
    time.sleep(1.0)
    stop.set()
    t.join(30)
    last = acked[0]
    assert res["outcome"] == "migrated" and vol1.reconnects >= 1, (res, vol1.reconnects)
    assert last > first > 0, (first, last)
    # every W published from before the move to the end; a spread of them is restored
    from connectors.kafka.reading import iter_range
    from connectors.kafka.topics import CgTopics
    from schemas.ts import ts_physical_us

    topic = CgTopics(two.cg, 0).watermark
    ws = sorted({decode_watermark(m.value()).w for m in iter_range(kafka_conf, topic, 0)})
    ws = [w for w in ws if ts_physical_us(w) > chain_us]
    assert len(ws) > 20, len(ws)
    # a spread of them, and the ones around the cutover (the source's final ts)
    cut = res["final_ts"]
    below = [w for w in ws if w <= cut][-2:]
    above = [w for w in ws if w > cut][:3]
    assert below and above, (cut, ws[0], ws[-1])
    picks = sorted(set(ws[:: max(1, len(ws) // 10)] + ws[-2:] + below + above))
    seen = []
    for i, w in enumerate(picks):
        imgs = restored(two, w, two.tmp / f"cut{i}")
        s1, s2 = (decode_block(imgs[v][:BS]) for v in ("vol1", "vol2"))
        n1, n2 = (s[1] if s else 0 for s in (s1, s2))
        assert n2 <= n1 <= n2 + 1, f"cut {w}: vol1 at {n1}, vol2 at {n2}: not causal"
        for v, n in (("vol1", n1), ("vol2", n2)):
            want = (block_bytes(0, n) if n else bytes(BS)) + bytes(len(imgs[v]) - BS)
            assert imgs[v] == want, f"cut {w}: {v} is not the primary's after write {n}"
        seen.append(n1)
    assert seen == sorted(seen) and seen[-1] >= first, seen


def test_a_failover_after_the_move_lands_on_the_destinations_data(two):
    """The backup followed the move with no action of its own; a failover to it then
    serves the destination's writes (and the other volume's, from the source)."""
    a, b = two.nbd["primary-a"], two.nbd["primary-b"]
    qemu_io(a, "vol1", "write -P 0x31 0 1M")
    two.migrate_ok("vol1", "primary-b")
    qemu_io(b, "vol1", "write -P 0x32 1M 1M")
    qemu_io(a, "vol2", "write -P 0x33 0 64k")
    want = {"vol1": nbd_digest(b, "vol1", 16 * MIB), "vol2": nbd_digest(a, "vol2", 8 * MIB)}
    wait_until(lambda: all(backup_caught_up(two, v, d) for v, d in want.items()), 60,
               "the backup holds both volumes as the primaries do")  # fmt: skip
    for name in ("serve", "serve_b"):  # the primary site is lost (stopped: its W stands)
        two.stop(name)
    sock = two.tmp / "failover.sock"
    log = open(two.tmp / "failover.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(two.argv("failover", "--config", str(two.config), "--site", "dr1",
                                     "--listen", "", "--unix-socket", str(sock), "--force"),
                            stdout=log, stderr=subprocess.STDOUT, env=two.env)  # fmt: skip
    try:
        wait_until(sock.exists, 120, "the failover to serve")
        for v, d in want.items():
            out = subprocess.run(["nbdcopy", f"nbd+unix:///{v}?socket={sock}", "-"],
                                 capture_output=True, timeout=60, check=True).stdout  # fmt: skip
            assert hashlib.sha256(out).hexdigest() == d, f"{v} after the failover differs"
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_an_interrupted_migration_aborted_is_served_at_the_source_with_every_write(two):
    """The command killed after the target staged the volume, then `--abort`: the stage is
    dropped first, the source serves the volume (it never stopped taking writes, or takes
    them again once its hold lapsed), nothing of it is left at the target."""
    a, b = two.nbd["primary-a"], two.nbd["primary-b"]
    writer = PathWriter([a, b], "vol1", range(0, 128)).start()
    src, dst = two.admin["primary-a"], two.admin["primary-b"]
    argv = two.argv("migrate", "vol1", "--to", "primary-b", "--admin-socket", str(src),
                    "--to-admin", str(dst), "--lease", "2")  # fmt: skip
    cmd = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=two.env)
    wait_until(lambda: two.states("vol1")["primary-b"] == "staged", 30, "the stage")
    cmd.kill()
    cmd.wait(30)
    res = two.migrate_ok("vol1", "primary-b", "--abort")
    assert res["outcome"] == "rolled back", res
    assert two.states("vol1") == {"primary-a": "served", "primary-b": "absent"}
    assert not (two.tmp / "primary-b" / "images" / "vol1.img").exists()
    time.sleep(0.5)
    writer.stop()
    acked = writer.acked()
    assert acked and all(s.path == 0 for s in writer.log if s.outcome == "ok")
    image = subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{a}/vol1", "-"], capture_output=True,
                           timeout=60, check=True).stdout  # fmt: skip
    for block, seq in acked.items():
        got = decode_block(image[block * BS : (block + 1) * BS])
        assert got == (block, seq) or (got and got[1] in writer.in_doubt().get(block, ())), (
            block, seq, got)  # fmt: skip
    # and the volume can still move afterwards
    assert two.migrate_ok("vol1", "primary-b")["outcome"] == "migrated"
