"""``lowmark kafka``: run the embedded KRaft cluster on loopback (up / down / status / fetch).

Registered on the ``lowmark`` command by ``pipeline/app/cli.py``; ``python -m
connectors.embedded_kafka.cli`` runs the same group alone (what `make kafka-jars` does).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from connectors.embedded_kafka.cluster import KafkaCluster
from connectors.embedded_kafka.jars import POM_ENV, ensure_jars, kafka_pom, kafka_version
from connectors.embedded_kafka.procs import pid_alive
from connectors.embedded_kafka.state import cluster_dir, find_bootstrap, load_state
from pipeline.errors import LowmarkError, SetupError

F = TypeVar("F", bound=Callable[..., Any])
_POM_KEY = "lowmark.kafka.pom"  # ctx.meta is shared by the group and its subcommands

_name_option = click.option(
    "--name", default="default", show_default=True, help="Cluster name (a directory under "
    "$LOWMARK_HOME/kafka)."
)


class _LowmarkClickError(click.ClickException):
    exit_code = 2  # as pipeline.app.cli.run does for a LowmarkError

    def format_message(self) -> str:
        return f"lowmark: error: {self.message}"

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True)


def _clean_errors(func: F) -> F:
    """A LowmarkError becomes its one-line message and exit 2, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LowmarkError as exc:
            raise _LowmarkClickError(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@click.group("kafka")
@click.option("--pom", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"The Kafka pom to run (default: ${POM_ENV}, else the one shipped "
              "with lowmark).")
@click.pass_context
def kafka(ctx: click.Context, pom: Path | None) -> None:
    """The embedded Kafka cluster (Apache Kafka from Maven Central, on 127.0.0.1)."""
    ctx.meta[_POM_KEY] = pom


def _pom() -> Path | None:
    """The group's ``--pom`` (None: ``$LOWMARK_KAFKA_POM`` or the packaged pom decides)."""
    pom = click.get_current_context().meta.get(_POM_KEY)
    return pom if isinstance(pom, Path) else None


@kafka.command()
@click.option("--nodes", type=click.Choice(["1", "3"]), default="1", show_default=True,
              help="1 for development, 3 for fault tests (replication 3, min ISR 2).")
@_name_option
@click.option("--timeout", "timeout_s", type=float, default=60, show_default=True,
              help="Seconds to wait for every broker to serve metadata.")
@click.option("--fresh", is_flag=True, help="Wipe the cluster's data and ports first.")
@_clean_errors
def up(nodes: str, name: str, timeout_s: float, fresh: bool) -> None:
    """Start the cluster (idempotent: an already running cluster is left alone)."""
    existing = find_bootstrap(name)
    recorded = len((load_state(cluster_dir(name)) or {}).get("nodes", []))
    if existing and recorded != int(nodes):
        raise SetupError(
            f"kafka cluster {name!r} is up with {recorded} node(s), not {nodes}: "
            f"`lowmark kafka down --name {name}` first, or use another --name"
        )
    if existing and not fresh:
        click.echo(f"kafka cluster {name!r} is already up: {existing}")
        _hint(existing)
        return
    cluster = KafkaCluster(name, nodes=int(nodes), pom=_pom())
    if fresh:
        cluster.wipe()
        cluster = KafkaCluster(name, nodes=int(nodes), pom=_pom())
    cluster.start(timeout_s=timeout_s, fresh=fresh)
    click.echo(f"kafka cluster {name!r} is up: {cluster.bootstrap_servers}")
    click.echo(f"  nodes: {cluster.node_pids} (node: pid)   record: {cluster.state_file}")
    click.echo(f"  broker logs: {cluster.base_dir}/node*/server.log")
    _hint(cluster.bootstrap_servers)


@kafka.command()
@_name_option
@click.option("--wipe", is_flag=True, help="Also delete the cluster's data and logs.")
@_clean_errors
def down(name: str, wipe: bool) -> None:
    """Stop the cluster's brokers (only the processes it started)."""
    state = load_state(cluster_dir(name))
    if state is None:
        click.echo(f"no kafka cluster {name!r} recorded under {cluster_dir(name)}")
        return
    cluster = KafkaCluster(name, nodes=len(state["nodes"]), pom=_pom())
    if wipe:
        cluster.wipe()
        click.echo(f"kafka cluster {name!r} stopped and wiped")
    else:
        cluster.stop()
        click.echo(f"kafka cluster {name!r} stopped (data kept; `up` resumes it)")


@kafka.command()
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_clean_errors
def status(name: str, as_json: bool) -> None:
    """Bootstrap servers, broker processes and topic count. Exit 1 when not running."""
    info = cluster_status(name)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif not info["recorded"]:
        click.echo(f"no kafka cluster {name!r} recorded under {info['dir']}")
    else:
        click.echo(f"kafka cluster {name!r} ({info['version']}): "
                   f"{'up' if info['running'] else 'DOWN'}")
        click.echo(f"  bootstrap: {info['bootstrap']}")
        for node in info["nodes"]:
            click.echo(f"  node {node['node_id']}: pid {node['pid']} "
                       f"{'alive' if node['alive'] else 'not running'}  port {node['port']}")
        if info["topics"] is not None:
            click.echo(f"  topics: {info['topics']}")
        if info["running"]:
            _hint(info["bootstrap"])
    sys.exit(0 if info["running"] else 1)


@kafka.command()
@_clean_errors
def fetch() -> None:
    """Fetch the Kafka jars into the cache (once; fast when already there)."""
    click.echo(f"kafka {kafka_version(_pom())} jars: {ensure_jars(_pom())}")
    click.echo(f"  pom: {kafka_pom(_pom())}")


def cluster_status(name: str) -> dict[str, Any]:
    """What ``status`` shows, as a dict (topics: None when the cluster does not answer)."""
    base = cluster_dir(name)
    state = load_state(base)
    info: dict[str, Any] = {"name": name, "dir": str(base), "recorded": state is not None,
                            "running": False, "bootstrap": None, "nodes": [], "topics": None,
                            "version": None}
    if state is None:
        return info
    for node in state.get("nodes", []):
        props = str(Path(node["dir"]) / "server.properties")
        info["nodes"].append({**node, "alive": pid_alive(node.get("pid"), props)})
    info.update(version=state.get("version"), bootstrap=state.get("bootstrap"),
                running=bool(info["nodes"]) and all(n["alive"] for n in info["nodes"]))
    if any(n["alive"] for n in info["nodes"]):
        info["topics"] = _topic_count(info["bootstrap"])
    return info


def _topic_count(bootstrap: str) -> int | None:
    from confluent_kafka.admin import AdminClient

    try:
        md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5)
    except Exception:  # status reports, it does not fail
        return None
    return sum(1 for t in md.topics if not t.startswith("__"))


def _hint(bootstrap: str) -> None:
    kcat = "kcat" if shutil.which("kcat") else "kcat (apt-get install kcat)"
    click.echo(f"  inspect: {kcat} -b {bootstrap} -L")
    click.echo(f"  export LOWMARK_BOOTSTRAP_SERVERS={bootstrap}")


if __name__ == "__main__":
    kafka(prog_name="python -m connectors.embedded_kafka.cli")
