"""What ``lowmark console`` shows, built from ``cg_status`` and the sites' scrapes (pure).

The console's page renders this JSON and nothing else, so what it shows is testable
without a browser and the browser test checks only that the page shows it. The history
of RPO (the graph over the last hour) is kept here too, sampled once per refresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.ops.health import Health, cg_health, site_health, worst


@dataclass(frozen=True)
class SiteLive:
    """A site's applier as the console reached it: ``answers`` None when the site
    registers no /metrics address."""

    answers: bool | None
    numbers: Mapping[str, float]


class RpoHistory:
    """(unix seconds, W's RPO, {site: applied RPO}) for the last ``keep_s``."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self.keep_s = keep_s
        self.points: deque[tuple[float, float | None, dict[str, float | None]]] = deque()

    def add(self, now_s: float, view: Mapping[str, Any]) -> None:
        sites = {s["name"]: s.get("rpo_s") for s in view["sites"]}
        self.points.append((now_s, view.get("rpo_s"), sites))
        while self.points and self.points[0][0] < now_s - self.keep_s:
            self.points.popleft()

    def to_json(self) -> dict[str, Any]:
        names = sorted({n for _t, _w, s in self.points for n in s})
        return {
            "t": [round(t, 3) for t, _w, _s in self.points],
            "w": [_round(w) for _t, w, _s in self.points],
            "sites": {n: [_round(s.get(n)) for _t, _w, s in self.points] for n in names},
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _h(h: Health) -> dict[str, Any]:
    return {"level": h.level, "why": h.why, "reasons": list(h.reasons)}


def build_view(
    status: Mapping[str, Any],
    live: Mapping[str, SiteLive],
    history: list[str],
    dead_letters: int | None,
) -> dict[str, Any]:
    """The page's JSON: the CG, its sites (with health), the laggard, and the failover
    history lines ``lowmark roles`` prints."""
    sites = []
    for name, s in sorted(status.get("sites", {}).items()):
        got = live.get(name)
        numbers = dict(got.numbers) if got is not None else {}
        health = site_health(s, numbers or None, got.answers if got is not None else None)
        rpo = numbers.get("lowmark_applier_rpo_seconds", s.get("checkpoint_rpo_s"))
        sites.append({
            "name": name,
            "health": _h(health),
            "rpo_s": rpo,
            "checkpoint_rpo_s": s.get("checkpoint_rpo_s"),
            "checkpoint_age_s": s.get("checkpoint_age_s"),
            "lag_records": s.get("lag_records"),
            "apply_bytes_per_s": numbers.get("lowmark_applier_apply_bytes_per_second"),
            "pending_bytes": numbers.get("lowmark_applier_pending_bytes"),
            "retention": s.get("retention"),
            "snapshots": s.get("snapshots", 0),
            "last_snapshot": (s.get("last_snapshot") or {}).get("name"),
            "holds_last_marker": s.get("holds_last_marker", False),
            "answers": None if got is None else got.answers,
        })  # fmt: skip
    interceptors = sorted(status.get("interceptors", ()), key=lambda m: -m["lag_s"])
    cg = cg_health(status)
    overall = worst(cg, *(Health(s["health"]["level"], tuple(s["health"]["reasons"]))
                          for s in sites))  # fmt: skip
    return {
        "cg": status["cg"],
        "time_us": status.get("time_us"),
        "generation": status.get("generation", 0),
        "primary_site": status.get("primary_site"),
        "w_time": status.get("w_time"),
        "rpo_s": status.get("rpo_s"),
        "health": _h(cg),
        "overall": _h(overall),
        # the member whose S is furthest behind holds W back (W is their minimum)
        "laggard": None if not interceptors else {
            "id": interceptors[0]["id"], "lag_s": interceptors[0]["lag_s"]},
        "interceptors": [{"id": m["id"], "epoch": m["epoch"], "lag_s": m["lag_s"]}
                         for m in interceptors],
        "holds": [{"id": h["id"], "held_s": h["held_s"], "volumes": h["volumes"]}
                  for h in status.get("holds", ())],
        "declared_lost": [x["id"] for x in status.get("declared_lost", ())],
        "last_marker": status.get("last_marker"),
        "resync": status.get("resync"),
        "sites": sites,
        "history": history,
        "dead_letters": dead_letters,
    }  # fmt: skip


__all__ = ["RpoHistory", "SiteLive", "build_view"]
