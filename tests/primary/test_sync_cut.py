"""Invariant 3's sync half: a sync write is acknowledged only once it is inside a published
cut (W >= ts), not merely durable in Kafka.

Tries to break: a sync ack with no watermark service at all (must fail, naming it), a sync
ack while another member of the CG is dead and holds W below the write (must wait until
that member is fenced and W passes it, then the write is in the backup's cut), the NBD
path's chained callbacks, and the follower's own bookkeeping (timeouts, the waiter bound,
close) driven by a fake consumer and clock.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import pytest

from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.errors import ReplicationError
from pipeline.primary.cut_follower import CutFollower
from pipeline.primary.nbd_volume import VolumeExport
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Watermark
from tests.oracles import read_image
from tests.replication_helpers import FAST, ServiceThread, read_log, running_backup, wait_until

# ---------------------------------------------------------------- follower, no Kafka


class _Msg:
    def __init__(self, value: bytes) -> None:
        self._value = value

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value


class FakeConsumer:
    """The slice of connectors.kafka.consumer.Consumer the follower uses; messages come
    from a queue."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.messages: queue.Queue[_Msg] = queue.Queue()
        self.assigned: dict[int, int] = {}
        self.closed = False

    def watermark_offsets(self, topic: str, partition: int) -> tuple[int, int]:
        return 0, 100

    def assign(self, topic: str, offsets: dict[int, int]) -> None:
        self.assigned = dict(offsets)

    def poll(self, timeout: float) -> _Msg | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


def _watermark(w: int) -> _Msg:
    return _Msg(codec.encode(Watermark("cg1", w, {}, w, w, (), 0, ())))


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def follower() -> Any:
    consumers: list[FakeConsumer] = []

    def factory(conf: dict[str, Any]) -> FakeConsumer:
        c = FakeConsumer(conf)
        consumers.append(c)
        return c

    clock = FakeClock()
    f = CutFollower({}, "cg1", poll_s=0.01, now=clock, consumer_factory=factory, max_waiters=3)
    f.start()
    wait_until(lambda: bool(consumers and consumers[0].assigned), 5, "the follower assigning")
    yield f, consumers[0], clock
    f.close()


def test_follower_reads_committed_from_the_tail_and_wakes_waiters_in_ts_order(follower):
    f, consumer, _clock = follower
    assert consumer.conf["isolation.level"] == "read_committed"
    assert consumer.conf["fetch.wait.max.ms"] <= 10
    assert consumer.assigned == {0: 100 - 64}, "starts near the end, not at 0"
    got: list[tuple[int, BaseException | None]] = []
    for ts in (30, 10, 20):
        f.on_covered(ts, lambda exc, ts=ts: got.append((ts, exc)), timeout_s=60)
    consumer.messages.put(_watermark(15))
    wait_until(lambda: len(got) == 1, 5, "the waiter at ts 10")
    consumer.messages.put(_watermark(5))  # lower: never lowers w
    consumer.messages.put(_watermark(30))
    wait_until(lambda: len(got) == 3, 5, "every waiter covered")
    assert got == [(10, None), (20, None), (30, None)]
    assert f.w == 30
    f.wait_covered(25, timeout_s=0)  # already covered: returns at once
    done: list[int] = []
    f.on_covered(7, lambda exc: done.append(7), timeout_s=60)
    assert done == [7], "a covered ts is settled at once, in the caller's thread"


def test_follower_times_out_bounds_and_fails_waiters_on_close(follower):
    f, consumer, clock = follower
    got: dict[int, BaseException | None] = {}
    f.on_covered(50, lambda exc: got.__setitem__(50, exc), timeout_s=2)
    f.on_covered(60, lambda exc: got.__setitem__(60, exc), timeout_s=20)
    f.on_covered(70, lambda exc: got.__setitem__(70, exc), timeout_s=20)
    f.on_covered(80, lambda exc: got.__setitem__(80, exc), timeout_s=20)  # over the bound
    assert isinstance(got.pop(80), ReplicationError)
    clock.t += 3  # past the first deadline only
    wait_until(lambda: 50 in got, 5, "the first waiter timing out")
    assert isinstance(got[50], ReplicationError)
    assert "lowmark watermark" in str(got[50]) and "cg1" in str(got[50])
    assert 60 not in got
    consumer.messages.put(_watermark(60))
    wait_until(lambda: 60 in got, 5, "the second waiter covered")
    assert got[60] is None
    with pytest.raises(ReplicationError, match="no watermark covered it"):
        f.wait_covered(1000, timeout_s=0)
    f.close()
    assert isinstance(got[70], ReplicationError), "close fails what is still pending"
    assert consumer.closed


# ---------------------------------------------------------------- on a real broker


def test_sync_write_without_a_watermark_service_fails_naming_it(kafka_conf, unique_name, tmp_path):
    opts = {**FAST, "replication_timeout_s": 1.5}
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **opts) as cg:
        vol = cg.create_volume("s", 1 << 20, mode="sync")
        t0 = time.monotonic()
        with pytest.raises(ReplicationError) as info:
            vol.write(0, b"no-cut-will-cover-me")
        took = time.monotonic() - t0
        assert 1.0 < took < 5, f"failed after {took:.2f} s, not at replication_timeout_s"
        msg = str(info.value)
        assert "durable in Kafka" in msg and "lowmark watermark" in msg and unique_name in msg
        # the NBD path fails the same way (an EIO reply), through the chained callbacks
        export = VolumeExport(vol)

        async def nbd_write() -> None:
            done = export.write(4096, b"nbd-no-cut" * 10, fua=False)
            assert done is not None
            await done

        with pytest.raises(ReplicationError, match="lowmark watermark"):
            asyncio.run(nbd_write())
    # durable, though: only the acknowledgement was refused
    payloads = [
        e["data"] for t, r, _p, _o in read_log(kafka_conf, unique_name) if t == "Write"
        for e in r["extents"]
    ]  # fmt: skip
    assert b"no-cut-will-cover-me" in payloads


def test_sync_write_and_nbd_sync_write_are_acked_inside_a_cut(kafka_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("s", 1 << 20, mode="sync")
        with running_backup(kafka_conf, unique_name, tmp_path / "b") as (wm, _ap):
            ts = vol.write(0, b"acked")
            assert cg.interceptor.cuts.w >= ts  # acknowledged inside a cut it saw
            # the publisher notes its W after the commit the interceptor may read first
            wait_until(lambda: wm.service.published_w >= ts, 5, "the service noting its W")
            export = VolumeExport(vol)

            async def nbd_write() -> None:
                done = export.write(4096, b"nbd-acked", fua=True)
                assert done is not None
                await done

            asyncio.run(nbd_write())
            assert cg.interceptor.cuts.w > ts, "the NBD write's ts is above the first one's"


def test_sync_ack_waits_until_a_dead_member_is_fenced_and_is_then_in_the_cut(
    kafka_conf, unique_name, tmp_path
):
    """Another interceptor of the CG (serving a sync volume: no unreplicated tail, so no
    hold) dies with its S below the write's ts: durable in Kafka is not enough; the ack
    comes once the dead one is fenced and W passes the write, and the backup's cut at that
    W holds it."""
    live = ConsistencyGroup.open(
        unique_name, tmp_path / "live", kafka_conf, interceptor_id="live", **FAST
    )
    dead = ConsistencyGroup.open(
        unique_name, tmp_path / "dead", kafka_conf, interceptor_id="dead", **FAST
    )
    wm = ap = None
    try:
        sv = live.create_volume("sv", 1 << 20, mode="sync")
        dead.create_volume("dv", 1 << 20, mode="sync")  # no async tail: fencing suffices
        wm = ServiceThread(
            WatermarkService(
                WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=1.0), kafka_conf
            ),
            "wm",
        ).start()
        ap = ServiceThread(
            Applier(
                ApplierConfig(cg=unique_name, site="b", data_dir=tmp_path / "backup"), kafka_conf
            ),
            "applier",
        ).start()
        svc = wm.service
        sv.write(0, b"before")  # both alive: acked through a cut
        wait_until(lambda: "dead" in svc.state.members, 10, "the service knowing 'dead'")
        dead.interceptor.crash()
        frozen = dead.interceptor.last_s
        acked: dict[str, Any] = {}

        def write() -> None:
            try:
                acked["ts"] = sv.write(4096, b"acked-while-a-member-is-dead")
                acked["fenced"] = svc.stats.fenced
            except BaseException as exc:
                acked["error"] = exc

        writer = threading.Thread(target=write)
        writer.start()
        # positive event first: the record is durable while W is still held at the dead S
        wait_until(
            lambda: sv.pread(4096, 28) == b"acked-while-a-member-is-dead", 5, "the local write"
        )
        with sv._lock:  # its record is queued once the volume lock is free
            seq = live.interceptor._next_seq - 1
        wait_until(lambda: live.interceptor.durable_seq >= seq, 5, "the write durable in Kafka")
        assert "ts" not in acked and "error" not in acked, (
            "acknowledged while the dead member still holds W below it"
        )
        writer.join(15)
        assert "error" not in acked, f"the sync write failed: {acked.get('error')!r}"
        assert acked["ts"] > frozen
        # read the moment the ack returned: 0 would mean acked before the fence (a bound on
        # elapsed time is no proof: the service may have last heard of 'dead' well before)
        assert acked["fenced"] == 1, "acked before the dead member was fenced"
        # the interceptor can read the committed W before the service's thread records it
        # (seen in CI): wait for the record, briefly
        wait_until(lambda: svc.published_w >= acked["ts"], 5, "the service noting its W")
        wait_until(
            lambda: ap.error is not None or ap.service.applied_w >= acked["ts"],
            20,
            "the backup applying through the acked write",
        )
        ap.stop(close=False)
        ckpt = ap.service.checkpoint()
        assert ckpt.w >= acked["ts"]
        image = read_image(SiteDir(tmp_path / "backup").image_path(sv.volume_id), 1 << 20)
        assert image[4096 : 4096 + 28] == b"acked-while-a-member-is-dead"
        ap.service.close()
        ap = None
    finally:
        for st in (ap, wm):
            if st is not None:
                st.stop()
        live.close()
        dead.close()
