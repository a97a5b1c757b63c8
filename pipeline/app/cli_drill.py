"""``lowmark drill``: test failover without failing over (``pipeline.ops.drill``).

``drill start`` restores a site's images at a cut into a directory and serves the clone over
NBD in the foreground until SIGINT/SIGTERM, like ``lowmark serve``; ``drill list`` and
``drill delete`` manage the directories it leaves.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import click
import orjson

from pipeline.app.cli_ops import ProgressLine, _site, _ts
from pipeline.app.cli_services import build_config, config_options
from pipeline.app.metrics import serve_metrics
from pipeline.app.runtime import stop_on_signals
from pipeline.logs import event

log = logging.getLogger("lowmark.drill")

#: a served drill logs its counters this often (as the services do)
STATUS_EVERY_S = 10.0


@click.group()
def drill() -> None:
    """Test failover: a writable clone of a site's images at a cut, served over NBD."""


@drill.command()
@config_options
@click.option("--site", default=None, help="the backup site to drill ([apply] site)")
@click.option(
    "--site-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="that site's data dir, read only ([apply] data_dir when --site is the config's)",
)
@click.option("--at", "at", default=None, help="the cut: a ts (int or ISO time) <= W, or 'latest'")
@click.option("--at-marker", "marker", default=None, help="the cut: the ts of this marker")
@click.option(
    "--to",
    "to_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="new or empty directory for the clone",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="NBD listen address")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="NBD port (0: any)")
@click.option("--unix", "unix_socket", default=None, help="serve NBD on this unix socket")
@click.option("--metrics", default=None, help="host:port for the Prometheus /metrics endpoint")
def start(
    config_path,
    bootstrap_servers,
    cg_name,
    site,
    site_dir,
    at,
    marker,
    to_dir,
    host,
    port,
    unix_socket,
    metrics,
) -> None:
    """Restore SITE's images at a cut into --to and serve them over NBD until Ctrl-C.

    The cut is --at TS, --at-marker NAME, or the latest published W (--at latest, the
    default). The site's applier keeps running, the CG's roles are untouched, and writes
    to the clone stay in the clone.
    """
    from connectors.nbd.server import NbdServerConfig
    from pipeline.ops import drill as dr

    if at is not None and marker is not None:
        raise click.UsageError("give at most one of --at TS and --at-marker NAME")
    at_ts = None if at in (None, "latest") else _ts(at, "--at")
    # TCP unless only a unix socket is asked for; checked before the (long) restore
    tcp = port is not None or unix_socket is None
    nbd = NbdServerConfig(
        host=host if tcp else None,
        port=(port if port is not None else 0) if tcp else None,
        unix_path=unix_socket,
    )
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    kafka_conf, cg = cfg.kafka_conf(), cfg.cg.name
    site_name, sdir = _site(cfg, site, site_dir)
    ck = dr.check_site(kafka_conf, cg, site_name, sdir)
    if sdir is None:
        click.echo(
            f"note: no data dir for site {site_name} (--site-dir): the clone is built from "
            "the log's start, without the site's snapshots",
            err=True,
        )
    cut = dr.choose_cut(kafka_conf, cg, at=at_ts, marker=marker)
    if cut.marker is not None:
        more = f" (newest of {cut.markers_named} with that name)" if cut.markers_named > 1 else ""
        click.echo(f"marker {marker!r} is at ts {cut.ts} ({_time(cut.ts)}){more}")
    event(log, "drill restoring", cg=cg, site=site_name, w=cut.ts, to=str(to_dir))
    bar = ProgressLine("restoring drill")
    try:
        out = dr.build(kafka_conf, cg, site_name, cut, to_dir, site_dir=sdir, on_progress=bar)
    finally:
        bar.close()
    m = out.manifest
    prog = out.result.progress
    event(
        log,
        "drill restored",
        cg=cg,
        site=site_name,
        w=cut.ts,
        base=m["base"]["kind"],
        records_read=prog.records_done,
        ops_applied=prog.ops_applied,
    )
    doc = dr.manifest_doc(cg, site_name, cut, m, ck.w, {"serving": False}, {})
    dr.write_manifest(to_dir, doc)  # a start that fails from here on is still deletable
    stop = threading.Event()
    stop_on_signals(stop)
    state: dict[str, Any] = {}

    def on_ready(served: dr.Served) -> None:
        state["served"] = served
        address = {"host": nbd.host, "port": served.port, "unix": nbd.unix_path}
        doc.update(address={"serving": True, **address}, exports=served.exports)
        # printed before the manifest says "serving": whoever waits on it sees the URIs
        _print_started(cg, site_name, cut, m, ck.w, served.exports, to_dir)
        dr.write_manifest(to_dir, doc)
        event(log, "drill serving", cg=cg, site=site_name, w=cut.ts, exports=served.exports)

    def drill_metrics() -> dict[str, Any]:
        served = state.get("served")
        out_m: dict[str, Any] = {"cut_w": cut.ts, "cut_rpo_s": cut.rpo_s()}
        if served is not None:
            st = served.server.stats
            out_m.update(
                nbd_connections_open=st.connections_open,
                nbd_bytes_read=st.bytes_read,
                nbd_bytes_written=st.bytes_written,
                nbd_protocol_errors=st.protocol_errors,
            )
        return out_m

    last_status = [time.monotonic()]

    def status_line() -> None:
        if time.monotonic() - last_status[0] >= STATUS_EVERY_S:
            last_status[0] = time.monotonic()
            event(log, "drill status", cg=cg, site=site_name, **_flat(drill_metrics()))

    with dr.DrillLock(to_dir):
        if metrics:
            serve_metrics(metrics, "drill", drill_metrics, {"cg": cg, "site": site_name})
        dr.serve(to_dir, nbd, stop, on_ready, status_line)
        event(log, "drill stopped", cg=cg, site=site_name, w=cut.ts, **_flat(drill_metrics()))
    click.echo(f"drill stopped; the clone stays in {to_dir} (`lowmark drill delete {to_dir}`)")


def _time(ts: int) -> str:
    from schemas.ts import format_ts

    return format_ts(ts)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, dict)}


def _print_started(
    cg: str,
    site: str,
    cut: Any,
    m: dict[str, Any],
    site_w: int,
    exports: dict[str, str],
    to_dir: Path,
) -> None:
    b = m["base"]
    base = (
        f"snapshot of site {b['site']} at W {b['w']}"
        if b["kind"] == "snapshot"
        else "empty images at the log's start"
    )
    click.echo(f"drill of CG {cg} from site {site} at W {cut.ts} ({_time(cut.ts)}) in {to_dir}")
    click.echo(
        f"  RPO of this cut {cut.rpo_s():.3f} s; published W {cut.published_w}, site "
        f"checkpoint W {site_w}"
    )
    click.echo(f"  base: {base}; read {m['records_read']} records, applied {m['ops_applied']} ops")
    for name, uri in sorted(exports.items()):
        click.echo(f"  {name:<20} {uri}")
    click.echo("  writes stay in the clone; Ctrl-C stops serving")


@drill.command(name="list")
@click.argument(
    "root", required=False, default=".", type=click.Path(file_okay=False, path_type=Path)
)
@click.option("--json", "as_json", is_flag=True, help="one JSON array of the manifests")
def list_cmd(root: Path, as_json: bool) -> None:
    """The drills in ROOT (a drill directory, or a directory holding drills; default .)."""
    from pipeline.ops import drill as dr

    found = dr.list_drills(root)
    if as_json:
        click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        return
    if not found:
        click.echo(f"no drills in {root}")
        return
    for d in found:
        state = f"serving (pid {d['running_pid']})" if d["running"] else "stopped"
        cut = d["cut"]
        click.echo(
            f"{d['dir']}: CG {d['cg']} site {d['site']} at W {cut['w']} ({cut['w_time']}), {state}"
        )
        for name, uri in sorted(d.get("exports", {}).items()):
            click.echo(f"  {name:<20} {uri}")


@drill.command()
@click.argument("drill_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def delete(drill_dir: Path) -> None:
    """Remove a stopped drill's directory (refused while it is served, or if not a drill)."""
    from pipeline.ops import drill as dr

    doc = dr.delete(drill_dir)
    click.echo(f"deleted the drill of CG {doc['cg']} at W {doc['cut']['w']} in {drill_dir}")


COMMANDS = [drill]
