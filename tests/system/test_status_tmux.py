"""`lowmark status --watch` in a real terminal (tmux, 80 columns) against running services.

Tries to break: a line wider than the terminal (tmux would wrap it: the table falls
apart on the operator's screen); a live view that does not refresh; colour missing on a
terminal; a stopped site still OK.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_services import CgServices
from tests.prereqs import require_tools
from tests.replication_helpers import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.tools]


def capture(session: str, escapes: bool = False) -> str:
    args = ["tmux", "capture-pane", "-p", "-t", session] + (["-e"] if escapes else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout


def test_status_watch_renders_within_80_columns_in_tmux(kafka_conf, unique_name, tmp_path):
    require_tools("tmux", "qemu-io")
    scene = CgServices(tmp_path, kafka_conf["bootstrap.servers"], unique_name)
    session = f"lowmark-{os.getpid()}"
    try:
        scene.start_all()
        scene.write(0x11)
        cmd = shlex.join([*scene.argv("status", "--watch", "--interval", "0.5", "--config",
                                      str(scene.config))])  # fmt: skip
        env = ["env", f"PYTHONPATH={os.getcwd()}", "LOWMARK_CONFIG=", "TERM=xterm-256color"]
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "40",
                        shlex.join(env) + " " + cmd], check=True, timeout=10)  # fmt: skip
        wait_until(lambda: "dr1" in capture(session) and " OK " in capture(session), 60,
                   "the table with dr1 OK", interval_s=0.3)  # fmt: skip
        screen = capture(session)
        lines = screen.splitlines()
        assert max(len(ln) for ln in lines) <= 80, screen
        assert any(ln.startswith("SITE") for ln in lines), screen
        assert lines[0].startswith(f"lowmark · {unique_name[:20]}"), screen
        assert "\x1b[32m" in capture(session, escapes=True), "no colour on a terminal"
        first = screen
        wait_until(lambda: capture(session) != first, 10, "the view to refresh", interval_s=0.2)
        # the site's applier stops: its row says so
        assert scene.stop("apply") == 0
        t0 = time.monotonic()
        wait_until(lambda: "does not answer" in capture(session), 10, "dr1 flagged",
                   interval_s=0.2)  # fmt: skip
        flagged = time.monotonic() - t0
        screen = capture(session)
        assert max(len(ln) for ln in screen.splitlines()) <= 80, screen
        out = Path(os.environ.get("LOWMARK_SCREENSHOTS") or tmp_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "status-watch-80x40.txt").write_text(first + "\n----- after dr1 stopped -----\n"
                                                    + screen)  # fmt: skip
        print(f"dr1 flagged {flagged:.2f} s after its applier stopped")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)
        scene.kill_all()
