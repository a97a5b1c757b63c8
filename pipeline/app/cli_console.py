"""``lowmark console``: the CG's live web page (pipeline/app/console.py)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import click

from pipeline.app.cli_services import build_config, config_options
from pipeline.errors import ConfigError


def _token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc.strerror}; give a readable "
                              "file holding the token") from None  # fmt: skip
    return os.environ.get("LOWMARK_CONSOLE_TOKEN", "").strip()


@click.command()
@config_options
@click.option("--listen", default="127.0.0.1:8480", show_default=True,
              help="host:port of the page (port 0: any free port, logged)")  # fmt: skip
@click.option("--refresh", "refresh_s", type=float, default=1.0, show_default=True,
              help="seconds between reads of the CG")  # fmt: skip
@click.option("--actions", is_flag=True,
              help="allow taking markers and snapshots from the page (needs a token)")  # fmt: skip
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="file holding the actions' token (default: LOWMARK_CONSOLE_TOKEN)")  # fmt: skip
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".lowmark/console"), show_default=True,
              help="where drills started from the page put their clone, and the logs of "
                   "drills and failovers")  # fmt: skip
def console(config_path, bootstrap_servers, cg_name, listen, refresh_s, actions,
            token_file, work_dir) -> None:  # fmt: skip
    """Serve a live page of the CG: sites and roles, W and RPO (a graph over the last
    hour), the interceptor holding W back, lag and apply rate per site, markers,
    snapshots, resync progress, failover history and dead letters. Read-only unless
    started with --actions: then markers and snapshots, and — on a backup site's host —
    a drill (started and stopped) or a failover, each the lowmark command itself."""
    from pipeline.app.console import Console, ConsoleConfig
    from pipeline.app.runtime import stop_on_signals

    cfg = build_config(config_path, bootstrap_servers, cg_name)
    # a resync of a site on this host shows as status shows it: from its data dir
    local = ((Path(cfg.serve.data_dir), cfg.serve.site), (Path(cfg.apply.data_dir), cfg.apply.site))
    ccfg = ConsoleConfig(cfg.cg.name, cfg.kafka_conf(), listen, refresh_s, actions=actions,
                         token=_token(token_file) if actions else "", data_dirs=local,
                         config_path=config_path, work_dir=work_dir)  # fmt: skip
    stop = threading.Event()
    stop_on_signals(stop)
    asyncio.run(Console(ccfg).run(stop))


COMMANDS = [console]
