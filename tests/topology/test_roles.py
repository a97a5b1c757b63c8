"""The pure rules of a CG's roles (``pipeline.topology.roles``).

Tries to break: a failover that does not bump the generation by exactly one, loses or
rewrites history, lowers the cut a generation starts from, "fails over" to the current
primary, is forced as a switchover, or takes a nonsense cut, site or time; a re-run after
a crash that is not recognised as already applied (it would bump twice), or a different
change that is mistaken for it. Sequences of transitions come from hypothesis.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import KafkaError, RolesError
from pipeline.topology.roles import already_applied, initial_roles, is_primary, plan_failover
from schemas import codec
from schemas.records import CgRoles, Transition, TransitionKind

FAILOVER, SWITCHOVER = TransitionKind.FAILOVER, TransitionKind.SWITCHOVER


def test_initial_roles_are_generation_0_with_a_primary() -> None:
    r = initial_roles("cg1", "main", now_us=7)
    assert r == CgRoles("cg1", 0, "main", 0, {}, (), 7)
    assert is_primary(r, "main") and not is_primary(r, "dr") and not is_primary(None, "main")
    assert codec.decode(codec.encode(r), CgRoles) == r


def test_a_failover_makes_the_next_generation() -> None:
    g0 = initial_roles("cg1", "main", now_us=1)
    g1 = plan_failover(g0, "cg1", "dr", 500, {0: 10, 1: 4}, True, 20)
    assert (g1.generation, g1.primary_site, g1.base_w) == (1, "dr", 500)
    assert g1.base_offsets == {0: 10, 1: 4}
    assert g1.history == (Transition(1, FAILOVER, "main", "dr", 500, True, 20),)
    assert g1.updated_us == 20 and is_primary(g1, "dr") and not is_primary(g1, "main")
    g2 = plan_failover(g1, "cg1", "main", 500, {0: 3}, False, 30, kind=SWITCHOVER)
    assert g2.generation == 2 and g2.history[:1] == g1.history
    assert g2.last_transition == Transition(2, SWITCHOVER, "dr", "main", 500, False, 30)
    assert codec.decode(codec.encode(g2), CgRoles) == g2


def test_a_failover_of_a_cg_without_roles_starts_from_generation_0() -> None:
    g1 = plan_failover(None, "cg1", "dr", 9, {}, True, 5)
    assert g1.generation == 1 and g1.history[0].from_site == ""  # never recorded


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(to_site="main"), "already the primary.*nothing to fail over"),
        (dict(w=99), "below 100.*choose a cut >= 100"),
        (dict(cg="other"), "roles given are of CG 'cg1', not 'other'"),
        (dict(kind=SWITCHOVER, forced=True), "cannot be forced"),
        (dict(kind="FAILOVER"), "unknown transition kind"),
        (dict(w=-1), "cut must be a ts >= 0"),
        (dict(w=True), "cut must be a ts >= 0"),
        (dict(to_site=""), "site to fail over to"),
        (dict(to_site=" dr"), "site to fail over to"),
        (dict(cg=""), "non-empty string"),
        (dict(base_offsets={-1: 0}), "partition -1"),
        (dict(base_offsets={0: -5}), "offsets are >= 0"),
        (dict(now_us=-1), "now_us"),
    ],
)
def test_impossible_changes_are_refused_saying_what_to_do(change: dict, match: str) -> None:
    g1 = plan_failover(initial_roles("cg1", "dr", now_us=0), "cg1", "main", 100, {}, True, 1)
    args = dict(cg="cg1", to_site="dr2", w=100, base_offsets={}, forced=False, now_us=2)
    args.update(change)
    kind = args.pop("kind", FAILOVER)
    with pytest.raises(RolesError, match=match):
        plan_failover(g1, kind=kind, **args)  # type: ignore[arg-type]


def test_initial_roles_refuse_a_nonsense_primary() -> None:
    for site in ("", " a", None):
        with pytest.raises(RolesError):
            initial_roles("cg1", site, now_us=0)  # type: ignore[arg-type]
    with pytest.raises(RolesError, match="now_us"):
        initial_roles("cg1", "a", now_us=-3)


def test_a_rerun_after_a_crash_is_recognised_as_already_applied() -> None:
    g0 = initial_roles("cg1", "main", now_us=1)
    committed = plan_failover(g0, "cg1", "dr", 50, {0: 5}, True, 10)
    rerun = plan_failover(g0, "cg1", "dr", 50, {0: 5}, True, 99)  # planned again, later
    assert rerun != committed and already_applied(committed, rerun)
    assert already_applied(g0, initial_roles("cg1", "main", now_us=5))
    for other in (
        plan_failover(g0, "cg1", "dr2", 50, {0: 5}, True, 10),  # another site
        plan_failover(g0, "cg1", "dr", 51, {0: 5}, True, 10),  # another cut
        plan_failover(g0, "cg1", "dr", 50, {0: 6}, True, 10),  # other offsets
        plan_failover(g0, "cg1", "dr", 50, {0: 5}, False, 10),  # not forced
        plan_failover(g0, "cg1", "dr", 50, {0: 5}, False, 10, kind=SWITCHOVER),
        plan_failover(None, "cg1", "dr", 50, {0: 5}, True, 10),  # from another past
    ):
        assert not already_applied(committed, other), other
    assert not already_applied(None, committed)
    assert not already_applied(g0, committed), "the change is not committed yet"
    later = plan_failover(committed, "cg1", "main", 60, {}, True, 20)
    assert not already_applied(later, committed), "a newer generation is not this change"
    assert not already_applied(dataclasses.replace(committed, cg="cg2"), rerun)


# ---------------------------------------------------------------- sequences

SITES = st.sampled_from(["main", "dr1", "dr2", "dr3"])


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[str, int, bool, bool, int]]:
    return draw(
        st.lists(
            st.tuples(SITES, st.integers(-5, 50), st.booleans(), st.booleans(), st.integers(0, 99)),
            max_size=25,
        )
    )


@settings(max_examples=300, deadline=None)
@given(first=st.one_of(st.none(), SITES), seq=steps())
def test_any_sequence_of_changes_keeps_the_invariants(
    first: str | None, seq: list[tuple[str, int, bool, bool, int]]
) -> None:
    roles = None if first is None else initial_roles("cg", first, now_us=0)
    cut = 0
    for to_site, dw, forced, switchover, part in seq:
        kind = SWITCHOVER if switchover else FAILOVER
        before = roles
        w = cut + dw
        try:
            roles = plan_failover(before, "cg", to_site, w, {part: w}, forced, w, kind=kind)
        except RolesError:
            # refused exactly when a rule says so, and nothing changed
            assert (
                (before is not None and to_site == before.primary_site)
                or w < (before.base_w if before else 0)
                or (switchover and forced)
                or w < 0
            )
            continue
        gen = before.generation if before else 0
        assert roles.generation == gen + 1, "the generation rises by exactly one"
        assert roles.history[:-1] == (before.history if before else ()), "history only grows"
        assert len(roles.history) == len(before.history if before else ()) + 1
        assert roles.base_w >= (before.base_w if before else 0), "the cut never goes down"
        assert roles.primary_site == to_site and is_primary(roles, to_site)
        assert roles.last_transition is not None
        assert roles.last_transition.from_site == (before.primary_site if before else "")
        assert already_applied(roles, dataclasses.replace(roles, updated_us=roles.updated_us + 1))
        assert not already_applied(before, roles)
        assert codec.decode(codec.encode(roles), CgRoles) == roles
        cut = w
    if roles is not None:
        gens = [t.generation for t in roles.history]
        assert gens == list(range(1, roles.generation + 1))
        ws = [t.w for t in roles.history]
        assert ws == sorted(ws)


def test_a_commit_that_is_not_the_next_generation_is_refused_before_any_client() -> None:
    from pipeline.topology.store import RolesStore

    store = RolesStore({"bootstrap.servers": "127.0.0.1:1"}, timeout_s=0.1)  # no broker there
    g0 = initial_roles("cg1", "main", now_us=0)
    g1 = plan_failover(g0, "cg1", "dr", 5, {}, True, 1)
    from_none = plan_failover(None, "cg1", "dr", 5, {}, True, 1)
    bad = (
        ("cg1", 0, g0), ("cg1", None, g1), ("cg1", 1, g1), ("cg2", 0, g1), ("cg2", None, from_none)
    )  # fmt: skip
    for cg, expected, roles in bad:
        with pytest.raises(RolesError, match="plan it from the latest roles"):
            store.commit(cg, expected, roles)
    # generation 1 planned from no record is the successor of no record: it gets as far as
    # the client (and fails there, no broker), not refused as a plan
    with pytest.raises(KafkaError):
        store.commit("cg1", None, from_none)
