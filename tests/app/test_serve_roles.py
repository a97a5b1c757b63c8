"""`lowmark serve` and the CG's roles, as an operator runs it (the CLI in a subprocess).

Tries to break: an old primary restarted after a failover that serves anyway (its writes
would never be replicated), a primary without serve.site that runs a later generation,
a running primary that keeps serving (or exits 0, as if stopped cleanly) once the roles
moved on, the new primary that does not run its generation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.embedded_kafka.procs import free_port
from connectors.kafka.reading import bounds, iter_range
from connectors.kafka.topics import CgTopics
from pipeline.timesource import wall_us
from pipeline.topology.roles import initial_roles, plan_failover
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.records import Progress, ProgressKind
from tests.prereqs import require_tools
from tests.replication_helpers import wait_until

pytestmark = pytest.mark.kafka


def write_config(tmp: Path, bootstrap: str, cg: str, data_dir: Path, port: int) -> Path:
    path = tmp / f"lowmark-{port}.toml"
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{bootstrap}"

[cg]
name = "{cg}"

[serve]
interceptor_id = "primary-{port}"
data_dir = "{data_dir}"
listen = "127.0.0.1:{port}"
tick_interval_ms = 5
generation_check_s = 0.1
[[serve.volumes]]
name = "v"
size = "1MiB"
"""
    )
    return path


def serve(config: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log is not None else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "serve", "--config", str(config), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "LOWMARK_CONFIG": ""},
    )


def qemu_write(port: int, pattern: int = 0x5A) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 64k", f"nbd://127.0.0.1:{port}/v"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def fail_over_to(kafka_conf: dict[str, str], cg: str, site: str) -> None:
    store = RolesStore(kafka_conf)
    g0 = store.latest(cg)
    if g0 is None:
        g0 = store.commit(cg, None, initial_roles(cg, "main", now_us=wall_us()))
    w = wall_us() << 12
    store.commit(cg, g0.generation, plan_failover(g0, cg, site, w, {}, True, wall_us()))


def test_an_old_primary_restarted_after_a_failover_refuses_to_serve(
    kafka_conf, unique_name, tmp_path
):
    fail_over_to(kafka_conf, unique_name, "dr")
    cfg = write_config(tmp_path, kafka_conf["bootstrap.servers"], unique_name, tmp_path / "p",
                       free_port())  # fmt: skip
    for args, words in (
        (("--site", "main"), "site 'main' is not the primary of CG"),
        ((), "serve.site not set"),
    ):
        proc = serve(cfg, *args)
        out, _ = proc.communicate(timeout=120)
        text = out.decode(errors="replace")
        assert proc.returncode == 2, text
        for w in (words, "generation 1's primary is 'dr'", "never be replicated", "failback"):
            assert w in text, text
    assert bounds(kafka_conf, CgTopics(unique_name).progress) is None, "the refused one joined"


@pytest.mark.tools
def test_a_serving_primary_stops_with_an_error_once_the_roles_move_on(
    kafka_conf, unique_name, tmp_path
):
    require_tools("qemu-io")
    RolesStore(kafka_conf).commit(
        unique_name, None, initial_roles(unique_name, "main", now_us=wall_us())
    )
    bootstrap = kafka_conf["bootstrap.servers"]
    old_port, new_port = free_port(), free_port()
    old_cfg = write_config(tmp_path, bootstrap, unique_name, tmp_path / "old", old_port)
    new_cfg = write_config(tmp_path, bootstrap, unique_name, tmp_path / "new", new_port)
    old = serve(old_cfg, "--site", "main", log=tmp_path / "old.log")
    new = None
    try:
        wait_until(lambda: qemu_write(old_port).returncode == 0, 60, "the old primary serving")
        fail_over_to(kafka_conf, unique_name, "dr")
        old.wait(60)
        text = (tmp_path / "old.log").read_text(errors="replace")
        assert old.returncode == 2, text
        assert "no longer the primary" in text and "generation 1" in text, text
        assert qemu_write(old_port).returncode != 0, "the fenced primary still serves NBD"
        # restarted, it refuses; the new primary runs generation 1
        again = serve(old_cfg, "--site", "main")
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 2 and b"not the primary" in out, out
        new = serve(new_cfg, "--site", "dr", log=tmp_path / "new.log")
        wait_until(lambda: qemu_write(new_port, 0x11).returncode == 0, 60, "the new primary")
        g1 = CgTopics(unique_name, 1).progress
        kinds = [codec.decode(m.value(), Progress).kind for m in iter_range(kafka_conf, g1)]
        assert kinds[0] is ProgressKind.JOIN
        new.send_signal(signal.SIGTERM)
        assert new.wait(30) == 0, (tmp_path / "new.log").read_text(errors="replace")
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
