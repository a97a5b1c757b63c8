"""The deployment files describe commands and settings that exist.

Tries to break: a systemd unit or the example config naming a subcommand, option or key
that the code does not have (they would only fail on an operator's host).
"""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import click
import pytest

from pipeline.app.cli import main
from pipeline.app.config import load_config

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def test_there_is_a_unit_per_service():
    assert {u.name for u in UNITS} == {
        "lowmark-serve@.service",
        "lowmark-watermark@.service",
        "lowmark-apply@.service",
    }


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_runs_a_real_subcommand_with_real_options(unit: Path):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    argv = shlex.split(parser["Service"]["ExecStart"])
    assert argv[0].endswith("/lowmark")
    sub = main.get_command(click.Context(main), argv[1])
    assert isinstance(sub, click.Command), f"{unit.name}: no `lowmark {argv[1]}`"
    known = {opt for p in sub.params for opt in getattr(p, "opts", [])}
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert arg in known, f"{unit.name}: `lowmark {argv[1]}` has no option {arg}"
    assert parser["Service"]["KillSignal"] == "SIGTERM"


def test_example_config_loads_with_every_section(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("LOWMARK_"):
            monkeypatch.delenv(key)
    cfg = load_config(ROOT / "deploy" / "lowmark.example.toml")
    assert cfg.cg.name == "db"
    assert [v.name for v in cfg.serve.volumes] == ["data", "scratch"]
    assert cfg.serve.volumes[0].size == 100 << 30 and cfg.serve.volumes[0].mode == "sync"
    assert cfg.apply.site == "dr1" and cfg.watermark.liveness_timeout_s == 10
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
