"""The service runner's schedule on an injected clock: a status line every 10 s of the
fake clock, a passing fault ridden out with a doubling, bounded backoff, a step that is
not retriable ending the loop. No Kafka, no signal handlers (the test owns ``stop``)."""

from __future__ import annotations

import logging
import threading

import pytest

from pipeline.app import services
from pipeline.errors import ConfigError, KafkaUnavailableError
from tests.fake_time import FakeTime


class FakeService:
    def __init__(self, clock: FakeTime, stop: threading.Event, steps: int) -> None:
        self.clock, self.stop, self.steps = clock, stop, steps
        self.started = self.closed = False
        self.fail_at: dict[int, Exception] = {}
        self.n = 0

    def start(self) -> None:
        self.started = True

    def step(self) -> None:
        self.n += 1
        self.clock.advance(1.0)  # each step takes one fake second
        if self.n >= self.steps:
            self.stop.set()
        if self.n in self.fail_at:
            raise self.fail_at[self.n]

    def metrics(self) -> dict[str, float]:
        return {"n": self.n}

    def close(self) -> None:
        self.closed = True


def test_status_is_logged_every_ten_seconds_of_the_injected_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, stop = FakeTime(0.0), threading.Event()
    svc = FakeService(clock, stop, steps=35)
    with caplog.at_level(logging.INFO, logger="lowmark.services"):
        services._run_loop(svc, "", "fake", {}, clock.source(), stop)
    lines = [r.__dict__["n"] for r in caplog.records if r.getMessage() == "fake status"]
    assert lines == [10, 20, 30]  # at fake seconds 10, 20, 30; no real waiting
    assert svc.started and svc.closed


def test_passing_faults_back_off_doubling_and_a_hard_one_ends_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, stop = FakeTime(0.0), threading.Event()
    waits: list[float] = []
    monkeypatch.setattr(stop, "wait", lambda s: waits.append(s) or False)
    svc = FakeService(clock, stop, steps=100)
    svc.fail_at = {i: KafkaUnavailableError("election") for i in range(2, 10)}
    svc.fail_at[11] = KafkaUnavailableError("again")  # after a good step: from the start
    svc.fail_at[12] = ConfigError("bad setting")
    with pytest.raises(ConfigError):
        services._run_loop(svc, "", "fake", {}, clock.source(), stop)
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 0.05]
    assert svc.closed
