"""``lowmark demo`` (what ``make run`` runs): the whole pipeline, live, then a verdict.

It starts (or reuses) Kafka, runs ``lowmark serve`` with two volumes, ``lowmark watermark``
and one backup site's ``lowmark apply`` as separate processes, drives real NBD clients
(fio's nbd engine on one volume, qemu-io on the other), shows W, RPO, throughput and lag
every second, then stops the workload, waits for the backup to reach the final W and
compares the primary's and the backup's images volume by volume.

Ctrl-C at any point stops every process it started, Kafka included if it started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from connectors.embedded_kafka.procs import free_port
from connectors.image.image import file_digest
from pipeline.app.config import parse_size
from pipeline.errors import SetupError
from pipeline.ops.status import scrape
from pipeline.site import SiteDir

if TYPE_CHECKING:
    from connectors.embedded_kafka.cluster import KafkaCluster


@dataclass(frozen=True)
class DemoOptions:
    duration_s: float = 20.0
    rate_mb_s: float = 20.0  # fio's write rate on the first volume
    volume_size: str = "256MiB"
    workdir: Path = Path(".lowmark/demo")
    keep_kafka: bool = False
    bootstrap: str | None = None


class Demo:
    def __init__(self, opts: DemoOptions, out: Callable[[str], None]) -> None:
        self.opts = opts
        self.out = out
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.kafka: KafkaCluster | None = None
        self.cg = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        self.dir = (opts.workdir / self.cg).absolute()
        self.ports = {n: free_port() for n in ("nbd", "serve", "watermark", "apply")}

    # ---------------------------------------------------------------- setup

    def _bootstrap(self) -> str:
        if self.opts.bootstrap:
            return self.opts.bootstrap
        if os.environ.get("LOWMARK_BOOTSTRAP_SERVERS"):
            return os.environ["LOWMARK_BOOTSTRAP_SERVERS"]
        from connectors.embedded_kafka.cluster import KafkaCluster
        from connectors.embedded_kafka.state import find_bootstrap

        found = find_bootstrap("default")
        if found:
            self.out(f"using the embedded Kafka cluster at {found}")
            return found
        self.out("starting the embedded Kafka cluster (Apache Kafka, KRaft, 1 node) ...")
        self.kafka = cluster = KafkaCluster("default").start()
        self.out(f"Kafka is up at {cluster.bootstrap_servers}")
        return cluster.bootstrap_servers

    def _write_config(self, bootstrap: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        size = parse_size(self.opts.volume_size, "--volume-size")
        cfg = self.dir / "lowmark.toml"
        cfg.write_text(
            f"""# written by `lowmark demo`; run the same services by hand with --config {cfg}
[kafka]
bootstrap_servers = "{bootstrap}"

[cg]
name = "{self.cg}"

[serve]
interceptor_id = "primary"
data_dir = "{self.dir / "primary"}"
listen = "127.0.0.1:{self.ports["nbd"]}"
metrics = "127.0.0.1:{self.ports["serve"]}"
allow_single_copy_sync = true  # the demo's cluster is one broker
[[serve.volumes]]
name = "vol1"
size = {size}
mode = "async"
[[serve.volumes]]
name = "vol2"
size = {size}
mode = "sync"

[watermark]
metrics = "127.0.0.1:{self.ports["watermark"]}"

[apply]
site = "dr1"
data_dir = "{self.dir / "backup-dr1"}"
checkpoint_interval_s = 1
metrics = "127.0.0.1:{self.ports["apply"]}"
"""
        )
        return cfg

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.children[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _metrics(self, name: str) -> dict[str, float]:
        return scrape(f"127.0.0.1:{self.ports[name]}", timeout_s=1.0)

    def _wait_up(self, name: str, metric: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.children[name]
            if proc.poll() is not None:
                raise SetupError(
                    f"`lowmark {name}` exited with {proc.returncode}; its log:\n"
                    + (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]
                )
            if self._metrics(name).get(metric) == 1.0:
                return
            time.sleep(0.2)
        raise SetupError(f"`lowmark {name}` did not come up in {timeout_s}s; see {self.dir}")

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        for tool in ("fio", "qemu-io"):
            if shutil.which(tool) is None:
                raise SetupError(f"{tool} is missing: run `make tools` (Debian: fio qemu-utils)")
        cfg = self._write_config(self._bootstrap())
        lowmark = [sys.executable, "-m", "pipeline.app.cli", "--log-format", "json"]
        for name in ("serve", "watermark", "apply"):
            self._spawn(name, [*lowmark, name, "--config", str(cfg)])
        self._wait_up("serve", "lowmark_primary_up")
        self._wait_up("watermark", "lowmark_watermark_up")
        self._wait_up("apply", "lowmark_applier_up")
        self.out(
            f"CG {self.cg}: volumes vol1 (async) and vol2 (sync) served at "
            f"nbd://127.0.0.1:{self.ports['nbd']}/vol1 and .../vol2; backup site dr1\n"
            f"workload for {self.opts.duration_s:g}s: fio randwrite on vol1 at "
            f"{self.opts.rate_mb_s:g} MB/s, qemu-io writes on vol2"
        )
        self._workload()
        return self._verify()

    def _workload(self) -> None:
        uri = f"nbd://127.0.0.1:{self.ports['nbd']}"
        self._spawn(
            "fio",
            [
                "fio",
                "--name=demo",
                "--ioengine=nbd",
                f"--uri={uri}/vol1",
                "--rw=randwrite",
                "--bssplit=4k/60:64k/30:1m/10",
                "--iodepth=8",
                f"--rate={self.opts.rate_mb_s:g}m",
                f"--runtime={self.opts.duration_s:g}",
                "--time_based",
            ],
        )
        size = parse_size(self.opts.volume_size)
        header = (
            f"{'t':>5} {'W RPO':>9} {'backup RPO':>11} {'primary MB/s':>13} "
            f"{'applied MB/s':>13} {'waiting MB':>11} {'pending MB':>11}"
        )
        self.out(header)
        t0 = time.monotonic()
        prev = (t0, 0.0, 0.0)
        n = 0
        while time.monotonic() - t0 < self.opts.duration_s:
            off = (n * 65536) % (size - 65536)
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P {n % 255 + 1} {off} 64k", f"{uri}/vol2"],
                capture_output=True,
                timeout=30,
                check=True,
            )
            n += 1
            now = time.monotonic()
            if now - prev[0] >= 1.0:
                prev = self._show(now - t0, prev)
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.children["fio"].wait(30)
        self.out(f"workload done: fio finished, qemu-io made {n} writes of 64 KiB on vol2")

    def _show(self, t: float, prev: tuple[float, float, float]) -> tuple[float, float, float]:
        s, w, a = self._metrics("serve"), self._metrics("watermark"), self._metrics("apply")
        now = time.monotonic()
        pb = s.get("lowmark_primary_bytes_total", 0.0)
        ab = a.get("lowmark_applier_applied_bytes_total", 0.0)
        dt = max(1e-3, now - prev[0])

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"

        self.out(
            f"{t:5.0f} {ms(w.get('lowmark_watermark_rpo_seconds')):>9} "
            f"{ms(a.get('lowmark_applier_rpo_seconds')):>11} {(pb - prev[1]) / dt / 1e6:13.1f} "
            f"{(ab - prev[2]) / dt / 1e6:13.1f} "
            f"{s.get('lowmark_primary_unreplicated_bytes', 0) / 1e6:11.1f} "
            f"{a.get('lowmark_applier_pending_bytes', 0) / 1e6:11.1f}"
        )
        return now, pb, ab

    def _verify(self) -> int:
        self.out("stopping the primary (it publishes every write and its final progress) ...")
        self._stop("serve")
        primary = {
            v: file_digest(SiteDir(self.dir / "primary").image_path(v)) for v in ("vol1", "vol2")
        }
        self.out("waiting for backup site dr1 to apply up to the final W ...")
        deadline = time.monotonic() + 120
        backup: dict[str, str | None] = {}
        while time.monotonic() < deadline:
            backup = {
                v: file_digest(p)
                if (p := SiteDir(self.dir / "backup-dr1").image_path(v)).exists()
                else None
                for v in primary
            }
            if backup == primary:
                break
            time.sleep(0.5)
        ok = backup == primary
        for v, d in primary.items():
            self.out(
                f"  {v}: primary {d[:16]}  backup {str(backup.get(v))[:16]}  "
                f"{'MATCH' if backup.get(v) == d else 'MISMATCH'}"
            )
        self.out(
            "VERIFIED: backup site dr1 is byte-identical to the primary"
            if ok
            else f"FAILED: the backup differs from the primary; logs in {self.dir}"
        )
        return 0 if ok else 1

    # ---------------------------------------------------------------- teardown

    def _stop(self, name: str, timeout_s: float = 30) -> None:
        proc = self.children.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for name in ("fio", "serve", "apply", "watermark"):
            self._stop(name)
        if self.kafka is not None and not self.opts.keep_kafka:
            self.out("stopping the embedded Kafka cluster this demo started")
            self.kafka.stop()


def run_demo(opts: DemoOptions, out: Callable[[str], None] = print) -> int:
    demo = Demo(opts, out)
    try:
        return demo.run()
    except KeyboardInterrupt:
        out("\ninterrupted: stopping everything")
        return 130
    finally:
        demo.close()
