"""Generations on the primary, on a real broker: the new primary's interceptor writes its
generation's topics above the failover cut; the old one is fenced, by its own roles watch
and through Kafka, and acknowledges nothing after that (Python API and real NBD clients).

Tries to break: a generation-1 stamp at or below base_w although the wall clock is far
below it; generation 1 writing generation 0's topics or transactional id; a write
acknowledged after the interceptor learned of the newer generation while writes were in
flight (acks counted against the moment of fencing); a flush that succeeds after it; an
NBD write answered OK after the fence; a superseded primary that starts anyway; an
interceptor fenced through its transactional id that goes on.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import pytest

from connectors.kafka.reading import bounds, iter_range
from connectors.kafka.topics import CgTopics
from pipeline.app.runtime import primary_metrics
from pipeline.errors import FencedError, ReplicationError
from pipeline.primary.fencing import fence_interceptors, interceptor_ids, last_progress_age_s
from pipeline.primary.nbd_volume import VolumeExport
from pipeline.primary.volume import ConsistencyGroup
from pipeline.timesource import wall_us
from pipeline.topology.roles import initial_roles, plan_failover
from pipeline.topology.store import RolesStore
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import CgRoles, Progress, ProgressKind, Write
from tests.alert_check import fires_in_process
from tests.nbd_helpers import ServerThread
from tests.primary.test_zero_allocation import nbdsh_env
from tests.replication_helpers import FAST, ServiceThread, wait_until

pytestmark = pytest.mark.kafka

#: the watch reads the roles this often here (1 s in production)
WATCHFUL = {**FAST, "generation_check_s": 0.05}


def fail_over(kafka_conf: dict[str, str], cg: str, w: int, to_site: str = "dr") -> CgRoles:
    """Commit generation 1 of ``cg`` (no roles before), as a failover's orchestrator does
    (the store commits a generation only after the one before it: 0 first)."""
    store = RolesStore(kafka_conf)
    g0 = store.commit(cg, None, initial_roles(cg, "main", now_us=wall_us()))
    return store.commit(cg, 0, plan_failover(g0, cg, to_site, w, {}, True, wall_us()))


def watermark_thread(kafka_conf: dict[str, str], cg: str) -> ServiceThread:
    config = WatermarkServiceConfig(cg=cg, liveness_timeout_s=30)
    return ServiceThread(WatermarkService(config, kafka_conf), "watermark").start()


def test_generation_1_uses_its_own_topics_and_stamps_above_base_w(
    kafka_conf, unique_name, tmp_path
):
    # an hour above every wall clock here: only the floor can put the stamps above it
    base_w = (wall_us() + 3_600_000_000) << 12
    opts = {**FAST, "generation": 1, "clock_floor_us": base_w}
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **opts) as cg:
        engine = cg.interceptor
        assert engine.time_source.wall_us() < base_w >> 12
        assert engine._producer_conf()["transactional.id"] == (
            f"lowmark.{unique_name}.g1.interceptor.primary"
        )
        vol = cg.create_volume("v", 1 << 20)
        # commit_wait=False: the commit wait would sleep until the wall clock passes base_w
        tickets = [vol.submit_write(i * 4096, b"x" * 4096, commit_wait=False) for i in range(5)]
        for t in tickets:
            t.wait(10)
            assert t.ts > base_w
        assert engine.metrics()["generation"] == 1
        wait_until(lambda: engine.last_s > base_w, 10, "a progress S above base_w")
    g1 = CgTopics(unique_name, 1)
    progress = [codec.decode(m.value(), Progress) for m in iter_range(kafka_conf, g1.progress)]
    assert progress[0].kind is ProgressKind.JOIN and progress[0].s > base_w, "JOIN below base"
    assert all(p.s > base_w for p in progress)
    stamps = [
        e.ts
        for part in range(4)
        for m in iter_range(kafka_conf, g1.log, part)
        if isinstance(rec := codec.decode(m.value()), Write)
        for e in rec.extents
    ]
    assert len(stamps) == 5 and min(stamps) > base_w
    assert bounds(kafka_conf, CgTopics(unique_name).progress) is None, "wrote generation 0"


def test_no_write_is_acknowledged_after_the_watch_learns_of_a_newer_generation(
    kafka_conf, unique_name, tmp_path
):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **WATCHFUL) as cg:
        engine = cg.interceptor
        vols = [cg.create_volume("a", 4 << 20), cg.create_volume("s", 1 << 20, mode="sync")]
        wm = watermark_thread(kafka_conf, unique_name)
        acked = [0] * 6
        ended: list[BaseException | None] = [None] * 6

        def writer(i: int) -> None:
            vol = vols[i % 2]
            n = 0
            while True:
                try:
                    vol.write((n % 64) * 4096 + (i * 512) % 4096, bytes([i]) * 512)
                except (FencedError, ReplicationError) as exc:
                    ended[i] = exc
                    return
                acked[i] += 1
                n += 1

        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: min(acked) >= 3, 30, "every writer acknowledged")
            healthy = primary_metrics(cg, None)
            fail_over(kafka_conf, unique_name, engine.last_s)
            wait_until(lambda: engine.fenced_by_generation is not None, 10, "the watch fired")
            for t in threads:
                t.join(30)
                assert not t.is_alive(), "a writer still writes after the fence"
        finally:
            wm.stop()
        assert all(isinstance(e, FencedError) and "generation 1" in str(e) for e in ended), ended
        # the gate counts every acknowledgement; none passed it after the fence
        assert sum(acked) == engine.stats["acks"] == engine.acks_before_fence
        with pytest.raises(FencedError, match="no longer the primary"):
            cg.flush()
        with pytest.raises(FencedError):
            vols[0].write(0, b"late")
        m = engine.metrics()
        assert (m["generation"], m["fenced_by_generation"], m["failed"]) == (0, 1, True)
        # the operator's alert on it fires, from what the primary's /metrics would answer
        fires_in_process(tmp_path, "primary", primary_metrics(cg, None),
                         {"cg": unique_name, "interceptor": engine.config.interceptor_id},
                         {"LowmarkPrimaryFenced"}, before=healthy)  # fmt: skip


def nbd_writes(uri: str, count: int, pause_s: float = 0.0) -> list[str]:
    """``count`` WRITEs then a FLUSH through nbdsh (libnbd): each reply as "ok" or its errno
    name, in order."""
    script = f"""
import errno, time
for i in range({count}):
    try:
        h.pwrite(bytes([i % 251]) * 4096, (i % 64) * 4096)
        print("ok", flush=True)
    except nbd.Error as e:
        print(errno.errorcode.get(e.errno, e.errno), flush=True)
    time.sleep({pause_s})
try:
    h.flush()
    print("flush ok")
except nbd.Error as e:
    print("flush", errno.errorcode.get(e.errno, e.errno))
"""
    out = subprocess.run(
        ["nbdsh", "-u", uri, "-c", script],
        env=nbdsh_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")[:-1]


@pytest.mark.tools
def test_nbd_writes_in_flight_get_eio_once_a_newer_generation_exists(
    kafka_conf, unique_name, tmp_path
):
    nbdsh_env()
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **WATCHFUL) as cg:
        engine = cg.interceptor
        vol = cg.create_volume("s", 1 << 20, mode="sync")
        wm = watermark_thread(kafka_conf, unique_name)
        try:
            with ServerThread({"s": VolumeExport(vol)}) as srv:
                replies: list[str] = []
                client = threading.Thread(
                    target=lambda: replies.extend(nbd_writes(srv.uri("s"), 300, 0.005)),
                    daemon=True,
                )
                client.start()
                wait_until(lambda: engine.stats["acks"] >= 20, 30, "NBD writes acknowledged")
                fail_over(kafka_conf, unique_name, engine.last_s)
                client.join(120)
                assert srv.loop_errors == []
        finally:
            wm.stop()
    writes, flush = replies[:-1], replies[-1]
    assert len(writes) == 300 and flush == "flush EIO"
    first_error = writes.index("EIO")
    assert set(writes[first_error:]) == {"EIO"}, "an NBD write acknowledged after the fence"
    assert first_error == engine.stats["acks"] == engine.acks_before_fence
    assert set(writes[:first_error]) == {"ok"}


@pytest.mark.tools
def test_an_interceptor_fenced_through_kafka_fails_and_nbd_writes_get_eio(
    kafka_conf, unique_name, tmp_path
):
    nbdsh_env()
    assert interceptor_ids(kafka_conf, unique_name, 0) == set()
    assert last_progress_age_s(kafka_conf, unique_name, 0) is None
    with ConsistencyGroup.open(
        unique_name, tmp_path / "p", kafka_conf, interceptor_id="host-a", **FAST
    ) as cg:
        vol = cg.create_volume("v", 1 << 20)
        vol.write(0, b"a" * 4096)
        age = last_progress_age_s(kafka_conf, unique_name, 0)
        assert age is not None and age < 5, "a live primary's progress is seconds old at most"
        assert interceptor_ids(kafka_conf, unique_name, 0) == {"host-a"}
        with ServerThread({"v": VolumeExport(vol)}) as srv:
            assert nbd_writes(srv.uri("v"), 2) == ["ok", "ok", "flush ok"]
            assert fence_interceptors(kafka_conf, unique_name, 0, {"host-a"}) == ["host-a"]
            wait_until(
                lambda: isinstance(cg.interceptor.failure, FencedError), 10, "the fence felt"
            )
            assert "failover" in str(cg.interceptor.failure)
            assert nbd_writes(srv.uri("v"), 2) == ["EIO", "EIO", "flush EIO"]
        with pytest.raises(FencedError):
            vol.write(0, b"b")
        # closing a fenced interceptor whose last transaction fails to end must not raise
        # (its failure already says so): seen failing in CI, as a race; forced here
        def fenced_flush(_timeout_s: float) -> int:
            raise FencedError("flushing the producer: Failed to end transaction (_FENCED)")

        cg.interceptor._producer.flush = fenced_flush  # type: ignore[union-attr,method-assign]
    # the fenced instance's last transaction is aborted or committed: nothing after it
    progress = [
        codec.decode(m.value(), Progress)
        for m in iter_range(kafka_conf, CgTopics(unique_name).progress)
    ]
    assert progress[-1].kind is not ProgressKind.LEAVE, "a fenced interceptor left cleanly"
    assert fence_interceptors(kafka_conf, unique_name, 0, {"host-a"}) == ["host-a"]  # again


def test_a_superseded_primary_does_not_start_and_the_new_one_does(
    kafka_conf, unique_name, tmp_path
):
    base_w = wall_us() << 12
    fail_over(kafka_conf, unique_name, base_w, to_site="dr")
    with pytest.raises(FencedError, match="generation 1, whose primary is 'dr'"):
        ConsistencyGroup.open(unique_name, tmp_path / "old", kafka_conf, **FAST)
    assert bounds(kafka_conf, CgTopics(unique_name).progress) is None, "the old one joined"
    opts: dict[str, Any] = {**FAST, "generation": 1, "clock_floor_us": base_w}
    with ConsistencyGroup.open(unique_name, tmp_path / "new", kafka_conf, **opts) as cg:
        vol = cg.create_volume("v", 1 << 20)
        assert vol.write(0, b"new primary") > base_w
        time.sleep(0.2)  # the watch reads the roles: generation 1 is its own
        assert cg.interceptor.failure is None
