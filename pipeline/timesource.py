"""The time a service reads and waits on: one injectable ``TimeSource`` for every room."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


def wall_us() -> int:
    """The wall clock in µs since the Unix epoch."""
    return time.time_ns() // 1000


@dataclass(frozen=True)
class TimeSource:
    """The time a service reads and waits on, injected so a test can drive its timing
    decisions (fencing after liveness, checkpoint intervals, deadlines, backoff) with a
    fake clock instead of waiting. Every service takes one; the default is the real time.

    ``monotonic``: seconds, for intervals and deadlines. ``sleep``: seconds, a plain wait
    (waits that must wake on an event use the event with a timeout computed from
    ``monotonic``). ``wall_us``: µs since the Unix epoch, for what is written into
    records and reported (RPO); never for intervals.
    """

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    wall_us: Callable[[], int] = wall_us


#: the real time, the default of every service
REAL_TIME = TimeSource()
