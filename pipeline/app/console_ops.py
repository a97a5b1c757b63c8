"""The console's long operations: a drill and a failover, run as the CLI runs them.

Each is the ``lowmark`` command itself in a child process (``lowmark drill start``,
``lowmark failover``) with the console's config, so the page starts exactly what an
operator would type, with its checks, its log and its re-run rules; the page shows each
child's state and the tail of its log. Both need the site's disk, so the console that
starts them runs on that site's host (its ``[apply]`` site and data dir).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.errors import ConfigError, LowmarkError


class OperationError(LowmarkError):
    """A console operation could not start; the message says why and what to do."""


@dataclass
class Operation:
    kind: str  # "drill" | "failover"
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    nbd: str = ""

    def state(self) -> dict[str, Any]:
        rc = self.proc.poll()
        try:
            tail = [_said(line) for line in
                    self.log_path.read_text(errors="replace").splitlines()[-3:]]  # fmt: skip
        except OSError:
            tail = []
        return {"kind": self.kind, "name": self.name, "pid": self.proc.pid,
                "running": rc is None, "exit_code": rc, "nbd": self.nbd,
                "for_s": round(time.monotonic() - self.started, 1), "log_tail": tail}  # fmt: skip


def _said(line: str) -> str:
    """A child's JSON log line as what it says (its msg, and an error if any)."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    if not isinstance(doc, dict) or "msg" not in doc:
        return line
    return str(doc["msg"]) + (f": {doc['error']}" if doc.get("error") else "")


class Operations:
    def __init__(self, config_path: Path | None, work_dir: Path) -> None:
        self.config_path = config_path
        self.work_dir = work_dir
        self.ops: dict[tuple[str, str], Operation] = {}

    def _argv(self, *args: str) -> list[str]:
        cfg = ("--config", str(self.config_path)) if self.config_path else ()
        return [sys.executable, "-m", "pipeline.app.cli", "--log-format", "json", *args, *cfg]

    def _spawn(self, kind: str, name: str, argv: list[str]) -> Operation:
        running = self.ops.get((kind, name))
        if running is not None and running.proc.poll() is None:
            raise OperationError(f"{kind} {name!r} runs already (pid {running.proc.pid})")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / f"{kind}-{name}.log"
        log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - the child's, for its life
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        log.close()
        op = Operation(kind, name, proc, log_path, time.monotonic())
        self.ops[(kind, name)] = op
        return op

    def drill(self, name: str, wait_s: float = 120.0) -> Operation:
        """``lowmark drill start`` into ``<work>/drills/<name>``, served on a unix socket;
        returns once it serves (or raises with its log's last line)."""
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"drill name {name!r}: use letters, digits, - and _")
        to = self.work_dir / "drills" / name
        sock = self.work_dir / "drills" / f"{name}.sock"
        sock.unlink(missing_ok=True)
        op = self._spawn("drill", name, self._argv("drill", "start", "--to", str(to),
                                                   "--unix", str(sock)))  # fmt: skip
        deadline = time.monotonic() + wait_s
        while not sock.exists():
            if op.proc.poll() is not None or time.monotonic() > deadline:
                last = (op.state()["log_tail"] or ["(no output)"])[-1]
                self.stop("drill", name)
                raise OperationError(f"the drill did not start serving: {last}")
            time.sleep(0.1)
        op.nbd = f"nbd+unix:///?socket={sock}"
        return op

    def failover(self, site: str) -> Operation:
        """``lowmark failover --site SITE``: started, not waited for (it serves until
        stopped); the page follows it."""
        return self._spawn("failover", site, self._argv("failover", "--site", site))

    def stop(self, kind: str, name: str, timeout_s: float = 60.0) -> int | None:
        op = self.ops.get((kind, name))
        if op is None:
            raise OperationError(f"no {kind} {name!r} was started from this console")
        if op.proc.poll() is None:
            op.proc.send_signal(signal.SIGTERM)
            try:
                op.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                op.proc.kill()
                op.proc.wait()
        return op.proc.returncode

    def states(self) -> list[dict[str, Any]]:
        return [op.state() for op in self.ops.values()]

    def close(self) -> None:
        """Drills end with the console (a clone nobody watches); a failover runs on."""
        for (kind, name), op in list(self.ops.items()):
            if kind == "drill" and op.proc.poll() is None:
                self.stop(kind, name)


__all__ = ["Operation", "OperationError", "Operations"]
