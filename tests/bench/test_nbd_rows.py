"""bench/nbd's latency rows: which jobs run at which rate, and the ratio they report."""

from __future__ import annotations

import pytest

from bench.kafka_perf import JavaProducerRun
from bench.nbd import LATENCY_SHARES, add_latency_ratios, rate_jobs


def run(size: int, mib_s: float) -> JavaProducerRun:
    return JavaProducerRun(size, 1000, mib_s * (1 << 20) / size, mib_s, {}, 1.0, 5.0, {})


def test_rate_jobs_take_shares_of_the_ceiling_at_their_write_size() -> None:
    jobs = rate_jobs({4096: run(4096, 100.0), 65536: run(65536, 200.0), 1 << 20: run(1 << 20, 9)})
    got = [(j.name, j.share, j.rate_bytes_s) for j in jobs]
    assert [g[1] for g in got] == list(LATENCY_SHARES) * 2
    assert got[1] == ("4k-randwrite-qd16", 0.5, 50 << 20)
    assert got[4] == ("64k-write-qd16", 0.5, 100 << 20)
    assert all(j.iodepth == 16 for j in jobs)
    assert rate_jobs({}) == []  # no ceiling (replication off): no latency rows


def test_p99_ratio_is_against_nbdkit_at_the_same_job_and_rate() -> None:
    rows = [
        {"job": "j", "share": 0.5, "target": "nbdkit", "p99_us": 100.0},
        {"job": "j", "share": 0.5, "target": "lowmark-repl", "p99_us": 250.0},
        {"job": "j", "share": 0.25, "target": "lowmark-repl", "p99_us": 90.0},
    ]
    add_latency_ratios(rows)
    assert rows[1]["p99_x_nbdkit"] == pytest.approx(2.5)
    assert rows[2]["p99_x_nbdkit"] is None  # no nbdkit row at that rate
