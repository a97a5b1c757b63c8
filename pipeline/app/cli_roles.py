"""``lowmark roles`` and ``lowmark fence``: who writes for a CG, and who no longer may.

``roles show`` prints the roles (or that none are recorded: generation 0, primary
unknown); ``roles init --primary-site S`` records generation 0's primary and refuses when
roles exist. Changing roles later is a failover's job, never an edit by hand.
``fence ID [--declare-lost]`` locks an interceptor out (``pipeline.ops.fence``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import orjson

from pipeline.app.cli_services import build_config, config_options
from pipeline.errors import RolesError
from pipeline.timesource import wall_us
from pipeline.topology.roles import initial_roles
from pipeline.topology.store import RolesStore
from schemas.records import CgRoles
from schemas.ts import format_ts


def roles_json(cg: str, roles: CgRoles | None) -> dict[str, Any]:
    """The roles as one JSON-ready object (generation 0 and no primary when none)."""
    if roles is None:
        return {
            "cg": cg,
            "generation": 0,
            "primary_site": None,
            "recorded": False,
            "base_w": 0,
            "base_offsets": {},
            "history": [],
            "updated_us": None,
        }
    return {
        "cg": cg,
        "generation": roles.generation,
        "primary_site": roles.primary_site,
        "recorded": True,
        "base_w": roles.base_w,
        "base_offsets": dict(roles.base_offsets),
        "history": [t.to_avro() for t in roles.history],
        "updated_us": roles.updated_us,
    }


def render_roles(cg: str, roles: CgRoles | None) -> str:
    if roles is None:
        return f"consistency group {cg}: generation 0, no roles recorded"
    lines = [
        f"consistency group {cg}: generation {roles.generation}, primary {roles.primary_site}",
    ]
    if roles.generation:
        lines.append(f"  starts at W {roles.base_w} ({format_ts(roles.base_w)})")
    for t in roles.history:
        forced = ", forced" if t.forced else ""
        when = datetime.fromtimestamp(t.at_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(
            f"  generation {t.generation}: {t.kind.value} {t.from_site or '(unrecorded)'} -> "
            f"{t.to_site} at W {t.w}{forced} (cut {format_ts(t.w)}, made {when})"
        )
    return "\n".join(lines)


@click.group()
def roles() -> None:
    """The roles of a CG: generation, primary site and how it got there."""


@roles.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def show(config_path, bootstrap_servers, cg_name, as_json) -> None:
    """The CG's generation, primary and history (from lowmark.config)."""
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    store = RolesStore(cfg.kafka_conf())
    current = store.latest(cfg.cg.name)
    if as_json:
        out = {**roles_json(cfg.cg.name, current), "skipped_records": store.skipped}
        click.echo(orjson.dumps(out, option=orjson.OPT_NON_STR_KEYS).decode())
        return
    click.echo(render_roles(cfg.cg.name, current))
    if store.skipped:
        click.echo(
            f"warning: {store.skipped} roles record(s) in lowmark.config did not decode and "
            "were ignored (see the log line for their offsets)",
            err=True,
        )


@roles.command()
@config_options
@click.option("--primary-site", required=True, help="the site that is the CG's primary now")
def init(config_path, bootstrap_servers, cg_name, primary_site) -> None:
    """Record generation 0's primary site (refused when roles are recorded)."""
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    cg = cfg.cg.name
    store = RolesStore(cfg.kafka_conf())
    current = store.latest(cg)
    if current is not None:
        raise RolesError(
            f"CG {cg!r} already has roles (generation {current.generation}, primary "
            f"{current.primary_site!r}); `lowmark roles show` prints them. Roles change by "
            "a failover, not by init"
        )
    done = store.commit(cg, None, initial_roles(cg, primary_site, now_us=wall_us()))
    click.echo(f"consistency group {cg}: generation 0, primary {done.primary_site} recorded")


@click.command()
@config_options
@click.argument("interceptor_id")
@click.option(
    "--declare-lost",
    is_flag=True,
    help="accept the loss of its unreplicated async writes: W passes its hold",
)
@click.option("--generation", type=int, default=None, help="default: the CG's current one")
def fence(config_path, bootstrap_servers, cg_name, interceptor_id, declare_lost, generation):
    """Fence interceptor INTERCEPTOR_ID; with --declare-lost, let W pass its lost tail.

    An interceptor that ended without a clean stop while serving async volumes holds W at
    its last S: it may have acknowledged writes that never reached Kafka. Restart it on
    its disk and it republishes them; if its disk is gone, --declare-lost records the loss
    (logged, kept in the W record, shown by `lowmark status`) and W moves on.
    """
    from pipeline.ops.fence import fence as fence_op

    cfg = build_config(config_path, bootstrap_servers, cg_name)
    conf, cg = cfg.kafka_conf(), cfg.cg.name
    if generation is None:
        current = RolesStore(conf).latest(cg)
        generation = current.generation if current else 0
    out = fence_op(conf, cg, interceptor_id, generation=generation, declare_lost=declare_lost)
    held = sorted({v for h in out.holds for v in h.volumes})
    what = "declared lost" if declare_lost else "fenced"
    click.echo(
        f"interceptor {interceptor_id} of CG {cg} generation {generation} {what} "
        f"(progress offset {out.offset}); W was {out.w_before}"
        + (f"; it held W for volumes {', '.join(held)}" if held else "")
    )
    if not declare_lost and held:
        click.echo(
            "W stays held until it is restarted on its disk or declared lost "
            f"(lowmark fence {interceptor_id} --declare-lost)",
            err=True,
        )


COMMANDS = [roles, fence]
