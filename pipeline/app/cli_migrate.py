"""CLI: ``lowmark migrate VOLUME --to INTERCEPTOR`` (``pipeline.ops.migrate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from pipeline.app.cli_topology import _admin_options, _client


@click.command()
@_admin_options
@click.argument("volume_name", metavar="VOLUME")
@click.option("--to", "to", required=True, metavar="INTERCEPTOR",
              help="the interceptor id of the `lowmark serve` the volume moves to")  # fmt: skip
@click.option("--to-admin", "to_admin", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="that `lowmark serve`'s admin socket (another host's: forward it, e.g. "
              "`ssh -L /tmp/b.sock:/data/b/state/admin.sock host`)")  # fmt: skip
@click.option("--abort", is_flag=True, help="roll an interrupted migration back to the source")
@click.option("--lease", "lease_s", type=float, default=10.0, show_default=True,
              help="seconds the source holds writes for the cutover before serving them again "
              "(if this command dies mid-cutover)")  # fmt: skip
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="the result as one JSON object")
def migrate(config_path, admin_socket, data_dir, volume_name, to, to_admin, abort, lease_s,
            timeout_s, as_json) -> None:  # fmt: skip
    """Move VOLUME from the running primary (--config / --admin-socket / --data-dir) to
    interceptor INTERCEPTOR: synchronize it there while it is served here, cut over with a
    short I/O pause, and carry on in the same CG log. Run it again after an interruption:
    it continues where it stopped (or rolls back with --abort)."""
    from pipeline.app.admin import AdminClient
    from pipeline.app.progress import ProgressBar
    from pipeline.ops.migrate import migrate as run

    source, target = _client(config_path, admin_socket, data_dir), AdminClient(to_admin)
    bar = ProgressBar(f"migrate {volume_name}: copy")

    def progress(step: str, sync: dict[str, Any]) -> None:
        if step == "wait" and sync.get("total_bytes"):
            bar.show(sync.get("copied_bytes", 0) / 2**20, sync["total_bytes"] / 2**20)

    res = run(volume_name, to, source.request, target.request, abort=abort, lease_s=lease_s,
              timeout_s=timeout_s, on_progress=progress)  # fmt: skip
    bar.close()
    if as_json:
        click.echo(orjson.dumps(res.as_json()).decode())
        return
    if res.outcome == "rolled back":
        click.echo(f"migration of {volume_name} rolled back: served by {res.source}")
        return
    pause = "(cut over by an earlier run)" if res.io_pause_s is None else (
        f"I/O pause {res.io_pause_s * 1000:.0f} ms")  # fmt: skip
    click.echo(f"volume {volume_name} migrated {res.source} -> {res.target}: {pause}; "
               f"copied {res.copied_bytes / 2**20:.1f} MiB, {res.records_applied} records "
               f"from the log; {res.seconds:.1f} s")  # fmt: skip


COMMANDS = [migrate]
