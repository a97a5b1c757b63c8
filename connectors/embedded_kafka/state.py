"""Where an embedded cluster lives and the record it leaves there, read without starting it.

A cluster directory, by default ``${LOWMARK_HOME:-./.lowmark}/kafka/<name>``, holds one
directory per node (properties, log4j2 config, data, ``server.log``, ``stdout.log``) and
``cluster.json``, the record other commands read to find the cluster
(:func:`find_bootstrap`, which the CLI and the demo inject where a Kafka connection is
resolved).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.embedded_kafka.procs import pid_alive, read_text

STATE_FILE = "cluster.json"


def lowmark_home() -> Path:
    """``$LOWMARK_HOME`` or ``./.lowmark``, as an absolute path."""
    return Path(os.environ.get("LOWMARK_HOME") or ".lowmark").expanduser().absolute()


def cluster_dir(name: str, home: Path | None = None) -> Path:
    """The directory of cluster ``name`` under ``home`` (default :func:`lowmark_home`)."""
    return (home or lowmark_home()) / "kafka" / name


@dataclass
class NodeState:
    """One node as ``cluster.json`` records it: ports, directory, PID while it runs."""

    node_id: int
    port: int
    controller_port: int
    dir: str
    pid: int | None = None

    @property
    def props(self) -> Path:
        return Path(self.dir) / "server.properties"

    @property
    def data_dir(self) -> Path:
        return Path(self.dir) / "data"

    @property
    def server_log(self) -> Path:
        return Path(self.dir) / "server.log"

    @property
    def stdout_log(self) -> Path:
        return Path(self.dir) / "stdout.log"

    def alive(self) -> bool:
        return pid_alive(self.pid, str(self.props))


def load_state(base_dir: Path) -> dict[str, Any] | None:
    """The parsed ``cluster.json`` in ``base_dir``, or None if there is none."""
    text = read_text(base_dir / STATE_FILE)
    if text is None:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def find_bootstrap(name: str = "default", home: Path | None = None) -> str | None:
    """Bootstrap servers of the running embedded cluster ``name``, or None.

    None when there is no record or none of its recorded brokers is alive.
    """
    state = load_state(cluster_dir(name, home))
    if not state:
        return None
    nodes = [NodeState(**n) for n in state.get("nodes", [])]
    return state.get("bootstrap") if any(n.alive() for n in nodes) else None
