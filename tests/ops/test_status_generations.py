"""``lowmark status`` with generations, without Kafka: the roles line, the failover history
(one line per transition, rendered by ``lowmark roles``' renderer), and a site still in an
older generation (its lag is not counted in the current generation's records)."""

from __future__ import annotations

from typing import Any

import orjson
from click.testing import CliRunner

from pipeline.app.cli import main
from pipeline.app.cli_roles import render_roles
from pipeline.ops.status import render
from pipeline.topology.roles import initial_roles, plan_failover
from schemas.records import TransitionKind
from schemas.ts import format_ts

W1, W2 = (1_764_600_000_000_000 << 12) | 3, (1_764_600_100_000_000 << 12)


def _roles() -> Any:
    g0 = initial_roles("cg1", "main", now_us=1)
    g1 = plan_failover(g0, "cg1", "dr1", W1, {0: 5}, True, 1_764_600_050_000_000)
    return plan_failover(
        g1,
        "cg1",
        "main",
        W2,
        {0: 9, 1: 2},
        False,
        1_764_600_200_000_000,
        kind=TransitionKind.SWITCHOVER,
    )


def _status(roles: Any) -> dict[str, Any]:
    site = {
        "checkpoint_rpo_s": 1.5,
        "checkpoint_age_s": 0.2,
        "volumes": {},
    }
    return {
        "cg": "cg1",
        "time_us": 0,
        "generation": roles.generation,
        "primary_site": roles.primary_site,
        "base_w": roles.base_w,
        "base_w_time": format_ts(roles.base_w),
        "roles": roles,
        "w": None,
        "w_time": None,
        "rpo_s": None,
        "watermark_published_age_s": None,
        "interceptors": [],
        "log_end_offsets": {0: 3},
        "sites": {
            "dr2": {
                **site,
                "generation": 2,
                "checkpoint_w": W2,
                "lag_records": 0,
                "lag_bytes_estimate": 0,
            },
            "dr3": {
                **site,
                "generation": 1,
                "checkpoint_w": W1,
                "lag_records": None,
                "lag_bytes_estimate": None,
            },
        },
    }


def test_render_shows_roles_history_and_sites_per_generation() -> None:
    roles = _roles()
    st = _status(roles)
    st["roles_lines"] = render_roles("cg1", roles).splitlines()[1:]
    text = render(st)
    assert f"roles    generation 2, primary main, since W {format_ts(W2)}" in text
    lines = text.splitlines()
    hist = [ln for ln in lines if ln.strip().startswith("generation ")]
    assert len(hist) == 2, text
    assert "generation 1: FAILOVER main -> dr1 at W" in hist[0] and "forced" in hist[0]
    assert format_ts(W1) in hist[0] and "2025-12-01T14:" in hist[0]
    assert "generation 2: SWITCHOVER dr1 -> main" in hist[1] and "forced" not in hist[1]
    assert "site dr3" in text and "still in generation 1" in text
    assert "lag 0 records" in text


def test_status_command_json_and_text(monkeypatch: Any) -> None:
    roles = _roles()
    from pipeline.ops import status as st_mod

    monkeypatch.setattr(st_mod, "cg_status", lambda conf, cg, urls, local: _status(roles))
    args = ["status", "--cg", "cg1", "--bootstrap-servers", "127.0.0.1:1"]
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    doc = orjson.loads(res.output)
    assert doc["roles"]["generation"] == 2 and len(doc["roles"]["history"]) == 2
    assert doc["roles"]["history"][1]["kind"] == "SWITCHOVER"
    assert doc["sites"]["dr3"]["generation"] == 1
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "generation 1: FAILOVER main -> dr1" in res.output


def test_render_shows_a_resync_with_what_is_left_and_a_stalled_one_says_how_to_go_on() -> None:
    st = _status(_roles())
    st["resync"] = {
        "site": "main", "data_dir": "/d", "phase": "copy", "bytes_planned": 8 << 20,
        "bytes_left": 3 << 20, "rate_bps": 2e6, "eta_s": 1.5, "limit_bps": 3e6,
        "foreground_bps": 1e6, "silent_s": 0.4,
    }  # fmt: skip
    text = render(st)
    assert "RESYNC   site main (/d) is resyncing, not a backup until it ends" in text, text
    assert "phase copy, 3.0 of 8.0 MiB left, 2.00 MB/s, ETA 1500 ms" in text, text
    assert "(limit 3.00 MB/s, foreground 1.00 MB/s)" in text, text
    assert "no resync progress" not in text
    st["resync"] |= {"silent_s": 95.0}
    assert "no resync progress for 95.0 s" in render(st) and "run it again" in render(st)
    st["resync"] = {"site": "main", "data_dir": "/d", "silent_s": None}  # killed before any
    assert "phase plan" in render(st) and "no resync progress ever" in render(st)
    st["resync"] = None
    assert "RESYNC" not in render(st)
