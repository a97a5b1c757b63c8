"""The write path on a real broker: volume API -> interceptor -> Kafka.

Tries to break: records missing or reordered against the primary image (large fragmented
writes, zero/trim, concurrent overlapping writers), a zombie interceptor adding records
after it was fenced, an idle interceptor holding progress back, sync writes acked without
durability.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from typing import Any

import pytest

from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.errors import FencedError, ReplicationError
from pipeline.primary.volume import ConsistencyGroup
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Progress
from tests.prereqs import require_tool
from tests.replication_helpers import FAST, ServiceThread, read_log, rebuild_from_log, wait_until

pytestmark = pytest.mark.kafka


def watermark_thread(kafka_conf: dict[str, str], cg: str, **opts: Any) -> ServiceThread:
    """A sync write is acknowledged once a published W covers it: it needs the service."""
    config = WatermarkServiceConfig(cg=cg, liveness_timeout_s=30, **opts)
    return ServiceThread(WatermarkService(config, kafka_conf), "watermark").start()


def test_every_write_kind_lands_in_the_log(kafka_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        a = cg.create_volume("a", 4 << 20)
        b = cg.create_volume("b", 1 << 20, mode="sync")
        rng = random.Random(1)
        a.write(0, rng.randbytes(3 << 20))  # fragments: 6 x 512 KiB sharing one ts
        a.write(4096, b"x" * 4096)
        a.write_zeroes(8192, 65536)
        a.trim(1 << 20, 1 << 20)
        wm = watermark_thread(kafka_conf, unique_name)
        try:
            b.write(512, b"sync-write")
        finally:
            wm.stop()
        for _ in range(200):  # many small writes coalesce into few records
            a.write(rng.randrange(0, (4 << 20) - 4096), rng.randbytes(rng.choice([512, 4096])))
        cg.flush()
        primary = {v.volume_id: v.pread(0, v.size) for v in cg.volumes.values()}
    records = read_log(kafka_conf, unique_name)
    types = {r[0] for r in records}
    assert {"Write", "Zero", "VolumeChange"} <= types
    fragmented = [
        e
        for t, r, _p, _o in records
        if t == "Write"
        for e in r["extents"]
        if e["fragment_count"] > 1
    ]
    assert len(fragmented) == 6 and len({e["ts"] for e in fragmented}) == 1
    writes = sum(len(r["extents"]) for t, r, _p, _o in records if t == "Write")
    write_records = sum(1 for t, *_ in records if t == "Write")
    assert write_records < writes, "small writes of a tick should share records"
    rebuilt = rebuild_from_log(records, {k: len(v) for k, v in primary.items()})
    for vid, data in primary.items():
        assert bytes(rebuilt[vid]) == data, f"volume {vid} differs from its log"
    # each volume's records sit in one partition in ts order
    per_volume: dict[str, list[tuple[int, int, int]]] = {}
    for t, r, p, o in records:
        if t == "Write":
            for e in r["extents"]:
                per_volume.setdefault(r["volume_id"], []).append((p, o, e["ts"]))
        elif "volume_id" in r:
            per_volume.setdefault(r["volume_id"], []).append((p, o, r["ts"]))
    for vid, items in per_volume.items():
        assert len({p for p, _o, _t in items}) == 1, vid
        items.sort()
        assert [t for *_x, t in items] == sorted(t for *_x, t in items), vid


@pytest.mark.tools
def test_kcat_shows_keys_and_headers_as_text(kafka_conf, unique_name, tmp_path):
    require_tool("kcat")
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("vol1", 1 << 20)
        vol.write(0, b"hello")
        cg.flush()
    out = subprocess.run(
        [
            "kcat",
            "-C",
            "-e",
            "-q",
            "-b",
            kafka_conf["bootstrap.servers"],
            "-t",
            CgTopics(unique_name).log,
            "-f",
            "%k|%h\n",
            "-X",
            "isolation.level=read_committed",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out, "kcat read nothing"
    assert all(line.startswith("vol1|") for line in out)
    assert any("type=Write" in line and "volume=vol1" in line and "ts=" in line for line in out)
    assert any("type=VolumeChange" in line for line in out)


@pytest.mark.parametrize("seed", range(6))
def test_overlapping_concurrent_writers_log_order_is_image_order(
    kafka_conf, unique_name, tmp_path, seed
):
    """Threads hammer overlapping extents; the log replayed in ts order equals the image."""
    rng = random.Random(seed)
    size = 64 << 10
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("hot", size)

        def writer(wseed: int) -> None:
            r = random.Random(wseed)
            for _ in range(150):
                length = r.choice([512, 4096, 8192, 20000])
                off = r.randrange(0, size - length)
                if r.random() < 0.1:
                    vol.write_zeroes(off, length)
                else:
                    vol.write(off, r.randbytes(length))

        threads = [threading.Thread(target=writer, args=(rng.random(),)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cg.flush()
        primary = vol.pread(0, size)
    rebuilt = rebuild_from_log(read_log(kafka_conf, unique_name), {"hot": size})
    assert bytes(rebuilt["hot"]) == primary


def test_zombie_interceptor_cannot_write_after_fencing(kafka_conf, unique_name, tmp_path):
    old = ConsistencyGroup.open(
        unique_name, tmp_path / "old", kafka_conf, interceptor_id="x", **FAST
    )
    vol = old.create_volume("v", 1 << 20)
    vol.write(0, b"before")
    old.flush()
    # a second instance with the same interceptor id (same transactional.id) takes over
    new = ConsistencyGroup.open(
        unique_name, tmp_path / "new", kafka_conf, interceptor_id="x", **FAST
    )
    assert new.interceptor.epoch > old.interceptor.epoch
    # the old instance learns it was fenced at its next tick: the write or the flush fails
    with pytest.raises(FencedError):
        vol.write(4096, b"zombie!!")
        vol.flush(timeout_s=20)
    with pytest.raises(FencedError):
        vol.write(8192, b"again")
    new.close()
    old.interceptor.crash()
    zombie = [
        r
        for t, r, *_ in read_log(kafka_conf, unique_name)
        if t == "Write" and any(e["data"] == b"zombie!!" for e in r["extents"])
    ]
    assert zombie == [], "a fenced interceptor's record reached the log"


def test_idle_interceptor_progress_keeps_advancing(kafka_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        first = cg.interceptor.last_s
        time.sleep(0.5)
        second = cg.interceptor.last_s
        assert second > first
    s_values = [
        codec.decode(m.value(), Progress).s
        for m in iter_range(kafka_conf, CgTopics(unique_name).progress)
    ]
    assert len(s_values) > 20, "an idle interceptor must still report progress every tick"
    assert s_values == sorted(s_values)


@pytest.mark.kafka3
def test_sync_write_fails_clearly_when_durability_is_impossible(
    kafka3, kafka3_conf, unique_name, tmp_path
):
    opts = {**FAST, "replication_timeout_s": 5.0, "replication_factor": 3}
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka3_conf, **opts) as cg:
        vol = cg.create_volume("s", 1 << 20, mode="sync")
        wm = watermark_thread(kafka3_conf, unique_name, replication_factor=3)
        vol.write(0, b"ok")
        # keep the quorum leader up so the cluster still answers; two brokers gone leaves
        # one in-sync replica, below min.insync.replicas=2
        leader = kafka3.controller_leader()
        stopped = [n for n in kafka3.node_ids if n != leader][:2]
        for node in stopped:
            kafka3.kill_node(node)
        try:
            t0 = time.monotonic()
            with pytest.raises(ReplicationError) as info:
                vol.write(4096, b"must-not-be-acked")
            assert time.monotonic() - t0 < 30
            assert "not durable" in str(info.value) or "Kafka" in str(info.value)
        finally:
            for node in stopped:
                kafka3.start_node(node)
            cg.interceptor.crash()
            wm.stop()


@pytest.mark.kafka3
def test_async_writes_block_at_the_backpressure_bound_and_lose_nothing(
    kafka3, kafka3_conf, unique_name, tmp_path, caplog
):
    """Kafka stops taking records: async writes go on locally up to the bound, then block
    with a clear log line; once Kafka is back every acknowledged write reaches the log."""
    opts = {
        **FAST,
        "replication_timeout_s": 3.0,
        "replication_factor": 3,
        "max_unreplicated_bytes": 4 << 20,
    }
    size = 16 << 20
    cg = ConsistencyGroup.open(unique_name, tmp_path / "p", kafka3_conf, **opts)
    stop = threading.Event()  # before the try: its finally sets it
    try:
        vol = cg.create_volume("bp", size)
        leader = kafka3.controller_leader()
        stopped = [n for n in kafka3.node_ids if n != leader][:2]
        for node in stopped:
            kafka3.kill_node(node)
        acked: list[int] = []

        def writer() -> None:
            i = 0
            while not stop.is_set() and i < 200:
                vol.write((i * 65536) % size, bytes([i % 251 + 1]) * 65536)
                acked.append(i)
                i += 1

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        # a write blocks at the bound: it logs before it waits, so from here on `acked`
        # can only grow if space is freed (or the bound is broken)
        wait_until(
            lambda: any("writes blocked" in r.getMessage() for r in caplog.records)
            or not t.is_alive(),
            30,
            "a write blocking at the backpressure bound",
        )
        blocked_at = len(acked)
        # proof that the system moved past the point where space would have been freed:
        # the tick thread ended a commit attempt after the block, and it failed
        retries = cg.interceptor.stats["txn_retries"]
        wait_until(
            lambda: cg.interceptor.stats["txn_retries"] > retries or not t.is_alive(),
            30,
            "a failed commit attempt while the writer is blocked",
        )
        # the bound holds: about 4 MiB of 64 KiB writes, and no more while Kafka is down
        assert t.is_alive(), "every write went through: no backpressure at all"
        assert 0 < blocked_at <= 70, blocked_at
        assert len(acked) == blocked_at, "writes went on past the backpressure bound"
        for node in stopped:
            kafka3.start_node(node)
        t.join(120)
        assert not t.is_alive(), "writes did not resume once Kafka was back"
        assert len(acked) == 200
        cg.flush(timeout_s=60)
        primary = vol.pread(0, size)
    finally:
        stop.set()
        cg.close()
    rebuilt = rebuild_from_log(read_log(kafka3_conf, unique_name), {"bp": size})
    assert bytes(rebuilt["bp"]) == primary, "an acknowledged write is missing from the log"
