"""The embedded Kafka launcher and `lowmark kafka`.

Tries to break: messages lost or altered between confluent-kafka, the broker and kcat;
transactions on a 1-node cluster (aborted data visible, commit not); the cluster record
pointing at dead or foreign processes; brokers left running after stop/down; a resumed
cluster losing its data or port; and every bad setup (no java, old java, no mvn, an
unwritable cache, an interrupted fetch, a taken port, a crashing or slow broker) ending in
anything but a SetupError that names the fix.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Producer

import connectors.embedded_kafka
from connectors.embedded_kafka.cluster import KafkaCluster
from connectors.embedded_kafka.jars import (
    PACKAGED_POM,
    POM_ENV,
    ensure_jars,
    jars_dir,
    kafka_pom,
    kafka_version,
)
from connectors.embedded_kafka.java import check_java, find_java, parse_java_major
from connectors.embedded_kafka.procs import free_port, pid_alive
from connectors.embedded_kafka.state import find_bootstrap
from pipeline.errors import KafkaStartError, SetupError
from tests.kafka_helpers import (
    ExternalKafka,
    consume_all,
    create_topic,
    produce_many,
    require_tool,
    unique,
)

REAL_JAVA = find_java()


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of executables: name -> shell script body, or '->path' for a symlink."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        target = bindir / name
        if body.startswith("->"):
            target.symlink_to(body[2:])
        else:
            target.write_text("#!/bin/sh\n" + body + "\n")
            target.chmod(0o755)
    return bindir


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# --------------------------------------------------------------------- bad setups (no JVM)


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"\nJava(TM) SE Runtime Environment', 8),
        ('openjdk version "11.0.22" 2024-01-16', 11),
    ],
)
def test_java_version_parsing(output: str, major: int) -> None:
    assert parse_java_major(output) == major


def test_missing_java_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_bin(tmp_path)))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(SetupError, match="java is not installed") as info:
        KafkaCluster("nojava", base_dir=tmp_path / "c").start()
    assert "apt-get install" in str(info.value)


def test_old_java_is_rejected(tmp_path, monkeypatch):
    bindir = _fake_bin(tmp_path, java="echo 'openjdk version \"11.0.22\" 2024-01-16' >&2")
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(SetupError, match=r"Java 11; Kafka 4 needs Java >= 17"):
        check_java()


def test_missing_mvn_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(_fake_bin(tmp_path, java="->" + REAL_JAVA)))
    with pytest.raises(SetupError) as info:
        ensure_jars()
    assert "apt-get install maven" in str(info.value) and "make deps" in str(info.value)
    assert not list((tmp_path / "cache").rglob("libs.complete"))


def test_unwritable_cache_names_the_variable(tmp_path, monkeypatch):
    # Tests run as root, for whom permission bits do not stop a write: a cache whose
    # parent is a regular file cannot be created by anyone.
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("LOWMARK_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(SetupError, match="LOWMARK_CACHE"):
        ensure_jars()


def test_interrupted_fetch_is_redone_and_a_complete_one_reused(tmp_path, monkeypatch):
    version = kafka_version()
    calls = tmp_path / "calls"
    # A fake mvn that fails the first time after writing part of the jars.
    mvn = f"""
echo run >> {calls}
out=$(printf '%s\\n' "$@" | sed -n 's/^-DoutputDirectory=//p')
mkdir -p "$out"; touch "$out/half-written.jar"
[ "$(wc -l < {calls})" -gt 1 ] || exit 1
touch "$out/kafka_2.13-{version}.jar"
"""
    monkeypatch.setenv("PATH", str(_fake_bin(tmp_path, mvn=mvn)) + os.pathsep + "/usr/bin:/bin")
    monkeypatch.setenv("LOWMARK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SetupError, match="mvn failed to fetch"):
        ensure_jars()
    assert not (tmp_path / "cache" / "kafka" / version / "libs").exists()
    libs = ensure_jars()
    assert (libs / f"kafka_2.13-{version}.jar").is_file()
    assert ensure_jars() == libs
    assert calls.read_text().count("run") == 2, "a complete fetch must be reused, not redone"


ROOT = Path(__file__).resolve().parents[3]


def _pom(tmp_path: Path, version: str) -> Path:
    """A copy of the packaged pom pinning ``version``."""
    text = PACKAGED_POM.read_text().replace(
        f"<kafka.version>{kafka_version(PACKAGED_POM)}</kafka.version>",
        f"<kafka.version>{version}</kafka.version>")
    path = tmp_path / f"pom-{version}.xml"
    path.write_text(text)
    return path


def test_the_packaged_pom_is_the_one_deploy_and_ci_read(monkeypatch):
    monkeypatch.delenv(POM_ENV, raising=False)
    assert kafka_pom() == PACKAGED_POM
    assert PACKAGED_POM.parent == Path(connectors.embedded_kafka.__file__).resolve().parent
    # one copy of the file: deploy/kafka/pom.xml (what .ci/run prints) links to it
    assert (ROOT / "deploy" / "kafka" / "pom.xml").resolve() == PACKAGED_POM
    ci = subprocess.run(
        ["sed", "-n", r"s:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p",
         "deploy/kafka/pom.xml"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert ci.stdout.strip() == kafka_version()


def test_another_pom_by_argument_or_environment(tmp_path, monkeypatch):
    other = _pom(tmp_path, "9.8.7")
    monkeypatch.delenv(POM_ENV, raising=False)
    assert kafka_version(other) == "9.8.7"
    assert KafkaCluster("otherpom", base_dir=tmp_path / "c", pom=other).version == "9.8.7"
    monkeypatch.setenv(POM_ENV, str(other))
    assert kafka_pom() == other and kafka_version() == "9.8.7"
    assert KafkaCluster("envpom", base_dir=tmp_path / "d").version == "9.8.7"
    assert jars_dir().parent.name == "9.8.7"
    monkeypatch.setenv(POM_ENV, str(tmp_path / "missing.xml"))
    with pytest.raises(SetupError, match=f"cannot read the Kafka pom .*{POM_ENV}"):
        kafka_version()


def test_cli_fetch_uses_the_pom_option(tmp_path):
    other = _pom(tmp_path, "9.8.6")
    mvn = """
out=$(printf '%s\\n' "$@" | sed -n 's/^-DoutputDirectory=//p')
mkdir -p "$out"; touch "$out/kafka_2.13-9.8.6.jar"
"""
    env = {**os.environ, "LOWMARK_CACHE": str(tmp_path / "cache"),
           "PATH": str(_fake_bin(tmp_path, mvn=mvn)) + os.pathsep + "/usr/bin:/bin"}
    env.pop(POM_ENV, None)
    out = subprocess.run(
        [sys.executable, "-m", "connectors.embedded_kafka.cli", "--pom", str(other), "fetch"],
        env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"kafka 9.8.6 jars: {tmp_path / 'cache' / 'kafka' / '9.8.6' / 'libs'}" in out
    assert f"pom: {other}" in out


def test_port_in_use_is_named(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cluster = KafkaCluster("busyport", base_dir=tmp_path / "c", base_port=port)
        with pytest.raises(SetupError, match=f"127.0.0.1:{port}.*in use"):
            cluster.start()
    assert not cluster.is_running()


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    # A CI run once started two services on one port: bind(0) had handed it out twice, or
    # a client's outgoing connection took it first.  Both come from the ephemeral range.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    clients = []
    try:
        for _ in range(50):  # outgoing connections take ephemeral ports while we choose
            listener = socket.create_server(("127.0.0.1", 0))
            clients += [listener, socket.create_connection(listener.getsockname())]
        ports = [free_port() for _ in range(200)]
    finally:
        for s in clients:
            s.close()
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)
    for p in ports[:20]:
        with socket.create_server(("127.0.0.1", p)):
            pass


def test_find_bootstrap_ignores_dead_and_foreign_pids(tmp_path):
    assert find_bootstrap("nothing-here", home=tmp_path) is None
    base = tmp_path / "kafka" / "ghost"
    base.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (os.getpid(), dead.pid):  # alive but not a broker; gone
        node = {"node_id": 1, "port": 1, "controller_port": 2, "dir": str(base / "node1"),
                "pid": pid}
        (base / "cluster.json").write_text(json.dumps(
            {"name": "ghost", "bootstrap": "127.0.0.1:1", "nodes": [node]}))
        assert find_bootstrap("ghost", home=tmp_path) is None


# --------------------------------------------------------------------- the session broker


def test_ten_thousand_messages_through_confluent_kafka_and_kcat(kafka, topic):
    kcat = require_tool("kcat")
    create_topic(kafka.bootstrap_servers, topic, partitions=3)
    sent = {f"k{i}": f"v{i}-{'x' * (i % 97)}" for i in range(10_000)}
    acked = produce_many(kafka.bootstrap_servers, topic, sent.items())
    assert len(acked) == 10_000
    got = consume_all(kafka.bootstrap_servers, topic, n=10_000, timeout=60)
    assert {r.key.decode(): r.value.decode() for r in got} == sent
    assert len(got) == 10_000
    for p in {r.partition for r in got}:  # offsets in a partition are dense, no duplicates
        offsets = sorted(r.offset for r in got if r.partition == p)
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    out = subprocess.run(
        [kcat, "-C", "-e", "-q", "-b", kafka.bootstrap_servers, "-t", topic, "-f", "%k %s\\n"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 10_000
    assert dict(line.split(" ", 1) for line in lines) == sent


def test_transactions_work_on_the_single_node_cluster(kafka, topic):
    create_topic(kafka.bootstrap_servers, topic, partitions=2)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers,
                         "transactional.id": unique("txn")})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, key=f"c{i}", value=b"committed")
    producer.commit_transaction(30)
    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, key=f"a{i}", value=b"aborted")
    producer.flush(30)  # put the aborted records on the broker; unsent ones are just purged
    producer.abort_transaction(30)
    committed = consume_all(kafka.bootstrap_servers, topic)
    assert sorted(r.key for r in committed) == sorted(f"c{i}".encode() for i in range(10))
    everything = consume_all(kafka.bootstrap_servers, topic, isolation="read_uncommitted")
    assert sum(r.value == b"aborted" for r in everything) == 5


def test_cluster_record_names_the_live_brokers(kafka):
    if isinstance(kafka, ExternalKafka):
        pytest.skip(f"the cluster is {kafka.what}: nothing of ours is recorded")
    state = json.loads(kafka.state_file.read_text())
    assert state["bootstrap"] == kafka.bootstrap_servers
    assert state["version"] == kafka_version()
    assert {n["node_id"]: n["pid"] for n in state["nodes"]} == kafka.node_pids
    assert all(pid_alive(pid) for pid in kafka.node_pids.values())
    home = kafka.base_dir.parent.parent  # base_dir is <home>/kafka/<name>
    assert find_bootstrap(kafka.name, home=home) == kafka.bootstrap_servers


# --------------------------------------------------------------------- clusters of their own


def test_broker_crash_reports_its_log_and_command(tmp_path):
    # Formats fine (the value is not checked until start-up), then the broker dies.
    cluster = KafkaCluster("crash", base_dir=tmp_path / "c", heap="256m", die_with_parent=True,
                           extra_broker_props={"kafka.metrics.reporters": "org.example.Missing"})
    with pytest.raises(KafkaStartError) as info:
        cluster.start(timeout_s=60)
    text = str(info.value)
    assert "exited during start-up" in text
    assert "ClassNotFoundException: org.example.Missing" in text
    assert "command: " in text and "kafka.Kafka" in text
    assert len(text.splitlines()) < 120, "the log tail is bounded"
    assert _processes_mentioning(str(tmp_path / "c")) == []


def test_invalid_property_fails_at_format_with_kafkas_message(tmp_path):
    cluster = KafkaCluster("badid", base_dir=tmp_path / "c", extra_broker_props={"node.id": "-5"})
    with pytest.raises(KafkaStartError, match=r"Invalid value -5 for configuration node\.id"):
        cluster.start()


def test_slow_start_times_out_and_leaves_nothing_running(tmp_path):
    cluster = KafkaCluster("slow", base_dir=tmp_path / "c", heap="256m", die_with_parent=True)
    with pytest.raises(KafkaStartError, match=r"did not serve metadata within 0\.3 s") as info:
        cluster.start(timeout_s=0.3)
    assert "command: " in str(info.value)
    assert not cluster.is_running()
    assert _processes_mentioning(str(tmp_path / "c")) == []


def test_cli_up_status_down_resume_wipe(tmp_path):
    env = {**os.environ, "LOWMARK_HOME": str(tmp_path / "home")}
    name = unique("cli")

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "connectors.embedded_kafka.cli", *args],
                              env=env, capture_output=True, text=True, timeout=120,
                              check=check)

    base = tmp_path / "home" / "kafka" / name
    try:
        up = cli("up", "--name", name)
        status = json.loads(cli("status", "--name", name, "--json").stdout)
        assert status["running"] and status["bootstrap"] in up.stdout
        assert "kcat -b " in up.stdout
        bootstrap = status["bootstrap"]
        pids = [n["pid"] for n in status["nodes"]]
        assert "already up" in cli("up", "--name", name).stdout
        assert cli("up", "--name", name, "--nodes", "3", check=False).returncode == 2
        create_topic(bootstrap, "kept")
        produce_many(bootstrap, "kept", [(b"k", b"survives a down/up")])

        cli("down", "--name", name)
        assert not any(pid_alive(p) for p in pids)
        assert _processes_mentioning(str(base)) == []
        assert cli("status", "--name", name, check=False).returncode == 1

        up = cli("up", "--name", name)
        assert bootstrap in up.stdout, "a resumed cluster keeps its ports"
        assert [r.value for r in consume_all(bootstrap, "kept", timeout=30)] == [
            b"survives a down/up"]
        cli("down", "--name", name, "--wipe")
        assert not base.exists()
    finally:
        cli("down", "--name", name, check=False)
    assert _processes_mentioning(str(base)) == []
