"""``lowmark migrate VOLUME --to INTERCEPTOR``: move a volume between two ``lowmark serve``.

The coordinator keeps no state of its own: it asks both interceptors where the volume
stands (over their admin sockets, ``ask``), does the step ``migrate_plan.next_step``
names, and asks again, so a run killed anywhere is completed by the next (or rolled back
by ``--abort``). The normal path:

1. ``prepare`` at the target: stage the volume inaccessible, copy the source's image,
   follow the CG's log (``migrate_sync``); ``wait`` until the copy is done, then a
   ``catch_up`` while the source still serves (what was written during the copy), so the
   cutover's own catch-up covers only its last moments, whatever the volume's size.
2. The cutover, the I/O pause: ``hold`` the source (its writes park, drain to Kafka; a
   lease, so a coordinator that dies here costs a pause, not the volume), ``catch_up``
   at the target (the log read to its end), ``release`` the source (its commit point:
   ``inaccessible``, clients told ESHUTDOWN and disconnected), ``activate`` the target
   (its commit point: ``optimized``, its clock above the source's final ts, one
   ``lowmark.config`` entry naming both access states).
3. ``forget`` at the source: its copy of the volume goes.

The volume's records go on in the same log, keyed by the same id, in ts order (every ts
of the target is above the source's final ts, and every record of the source is in Kafka
before the target writes): backups apply them as before, with no change of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import LowmarkError, MigrationError
from pipeline.logs import event
from pipeline.ops.migrate_plan import Side, next_step

__all__ = ["Ask", "MigrateResult", "migrate", "migration_id"]

log = logging.getLogger("lowmark.migrate")

#: one admin request to an interceptor -> its answer (``pipeline.app.admin``)
Ask = Callable[[dict[str, Any]], dict[str, Any]]
#: (step, the target's sync numbers) while the migration runs
Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class MigrateResult:
    volume: str
    source: str
    target: str
    migration: str
    outcome: str = ""  # migrated, rolled back
    io_pause_s: float | None = None  # hold -> activate, when this run did the cutover
    held_s: float | None = None  # what the source measured between hold and release
    cutover_ms: dict[str, float] = field(default_factory=dict)  # each cutover step's time
    #: the source's last ts for the volume: every record at or below it is the source's,
    #: every one above it the target's
    final_ts: int = 0
    copied_bytes: int = 0
    records_applied: int = 0
    steps: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def migration_id(volume: str, source: str, target: str) -> str:
    """The same for every run of one move, so a re-run continues it."""
    return f"{volume}@{source}->{target}"


def _call(ask: Ask, who: str, req: dict[str, Any]) -> dict[str, Any]:
    answer = ask(req)
    if not answer.get("ok"):
        raise MigrationError(f"{who}: {answer.get('error', answer)}")
    return answer


def migrate(
    volume: str, to: str, source: Ask, target: Ask, *, abort: bool = False,
    lease_s: float = 10.0, timeout_s: float = 900.0, attempts: int = 5,
    on_progress: Progress | None = None,
) -> MigrateResult:  # fmt: skip
    t0 = time.monotonic()
    src = _call(source, "source", {"op": "whoami"})
    dst = _call(target, "target", {"op": "whoami"})
    if dst["interceptor"] != to:
        raise MigrationError(f"the target admin socket answers for interceptor "
                             f"{dst['interceptor']!r}, not {to!r}: point --to-admin at "
                             f"{to}'s `lowmark serve`")  # fmt: skip
    if src["interceptor"] == to:
        raise MigrationError(f"volume {volume} would move from {to} to itself")
    if (src["cg"], src["generation"]) != (dst["cg"], dst["generation"]):
        raise MigrationError(f"source and target are not in the same CG generation "
                             f"({src['cg']} g{src['generation']} vs {dst['cg']} "
                             f"g{dst['generation']})")  # fmt: skip
    mid = migration_id(volume, src["interceptor"], to)
    res = MigrateResult(volume, src["interceptor"], to, mid)

    def step(ask: Ask, who: str, name: str, **kw: Any) -> dict[str, Any]:
        res.steps.append(name)
        return _call(ask, who, {"op": "migrate", "step": name, "volume": volume,
                                "migration": mid, **kw})  # fmt: skip

    cutovers = 0
    while True:
        if time.monotonic() - t0 > timeout_s:
            raise MigrationError(f"migration {mid} did not finish within {timeout_s:.0f} s "
                                 f"(steps: {res.steps[-6:]}); re-run it, or --abort")  # fmt: skip
        s = step(source, "source", "state")
        t = step(target, "target", "state")
        res.steps[-2:] = []  # a state question is not a step
        sync = t.get("sync") or {}
        res.copied_bytes = max(res.copied_bytes, sync.get("copied_bytes", 0))
        res.records_applied = max(res.records_applied, sync.get("records_applied", 0))
        plan = next_step(
            Side(s["state"], s.get("migration", "")),
            Side(t["state"], t.get("migration", ""), sync.get("phase", "")),
            mid,
            abort,
        )
        if on_progress is not None:
            on_progress(plan.action, sync)
        act = plan.action
        if act in ("done", "rolled back"):
            res.outcome = "migrated" if act == "done" else "rolled back"
            res.seconds = time.monotonic() - t0
            event(log, f"migration {res.outcome}", volume=volume, source=res.source,
                  target=to, io_pause_s=res.io_pause_s, seconds=round(res.seconds, 3))  # fmt: skip
            return res
        if act == "stuck":
            raise MigrationError(f"migration {mid} cannot go on: {plan.why}")
        if act == "wait":
            time.sleep(0.1)
        elif act == "prepare":
            image = s.get("image")
            step(target, "target", "prepare", info=s["info"], source_image=image,
                 peer=res.source)  # fmt: skip
        elif act == "hold":
            # the follower first reads what was written during the copy, with the source
            # still serving: the cutover's own catch-up is then only its last moments
            step(target, "target", "catch_up", timeout_s=max(60.0, timeout_s / 4),
                 held=False)  # fmt: skip
            cutovers += 1
            if cutovers > attempts:
                raise MigrationError(f"migration {mid}: {attempts} cutovers did not "
                                     "complete; the volume is served at the source. See the "
                                     "log above")  # fmt: skip
            _cutover(step, source, target, res, lease_s)
        elif act == "catch_up":  # a held source of this migration: the run before died here
            step(source, "source", "reclaim")
        elif act == "activate":
            step(target, "target", "activate", final_ts=s["final_ts"], source=res.source,
                 timeout_s=lease_s)  # fmt: skip
        elif act in ("forget", "reclaim"):
            step(source, "source", act)
        elif act == "unstage":
            step(target, "target", act)


def _cutover(step: Callable[..., dict[str, Any]], source: Ask, target: Ask, res: MigrateResult,
             lease_s: float) -> None:  # fmt: skip
    """hold -> catch_up -> release -> activate; any failure goes back to the loop, which
    asks both sides where they stand (a lost answer included) and goes on from there."""
    started = last = time.monotonic()

    def lap(name: str) -> None:
        nonlocal last
        now = time.monotonic()
        res.cutover_ms[name] = round((now - last) * 1000, 1)
        last = now

    try:
        held = step(source, "source", "hold", peer=res.target, lease_s=lease_s)
        lap("hold")
        res.final_ts = held["final_ts"]
        res.cutover_ms.update({f"hold.{k}": round(v, 1) for k, v in held.get("ms", {}).items()})
        step(target, "target", "catch_up", timeout_s=lease_s / 2, held=True)
        lap("catch_up")
        rel = step(source, "source", "release", peer=res.target)
        lap("release")
        act = step(target, "target", "activate", final_ts=held["final_ts"], source=res.source,
                   timeout_s=lease_s)  # fmt: skip
        lap("activate")
        res.cutover_ms.update({f"activate.{k}": round(v, 1) for k, v in act.get("ms", {}).items()})
    except LowmarkError as exc:
        event(log, "migration cutover interrupted; looking again", level=logging.WARNING,
              migration=res.migration, error=str(exc))  # fmt: skip
        return
    res.io_pause_s = round(time.monotonic() - started, 4)
    res.held_s = rel.get("held_s")
