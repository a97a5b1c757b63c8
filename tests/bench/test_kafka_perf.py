"""The ceiling's parser and ratios, on ProducerPerformance's own words (no JVM here; the
benches run the real tool).

Tries to break: a progress line taken for the summary, an output with no summary (a
failed run must not pass as a zero rate), MB/sec read as 10^6 bytes, CPU per MiB with
no CPU reading.
"""

from __future__ import annotations

import pytest

from bench.kafka_perf import JavaProducerRun, parse_summary
from bench.nbd import add_java_ratios

OUTPUT = """\
88593 records sent, 17715.1 records/sec (69.20 MB/sec), 235.3 ms avg latency, 455.0 ms max latency.
131072 records sent, 26172.9 records/sec (102.24 MB/sec), 151.25 ms avg latency, 455.00 ms max \
latency, 123 ms 50th, 366 ms 95th, 421 ms 99th, 450 ms 99.9th.
"""


def test_a_short_run_is_read_from_its_summary_line():
    s = parse_summary(OUTPUT)
    assert s["records"] == 131072 and s["rps"] == 26172.9 and s["mbps"] == 102.24
    assert (s["p50"], s["p95"], s["p99"], s["p999"]) == (123, 366, 421, 450)


def test_no_summary_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="no ProducerPerformance summary"):
        parse_summary("Exception in thread main: org.apache.kafka...TimeoutException\n")


def run(mib_per_s: float, cpu_s: float | None, records: int = 1024) -> JavaProducerRun:
    return JavaProducerRun(record_size=1 << 20, records=records, records_per_s=0,
                           mib_per_s=mib_per_s, latency_ms={}, cpu_s=cpu_s, wall_s=1,
                           props={})  # fmt: skip


def test_ratios_against_the_java_producer():
    java = run(mib_per_s=100.0, cpu_s=2.0)  # 1 GiB sent: 2 ms of CPU per MiB
    assert java.cpu_s_per_mib == pytest.approx(2.0 / 1024)
    row = {"target": "lowmark-repl", "mb_s": 104.8576, "seconds": 10.0, "server_cpu_s": 4.0}
    add_java_ratios(row, java)
    assert row["x_java"] == pytest.approx(1.0)  # 104.86 MB/s (10^6) is 100 MiB/s
    assert row["cpu_s_per_mib"] == pytest.approx(4.0 / 1000)
    assert row["cpu_per_mib_x_java"] == pytest.approx((4.0 / 1000) / (2.0 / 1024))
    # not a replicating row, or no CPU reading: no ratio claimed
    other = {"target": "nbdkit", "mb_s": 500.0, "seconds": 10.0, "server_cpu_s": 1.0}
    add_java_ratios(other, java)
    assert "x_java" not in other
    blind = {"target": "lowmark-repl", "mb_s": 50.0, "seconds": 10.0, "server_cpu_s": 1.0}
    add_java_ratios(blind, run(mib_per_s=100.0, cpu_s=None))
    assert blind["cpu_per_mib_x_java"] is None and blind["x_java"] is not None


def test_a_longer_run_is_its_steady_windows():
    windows = OUTPUT.splitlines()[0] + "\n" + OUTPUT.splitlines()[0].replace("88593", "90000") \
        .replace("69.20", "71.00").replace("17715.1", "18000.0") + "\n"  # fmt: skip
    s = parse_summary(windows)
    assert s["records"] == 88593 + 90000
    assert s["mbps"] == 71.00  # the first window (JIT warm-up) is left out of the rate
    assert "p99" not in s
    # with the summary too, the windows win: the summary averages in the warm-up
    assert parse_summary(windows + OUTPUT.splitlines()[1] + "\n")["mbps"] == 71.00
