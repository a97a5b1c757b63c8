"""The interceptor's deadlines run on its injected clock: no test waits for them.

A durability wait, the backpressure wait and a sync acknowledgement each give up when
their deadline passes on the engine's ``TimeSource``; the clock that stamps writes reads
the same source's wall time. No Kafka: the engine is never started.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ReplicationError
from pipeline.primary.interceptor import Interceptor, InterceptorConfig
from pipeline.primary.volume import ConsistencyGroup, Volume, VolumeInfo
from tests.fake_time import FakeTime


def _engine(tmp_path: Path, clock: FakeTime, **config: object) -> Interceptor:
    cfg = InterceptorConfig(cg="cg", interceptor_id="i", state_dir=tmp_path, **config)  # type: ignore[arg-type]
    return Interceptor(cfg, {}, time_source=clock.source())


def test_a_durability_wait_gives_up_at_the_fake_deadline(tmp_path: Path) -> None:
    clock = FakeTime(step_s=31.0)  # every read of the clock is 31 s later
    engine = _engine(tmp_path, clock)
    with pytest.raises(ReplicationError, match=r"not durable in Kafka after 30\.0s"):
        engine.wait_durable(1, 30.0)


def test_backpressure_gives_up_at_the_fake_deadline(tmp_path: Path) -> None:
    clock = FakeTime()
    limit = 4 * 900 * 1024
    engine = _engine(tmp_path, clock, max_unreplicated_bytes=limit)
    token, ts = engine.stamp()
    engine.append(token, "v", ts, 0, bytes(limit))  # Kafka takes nothing
    clock.step_s = 6.0
    with pytest.raises(ReplicationError, match="still wait for Kafka after 5"):
        engine.wait_for_space(1, timeout_s=5.0)
    assert engine.stats["blocked_s"] == 0.0  # it gave up: nothing was unblocked


def test_the_hybrid_clock_and_progress_stamps_read_the_injected_wall_clock(tmp_path: Path) -> None:
    clock = FakeTime(2000.0)
    engine = _engine(tmp_path, clock)
    _token, ts = engine.stamp()
    assert ts >> 12 == clock.wall_us()  # the ts's physical part is the fake wall time
    assert engine.cuts._now == clock.monotonic  # the sync-ack deadlines too


def test_a_sync_ack_shares_one_deadline_between_durable_and_covered(tmp_path: Path) -> None:
    clock = FakeTime()
    engine = _engine(tmp_path, clock, replication_timeout_s=30.0)
    cg = ConsistencyGroup(tmp_path, engine)
    synced: list[float] = []

    class Image:
        def sync(self) -> None:  # a sync ack waits for the primary image too
            synced.append(clock.monotonic())

    vol = Volume(cg, VolumeInfo("v", "v", 512, "sync"), image=Image())  # type: ignore[arg-type]
    left: list[float] = []

    class Ticket:
        ts = 5

        def wait(self) -> None:
            clock.advance(12.5)  # durable after 12.5 s

    engine.wait_covered = lambda ts, timeout_s: left.append(timeout_s)  # type: ignore[method-assign]
    assert vol._acknowledge(Ticket()) == 5  # type: ignore[arg-type]
    assert left == [pytest.approx(17.5)]  # what remains of the one 30 s bound
    assert len(synced) == 1
