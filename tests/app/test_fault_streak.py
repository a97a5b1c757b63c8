"""A passing fault is said once, when it changes, every minute while it lasts, and when it
clears; never once per retry (a service retries every few seconds).

Tries to break: a streak at clock 0 (a falsy start), an error whose text changes mid-way,
a success that ends one streak and a new failure that starts the next from one attempt,
and the service loop logging a warning per attempt.
"""

from __future__ import annotations

import logging
import threading

import pytest

from pipeline.app import services
from pipeline.errors import KafkaUnavailableError
from pipeline.fault_streak import FaultStreak
from tests.app.test_run_loop_timing import FakeService
from tests.fake_time import FakeTime


def test_said_first_on_change_every_reminder_and_when_it_clears():
    t = [0.0]
    s = FaultStreak(lambda: t[0], remind_s=60)
    assert s.succeeded() is None  # no streak, nothing to say
    assert s.failed("down") == {"error": "down", "attempts": 1, "failing_for_s": 0.0}
    said = []
    for _ in range(100):  # 5 s apart for 500 s
        t[0] += 5
        said.append(s.failed("down"))
    reminders = [x for x in said if x is not None]
    assert [x["failing_for_s"] for x in reminders] == [60, 120, 180, 240, 300, 360, 420, 480]
    assert reminders[0]["attempts"] == 13
    t[0] += 1
    changed = s.failed("electing")
    assert changed is not None and changed["error"] == "electing" and changed["attempts"] == 102
    t[0] += 4
    assert s.succeeded() == {"attempts": 102, "failed_for_s": 505.0}
    assert s.succeeded() is None
    assert s.failed("down") == {"error": "down", "attempts": 1, "failing_for_s": 0.0}


def test_the_service_loop_says_a_long_fault_once_then_that_it_cleared(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, stop = FakeTime(0.0), threading.Event()
    monkeypatch.setattr(stop, "wait", lambda s: clock.advance(s) or False)
    svc = FakeService(clock, stop, steps=40)
    svc.fail_at = {i: KafkaUnavailableError("no broker answers") for i in range(2, 30)}
    with caplog.at_level(logging.INFO, logger="lowmark.services"):
        services._run_loop(svc, "", "fake", {}, clock.source(), stop, tried="bootstrap.servers=x")
    faults = [r for r in caplog.records if "passing fault" in r.getMessage()]
    assert len(faults) == 3, [r.__dict__.get("failing_for_s") for r in faults]  # 0, >60, >120 s
    assert faults[0].levelno == logging.WARNING and faults[0].tried == "bootstrap.servers=x"
    assert faults[0].error == "no broker answers"
    cleared = [r for r in caplog.records if r.getMessage() == "fake: the fault cleared"]
    assert len(cleared) == 1 and cleared[0].attempts == 28
