"""`lowmark console` in a real headless browser (Debian's Chromium, driven by Playwright)
against a running CG: the three services as an operator runs them.

Tries to break: a page that shows a stale or empty view; a graph that does not move; a
stopped site still shown green (it must turn red within 5 s); an action taken without the
token, or without confirmation; a token that leaks into the page or the log.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.embedded_kafka.procs import free_port
from tests.cli_services import CgServices
from tests.prereqs import require_tools
from tests.replication_helpers import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.tools]

TOKEN = "console-test-token-0123456789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def shots_dir(tmp: Path) -> Path:
    """Where the screenshots go: LOWMARK_SCREENSHOTS (bench/results/console when
    refreshing the committed ones), else the test's own folder."""
    d = Path(os.environ.get("LOWMARK_SCREENSHOTS") or tmp / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def browser() -> Any:
    require_tools("chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_console_shows_the_cg_live_turns_a_stopped_site_red_and_guards_actions(
    kafka_conf, unique_name, tmp_path, browser
):
    require_tools("qemu-io", "nbdinfo")
    scene = CgServices(tmp_path, kafka_conf["bootstrap.servers"], unique_name)
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    shots = shots_dir(tmp_path)
    try:
        scene.start_all()
        scene.write(0x11)
        scene.start("console", "console", "--listen", f"127.0.0.1:{port}", "--refresh", "0.5",
                    "--actions", "--token-file", str(token_file), "--work-dir",
                    str(tmp_path / "console"))  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        wait_until(lambda: _reachable(port), 30, "the console to serve")
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.getElementById('cg').textContent !== '…'")
        assert page.text_content("#cg") == unique_name
        page.wait_for_selector('tr.site[data-site="dr1"][data-level="ok"]', timeout=20_000)
        assert page.get_attribute("#overall", "class") == "pill ok"

        # the graph moves: more points, and the page updated without a reload
        page.wait_for_function("+document.getElementById('graph').dataset.points >= 3",
                               timeout=20_000)  # fmt: skip
        first = int(page.get_attribute("#graph", "data-points") or 0)
        v0 = int(page.evaluate("document.body.dataset.version"))
        for pattern in range(0x20, 0x24):
            scene.write(pattern)
        page.wait_for_function(f"+document.getElementById('graph').dataset.points > {first}")
        assert int(page.evaluate("document.body.dataset.version")) > v0
        assert page.locator("#graph polyline").count() >= 2  # W and dr1
        page.screenshot(path=str(shots / "console-healthy.png"), full_page=True)

        # a site stopped by the test turns red within 5 s
        assert scene.stop("apply") == 0
        t0 = time.monotonic()
        page.wait_for_selector('tr.site[data-site="dr1"][data-level="bad"]', timeout=5_000)
        red_s = time.monotonic() - t0
        assert "does not answer" in page.text_content('tr.site[data-site="dr1"]')
        assert page.get_attribute("#overall", "class") == "pill bad"
        page.screenshot(path=str(shots / "console-site-stopped.png"), full_page=True)

        # actions: refused without the token, or without confirmation; taken with both
        refused = page.evaluate("""async () => {
            const r = await fetch('/api/actions/marker', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({name: 'm-no-token', confirm: true})});
            return [r.status, (await r.json()).error]; }""")
        assert refused == [403, "wrong or missing token"]
        unconfirmed = page.evaluate(f"""async () => {{
            const r = await fetch('/api/actions/marker', {{method: 'POST',
                headers: {{'Content-Type': 'application/json',
                          'Authorization': 'Bearer {TOKEN}'}},
                body: JSON.stringify({{name: 'm-unconfirmed'}})}});
            return r.status; }}""")
        assert unconfirmed == 400
        page.fill("#token", TOKEN)
        page.fill("#action-name", "from-console")
        page.once("dialog", lambda d: d.accept())  # the confirmation the button asks for
        page.click("#take-marker")
        page.wait_for_function(
            "document.getElementById('action-result').textContent.includes('taken')",
            timeout=30_000)  # fmt: skip
        page.wait_for_function(
            "document.getElementById('marker').textContent === 'from-console'", timeout=20_000
        )
        page.screenshot(path=str(shots / "console-marker-taken.png"), full_page=True)

        # a drill from the page: the lowmark command itself, serving a clone over NBD
        page.fill("#action-name", "d1")
        page.once("dialog", lambda d: d.accept())
        page.click("#take-drill")
        page.wait_for_function(
            "document.getElementById('action-result').textContent.includes('serves nbd+unix')",
            timeout=90_000)  # fmt: skip
        uri = page.text_content("#action-result").split("serves ", 1)[1].strip()
        listed = subprocess.run(["nbdinfo", "--list", uri], capture_output=True, text=True,
                                timeout=30)  # fmt: skip
        assert listed.returncode == 0 and "vol1" in listed.stdout, listed.stdout + listed.stderr
        page.wait_for_selector('li[data-op="drill:d1"][data-running="true"]', timeout=10_000)
        page.screenshot(path=str(shots / "console-drill.png"), full_page=True)
        page.once("dialog", lambda d: d.accept())
        page.click("#take-drill-stop")
        page.wait_for_selector('li[data-op="drill:d1"][data-running="false"]', timeout=60_000)
        assert TOKEN not in page.content()
    except BaseException:
        scene.dump_logs()
        raise
    finally:
        scene.kill_all()
    log = scene.log("console")
    assert "console action refused" in log and '"status":403' in log
    assert "console action done" in log and TOKEN not in log
    print(f"dr1 turned red {red_s:.2f} s after its applier stopped; screenshots in {shots}")


def _reachable(port: int) -> bool:
    out = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/api/status"],
                         capture_output=True, timeout=5)  # fmt: skip
    return out.returncode == 0
