"""The ``lowmark`` command. Subcommand groups live beside the code they drive."""

from __future__ import annotations

import sys

import click

from pipeline.errors import LowmarkError
from pipeline.logs import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


def _register() -> None:
    from connectors.embedded_kafka.cli import kafka
    from pipeline.app.cli_drill import COMMANDS as DRILL
    from pipeline.app.cli_failover import COMMANDS as FAILOVER
    from pipeline.app.cli_ops import COMMANDS as OPS
    from pipeline.app.cli_roles import COMMANDS as ROLES
    from pipeline.app.cli_services import COMMANDS as SERVICES

    main.add_command(kafka)
    for command in [*SERVICES, *OPS, *ROLES, *DRILL, *FAILOVER]:
        main.add_command(command)


_register()


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
