"""A fake TimeSource for the services' timing tests: time moves only when a test (or a
``sleep`` the code under test calls) moves it, so no test waits for real."""

from __future__ import annotations

from pipeline.timesource import TimeSource


class FakeTime:
    """Monotonic seconds, a recording sleep that advances them, and wall µs that follow.

    ``step_s``: added on every ``monotonic()`` read (0: time stands still until moved),
    for code that loops until a deadline computed from the same clock.
    """

    def __init__(self, start_s: float = 1000.0, *, step_s: float = 0.0) -> None:
        self.t = start_s
        self.step_s = step_s
        self.slept: list[float] = []

    def monotonic(self) -> float:
        now = self.t
        self.t += self.step_s
        return now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += max(0.0, seconds)

    def wall_us(self) -> int:
        return 1_700_000_000_000_000 + int(self.t * 1e6)

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def source(self) -> TimeSource:
        return TimeSource(monotonic=self.monotonic, sleep=self.sleep, wall_us=self.wall_us)
