"""The console's HTTP surface without a broker: the poll is replaced by a fixed view.

Tries to break: an action taken when the console was started read-only, with a wrong
token, without confirmation; actions allowed without a (long enough) token; a page whose
event stream does not deliver new views; a poll failure that blanks the page.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest

from pipeline.app.console import Console, ConsoleConfig
from pipeline.app.console_ops import OperationError, Operations
from pipeline.errors import ConfigError, LowmarkError

TOKEN = "a-token-of-enough-length"


class FixedConsole(Console):
    def __init__(self, cfg: ConsoleConfig) -> None:
        super().__init__(cfg)
        self.n = 0
        self.fail = False
        self.acted: list[tuple[str, str]] = []

    def poll(self) -> dict[str, Any]:
        if self.fail:
            raise LowmarkError("the broker is electing")
        self.n += 1
        return {"cg": "db", "rpo_s": 0.01 * self.n, "sites": [], "n": self.n}

    def _act(self, kind: str, name: str) -> dict[str, Any]:
        self.acted.append((kind, name))
        return {"ts": 1, "emitter": "a", "max_hold_s": 0.0}


def serve(console: Console) -> tuple[int, threading.Event]:
    stop, ready = threading.Event(), threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.run(console.run(stop, lambda p: (port.append(p), ready.set())))

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(10)
    return port[0], stop


def post(port: int, kind: str, body: dict[str, Any], token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/actions/{kind}",
                                 data=orjson.dumps(body), headers=headers)  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


def test_actions_need_the_flag_the_token_and_a_confirmation() -> None:
    ro = FixedConsole(ConsoleConfig("db", {}, "127.0.0.1:0", 0.1))
    port, stop = serve(ro)
    try:
        assert post(port, "marker", {"name": "m", "confirm": True}, TOKEN)[0] == 404
    finally:
        stop.set()
    rw = FixedConsole(ConsoleConfig("db", {}, "127.0.0.1:0", 0.1, actions=True, token=TOKEN))
    port, stop = serve(rw)
    try:
        assert post(port, "marker", {"name": "m", "confirm": True}, None)[0] == 403
        assert post(port, "marker", {"name": "m", "confirm": True}, TOKEN + "x")[0] == 403
        assert post(port, "marker", {"name": "m"}, TOKEN)[0] == 400
        assert post(port, "marker", {"confirm": True}, TOKEN)[0] == 400
        assert post(port, "reboot", {"name": "m", "confirm": True}, TOKEN)[0] == 404
        # a failover is confirmed by typing the site's name, not by a flag alone
        assert post(port, "failover", {"name": "dr1", "confirm": True}, TOKEN)[0] == 400
        assert post(port, "failover", {"name": "dr1", "confirm": True, "typed": "dr2"},
                    TOKEN)[0] == 400  # fmt: skip
        assert rw.acted == []
        assert post(port, "failover", {"name": "dr1", "confirm": True, "typed": "dr1"},
                    TOKEN)[0] == 200  # fmt: skip
        assert rw.acted.pop() == ("failover", "dr1")
        code, body = post(port, "snapshot", {"name": "s1", "confirm": True}, TOKEN)
        assert (code, body["ok"], rw.acted) == (200, True, [("snapshot", "s1")])
        assert rw.stats["actions_refused"] == 7 and rw.stats["actions"] == 2
    finally:
        stop.set()


@pytest.mark.parametrize("token", ["", "short"])
def test_actions_without_a_real_token_are_refused_at_start(token: str) -> None:
    with pytest.raises(ConfigError, match="token"):
        ConsoleConfig("db", {}, actions=True, token=token)


def test_the_event_stream_delivers_each_new_view_and_a_failed_poll_keeps_the_last() -> None:
    c = FixedConsole(ConsoleConfig("db", {}, "127.0.0.1:0", 0.1))
    port, stop = serve(c)
    try:
        seen: list[dict[str, Any]] = []
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=10) as r:
            while len(seen) < 3:
                line = r.readline()
                if line.startswith(b"data: "):
                    seen.append(orjson.loads(line[6:]))
        ns = [v["n"] for v in seen]
        assert ns == sorted(ns) and len(set(ns)) == 3, ns
        assert len(seen[-1]["rpo_history"]["t"]) >= 3  # the graph's points grow
        c.fail = True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=10) as r:
            while True:
                line = r.readline()
                if line.startswith(b"data: ") and (v := orjson.loads(line[6:])).get("error"):
                    break
        assert "electing" in v["error"] and v["n"] >= ns[-1]  # the last view, said stale
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert b"EventSource" in page
    finally:
        stop.set()


def test_a_drill_that_cannot_start_says_why_from_its_own_log(tmp_path) -> None:
    """The page starts the lowmark command itself; when it fails, its last log line is
    the answer (here: a config that does not exist)."""
    ops = Operations(tmp_path / "missing.toml", tmp_path / "work")
    with pytest.raises(OperationError, match=r"did not start serving: .*missing\.toml"):
        ops.drill("d1", wait_s=60)
    (state,) = ops.states()
    assert state["kind"] == "drill" and not state["running"] and state["exit_code"] != 0
    with pytest.raises(ConfigError, match="drill name"):
        ops.drill("../etc")
