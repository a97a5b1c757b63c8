"""The resync's rate (pure, injected clock): tries to break the cap, the floor under
foreground load, and the token bucket's long-run rate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.ops.resync_rate import ForegroundMeter, Progress, TokenBucket, eta_s, target_rate
from tests.alert_check import Timeline, fires_in_process, render


def test_target_rate_yields_to_foreground_but_keeps_the_floor():
    assert target_rate(100, 10) == 100
    assert target_rate(100, 10, foreground_bps=60) == 40
    assert target_rate(100, 10, foreground_bps=1000) == 10
    assert target_rate(0, 0, foreground_bps=1000) == 0  # unlimited
    with pytest.raises(ConfigError):
        target_rate(10, 20)


@settings(max_examples=200, deadline=None)
@given(st.integers(1_000, 10_000_000), st.lists(st.integers(1, 1 << 20), min_size=1, max_size=60))
def test_bucket_never_beats_its_rate(rate, pieces):
    clock = 0.0
    bucket = TokenBucket(float(rate), clock)
    total = 0
    for n in pieces:
        clock += bucket.take(n, clock)  # the caller sleeps as told
        total += n
    # over the whole run the bytes spent never exceed the rate times the time plus a burst
    assert total <= rate * clock + rate * bucket.burst_s + max(pieces)
    assert total >= rate * clock - 1  # and the sleeps were not longer than needed


def test_unlimited_bucket_never_waits_and_eta():
    b = TokenBucket(0.0, 0.0)
    assert b.take(1 << 30, 0.0) == 0.0
    assert eta_s(50, 100, 10.0) == 5.0
    assert eta_s(0, 100, 0.0) is None
    assert eta_s(100, 100, 0.0) == 0.0


def test_foreground_meter_measures_the_log_growth_and_smooths_it():
    meter = ForegroundMeter(half_life_s=1.0)
    assert meter.observe(0.0, 1_000, 4096.0) == 0.0  # one sample: no rate yet
    assert meter.observe(1.0, 1_100, 4096.0) == pytest.approx(100 * 4096)  # first: as is
    # the writes stop: one half-life later the estimate has halved, not dropped to 0
    assert meter.observe(2.0, 1_100, 4096.0) == pytest.approx(50 * 4096)
    # a sample at the same instant or earlier (a clock step) changes nothing
    assert meter.observe(2.0, 9_999, 4096.0) == pytest.approx(50 * 4096)
    # offsets that went backwards (a recreated topic) count as no writes, never negative
    assert meter.observe(3.0, 10, 4096.0) == pytest.approx(25 * 4096)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 5.0), st.integers(0, 10_000)), min_size=2, max_size=40))
def test_foreground_meter_stays_between_the_rates_it_saw(steps):
    meter, now, offsets, rates = ForegroundMeter(), 0.0, 0, []
    meter.observe(now, offsets, 100.0)
    for dt, grew in steps:
        now, offsets = now + dt, offsets + grew
        rates.append(grew * 100.0 / dt)
        bps = meter.observe(now, offsets, 100.0)
        assert min(rates) - 1e-6 <= bps <= max(rates) + 1e-6


def test_a_stalled_resync_fires_its_alert_and_a_moving_one_does_not(tmp_path) -> None:
    """LowmarkResyncStalled, on what `lowmark failback --metrics` answers: bytes left and
    none copied for five minutes fires; a resync that copies each scrape never does."""
    labels = {"cg": "db", "site": "prod"}
    moving = Progress(bytes_planned=64 << 20)
    tl = Timeline()
    job = ("lowmark-failback", "in-process")
    for _ in range(40):  # ten minutes of a slow but moving copy
        moving.bytes_done += 1 << 20
        tl.sample({job: render("resync", moving.metrics(), labels)})
    moving_end = len(tl.steps) - 1
    tl.hold_for(660)  # then it stops copying, 24 MiB short
    tl.assert_firing(tmp_path, {moving_end: set(), len(tl.steps) - 1: {"LowmarkResyncStalled"}},
                     exact={moving_end})  # fmt: skip
    done = Progress(bytes_planned=1 << 20, bytes_done=1 << 20)  # finished: nothing left
    fires_in_process(tmp_path, "resync", done.metrics(), labels, set())
