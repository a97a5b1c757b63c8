"""Try to break the hybrid logical clock.

Arbitrary wall-clock sequences (stalls, backward jumps) must never make ``now()`` repeat or
go back; ``observe`` must be honoured; the logical counter must carry; a process restarted
from its state file, even with its wall clock moved back, must stay above every ts it
issued or observed before; threads must never share a ts; commit wait must wait exactly
long enough. Also the ts text format round trip.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ClockError
from pipeline.primary import clock as clock_mod
from pipeline.primary.clock import HybridClock
from schemas.ts import (
    LOGICAL_MASK,
    MAX_PHYSICAL_US,
    MAX_TS,
    format_ts,
    make_ts,
    parse_ts,
    ts_logical,
    ts_physical_us,
)

NOW_US = 1_760_000_000_000_000  # 2025-10


class FakeWall:
    """An injectable wall clock; ``sleep`` advances it, so commit_wait runs instantly."""

    def __init__(self, us: int = NOW_US) -> None:
        self.us = us
        self.slept_s = 0.0
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.us

    def sleep(self, seconds: float) -> None:
        self.slept_s += seconds
        self.us += max(1, int(seconds * 1e6))  # sleep(0) still lets a real clock move


# ---------------------------------------------------------------- ts encoding


@given(st.integers(0, MAX_PHYSICAL_US), st.integers(0, LOGICAL_MASK))
def test_make_ts_round_trip(physical: int, logical: int) -> None:
    ts = make_ts(physical, logical)
    assert 0 <= ts <= MAX_TS
    assert (ts_physical_us(ts), ts_logical(ts)) == (physical, logical)


@pytest.mark.parametrize(("physical", "logical"),
                         [(-1, 0), (MAX_PHYSICAL_US + 1, 0), (0, -1), (0, LOGICAL_MASK + 1)])
def test_make_ts_range(physical: int, logical: int) -> None:
    with pytest.raises(ValueError):
        make_ts(physical, logical)


@given(st.integers(0, MAX_TS))
def test_format_parse_round_trip(ts: int) -> None:
    text = format_ts(ts)
    assert text.endswith(f"Z+{ts_logical(ts)}")
    assert parse_ts(text) == ts
    assert parse_ts(str(ts)) == ts
    assert parse_ts(ts) == ts


def test_format_ts_order_matches_ts_order() -> None:
    # Fixed-width date part: text order is ts order within one logical width.
    a, b = make_ts(NOW_US, 3), make_ts(NOW_US + 1, 0)
    assert format_ts(a) < format_ts(b)


def test_parse_ts_forms() -> None:
    base = make_ts(1_778_312_125_000_000)  # 2026-05-09T07:35:25Z
    assert format_ts(base) == "2026-05-09T07:35:25.000000Z+0"
    assert parse_ts("2026-05-09T07:35:25Z") == base
    assert parse_ts("2026-05-09T07:35:25") == base  # no zone: UTC
    assert parse_ts("2026-05-09T09:35:25+02:00") == base
    assert parse_ts(" 2026-05-09T07:35:25.000001Z+7 ") == base + (1 << 12) + 7
    for bad in ("yesterday", "2026-05-09T07:35:25Z+x", "-1", "1969-12-31T23:59:59Z",
                "2026-05-09T07:35:25Z+4096", str(MAX_TS + 1), ""):
        with pytest.raises(ValueError):
            parse_ts(bad)


# ---------------------------------------------------------------- now / observe

WALL_STEPS = st.lists(
    st.one_of(
        st.integers(0, 50),              # forward a little, or stalled
        st.integers(-10**7, 0),          # backward jumps, up to 10 s
        st.just(0),
    ),
    min_size=1,
    max_size=300,
)


@given(WALL_STEPS)
def test_now_follows_the_hlc_rule(steps: list[int]) -> None:
    wall = FakeWall()
    clk = HybridClock(wall)
    prev = 0
    for step in steps:
        wall.us += step
        ts = clk.now()
        assert ts == max(wall.us << 12, prev + 1)  # the whole send rule, carry included
        assert ts > prev
        assert clk.last() == ts
        prev = ts


@given(st.lists(st.tuples(st.booleans(), st.integers(-10**6, 10**6)), min_size=1, max_size=200))
def test_observe_is_honoured(ops: list[tuple[bool, int]]) -> None:
    wall = FakeWall()
    clk = HybridClock(wall)
    floor = 0
    for is_observe, delta in ops:
        if is_observe:
            seen = max(0, make_ts(NOW_US) + (delta << 12) + (delta & LOGICAL_MASK))
            clk.observe(seen)
            floor = max(floor, seen)
            assert clk.last() == floor
        else:
            wall.us += delta // 1000
            ts = clk.now()
            assert ts > floor
            floor = ts


def test_observe_refuses_out_of_range() -> None:
    clk = HybridClock(FakeWall())
    for bad in (-1, MAX_TS + 1):
        with pytest.raises(ClockError):
            clk.observe(bad)


def test_logical_overflow_carries_into_physical() -> None:
    wall = FakeWall()
    clk = HybridClock(wall)
    issued = [clk.now() for _ in range(3 * 4096 + 5)]  # wall stalled
    assert issued == list(range(issued[0], issued[0] + len(issued)))
    assert ts_physical_us(issued[4095]) == NOW_US and ts_logical(issued[4095]) == 4095
    assert ts_physical_us(issued[4096]) == NOW_US + 1 and ts_logical(issued[4096]) == 0
    assert ts_physical_us(issued[-1]) == NOW_US + 3
    wall.us += 3  # wall reaches the carried physical part: logical keeps counting
    assert clk.now() == issued[-1] + 1
    wall.us += 1  # wall passes it: logical resets
    assert clk.now() == make_ts(NOW_US + 4)


def test_end_of_encoding_is_an_error() -> None:
    clk = HybridClock(FakeWall(MAX_PHYSICAL_US))
    clk.observe(MAX_TS)
    with pytest.raises(ClockError, match="2041"):
        clk.now()


# ---------------------------------------------------------------- persisted bound


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _bound(path: Path) -> int:
    return HybridClock._read_bound(path)


RUNS = st.lists(
    st.tuples(
        st.integers(-3_600_000_000, 3_000_000),   # wall jump before the restart (to 1 h back)
        st.lists(st.tuples(st.sampled_from(["now", "observe", "tick"]),
                           st.integers(0, 2_000_000)), max_size=30),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(RUNS)
def test_restart_never_goes_below_previous(runs: list[tuple[int, list[tuple[str, int]]]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "clock.json"
        wall = FakeWall()
        high = -1  # highest ts issued or observed by any earlier incarnation
        for jump, ops in runs:
            wall.us += jump
            clk = HybridClock(wall, state_path=path, reserve_us=500_000)
            assert clk.last() >= high
            for op, arg in ops:
                if op == "now":
                    ts = clk.now()
                    assert ts > high
                    # Durability before issue: the bound on disk is above what we got.
                    assert ts_physical_us(ts) < _bound(path)
                    high = ts
                elif op == "observe":
                    seen = clk.last() + arg
                    clk.observe(seen)
                    assert ts_physical_us(seen) < _bound(path)
                    high = max(high, seen)
                else:
                    wall.us += arg
            del clk  # crash: nothing is flushed on the way out


def test_one_fsync_per_reserve_interval(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real = HybridClock._write_bound

    def counting(path: Path, bound: int) -> None:
        writes.append(bound)
        real(path, bound)

    monkeypatch.setattr(HybridClock, "_write_bound", staticmethod(counting))
    wall = FakeWall()
    clk = HybridClock(wall, state_path=state_dir / "c", reserve_us=1_000_000)
    for _ in range(10_000):
        wall.us += 1_000  # 10 s of simulated time, 1 ms per call
        clk.now()
    assert 10 <= len(writes) <= 12
    assert writes == sorted(writes)


def test_unwritable_state_is_a_clock_error(state_dir: Path) -> None:
    blocker = state_dir / "file"
    blocker.write_text("x")
    bad = blocker / "clock.json"  # parent is a file: cannot be created by anyone, even root
    with pytest.raises(ClockError, match=str(bad)):
        HybridClock(FakeWall(), state_path=bad)


def test_unreadable_state_is_a_clock_error(state_dir: Path) -> None:
    path = state_dir / "clock.json"
    for content in ("", "{", '{"reserved_physical_us": -5}', '{"other": 1}', "[]"):
        path.write_text(content)
        with pytest.raises(ClockError, match=str(path)):
            HybridClock(FakeWall(), state_path=path)


def test_write_failure_mid_run_stops_issuing(state_dir: Path) -> None:
    wall = FakeWall()
    path = state_dir / "sub" / "clock.json"
    path.parent.mkdir()
    clk = HybridClock(wall, state_path=path, reserve_us=1000)
    before = clk.now()
    path.unlink()
    path.parent.rmdir()
    wall.us += 5000  # crosses the reserved bound: must persist, cannot
    with pytest.raises(ClockError, match="cannot persist"):
        clk.now()
    assert clk.last() == before


# ---------------------------------------------------------------- threads


def test_threads_get_unique_increasing_ts() -> None:
    clk = HybridClock()
    per_thread: dict[int, list[int]] = {}
    start = threading.Barrier(5)

    def issue(n: int) -> None:
        start.wait()
        got = [clk.now() for _ in range(20_000)]
        per_thread[n] = got

    def observer() -> None:
        start.wait()
        for _ in range(2_000):
            clk.observe(clk.last() + 4096)  # pushes the floor ~1 µs ahead each time

    threads = [threading.Thread(target=issue, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=observer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [ts for got in per_thread.values() for ts in got]
    assert len(set(every)) == len(every) == 80_000
    for got in per_thread.values():
        assert all(a < b for a, b in itertools.pairwise(got))


# ---------------------------------------------------------------- commit wait


@given(st.integers(0, 5_000), st.integers(-20_000, 20_000))
def test_commit_wait_with_injected_wall(skew: int, ahead: int) -> None:
    wall = FakeWall()
    clk = HybridClock(wall, max_clock_skew_us=skew, sleep=wall.sleep)
    ts = make_ts(NOW_US + ahead, 17)
    expected = max(0, NOW_US + ahead + skew + 1 - NOW_US)
    assert clk.commit_wait_us(ts) == expected
    clk.commit_wait(ts)
    assert wall.us > ts_physical_us(ts) + skew
    assert clk.commit_wait_us(ts) == 0
    if expected == 0:
        assert wall.slept_s == 0  # no sleep, no yield when nothing to wait for
    # It never oversleeps by more than the spin window it leaves for itself.
    assert wall.us - (NOW_US + expected) <= 2_000


def test_commit_wait_timeout() -> None:
    wall = FakeWall()
    clk = HybridClock(wall, max_clock_skew_us=0, sleep=wall.sleep)
    ts = make_ts(NOW_US + 10_000_000)  # 10 s ahead: the clock stepped back
    with pytest.raises(ClockError, match="NTP"):
        clk.commit_wait(ts, timeout_s=1.0)
    assert wall.slept_s == 0


def test_commit_wait_real_clock() -> None:
    clk = HybridClock(max_clock_skew_us=3_000)
    ts = clk.now()
    t0 = time.monotonic()
    clk.commit_wait(ts)
    waited = time.monotonic() - t0
    assert clock_mod.wall_us() > ts_physical_us(ts) + 3_000
    assert 0.002 <= waited < 0.5
    assert HybridClock().commit_wait_us(HybridClock().now() - (1 << 12)) == 0
