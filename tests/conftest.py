"""Shared fixtures: a real Kafka cluster per test session, unique names per test.

- ``kafka``: a 1-node KRaft cluster started from deploy/kafka (own name and directory per
  session, brokers die with the session). ``LOWMARK_TEST_BOOTSTRAP=host:port`` uses an
  existing cluster instead; ``LOWMARK_KAFKA=testcontainers`` uses testcontainers' Kafka
  when the package and a Docker engine are there (else the tests skip, saying why; under
  CI or LOWMARK_STRICT=1 they fail).
- ``kafka3``: a 3-node cluster, started only when a test asks for it; every node is
  running again at the start of each test that uses it.
- ``kafka_conf`` / ``kafka3_conf``: a fresh librdkafka dict for the cluster.
- ``unique_name`` / ``topic``: names no other test (or earlier run) uses.

Tests using ``kafka``/``kafka3`` get the ``kafka``/``kafka3`` marker automatically, so
``pytest -m "not kafka"`` runs the pure tests alone. ``torture`` tests run only when
``-m`` names them (`make torture`); otherwise they are deselected, not skipped. The summary
reports how long each cluster took to start.

Under CI or LOWMARK_STRICT=1, outcome_gate.py fails the session on any skip, xfail or xpass
that tests/allowed_skips.txt does not list with its reason.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from connectors.embedded_kafka.cluster import KafkaCluster
from connectors.embedded_kafka.state import cluster_dir
from connectors.kafka.config import KafkaConnection
from connectors.kafka.reading import close_metadata_clients
from tests import torture_summary
from tests.kafka_helpers import ExternalKafka, unique
from tests.outcome_gate import from_config
from tests.prereqs import strict_mode, unavailable

# pytester: tests/test_outcome_gate.py runs the gate plugin on generated test files;
# tests.faults.fixtures: the proxied 3-node cluster of the broker-fault tests
pytest_plugins = ["pytester", "tests.faults.fixtures"]

_STARTUP_S: dict[str, float] = {}

#: the test clusters are mostly one broker: sync volumes run there on purpose (their
#: refusal by default is tested in tests/primary/test_sync_durability.py); inherited by
#: the services the tests start as processes
os.environ.setdefault("LOWMARK_SERVE_ALLOW_SINGLE_COPY_SYNC", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(from_config(strict_mode()), "lowmark-outcome-gate")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # a torture run takes minutes to hours: a plain `pytest` leaves it out by deselecting
    # it (visible in the counts), rather than collecting it and letting it skip itself
    if "torture" not in (config.getoption("-m") or ""):
        torture = [item for item in items if item.get_closest_marker("torture")]
        if torture:
            config.hook.pytest_deselected(items=torture)
            items[:] = [item for item in items if not item.get_closest_marker("torture")]
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"kafka", "kafka_conf", "topic"}:
            item.add_marker(pytest.mark.kafka)
        if names & {"kafka3", "kafka3_conf"}:
            item.add_marker(pytest.mark.kafka3)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what, seconds in _STARTUP_S.items():
        terminalreporter.write_line(f"{what} start-up: {seconds:.1f} s")
    found = torture_summary.rows()
    if found:
        terminalreporter.section("faults injected and what was checked")
        for line in torture_summary.table(found):
            terminalreporter.write_line(line)
        written = torture_summary.write_json(found)
        if written is not None:
            terminalreporter.write_line(f"written to {written}")


def session_cluster(
    tmp_path_factory: pytest.TempPathFactory, nodes: int, name: str = "", **kwargs: Any
) -> Iterator[KafkaCluster]:
    """Start a cluster for the session, yield it, stop it (the fixtures' shared body)."""
    label = f"kafka {nodes}-node cluster" + (f" ({name})" if name else "")
    kind = name or f"kafka{nodes}"
    name = f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    home = tmp_path_factory.mktemp(f"lowmark-home-{kind}")  # a LOWMARK_HOME of its own
    cluster = KafkaCluster(
        name, nodes=nodes, base_dir=cluster_dir(name, home), die_with_parent=True, **kwargs
    )
    started = time.monotonic()
    try:
        cluster.start(timeout_s=120)
    except BaseException:
        cluster.stop(grace_s=5)
        raise
    _STARTUP_S[label] = time.monotonic() - started
    try:
        yield cluster
    finally:
        close_metadata_clients()  # not one reconnecting to a stopped cluster till exit
        cluster.stop(grace_s=10)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster | ExternalKafka]:
    """The session's 1-node cluster (or the external one the environment names)."""
    bootstrap = os.environ.get("LOWMARK_TEST_BOOTSTRAP", "").strip()
    if bootstrap:
        yield ExternalKafka(bootstrap, "LOWMARK_TEST_BOOTSTRAP")
        return
    if os.environ.get("LOWMARK_KAFKA", "").strip() == "testcontainers":
        yield from _testcontainers_kafka()
        return
    yield from session_cluster(tmp_path_factory, 1)


def _testcontainers_kafka() -> Iterator[ExternalKafka]:
    try:
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found]
    except ImportError:
        unavailable("LOWMARK_KAFKA=testcontainers, but testcontainers is not installed "
                    "(pip install -e '.[testcontainers]')")
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env().ping()
    except Exception as exc:  # any failure means: no usable Docker engine
        unavailable(f"LOWMARK_KAFKA=testcontainers, but no Docker engine answers: {exc}")
    container = KafkaContainer()
    if hasattr(container, "with_kraft"):
        container = container.with_kraft()
    with container as running:
        yield ExternalKafka(running.get_bootstrap_server(), "testcontainers")


@pytest.fixture(scope="session")
def _kafka3_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    yield from session_cluster(tmp_path_factory, 3)


@pytest.fixture
def kafka3(_kafka3_cluster: KafkaCluster) -> KafkaCluster:
    """The session's 3-node cluster, with every node running (an earlier test may have
    killed some)."""
    for node_id, pid in _kafka3_cluster.node_pids.items():
        if pid is None:
            _kafka3_cluster.start_node(node_id)
    return _kafka3_cluster


@pytest.fixture
def kafka_conf(kafka: KafkaCluster | ExternalKafka) -> dict[str, str]:
    """librdkafka settings for the session's cluster; a fresh dict per test."""
    return KafkaConnection(kafka.bootstrap_servers, client_id="lowmark-test").librdkafka()


@pytest.fixture
def kafka3_conf(kafka3: KafkaCluster) -> dict[str, str]:
    return KafkaConnection(kafka3.bootstrap_servers, client_id="lowmark-test").librdkafka()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A per-test name, valid as a consistency group and in topic names."""
    return unique(request.node.name)


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A per-test topic name (not created: tests choose partitions and replication)."""
    return unique(f"topic-{request.node.name}")
