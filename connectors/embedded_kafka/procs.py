"""Operating-system helpers of the launcher: process liveness, loopback ports, log tails.

A process counts as ours only when its PID *and* its command line match (:func:`pid_alive`
with a marker), so a recycled PID is never signalled.
"""

from __future__ import annotations

import os
import random
import re
import socket
from pathlib import Path

LOG_TAIL_LINES = 40
_FRAME = re.compile(r"^\s+(at |\.\.\. \d+ more)")


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if given, has ``marker`` in its command line.

    The marker (a node's properties path) guards against a recycled PID: we never signal a
    process we did not start.
    """
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return marker is None or marker in cmdline.split("\0")


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORT_SPAN = 10000
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port for a service we are about to start, distinct within this process.

    The port lies *below* the kernel's ephemeral range. A port from ``bind(0)`` comes from
    that range, so any outgoing connection (a Kafka client's, say) could take it between our
    choosing it and the service binding it — and two calls could hand out the same one.
    """
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(max(1024, low - _PORT_SPAN), low)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed_out.add(port)
    return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the JVM's server sockets: a TIME_WAIT left by a killed broker must
    # not count as "in use" when the node restarts on its port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def read_text(path: Path) -> str | None:
    """The file's text, or None when it cannot be read."""
    try:
        return path.read_text()
    except OSError:
        return None


def file_size(path: Path) -> int:
    """Size in bytes, 0 for a missing file."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (see :func:`last_lines`), or why there are none."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return f"({path} not found)"
    return last_lines(data, lines) or f"({path} is empty)"


def last_lines(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines without Java stack frames, so the exception's message (the
    line that says what is wrong) survives the cut."""
    kept = [line for line in text.splitlines() if not _FRAME.match(line)]
    return "\n".join(kept[-lines:])
