"""Run lowmark pieces as child processes a test can kill -9, and the handle to drive them.

Child side (``python -m tests.service_runner``, cwd: the repository root): the first stdin
line is JSON ``{"service": "watermark" | "applier", "kafka": {...}, "config": {...}}``
(settings on stdin, not argv, so SASL passwords never show in ``ps``). It answers
``READY`` after ``start()``, then runs the service until stdin closes or SIGTERM, and
closes it gracefully. A service that fails prints ``FAILED <ErrorClass> <message>`` and
exits 1. SIGKILL is the point: nothing is cleaned up.

Parent side: ``ChildProcess`` (also used for ``tests.disaster_driver``) starts a module,
sends lines, reads answers with deadlines, and kills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent


class ChildProcess:
    """A ``python -m <module>`` child speaking one line per request on stdin/stdout."""

    def __init__(self, module: str, first_line: dict[str, Any], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in reap()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.pid = self.proc.pid
        self.send(json.dumps(first_line))

    def send(self, line: str) -> bool:
        """Write one line; False when the child is gone (broken pipe)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, ValueError, OSError):
            return False

    def read_line(self, timeout_s: float | None = None) -> str | None:
        """The next answer line; None at EOF (the child died) or after ``timeout_s``.

        Requests and answers alternate, so no second line ever waits in the buffer
        behind the one ``select`` saw.
        """
        assert self.proc.stdout is not None
        if timeout_s is not None:
            # poll, not select: a long campaign's process holds over 1024 fds (an applier
            # keeps every volume's image open), past what select() can watch
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if not sel.select(timeout_s):
                    return None
        raw = self.proc.stdout.readline()
        return raw.decode().rstrip("\n") if raw else None

    def request(self, line: str, timeout_s: float | None = None) -> str | None:
        return self.read_line(timeout_s) if self.send(line) else None

    def expect(self, prefix: str, timeout_s: float) -> str:
        """Wait for a line starting with ``prefix``; AssertionError with the child's log."""
        line = self.read_line(timeout_s)
        if line is None or not line.startswith(prefix):
            raise AssertionError(
                f"child {self.pid} answered {line!r}, wanted {prefix!r} within {timeout_s} s; "
                f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
            )
        return line

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.reap()

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Graceful stop: close stdin, SIGTERM after a moment, SIGKILL at the deadline."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout_s / 2)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s / 2)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self.reap()
        return self.proc.returncode

    def reap(self) -> None:
        self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._log.close()

    def log_tail(self, nbytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-nbytes:].decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"


# ---------------------------------------------------------------- child side


def _build(spec: dict[str, Any]) -> Any:
    kafka, config = spec["kafka"], dict(spec["config"])
    if spec["service"] == "watermark":
        from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig

        return WatermarkService(WatermarkServiceConfig(**config), kafka)
    if spec["service"] == "applier":
        from pipeline.backup.applier import Applier, ApplierConfig

        config["data_dir"] = Path(config["data_dir"])
        return Applier(ApplierConfig(**config), kafka)
    raise ValueError(f"unknown service {spec['service']!r}")


def main() -> None:
    from pipeline.logs import setup_logging

    first = sys.stdin.readline()
    if not first:
        os._exit(3)
    setup_logging("warning")
    service = _build(json.loads(first))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_stdin() -> None:
        # the parent closing stdin (or dying) stops the service
        while sys.stdin.readline():
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    service.start()
    print("READY", flush=True)
    try:
        service.run(stop)
    except Exception as exc:
        print(f"FAILED {type(exc).__name__} {str(exc)!r}", flush=True)
        sys.stderr.write(f"service failed: {exc!r}\n")
        os._exit(1)
    service.close()
    sys.stderr.write(f"service stopped gracefully at {time.strftime('%T')}\n")


if __name__ == "__main__":
    main()
