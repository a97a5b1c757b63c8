"""The watermark service's timing decisions, driven by a fake clock (no Kafka, no waiting).

Fencing after ``liveness_timeout_s`` of silence, silence not counted through Kafka
trouble, a fresh start giving everyone a full timeout, the trouble backoff, and the
publish/heartbeat schedule: each decided by the injected ``TimeSource``, so a test can
move time by hand. The rules themselves are WatermarkState's (tests/watermark/test_state.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Progress, ProgressKind
from tests.alert_check import fires_in_process
from tests.fake_time import FakeTime

LIVENESS_S = 10.0


class Msg:
    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset = value, offset

    def value(self) -> bytes:
        return self._value

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def error(self) -> None:
        return None


def _progress(iid: str, kind: str, epoch: int, s: int, offset: int) -> Msg:
    rec = Progress(iid, epoch, ProgressKind(kind), s, {}, 1)
    return Msg(codec.encode(rec), offset)


@pytest.fixture
def svc() -> tuple[WatermarkService, FakeTime, list[tuple[str, float]]]:
    clock = FakeTime(1000.0)
    cfg = WatermarkServiceConfig(cg="cg", liveness_timeout_s=LIVENESS_S)
    service = WatermarkService(cfg, {}, clock.source())  # no Kafka until start()
    fenced: list[tuple[str, float]] = []

    def fence(iid: str, epoch: int, s: int, silent_s: float) -> None:
        service._fencing.add((iid, epoch))
        fenced.append((iid, round(silent_s, 3)))

    service._fence = fence  # type: ignore[method-assign]  # the Kafka half, recorded
    return service, clock, fenced


def _join(service: WatermarkService, clock: FakeTime, iid: str, offset: int) -> None:
    service._fold(_progress(iid, "JOIN", -1, 0, offset), clock.t)


def test_a_silent_member_is_fenced_after_liveness_and_not_before(svc: Any) -> None:
    service, clock, fenced = svc
    _join(service, clock, "a", 0)
    _join(service, clock, "b", 1)
    clock.advance(6)
    service._fold(_progress("b", "PROGRESS", 1, 5, 2), clock.t)  # b reports at +6
    clock.advance(LIVENESS_S - 6)  # a silent exactly the timeout: not more
    service._fence_silent(clock.t)
    assert fenced == []
    clock.advance(0.001)
    service._fence_silent(clock.t)
    assert fenced == [("a", LIVENESS_S + 0.001)]
    service._fence_silent(clock.t + 100)  # a fence in flight is not started twice
    assert [f[0] for f in fenced] == ["a", "b"]


def test_silence_does_not_count_through_kafka_trouble(svc: Any) -> None:
    service, clock, fenced = svc
    _join(service, clock, "a", 0)
    clock.advance(8)
    service._trouble(clock.t, "an election")  # a cannot report while Kafka is down
    clock.advance(LIVENESS_S - 1)  # 17 s after its JOIN, 9 s after the trouble
    service._fence_silent(clock.t)
    assert fenced == []
    clock.advance(1.5)
    service._fence_silent(clock.t)
    assert fenced == [("a", LIVENESS_S + 0.5)]


def test_a_member_never_heard_counts_from_the_service_start(svc: Any) -> None:
    service, clock, fenced = svc
    # known only from a snapshot (not folded by this instance): no last-seen entry
    service.state.apply(Progress("z", 5, ProgressKind.JOIN, 0, {}, 0), 0)
    clock.advance(LIVENESS_S)
    service._fence_silent(clock.t)
    assert fenced == []  # a fresh start gives everyone a full timeout
    clock.advance(90)
    service._fence_silent(clock.t)
    assert fenced == [("z", 100.0)]


def test_a_left_member_is_never_fenced_and_its_fence_state_is_dropped(svc: Any) -> None:
    service, clock, fenced = svc
    _join(service, clock, "a", 0)
    service._fencing.add(("a", 0))  # a fence under way ...
    service._fold(_progress("a", "LEAVE", 0, 3, 1), clock.t)  # ... and it left meanwhile
    clock.advance(LIVENESS_S * 10)
    service._fence_silent(clock.t)
    assert fenced == [] and service._fencing == set()  # bounded: nothing piles up


def test_kafka_trouble_backs_off_doubling_to_its_bound(svc: Any, tmp_path: Path) -> None:
    service, clock, _fenced = svc
    waits = []
    for _ in range(8):
        service._trouble(clock.t, "down")
        waits.append(round(service._retry_at - clock.t, 3))
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    # the trouble is on /metrics, and the operator's alert on it fires once it lasts
    assert service.metrics()["kafka_trouble"] == 1
    fires_in_process(tmp_path, "watermark", service.metrics(), {"cg": "cg"},
                     {"LowmarkKafkaUnreachable"}, hold_s=90)  # fmt: skip
    service._recovered(clock.t)
    assert service.metrics()["kafka_trouble"] == 0
    service._trouble(clock.t, "down again")
    assert service._retry_at - clock.t == pytest.approx(0.05)


def test_a_standby_waits_out_the_backoff_with_the_injected_sleep(svc: Any) -> None:
    service, clock, _fenced = svc
    service._trouble(clock.t, "cannot take the publisher")
    service.step(poll_timeout_s=0.5)  # not active, retry not due: sleeps, no Kafka call
    assert clock.slept == [pytest.approx(0.05)]
