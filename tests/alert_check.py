"""Fire lowmark's alert rules against real scrapes, with Prometheus' own rule engine.

A test records what lowmark's /metrics endpoints answered, phase by phase (healthy, then
with a condition provoked), as a timeline of scrapes; :meth:`Timeline.assert_firing`
turns it into a ``promtool test rules`` file (the scrapes as input series, the
deploy/ rule file as the rules) and asks which alerts fire when. Time is virtual: a scrape
is one evaluation interval, and :meth:`Timeline.hold` repeats the last one to stand for a
condition that lasts (a frozen W stays frozen; an RPO that passed its threshold only
grows, so repeating it is the cautious reading), which is what ``for:`` waits for.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "lowmark-alerts.yml"
INTERVAL_S = 15
PROMTOOL_VERSION = "v0.316.0"  # Prometheus 3.16's Go module version; see deploy/prometheus


def promtool() -> str:
    """The promtool ``make deps`` built (or one on PATH)."""
    cache = Path.home() / ".cache" / "lowmark" / "promtool" / PROMTOOL_VERSION / "promtool"
    for found in (cache, shutil.which("promtool")):
        if found and Path(found).exists():
            return str(found)
    pytest.skip("promtool is not built: `make deps` builds it with Go")


def _series_name(name: str, labels: Mapping[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _value(v: float | None) -> str:
    if v is None:
        return "_"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render(service: str, numbers: Mapping[str, object], labels: Mapping[str, str]) -> str:
    """What ``service``'s /metrics would answer for these numbers: lowmark's own exporter."""
    from prometheus_client import CollectorRegistry, generate_latest

    from pipeline.app.metrics import ServiceCollector

    registry = CollectorRegistry()
    registry.register(ServiceCollector(service, lambda: dict(numbers), labels))
    return generate_latest(registry).decode()


def fires_in_process(tmp: Path, service: str, numbers: Mapping[str, object],
                     labels: Mapping[str, str], alerts: set[str], hold_s: float = 600,
                     before: Mapping[str, object] | None = None) -> None:  # fmt: skip
    """A service object's numbers (in the provoked state) through the exporter: ``alerts``
    fire once the state has lasted ``hold_s``; with ``before``, nothing fired before."""
    tl = Timeline()
    expected: dict[int, set[str]] = {}
    job = (f"lowmark-{service}", "in-process")
    if before is not None:
        expected[tl.sample({job: render(service, before, labels)})] = set()
    tl.sample({job: render(service, numbers, labels)})
    last = tl.hold_for(hold_s)
    expected[last] = alerts
    # no alert expected: then none may fire either
    tl.assert_firing(tmp, expected, exact=set(expected) if not alerts else set(expected) - {last})


class Timeline:
    """Scrapes of lowmark's services over virtual time, one evaluation interval apart."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []  # series -> value, per step

    def sample(self, targets: Mapping[tuple[str, str], str | None]) -> int:
        """One scrape of every target ``(job, instance) -> /metrics text`` (None: the
        scrape failed, so Prometheus' ``up`` is 0); returns the step's index."""
        step: dict[str, float] = {}
        for (job, instance), text in targets.items():
            target = {"job": job, "instance": instance}
            step[_series_name("up", target)] = 0.0 if text is None else 1.0
            if text is None:
                continue
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name.endswith("_created"):
                        continue  # prometheus_client's counter creation time: not ours
                    step[_series_name(s.name, {**s.labels, **target})] = s.value
        self.steps.append(step)
        return len(self.steps) - 1

    def hold(self, steps: int) -> int:
        """The last scrape again for ``steps`` intervals: the condition lasts."""
        for _ in range(steps):
            self.steps.append(dict(self.steps[-1]))
        return len(self.steps) - 1

    def hold_for(self, seconds: float) -> int:
        return self.hold(math.ceil(seconds / INTERVAL_S))

    def at(self, step: int) -> str:
        return f"{step * INTERVAL_S}s"

    def promtool_test(
        self, expected: Mapping[int, set[str]], exact: Collection[int] = ()
    ) -> dict[str, object]:
        names = sorted({k for step in self.steps for k in step})
        series = [
            {"series": n, "values": " ".join(_value(step.get(n)) for step in self.steps)}
            for n in names
        ]
        tests: list[dict[str, object]] = []
        for step, alerts in sorted(expected.items()):
            if step in exact:  # the set of alerts firing then, no more and no fewer
                tests.append({
                    "expr": 'group by (alertname) (ALERTS{alertstate="firing"})',
                    "eval_time": self.at(step),
                    "exp_samples": [{"labels": f'{{alertname="{a}"}}', "value": 1}
                                    for a in sorted(alerts)],
                })  # fmt: skip
                continue
            for a in sorted(alerts):  # these fire then (others may too)
                tests.append({
                    "expr": f'group(ALERTS{{alertname="{a}",alertstate="firing"}})',
                    "eval_time": self.at(step),
                    "exp_samples": [{"labels": "{}", "value": 1}],
                })  # fmt: skip
        return {
            "rule_files": [str(RULES)],
            "evaluation_interval": f"{INTERVAL_S}s",
            "tests": [
                {"interval": f"{INTERVAL_S}s", "input_series": series, "promql_expr_test": tests}
            ],
        }

    def assert_firing(
        self, tmp: Path, expected: Mapping[int, set[str]], exact: Collection[int] = ()
    ) -> None:
        """At each step given, these alerts fire — exactly these at the ``exact`` steps
        (Prometheus' engine decides)."""
        path = tmp / "alerts-test.yml"
        path.write_text(yaml.safe_dump(self.promtool_test(expected, exact), sort_keys=False))
        out = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"[-6000:]


__all__ = ["INTERVAL_S", "Timeline", "fires_in_process", "promtool", "render"]
