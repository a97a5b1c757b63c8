"""What a primary runs at start, from the CG's roles (``serving_generation``, pure).

Tries to break: an old primary restarted after a failover that starts anyway (in its old
generation, whose writes nobody applies, or in the new one, writing beside the new
primary), a primary without a site that runs a later generation, the new primary that
does not start above the cut its generation begins from, a deployment without roles or
with only `roles init`'s record that stops working.
"""

from __future__ import annotations

import pytest

from pipeline.errors import RolesError
from pipeline.topology.roles import Serving, initial_roles, plan_failover, serving_generation
from schemas.records import TransitionKind

G0 = initial_roles("cg1", "main", now_us=1)
G1 = plan_failover(G0, "cg1", "dr", 5_000 << 12, {0: 7}, True, 2)
G2 = plan_failover(G1, "cg1", "main", 6_000 << 12, {0: 3}, False, 3, kind=TransitionKind.SWITCHOVER)


def test_no_roles_is_generation_0_whatever_the_site() -> None:
    assert serving_generation(None, "cg1", "") == Serving(0, 0)
    assert serving_generation(None, "cg1", "anywhere") == (0, 0)


def test_generation_0_recorded_runs_its_primary_and_an_unnamed_one() -> None:
    assert serving_generation(G0, "cg1", "main") == (0, 0)
    assert serving_generation(G0, "cg1", "") == (0, 0)  # as before serve.site existed


def test_the_recorded_primary_runs_its_generation_above_its_base() -> None:
    assert serving_generation(G1, "cg1", "dr") == Serving(1, 5_000 << 12)
    assert serving_generation(G2, "cg1", "main") == Serving(2, 6_000 << 12)


@pytest.mark.parametrize(
    ("roles", "site", "words"),
    [
        (
            G1,
            "main",
            [
                "site 'main' is not the primary of CG 'cg1'",
                "generation 1's primary is 'dr'",
                "since the failover from main at W",
                "never be replicated",
                "lowmark failback",
                "fail over to this site",
            ],
        ),
        (G1, "", ["serve.site not set", "generation 1's primary is 'dr'"]),
        (
            G2,
            "dr",
            [
                "site 'dr' is not the primary",
                "generation 2's primary is 'main'",
                "switchover from dr",
            ],
        ),
        (G0, "dr", ["site 'dr' is not the primary", "roles init", "set serve.site to 'main'"]),
    ],
)
def test_any_other_site_is_refused_saying_what_to_do(roles, site, words) -> None:
    with pytest.raises(RolesError) as err:
        serving_generation(roles, "cg1", site)
    for w in words:
        assert w in str(err.value)


def test_roles_of_another_cg_are_refused() -> None:
    with pytest.raises(RolesError, match="roles given are of CG 'cg1', not 'cg2'"):
        serving_generation(G1, "cg2", "dr")
