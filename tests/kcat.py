"""Run ``kcat`` against a secured cluster: :func:`kcat_consume`.

Debian's kcat links the system librdkafka (2.0.2), whose SCRAM fails against Kafka 4.x
brokers; the librdkafka the confluent-kafka wheel bundles (2.6+) does not. So kcat runs
with ``LD_LIBRARY_PATH`` at a directory holding that library under the soname kcat asks
for. Settings go in a ``-F`` file, not argv: a SASL password on the command line shows in
``ps``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import confluent_kafka

from tests.prereqs import require_tools


def bundled_librdkafka() -> Path:
    """The wheel's librdkafka (``confluent_kafka.libs/librdkafka-<hash>.so.1``)."""
    libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*"))
    if not found:
        raise AssertionError(
            f"no bundled librdkafka in {libs}: is confluent-kafka a manylinux wheel? "
            "(pip install --force-reinstall confluent-kafka)"
        )
    return found[0]


def kcat_env(work: Path) -> dict[str, str]:
    """The environment that makes kcat load the bundled librdkafka (a symlink in ``work``)."""
    lib_dir = work / "kcat-lib"
    lib_dir.mkdir(parents=True, exist_ok=True)
    link = lib_dir / "librdkafka.so.1"
    if not link.exists():
        link.symlink_to(bundled_librdkafka())
    return {**os.environ, "LD_LIBRARY_PATH": str(lib_dir)}


def kcat_consume(
    conf: Mapping[str, str], topic: str, work: Path, timeout_s: float = 60.0
) -> list[str]:
    """Every committed record of ``topic`` from the start to its end, as ``partition:offset``
    lines; ``conf`` is librdkafka's settings (bootstrap.servers and security)."""
    require_tools("kcat")
    props = work / "kcat.conf"
    props.write_text("".join(f"{k}={v}\n" for k, v in conf.items() if k != "bootstrap.servers"))
    props.chmod(0o600)
    done = subprocess.run(
        ["kcat", "-F", str(props), "-b", conf["bootstrap.servers"], "-C", "-t", topic,
         "-o", "beginning", "-e", "-q", "-X", "isolation.level=read_committed",
         "-f", "%p:%o\\n"],
        capture_output=True, text=True, timeout=timeout_s, env=kcat_env(work),
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"kcat exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout.split()
