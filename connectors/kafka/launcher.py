"""Fetch the Kafka broker jars with mvn and run 1- or 3-node KRaft clusters on loopback.

Everything lives in two places:

- the jar cache ``${LOWMARK_CACHE:-~/.cache/lowmark}/kafka/<version>/libs``, filled once by
  ``mvn dependency:copy-dependencies`` on ``deploy/kafka/pom.xml`` and shared by every
  cluster; ``libs.complete`` is written only after a complete fetch, so an interrupted
  fetch is redone;
- a cluster directory, by default ``${LOWMARK_HOME:-./.lowmark}/kafka/<name>``, holding one
  directory per node (properties, log4j2 config, data, ``server.log``, ``stdout.log``) and
  ``cluster.json``, the record other commands read to find the cluster
  (:func:`find_bootstrap`).

Every node is a combined broker+controller with a static controller quorum, so a node
restarted by :meth:`KafkaCluster.start_node` rejoins on the same ports and data. Only the
processes a cluster started (checked by PID *and* command line) are ever signalled.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import KafkaStartError, SetupError

log = logging.getLogger(__name__)

KAFKA_POM = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "pom.xml"
STATE_FILE = "cluster.json"
MIN_JAVA = 17
LOG_TAIL_LINES = 40
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ADDR_IN_USE = "Address already in use"
_STARTED = b"Kafka Server started"  # KafkaRaftServer, once the broker is registered

# Sized for a 2-core / 24 GiB machine shared with the clients under test. G1 with a short
# pause goal keeps produce latency flat; ActiveProcessorCount stops the JVM from sizing
# GC and JIT thread pools for cores it does not get. Full tiered compilation stays on:
# C1 only (TieredStopAtLevel=1) halves start-up CPU but leaves the broker's hot paths
# unoptimised for its whole life; the class-data-sharing archive (_cds_flags) buys most
# of that start-up back instead (measured: 4.7 s -> 2.5 s CPU to a started broker).
_BROKER_JVM_FLAGS = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:ActiveProcessorCount=2",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
# The storage formatter runs for a second: C1 only and a small heap start it fastest.
_TOOL_JVM_FLAGS = ("-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


# --------------------------------------------------------------------------- locations


def lowmark_home() -> Path:
    """``$LOWMARK_HOME`` or ``./.lowmark``, as an absolute path."""
    return Path(os.environ.get("LOWMARK_HOME") or ".lowmark").expanduser().absolute()


def cache_root() -> Path:
    """``$LOWMARK_CACHE`` or ``~/.cache/lowmark``: downloads shared by every checkout."""
    return Path(os.environ.get("LOWMARK_CACHE") or "~/.cache/lowmark").expanduser().absolute()


def cluster_dir(name: str, home: Path | None = None) -> Path:
    return (home or lowmark_home()) / "kafka" / name


def kafka_version(pom: Path = KAFKA_POM) -> str:
    """The Kafka release pinned in ``deploy/kafka/pom.xml`` (its ``kafka.version``)."""
    try:
        root = ET.parse(pom).getroot()
    except (OSError, ET.ParseError) as exc:
        raise SetupError(
            f"cannot read the Kafka pom {pom}: {exc}. The launcher runs from a lowmark "
            "checkout (deploy/kafka/pom.xml); restore the file with `git checkout`."
        ) from exc
    node = root.find("{http://maven.apache.org/POM/4.0.0}properties/"
                     "{http://maven.apache.org/POM/4.0.0}kafka.version")
    if node is None or not (node.text or "").strip():
        raise SetupError(f"{pom} has no <kafka.version> property; restore it with `git checkout`")
    return node.text.strip()


# --------------------------------------------------------------------------- java


def find_java() -> str:
    """Path of ``java``: ``$JAVA_HOME/bin/java`` if set, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise SetupError(
            f"java is not installed (Kafka needs Java >= {MIN_JAVA}). Install it with "
            "`apt-get install default-jre-headless` or run `make deps` as root."
        )
    return found


def parse_java_major(version_output: str) -> int:
    """Major version from ``java -version`` output (``"17.0.15"`` -> 17, ``"1.8.0"`` -> 8)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not match:
        raise SetupError(
            f"cannot tell the Java version from `java -version`: {version_output.strip()!r}. "
            f"Install Java >= {MIN_JAVA}: `apt-get install default-jre-headless`."
        )
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def java_version_text(java: str) -> str:
    """What ``java -version`` prints (on stderr)."""
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"`{java} -version` failed: {exc}. Reinstall Java >= {MIN_JAVA}.") from exc
    return out.stderr + out.stdout


def check_java() -> str:
    """The java binary to use; :class:`SetupError` if it is missing or older than 17."""
    java = find_java()
    major = parse_java_major(java_version_text(java))
    if major < MIN_JAVA:
        raise SetupError(
            f"{java} is Java {major}; Kafka 4 needs Java >= {MIN_JAVA}. Install it with "
            "`apt-get install default-jre-headless` and put it first on PATH "
            "(or set JAVA_HOME)."
        )
    return java


# --------------------------------------------------------------------------- jars


def jars_dir(version: str | None = None) -> Path:
    return cache_root() / "kafka" / (version or kafka_version()) / "libs"


def ensure_jars(pom: Path = KAFKA_POM, timeout_s: float = 900) -> Path:
    """Return the directory of Kafka's jars, fetching them with mvn the first time.

    Safe against concurrent callers (a lock file) and interruption (the jars are fetched
    into ``libs.partial`` and renamed; the marker names the pom's hash, so editing the pom
    fetches again).
    """
    version = kafka_version(pom)
    libs = jars_dir(version)
    top = libs.parent
    pom_bytes = pom.read_bytes()
    marker_text = f"{version} {hashlib.sha256(pom_bytes).hexdigest()}\n"
    marker = top / "libs.complete"
    if _read(marker) == marker_text and libs.is_dir():
        return libs
    try:
        top.mkdir(parents=True, exist_ok=True)
        lock = open(top / ".fetch.lock", "a")  # noqa: SIM115 - held across the fetch
    except OSError as exc:
        raise SetupError(
            f"cannot create the Kafka jar cache {top}: {exc}. Set LOWMARK_CACHE to a "
            "writable directory (default ~/.cache/lowmark)."
        ) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read(marker) == marker_text and libs.is_dir():  # another process fetched it
            return libs
        _mvn_fetch(pom_bytes, version, top, timeout_s)
        marker.write_text(marker_text)
        return libs


def _mvn_fetch(pom_bytes: bytes, version: str, top: Path, timeout_s: float) -> None:
    mvn = shutil.which("mvn")
    if not mvn:
        raise SetupError(
            "mvn (Apache Maven) is not installed; it fetches the Kafka jars from Maven Central "
            "once. Install it with `apt-get install maven`, or run `make deps` as root."
        )
    libs, partial = top / "libs", top / "libs.partial"
    (top / "libs.complete").unlink(missing_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    # mvn writes target/ beside the pom: run on a copy in the cache, not in the checkout.
    (top / "pom.xml").write_bytes(pom_bytes)
    cmd = [mvn, "-q", "-B", "-f", str(top / "pom.xml"), "dependency:copy-dependencies",
           f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
    log.info("fetching Kafka %s jars with mvn into %s", version, libs)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SetupError(
            f"mvn did not finish fetching the Kafka jars in {timeout_s:.0f} s. Check that "
            f"Maven Central is reachable, then retry `make kafka-jars`. Command: {shlex.join(cmd)}"
        ) from exc
    if out.returncode != 0 or not (partial / f"kafka_2.13-{version}.jar").is_file():
        tail = _last_lines(out.stdout + out.stderr)
        raise SetupError(
            f"mvn failed to fetch the Kafka {version} jars (exit {out.returncode}). Check "
            f"network access to Maven Central and ~/.m2/settings.xml, then retry "
            f"`make kafka-jars`.\ncommand: {shlex.join(cmd)}\n{tail}"
        )
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A loopback port nobody listens on right now (it may be taken before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the JVM's server sockets: a TIME_WAIT left by a killed broker must
    # not count as "in use" when the node restarts on its port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if given, has ``marker`` in its command line.

    The marker (a node's properties path) guards against a recycled PID: we never signal a
    process we did not start.
    """
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return marker is None or marker in cmdline.split("\0")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return f"({path} not found)"
    return _last_lines(data, lines) or f"({path} is empty)"


_FRAME = re.compile(r"^\s+(at |\.\.\. \d+ more)")


def _last_lines(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines without Java stack frames, so the exception's message (the
    line that says what is wrong) survives the cut."""
    kept = [line for line in text.splitlines() if not _FRAME.match(line)]
    return "\n".join(kept[-lines:])


# --------------------------------------------------------------------------- cluster


@dataclass
class NodeState:
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


def load_state(base_dir: Path) -> dict | None:
    """The parsed ``cluster.json`` in ``base_dir``, or None if there is none."""
    text = _read(base_dir / STATE_FILE)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def find_bootstrap(name: str = "default", home: Path | None = None) -> str | None:
    """Bootstrap servers of the running embedded cluster ``name``, or None.

    None when there is no record or none of its recorded brokers is alive.
    """
    state = load_state(cluster_dir(name, home))
    if not state:
        return None
    nodes = [NodeState(**n) for n in state.get("nodes", [])]
    return state.get("bootstrap") if any(n.alive() for n in nodes) else None


class KafkaCluster:
    """A KRaft cluster of ``nodes`` combined broker+controller JVMs on 127.0.0.1.

    ``base_dir`` is the cluster's own directory (default ``$LOWMARK_HOME/kafka/<name>``).
    ``base_port`` pins ports (node i: ``base_port + 2i`` for clients, ``+1`` for the
    controller); without it free ports are picked at start. ``die_with_parent`` makes the
    brokers die with the process that started them (test sessions); the CLI leaves it off
    so ``lowmark kafka up`` returns with the cluster running.
    """

    def __init__(
        self,
        name: str,
        nodes: int = 1,
        base_dir: Path | None = None,
        heap: str | None = None,
        extra_broker_props: Mapping[str, str] | None = None,
        base_port: int | None = None,
        die_with_parent: bool = False,
    ) -> None:
        if not _NAME.match(name):
            raise SetupError(
                f"cluster name {name!r} is invalid: use letters, digits, '.', '-', '_' "
                "(it becomes a directory name)"
            )
        if nodes < 1:
            raise SetupError(f"a cluster needs at least one node, got nodes={nodes}")
        self.name = name
        self.nodes = nodes
        self.base_dir = Path(base_dir).absolute() if base_dir else cluster_dir(name)
        self.heap = heap or ("1g" if nodes == 1 else "512m")
        self.extra_broker_props = dict(extra_broker_props or {})
        self.base_port = base_port
        self.die_with_parent = die_with_parent
        self.version = kafka_version()
        self._nodes: dict[int, NodeState] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[int, int] = {}  # server.log size at each node's launch
        self._cds_dump: tuple[int, str] | None = None  # (node, file) writing the CDS archive
        self._cluster_id: str | None = None
        self._adopt_state()

    # ---- public view

    @property
    def bootstrap_servers(self) -> str:
        if not self._nodes:
            raise SetupError(f"cluster {self.name!r} was never started: call start() first")
        return ",".join(f"127.0.0.1:{n.port}" for n in self._nodes.values())

    @property
    def node_pids(self) -> dict[int, int | None]:
        """PID of each node, None for a node that is not running."""
        return {i: (n.pid if self._alive(n) else None) for i, n in self._nodes.items()}

    @property
    def node_ids(self) -> list[int]:
        return sorted(self._nodes)

    def controller_leader(self) -> int | None:
        """The node leading the controller quorum (the active controller), if agreed."""
        return self._quorum_leader()

    @property
    def state_file(self) -> Path:
        return self.base_dir / STATE_FILE

    def node_dir(self, node_id: int) -> Path:
        return Path(self._node(node_id).dir)

    def server_log(self, node_id: int) -> Path:
        return self._node(node_id).server_log

    def is_running(self) -> bool:
        """True when every node's process is alive."""
        return bool(self._nodes) and all(self._alive(n) for n in self._nodes.values())

    # ---- lifecycle

    def start(self, timeout_s: float = 60, fresh: bool = False) -> KafkaCluster:
        """Start every node and wait until all of them serve metadata.

        Reuses the recorded ports and data of a stopped cluster of this name unless
        ``fresh`` (or the record does not match), which wipes the node directories.
        """
        if any(self._alive(n) for n in self._nodes.values()):
            raise SetupError(
                f"Kafka cluster {self.name!r} is already running at {self.bootstrap_servers} "
                f"(record: {self.state_file}); stop it first (`lowmark kafka down --name "
                f"{self.name}`)"
            )
        java = check_java()
        libs = ensure_jars()
        resumable = not fresh and self._formatted()
        attempts = 1 if (resumable or self.base_port) else 3
        for attempt in range(1, attempts + 1):
            try:
                if not resumable:
                    self._layout(fresh_ports=attempt > 1 or not self.base_port)
                self._check_ports_free()
                if not resumable:
                    self._format(java, libs)
                for node_id in self._nodes:
                    self._launch(node_id, java, libs)
                self._save()
                self._wait_ready(set(self._nodes), timeout_s)
                return self
            except BaseException as exc:
                self.stop(grace_s=5)  # never leave a half-started cluster behind
                # Ports picked free can be taken before the JVM binds them: pick again.
                if not (isinstance(exc, SetupError) and attempt < attempts
                        and _ADDR_IN_USE in str(exc)):
                    raise
                log.warning("a picked port was taken at launch; retrying with new ports")
        raise AssertionError("unreachable")

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM every node, SIGKILL those still running after ``grace_s``. Idempotent."""
        live = [n for n in self._nodes.values() if self._alive(n)]
        for node in live:
            self._signal(node, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in live:
            clean = self._wait_exit(node, deadline - time.monotonic())
            if not clean:
                log.warning("kafka node %s ignored SIGTERM for %.0f s; killing it",
                            node.node_id, grace_s)
                self._signal(node, signal.SIGKILL)
                self._wait_exit(node, 10)
            self._finish_cds_dump(node.node_id, keep=clean)
        for node in self._nodes.values():
            node.pid = None
        self._procs.clear()
        if self._nodes:
            self._save()

    def kill_node(self, node_id: int) -> None:
        """kill -9 one node (a crash: no controlled shutdown, no flush)."""
        node = self._node(node_id)
        if self._alive(node):
            self._signal(node, signal.SIGKILL)
            self._wait_exit(node, 10)
        self._finish_cds_dump(node_id, keep=False)
        node.pid = None
        self._procs.pop(node_id, None)
        self._save()

    def start_node(self, node_id: int, timeout_s: float = 60) -> None:
        """Restart a stopped node on its ports and data dir; wait until it serves again."""
        node = self._node(node_id)
        if self._alive(node):
            raise SetupError(f"kafka node {node_id} of {self.name!r} is already running "
                             f"(pid {node.pid})")
        java, libs = check_java(), ensure_jars()
        self._check_ports_free([node])
        self._launch(node_id, java, libs)
        self._save()
        try:
            self._wait_ready({node_id}, timeout_s)
        except BaseException:
            self.kill_node(node_id)
            raise

    def wipe(self) -> None:
        """Stop the cluster and delete its directory (data, logs, record)."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self._nodes.clear()

    def __enter__(self) -> KafkaCluster:
        return self.start() if not self.is_running() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- layout and configuration

    def _node(self, node_id: int) -> NodeState:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise SetupError(
                f"cluster {self.name!r} has no node {node_id} (nodes: {sorted(self._nodes)})"
            ) from None

    def _adopt_state(self) -> None:
        """Pick up the record of an earlier start, so down/status/restart find its PIDs."""
        state = load_state(self.base_dir)
        if not state:
            return
        recorded = [NodeState(**n) for n in state.get("nodes", [])]
        if len(recorded) != self.nodes or state.get("version") != self.version:
            live = [n.pid for n in recorded if n.alive()]
            if live:
                raise SetupError(
                    f"Kafka cluster {self.name!r} is running with {len(recorded)} node(s) of "
                    f"Kafka {state.get('version')} (pids {live}); stop it first: "
                    f"`lowmark kafka down --name {self.name}`"
                )
            return  # a stopped cluster of another shape: start() lays out a fresh one
        self._nodes = {n["node_id"]: NodeState(**n) for n in state["nodes"]}
        self._cluster_id = state.get("cluster_id")
        dump = state.get("cds_dump")
        self._cds_dump = (int(dump[0]), str(dump[1])) if dump else None

    def _formatted(self) -> bool:
        return bool(self._nodes) and all(
            (n.data_dir / "meta.properties").is_file() and n.props.is_file()
            for n in self._nodes.values()
        )

    def _layout(self, fresh_ports: bool) -> None:
        for node in self._nodes.values():
            shutil.rmtree(node.dir, ignore_errors=True)
        try:
            self.base_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SetupError(
                f"cannot create the cluster directory {self.base_dir}: {exc}. Set LOWMARK_HOME "
                "to a writable directory."
            ) from exc
        ports = self._pick_ports(fresh_ports)
        self._cluster_id = _random_cluster_id()
        self._nodes = {}
        for i in range(self.nodes):
            node_id = i + 1
            node = NodeState(node_id, ports[2 * i], ports[2 * i + 1],
                             str(self.base_dir / f"node{node_id}"))
            Path(node.dir).mkdir(parents=True, exist_ok=True)
            self._nodes[node_id] = node
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}"
                          for n in self._nodes.values())
        for node in self._nodes.values():
            node.props.write_text(_render_props(self._broker_props(node, voters)))
            (Path(node.dir) / "log4j2.properties").write_text(_log4j2_config(node.server_log))

    def _pick_ports(self, fresh: bool) -> list[int]:
        if self.base_port and not fresh:
            return [self.base_port + k for k in range(2 * self.nodes)]
        ports: list[int] = []
        while len(ports) < 2 * self.nodes:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return ports

    def _broker_props(self, node: NodeState, voters: str) -> dict[str, str]:
        rf = min(3, self.nodes)
        min_isr = min(2, self.nodes)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},"
                         f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            # A static quorum: every node knows every voter, so a killed node restarts and
            # rejoins without any reconfiguration.
            "controller.quorum.voters": voters,
            "log.dirs": str(node.data_dir),
            # lowmark creates its topics explicitly; a typo must fail, not create a topic.
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": str(rf),
            # Internal topics must fit the cluster or transactions and groups never start.
            "offsets.topic.replication.factor": str(rf),
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": str(min_isr),
            "share.coordinator.state.topic.replication.factor": str(rf),
            "share.coordinator.state.topic.min.isr": str(min_isr),
            # 50 partitions each (the default) cost seconds on first use on a 2-core machine.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "10",
            "group.initial.rebalance.delay.ms": "0",
            # A crashed broker is fenced (and leaves the ISR) after the session timeout, and
            # a restarted one cannot register again before it: 9 s by default, 3 s on
            # loopback where a missed 500 ms heartbeat means a stall, not the network.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
        }
        props.update(self.extra_broker_props)
        return props

    def _format(self, java: str, libs: Path) -> None:
        """Write meta.properties and the bootstrap metadata into every node's data dir."""
        procs = []
        archive = _cds_archive(java, libs)
        cds = [f"-XX:SharedArchiveFile={archive}"] if archive.is_file() else []
        for node in self._nodes.values():
            cmd = [java, *_TOOL_JVM_FLAGS, *cds, "-cp", f"{libs}/*",
                   f"-Dlog4j2.configurationFile={Path(node.dir) / 'log4j2.properties'}",
                   "kafka.tools.StorageTool", "format", "--ignore-formatted",
                   "-t", str(self._cluster_id), "-c", str(node.props)]
            procs.append((node, cmd, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))
        for node, cmd, proc in procs:
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise KafkaStartError(
                    f"formatting the storage of kafka node {node.node_id} failed "
                    f"(exit {proc.returncode}); check the broker properties "
                    f"(extra_broker_props: {self.extra_broker_props}).\n"
                    f"command: {shlex.join(cmd)}\n"
                    + _last_lines(out.decode(errors="replace"))
                )

    def _check_ports_free(self, nodes: list[NodeState] | None = None) -> None:
        for node in nodes or list(self._nodes.values()):
            for port in (node.port, node.controller_port):
                if not port_is_free(port):
                    raise SetupError(
                        f"{_ADDR_IN_USE}: port 127.0.0.1:{port} of kafka node {node.node_id} "
                        f"({self.name!r}) "
                        f"is in use by another process (`ss -ltnp 'sport = :{port}'` shows "
                        "which). Stop it, pick another base port, or start the cluster fresh "
                        f"(`lowmark kafka down --name {self.name} --wipe`)."
                    )

    # ---- processes

    def _command(self, node: NodeState, java: str, libs: Path) -> list[str]:
        cmd = [java, f"-Xms{self.heap}", f"-Xmx{self.heap}", *_BROKER_JVM_FLAGS,
               *self._cds_flags(node.node_id, java, libs),
               f"-Dlog4j2.configurationFile={Path(node.dir) / 'log4j2.properties'}",
               f"-Dkafka.logs.dir={node.dir}",
               "-cp", f"{libs}/*", "kafka.Kafka", str(node.props)]
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only ask for it
        # from the main thread; a broker restarted from a worker thread must outlive it.
        if (self.die_with_parent and threading.current_thread() is threading.main_thread()
                and shutil.which("setpriv")):
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        return cmd

    def _launch(self, node_id: int, java: str, libs: Path) -> None:
        node = self._nodes[node_id]
        cmd = self._command(node, java, libs)
        self._log_offsets[node_id] = _size(node.server_log)
        with open(node.stdout_log, "ab") as out:
            out.write(f"\n==== {time.strftime('%F %T')} {shlex.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=node.dir)
        node.pid = proc.pid
        self._procs[node_id] = proc
        log.info("kafka node started", extra={"cluster": self.name, "node": node_id,
                                             "pid": proc.pid, "port": node.port})

    def _cds_flags(self, node_id: int, java: str, libs: Path) -> list[str]:
        """Class-data sharing: a JVM that maps an archive of Kafka's loaded classes starts
        with ~40% less CPU, which is most of a 3-node start-up on 2 cores.

        The first node started without an archive writes one when it exits cleanly; the
        JVM ignores an archive that does not match (other java, other jars).
        """
        archive = _cds_archive(java, libs)
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}"]
        if self._cds_dump is None or self._cds_dump[0] == node_id:
            dump = f"{archive}.{os.getpid()}-{self.name}-{node_id}.tmp"
            self._cds_dump = (node_id, dump)
            return [f"-XX:ArchiveClassesAtExit={dump}"]
        return []

    def _finish_cds_dump(self, node_id: int, keep: bool) -> None:
        if self._cds_dump is None or self._cds_dump[0] != node_id:
            return
        dump = Path(self._cds_dump[1])
        self._cds_dump = None
        # A JVM killed while dumping leaves a torn file: keep only a dump of a clean exit.
        if keep and _size(dump) > 0:
            os.replace(dump, dump.parent / (dump.name.split(".jsa.", 1)[0] + ".jsa"))
        else:
            dump.unlink(missing_ok=True)

    def _alive(self, node: NodeState) -> bool:
        # Our own child: ask the kernel through its handle. /proc can show a process
        # mid-exec (setpriv becoming java) without its command line for an instant.
        proc = self._procs.get(node.node_id)
        if proc is not None and proc.pid == node.pid:
            return proc.poll() is None
        return node.alive()

    def _signal(self, node: NodeState, sig: signal.Signals) -> None:
        if node.pid and self._alive(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, sig)

    def _wait_exit(self, node: NodeState, timeout_s: float) -> bool:
        proc = self._procs.get(node.node_id)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)  # reaps our child so it is not left a zombie
            if not self._alive(node):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _wait_ready(self, node_ids: set[int], timeout_s: float) -> None:
        """Until every node in ``node_ids`` logged its start, is a registered broker, and
        every running node names the same quorum leader. Nodes outside ``node_ids`` may be
        down (a node restarted while another is still dead)."""
        deadline = time.monotonic() + timeout_s
        admin = None
        while True:
            for node_id in node_ids:
                node = self._nodes[node_id]
                if not self._alive(node):
                    raise self._start_error(node, "exited during start-up")
            if admin is None and all(_accepts(self._nodes[i].port) for i in node_ids):
                admin = _admin(self.bootstrap_servers)
            if (admin is not None and all(self._started(i) for i in node_ids)
                    and self._brokers(admin) >= node_ids
                    and self._quorum_leader() is not None):
                log.info("kafka cluster ready", extra={
                    "cluster": self.name, "bootstrap": self.bootstrap_servers})
                return
            if time.monotonic() >= deadline:
                waiting = [i for i in sorted(node_ids) if not self._started(i)]
                stuck = self._nodes[(waiting or sorted(node_ids))[0]]
                raise self._start_error(stuck, f"did not serve metadata within {timeout_s} s")
            time.sleep(0.2)

    def _started(self, node_id: int) -> bool:
        """Whether the node logged "Kafka Server started" since its launch.

        Metadata alone is not proof for a restarted node: the cluster keeps listing a
        killed broker until its session times out.
        """
        node = self._nodes[node_id]
        offset = self._log_offsets.get(node_id, 0)
        if _size(node.server_log) < offset:  # the log rolled over
            offset = 0
        try:
            with open(node.server_log, "rb") as fh:
                fh.seek(offset)
                return _STARTED in fh.read()
        except OSError:
            return False

    @staticmethod
    def _brokers(admin: object) -> set[int]:
        try:
            md = admin.list_topics(timeout=2)  # type: ignore[attr-defined]
        except Exception:  # not up yet; the deadline decides
            return set()
        return set(md.brokers)

    def _quorum_leader(self) -> int | None:
        """The leader every running node's quorum-state file names, or None while they
        disagree or name none.

        Reading the raft state file costs no JVM; a broker is only listed in metadata once
        the active controller registered it, so for one node this is a formality.
        """
        leaders = set()
        for node in self._nodes.values():
            if not self._alive(node):
                continue
            state = _read(node.data_dir / "__cluster_metadata-0" / "quorum-state")
            try:
                leaders.add(int(json.loads(state or "{}").get("leaderId", -1)))
            except (ValueError, TypeError, AttributeError):
                return None
        return leaders.pop() if len(leaders) == 1 and -1 not in leaders else None

    def _start_error(self, node: NodeState, what: str) -> KafkaStartError:
        java, libs = find_java(), jars_dir(self.version)
        return KafkaStartError(
            f"kafka node {node.node_id} of cluster {self.name!r} {what}. Read its log "
            f"{node.server_log} (stdout: {node.stdout_log}); a bad broker property or a "
            f"port taken by another process are the usual causes.\n"
            f"command: {shlex.join(self._command(node, java, libs))}\n"
            f"--- last lines of {node.server_log}:\n{_tail(node.server_log)}\n"
            f"--- last lines of {node.stdout_log}:\n{_tail(node.stdout_log)}"
        )

    def _save(self) -> None:
        state = {
            "name": self.name,
            "version": self.version,
            "cluster_id": self._cluster_id,
            "bootstrap": self.bootstrap_servers,
            "heap": self.heap,
            "nodes": [asdict(n) for n in self._nodes.values()],
            "cds_dump": self._cds_dump,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)


def _cds_archive(java: str, libs: Path) -> Path:
    key = f"{os.path.realpath(java)}\n{java_version_text(java)}\n{libs}"
    return libs.parent / f"cds-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsa"


def _admin(bootstrap: str) -> object:
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("lowmark.kafka.launcher.librdkafka")
    quiet.setLevel(logging.CRITICAL)  # "connection refused" while a node boots is expected
    return AdminClient({"bootstrap.servers": bootstrap, "logger": quiet,
                        "socket.connection.setup.timeout.ms": 2000})


def _random_cluster_id() -> str:
    # What `kafka-storage random-uuid` prints: a UUID in URL-safe base64, no padding.
    # Kafka rejects ids whose text starts with '-' (they read as command-line flags).
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _render_props(props: Mapping[str, str]) -> str:
    lines = ["# generated by connectors/kafka/launcher.py; edits are lost on a fresh start"]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


def _log4j2_config(server_log: Path) -> str:
    # One rolling file per node, bounded (3 x 50 MB); the request logger is noisy at INFO.
    return f"""\
status = warn
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {server_log}
appender.file.filePattern = {server_log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
"""
