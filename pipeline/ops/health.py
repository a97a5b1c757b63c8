"""Green, amber, red: how healthy a CG and each of its sites are, from ``cg_status``.

Pure (no I/O): ``lowmark console`` colours its page and ``lowmark status`` its table from
the same judgement, and the thresholds are the alert rules' (deploy/prometheus), so the
wall, the terminal and the pager agree. Each verdict carries the reason an operator acts
on, the worst one first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["ok", "warn", "bad"]
ORDER: dict[Level, int] = {"ok": 0, "warn": 1, "bad": 2}

#: the RPO an operator is paged for (LowmarkRPOHigh) and the one they should look at
RPO_BAD_S = 30.0
RPO_WARN_S = 10.0
#: a checkpoint this old means the site's applier is not running (or not checkpointing)
CHECKPOINT_STALE_S = 30.0


@dataclass(frozen=True)
class Health:
    level: Level = "ok"
    reasons: tuple[str, ...] = field(default=())

    @property
    def why(self) -> str:
        return self.reasons[0] if self.reasons else "healthy"


class _Verdict:
    def __init__(self) -> None:
        self.found: list[tuple[Level, str]] = []

    def add(self, level: Level, why: str) -> None:
        self.found.append((level, why))

    def health(self) -> Health:
        if not self.found:
            return Health()
        ranked = sorted(self.found, key=lambda f: -ORDER[f[0]])
        return Health(ranked[0][0], tuple(why for _lvl, why in ranked))


def _rpo(v: _Verdict, rpo_s: float | None, what: str) -> None:
    if rpo_s is None:
        return
    if rpo_s > RPO_BAD_S:
        v.add("bad", f"{what} RPO {rpo_s:.0f} s, above {RPO_BAD_S:.0f} s")
    elif rpo_s > RPO_WARN_S:
        v.add("warn", f"{what} RPO {rpo_s:.0f} s")


def cg_health(status: Mapping[str, Any]) -> Health:
    """The CG as a whole: W exists and moves, nothing holds it, its RPO."""
    v = _Verdict()
    if status.get("w") is None:
        v.add("warn", "no W published yet: is the watermark service running?")
    _rpo(v, status.get("rpo_s"), "W")
    for h in status.get("holds", ()):
        if h.get("volumes"):
            v.add("bad", f"W held by interceptor {h['id']}: restart it on its disk, or "
                  f"`lowmark fence {h['id']} --declare-lost`")  # fmt: skip
    if status.get("declared_lost"):
        v.add("warn", f"{len(status['declared_lost'])} interceptor(s) declared lost")
    rs = status.get("resync")
    if rs is not None and (rs.get("silent_s") is None or rs["silent_s"] > CHECKPOINT_STALE_S):
        v.add("warn", f"resync of {rs.get('site') or '?'} is not reporting: run "
              "`lowmark failback` again")  # fmt: skip
    return v.health()


def site_health(site: Mapping[str, Any], live: Mapping[str, float] | None,
                answers: bool | None) -> Health:  # fmt: skip
    """One backup site: ``site`` is its entry in ``cg_status``'s sites, ``live`` its
    applier's scrape (None: not scraped), ``answers`` whether its registered /metrics
    answered (None: it registers none)."""
    v = _Verdict()
    if site.get("retention") == "lost":
        v.add("bad", "retention deleted records it needs: rebuild it from a peer")
    elif site.get("retention") == "near":
        v.add("warn", "near the log's retention: start its applier or raise retention")
    if answers is False:
        v.add("bad", "its applier does not answer /metrics (stopped?)")
    if live:
        if live.get("lowmark_applier_halted") == 1.0:
            v.add("bad", "applier halted on a record it cannot apply (see its log)")
        _rpo(v, live.get("lowmark_applier_rpo_seconds"), "applied")
        if live.get("lowmark_applier_paused") == 1.0:
            v.add("warn", "paused (`lowmark resume` to apply again)")
    else:
        _rpo(v, site.get("checkpoint_rpo_s"), "checkpoint")
    age = site.get("checkpoint_age_s")
    if age is not None and age > CHECKPOINT_STALE_S and not live:
        v.add("warn", f"last checkpoint {age:.0f} s ago")
    if site.get("lag_records") is None:
        v.add("warn", f"still in generation {site.get('generation')}")
    return v.health()


def worst(*healths: Health) -> Health:
    return max(healths, key=lambda h: ORDER[h.level], default=Health())


__all__ = ["Health", "cg_health", "site_health", "worst"]
