"""CLI commands of the long-lived services and of status: serve, watermark, apply, status."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import orjson

from connectors.embedded_kafka.state import find_bootstrap
from pipeline.app.config import LowmarkConfig, load_config
from pipeline.errors import ConfigError
from pipeline.site import SiteDir


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --bootstrap-servers and --cg, shared by every command that needs a CG."""
    fn = click.option(
        "--cg", "cg_name", default=None, help="consistency group (overrides [cg] name)"
    )(fn)
    fn = click.option(
        "--bootstrap-servers",
        default=None,
        help="Kafka bootstrap servers (default: LOWMARK_BOOTSTRAP_SERVERS, the config "
        "file, or the embedded cluster from `lowmark kafka up`)",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        envvar="LOWMARK_CONFIG",
        help="TOML config file (see pipeline/app/config.py for the format)",
    )(fn)
    return fn


def build_config(
    config_path: Path | None,
    bootstrap_servers: str | None,
    cg_name: str | None,
    *,
    kafka_access: bool = True,
    **sections: dict[str, Any],
) -> LowmarkConfig:
    """The command's configuration; with ``kafka_access`` (every command that talks to
    Kafka) a TLS/SASL connection is checked first, so a bad credential fails in seconds
    naming its setting, before anything is produced (``connectors.kafka.access``)."""
    overrides: dict[str, dict[str, Any]] = {k: v for k, v in sections.items() if v}
    overrides["kafka"] = {"bootstrap_servers": bootstrap_servers}
    if cg_name:
        overrides.setdefault("cg", {})["name"] = cg_name
    # the CLI, not the config, knows the development cluster: `lowmark kafka up` just works
    cfg = load_config(config_path, overrides, embedded=find_bootstrap)
    if kafka_access:
        from connectors.kafka.access import check_access

        check_access(cfg.kafka)
    return cfg


@click.command()
@config_options
@click.option("--site", default=None, help="this primary's site, as the CG's roles name it")
@click.option("--interceptor-id", default=None, help="stable id of this interceptor")
@click.option("--data-dir", default=None, help="where the primary images and state live")
@click.option("--listen", default=None, help="NBD host:port ('' disables TCP)")
@click.option("--unix-socket", default=None, help="also serve NBD on this unix socket")
@click.option("--metrics", default=None, help="host:port for the Prometheus /metrics endpoint")
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    help="NAME:SIZE[:async|sync], created if missing (repeatable)",
)
def serve(
    config_path,
    bootstrap_servers,
    cg_name,
    site,
    interceptor_id,
    data_dir,
    listen,
    unix_socket,
    metrics,
    volumes,
) -> None:
    """Run a primary: the interceptor and an NBD server exporting the CG's volumes."""
    from pipeline.app.services import run_serve

    cfg = build_config(
        config_path,
        bootstrap_servers,
        cg_name,
        serve={
            "site": site,
            "interceptor_id": interceptor_id,
            "data_dir": data_dir,
            "listen": listen,
            "unix_socket": unix_socket,
            "metrics": metrics,
            "volumes": list(volumes),
        },
    )
    empty = not cfg.serve.volumes and not SiteDir(Path(cfg.serve.data_dir)).catalog_path.exists()
    if empty and not cfg.serve.admin_socket:
        # with the admin socket, an empty primary is one waiting for `lowmark volume
        # create` or `lowmark migrate`; without it, it could never serve anything
        raise ConfigError(
            "no volumes: add [[serve.volumes]] to the config or pass --volume NAME:SIZE "
            "(or keep [serve] admin_socket on, to create or migrate them in live)"
        )
    run_serve(cfg)


@click.command()
@config_options
@click.option(
    "--liveness-timeout-s",
    type=float,
    default=None,
    help="silence after which an interceptor is fenced",
)
@click.option("--metrics", default=None, help="host:port for the Prometheus /metrics endpoint")
@click.option(
    "--skip-progress",
    "skip_progress",
    type=click.IntRange(min=0),
    multiple=True,
    help="OFFSET of a bad progress record to skip (logged; repeatable)",
)
def watermark(
    config_path, bootstrap_servers, cg_name, liveness_timeout_s, metrics, skip_progress
) -> None:
    """Run the CG's watermark service: fold progress into W, fence the silent.

    Several may run for one CG: one publishes, the others stand by and take over.
    """
    from pipeline.app.services import run_watermark

    cfg = build_config(
        config_path,
        bootstrap_servers,
        cg_name,
        watermark={"liveness_timeout_s": liveness_timeout_s, "metrics": metrics},
    )
    run_watermark(cfg, frozenset(skip_progress))


def _parse_skip(values: tuple[str, ...]) -> frozenset[tuple[int, int]]:
    out = set()
    for v in values:
        part, sep, off = v.partition(":")
        if not sep or not part.isdigit() or not off.isdigit():
            raise ConfigError(f"--skip {v!r} must be PARTITION:OFFSET, as the halt message says")
        out.add((int(part), int(off)))
    return frozenset(out)


@click.command()
@config_options
@click.option("--site", default=None, help="this backup site's name")
@click.option("--data-dir", default=None, help="where this site's images and checkpoint live")
@click.option("--metrics", default=None, help="host:port for the Prometheus /metrics endpoint")
@click.option(
    "--skip",
    "skip",
    multiple=True,
    help="PARTITION:OFFSET of a bad record to skip (logged; repeatable)",
)
@click.option(
    "--bootstrap-from",
    "bootstrap_from",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="a peer site's data dir (or one entry of its snapshots/): when this site is new, "
    "emptied or past the log's retention, copy the peer's newest checkpoint copy first",
)
def apply(
    config_path, bootstrap_servers, cg_name, site, data_dir, metrics, skip, bootstrap_from
) -> None:
    """Run one backup site's applier: apply records with ts <= W, checkpoint.

    On an empty directory it joins the CG from the log's start (or, with
    --bootstrap-from, from a peer's checkpoint copy and the log after it).
    """
    from pipeline.app.services import run_apply

    cfg = build_config(
        config_path,
        bootstrap_servers,
        cg_name,
        apply={"site": site, "data_dir": data_dir, "metrics": metrics},
    )
    run_apply(cfg, _parse_skip(skip), bootstrap_from=bootstrap_from)


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", is_flag=True, help="refresh until Ctrl-C")
@click.option("--format", "fmt", type=click.Choice(["auto", "table", "text"]), default="auto",
              show_default=True,
              help="table: the colour table that fits the terminal (auto: on a terminal or "
                   "with --watch); text: the plain lines")  # fmt: skip
@click.option("--interval", type=float, default=1.0, show_default=True)
@click.option("--data-dir", "data_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="a site's data dir on this host to report a resync of "
                   "(default: [serve] and [apply] data_dir)")  # fmt: skip
def status(config_path, bootstrap_servers, cg_name, as_json, watch, fmt, interval,
           data_dir) -> None:  # fmt: skip
    """Roles (generation, primary, failover history), W, RPO, lag and apply rate; a resync
    of a site on this host."""
    from pipeline.ops import status as st

    cfg = build_config(config_path, bootstrap_servers, cg_name)
    urls = {
        "serve": cfg.serve.metrics,
        "watermark": cfg.watermark.metrics,
        "apply": cfg.apply.metrics,
    }

    from pipeline.app.cli_roles import render_roles, roles_json

    serve, apply = cfg.serve, cfg.apply
    local = (
        ((data_dir, ""),)
        if data_dir is not None
        else ((Path(serve.data_dir), serve.site), (Path(apply.data_dir), apply.site))
    )

    def fetch() -> dict[str, Any]:
        return st.cg_status(cfg.kafka_conf(), cfg.cg.name, urls, local)

    def show(s: dict[str, Any]) -> str:
        roles = s.pop("roles", None)
        if as_json:
            # the roles as `lowmark roles show --json` prints them: one shape everywhere
            s["roles"] = roles_json(cfg.cg.name, roles)
            return orjson.dumps(s, option=orjson.OPT_NON_STR_KEYS).decode()
        if roles is not None:
            s["roles_lines"] = render_roles(cfg.cg.name, roles).splitlines()[1:]
        tty = sys.stdout.isatty()
        if fmt == "table" or (fmt == "auto" and (watch or tty)):
            from pipeline.ops.status_table import render_table

            # the configured site's applier: its scrape, or None when it did not answer
            live = {apply.site: s.get("live", {}).get("apply")} if apply.metrics else {}
            width = max(60, shutil.get_terminal_size((80, 24)).columns)
            return render_table(s, live, width, color=tty and not os.environ.get("NO_COLOR"))
        return st.render(s)

    if watch:
        try:
            st.watch(fetch, interval, show, click.echo)
        except KeyboardInterrupt:
            return
    else:
        click.echo(show(fetch()))


@click.command()
@click.option("--duration", type=float, default=20.0, show_default=True, help="seconds of workload")
@click.option(
    "--rate", type=float, default=20.0, show_default=True, help="fio write rate on vol1, MB/s"
)
@click.option("--volume-size", default="256MiB", show_default=True)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".lowmark/demo"),
    show_default=True,
)
@click.option(
    "--bootstrap-servers", default=None, help="use this Kafka instead of the embedded one"
)
@click.option("--keep-kafka", is_flag=True, help="leave a Kafka this demo started running")
def demo(duration, rate, volume_size, workdir, bootstrap_servers, keep_kafka) -> None:
    """Run the whole pipeline with real NBD clients, live, then verify the backup."""
    from pipeline.app.demo import DemoOptions, run_demo

    code = run_demo(
        DemoOptions(
            duration_s=duration,
            rate_mb_s=rate,
            volume_size=volume_size,
            workdir=workdir,
            keep_kafka=keep_kafka,
            bootstrap=bootstrap_servers,
        ),
        out=lambda line: click.echo(line),
    )
    if code:
        raise SystemExit(code)


COMMANDS = [serve, watermark, apply, status, demo]
