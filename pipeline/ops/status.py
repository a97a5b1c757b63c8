"""``lowmark status``: W, RPO, lag and apply rate of a CG and each of its backup sites.

Everything comes from Kafka (the roles in ``lowmark.config``, the current generation's
watermark and log, every generation's checkpoints), so status works from any host that
reaches the cluster; live rates come from the services' ``/metrics`` endpoints when the
config names them. ``status["roles"]`` is the roles record itself (None: none recorded);
the ``lowmark status`` command renders it (and its failover history) with ``lowmark
roles``' renderer.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

from connectors.kafka.reading import bounds, iter_range, latest, mean_value_bytes
from connectors.kafka.topics import CgTopics
from pipeline.backup.checkpointer import retention_state
from pipeline.errors import RecordError
from pipeline.ops.marker import latest_marker
from pipeline.timesource import wall_us
from pipeline.topology.catalog import read_topology
from pipeline.topology.store import RolesStore
from pipeline.watermark.service import decode_watermark, newer_watermark
from schemas import codec
from schemas.records import Checkpoint
from schemas.ts import format_ts, ts_physical_us


def latest_checkpoints(
    kafka_conf: dict[str, Any], cg: str, generation: int = 0
) -> dict[str, Checkpoint]:
    """The newest checkpoint of every site in ``generation``'s checkpoints topic (compacted
    by site); {} when that generation has no such topic."""
    out: dict[str, Checkpoint] = {}
    topic = CgTopics(cg, generation).checkpoints
    if generation and bounds(kafka_conf, topic) is None:
        return out
    found = bounds(kafka_conf, topic)
    if not found or 0 not in found:
        return out
    low, high = found[0]  # known offsets: resolving BEGINNING costs a new consumer ~0.5 s
    for msg in iter_range(kafka_conf, topic, 0, low, high):
        try:
            rec = codec.decode(msg.value(), Checkpoint)
        except RecordError:
            continue
        if rec.site not in out or rec.w >= out[rec.site].w:
            out[rec.site] = rec
    return out


def checkpoints_upto(kafka_conf: dict[str, Any], cg: str, generation: int) -> dict[str, Checkpoint]:
    """Per site, its checkpoint of the newest generation <= ``generation`` it has one in."""
    out: dict[str, Checkpoint] = {}
    for g in range(generation, -1, -1):
        for site, ck in latest_checkpoints(kafka_conf, cg, g).items():
            out.setdefault(site, ck)
    return out


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """Parse a Prometheus text page into {name: value} (first sample of each name)."""
    if not url.startswith("http"):
        url = f"http://{url}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            out.setdefault(name, float(value))
        except ValueError:
            continue
    return out


#: a resync silent this long is probably not running (each phase reports every second or so)
STALE_RESYNC_S = 30.0


def local_resync(data_dir: Path, site: str, now_us: int) -> dict[str, Any] | None:
    """The unfinished resync of the site whose data dir this is (None: none), with how long
    ago it last reported (a killed ``lowmark failback`` leaves it open)."""
    from pipeline.ops.resync import in_progress  # the resync's imports: only when asked

    state = in_progress(data_dir)
    if state is None:
        return None
    updated = state.get("updated_us")
    return {
        "site": site,
        "data_dir": str(data_dir),
        **{k: v for k, v in state.items() if k != "ranges_done"},
        "silent_s": None if updated is None else max(0.0, (now_us - updated) / 1e6),
    }


def cg_status(
    kafka_conf: dict[str, Any],
    cg: str,
    metrics_urls: dict[str, str] | None = None,
    data_dirs: tuple[tuple[Path, str], ...] = (),
) -> dict[str, Any]:
    """Everything from Kafka; and from the first of ``data_dirs`` ((data dir, site name)
    on this host) with an unfinished resync, that resync's progress."""
    roles = RolesStore(kafka_conf).latest(cg)
    generation = roles.generation if roles else 0
    topics = CgTopics(cg, generation)
    now = wall_us()
    have_topics = generation == 0 or bounds(kafka_conf, topics.watermark) is not None
    best = (
        latest(kafka_conf, topics.watermark, decode_watermark, newer_watermark)
        if have_topics
        else None
    )
    wm = best[0] if best else None
    log_bounds = bounds(kafka_conf, topics.log) or {}
    ends = {p: end for p, (_low, end) in log_bounds.items()}
    avg = mean_value_bytes(kafka_conf, topics.log, ends)
    status: dict[str, Any] = {
        "cg": cg,
        "time_us": now,
        # generation 0 and no primary when no roles are recorded (`lowmark roles init`)
        "generation": generation,
        "primary_site": roles.primary_site if roles else None,
        "base_w": roles.base_w if roles else 0,
        "base_w_time": format_ts(roles.base_w) if roles and roles.base_w else None,
        "roles": roles,
        "w": wm.w if wm else None,
        "w_time": format_ts(wm.w) if wm and wm.w else None,
        "rpo_s": (now - ts_physical_us(wm.w)) / 1e6 if wm and wm.w else None,
        "watermark_published_age_s": (now - wm.published_us) / 1e6 if wm else None,
        "interceptors": [
            {
                "id": m.interceptor_id,
                "epoch": m.epoch,
                "s": m.s,
                "lag_s": (now - ts_physical_us(m.s)) / 1e6,
            }
            for m in (wm.members if wm else ())
        ],
        # ended instances whose async tail nobody republished yet: W stays at their S
        "holds": [
            {
                "id": h.interceptor_id,
                "epoch": h.epoch,
                "s": h.s,
                "volumes": list(h.volumes),
                "republished_until": h.until if h.until >= 0 else None,
                "held_s": (now - ts_physical_us(h.s)) / 1e6,
            }
            for h in (wm.holds if wm else ())
        ],
        "declared_lost": [
            {
                "id": x.interceptor_id,
                "epoch": x.epoch,
                "s": x.s,
                "volumes": list(x.volumes),
                "declared_us": x.declared_us,
            }
            for x in (wm.lost if wm else ())
        ],
        "log_end_offsets": ends,
        "sites": {},
    }
    last = latest_marker(kafka_conf, cg, generation) if have_topics else None
    status["last_marker"] = None if last is None else {
        "name": last[0], "ts": last[1], "time": format_ts(last[1]),
        "age_s": (now - ts_physical_us(last[1])) / 1e6,
    }  # fmt: skip
    for site, ck in sorted(checkpoints_upto(kafka_conf, cg, generation).items()):
        offsets = ck.log_offsets
        # a site still in an older generation: its lag is not in this generation's records
        behind = ck.generation < generation
        lag_records = sum(max(0, end - offsets.get(p, 0)) for p, end in ends.items())
        retention, share = ("ok", None) if behind else retention_state(offsets, log_bounds)
        status["sites"][site] = {
            "generation": ck.generation,
            "checkpoint_w": ck.w,
            "checkpoint_rpo_s": (now - ts_physical_us(ck.w)) / 1e6 if ck.w else None,
            "checkpoint_age_s": (now - ck.written_us) / 1e6,
            "lag_records": None if behind else lag_records,
            "lag_bytes_estimate": None if behind else int(lag_records * avg),
            "retention": retention,
            "retained_share_before_checkpoint": share,
            # the site's checkpointed images hold the last marker's cut (restorable there)
            "holds_last_marker": last is not None and ck.w >= last[1],
            # its newest named snapshot (``lowmark snapshot list``: all, at every site)
            "snapshots": len(ck.snapshots),
            "last_snapshot": None if not ck.snapshots else {
                "name": ck.snapshots[-1].name, "ts": ck.snapshots[-1].ts,
                "time": format_ts(ck.snapshots[-1].ts)},
            "volumes": {v.volume_id: {"size": v.size, "digest": v.digest} for v in ck.volumes},
        }
    for name, url in (metrics_urls or {}).items():
        if url:
            values = scrape(url)
            if values:
                status.setdefault("live", {})[name] = values
    # each volume's access states, NVMe ANA's, as its interceptor last described them
    status["volumes"] = {
        v.name: {"interceptor": v.interceptor_id, "access": dict(v.access), "mode": v.mode}
        for v in read_topology(kafka_conf, cg).live().values()
    }
    status["resync"] = next(
        (rs for d, name in data_dirs if (rs := local_resync(d, name, now)) is not None), None
    )
    return status


def render(status: dict[str, Any]) -> str:
    def secs(v: float | None) -> str:
        return "-" if v is None else (f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s")

    lines = [f"consistency group {status['cg']}"]
    if status.get("primary_site"):
        g, primary = status["generation"], status["primary_site"]
        since = f", since W {status['base_w_time']}" if status.get("base_w_time") else ""
        lines.append(f"  roles    generation {g}, primary {primary}{since}")
    # the failover history, rendered by the caller (``lowmark status``: lowmark roles' lines)
    lines += [f"           {line.strip()}" for line in status.get("roles_lines", ())]
    lines += [
        f"  W        {status['w']}  ({status['w_time'] or 'none yet'})",
        f"  RPO      {secs(status['rpo_s'])}   "
        f"(W published {secs(status['watermark_published_age_s'])} ago)",
        f"  log end  {sum(status['log_end_offsets'].values())} records "
        f"in {len(status['log_end_offsets'])} partitions",
    ]
    for m in status["interceptors"]:
        lines.append(f"  interceptor {m['id']:<16} epoch {m['epoch']:<6} S lags {secs(m['lag_s'])}")
    for h in status.get("holds", ()):
        vols = ", ".join(h["volumes"])
        if h["volumes"]:
            lines.append(
                f"  HELD     W stays at S of interceptor {h['id']} (epoch {h['epoch']}, "
                f"{secs(h['held_s'])} ago): it ended without a clean stop and may have "
                f"acknowledged async writes to {vols} that never reached Kafka. Restart it "
                f"on its disk (it republishes them), or accept the loss: "
                f"lowmark fence {h['id']} --declare-lost"
            )
        else:
            lines.append(
                f"  held     {h['id']}'s tail is republished (up to {h['republished_until']}); W "
                "jumps past it once every interceptor reports above that"
            )
    for x in status.get("declared_lost", ())[-3:]:
        lines.append(
            f"  lost     interceptor {x['id']} (epoch {x['epoch']}) declared lost at S {x['s']}: "
            f"its unreplicated writes to {', '.join(x['volumes']) or 'no async volume'} are gone"
        )
    for name, v in sorted(status.get("volumes", {}).items()):
        states = [v["access"].get(v["interceptor"], "?")]
        states += [f"{i} {a}" for i, a in sorted(v["access"].items()) if i != v["interceptor"]]
        lines.append(f"  volume   {name:<16} {v['mode']:<5} at {v['interceptor']} "
                     f"({'; '.join(states)})")  # fmt: skip
    lines += _resync_lines(status.get("resync"), secs)
    mk = status.get("last_marker")
    if mk:
        lines.append(f"  marker   {mk['name']!r} at {mk['time']} ({secs(mk['age_s'])} ago)")
    if not status["sites"]:
        lines.append("  no backup site has checkpointed yet")
    for site, s in status["sites"].items():
        if s["lag_records"] is None:
            lag = f"still in generation {s['generation']}"
        else:
            lag = f"lag {s['lag_records']} records (~{s['lag_bytes_estimate'] / 1e6:.1f} MB)"
        held = (", holds the last marker" if s.get("holds_last_marker")
                else ", not yet at the last marker" if mk else "")  # fmt: skip
        if s.get("last_snapshot"):
            held += f", {s['snapshots']} snapshots (newest {s['last_snapshot']['name']!r})"
        lines.append(
            f"  site {site:<12} checkpoint RPO {secs(s['checkpoint_rpo_s'])}, "
            f"age {secs(s['checkpoint_age_s'])}, {lag}{held}"
        )
        if s.get("retention") == "lost":
            lines.append(
                f"    RETENTION: the log no longer holds what site {site} needs after its "
                "checkpoint (deleted by retention): it cannot catch up from Kafka; rebuild "
                "it (`lowmark restore` at another site's cut, or from a peer's images)"
            )
        elif s.get("retention") == "near":
            share = s["retained_share_before_checkpoint"]
            lines.append(
                f"    near retention: only {share:.0%} of the retained log lies before site "
                f"{site}'s checkpoint, and retention deletes from there: start its applier, "
                "or raise the log's retention"
            )
    live = status.get("live", {})
    ap = live.get("apply", {})
    if ap:
        lines.append(
            f"  applier  applied W RPO {secs(ap.get('lowmark_applier_rpo_seconds'))}, "
            f"{ap.get('lowmark_applier_apply_bytes_per_second', 0) / 1e6:.1f} MB/s applied, "
            f"pending {ap.get('lowmark_applier_pending_bytes', 0) / 1e6:.1f} MB"
        )
    pr = live.get("serve", {})
    if pr:
        lines.append(
            f"  primary  {pr.get('lowmark_primary_bytes_total', 0) / 1e6:.1f} MB replicated, "
            f"{pr.get('lowmark_primary_unreplicated_bytes', 0) / 1e6:.1f} MB waiting, "
            f"last commit {1e3 * pr.get('lowmark_primary_last_commit_seconds', 0):.1f} ms"
        )
    return "\n".join(lines)


def _resync_lines(rs: dict[str, Any] | None, secs: Any) -> list[str]:
    if rs is None:
        return []
    mib = 2**20
    eta = rs.get("eta_s")
    line = (
        f"  RESYNC   site {rs['site'] or '?'} ({rs['data_dir']}) is resyncing, not a backup "
        f"until it ends: phase {rs.get('phase', 'plan')}, "
        f"{rs.get('bytes_left', 0) / mib:.1f} of {rs.get('bytes_planned', 0) / mib:.1f} MiB "
        f"left, {rs.get('rate_bps', 0) / 1e6:.2f} MB/s, ETA {secs(eta) if eta is not None else '?'}"
    )
    if rs.get("limit_bps"):
        line += (
            f" (limit {rs['limit_bps'] / 1e6:.2f} MB/s, "
            f"foreground {rs.get('foreground_bps', 0) / 1e6:.2f} MB/s)"
        )
    out = [line]
    silent = rs.get("silent_s")
    if silent is None or silent > STALE_RESYNC_S:
        ago = "ever" if silent is None else f"for {secs(silent)}"
        out.append(
            f"    no resync progress {ago}: if `lowmark failback` is not running, run it "
            "again with the same arguments; it continues where it stopped"
        )
    return out


def watch(
    fetch: Any, interval_s: float, render_fn: Any, out: Any, iterations: int | None = None
) -> None:
    n = 0
    while iterations is None or n < iterations:
        text = render_fn(fetch())
        out("\x1b[2J\x1b[H" + text + f"\n\n(refreshing every {interval_s:g}s, Ctrl-C to stop)")
        n += 1
        time.sleep(interval_s)
