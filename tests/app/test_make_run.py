"""`make run`, the README's first command, run non-interactively.

Tries to break: the demo a new user sees first ending without a verified match between
the primary and the backup (or not ending at all).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.tools]

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_ends_with_a_verified_match(kafka, tmp_path):
    env = {
        **os.environ,
        # the session's cluster stands in for the embedded one `make run` would start
        "LOWMARK_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
    }
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "run",
            f"ARGS=--duration 6 --rate 10 --volume-size 64MiB --workdir {tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "VERIFIED: backup site dr1 is byte-identical to the primary" in out, out[-4000:]
    assert out.count("MATCH") >= 2 and "MISMATCH" not in out
    assert "W RPO" in out, "the live view was not shown"
