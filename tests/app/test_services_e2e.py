"""The three services as an operator runs them: `lowmark serve | watermark | apply`.

Tries to break: bytes written over NBD by clients we did not write (qemu-io, fio) that do
not reach the log, a backup that differs from the primary after a graceful stop, metrics
that do not move while the workload runs, a service that does not stop on SIGTERM.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from connectors.image.image import file_digest
from pipeline.site import SiteDir
from tests.cli_services import CgServices
from tests.prereqs import require_tools
from tests.replication_helpers import read_log, rebuild_from_log, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.tools]


class Services(CgServices):
    """Two volumes, vol2 in sync mode."""

    def __init__(self, tmp: Path, bootstrap: str, cg: str) -> None:
        vols = (("vol1", "64MiB", "async"), ("vol2", "16MiB", "sync"))
        super().__init__(tmp, bootstrap, cg, volumes=vols)

    def metrics(self, name: str) -> dict[str, float]:
        return self.numbers(name)


def test_services_replicate_nbd_clients_and_expose_metrics(kafka_conf, unique_name, tmp_path):
    require_tools("qemu-io", "fio")
    svc = Services(tmp_path, kafka_conf["bootstrap.servers"], unique_name)
    try:
        for name in ("serve", "watermark", "apply"):
            svc.start(name)
        wait_until(
            lambda: svc.metrics("serve").get("lowmark_primary_up") == 1.0, 60, "serve's /metrics"
        )
        wait_until(
            lambda: svc.metrics("apply").get("lowmark_applier_up") == 1.0, 60, "apply's /metrics"
        )
        uri1 = f"nbd://127.0.0.1:{svc.nbd_port}/vol1"
        uri2 = f"nbd://127.0.0.1:{svc.nbd_port}/vol2"
        before = {n: svc.metrics(n) for n in ("serve", "watermark", "apply")}
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "write -z 2M 1M",
                "-c",
                "discard 8M 1M",
                "-c",
                "read -P 0xab 0 1M",
                uri1,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 64k", "-c", "flush", uri2],
            check=True,
            capture_output=True,
            timeout=60,
        )
        fio = subprocess.run(
            [
                "fio",
                "--name=rw",
                "--ioengine=nbd",
                f"--uri={uri1}",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=32m",
                "--offset=16m",
                "--runtime=3",
                "--time_based",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_state_save=0",
                f"--directory={tmp_path}",
                "--output-format=json",
            ],
            capture_output=True,
            timeout=120,
            text=True,
        )
        assert fio.returncode == 0, fio.stderr + fio.stdout[-2000:]
        # the numbers move while the workload runs
        wait_until(
            lambda: (
                svc.metrics("apply").get("lowmark_applier_applied_w_timestamp_seconds", 0)
                > before["apply"].get("lowmark_applier_applied_w_timestamp_seconds", 0)
            ),
            30,
            "the applier's W to move",
        )
        after = {n: svc.metrics(n) for n in ("serve", "watermark", "apply")}
        assert (
            after["serve"]["lowmark_primary_bytes_total"]
            > before["serve"]["lowmark_primary_bytes_total"]
        )
        assert after["serve"]["lowmark_primary_nbd_bytes_written_total"] > 0
        assert after["watermark"]["lowmark_watermark_w_timestamp_seconds"] > before[
            "watermark"
        ].get("lowmark_watermark_w_timestamp_seconds", 0)
        assert after["watermark"]["lowmark_watermark_published_total"] > before["watermark"].get(
            "lowmark_watermark_published_total", 0
        )
        assert after["apply"]["lowmark_applier_applied_bytes_total"] > 0
        assert 0 <= after["apply"]["lowmark_applier_rpo_seconds"] < 30
        # every number a service exports is in the catalogue, named by the conventions
        for name in ("serve", "watermark", "apply"):
            assert "not in the catalogue" not in svc.log(name), svc.log(name)[-3000:]
        # graceful stop: the primary publishes everything, the backup applies it
        assert svc.stop("serve") == 0
        primary = {
            v: file_digest(SiteDir(tmp_path / "primary").image_path(v)) for v in ("vol1", "vol2")
        }

        def converged() -> bool:
            return all(
                SiteDir(tmp_path / "backup").image_path(v).exists()
                and file_digest(SiteDir(tmp_path / "backup").image_path(v)) == d
                for v, d in primary.items()
            )

        wait_until(converged, 60, "the backup to equal the primary", interval_s=0.5)
        assert svc.stop("apply") == 0
        assert svc.stop("watermark") == 0
    except BaseException:
        svc.kill_all()
        for name in svc.procs:
            print(f"----- {name} log -----\n{svc.log(name)[-4000:]}")
        raise
    # every byte written over NBD is in the log: an image rebuilt from it equals the primary
    sizes = {"vol1": 64 << 20, "vol2": 16 << 20}
    rebuilt = rebuild_from_log(read_log(kafka_conf, unique_name), sizes)
    for v in sizes:
        data = SiteDir(tmp_path / "primary").image_path(v).read_bytes()
        assert bytes(rebuilt[v]) == data, f"{v}: the log does not hold every NBD write"
