"""Run an embedded KRaft cluster of 1 or 3 nodes on loopback: :class:`KafkaCluster`.

Every node is a combined broker+controller with a static controller quorum, so a node
restarted by :meth:`KafkaCluster.start_node` rejoins on the same ports and data. Only the
processes a cluster started (checked by PID *and* command line) are ever signalled. Where
the cluster lives and its record are in ``state.py``, what each JVM runs with in
``node.py``, the jars in ``jars.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from connectors.embedded_kafka.jars import ensure_jars, jars_dir, kafka_pom, kafka_version
from connectors.embedded_kafka.java import check_java, find_java
from connectors.embedded_kafka.node import (
    BROKER_JVM_FLAGS,
    TOOL_JVM_FLAGS,
    broker_props,
    cds_archive,
    log4j2_config,
    random_cluster_id,
    render_props,
)
from connectors.embedded_kafka.procs import (
    accepts,
    file_size,
    free_port,
    last_lines,
    port_is_free,
    read_text,
    tail,
)
from connectors.embedded_kafka.security import ClusterSecurity, redact_args
from connectors.embedded_kafka.state import STATE_FILE, NodeState, cluster_dir, load_state
from pipeline.errors import KafkaStartError, SetupError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ADDR_IN_USE = "Address already in use"
_STARTED = b"Kafka Server started"  # KafkaRaftServer, once the broker is registered


class KafkaCluster:
    """A KRaft cluster of ``nodes`` combined broker+controller JVMs on 127.0.0.1.

    ``base_dir`` is the cluster's own directory (default ``$LOWMARK_HOME/kafka/<name>``).
    ``base_port`` pins ports (node i: ``base_port + 2i`` for clients, ``+1`` for the
    controller); without it free ports are picked at start. ``die_with_parent`` makes the
    brokers die with the process that started them (test sessions); the CLI leaves it off
    so ``lowmark kafka up`` returns with the cluster running. ``pom`` runs another Kafka
    pom than the packaged one (see :func:`~connectors.embedded_kafka.jars.kafka_pom`).
    ``client_listeners`` = {node: (listen port, advertised port)} gives nodes a CLIENT
    listener advertising another port (a fault proxy in front of it, tests/faults):
    ``client_bootstrap_servers`` goes through it, ``bootstrap_servers`` does not.
    ``security`` secures the client listener (TLS, mutual TLS, SASL/SCRAM: ``security.py``).
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
        pom: Path | str | None = None,
        client_listeners: Mapping[int, tuple[int, int]] | None = None,
        security: ClusterSecurity | None = None,
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
        self.pom = kafka_pom(pom)
        self.client_listeners = dict(client_listeners or {})
        self.security = security or ClusterSecurity()
        if self.client_listeners and self.security.mode != "plaintext":
            raise SetupError(
                "a secured cluster with fault-proxy client listeners is not supported yet: "
                "both define the CLIENT listener; use one or the other"
            )
        self.version = kafka_version(self.pom)
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
    def client_bootstrap_servers(self) -> str:
        """Through the CLIENT listeners' advertised ports where there are any."""
        ports = [self.client_listeners.get(i, (0, n.port))[1] for i, n in self._nodes.items()]
        return ",".join(f"127.0.0.1:{p}" for p in ports) if self._nodes else ""

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
        libs = ensure_jars(self.pom)
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
        java, libs = check_java(), ensure_jars(self.pom)
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
        self._cluster_id = random_cluster_id()
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
            node.props.write_text(render_props(
                broker_props(node, voters, self.nodes, {
                    **self.security.broker_props(node.port, node.controller_port),
                    **self.extra_broker_props}, self.client_listeners.get(node.node_id))))
            (Path(node.dir) / "log4j2.properties").write_text(log4j2_config(node.server_log))

    def _pick_ports(self, fresh: bool) -> list[int]:
        if self.base_port and not fresh:
            return [self.base_port + k for k in range(2 * self.nodes)]
        ports: list[int] = []
        while len(ports) < 2 * self.nodes:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return ports

    def _format(self, java: str, libs: Path) -> None:
        """Write meta.properties and the bootstrap metadata into every node's data dir."""
        procs = []
        archive = cds_archive(java, libs)
        cds = [f"-XX:SharedArchiveFile={archive}"] if archive.is_file() else []
        for node in self._nodes.values():
            cmd = [java, *TOOL_JVM_FLAGS, *cds, "-cp", f"{libs}/*",
                   f"-Dlog4j2.configurationFile={Path(node.dir) / 'log4j2.properties'}",
                   "kafka.tools.StorageTool", "format", "--ignore-formatted",
                   "-t", str(self._cluster_id), "-c", str(node.props),
                   *self.security.format_args()]
            procs.append((node, cmd, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))
        for node, cmd, proc in procs:
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise KafkaStartError(
                    f"formatting the storage of kafka node {node.node_id} failed "
                    f"(exit {proc.returncode}); check the broker properties "
                    f"(extra_broker_props: {self.extra_broker_props}).\n"
                    f"command: {shlex.join(redact_args(cmd))}\n"
                    + last_lines(out.decode(errors="replace"))
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
        cmd = [java, f"-Xms{self.heap}", f"-Xmx{self.heap}", *BROKER_JVM_FLAGS,
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
        self._log_offsets[node_id] = file_size(node.server_log)
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
        archive = cds_archive(java, libs)
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
        if keep and file_size(dump) > 0:
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
            if admin is None and all(accepts(self._nodes[i].port) for i in node_ids):
                admin = _admin(self.bootstrap_servers, self.security.client_conf())
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
        if file_size(node.server_log) < offset:  # the log rolled over
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
            state = read_text(node.data_dir / "__cluster_metadata-0" / "quorum-state")
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
            f"--- last lines of {node.server_log}:\n{tail(node.server_log)}\n"
            f"--- last lines of {node.stdout_log}:\n{tail(node.stdout_log)}"
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


def _admin(bootstrap: str, security: Mapping[str, str]) -> object:
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("lowmark.embedded_kafka.librdkafka")
    quiet.setLevel(logging.CRITICAL)  # "connection refused" while a node boots is expected
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "logger": quiet,
        "socket.connection.setup.timeout.ms": 2000,
        **security,
    }
    return AdminClient(conf)

