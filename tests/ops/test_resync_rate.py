"""The resync's rate (pure, injected clock): tries to break the cap, the floor under
foreground load, and the token bucket's long-run rate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.ops.resync_rate import TokenBucket, eta_s, target_rate


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
