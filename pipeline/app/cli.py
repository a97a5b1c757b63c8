"""The ``lowmark`` command. Subcommand groups live beside the code they drive."""

from __future__ import annotations

import importlib
import sys

import click

from pipeline.errors import LowmarkError
from pipeline.logs import setup_logging

#: command name -> the module that defines it (as ``COMMANDS``); imported when run, so a
#: command starts without importing every other one (``lowmark failover`` counts its
#: time to the first read from the moment it is started)
_COMMAND_MODULES = {
    "serve": "pipeline.app.cli_services",
    "watermark": "pipeline.app.cli_services",
    "apply": "pipeline.app.cli_services",
    "status": "pipeline.app.cli_services",
    "demo": "pipeline.app.cli_services",
    "tail": "pipeline.app.cli_ops",
    "restore": "pipeline.app.cli_ops",
    "replay": "pipeline.app.cli_ops",
    "verify": "pipeline.app.cli_ops",
    "roles": "pipeline.app.cli_roles",
    "fence": "pipeline.app.cli_roles",
    "drill": "pipeline.app.cli_drill",
    "pause": "pipeline.app.cli_site",
    "resume": "pipeline.app.cli_site",
    "failover": "pipeline.app.cli_failover",
    "switchover": "pipeline.app.cli_failover",
    "failback": "pipeline.app.cli_failback",
    "marker": "pipeline.app.cli_marker",
    "snapshot": "pipeline.app.cli_snapshot",
    "serve-snapshot": "pipeline.app.cli_snapshot",
    "topology": "pipeline.app.cli_topology",
    "volume": "pipeline.app.cli_topology",
    "migrate": "pipeline.app.cli_migrate",
    "console": "pipeline.app.cli_console",
    "kafka": "connectors.embedded_kafka.cli",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None or cmd_name not in _COMMAND_MODULES:
            return found
        module = importlib.import_module(_COMMAND_MODULES[cmd_name])
        commands = getattr(module, "COMMANDS", None) or [getattr(module, cmd_name)]
        for command in commands:
            if command.name == cmd_name:
                self.add_command(command)
                return command
        raise LookupError(f"{_COMMAND_MODULES[cmd_name]} defines no command {cmd_name!r}")


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="info", envvar="LOWMARK_LOG_LEVEL", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="LOWMARK_LOG_FORMAT",
    show_default=True,
)
def main(log_level: str, log_format: str) -> None:
    """lowmark: consistent block replication through Apache Kafka."""
    setup_logging(log_level, log_format)


def run() -> None:
    """Entry point that turns LowmarkError into a one-line message and exit code 2.

    Kafka's own errors never get here raw: ``connectors.kafka`` hands every one on as a
    ``KafkaError`` (a LowmarkError), with librdkafka's code and verdict.
    """
    try:
        main(standalone_mode=False)
    except LowmarkError as exc:
        click.echo(f"lowmark: error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    run()
