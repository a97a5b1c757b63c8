"""Operator commands over the log: tail, restore, replay, verify.

Each takes --config/--bootstrap-servers/--cg like the service commands
(``pipeline.app.cli_services.config_options``). Errors are ``LowmarkError``s that
``pipeline.app.cli.run`` prints as one line; ``verify`` exits 1 on a mismatch, 2 when
it could not compare (UNVERIFIED).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import orjson

from pipeline.app.cli_services import build_config, config_options
from pipeline.app.config import LowmarkConfig
from pipeline.app.progress import ProgressBar
from pipeline.errors import ConfigError
from pipeline.ops.replay import ReplayProgress
from schemas.records import LOG_RECORDS
from schemas.ts import format_ts, parse_ts

_TYPES = (*(c.TYPE for c in LOG_RECORDS), "BAD")


def _ts(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_ts(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None


class ProgressLine:
    """The progress bar of a replay (restore, replay, drill, a failover's indexing)."""

    def __init__(self, what: str, quiet_s: float = 1.0, every_s: float = 0.25) -> None:
        self.bar = ProgressBar(what, "records", quiet_s, every_s)

    def __call__(self, prog: ReplayProgress) -> None:
        now = time.monotonic()
        rate = prog.bytes_read / max(1e-6, now - prog.started_mono) / 1e6
        self.bar.show(prog.records_done, max(prog.records_total, prog.records_done, 1),
                      f"{prog.bytes_read / 1e6:.1f} MB read ({rate:.1f} MB/s), "
                      f"{prog.bytes_applied / 1e6:.1f} MB applied")  # fmt: skip

    @property
    def shown(self) -> bool:
        return self.bar.shown

    def close(self) -> None:
        self.bar.close()


def _site(cfg: LowmarkConfig, site: str | None, site_dir: Path | None) -> tuple[str, Path | None]:
    """The site's name and data dir; the config's [apply] dir only belongs to its own site."""
    name = site or cfg.apply.site
    if site_dir is None and name == cfg.apply.site:
        site_dir = Path(cfg.apply.data_dir)
    return name, site_dir


def _print_volumes(manifest: dict[str, Any]) -> None:
    for v in manifest["volumes"]:
        click.echo(f"  {v['volume_id']:<20} {v['size']:>14} bytes  {v['digest']}")


# ---------------------------------------------------------------- tail


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="one JSON object per record")
@click.option("--data", "with_data", is_flag=True, help="include write data as hex (--json)")
@click.option(
    "--follow/--no-follow",
    default=True,
    show_default=True,
    help="keep printing new records until Ctrl-C, or stop at the end",
)
@click.option(
    "--from-beginning/--from-end",
    "from_beginning",
    default=True,
    show_default=True,
    help="start at the log's oldest retained record, or only show new ones",
)
@click.option("--volume", "volumes", multiple=True, help="only this volume (repeatable)")
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(_TYPES, case_sensitive=False),
    help="only this record type (repeatable)",
)
@click.option("--from-ts", default=None, help="only records with ts >= this (int or ISO time)")
@click.option("--to-ts", default=None, help="only records with ts <= this (int or ISO time)")
def tail(
    config_path,
    bootstrap_servers,
    cg_name,
    as_json,
    with_data,
    follow,
    from_beginning,
    volumes,
    types,
    from_ts,
    to_ts,
) -> None:
    """Print the CG's log records, decoded, one line each (bad records as BAD)."""
    from pipeline.ops.tail import TailFilter
    from pipeline.ops.tail import tail as run_tail

    cfg = build_config(config_path, bootstrap_servers, cg_name)
    filt = TailFilter(
        frozenset(volumes),
        frozenset(t.lower() for t in types),
        _ts(from_ts, "--from-ts"),
        _ts(to_ts, "--to-ts"),
    )
    stop = threading.Event()
    try:
        run_tail(
            cfg.kafka_conf(),
            cfg.cg.name,
            click.echo,
            follow=follow,
            from_end=not from_beginning,
            filt=filt,
            as_json=as_json,
            with_data=with_data,
            stop=stop,
        )
    except KeyboardInterrupt:
        stop.set()


# ---------------------------------------------------------------- restore


@click.command()
@config_options
@click.option("--at", "at", default=None, help="the cut: a ts (int or ISO time) <= W")
@click.option("--marker", default=None, help="the cut: the ts of this marker (newest of the name)")
@click.option("--snapshot", default=None, help="snapshot NAME: copied from --site-dir's store "
              "when it holds it (verified), else rebuilt at its ts from the log")
@click.option(
    "--to",
    "to_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="new or empty directory for images/, volumes.json and restore.json",
)
@click.option("--site", default=None, help="whose snapshot store is the base ([apply] site)")
@click.option(
    "--site-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="that site's data dir ([apply] data_dir when --site is the config's)",
)
@click.option(
    "--from-log", is_flag=True, help="ignore snapshots: empty images plus the log from its start"
)
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def restore(
    config_path, bootstrap_servers, cg_name, at, marker, snapshot, to_dir, site, site_dir,
    from_log, as_json,
) -> None:  # fmt: skip
    """Build the CG's images at exactly one cut (a ts, a marker or a snapshot) into a
    directory."""
    from pipeline.ops import restore as rs
    from pipeline.ops import snapshot as sn
    from pipeline.snapshot_store import SnapshotStore
    from schemas.records import Snapshot

    if sum(x is not None for x in (at, marker, snapshot)) != 1:
        raise click.UsageError("give exactly one of --at TS, --marker NAME, --snapshot NAME")
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    kafka_conf, cg = cfg.kafka_conf(), cfg.cg.name
    if snapshot is not None:
        _name, held_dir = _site(cfg, site, site_dir)
        if held_dir is not None and SnapshotStore(held_dir).get(snapshot) is not None:
            m = sn.restore(held_dir, snapshot, to_dir)
            if as_json:
                click.echo(orjson.dumps(m, option=orjson.OPT_INDENT_2).decode())
            else:
                click.echo(f"restored snapshot {snapshot!r} at ts {m['w']} ({m['w_time']}) "
                           f"from {held_dir} into {to_dir}, verified")  # fmt: skip
            return
        found_snap, _n = rs.find_marker(kafka_conf, cg, snapshot, kind=Snapshot)
        at = str(found_snap.ts)
        if not as_json:
            click.echo(f"snapshot {snapshot!r} is not held at {held_dir}: rebuilding it at its "
                       f"ts {found_snap.ts} ({format_ts(found_snap.ts)}) from the log")  # fmt: skip
    if marker is not None:
        found, count = rs.find_marker(kafka_conf, cg, marker)
        ts = found.ts
        if not as_json:
            more = f" (newest of {count} with that name)" if count > 1 else ""
            click.echo(f"marker {marker!r} is at ts {ts} ({format_ts(ts)}){more}")
    else:
        at_ts = _ts(at, "--at")
        assert at_ts is not None
        ts = at_ts
    _name, sdir = _site(cfg, site, site_dir)
    bar = ProgressLine("restoring")
    try:
        out = rs.restore(
            kafka_conf,
            cg,
            ts,
            to_dir,
            site_dir=sdir,
            site=site,  # when given, the snapshot store must be that site's
            use_snapshots=not from_log,
            marker=marker,
            on_progress=bar,
        )
    finally:
        bar.close()
    m = out.manifest
    if as_json:
        click.echo(orjson.dumps(m, option=orjson.OPT_INDENT_2).decode())
        return
    b = m["base"]
    base = (
        f"snapshot of site {b['site']} at W {b['w']}"
        if b["kind"] == rs.BaseKind.SNAPSHOT
        else "empty images at the log's start"
    )
    click.echo(f"restored CG {cg} at W {m['w']} ({m['w_time']}) into {to_dir}")
    click.echo(f"  base: {base}; read {m['records_read']} records, applied {m['ops_applied']} ops")
    _print_volumes(m)
    click.echo(f"  manifest: {to_dir / 'restore.json'}")


# ---------------------------------------------------------------- replay


@click.command()
@config_options
@click.option("--from-ts", required=True, help="the images hold the cut at this ts")
@click.option("--to-ts", required=True, help="apply the records up to this ts (<= W)")
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="a directory made by `lowmark restore --to`",
)
@click.option("--json", "as_json", is_flag=True, help="print the new manifest as JSON")
def replay(config_path, bootstrap_servers, cg_name, from_ts, to_ts, images_dir, as_json) -> None:
    """Re-apply the records with FROM < ts <= TO onto existing images (drills, checks)."""
    from pipeline.ops import restore as rs

    cfg = build_config(config_path, bootstrap_servers, cg_name)
    a, b = _ts(from_ts, "--from-ts"), _ts(to_ts, "--to-ts")
    assert a is not None and b is not None
    bar = ProgressLine("replaying")
    try:
        out = rs.replay_range(cfg.kafka_conf(), cfg.cg.name, images_dir, a, b, on_progress=bar)
    finally:
        bar.close()
    m = out.manifest
    for note in out.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(orjson.dumps(m, option=orjson.OPT_INDENT_2).decode())
        return
    what = f"W {m['w']} ({m['w_time']})" if m["exact"] else f"a drill state (not a cut), to {b}"
    click.echo(
        f"replayed ({a}, {b}] onto {images_dir}: {m['records_read']} records, "
        f"{m['ops_applied']} ops; the images now hold {what}"
    )
    _print_volumes(m)


# ---------------------------------------------------------------- verify


@click.command()
@config_options
@click.option("--site", default=None, help="the backup site to check ([apply] site)")
@click.option(
    "--site-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="that site's data dir (its snapshot store)",
)
@click.option(
    "--at-checkpoint",
    is_flag=True,
    help="also check the bytes of the site's snapshot taken at that checkpoint",
)
@click.option("--json", "as_json", is_flag=True)
def verify(config_path, bootstrap_servers, cg_name, site, site_dir, at_checkpoint, as_json) -> None:
    """Compare a site's latest checkpoint with the log replayed to its W; exit 1 if unequal,
    2 if nothing differed but something could not be compared (no digests, no snapshot)."""
    from dataclasses import asdict

    from pipeline.ops import verify as vf

    cfg = build_config(config_path, bootstrap_servers, cg_name)
    site_name, sdir = _site(cfg, site, site_dir)
    if at_checkpoint and sdir is None:
        raise ConfigError("--at-checkpoint reads the site's snapshot store: pass --site-dir")
    bar = ProgressLine("replaying")
    try:
        report = vf.verify_site(
            cfg.kafka_conf(),
            cfg.cg.name,
            site_name,
            site_dir=sdir,
            at_checkpoint=at_checkpoint,
            on_progress=bar,
        )
    finally:
        bar.close()
    if as_json:
        click.echo(orjson.dumps({**asdict(report), "ok": report.ok}).decode())
    else:
        click.echo(vf.render(report))
    if report.mismatched:
        sys.exit(1)
    if not report.ok:
        sys.exit(2)  # nothing differed, but not everything could be compared


COMMANDS = [tail, restore, replay, verify]
