"""The pieces of tests/system/test_security.py: a secured 1-node cluster, lowmark's
commands run as an operator runs them against it, and the secrets nothing may print.

A :class:`Scene` writes one ``lowmark.toml`` (CG, the three services) and hands the
connection's security settings over either in its ``[kafka]`` table or as
``LOWMARK_KAFKA_*`` variables, the two ways an operator can; every command runs as
``python -m pipeline.app.cli`` with the settings that way.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from connectors.embedded_kafka.cluster import KafkaCluster
from connectors.embedded_kafka.procs import free_port
from connectors.embedded_kafka.security import Certs, ClusterSecurity
from connectors.embedded_kafka.state import cluster_dir
from tests.cli_services import CliServices, cg_config

#: the SCRAM password of lowmark's user: long and odd enough that a hit is a leak
PASSWORD = "Pw-" + uuid.uuid4().hex
#: librdkafka setting -> [kafka] table key (LOWMARK_KAFKA_ + upper case of it)
TABLE = {
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.username": "sasl_username",
    "sasl.password": "sasl_password",
    "ssl.ca.location": "ssl_ca_location",
    "ssl.certificate.location": "ssl_certificate_location",
    "ssl.key.location": "ssl_key_location",
    "ssl.endpoint.identification.algorithm": "ssl_endpoint_identification_algorithm",
}


@contextmanager
def start_cluster(base: Path, security: ClusterSecurity) -> Iterator[KafkaCluster]:
    """A 1-node cluster secured by ``security``, stopped when the generator is closed."""
    name = f"sec-{security.mode}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cluster = KafkaCluster(name, nodes=1, base_dir=cluster_dir(name, base), die_with_parent=True,
                           security=security)  # fmt: skip
    try:
        cluster.start(timeout_s=120)
        yield cluster
    finally:
        cluster.stop(grace_s=5)


def secrets_of(security: ClusterSecurity, certs: Certs) -> list[str]:
    """What no log line, message or /metrics page may hold: passwords and key material."""
    found = [PASSWORD, security.broker_password]
    for key in certs.dir.glob("*.key"):
        found += [ln for ln in key.read_text().splitlines() if ln and not ln.startswith("-----")]
    return found


def leaks(text: str, secrets: list[str]) -> list[str]:
    """The secrets (shortened) that ``text`` holds, and a PEM private key if it holds one."""
    hits = [s[:6] + "..." for s in secrets if s in text]
    return hits + (["a PEM private key"] if "PRIVATE KEY-----" in text else [])


def metrics_page(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def log_end_offsets(conf: Mapping[str, str]) -> dict[str, int]:
    """Every non-internal topic's records (sum of its partitions' high watermarks)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**conf, "group.id": f"sec-count-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})  # fmt: skip
    try:
        out: dict[str, int] = {}
        for topic, meta in c.list_topics(timeout=30).topics.items():
            if topic.startswith("__"):
                continue
            out[topic] = sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                             for p in meta.partitions)  # fmt: skip
        return out
    finally:
        c.close()


@dataclass
class Done:
    """A finished command: its exit code, output and wall time."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def ok(self) -> Done:
        assert self.returncode == 0, f"lowmark {' '.join(self.args)} exited {self.returncode}:\n" \
            f"{self.stderr[-3000:]}\n{self.stdout[-1000:]}"  # fmt: skip
        return self


class Scene(CliServices):
    """lowmark's config for one CG on a secured cluster, and its commands run for real."""

    def __init__(self, tmp: Path, bootstrap: str, cg: str, kafka: Mapping[str, str],
                 via: str) -> None:  # fmt: skip
        assert via in ("file", "env")
        self.cg, self.via = cg, via
        tmp.mkdir(parents=True, exist_ok=True)
        self.nbd_port = free_port()
        self.ports = {name: free_port() for name in ("serve", "watermark", "apply")}
        self.config = tmp / "lowmark.toml"
        table = {TABLE[k]: v for k, v in kafka.items()}
        super().__init__(tmp)
        for key in TABLE.values():
            self.env.pop(f"LOWMARK_KAFKA_{key.upper()}", None)
        if via == "env":
            self.env.update({f"LOWMARK_KAFKA_{k.upper()}": v for k, v in table.items()})
        lines = "".join(f'{k} = "{v}"\n' for k, v in table.items()) if via == "file" else ""
        self.config.write_text(cg_config(tmp, bootstrap, cg, self.ports, self.nbd_port,
                                         kafka_lines=lines))  # fmt: skip

    def run(self, *args: str, timeout_s: float = 120, config: bool = True) -> Done:
        cmd = self.argv(*args, *(("--config", str(self.config)) if config else ()))
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=self.env)
        return Done(args, done.returncode, done.stdout, done.stderr, time.monotonic() - t0)

    def metrics(self, name: str) -> str:
        return metrics_page(f"127.0.0.1:{self.ports[name]}")


def qemu_write(uri: str, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "raw", *args, uri], check=True, capture_output=True,
                   timeout=60)  # fmt: skip


def settings(security: ClusterSecurity, **override: str | None) -> dict[str, str]:
    """The client settings lowmark is given: the cluster's good ones, then ``override``
    (librdkafka names with ``_`` for ``.``; None drops a setting)."""
    conf = security.client_conf()
    for key, value in override.items():
        dotted = key.replace("_", ".")
        if value is None:
            conf.pop(dotted, None)
        else:
            conf[dotted] = value
    return conf


def run_parallel(jobs: Mapping[str, tuple[Scene, tuple[str, ...]]], timeout_s: float = 120,
                 at_once: int = 4) -> dict[str, Done]:  # fmt: skip
    """Each (scene, args) command as its own process, ``at_once`` at a time (the machine is
    shared); each Done's seconds run from its own start to its exit."""
    out: dict[str, Done] = {}
    pending = list(jobs.items())
    while pending:
        batch, pending = pending[:at_once], pending[at_once:]
        running = []
        for key, (scene, args) in batch:
            argv = scene.argv(*args, "--config", str(scene.config))
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=scene.env)  # fmt: skip
            running.append((key, args, proc, time.monotonic()))
        for key, args, proc, t0 in running:
            try:
                stdout, stderr = proc.communicate(
                    timeout=max(1.0, timeout_s - (time.monotonic() - t0))
                )
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                stderr += f"\n(killed: still running after {timeout_s} s)"
            out[key] = Done(args, proc.returncode, stdout, stderr, time.monotonic() - t0)
    return out
