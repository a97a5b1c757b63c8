"""The next step of a volume migration, from where each side says it stands. Pure.

``lowmark migrate`` asks both interceptors (``MigrationMember.state``) and does what
``next_step`` says, again and again, until it says ``done`` or ``rolled back``. Nothing
is remembered by the coordinator itself: a run killed anywhere is continued by the next
one, which asks again. The steps keep the single-writer rule:

- the target activates only once the source released (durably: its catalog), so at
  most one side is ever ``optimized``; between the two, neither is (the I/O pause);
- an abort unstages the target *before* the source reclaims, and a target that is
  already active is never rolled back (migrate the volume back instead);
- both ``served`` and ``active`` at once is reported, never acted on: it cannot be
  reached through these steps, and guessing which side is right could lose writes.

Source states: ``served``, ``held``, ``released``, ``absent``. Target states: ``absent``,
``staged`` with a sync phase (``copying``/``starting``, ``following``, ``failed``,
``stopped``: the target restarted and its follower is gone), ``served`` (active).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Side", "Step", "next_step"]

#: what the coordinator does next
STEPS = (
    "prepare",  # target: stage and sync (again)
    "wait",  # target: still copying
    "hold",  # source: quiesce and drain
    "catch_up",  # target: read the log to its end while the source holds
    "release",  # source: commit point
    "activate",  # target: commit point
    "forget",  # source: drop its copy
    "unstage",  # target: drop the stage (abort)
    "reclaim",  # source: serve it again (abort)
    "done",
    "rolled back",
    "stuck",  # a state no step leads to: say so, touch nothing
)


@dataclass(frozen=True)
class Side:
    state: str  # see the module doc
    migration: str = ""  # the migration id this side's state belongs to ("" if none)
    phase: str = ""  # a staged target's sync phase


@dataclass(frozen=True)
class Step:
    action: str
    why: str = ""


def next_step(source: Side, target: Side, migration: str, abort: bool = False) -> Step:
    s, t = source.state, target.state
    if s == "served" and t == "served":
        return Step("stuck", "both interceptors serve the volume: stop the clients of one "
                    "and compare the images before doing anything else")  # fmt: skip
    if t == "served":
        if abort:
            return Step("stuck", "the target is already active: the migration completed; "
                        "migrate the volume back to undo it")  # fmt: skip
        if s == "released":
            return Step("forget")
        if s == "absent":
            return Step("done")
        return Step("stuck", f"the target is active while the source is {s}")
    if abort:
        if t == "staged":
            return Step("unstage")
        if s in ("held", "released"):
            return Step("reclaim")
        if s == "served":
            return Step("rolled back")
        return Step("stuck", "the volume is at neither interceptor")
    if s == "absent":
        return Step("stuck", "the source does not have the volume and the target is not "
                    f"serving it (target: {t})")  # fmt: skip
    staged_here = t == "staged" and target.migration == migration
    if not staged_here or target.phase in ("failed", "stopped"):
        if s == "held":
            return Step("reclaim", "the target lost its stage: serve the volume again first")
        return Step("prepare")
    if target.phase in ("starting", "copying"):
        return Step("wait")
    if s == "served":
        return Step("hold")
    if s == "held":
        return Step("catch_up") if source.migration == migration else Step("reclaim")
    return Step("activate")  # released, target following
