"""docker-compose.yml and the Dockerfile against the code, without a Docker engine.

Tries to break: a service running a `lowmark` subcommand or option that does not exist; a
config the real loader rejects; services pointed at a bootstrap address the broker does not
advertise; a published port nothing listens on (or published twice); the Kafka image
drifting from the release deploy/kafka/pom.xml pins; an image missing a package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from connectors.embedded_kafka.jars import kafka_version
from pipeline.app.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
LOWMARK = {name: svc for name, svc in SERVICES.items() if name != "kafka"}
KAFKA_ENV: dict[str, str] = {k: str(v) for k, v in SERVICES["kafka"]["environment"].items()}


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    out = {}
    for item in value.split(","):
        name, _, addr = item.partition("://")
        host, _, port = addr.rpartition(":")
        out[name] = (host, int(port))
    return out


def _config_text(service: dict[str, Any]) -> str:
    (ref,) = [c for c in service["configs"] if c["target"] == "/etc/lowmark/lowmark.toml"]
    return COMPOSE["configs"][ref["source"]]["content"]


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


def test_the_services_are_there():
    assert {"kafka", "serve", "watermark", "apply"} <= set(SERVICES)


def test_kafka_image_matches_the_pinned_release():
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{kafka_version()}"


@pytest.mark.parametrize("name", sorted(LOWMARK))
def test_service_command_is_a_real_subcommand_with_real_options(name):
    from pipeline.app.cli import main

    command = LOWMARK[name]["command"]
    assert command[0] == "lowmark", "services run the lowmark entry point"
    ctx = click.Context(main)
    sub = main.get_command(ctx, command[1])
    # a service naming a missing subcommand would crash-loop in its container: a failure
    assert sub is not None, (f"`lowmark {command[1]}` is not a subcommand "
                             f"(lowmark has: {main.list_commands(ctx)})")
    known = {opt for p in sub.params if isinstance(p, click.Option) for opt in p.opts}
    used = {arg.split("=", 1)[0] for arg in command[2:] if arg.startswith("--")}
    assert used <= known, f"`lowmark {command[1]}` has no option {sorted(used - known)}"
    # click parses the arguments exactly as the container would pass them
    ctx = sub.make_context(command[1], list(command[2:]), resilient_parsing=True)
    assert ctx.params["config_path"] == Path("/etc/lowmark/lowmark.toml")


@pytest.mark.parametrize("name", sorted(LOWMARK))
def test_config_loads_with_the_services_environment(name, tmp_path):
    service = LOWMARK[name]
    path = tmp_path / "lowmark.toml"
    path.write_text(_config_text(service))
    env = {k: str(v) for k, v in service["environment"].items()}
    cfg = load_config(path, environ=env)
    assert cfg.kafka.bootstrap_servers == env["LOWMARK_BOOTSTRAP_SERVERS"]
    mounts = {str(v).split(":")[1] for v in service.get("volumes", [])}
    if name == "serve":
        assert cfg.serve.data_dir in mounts, "the primary images must live on a volume"
        assert cfg.serve.volumes, "serve needs at least one volume"
    if name == "apply":
        assert cfg.apply.data_dir in mounts, "the backup images must live on a volume"


def test_services_use_the_address_kafka_advertises_inside_the_network():
    advertised = _listeners(KAFKA_ENV["KAFKA_ADVERTISED_LISTENERS"])
    inter = KAFKA_ENV["KAFKA_INTER_BROKER_LISTENER_NAME"]
    host, port = advertised[inter]
    assert host in {"kafka", SERVICES["kafka"].get("hostname")}
    listening = _listeners(KAFKA_ENV["KAFKA_LISTENERS"])
    assert listening[inter][1] == port
    for name, service in LOWMARK.items():
        assert service["environment"]["LOWMARK_BOOTSTRAP_SERVERS"] == f"{host}:{port}", name
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy", name
    # the listener the host uses is published on the same port it advertises
    others = {k: v for k, v in advertised.items() if k != inter}
    published = _published(SERVICES["kafka"])
    for _name, (adv_host, adv_port) in others.items():
        assert adv_host in {"127.0.0.1", "localhost"}
        assert published.get(adv_port) == adv_port
    assert f":{port}" in SERVICES["kafka"]["healthcheck"]["test"][-1]
    voters = KAFKA_ENV["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters == f"{KAFKA_ENV['KAFKA_NODE_ID']}@{host}:{listening['CONTROLLER'][1]}"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", KAFKA_ENV["CLUSTER_ID"].split()[0])


def test_published_ports_are_what_the_services_listen_on():
    host_ports: list[int] = []
    for name, service in LOWMARK.items():
        cfg = tomllib.loads(_config_text(service))
        section = cfg[name]
        listening = {int(section[k].rpartition(":")[2]) for k in ("listen", "metrics")
                     if section.get(k)}
        published = _published(service)
        assert set(published) == listening, f"{name} publishes {published}, listens {listening}"
        host_ports += published.values()
    host_ports += _published(SERVICES["kafka"]).values()
    assert len(host_ports) == len(set(host_ports)), "a host port is published twice"


def test_dockerfile_installs_the_package_it_runs():
    text = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    for package in top_level:
        assert re.search(rf"^COPY {package} ", text, re.M), f"the image lacks {package}/"
    python = re.search(r"^FROM python:(\d+)\.(\d+)", text, re.M)
    assert python and (int(python[1]), int(python[2])) >= (3, 11)
    assert "pip install" in text and "lowmark" in text
    for name, service in LOWMARK.items():
        assert service["build"] == "." and service["image"] == LOWMARK["serve"]["image"], name


def test_docker_compose_accepts_the_file_when_docker_is_there():
    docker = shutil.which("docker")
    has_compose = docker and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30, check=False
    ).returncode == 0
    if not has_compose:
        pytest.skip("no `docker compose` here: the checks above stand in for its `config`")
    out = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                          "-q"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
