"""``lowmark pause`` and ``lowmark resume``: hold a backup site's images at a cut.

They only set or clear the site's ``state/paused`` file; the site's running applier acts on
it (``pipeline.backup.pause``) and these commands wait until it has.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.app.cli_ops import _site
from pipeline.app.cli_services import build_config, config_options
from pipeline.backup import pause as control
from pipeline.backup import staging
from pipeline.errors import ConfigError, SiteBusyError
from pipeline.site import SiteDir, SiteLock


def _site_dir(config_path, bootstrap_servers, cg_name, site, site_dir) -> tuple[str, SiteDir]:
    # a local control file: no Kafka is reached, so none is checked
    cfg = build_config(config_path, bootstrap_servers, cg_name, kafka_access=False)
    name, sdir = _site(cfg, site, site_dir)
    if sdir is None or not SiteDir(sdir).is_site():
        raise ConfigError(
            f"{sdir or 'no data dir'} is not the data dir of site {name!r}: pass --data-dir"
        )
    return name, SiteDir(sdir)


def _applier_running(site: SiteDir) -> bool:
    return SiteLock(site).in_use()


def _wait(done, timeout_s: float) -> bool:
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > timeout_s:
            return False
        time.sleep(0.05)
    return True


def _options(fn):
    fn = click.option("--site", default=None, help="the backup site")(fn)
    fn = click.option("--data-dir", "site_dir", type=click.Path(path_type=Path), default=None,
                      help="the site's data dir (default: [apply] data_dir)")(fn)  # fmt: skip
    fn = click.option("--timeout-s", default=30.0, show_default=True,
                      help="how long to wait for the running applier to act")(fn)  # fmt: skip
    return config_options(fn)


@click.command()
@_options
def pause(config_path, bootstrap_servers, cg_name, site, site_dir, timeout_s) -> None:
    """Hold SITE's images at a cut: its applier stops changing them.

    The applier keeps reading the log and stages what it would apply in the site's
    state/staged/, so `lowmark resume` catches up from disk and `lowmark failover` serves
    its first read without reading that backlog from Kafka again."""
    name, sdir = _site_dir(config_path, bootstrap_servers, cg_name, site, site_dir)
    control.set_control(sdir, control.PAUSED, True, "lowmark pause\n")
    if not _applier_running(sdir):
        click.echo(f"site {name}: no applier runs; it starts paused (once it has caught up)")
        return
    if not _wait(lambda: (staging.stage_dir(sdir) / staging.OPS).exists(), timeout_s):
        raise SiteBusyError(
            f"site {name}'s applier did not pause within {timeout_s} s (it pauses once its "
            "images are a cut, and not while it follows a failover elsewhere): see its log "
            "for 'applier paused', or wait longer with --timeout-s"
        )
    click.echo(f"site {name}: paused; its images stay at its checkpoint's W")


@click.command()
@_options
def resume(config_path, bootstrap_servers, cg_name, site, site_dir, timeout_s) -> None:
    """Let SITE's applier apply again: it first applies what it staged while paused."""
    name, sdir = _site_dir(config_path, bootstrap_servers, cg_name, site, site_dir)
    control.set_control(sdir, control.PAUSED, False)
    if not _applier_running(sdir):
        staging.discard(sdir)  # a cache: the next applier reads from its checkpoint
        click.echo(f"site {name}: resumed; no applier runs")
        return
    if not _wait(lambda: not staging.stage_dir(sdir).exists(), timeout_s):
        raise SiteBusyError(
            f"site {name}'s applier has not applied its stage within {timeout_s} s: it may "
            "still be writing it (see its log for 'applier resumed'); wait with --timeout-s"
        )
    click.echo(f"site {name}: resumed; the stage is applied")


COMMANDS = [pause, resume]
