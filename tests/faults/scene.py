"""The scene of the broker-fault tests: `lowmark serve` (two volumes), `lowmark watermark`
and `lowmark apply` as processes reaching Kafka through the fault proxies; one NBD writer
per volume recording every write's answer and latency; a watcher of the applier's RPO;
a sampler checking every backup snapshot as it appears (``tests.faults.cut_check``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from connectors.embedded_kafka.procs import free_port
from connectors.nbd import protocol as p
from pipeline.ops.status import scrape
from pipeline.site import SiteDir
from tests.faults.cut_check import ACK, BLOCK, ERR, HANG, PENDING, block_for, decode, make_block
from tests.nbd_raw_client import Client, Closed
from tests.replication_helpers import wait_until

VOLUMES = ("v0", "v1")
BLOCKS = 1024
SIZE = BLOCKS * BLOCK
#: an answer the workload treats as a violation too: the server closed the connection
#: instead of replying
DROPPED = "dropped"
#: how long a late reply is still waited for before the write counts as hung
HANG_S = 60.0


class Services:
    """serve + watermark + apply of one CG, as `lowmark` processes."""

    def __init__(self, tmp: Path, bootstrap: str, cg: str, mode: str, timeout_s: float) -> None:
        self.tmp, self.mode, self.cg = tmp, mode, cg
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {n: free_port() for n in ("nbd", "serve", "watermark", "apply")}
        volumes = "".join(f'[[serve.volumes]]\nname = "{v}"\nsize = {SIZE}\nmode = "{mode}"\n'
                          for v in VOLUMES)  # fmt: skip
        self.config = tmp / "lowmark.toml"
        self.config.write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
[cg]
name = "{cg}"
[serve]
interceptor_id = "p"
data_dir = "{tmp / "primary"}"
listen = "127.0.0.1:{self.ports["nbd"]}"
metrics = "127.0.0.1:{self.ports["serve"]}"
replication_timeout_s = {timeout_s}
admin_socket = ""
{volumes}
[watermark]
liveness_timeout_s = 60
metrics = "127.0.0.1:{self.ports["watermark"]}"
[apply]
site = "dr"
data_dir = "{tmp / "dr"}"
checkpoint_interval_s = 0.2
snapshot_interval_s = 0.5
snapshots_kept = 6
metrics = "127.0.0.1:{self.ports["apply"]}"
""")
        self.backup = SiteDir(tmp / "dr")
        self.primary = SiteDir(tmp / "primary")

    def _start(self, name: str) -> None:
        out = (self.tmp / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "pipeline.app.cli", "--log-format", "json", name,
               "--config", str(self.config)]  # fmt: skip
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "LOWMARK_CONFIG": ""})  # fmt: skip

    def up(self) -> None:
        self._start("watermark")
        self._start("serve")
        wait_until(lambda: self.metrics("serve").get("lowmark_primary_up") == 1.0, 90,
                   "lowmark serve up", interval_s=0.2)  # fmt: skip
        self._start("apply")
        wait_until(lambda: self.rpo() is not None, 90, "the applier's first W", interval_s=0.2)

    def metrics(self, name: str) -> dict[str, float]:
        return scrape(f"127.0.0.1:{self.ports[name]}")

    def rpo(self) -> float | None:
        value = self.metrics("apply").get("lowmark_applier_rpo_seconds")
        return None if value is None or value != value else value  # NaN: no W yet

    def exited(self) -> dict[str, int]:
        return {n: rc for n, proc in self.procs.items() if (rc := proc.poll()) is not None}

    def down(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, name: str, nbytes: int = 3000) -> str:
        return (self.tmp / f"{name}.log").read_bytes()[-nbytes:].decode(errors="replace")


@dataclass
class Outcome:
    seq: int
    at: float  # monotonic, when issued
    latency_s: float
    answer: str
    #: no reply within the deadline: ``answer`` is what came later (HANG: nothing came)
    late: bool = False


class Writer:
    """One volume's client: writes seq 1, 2, ... one at a time over NBD, each carrying the
    other volume's newest acknowledged seq; records every answer. A reply slower than
    ``deadline_s`` is late: the writer waits up to ``HANG_S`` more for it (a late ack is
    still an ack to the oracles) and records HANG if none comes, then reconnects."""

    def __init__(self, port: int, index: int, deadline_s: float, pace_s: float) -> None:
        self.port, self.index, self.deadline_s, self.pace_s = port, index, deadline_s, pace_s
        self.answers: list[str] = []
        self.outcomes: list[Outcome] = []
        self.last_acked = 0
        self.other: Writer | None = None
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"writer-v{index}", daemon=True)

    def _connect(self) -> Client:
        c = Client(self.port, timeout=self.deadline_s)
        c.greet()
        c.go(VOLUMES[self.index])
        return c

    def _run(self) -> None:
        client: Client | None = None
        try:
            while not self.stop.is_set():
                if client is None:
                    client = self._connect()
                seq = len(self.answers) + 1
                dep = self.other.last_acked if self.other else 0
                self.answers.append(PENDING)
                started = time.monotonic()
                late = False
                try:
                    client.request(p.CMD_WRITE, block_for(seq, BLOCKS) * BLOCK, BLOCK,
                                   payload=make_block(self.index, seq, dep))  # fmt: skip
                    try:
                        _, err, _ = client.reply()
                    except TimeoutError:
                        late = True
                        client.sock.settimeout(HANG_S)
                        _, err, _ = client.reply()
                        client.sock.settimeout(self.deadline_s)
                    answer = ACK if err == 0 else ERR
                except TimeoutError:
                    answer = HANG
                except (Closed, OSError):
                    answer = DROPPED
                if answer in (HANG, DROPPED):
                    client.close()
                    client = None
                self.answers[seq - 1] = answer
                self.outcomes.append(
                    Outcome(seq, started, time.monotonic() - started, answer, late)
                )
                if answer == ACK:
                    self.last_acked = seq
                self.stop.wait(self.pace_s)
        except BaseException as exc:  # read by the test
            self.error = exc
        finally:
            if client is not None:
                client.close()


def start_writers(port: int, deadline_s: float, pace_s: float) -> list[Writer]:
    ws = [Writer(port, i, deadline_s, pace_s) for i in range(len(VOLUMES))]
    ws[0].other, ws[1].other = ws[1], ws[0]
    for w in ws:
        w.thread.start()
    return ws


@dataclass
class Watch:
    """The applier's RPO every ``every_s``, and every backup snapshot decoded as it
    appears (the states a backup exposes), for the cut checks after the run."""

    services: Services
    every_s: float = 0.2
    rpo: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, RPO s)
    cuts: list[tuple[int, dict[int, list[tuple[int, int]]]]] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self._seen: set[int] = set()

    def start(self) -> Watch:
        self.thread.start()
        return self

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            rpo = self.services.rpo()
            if rpo is not None:
                self.rpo.append((time.monotonic(), rpo))
            self.sample()

    def sample(self) -> None:
        for w, snap in self.services.backup.snapshots():
            if w in self._seen:
                continue
            self._seen.add(w)
            try:
                images = {i: snap.image_path(v).read_bytes() for i, v in enumerate(VOLUMES)}
            except FileNotFoundError:
                continue  # pruned while read
            held = {}
            for i, img in images.items():
                held[i], bad = decode(img.ljust(SIZE, b"\0"), i)
                self.torn += [f"snapshot W {w}: {b}" for b in bad]
            self.cuts.append((w, held))

    def max_rpo(self, start: float, end: float) -> float:
        return max((r for t, r in self.rpo if start <= t <= end), default=float("nan"))


def wait_rpo_below(
    services: Services, limit_s: float, timeout_s: float, since: float | None = None
) -> float | None:
    """Seconds from ``since`` (monotonic; default now) until the applier's RPO is at most
    ``limit_s``; None if not within ``timeout_s``."""
    started = time.monotonic()
    since = started if since is None else since
    while time.monotonic() - started < timeout_s:
        rpo = services.rpo()
        if rpo is not None and rpo <= limit_s:
            return time.monotonic() - since
        time.sleep(0.1)
    return None


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


__all__ = ["ACK", "DROPPED", "ERR", "HANG", "PENDING"]
