"""``lowmark status``: W, RPO, lag and apply rate of a CG and each of its backup sites.

Everything comes from Kafka (the watermark and checkpoint topics, the log's end offsets),
so status works from any host that reaches the cluster; live rates come from the services'
``/metrics`` endpoints when the config names them.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

from connectors.kafka.reading import end_offsets, iter_range, latest
from connectors.kafka.topics import CgTopics
from pipeline.errors import RecordError
from pipeline.timesource import wall_us
from pipeline.topology.store import RolesStore
from pipeline.watermark.service import decode_watermark, newer_watermark
from schemas import codec
from schemas.records import Checkpoint
from schemas.ts import format_ts, ts_physical_us


def latest_checkpoints(kafka_conf: dict[str, Any], cg: str) -> dict[str, Checkpoint]:
    """The newest checkpoint of every site (the topic is compacted by site)."""
    out: dict[str, Checkpoint] = {}
    for msg in iter_range(kafka_conf, CgTopics(cg).checkpoints):
        try:
            rec = codec.decode(msg.value(), Checkpoint)
        except RecordError:
            continue
        if rec.site not in out or rec.w >= out[rec.site].w:
            out[rec.site] = rec
    return out


def _avg_record_bytes(kafka_conf: dict[str, Any], topic: str, ends: dict[int, int]) -> float:
    sizes: list[int] = []
    for p, end in ends.items():
        for msg in iter_range(kafka_conf, topic, p, max(0, end - 50), end, timeout_s=5):
            sizes.append(len(msg.value() or b""))
    return sum(sizes) / len(sizes) if sizes else 0.0


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


def cg_status(
    kafka_conf: dict[str, Any], cg: str, metrics_urls: dict[str, str] | None = None
) -> dict[str, Any]:
    topics = CgTopics(cg)
    now = wall_us()
    best = latest(kafka_conf, topics.watermark, decode_watermark, newer_watermark)
    wm = best[0] if best else None
    ends = end_offsets(kafka_conf, topics.log)
    avg = _avg_record_bytes(kafka_conf, topics.log, ends)
    roles = RolesStore(kafka_conf).latest(cg)
    status: dict[str, Any] = {
        "cg": cg,
        "time_us": now,
        # generation 0 and no primary when no roles are recorded (`lowmark roles init`)
        "generation": roles.generation if roles else 0,
        "primary_site": roles.primary_site if roles else None,
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
        "log_end_offsets": ends,
        "sites": {},
    }
    for site, ck in sorted(latest_checkpoints(kafka_conf, cg).items()):
        offsets = ck.log_offsets
        lag_records = sum(max(0, end - offsets.get(p, 0)) for p, end in ends.items())
        status["sites"][site] = {
            "checkpoint_w": ck.w,
            "checkpoint_rpo_s": (now - ts_physical_us(ck.w)) / 1e6 if ck.w else None,
            "checkpoint_age_s": (now - ck.written_us) / 1e6,
            "lag_records": lag_records,
            "lag_bytes_estimate": int(lag_records * avg),
            "volumes": {v.volume_id: {"size": v.size, "digest": v.digest} for v in ck.volumes},
        }
    for name, url in (metrics_urls or {}).items():
        if url:
            values = scrape(url)
            if values:
                status.setdefault("live", {})[name] = values
    return status


def render(status: dict[str, Any]) -> str:
    def secs(v: float | None) -> str:
        return "-" if v is None else (f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s")

    lines = [f"consistency group {status['cg']}"]
    if status.get("primary_site"):
        g, primary = status["generation"], status["primary_site"]
        lines.append(f"  roles    generation {g}, primary {primary}")
    lines += [
        f"  W        {status['w']}  ({status['w_time'] or 'none yet'})",
        f"  RPO      {secs(status['rpo_s'])}   "
        f"(W published {secs(status['watermark_published_age_s'])} ago)",
        f"  log end  {sum(status['log_end_offsets'].values())} records "
        f"in {len(status['log_end_offsets'])} partitions",
    ]
    for m in status["interceptors"]:
        lines.append(f"  interceptor {m['id']:<16} epoch {m['epoch']:<6} S lags {secs(m['lag_s'])}")
    if not status["sites"]:
        lines.append("  no backup site has checkpointed yet")
    for site, s in status["sites"].items():
        lines.append(
            f"  site {site:<12} checkpoint RPO {secs(s['checkpoint_rpo_s'])}, "
            f"age {secs(s['checkpoint_age_s'])}, lag {s['lag_records']} records "
            f"(~{s['lag_bytes_estimate'] / 1e6:.1f} MB)"
        )
    live = status.get("live", {})
    ap = live.get("apply", {})
    if ap:
        lines.append(
            f"  applier  applied W RPO {secs(ap.get('lowmark_applier_rpo_s'))}, "
            f"{ap.get('lowmark_applier_apply_bytes_per_s', 0) / 1e6:.1f} MB/s applied, "
            f"pending {ap.get('lowmark_applier_pending_bytes', 0) / 1e6:.1f} MB"
        )
    pr = live.get("serve", {})
    if pr:
        lines.append(
            f"  primary  {pr.get('lowmark_primary_bytes', 0) / 1e6:.1f} MB replicated, "
            f"{pr.get('lowmark_primary_unreplicated_bytes', 0) / 1e6:.1f} MB waiting, "
            f"last commit {pr.get('lowmark_primary_last_commit_ms', 0):.1f} ms"
        )
    return "\n".join(lines)


def watch(
    fetch: Any, interval_s: float, render_fn: Any, out: Any, iterations: int | None = None
) -> None:
    n = 0
    while iterations is None or n < iterations:
        text = render_fn(fetch())
        out("\x1b[2J\x1b[H" + text + f"\n\n(refreshing every {interval_s:g}s, Ctrl-C to stop)")
        n += 1
        time.sleep(interval_s)
