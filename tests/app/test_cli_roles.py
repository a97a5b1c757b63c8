"""What `lowmark roles show` prints, without a broker (tests/topology/test_store.py runs the
command against one).

Tries to break: a CG without roles shown as anything but generation 0 with no primary, a
history entry missing its kind, sites, cut or forced flag, JSON that does not parse.
"""

from __future__ import annotations

import orjson

from pipeline.app.cli_roles import render_roles, roles_json
from pipeline.topology.roles import initial_roles, plan_failover
from schemas.records import TransitionKind


def test_no_roles_is_generation_0_without_a_primary() -> None:
    assert render_roles("cg1", None) == "consistency group cg1: generation 0, no roles recorded"
    out = roles_json("cg1", None)
    assert (out["generation"], out["primary_site"], out["recorded"]) == (0, None, False)


def test_roles_and_history_are_shown() -> None:
    g0 = initial_roles("cg1", "main", now_us=1)
    assert render_roles("cg1", g0) == "consistency group cg1: generation 0, primary main"
    g1 = plan_failover(g0, "cg1", "dr", 4096, {1: 3}, True, 2)
    g2 = plan_failover(g1, "cg1", "main", 8192, {}, False, 3, kind=TransitionKind.SWITCHOVER)
    text = render_roles("cg1", g2)
    assert text.splitlines()[0] == "consistency group cg1: generation 2, primary main"
    assert "generation 1: FAILOVER main -> dr at W 4096, forced" in text
    assert "generation 2: SWITCHOVER dr -> main at W 8192" in text
    assert "forced" not in text.splitlines()[-1]
    parsed = orjson.loads(orjson.dumps(roles_json("cg1", g1), option=orjson.OPT_NON_STR_KEYS))
    assert parsed["base_offsets"] == {"1": 3} and parsed["recorded"] is True
    assert parsed["history"] == [
        {"generation": 1, "kind": "FAILOVER", "from_site": "main", "to_site": "dr",
         "w": 4096, "forced": True, "at_us": 2}
    ]
