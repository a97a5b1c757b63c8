"""The metric catalogue follows Prometheus' naming conventions, and /metrics renders it so.

Conventions (https://prometheus.io/docs/practices/naming/): base units in the name
(seconds, bytes), ``_total`` on counters and only on counters, a rate says ``per_second``.
"""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.app.metric_names import (
    COUNTERS,
    GAUGES,
    TIMESTAMPS,
    exported_name,
    from_scrape,
    metric,
)
from pipeline.app.metrics import ServiceCollector
from schemas.ts import make_ts

NAME = re.compile(r"^lowmark_[a-z]+_[a-z0-9_]+$")
KEYS = sorted(COUNTERS | GAUGES | set(TIMESTAMPS))


def test_the_sets_do_not_overlap() -> None:
    assert not COUNTERS & GAUGES
    assert not (COUNTERS | GAUGES) & set(TIMESTAMPS)


@pytest.mark.parametrize("key", KEYS)
def test_every_known_key_is_named_by_the_conventions(key: str) -> None:
    m = metric("applier", key)
    name = exported_name(m)
    assert m.known
    assert NAME.match(name), name
    assert name.endswith("_total") == (m.kind == "counter"), name
    # a unit, if the key has one, is the base unit spelled out
    assert not re.search(r"_(s|ms|us)(_total)?$", name), name
    assert "_per_s_" not in name + "_" and "_ms_" not in name + "_"
    if key.endswith("_per_s"):
        assert name.endswith("_per_second"), name
    elif key.endswith(("_s", "_ms")) and not m.timestamp:
        assert re.search(r"_seconds(_total)?$", name), name
    if m.timestamp:
        assert name.endswith("_timestamp_seconds")


def test_units_are_converted_to_base_units() -> None:
    m = metric("primary", "last_commit_ms")
    assert (m.name, m.kind) == ("lowmark_primary_last_commit_seconds", "gauge")
    assert m.value(250.0) == pytest.approx(0.25)
    assert metric("applier", "apply_bytes_per_s").name == "lowmark_applier_apply_bytes_per_second"
    blocked = metric("primary", "blocked_s")
    assert (exported_name(blocked), blocked.kind) == ("lowmark_primary_blocked_seconds_total",
                                                      "counter")  # fmt: skip
    assert metric("applier", "rpo_s").name == "lowmark_applier_rpo_seconds"


def test_an_hlc_position_is_its_physical_time_in_seconds() -> None:
    w = metric("watermark", "w")
    assert w.name == "lowmark_watermark_w_timestamp_seconds"
    ts = make_ts(1_764_000_000_123_456, 4000)  # the logical part is dropped, not rounded in
    assert w.value(float(ts)) == pytest.approx(1_764_000_000.123456, abs=1e-5)
    assert w.value(0.0) == 0.0  # no W yet: 0, not the epoch plus noise
    assert metric("primary", "s").name == "lowmark_primary_progress_timestamp_seconds"


def test_a_gauge_named_like_a_counter_is_renamed() -> None:
    m = metric("failover", "rollforward_bytes_total")
    assert (m.name, m.kind) == ("lowmark_failover_rollforward_bytes_planned", "gauge")


def test_an_unknown_key_is_flagged_and_still_exported_as_a_gauge() -> None:
    m = metric("applier", "something_new_s")
    assert not m.known
    assert (m.name, m.kind) == ("lowmark_applier_something_new_seconds", "gauge")


def _render(values: dict[str, object]) -> str:
    registry = CollectorRegistry()
    registry.register(ServiceCollector("applier", lambda: values, {"cg": "db", "site": "dr1"}))
    return generate_latest(registry).decode()


def test_metrics_endpoint_renders_types_units_and_parts() -> None:
    text = _render({
        "applied_ops": 7, "rpo_s": 0.5, "halted": False, "lag": {0: 3, 1: 4}, "holds": {},
        "error": "a text", "last_commit_ms": 12.0, "applied_w": make_ts(2_000_000, 1),
        "rpo_none": None,
    })  # fmt: skip
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["lowmark_applier_applied_ops"].type == "counter"
    assert 'lowmark_applier_applied_ops_total{cg="db",site="dr1"} 7.0' in text
    assert "# TYPE lowmark_applier_rpo_seconds gauge" in text
    assert 'lowmark_applier_halted{cg="db",site="dr1"} 0.0' in text
    assert 'lowmark_applier_lag{cg="db",part="1",site="dr1"} 4.0' in text
    assert 'lowmark_applier_last_commit_seconds{cg="db",site="dr1"} 0.012' in text
    assert 'lowmark_applier_applied_w_timestamp_seconds{cg="db",site="dr1"} 2.0' in text
    assert "lowmark_applier_up" in families
    # an empty per-part family still says what it is: an alert on it has a name to find
    assert "# TYPE lowmark_applier_holds gauge" in text
    assert "error" not in families and "a text" not in text


def test_a_scrape_reads_back_into_the_service_keys() -> None:
    text = _render({"applied_ops": 7, "last_commit_ms": 12.0, "rpo_s": 0.5})
    scraped = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    got = from_scrape("applier", scraped, ["applied_ops", "last_commit_ms", "rpo_s", "absent"])
    assert got == {"applied_ops": 7.0, "last_commit_ms": pytest.approx(12.0), "rpo_s": 0.5}
