"""``lowmark status`` in a terminal: a colour table that fits the width (80 columns).

Pure: it renders the same ``cg_status`` dict that ``--json`` prints and the plain text
(``status.render``) spells out, coloured by the console's judgement
(``pipeline.ops.health``). Every line fits ``width`` visible columns — long advice wraps
under its label — and a resync shows a progress bar.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from typing import Any

from pipeline.ops.health import Health, Level, cg_health, site_health, worst

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_COLOURS: dict[Level, str] = {"ok": "32", "warn": "33", "bad": "31;1"}
LABEL = 10  # the label column ("site", "RPO", ...)


def visible_len(line: str) -> int:
    return len(_ANSI.sub("", line))


def _pad(text: str, cells: int) -> str:
    return text + " " * max(1, cells - visible_len(text))


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s" if v < 600 else f"{v / 60:.0f} min"


def _bar(frac: float, cells: int = 20) -> str:
    frac = min(1.0, max(0.0, frac))
    done = int(frac * cells)
    return "[" + "#" * done + "." * (cells - done) + f"] {100 * frac:3.0f}%"


class _Out:
    def __init__(self, width: int, color: bool) -> None:
        self.width, self.color = width, color
        self.lines: list[str] = []

    def paint(self, text: str, level: Level) -> str:
        return f"\x1b[{_COLOURS[level]}m{text}\x1b[0m" if self.color else text

    def add(self, label: str, text: str) -> None:
        """``label`` in its column, ``text`` wrapped under it to the width."""
        room = max(20, self.width - LABEL)
        wrapped = textwrap.wrap(text, room, break_on_hyphens=False) or [""]
        for i, piece in enumerate(wrapped):
            self.lines.append(_pad(label if i == 0 else "", LABEL) + piece)

    def raw(self, line: str) -> None:
        self.lines.append(line)


def _state(h: Health) -> str:
    return {"ok": "OK", "warn": "WARN", "bad": "BAD"}[h.level]


def render_table(
    status: Mapping[str, Any],
    live_sites: Mapping[str, Mapping[str, float] | None] | None = None,
    width: int = 80,
    color: bool = False,
) -> str:
    """``live_sites``: site -> its applier's scrape (None: it did not answer); a site
    not in it was not scraped."""
    out = _Out(width, color)
    live_sites = live_sites or {}
    cg = cg_health(status)
    sites = []
    for name, s in status.get("sites", {}).items():
        scraped = name in live_sites
        got = live_sites.get(name)
        sites.append((name, s, got, site_health(s, got or None, bool(got) if scraped else None)))
    overall = worst(cg, *(h for *_x, h in sites))
    head = f"lowmark · {status['cg']}"
    tag = _state(overall)
    pad = max(1, width - len(head) - len(tag))
    out.raw(head + " " * pad + out.paint(tag, overall.level))
    if overall.level != "ok":
        out.add("", overall.why)
    if status.get("primary_site"):
        since = f" · since W {status['base_w_time']}" if status.get("base_w_time") else ""
        out.add("roles", f"generation {status['generation']} · primary "
                f"{status['primary_site']}{since}")  # fmt: skip
    for line in status.get("roles_lines", ()):
        out.add("", line.strip())
    rpo = out.paint(_secs(status.get("rpo_s")), cg.level if status.get("w") else "warn")
    out.add("W", f"{status.get('w_time') or 'none yet'}")
    out.add("RPO", f"{rpo} (W published {_secs(status.get('watermark_published_age_s'))} ago)")
    members = sorted(status.get("interceptors", ()), key=lambda m: -m["lag_s"])
    if members:
        m = members[0]
        more = f" · {len(members)} interceptors" if len(members) > 1 else ""
        out.add("laggard", f"{m['id']} (epoch {m['epoch']}, S lags {_secs(m['lag_s'])}){more}")
    for h in status.get("holds", ()):
        if h.get("volumes"):
            out.add(out.paint("HELD", "bad"), f"W stays at {h['id']}'s last S "
                    f"({_secs(h['held_s'])} ago): restart it on its disk, or `lowmark fence "
                    f"{h['id']} --declare-lost`")  # fmt: skip
    for x in status.get("declared_lost", ())[-3:]:
        out.add(out.paint("lost", "warn"), f"{x['id']} declared lost (epoch {x['epoch']})")
    mk = status.get("last_marker")
    if mk:
        out.add("marker", f"{mk['name']!r} {_secs(mk['age_s'])} ago")
    rs = status.get("resync")
    if rs is not None:
        planned = rs.get("bytes_planned") or 0
        left = rs.get("bytes_left", planned)
        frac = 1 - left / planned if planned else 0.0
        out.add(out.paint("RESYNC", "warn"),
                f"{rs.get('site') or '?'} {rs.get('phase', 'plan')} {_bar(frac)} "
                f"{(planned - left) / 2**20:.1f}/{planned / 2**20:.1f} MiB "
                f"{rs.get('rate_bps', 0) / 1e6:.2f} MB/s ETA {_secs(rs.get('eta_s'))}")  # fmt: skip
    out.raw("")
    out.raw(f"{'SITE':<12}{'STATE':<7}{'RPO':>9}{'CKPT AGE':>10}{'LAG REC':>9}"
            f"{'APPLY MB/s':>12}{'SNAPS':>7}")  # fmt: skip
    if not sites:
        out.raw("no backup site has checkpointed yet")
    for name, s, got, h in sites:
        rpo_s = (got or {}).get("lowmark_applier_rpo_seconds", s.get("checkpoint_rpo_s"))
        rate = (got or {}).get("lowmark_applier_apply_bytes_per_second")
        lag = "-" if s.get("lag_records") is None else str(s["lag_records"])
        mbs = "-" if rate is None else f"{rate / 1e6:.1f}"
        cells = (f"{name[:11]:<12}" + out.paint(f"{_state(h):<7}", h.level)
                 + f"{_secs(rpo_s):>9}{_secs(s.get('checkpoint_age_s')):>10}{lag:>9}"
                 f"{mbs:>12}{s.get('snapshots', 0):>7}")  # fmt: skip
        out.raw(cells)
        for why in h.reasons[:2]:
            out.add("", f"{name}: {why}")
    return "\n".join(_fit(line, width) for line in out.lines)


def _fit(line: str, width: int) -> str:
    """Cut a line to ``width`` visible columns (a site name or a path too long)."""
    if visible_len(line) <= width:
        return line
    plain = _ANSI.sub("", line)
    return plain[: width - 1] + "…"


__all__ = ["render_table", "visible_len"]
