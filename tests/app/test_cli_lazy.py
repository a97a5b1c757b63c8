"""The ``lowmark`` command imports a subcommand's module only when it runs; every command a
module defines must still be reachable, and none may be listed that does not exist."""

from __future__ import annotations

import importlib

import click

from pipeline.app import cli


def test_every_command_of_every_module_is_reachable_and_nothing_else_is_listed():
    ctx = click.Context(cli.main)
    defined: dict[str, click.Command] = {}
    for module in sorted(set(cli._COMMAND_MODULES.values())):
        mod = importlib.import_module(module)
        for command in getattr(mod, "COMMANDS", []):
            defined[command.name] = command
    defined["kafka"] = importlib.import_module("connectors.embedded_kafka.cli").kafka
    assert sorted(cli.main.list_commands(ctx)) == sorted(defined)
    for name, command in defined.items():
        assert cli.main.get_command(ctx, name) is command, name
    assert cli.main.get_command(ctx, "no-such-command") is None
