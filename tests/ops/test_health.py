"""Green, amber, red: the judgement the console and status colour by (pure).

Tries to break: a site whose applier stopped answering shown green; a halted site or one
retention left behind shown anything but red; a reason that is not the worst one first;
a healthy CG flagged.
"""

from __future__ import annotations

import itertools

import pytest

from pipeline.ops.console_view import RpoHistory, SiteLive, build_view
from pipeline.ops.health import RPO_BAD_S, cg_health, site_health, worst

SITE = {"retention": "ok", "checkpoint_rpo_s": 0.5, "checkpoint_age_s": 0.4, "lag_records": 3,
        "generation": 0}  # fmt: skip
LIVE = {"lowmark_applier_rpo_seconds": 0.05, "lowmark_applier_halted": 0.0,
        "lowmark_applier_paused": 0.0}  # fmt: skip
CG = {"w": 1 << 40, "rpo_s": 0.02, "holds": [], "declared_lost": [], "resync": None}


def test_a_healthy_cg_and_site_are_green() -> None:
    assert cg_health(CG).level == "ok" and cg_health(CG).why == "healthy"
    assert site_health(SITE, LIVE, True).level == "ok"
    assert site_health(SITE, None, None).level == "ok"  # registers no /metrics: checkpoints


@pytest.mark.parametrize(
    ("site", "live", "answers", "level", "words"),
    [
        (SITE, None, False, "bad", "does not answer"),  # registered /metrics, silent
        ({**SITE, "retention": "lost"}, LIVE, True, "bad", "retention"),
        ({**SITE, "retention": "near"}, LIVE, True, "warn", "retention"),
        (SITE, {**LIVE, "lowmark_applier_halted": 1.0}, True, "bad", "halted"),
        (SITE, {**LIVE, "lowmark_applier_rpo_seconds": RPO_BAD_S + 1}, True, "bad", "RPO"),
        (SITE, {**LIVE, "lowmark_applier_rpo_seconds": 12.0}, True, "warn", "RPO"),
        (SITE, {**LIVE, "lowmark_applier_paused": 1.0}, True, "warn", "paused"),
        ({**SITE, "checkpoint_age_s": 120.0}, None, None, "warn", "checkpoint"),
        ({**SITE, "lag_records": None, "generation": 1}, LIVE, True, "warn", "generation 1"),
    ],
)
def test_each_trouble_colours_the_site(site, live, answers, level, words) -> None:
    h = site_health(site, live, answers)
    assert h.level == level and words in h.why, h


def test_the_worst_reason_comes_first_and_all_are_kept() -> None:
    h = site_health({**SITE, "retention": "near"}, {**LIVE, "lowmark_applier_halted": 1.0}, True)
    assert h.level == "bad" and "halted" in h.why and len(h.reasons) == 2


def test_cg_troubles() -> None:
    assert cg_health({**CG, "w": None}).level == "warn"
    held = cg_health({**CG, "holds": [{"id": "a", "volumes": ["v"]}]})
    assert held.level == "bad" and "fence a --declare-lost" in held.why
    assert cg_health({**CG, "rpo_s": 31.0}).level == "bad"
    assert cg_health({**CG, "resync": {"site": "p", "silent_s": 99.0}}).level == "warn"


def test_worst_of_any_order() -> None:
    hs = [site_health(SITE, LIVE, True), site_health(SITE, None, False),
          site_health({**SITE, "retention": "near"}, LIVE, True)]  # fmt: skip
    for order in itertools.permutations(hs):
        assert worst(*order).level == "bad"
    assert worst().level == "ok"


def test_the_view_names_the_laggard_and_colours_every_site() -> None:
    status = {**CG, "cg": "db", "generation": 2, "primary_site": "prod", "w_time": "t",
              "interceptors": [{"id": "a", "epoch": 1, "lag_s": 0.01},
                               {"id": "b", "epoch": 3, "lag_s": 0.9}],
              "sites": {"dr1": SITE, "dr2": SITE}}  # fmt: skip
    live = {"dr1": SiteLive(True, LIVE), "dr2": SiteLive(False, {})}
    v = build_view(status, live, ["g1 failover at ..."], 2)
    assert v["laggard"] == {"id": "b", "lag_s": 0.9}
    levels = {s["name"]: s["health"]["level"] for s in v["sites"]}
    assert levels == {"dr1": "ok", "dr2": "bad"} and v["overall"]["level"] == "bad"
    assert v["dead_letters"] == 2 and v["history"] == ["g1 failover at ..."]
    rs = {"site": "prod", "phase": "copy", "bytes_planned": 8, "bytes_left": 3, "silent_s": 1.0}
    assert build_view({**status, "resync": rs}, live, [], 0)["resync"] == rs  # its bar's data


def test_rpo_history_keeps_the_last_hour() -> None:
    h = RpoHistory(keep_s=60)
    for t in range(0, 200, 10):
        h.add(float(t), {"rpo_s": t / 100, "sites": [{"name": "dr1", "rpo_s": 0.1}]})
    got = h.to_json()
    assert got["t"][0] == 130.0 and got["t"][-1] == 190.0 and len(got["w"]) == 7
    assert got["sites"]["dr1"] == [0.1] * 7
