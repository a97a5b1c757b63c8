"""Restart republishes the tail: an interceptor killed with acknowledged async writes not yet
in Kafka loses none of them once it restarts on the same disk.

Tries to break: an acknowledged write whose region was not durably dirty at the kill, a
restart that serves new writes before the tail is queued, a republish the backup does not
apply as an overwrite, a tail that W passes without the republish. Killed two ways: an
in-process ``crash`` (the tick thread and the region log stop at once; a long tick
interval leaves a large unreplicated tail) and kill -9 of a ``lowmark serve`` process
written through NBD by raw-socket clients. Then a backup site (watermark + applier) runs
and every acknowledged write must be in its images; a control run with the log off shows
the scenario does lose the tail without it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from connectors.embedded_kafka.procs import free_port
from connectors.nbd import protocol as p
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from tests.nbd_raw_client import Client, Closed
from tests.replication_helpers import read_log, rebuild_from_log, running_backup, wait_until

pytestmark = pytest.mark.kafka

SIZES = {"a": 2 << 20, "b": 1 << 20}
#: a long tick: at the kill most acknowledged writes are not in Kafka yet
SLOW_TICK = {"tick_interval_s": 0.3, "replication_timeout_s": 20.0}


def backup_images(site: Path) -> dict[str, bytes]:
    out = {}
    for vid in SIZES:
        path = SiteDir(site).image_path(vid)
        out[vid] = path.read_bytes() if path.exists() else b""
    return out


def write_until_crash(
    cg: ConsistencyGroup, seed: int, errors: list[BaseException] | None = None
) -> dict[str, bytearray]:
    """One writer per volume; at a random instant the interceptor and its region log stop
    as a killed process would. Returns every volume as its acknowledged writes left it."""
    rng = random.Random(seed)
    model = {vid: bytearray(n) for vid, n in SIZES.items()}
    stop = threading.Event()
    acks = dict.fromkeys(SIZES, 0)

    def writer(vid: str, wseed: int) -> None:
        wrng = random.Random(wseed)
        vol = cg.volume(vid)
        while not stop.is_set():
            n = wrng.choice([512, 4096, 65536, 200_000])
            off = wrng.randrange(0, SIZES[vid] - n) // 512 * 512
            data = wrng.randbytes(n)
            try:
                vol.write(off, data)
            except Exception as exc:
                if errors is not None:
                    errors.append(exc)
                return  # the crash refused it: never acknowledged
            model[vid][off : off + n] = data  # acknowledged
            acks[vid] += 1

    threads = [threading.Thread(target=writer, args=(v, seed * 7 + i)) for i, v in enumerate(SIZES)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.4, 1.2))
    cg.interceptor.crash()
    if cg.regions is not None:
        cg.regions.crash()
    stop.set()
    for t in threads:
        t.join(30)
    for vol in cg.volumes.values():
        vol.image.close()
    if errors is not None:
        errors.append(AssertionError(f"acknowledged: {acks}"))
    return model


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_in_process_crash_loses_no_acknowledged_write(kafka_conf, unique_name, tmp_path, seed):
    data_dir = tmp_path / "primary"
    cg = ConsistencyGroup.open(unique_name, data_dir, kafka_conf, **SLOW_TICK)
    for vid, n in SIZES.items():
        cg.create_volume(vid, n)
    errors: list[BaseException] = []
    model = write_until_crash(cg, seed, errors)
    in_kafka = rebuild_from_log(read_log(kafka_conf, unique_name), SIZES)
    tail = [vid for vid in SIZES if in_kafka[vid] != model[vid]]
    assert tail, f"the crash left no unreplicated tail: the test proves nothing; {errors}"
    restarted = ConsistencyGroup.open(unique_name, data_dir, kafka_conf, **SLOW_TICK)
    try:
        metrics = restarted.regions.metrics()  # type: ignore[union-attr]
        assert metrics["republished_bytes"] > 0
        with running_backup(kafka_conf, unique_name, tmp_path / "backup"):
            wait_until(
                lambda: backup_images(tmp_path / "backup") == {v: bytes(model[v]) for v in SIZES},
                90,
                "every acknowledged write in the backup's images",
                interval_s=0.2,
            )
        restarted.flush()
        wait_until(lambda: restarted.regions.dirty_regions() == 0, 10, "regions cleared")  # type: ignore[union-attr]
    finally:
        restarted.close()


def test_control_without_the_region_log_the_tail_is_lost(kafka_conf, unique_name, tmp_path):
    off = {**SLOW_TICK, "region_bytes": 0}
    data_dir = tmp_path / "primary"
    cg = ConsistencyGroup.open(unique_name, data_dir, kafka_conf, **off)
    for vid, n in SIZES.items():
        cg.create_volume(vid, n)
    model = write_until_crash(cg, 5)
    restarted = ConsistencyGroup.open(unique_name, data_dir, kafka_conf, **off)
    try:
        restarted.flush()
        replicated = rebuild_from_log(read_log(kafka_conf, unique_name), SIZES)
        assert any(replicated[v] != model[v] for v in SIZES), "nothing lost without the log?"
    finally:
        restarted.close()


# ---------------------------------------------------------------- kill -9 through NBD


BLOCK = 4096
NBD_SIZE = 64 << 20  # one round of unique blocks outlasts the kill


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.app.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LOWMARK_CONFIG": ""},
        )


def connect(port: int, proc: subprocess.Popen[bytes], log: Path) -> Client:
    deadline = time.monotonic() + 60
    while True:
        try:
            c = Client(port)
            c.greet()
            size, _flags = c.go("v")
            assert size == NBD_SIZE
            return c
        except (OSError, Closed):
            assert proc.poll() is None, f"serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"serve did not listen:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)


def nbd_writer(port: int, blocks: list[int], seed: int, acked: dict[int, bytes]) -> None:
    """Pipelined WRITEs (8 in flight), each to its own block; ``acked`` gets every block
    whose reply said success. Ends when the server goes away."""
    rng = random.Random(seed)
    try:
        c = Client(port)
        c.greet()
        c.go("v")
    except (OSError, Closed):
        return
    sent: dict[bytes, tuple[int, bytes]] = {}
    it = iter(blocks)
    try:
        while True:
            while len(sent) < 8:
                b = next(it, None)
                if b is None:
                    break
                data = rng.randbytes(BLOCK)
                sent[c.request(p.CMD_WRITE, b * BLOCK, BLOCK, payload=data)] = (b, data)
            if not sent:
                return
            cookie, err, _ = c.reply()
            b, data = sent.pop(cookie)
            if err == 0:
                acked[b] = data
    except (OSError, Closed):
        return
    finally:
        c.close()


@pytest.mark.parametrize("seed", [11, 12])
def test_kill_9_of_serve_loses_no_acknowledged_nbd_write(kafka_conf, unique_name, tmp_path, seed):
    rng = random.Random(seed)
    port = free_port()
    data_dir = tmp_path / "primary"
    config = tmp_path / "lowmark.toml"
    config.write_text(
        f"""
[kafka]
bootstrap_servers = "{kafka_conf["bootstrap.servers"]}"
[cg]
name = "{unique_name}"
[serve]
interceptor_id = "primary-a"
data_dir = "{data_dir}"
listen = "127.0.0.1:{port}"
tick_interval_ms = 300
region_bytes = "16KiB"
[[serve.volumes]]
name = "v"
size = "{NBD_SIZE}"
"""
    )
    log = tmp_path / "serve.log"
    proc = serve(config, log)
    connect(port, proc, log).close()
    blocks = list(range(NBD_SIZE // BLOCK))
    rng.shuffle(blocks)
    acked: dict[int, bytes] = {}
    writers = [
        threading.Thread(target=nbd_writer, args=(port, blocks[i::3], seed * 10 + i, acked))
        for i in range(3)
    ]
    for t in writers:
        t.start()
    time.sleep(rng.uniform(0.4, 1.0))
    assert any(t.is_alive() for t in writers), "the writers ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for t in writers:
        t.join(30)
    assert len(acked) > 50, f"only {len(acked)} writes were acknowledged before the kill"
    in_kafka = rebuild_from_log(read_log(kafka_conf, unique_name), {"v": NBD_SIZE})["v"]
    tail = [b for b, d in acked.items() if in_kafka[b * BLOCK : (b + 1) * BLOCK] != d]
    assert tail, "the kill left no unreplicated tail: the test proves nothing"
    proc = serve(config, log)
    try:
        connect(port, proc, log).close()  # serving: the tail was queued before this
        site = tmp_path / "backup"
        img = SiteDir(site).image_path("v")

        def all_there() -> bool:
            if not img.exists():
                return False
            got = img.read_bytes()
            return all(got[b * BLOCK : (b + 1) * BLOCK] == d for b, d in acked.items())

        with running_backup(kafka_conf, unique_name, site):
            wait_until(all_there, 90, "every acknowledged NBD write in the backup", 0.2)
        assert "republished the dirty regions" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
