"""CLI: ``lowmark topology`` (the CG's model in lowmark.config) and ``lowmark volume``
(create, resize and list the volumes of a running ``lowmark serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from pipeline.app.cli_services import build_config, config_options
from pipeline.app.config import parse_size
from pipeline.errors import ConfigError, VolumeError


def topology_view(kafka_conf: dict[str, Any], cg: str) -> dict[str, Any]:
    """The model plus, per site, whether its latest checkpoint holds each volume as the
    model describes it."""
    from pipeline.ops.status import latest_checkpoints
    from pipeline.topology.catalog import read_topology
    from pipeline.topology.model import site_volumes

    topo = read_topology(kafka_conf, cg)
    view = topo.as_dict()
    ckpts = latest_checkpoints(kafka_conf, cg, topo.generation)
    for site in view["sites"]:
        ck = ckpts.get(site["site"])
        site["checkpoint_w"] = ck.w if ck is not None else None
        site["volumes"] = site_volumes(topo, ck) if site["kind"] == "backup" else {}
    return view


def render_topology(view: dict[str, Any]) -> str:
    lines = [f"CG {view['cg']}: generation {view['generation']}, primary "
             f"{view['primary_site'] or '(not recorded)'}"]  # fmt: skip
    lines.append(f"  volumes ({len(view['volumes'])}):")
    for v in view["volumes"]:
        access = ", ".join(f"{i}={s}" for i, s in sorted(v["access"].items()))
        lines.append(f"    {v['name']:<16} {v['size']:>16,} B  {v['mode']:<5}  id {v['volume_id']}"
                     f"  by {v['interceptor_id']} (gen {v['generation']})  {access}")  # fmt: skip
    if view["deleted_volumes"]:
        lines.append(f"  deleted: {', '.join(view['deleted_volumes'])}")
    lines.append(f"  sites ({len(view['sites'])}):")
    for s in view["sites"]:
        pending = {k: v for k, v in s["volumes"].items() if v != "ok"}
        state = "" if s["kind"] != "backup" else (
            "  all volumes as described" if not pending
            else "  " + "; ".join(f"{k}: {v}" for k, v in sorted(pending.items())))  # fmt: skip
        lines.append(f"    {s['site']:<12} {s['kind']:<8} {s['host']}:{s['data_dir']}  "
                     f"W={s['checkpoint_w']}{state}")  # fmt: skip
    for r in view["rejected"]:
        lines.append(f"  REJECTED lowmark.config offset {r['offset']} ({r['key']}): {r['why']}")
    return "\n".join(lines)


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def topology(config_path, bootstrap_servers, cg_name, as_json) -> None:
    """The CG's topology from lowmark.config: volumes, sites, roles (and what is rejected)."""
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    view = topology_view(cfg.kafka_conf(), cfg.cg.name)
    click.echo(orjson.dumps(view).decode() if as_json else render_topology(view))
    if view["rejected"]:
        raise SystemExit(3)  # the model stands, but someone wrote what it cannot trust


def _admin_options(fn: Any) -> Any:
    fn = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                      default=None, help="the running primary's data dir (its "
                      "state/admin.sock)")(fn)  # fmt: skip
    fn = click.option("--admin-socket", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, help="the running primary's admin socket")(fn)  # fmt: skip
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, envvar="LOWMARK_CONFIG",
                      help="TOML config file ([serve] data_dir / admin_socket)")(fn)  # fmt: skip
    return fn


def _client(config_path: Path | None, admin_socket: Path | None, data_dir: Path | None) -> Any:
    from pipeline.app.admin import AdminClient, default_admin_socket
    from pipeline.app.config import load_config
    from pipeline.app.services import admin_socket_path

    if admin_socket is None and data_dir is not None:
        admin_socket = default_admin_socket(data_dir)
    if admin_socket is None:
        # the serve section only: no Kafka is needed to reach a local primary, but the
        # connection is validated all the same, so the stand-in must be a valid host:port
        cfg = load_config(config_path, {"kafka": {"bootstrap_servers": "unused.invalid:9"}})
        if not cfg.serve.admin_socket:
            raise ConfigError("[serve] admin_socket is off: no running primary can be reached")
        admin_socket = admin_socket_path(cfg)
    return AdminClient(admin_socket)


def _call(client: Any, req: dict[str, Any], as_json: bool) -> dict[str, Any]:
    answer: dict[str, Any] = client.request(req)
    if not answer.get("ok"):
        raise VolumeError(answer.get("error", "the primary refused the request"))
    if as_json:
        click.echo(orjson.dumps(answer).decode())
    return answer


@click.group()
def volume() -> None:
    """Volumes of a running primary: created and resized live, replicated in log order."""


@volume.command()
@_admin_options
@click.argument("name")
@click.argument("size")
@click.option("--mode", type=click.Choice(["async", "sync"]), default="async", show_default=True)
@click.option("--meta", "meta", multiple=True, help="KEY=VALUE label (repeatable)")
@click.option("--json", "as_json", is_flag=True)
def create(config_path, admin_socket, data_dir, name, size, mode, meta, as_json) -> None:
    """Create volume NAME of SIZE (e.g. 10GiB) at the running primary, exported at once."""
    labels = {}
    for m in meta:
        k, sep, v = m.partition("=")
        if not sep or not k:
            raise ConfigError(f"--meta {m!r} must be KEY=VALUE")
        labels[k] = v
    req = {"op": "create", "name": name, "size": parse_size(size), "mode": mode,
           "metadata": labels}  # fmt: skip
    a = _call(_client(config_path, admin_socket, data_dir), req, as_json)
    if not as_json:
        v = a["volume"]
        click.echo(f"volume {v['name']} ({v['size']:,} bytes, {v['mode']}) created and exported")


@volume.command()
@_admin_options
@click.argument("name")
@click.argument("size")
@click.option("--json", "as_json", is_flag=True)
def resize(config_path, admin_socket, data_dir, name, size, as_json) -> None:
    """Resize volume NAME to SIZE at the running primary (a shrink that cuts data is refused)."""
    req = {"op": "resize", "name": name, "size": parse_size(size)}
    a = _call(_client(config_path, admin_socket, data_dir), req, as_json)
    if not as_json:
        click.echo(f"volume {a['volume']['name']} is now {a['volume']['size']:,} bytes")


@volume.command(name="list")
@_admin_options
@click.option("--json", "as_json", is_flag=True)
def list_(config_path, admin_socket, data_dir, as_json) -> None:
    """The running primary's volumes."""
    a = _call(_client(config_path, admin_socket, data_dir), {"op": "list"}, as_json)
    if not as_json:
        for v in a["volumes"]:
            click.echo(f"{v['name']:<16} {v['size']:>16,} B  {v['mode']:<5}  "
                       f"{v.get('access', 'optimized')}")  # fmt: skip
        for v in a.get("parked", []):
            m = v["migration"]
            what = f"migrated to {m['peer']}" if m["role"] != "target" else (
                f"being migrated here from {m['peer']}")  # fmt: skip
            click.echo(f"{v['name']:<16} {v['size']:>16,} B  {v['mode']:<5}  "
                       f"inaccessible ({what})")  # fmt: skip


COMMANDS = [topology, volume]
