"""``lowmark snapshot create|list|delete|restore`` and ``lowmark serve-snapshot``.

``pipeline.ops.snapshot`` does the work; this prints it. A snapshot is taken at the
primary (a marker across every interceptor, the copies begun while writes are held) and
by every backup at exactly its ts; ``list`` shows where each one is held.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import click
import orjson

from pipeline.app.cli_services import build_config, config_options
from pipeline.app.runtime import stop_on_signals
from schemas.ts import format_ts

#: where a snapshot is read from: any site's (or interceptor's) data dir holding it
_site_dir = click.option(
    "--site-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the data dir of a site (or interceptor) that holds it",
)


@click.group()
def snapshot() -> None:
    """Named point-in-time copies of every volume of the CG, held at every site."""


@snapshot.command("create")
@config_options
@click.argument("name")
@click.option(
    "--pre-hook",
    default="",
    help="shell command run before writes are held (fsfreeze -f /mnt); failing aborts the snapshot",
)
@click.option("--post-hook", default="", help="shell command run after (fsfreeze -u /mnt)")
@click.option(
    "--timeout-s",
    default=5.0,
    show_default=True,
    type=float,
    help="bound of every phase and of how long writes are held",
)
@click.option(
    "--copy-timeout-s",
    default=600.0,
    show_default=True,
    type=float,
    help="wait this long for the primary's copies to be sealed (0: do not wait)",
)
@click.option("--json", "as_json", is_flag=True)
def create(config_path, bootstrap_servers, cg_name, name, pre_hook, post_hook, timeout_s,
           copy_timeout_s, as_json) -> None:  # fmt: skip
    """Take snapshot NAME: a marker across the CG at which each interceptor copies its
    volumes (copy-before-write: writes are held one Kafka hop, not for the copy), and a
    Snapshot record every backup copies its images at."""
    from pipeline.ops import snapshot as sn
    from pipeline.ops.marker import MarkerOptions

    if timeout_s <= 0:
        raise click.BadParameter("must be > 0", param_hint="--timeout-s")
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    opts = MarkerOptions(name, pre_hook, post_hook, timeout_s, True, copy_timeout_s)
    result = sn.create(cfg.kafka_conf(), cfg.cg.name, opts)
    held = {k: round(v / 1000, 3) for k, v in sorted(result.held_us.items())}
    if as_json:
        click.echo(orjson.dumps({
            "name": name, "ts": result.ts, "ts_text": format_ts(result.ts),
            "volumes": list(result.volumes), "held_ms": held, "copied": result.copied,
            "phases_s": result.phases, "warnings": result.warnings,
        }).decode())  # fmt: skip
        return
    click.echo(f"snapshot {name!r} at ts {result.ts} ({format_ts(result.ts)}) in CG "
               f"{cfg.cg.name}: {len(result.volumes)} volumes; writes held "
               f"{result.max_hold_s * 1000:.3f} ms at most")  # fmt: skip
    if "copy_s" in result.phases:
        sealed = sorted(k for k, v in result.copied.items() if not v)
        click.echo(f"  primary copies sealed in {result.phases['copy_s']:.3f} s at {sealed}")
    for w in result.warnings:
        click.echo(f"  warning: {w}", err=True)


@snapshot.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True)
def list_(config_path, bootstrap_servers, cg_name, as_json) -> None:
    """Every snapshot of the CG: its ts, size and whether each site holds it."""
    from pipeline.ops import snapshot as sn

    cfg = build_config(config_path, bootstrap_servers, cg_name)
    views = sn.catalog(cfg.kafka_conf(), cfg.cg.name)
    if as_json:
        click.echo(orjson.dumps([v.as_dict() for v in views], option=orjson.OPT_INDENT_2).decode())
        return
    if not views:
        click.echo(f"no snapshots in CG {cfg.cg.name} (`lowmark snapshot create NAME`)")
        return
    for v in views:
        size = f"{v.size / (1 << 20):.1f} MiB" if v.size else "size unknown"
        click.echo(f"{v.name}  ts {v.ts} ({format_ts(v.ts)})  {size}")
        for where, state in sorted(v.presence.items()):
            click.echo(f"    {where:<24} {state}")


@snapshot.command("delete")
@click.argument("name")
@click.option(
    "--data-dir",
    "data_dirs",
    multiple=True,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="a site's (or interceptor's) data dir to delete it from; repeat for more",
)
def delete(name, data_dirs) -> None:
    """Delete snapshot NAME from the stores at --data-dir (retention deletes everywhere)."""
    from pipeline.snapshot_store import SnapshotStore

    for d in data_dirs:
        gone = SnapshotStore(Path(d)).delete(name)
        click.echo(f"{d}: {'deleted' if gone else 'not held here'} {name!r}")


@snapshot.command("restore")
@click.argument("name")
@_site_dir
@click.option(
    "--to",
    "to_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="new or empty directory for images/, volumes.json and restore.json",
)
@click.option("--json", "as_json", is_flag=True)
def restore(name, site_dir, to_dir, as_json) -> None:
    """Copy snapshot NAME out of a site's store, verified against its manifest."""
    from pipeline.ops import snapshot as sn

    m = sn.restore(site_dir, name, to_dir)
    if as_json:
        click.echo(orjson.dumps(m, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"restored snapshot {name!r} (ts {m['w']}, {m['w_time']}) into {to_dir}; "
               f"{len(m['volumes'])} volumes verified against its manifest")  # fmt: skip


@click.command("serve-snapshot")
@click.argument("name")
@_site_dir
@click.option("--host", default="127.0.0.1", show_default=True, help="NBD listen address")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="NBD port (0: any)")
@click.option("--unix", "unix_socket", default=None, help="serve NBD on this unix socket")
def serve_snapshot(name, site_dir, host, port, unix_socket) -> None:
    """Serve snapshot NAME read-only over NBD (one export per volume, by its name) until
    Ctrl-C: pull it with `nbdcopy` or `qemu-img convert`."""
    from connectors.nbd.server import NbdServerConfig
    from pipeline.ops import drill as dr
    from pipeline.ops import snapshot as sn

    snap = sn.local(site_dir, name)
    tcp = port is not None or unix_socket is None
    nbd = NbdServerConfig(host=host if tcp else None,
                          port=(port if port is not None else 0) if tcp else None,
                          unix_path=unix_socket)  # fmt: skip
    stop = threading.Event()
    stop_on_signals(stop)

    def ready(served: Any) -> None:
        click.echo(f"serving snapshot {name!r} (ts {snap.ts}, {format_ts(snap.ts)}) read-only:")
        for export, uri in sorted(served.exports.items()):
            click.echo(f"  {export}: {uri}")

    dr.serve(snap.path, nbd, stop, ready, read_only=True, what=f"lowmark snapshot {name}")


COMMANDS = [snapshot, serve_snapshot]
