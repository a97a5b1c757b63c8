"""The failover's state file and its re-run rules (``decide``), without a broker.

Tries to break: a re-run that commits a second generation, continues a failover whose
roles were superseded, serves after another site took over before the commit, or trusts
an unreadable or foreign state file; a state that goes back a phase.
"""

from __future__ import annotations

import itertools

import pytest

from pipeline.errors import FailoverError
from pipeline.ops import failover_state as fs
from pipeline.ops.failover_state import Action, FailoverRecord, Phase
from pipeline.topology.roles import initial_roles, plan_failover

CUT = 5_000_000 << 16


def _record(phase: Phase = Phase.PLANNED, **kw: object) -> FailoverRecord:
    base = {
        "cg": "cg1",
        "site": "dr1",
        "generation": 1,
        "from_generation": 0,
        "from_site": "prod",
        "cut_ts": CUT,
        "how": "latest",
        "marker": None,
        "published_w": CUT,
        "base_offsets": {0: 10, 1: 12},
        "site_w": CUT - 100,
        "site_offsets": {0: 3, 1: 4},
        "forced": True,
        "interceptor_id": "dr1",
        "started_us": 1,
    }
    base.update(kw)
    return FailoverRecord(**base).at(phase, 2)  # type: ignore[arg-type]


GEN0 = initial_roles("cg1", "prod", now_us=1)
OURS = plan_failover(GEN0, "cg1", "dr1", CUT, {0: 10, 1: 12}, True, 3)
THEIRS = plan_failover(GEN0, "cg1", "dr2", CUT, {0: 10, 1: 12}, True, 3)
OURS_OTHER_CUT = plan_failover(GEN0, "cg1", "dr1", CUT - 7, {0: 10, 1: 12}, True, 3)
LATER = plan_failover(OURS, "cg1", "dr2", CUT + 9, {0: 1}, True, 4)


def test_no_state_starts_unless_the_site_is_already_primary():
    for roles in (None, GEN0, THEIRS):
        assert fs.decide(None, roles, "dr1").action is Action.START
    with pytest.raises(FailoverError, match="already the primary"):
        fs.decide(None, OURS, "dr1")


@pytest.mark.parametrize("phase", list(Phase))
def test_committed_roles_continue_from_the_recorded_phase(phase):
    d = fs.decide(_record(phase), OURS, "dr1")
    if phase is Phase.PLANNED:
        assert d.action is Action.COMMIT  # committed before the crash, not recorded
    elif phase is Phase.ROLLED_FORWARD:
        assert d.action is Action.DONE
    else:
        assert d.action is Action.CONTINUE
    assert d.record is not None and d.record.phase is phase


def test_planned_and_not_committed_commits_the_same_plan():
    for roles in (None, GEN0):
        d = fs.decide(_record(), roles, "dr1")
        assert d.action is Action.COMMIT and d.record is not None
        assert d.record.cut_ts == CUT  # the same cut, not a new one


@pytest.mark.parametrize("roles", [THEIRS, OURS_OTHER_CUT, LATER])
def test_superseded_before_the_commit_refuses_and_says_nothing_changed(roles):
    with pytest.raises(FailoverError, match="nothing was changed"):
        fs.decide(_record(Phase.PLANNED), roles, "dr1")


@pytest.mark.parametrize(
    ("phase", "roles"),
    list(itertools.product([Phase.COMMITTED, Phase.CHANGES_APPLIED, Phase.ROLLED_FORWARD],
                           [None, GEN0, THEIRS, LATER, OURS_OTHER_CUT])),
)  # fmt: skip
def test_superseded_after_the_commit_never_serves(phase, roles):
    with pytest.raises(FailoverError, match=r"superseded|rejoin"):
        fs.decide(_record(phase), roles, "dr1")


def test_a_state_of_another_site_is_refused():
    with pytest.raises(FailoverError, match=r"for site .dr1., not .dr2."):
        fs.decide(_record(), OURS, "dr2")


def test_phases_only_move_forward():
    r = _record(Phase.CHANGES_APPLIED)
    assert r.at(Phase.ROLLED_FORWARD, 9).phase is Phase.ROLLED_FORWARD
    assert r.at(Phase.CHANGES_APPLIED, 9).phase is Phase.CHANGES_APPLIED
    with pytest.raises(FailoverError, match="cannot go back"):
        r.at(Phase.COMMITTED, 9)


def test_state_file_round_trips_and_bad_files_are_refused(tmp_path):
    assert fs.load(tmp_path) is None
    r = _record(Phase.COMMITTED)
    fs.save(tmp_path, r)
    assert fs.load(tmp_path) == r
    path = fs.state_path(tmp_path)
    for bad in (b"", b"{", b"[]", b'{"format": 99}', r.to_json().replace(b'"format": 1', b"")):
        path.write_bytes(bad)
        with pytest.raises(FailoverError, match=r"unreadable.*move the file away"):
            fs.load(tmp_path)
