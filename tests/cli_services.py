"""`lowmark` services run as an operator runs them: one child per command, its output in
``<tmp>/<name>.log``, stopped with SIGTERM as systemd would, killed when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


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
