"""The alert rules and the Grafana dashboard in deploy/ name metrics lowmark exports.

Tries to break: an expression that names a metric by an old or misspelt name (it would
never fire, or show an empty panel, on the day it is needed), a rule file Prometheus
refuses, a dashboard query without a datasource.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson
import yaml

from pipeline.app.metric_names import COUNTERS, GAUGES, TIMESTAMPS, exported_name, metric
from tests.alert_check import promtool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "lowmark-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "lowmark-dashboard.json"
SERVICES = ("primary", "watermark", "applier", "failover", "resync", "drill")
# the failover command's own prefixed numbers: its step timings and the roll-forward's
ROLLFORWARD = ("bytes_total", "bytes_done", "bytes_left", "extents_left", "extents_done",
               "batches", "spilled_bytes", "dropped_by_writes", "progress",
               "elapsed_s")  # fmt: skip
TIMINGS = ("planned_s", "indexed_s", "committed_s", "serving_s", "first_read_s", "writes_s",
           "rolled_forward_s")  # fmt: skip
# metrics Prometheus itself makes for every target
PROMETHEUS_OWN = {"up"}


def exported() -> set[str]:
    keys = set(COUNTERS | GAUGES | set(TIMESTAMPS))
    names = {exported_name(metric(s, k)) for s in SERVICES for k in keys}
    names |= {f"lowmark_{s}_up" for s in SERVICES}
    names |= {exported_name(metric("failover", f"rollforward_{k}")) for k in ROLLFORWARD}
    names |= {exported_name(metric("failover", f"failover_{k}")) for k in TIMINGS}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label values and strings dropped)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range durations
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", bare))
    return {w for w in words if w.startswith("lowmark_") or w in PROMETHEUS_OWN}


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = orjson.loads(DASHBOARD.read_bytes())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_the_extractor_sees_every_metric_and_nothing_else() -> None:
    expr = ('lowmark_a_x{cg=~"lowmark_not_me"} > 3 and changes(lowmark_b_y[5m]) == 0 '
            "or sum by (lowmark_label) (rate(lowmark_c_total[1m])) or up == 0")  # fmt: skip
    assert metric_names(expr) == {"lowmark_a_x", "lowmark_b_y", "lowmark_c_total", "up"}


def test_every_alert_names_only_exported_metrics() -> None:
    known = exported() | PROMETHEUS_OWN
    seen = set()
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: its expression names no metric"
        assert names <= known, f"{rule['alert']}: {sorted(names - known)} are not exported"
        seen.add(rule["alert"])
    # the conditions the operator must hear about have an alert each
    assert {"LowmarkRPOHigh", "LowmarkWatermarkFrozen", "LowmarkPrimaryFenced",
            "LowmarkInterceptorDeclaredLost", "LowmarkSiteNearRetention",
            "LowmarkApplierHalted", "LowmarkResyncStalled"} <= seen  # fmt: skip


def test_every_alert_tells_the_operator_what_to_do() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_dashboard_query_names_only_exported_metrics() -> None:
    known = exported() | PROMETHEUS_OWN
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: {expr!r} names no metric"
        assert names <= known, f"panel {title!r}: {sorted(names - known)} are not exported"


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dash = orjson.loads(DASHBOARD.read_bytes())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "cg"} <= names


def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_every_alert_is_made_to_fire_by_some_test() -> None:
    """Each alert's condition is provoked somewhere (tests/system/test_alerts_fire.py and
    the tests that provoke it in process); an alert added without one fails here."""
    others = [
        p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name
    ]
    for rule in rules():
        assert any(f'"{rule["alert"]}"' in text for text in others), rule["alert"]
