"""``lowmark marker NAME``: an application-consistent Marker across every interceptor.

``pipeline.ops.marker`` does the work; this prints the marker's ts and how long writes
were held at each interceptor (or one line saying which phase failed), and with
``--every`` takes markers on a schedule (NAME-<n>), one line each, until interrupted.
"""

from __future__ import annotations

import time

import click
import orjson

from pipeline.app.cli_services import build_config, config_options
from schemas.ts import format_ts


@click.command()
@config_options
@click.argument("name")
@click.option("--pre-hook", default="", help="shell command run before writes are held "
              "(fsfreeze -f /mnt, a database checkpoint); failing aborts the marker")
@click.option("--post-hook", default="", help="shell command run after (fsfreeze -u /mnt); "
              "it runs whenever the pre-hook ran, also when the marker failed")
@click.option("--timeout-s", default=5.0, show_default=True, type=float,
              help="bound of every phase and of how long writes are held")
@click.option("--every", "every_s", default=0.0, type=float,
              help="take a marker NAME-<n> every this many seconds until interrupted")
@click.option("--count", default=0, type=int, help="with --every: stop after this many")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per marker")
def marker(config_path, bootstrap_servers, cg_name, name, pre_hook, post_hook, timeout_s,
           every_s, count, as_json) -> None:  # fmt: skip
    """Take marker NAME: one ts across every interceptor of the CG, at which the
    application's state is consistent (with hooks: as the hooks left it).

    New writes are held (reads go on) from the moment each interceptor quiesces until the
    marker is complete, at most --timeout-s; restore it with `lowmark restore --marker NAME`.
    """
    from pipeline.ops.marker import Coordinator, MarkerOptions

    if timeout_s <= 0:
        raise click.BadParameter("must be > 0", param_hint="--timeout-s")
    cfg = build_config(config_path, bootstrap_servers, cg_name)
    with Coordinator(cfg.kafka_conf(), cfg.cg.name) as coordinator:
        n = 0
        while True:
            n += 1
            label = f"{name}-{n}" if every_s else name
            t0 = time.monotonic()
            opts = MarkerOptions(label, pre_hook, post_hook, timeout_s)
            result = coordinator.take(opts)
            held = {k: round(v / 1000, 3) for k, v in sorted(result.held_us.items())}
            if as_json:
                click.echo(orjson.dumps({
                    "name": label, "ts": result.ts, "ts_text": format_ts(result.ts),
                    "emitter": result.emitter, "generation": result.generation,
                    "held_ms": held, "phases_s": result.phases, "warnings": result.warnings,
                }).decode())  # fmt: skip
            else:
                each = ", ".join(f"{k} {v} ms" for k, v in held.items())
                click.echo(f"marker {label!r} at ts {result.ts} ({format_ts(result.ts)}) in CG "
                           f"{cfg.cg.name}; writes held {result.max_hold_s * 1000:.3f} ms at "
                           f"most ({each}); emitted by {result.emitter}")  # fmt: skip
                for w in result.warnings:
                    click.echo(f"  warning: {w}", err=True)
            if not every_s or (count and n >= count):
                return
            time.sleep(max(0.0, every_s - (time.monotonic() - t0)))


COMMANDS = [marker]
