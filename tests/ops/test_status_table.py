"""``lowmark status``'s terminal table: every line fits the width, colour only when
asked, and what the plain text and --json say is there.

Tries to break: a long interceptor id, site name, data dir or advice pushing a line past
80 columns; escape codes counted as columns; a halted or silent site not flagged.
"""

from __future__ import annotations

import random

import pytest

from pipeline.ops.status_table import render_table, visible_len

SITE = {"generation": 2, "checkpoint_rpo_s": 0.4, "checkpoint_age_s": 0.3, "lag_records": 12,
        "retention": "ok", "snapshots": 3, "last_snapshot": {"name": "nightly"}}  # fmt: skip


def status(rng: random.Random | None = None) -> dict:
    long = "x" * (rng.randrange(1, 90) if rng else 30)
    return {
        "cg": "db-" + long[:20], "generation": 2, "primary_site": "main", "base_w_time": "T",
        "roles_lines": ["  generation 1: FAILOVER main -> dr1 at W 2026-12-01T14:00:00Z, "
                        "forced, because the primary's host was lost " + long],
        "w": 1 << 50, "w_time": "2026-12-04T19:10:02.950Z", "rpo_s": 0.052,
        "watermark_published_age_s": 0.003,
        "interceptors": [{"id": "host-" + long, "epoch": 7, "lag_s": 0.05},
                         {"id": "b", "epoch": 1, "lag_s": 0.01}],
        "holds": [{"id": "host-" + long, "epoch": 7, "held_s": 12.0, "volumes": ["v1"]}],
        "declared_lost": [{"id": "old-" + long, "epoch": 2}],
        "last_marker": {"name": "m-" + long, "age_s": 3.0},
        "resync": {"site": "main", "phase": "copy", "bytes_planned": 8 << 20,
                   "bytes_left": 3 << 20, "rate_bps": 2e6, "eta_s": 1.5,
                   "data_dir": "/var/lib/" + long},
        "sites": {"dr1": SITE, "dr-" + long: {**SITE, "retention": "near"},
                  "dr3": {**SITE, "lag_records": None, "generation": 1}},
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("color", [False, True])
def test_every_line_fits_80_columns(seed: int, color: bool) -> None:
    st = status(random.Random(seed))
    text = render_table(st, {"dr1": {"lowmark_applier_rpo_seconds": 0.04}}, 80, color)
    for line in text.splitlines():
        assert visible_len(line) <= 80, repr(line)
    assert ("\x1b[" in text) == color


def test_the_table_says_what_matters() -> None:
    live = {"dr1": None, "dr3": {"lowmark_applier_halted": 1.0,
                                 "lowmark_applier_apply_bytes_per_second": 2e6}}  # fmt: skip
    text = render_table(status(), live, 80)
    lines = text.splitlines()
    assert lines[0].startswith("lowmark · db-") and lines[0].endswith("BAD")
    row = {ln.split()[0]: ln for ln in lines if ln.startswith("dr")}
    assert row["dr1"].split()[1] == "BAD"  # registered /metrics, did not answer
    assert "dr1: its applier does not answer" in text
    assert row["dr3"].split()[1] == "BAD" and "halted" in text and "2.0" in row["dr3"]
    assert "[############........]  62%" in text and "5.0/8.0 MiB" in text
    assert "--declare-lost" in text and "generation 1: FAILOVER main -> dr1" in text
    assert "laggard" in text and "HELD" in text


def test_a_healthy_cg_is_ok_and_green() -> None:
    st = {**status(), "holds": [], "declared_lost": [], "resync": None,
          "sites": {"dr1": SITE}}  # fmt: skip
    text = render_table(st, {"dr1": {"lowmark_applier_rpo_seconds": 0.04}}, 80, color=True)
    assert text.splitlines()[0].endswith("\x1b[32mOK\x1b[0m")
    assert "40 ms" in text
