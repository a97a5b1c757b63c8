"""`lowmark` services run as an operator runs them: one child per command, its output in
``<tmp>/<name>.log``, stopped with SIGTERM as systemd would, killed when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any


class CliServices:
    """The children of one test; a subclass writes ``self.config`` (the TOML they read)."""

    config: Path

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.env = env if env is not None else {**os.environ, "LOWMARK_CONFIG": ""}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.app.cli", "--log-format", "json", *args]

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``lowmark <args or name> --config <config>``, logged to ``<name>.log``."""
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(self.argv(*(args or (name,)), "--config", str(self.config)),
                                stdout=log, stderr=subprocess.STDOUT, env=self.env)  # fmt: skip
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> int:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise AssertionError(f"{name} did not stop within 30 s of SIGTERM") from None
        return p.returncode

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


def cg_config(tmp: Path, bootstrap: str, cg: str, ports: dict[str, int], nbd_port: int, *,
              volumes: tuple[tuple[str, str, str], ...] = (("vol1", "16MiB", "async"),),
              kafka_lines: str = "", liveness_timeout_s: float = 30) -> str:  # fmt: skip
    """The TOML of one CG on this host: a primary ``primary-a`` serving ``volumes`` (name,
    size, mode) over NBD, its watermark service and one backup site ``dr1``, each with
    /metrics on its port of ``ports``."""
    vols = "".join(f'[[serve.volumes]]\nname = "{n}"\nsize = "{s}"\nmode = "{m}"\n'
                   for n, s, m in volumes)  # fmt: skip
    return f"""
[kafka]
bootstrap_servers = "{bootstrap}"
{kafka_lines}
[cg]
name = "{cg}"

[serve]
interceptor_id = "primary-a"
data_dir = "{tmp / "primary"}"
listen = "127.0.0.1:{nbd_port}"
metrics = "127.0.0.1:{ports["serve"]}"
tick_interval_ms = 5
{vols}
[watermark]
liveness_timeout_s = {liveness_timeout_s}
metrics = "127.0.0.1:{ports["watermark"]}"

[apply]
site = "dr1"
data_dir = "{tmp / "backup"}"
checkpoint_interval_s = 0.5
metrics = "127.0.0.1:{ports["apply"]}"
"""


class CgServices(CliServices):
    """``lowmark serve | watermark | apply`` of one CG (``cg_config``), as an operator runs
    them, with their /metrics at hand."""

    JOBS = {"serve": "lowmark-serve", "watermark": "lowmark-watermark", "apply": "lowmark-apply"}

    def __init__(self, tmp: Path, bootstrap: str, cg: str, **config: Any) -> None:
        from connectors.embedded_kafka.procs import free_port

        super().__init__(tmp)
        self.bootstrap, self.cg = bootstrap, cg
        self.nbd_port = free_port()
        self.ports = {name: free_port() for name in self.JOBS}
        self.config = tmp / "lowmark.toml"
        self.config.write_text(cg_config(tmp, bootstrap, cg, self.ports, self.nbd_port,
                                         **config))  # fmt: skip

    def numbers(self, name: str) -> dict[str, float]:
        """One scrape of ``name``'s /metrics ({}: it did not answer)."""
        from pipeline.ops.status import scrape

        return scrape(f"127.0.0.1:{self.ports[name]}")

    def texts(self) -> dict[tuple[str, str], str | None]:
        """One scrape of every service, as Prometheus makes it (None: the scrape failed)."""
        out: dict[tuple[str, str], str | None] = {}
        for name, job in self.JOBS.items():
            target = (job, f"127.0.0.1:{self.ports[name]}")
            try:
                with urllib.request.urlopen(f"http://{target[1]}/metrics", timeout=1) as r:
                    out[target] = r.read().decode()
            except OSError:
                out[target] = None
        return out

    def start_all(self) -> None:
        """The three services, waited for until the primary and the site answer."""
        from tests.replication_helpers import wait_until

        for name in self.JOBS:
            self.start(name)
        for name, up in (("serve", "lowmark_primary_up"), ("apply", "lowmark_applier_up")):
            wait_until(lambda n=name, m=up: self.numbers(n).get(m) == 1.0, 60, f"{name} up")

    def write(self, pattern: int, volume: str = "vol1") -> None:
        """256 KiB of ``pattern`` at offset 0, by qemu-io over NBD."""
        uri = f"nbd://127.0.0.1:{self.nbd_port}/{volume}"
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 256k", uri],
                       check=True, capture_output=True, timeout=60)  # fmt: skip

    def dump_logs(self, tail: int = 3000) -> None:
        for name in self.procs:
            print(f"----- {name} log -----\n{self.log(name)[-tail:]}")
