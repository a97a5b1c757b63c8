"""The pure rules of the roles of a consistency group: no I/O, no clock.

A CG starts in generation 0 (no record: primary unknown; ``initial_roles`` records it).
Each failover or switchover makes the next generation (``plan_failover``): the new
primary, the cut ``base_w`` it starts from and that cut's offsets in the previous
generation's log, and one more transition in the history. The rules that make a plan
safe to commit are checked here, before anything is written:

- the generation rises by exactly one, the history grows by exactly one entry;
- the new primary is not the current one (nothing to fail over to);
- the cut never goes below the current generation's ``base_w`` (the new generation must
  contain everything the current one started from);
- a switchover is planned, so it is never ``forced``.

``already_applied`` is the idempotency check: a failover re-run after a crash finds its own
change already committed and completes instead of bumping the generation twice.

``serving_generation`` is what a primary (``lowmark serve``) decides at start: which
generation it runs and the cut its clock starts above, or that it must not run at all
(its site is not the CG's primary any more).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import NamedTuple

from pipeline.errors import CorruptRecordError, RolesError
from schemas.records import CgRoles, Transition, TransitionKind
from schemas.ts import format_ts

__all__ = [
    "Serving",
    "already_applied",
    "initial_roles",
    "is_primary",
    "plan_failover",
    "serving_generation",
]


def initial_roles(cg: str, primary_site: str, *, now_us: int) -> CgRoles:
    """Generation 0 with ``primary_site`` recorded as its primary."""
    _site(primary_site, "primary site")
    _name(cg)
    return _checked(CgRoles(cg, 0, primary_site, 0, {}, (), _time(now_us)))


def plan_failover(
    current: CgRoles | None,
    cg: str,
    to_site: str,
    w: int,
    base_offsets: Mapping[int, int],
    forced: bool,
    now_us: int,
    *,
    kind: TransitionKind = TransitionKind.FAILOVER,
) -> CgRoles:
    """The next generation of ``cg`` after ``current`` (None: generation 0, never recorded),
    with ``to_site`` its primary from the cut ``w`` (whose offsets in the current
    generation's log are ``base_offsets``). Raises ``RolesError`` saying what to do."""
    _name(cg)
    _site(to_site, "site to fail over to")
    if current is not None and current.cg != cg:
        raise RolesError(
            f"the roles given are of CG {current.cg!r}, not {cg!r}: read the roles of {cg!r}"
        )
    if not isinstance(kind, TransitionKind):
        raise RolesError(f"unknown transition kind {kind!r}; use FAILOVER or SWITCHOVER")
    if kind is TransitionKind.SWITCHOVER and forced:
        raise RolesError(
            "a switchover stops the primary first, so it cannot be forced; use a failover "
            "(--force) when the primary cannot be reached"
        )
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise RolesError(f"the cut must be a ts >= 0, got {w!r}")
    offsets = dict(base_offsets)
    for p, off in offsets.items():
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise RolesError(f"base offsets name partition {p!r}: partitions are ints >= 0")
        if isinstance(off, bool) or not isinstance(off, int) or off < 0:
            raise RolesError(f"base offset of partition {p} is {off!r}: offsets are >= 0")
    generation = 0 if current is None else current.generation
    from_site = "" if current is None else current.primary_site
    if current is not None and to_site == current.primary_site:
        raise RolesError(
            f"site {to_site!r} is already the primary of CG {cg!r} (generation "
            f"{generation}): nothing to fail over; `lowmark roles show` prints the roles"
        )
    if current is not None and w < current.base_w:
        raise RolesError(
            f"the cut {w} is below {current.base_w}, where generation {generation} of CG "
            f"{cg!r} starts: a new generation must hold everything before its base; choose "
            f"a cut >= {current.base_w}"
        )
    transition = Transition(
        generation + 1, kind, from_site, to_site, w, bool(forced), _time(now_us)
    )
    history = () if current is None else current.history
    return _checked(
        CgRoles(cg, generation + 1, to_site, w, offsets, (*history, transition), now_us)
    )


def is_primary(roles: CgRoles | None, site: str) -> bool:
    """Whether ``site`` is the CG's recorded primary (never, when none is recorded)."""
    return roles is not None and roles.primary_site == site


def already_applied(current: CgRoles | None, planned: CgRoles) -> bool:
    """Whether ``current`` (the committed roles) already holds the change ``planned``: the
    same generation, made by the same transition from the same cut. Times are not compared
    (a re-run plans at a later time); everything that decides the data is."""
    if current is None or current.cg != planned.cg:
        return False
    return _identity(current) == _identity(planned)


def _identity(roles: CgRoles) -> CgRoles:
    last = roles.last_transition
    history = roles.history if last is None else (*roles.history[:-1], replace(last, at_us=0))
    return replace(roles, base_offsets=dict(roles.base_offsets), history=history, updated_us=0)


def _checked(roles: CgRoles) -> CgRoles:
    # the codec checks again when encoding; checking here makes a bad plan fail at once,
    # with the record's own words, before any Kafka client is made
    try:
        roles.check()
    except CorruptRecordError as exc:
        raise RolesError(f"the planned roles are impossible: {exc}") from None
    return roles


def _name(cg: str) -> None:
    if not isinstance(cg, str) or not cg:
        raise RolesError(f"consistency group name must be a non-empty string, got {cg!r}")


def _site(site: str, what: str) -> None:
    if not isinstance(site, str) or not site or site != site.strip():
        raise RolesError(f"the {what} must be a name without spaces around it, got {site!r}")


def _time(now_us: int) -> int:
    if isinstance(now_us, bool) or not isinstance(now_us, int) or now_us < 0:
        raise RolesError(f"now_us must be microseconds >= 0, got {now_us!r}")
    return now_us


class Serving(NamedTuple):
    """What a primary runs: the generation, and the ts every stamp is above (its base_w)."""

    generation: int
    clock_floor: int


def serving_generation(roles: CgRoles | None, cg: str, site: str) -> Serving:
    """The generation a primary at ``site`` ("" when not configured) runs for ``cg``, given
    the CG's latest ``roles`` (None: none recorded); ``RolesError`` when it must not run.

    - no roles: generation 0, as before roles existed;
    - ``site`` is the recorded primary: its generation, above its base_w;
    - generation 0 and no ``site``: generation 0 (roles recorded by ``roles init`` do not
      stop a primary that was never told its site);
    - otherwise (another site is the primary, or a failover happened and this primary does
      not say which site it is): refused, since no backup would ever apply its writes.
    """
    if roles is None:
        return Serving(0, 0)
    if roles.cg != cg:
        raise RolesError(f"the roles given are of CG {roles.cg!r}, not {cg!r}")
    if site and roles.primary_site == site:
        return Serving(roles.generation, roles.base_w)
    if roles.generation == 0 and not site:
        return Serving(0, 0)
    last = roles.last_transition
    since = (
        f" since the {last.kind.value.lower()} from {last.from_site or 'an unrecorded site'} "
        f"at W {last.w} ({format_ts(last.w)})"
        if last is not None
        else " (recorded by `lowmark roles init`)"
    )
    who = f"site {site!r} is" if site else "this primary (serve.site not set) is"
    fix = (
        "run `lowmark failback --site S --source-dir NEW_PRIMARY_DIR` to make this site a "
        "backup of the new primary (a delta resync), or "
        "fail over to this site"
        if roles.generation
        else f"set serve.site to {roles.primary_site!r} if this is that site"
    )
    raise RolesError(
        f"{who} not the primary of CG {cg!r}: generation {roles.generation}'s primary is "
        f"{roles.primary_site!r}{since}; writes here would never be replicated. Do not "
        f"serve here: {fix}. `lowmark roles show` prints the roles"
    )


def generation_at(roles: CgRoles | None, ts: int) -> int:
    """The generation whose log holds the cut at ``ts``: the newest generation g with
    base_w(g) < ts (its records all have ts > base_w(g)), or 0. A cut exactly at a
    generation's base_w is the previous generation's: the new one has nothing at or below."""
    if roles is None:
        return 0
    found = 0
    for t in roles.history:
        if t.w < ts:
            found = t.generation
    return found


def base_of(roles: CgRoles | None, generation: int) -> int:
    """base_w of ``generation`` (0 for generation 0)."""
    if generation == 0:
        return 0
    for t in roles.history if roles is not None else ():
        if t.generation == generation:
            return t.w
    raise RolesError(f"the roles record no transition that made generation {generation}")
