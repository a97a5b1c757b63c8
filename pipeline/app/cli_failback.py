"""``lowmark failback``: make the old primary a backup of the new one.

After a switchover the drained old primary holds the cut: no copy (``ops.failback``).
After an unplanned failover its images diverged from the new primary's: with
``--source-dir`` (the new primary's data dir, or a shared mount of it) the delta resync
(``ops.resync``) copies what diverged, brings it to a published W of the new generation and
writes the checkpoint ``lowmark apply`` follows from. It prints the plan (diverged bytes
and mode per volume), progress lines on stderr at least every second, and what it copied;
re-running it after a crash or ``kill -9`` continues the same resync.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.app.cli_services import build_config, config_options
from pipeline.app.config import parse_size
from pipeline.app.metrics import serve_metrics
from pipeline.app.progress import ProgressBar
from pipeline.topology.store import RolesStore
from schemas.records import TransitionKind
from schemas.ts import format_ts


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@click.command()
@config_options
@click.option("--site", default=None, help="the old primary's site name ([serve] site)")
@click.option("--data-dir", "site_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="the old primary's data dir ([serve] data_dir)")
@click.option("--source-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="after an unplanned failover: the new primary's data dir to copy from")
@click.option("--max-rate", default="0", show_default=True,
              help="resync copy rate cap, bytes/s (64MiB...; 0: unlimited)")
@click.option("--min-rate", default="0", show_default=True,
              help="the rate the resync always gets, bytes/s")
@click.option("--full-copy-threshold", default=0.5, show_default=True, type=float,
              help="a volume with a larger diverged share is copied whole")
@click.option("--region-bytes", default="64KiB", show_default=True,
              help="the granularity of the divergence (a power of two)")
@click.option("--metrics-port", default="", help="serve resync metrics on host:port")
def failback(config_path, bootstrap_servers, cg_name, site, site_dir, source_dir, max_rate,
             min_rate, full_copy_threshold, region_bytes, metrics_port) -> None:  # fmt: skip
    """Make the old primary SITE a backup of the new one.

    After a switchover no copy is needed: this checks that from Kafka and writes the site's
    checkpoint at the cut. After an unplanned failover give --source-dir: the regions that
    diverged (the old primary's writes above the cut, its dirty-region log, the new
    primary's writes since) are copied, the rest is not. Then start `lowmark apply` on the
    data dir: it follows the new generation.
    """
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    name = site or cfg.serve.site
    if not name:
        raise click.UsageError("name the old primary's site: --site (or [serve] site)")
    sdir = Path(site_dir or cfg.serve.data_dir)
    conf = cfg.kafka_conf()
    roles = RolesStore(conf).latest(cfg.cg.name)
    last = None if roles is None else roles.last_transition
    if source_dir is None or (last is not None and last.kind is TransitionKind.SWITCHOVER):
        from pipeline.ops.failback import rejoin

        ckpt = rejoin(conf, cfg.cg.name, name, sdir)
        click.echo(
            f"site {name} is a backup of CG {cfg.cg.name} at the cut {ckpt.w} "
            f"({format_ts(ckpt.w)}), generation {ckpt.generation}; start its applier: "
            f"lowmark apply --site {name} --data-dir {sdir}"
        )
        return
    from pipeline.ops.resync import Progress, ResyncConfig, resync

    rc = ResyncConfig(
        region_bytes=parse_size(region_bytes, "--region-bytes"),
        full_copy_threshold=full_copy_threshold,
        max_rate=parse_size(max_rate, "--max-rate"),
        min_rate=parse_size(min_rate, "--min-rate"),
    )
    progress = Progress()
    if metrics_port:
        serve_metrics(
            metrics_port,
            "resync",
            progress.metrics,
            {"cg": cfg.cg.name, "site": name},
        )
    # a terminal gets a bar; a log or a pipe the plain lines (the limit and the foreground)
    bar = ProgressBar("resync", "MiB", quiet_s=0.0) if sys.stderr.isatty() else None

    def on_line(line: str) -> None:
        if bar is None:
            click.echo(line, err=True)
            return
        limit = f"limit {progress.limit_bps / 1e6:.2f} MB/s" if progress.limit_bps else ""
        bar.show(progress.bytes_done, max(progress.bytes_planned, 1), f"{progress.phase} {limit}")

    try:
        result = resync(conf, cfg.cg.name, name, sdir, Path(source_dir), rc, on_line=on_line,
                        progress=progress)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if result.already:
        ckpt = result.checkpoint
        click.echo(
            f"site {name} is a backup of CG {cfg.cg.name} already (checkpoint at W {ckpt.w}, "
            f"generation {ckpt.generation}): nothing to copy; start its applier: "
            f"lowmark apply --site {name} --data-dir {sdir}"
        )
        return
    click.echo(f"resync plan (regions of {result.plan.region_bytes} bytes):")
    for vp in result.plan.volumes:
        click.echo(
            f"  {vp.volume_id}: {vp.mode.value}, {_mib(vp.diverged_bytes)} diverged, "
            f"{_mib(vp.planned_bytes)} planned ({vp.why})"
        )
    ckpt = result.checkpoint
    click.echo(
        f"copied {_mib(result.bytes_copied)} of {_mib(result.plan.planned_bytes)} planned "
        f"(read {_mib(result.bytes_read)} from {source_dir} in this run"
        + (f", {len(result.reflinked)} volume(s) reflinked" if result.reflinked else "")
        + f"); site {name} is a backup of CG {cfg.cg.name} at W {ckpt.w} "
        f"({format_ts(ckpt.w)}), generation {ckpt.generation}; start its applier: "
        f"lowmark apply --site {name} --data-dir {sdir}"
    )


COMMANDS = [failback]
